//! `max_events_per_second`: a token bucket per source, the overload guard
//! set from stress tests. Readers take a token per record they hand on and
//! hold back (stop reading) while the bucket is in debt, so the pressure
//! goes back to the clients (TCP flow control) or the broker (Kafka
//! consumer lag); nothing is dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Records the bucket holds at most, in seconds of the rate.
const BURST_SECONDS: f64 = 0.1;

pub struct Throttle {
    rate: f64,
    burst: f64,
    /// Tokens (negative: debt) as of the instant.
    state: Mutex<(f64, Instant)>,
    /// Microseconds readers were told to hold back.
    held_us: AtomicU64,
}

impl Throttle {
    pub fn new(per_second: u64) -> Throttle {
        let rate = per_second as f64;
        let burst = (rate * BURST_SECONDS).max(1.0);
        Throttle { rate, burst, state: Mutex::new((burst, Instant::now())), held_us: AtomicU64::new(0) }
    }

    /// Takes `n` tokens; returns how long the reader must hold back before
    /// it hands on more (zero while the bucket has tokens).
    pub fn take(&self, n: u64) -> Duration {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * self.rate).min(self.burst) - n as f64;
        st.1 = now;
        if st.0 >= 0.0 {
            return Duration::ZERO;
        }
        let wait = Duration::from_secs_f64(-st.0 / self.rate);
        self.held_us.fetch_add(wait.as_micros() as u64, Ordering::Relaxed);
        wait
    }

    /// Seconds readers were told to hold back so far.
    pub fn held_seconds(&self) -> f64 {
        self.held_us.load(Ordering::Relaxed) as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debt_is_paid_back_at_the_rate() {
        let t = Throttle::new(1000);
        assert_eq!(t.take(100), Duration::ZERO, "the burst");
        let w = t.take(500);
        assert!(w > Duration::from_millis(450) && w <= Duration::from_millis(500), "{w:?}");
        std::thread::sleep(w);
        // Paid back: the next take waits only for itself.
        let w = t.take(100);
        assert!(w <= Duration::from_millis(110), "{w:?}");
    }
}

//! What `tally serve` keeps of the rows it answers from: per metric (a
//! summary's grouping sets apart) and group key, the latest row and the day
//! curve, every point of the newest day and the one before it.
//!
//! Rows arrive on the emitter thread, so keeping one is a map probe by the
//! row's dims text (as the engine renders it) and a copy of its measures
//! text (`,"pv":120,"uv":87}`), never a JSON parse. The curves' memory is
//! bounded: a point beyond `max_bytes` is dropped and counted; a day two
//! days behind the newest is freed when the newest begins.
//!
//! With a state directory the store survives restarts: each checkpoint
//! keeps a base (the whole store, [`StoreSaved`]) or the rows recorded
//! since the last checkpoint (the journal), which a restart replays.

use std::collections::HashMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

const DAY_MS: i64 = 86_400_000;
/// Bookkeeping bytes per point besides its measures text.
const POINT_OVERHEAD: u64 = 12;
/// The journal's largest size: beyond it (checkpoints far apart, or only
/// at the stop) it is dropped and the next checkpoint writes a base.
const JOURNAL_MAX_BYTES: usize = if cfg!(test) { 4096 } else { 64 << 20 };

/// A key's latest row and its curve.
#[derive(Clone, Default, Serialize, Deserialize)]
struct KeyState {
    end: i64,
    line: String,
    /// Window ends of the points kept, ascending.
    ends: Vec<i64>,
    /// Each point's measures text, back to back.
    tails: String,
    /// End of each point's text in `tails`.
    tail_ends: Vec<u32>,
}

impl KeyState {
    fn tail(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.tail_ends[i - 1] as usize };
        &self.tails[start..self.tail_ends[i] as usize]
    }

    fn bytes(&self) -> u64 {
        self.tails.len() as u64 + POINT_OVERHEAD * self.ends.len() as u64
    }

    /// Drops the points ending at or before `cut`; returns the bytes freed.
    fn drop_through(&mut self, cut: i64) -> u64 {
        let n = self.ends.partition_point(|&e| e <= cut);
        if n == 0 {
            return 0;
        }
        let before = self.bytes();
        let cut_bytes = self.tail_ends[n - 1];
        self.ends.drain(..n);
        self.tails.drain(..cut_bytes as usize);
        self.tail_ends.drain(..n);
        for e in &mut self.tail_ends {
            *e -= cut_bytes;
        }
        before - self.bytes()
    }
}

#[derive(Clone, Default, Serialize, Deserialize)]
struct MetricStore {
    keys: HashMap<String, KeyState>,
    /// Newest local day a row of this metric fell in.
    newest_day: Option<i64>,
}

/// The newest window end and the (dims, row) pairs ranked at it.
type Ranked<'a> = (Option<i64>, Vec<(&'a str, &'a str)>);

/// The latest rows and day curves of every metric.
pub struct Store {
    metrics: Vec<MetricStore>,
    tz_ms: i64,
    bytes: u64,
    max_bytes: u64,
    dropped: u64,
    /// Rows recorded since the last [`Store::take_journal`], as JSON
    /// lines (None: not kept, without a state directory).
    journal: Option<String>,
    /// The journal outgrew [`JOURNAL_MAX_BYTES`] and was dropped.
    journal_dropped: bool,
}

/// The whole store, as a checkpoint keeps it.
#[derive(Serialize, Deserialize)]
pub struct StoreSaved {
    metrics: Vec<MetricStore>,
    dropped: u64,
}

/// The local day (days since 1970-01-01 in the job's time zone) of a
/// window ending at `end_ms`.
pub fn day_of(end_ms: i64, tz_ms: i64) -> i64 {
    (end_ms - 1 + tz_ms).div_euclid(DAY_MS)
}

impl Store {
    pub fn new(metrics: usize, tz_ms: i64, max_bytes: u64) -> Store {
        Store {
            metrics: (0..metrics).map(|_| MetricStore::default()).collect(),
            tz_ms,
            bytes: 0,
            max_bytes,
            dropped: 0,
            journal: None,
            journal_dropped: false,
        }
    }

    /// Starts keeping the rows recorded from now on, for checkpoints.
    pub fn keep_journal(&mut self) {
        self.journal.get_or_insert_with(String::new);
    }

    /// The rows recorded since the last call (JSON lines); None if they
    /// were too many to keep (then only a base of the whole store will do).
    pub fn take_journal(&mut self) -> Option<String> {
        let rows = self.journal.as_mut().map(std::mem::take).unwrap_or_default();
        (!std::mem::take(&mut self.journal_dropped)).then_some(rows)
    }

    pub fn saved(&self) -> StoreSaved {
        StoreSaved { metrics: self.metrics.clone(), dropped: self.dropped }
    }

    /// Replaces the store with a saved one (of the same job: one entry per
    /// metric); false if it does not fit.
    pub fn restore(&mut self, saved: StoreSaved) -> bool {
        if saved.metrics.len() != self.metrics.len() {
            return false;
        }
        self.bytes = saved.metrics.iter().flat_map(|m| m.keys.values()).map(KeyState::bytes).sum();
        self.metrics = saved.metrics;
        self.dropped = saved.dropped;
        true
    }

    /// Keeps a row: the latest of its key if no later one came, and a point
    /// of its key's curve. `key_at` is where its dims text sits in `line`
    /// (which ends with a newline).
    pub fn record(&mut self, metric: usize, end: i64, line: &str, key_at: Range<usize>) {
        if let Some(j) = &mut self.journal {
            if j.len() + line.len() > JOURNAL_MAX_BYTES {
                *j = String::new();
                self.journal_dropped = true;
            } else if !self.journal_dropped {
                j.push_str(line);
            }
        }
        let tz = self.tz_ms;
        let Some(store) = self.metrics.get_mut(metric) else { return };
        let day = day_of(end, tz);
        if store.newest_day.is_none_or(|d| day > d) {
            store.newest_day = Some(day);
            // Free what is now two days behind: everything up to the end of
            // the day before yesterday.
            let cut = (day - 1) * DAY_MS - tz;
            let freed: u64 = store.keys.values_mut().map(|k| k.drop_through(cut)).sum();
            self.bytes -= freed;
        }
        let keep_point = store.newest_day.is_some_and(|d| day >= d - 1);
        let dims = &line[key_at.clone()];
        let k = match store.keys.get_mut(dims) {
            Some(k) => k,
            None => store.keys.entry(dims.to_string()).or_default(),
        };
        if k.line.is_empty() || k.end <= end {
            k.end = end;
            k.line.clear();
            k.line.push_str(line);
        }
        if !keep_point {
            return;
        }
        let tail = line[key_at.end..].trim_end_matches('\n');
        let at = k.ends.partition_point(|&e| e < end);
        let same = at < k.ends.len() && k.ends[at] == end;
        if same && k.tail(at) == tail {
            return; // a replay after a restart
        }
        let cost = tail.len() as u64 + if same { 0 } else { POINT_OVERHEAD };
        if self.bytes + cost > self.max_bytes {
            self.dropped += 1;
            return;
        }
        if at == k.ends.len() {
            k.ends.push(end);
            k.tails.push_str(tail);
            k.tail_ends.push(k.tails.len() as u32);
            self.bytes += cost;
            return;
        }
        // A correction (late data folded back) or a point older than the
        // last one kept (rows of a key come in window order, but a day's
        // first rows may follow another day's): rebuild the texts.
        let before = k.bytes();
        let mut tails = String::with_capacity(k.tails.len() + tail.len());
        let mut tail_ends = Vec::with_capacity(k.tail_ends.len() + 1);
        for i in 0..k.ends.len() {
            if i == at {
                tails.push_str(tail);
                tail_ends.push(tails.len() as u32);
                if same {
                    continue;
                }
            }
            tails.push_str(k.tail(i));
            tail_ends.push(tails.len() as u32);
        }
        if !same {
            k.ends.insert(at, end);
        }
        k.tails = tails;
        k.tail_ends = tail_ends;
        self.bytes = self.bytes + k.bytes() - before;
    }

    /// The latest row of a key.
    pub fn latest(&self, metric: usize, dims: &str) -> Option<&str> {
        self.metrics.get(metric)?.keys.get(dims).map(|k| k.line.as_str())
    }

    /// The newest local day with a row of `metric`.
    pub fn newest_day(&self, metric: usize) -> Option<i64> {
        self.metrics.get(metric)?.newest_day
    }

    /// A key's points of local day `day`, the last `limit` of them, as
    /// (window end, measures text); None for a key without a row.
    pub fn curve(&self, metric: usize, dims: &str, day: i64, limit: usize) -> Option<Vec<(i64, &str)>> {
        let k = self.metrics.get(metric)?.keys.get(dims)?;
        let tz = self.tz_ms;
        let (lo, hi) = (day * DAY_MS - tz, (day + 1) * DAY_MS - tz);
        let from = k.ends.partition_point(|&e| e <= lo);
        let to = k.ends.partition_point(|&e| e <= hi);
        let from = from.max(to.saturating_sub(limit));
        Some((from..to).map(|i| (k.ends[i], k.tail(i))).collect())
    }

    /// The `n` keys with the largest `by` among those whose latest row has
    /// the newest window end of the metric: (that end, their rows).
    pub fn top(&self, metric: usize, by: &str, n: usize) -> Result<(Option<i64>, Vec<&str>), String> {
        let (end, ranked) = self.ranked(metric, by, n)?;
        Ok((end, ranked.into_iter().map(|(_, line)| line).collect()))
    }

    /// [`Store::top`] with each row's dims text: (dims, row).
    fn ranked(&self, metric: usize, by: &str, n: usize) -> Result<Ranked<'_>, String> {
        let Some(store) = self.metrics.get(metric) else { return Ok((None, Vec::new())) };
        let Some(newest) = store.keys.values().map(|k| k.end).max() else { return Ok((None, Vec::new())) };
        let mut ranked: Vec<(f64, &str, &str)> = Vec::new();
        let mut seen_measure = false;
        for (dims, k) in &store.keys {
            if k.end != newest {
                continue;
            }
            match measure(&k.line, by) {
                Some(Some(v)) => {
                    seen_measure = true;
                    ranked.push((v, dims, k.line.trim_end_matches('\n')));
                }
                Some(None) => seen_measure = true, // null: ranks nowhere
                None => {}
            }
        }
        if !seen_measure {
            return Err(format!("the rows have no measure {by:?}"));
        }
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        Ok((Some(newest), ranked.into_iter().take(n).map(|r| (r.1, r.2)).collect()))
    }

    /// The key the dashboard draws for a metric: at the newest window end,
    /// the largest `uv` (else the first measure); (its dims text, that
    /// measure's name).
    pub fn leader(&self, metric: usize) -> Option<(String, String)> {
        let store = self.metrics.get(metric)?;
        let newest = store.keys.values().map(|k| k.end).max()?;
        let (dims, k) = store.keys.iter().find(|(_, k)| k.end == newest)?;
        let tail = k.line[k.line.find(dims.as_str())? + dims.len()..].trim_end_matches('\n');
        let names: Vec<&str> = tail.split(",\"").skip(1).filter_map(|f| f.split_once("\":").map(|(n, _)| n)).collect();
        let by = if names.contains(&"uv") { "uv" } else { *names.first()? };
        let (_, ranked) = self.ranked(metric, by, 1).ok()?;
        Some((ranked.first()?.0.to_string(), by.to_string()))
    }

    pub fn keys(&self, metric: usize) -> usize {
        self.metrics.get(metric).map_or(0, |m| m.keys.len())
    }

    /// Bytes the curves hold, and points dropped for want of room.
    pub fn curve_usage(&self) -> (u64, u64) {
        (self.bytes, self.dropped)
    }
}

/// The value of measure `by` in a row's text: None if the row has no such
/// field, Some(None) if it is null.
pub fn measure(line: &str, by: &str) -> Option<Option<f64>> {
    let pat = format!(",\"{by}\":");
    let at = line.rfind(&pat)? + pat.len();
    let rest = &line[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    let text = rest[..end].trim();
    if text == "null" {
        return Some(None);
    }
    text.parse::<f64>().ok().map(Some)
}

/// Local day number of a `YYYY-MM-DD` date.
pub fn parse_day(text: &str) -> Option<i64> {
    let mut it = text.split('-');
    let (y, m, d) = (it.next()?.parse::<i64>().ok()?, it.next()?.parse::<i64>().ok()?, it.next()?.parse::<i64>().ok()?);
    if it.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) || text.len() != 10 {
        return None;
    }
    let days = crate::state::history::days_from_civil(y, m, d);
    (format_day(days) == text).then_some(days)
}

/// `YYYY-MM-DD` of a local day number.
pub fn format_day(days: i64) -> String {
    let (y, m, d) = crate::verify::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TZ: i64 = 8 * 3_600_000;
    /// 2026-02-16T00:00+08:00.
    const MIDNIGHT: i64 = 1_771_171_200_000;

    fn row(store: &mut Store, end: i64, page: &str, pv: u64) {
        let dims = format!("{{\"page\":\"{page}\"}}");
        let head = format!("{{\"metric\":\"m\",\"window_end\":{end},\"dims\":");
        let line = format!("{head}{dims},\"pv\":{pv},\"uv\":1}}\n");
        store.record(0, end, &line, head.len()..head.len() + dims.len());
    }

    #[test]
    fn the_journal_keeps_rows_until_it_outgrows_its_bound_then_asks_for_a_base() {
        let mut s = Store::new(1, TZ, 1 << 20);
        row(&mut s, MIDNIGHT + 60_000, "before", 1);
        assert_eq!(s.take_journal(), Some(String::new()), "not kept before keep_journal");
        s.keep_journal();
        row(&mut s, MIDNIGHT + 60_000, "a", 1);
        row(&mut s, MIDNIGHT + 120_000, "a", 2);
        let rows = s.take_journal().unwrap();
        assert_eq!(rows.lines().count(), 2, "{rows}");
        let mut copy = Store::new(1, TZ, 1 << 20);
        assert!(copy.restore(s.saved()));
        assert_eq!(copy.latest(0, r#"{"page":"a"}"#), s.latest(0, r#"{"page":"a"}"#));
        assert_eq!(copy.curve_usage(), s.curve_usage());
        for i in 0..100 {
            row(&mut s, MIDNIGHT + 180_000, &format!("p{i}"), i); // ~6 KB of rows
        }
        assert_eq!(s.take_journal(), None, "over its bound: a base is needed");
        row(&mut s, MIDNIGHT + 240_000, "a", 3);
        assert_eq!(s.take_journal().map(|j| j.lines().count()), Some(1), "kept again after");
        assert!(!Store::new(2, TZ, 1).restore(s.saved()), "another job's store");
    }

    #[test]
    fn curves_keep_today_and_the_day_before_and_the_latest_row_wins() {
        let mut s = Store::new(1, TZ, 1 << 20);
        let day = day_of(MIDNIGHT + 60_000, TZ);
        assert_eq!(format_day(day), "2026-02-16");
        assert_eq!(parse_day("2026-02-16"), Some(day));
        assert_eq!(parse_day("2026-02-30"), None);
        for (i, pv) in [(1, 5), (2, 7), (3, 9)] {
            row(&mut s, MIDNIGHT - DAY_MS + i * 60_000, "a", pv); // the day before
            row(&mut s, MIDNIGHT + i * 60_000, "a", pv * 10);
        }
        row(&mut s, MIDNIGHT + 60_000, "b", 1);
        let dims = r#"{"page":"a"}"#;
        let today = s.curve(0, dims, day, 100).unwrap();
        assert_eq!(
            today,
            vec![
                (MIDNIGHT + 60_000, r#","pv":50,"uv":1}"#),
                (MIDNIGHT + 120_000, r#","pv":70,"uv":1}"#),
                (MIDNIGHT + 180_000, r#","pv":90,"uv":1}"#)
            ]
        );
        assert_eq!(s.curve(0, dims, day - 1, 2).unwrap().len(), 2, "the last 2 of 3");
        assert!(s.latest(0, dims).unwrap().contains("\"pv\":90"));
        // The same point again with another value replaces it.
        row(&mut s, MIDNIGHT + 120_000, "a", 71);
        assert_eq!(s.curve(0, dims, day, 100).unwrap()[1].1, r#","pv":71,"uv":1}"#);
        assert!(s.latest(0, dims).unwrap().contains("\"pv\":90"), "an older row is not the latest");
        // A new day frees the day before yesterday.
        let (bytes, _) = s.curve_usage();
        row(&mut s, MIDNIGHT + DAY_MS + 60_000, "a", 1);
        assert!(s.curve(0, dims, day - 1, 100).unwrap().is_empty());
        assert_eq!(s.curve(0, dims, day, 100).unwrap().len(), 3);
        assert!(s.curve_usage().0 < bytes + 30);
        let top = s.top(0, "pv", 10).unwrap();
        assert_eq!(top.0, Some(MIDNIGHT + DAY_MS + 60_000));
        assert_eq!(top.1.len(), 1, "only keys at the newest end");
        assert!(s.top(0, "nope", 10).is_err());
    }

    #[test]
    fn points_beyond_the_budget_are_dropped_and_counted() {
        let mut s = Store::new(1, TZ, 100);
        for i in 1..=10 {
            row(&mut s, MIDNIGHT + i * 60_000, "a", i as u64);
        }
        let (bytes, dropped) = s.curve_usage();
        assert!(bytes <= 100 && dropped > 0, "{bytes} {dropped}");
        assert!(s.latest(0, r#"{"page":"a"}"#).unwrap().contains("\"pv\":10"), "the latest row still moves on");
    }

    #[test]
    fn top_ranks_by_the_measure_then_dims() {
        let mut s = Store::new(1, TZ, 1 << 20);
        for (page, pv) in [("a", 3), ("b", 9), ("c", 3), ("d", 5)] {
            row(&mut s, MIDNIGHT + 60_000, page, pv);
        }
        let (_, rows) = s.top(0, "pv", 3).unwrap();
        let pages: Vec<&str> = rows.iter().map(|r| &r[r.find("page").unwrap() + 7..][..1]).collect();
        assert_eq!(pages, ["b", "d", "a"]);
        assert_eq!(measure(r#"{"x":1,"sum_amount":null}"#, "sum_amount"), Some(None));
    }
}

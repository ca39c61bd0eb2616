//! The minute dedup of a DAU metric's sources: per (source, device, group
//! key), the latest step seen plus a bitmap of the `tolerance` steps before
//! it, so the same device counts once per step and source even when events
//! arrive out of order — state stays one small entry per (device, key),
//! not one per (device, key, step).
//!
//! An event is passed on the first time its step is seen, dropped when its
//! step was seen already, and *late* when its step is older than the ring
//! (more than `tolerance` steps before the latest): it is dropped and
//! counted as late for its source, never silently lost.

use std::io;

use bytemuck::{Pod, Zeroable};

use super::dedup::mix;
use super::table::{home, Slot, Table};

/// Most steps a ring remembers before its latest one.
pub const TOLERANCE_MAX: u32 = 32;
/// Bits of [`RingEntry::key`] that hold the group key id; the source index
/// is above them.
pub const RING_KEY_BITS: u32 = 26;
/// Sources a ring can tell apart.
pub const RING_SOURCES_MAX: usize = 1 << (32 - RING_KEY_BITS);

/// One (source, device, key) ring: 20 bytes.
#[repr(C, packed(4))]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
pub struct RingEntry {
    pub device_fp: u64,
    /// `source << RING_KEY_BITS | key id`.
    pub key: u32,
    /// Latest step seen (0: empty entry).
    pub latest: u32,
    /// Bit i: step `latest - 1 - i` was seen.
    pub seen: u32,
}

const _: () = assert!(std::mem::size_of::<RingEntry>() == 20);

impl Slot for RingEntry {
    #[inline]
    fn is_empty(&self) -> bool {
        self.latest == 0
    }

    #[inline]
    fn hash(&self) -> u64 {
        mix(self.device_fp, self.key)
    }

    #[inline]
    fn same_key(&self, other: &RingEntry) -> bool {
        self.device_fp == other.device_fp && self.key == other.key
    }
}

/// What the ring says of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// First event of its step: pass it on.
    Pass,
    /// Its step was seen: drop it.
    Again,
    /// Older than the ring: drop it and count it late.
    Late,
}

/// The rings of one day of one metric, every source's in one table.
pub type RingTable = Table<RingEntry>;

/// The ring key of group key `key` from source `source`.
#[inline]
pub fn ring_key(source: usize, key: u32) -> u32 {
    debug_assert!(source < RING_SOURCES_MAX && key < 1 << RING_KEY_BITS);
    (source as u32) << RING_KEY_BITS | key
}

impl RingTable {
    #[inline]
    pub fn prefetch(&self, device_fp: u64, key: u32) {
        self.prefetch_home(mix(device_fp, key));
    }

    /// Records an event of (device, ring key) in `step`; `tolerance` steps
    /// before the latest are remembered (at most [`TOLERANCE_MAX`]).
    #[inline]
    pub fn observe(&mut self, device_fp: u64, key: u32, step: u32, tolerance: u32) -> io::Result<Ring> {
        debug_assert!(step != 0 && tolerance <= TOLERANCE_MAX);
        self.reserve_one()?;
        let capacity = self.capacity();
        let mut i = home(mix(device_fp, key), capacity);
        let mask = if tolerance == 32 { u32::MAX } else { (1u32 << tolerance) - 1 };
        loop {
            let e = self.entries()[i];
            if e.latest == 0 {
                self.entries_mut()[i] = RingEntry { device_fp, key, latest: step, seen: 0 };
                self.len += 1;
                self.mark(i);
                return Ok(Ring::Pass);
            }
            if e.device_fp == device_fp && e.key == key {
                let (latest, seen) = (e.latest, e.seen);
                let out = if step > latest {
                    let by = step - latest;
                    // The old latest becomes bit by-1; older bits move up by `by`.
                    let moved = if by >= 32 { 0 } else { seen << by };
                    let old = if by > 32 { 0 } else { 1u32 << (by - 1) };
                    (RingEntry { latest: step, seen: (moved | old) & mask, ..e }, Ring::Pass)
                } else if step == latest {
                    return Ok(Ring::Again);
                } else if latest - step > tolerance {
                    return Ok(Ring::Late);
                } else {
                    let bit = 1u32 << (latest - 1 - step);
                    if seen & bit != 0 {
                        return Ok(Ring::Again);
                    }
                    (RingEntry { seen: seen | bit, ..e }, Ring::Pass)
                };
                self.entries_mut()[i] = out.0;
                self.mark(i);
                return Ok(out.1);
            }
            i += 1;
            if i == capacity {
                i = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    /// The ring's contract, spelled out on a set of every step seen.
    fn model(seen: &mut HashMap<(u64, u32), BTreeSet<u32>>, fp: u64, key: u32, step: u32, tolerance: u32) -> Ring {
        let steps = seen.entry((fp, key)).or_default();
        let latest = steps.last().copied().unwrap_or(0);
        if latest != 0 && step < latest && latest - step > tolerance {
            return Ring::Late;
        }
        if steps.insert(step) {
            Ring::Pass
        } else {
            Ring::Again
        }
    }

    proptest! {
        #[test]
        fn matches_a_set_of_steps_within_the_tolerance(
            tolerance in 0u32..=32,
            ops in proptest::collection::vec((0u64..40, 0u32..3, 1u32..120), 1..3000),
        ) {
            let mut t = RingTable::anonymous().unwrap();
            let mut seen = HashMap::new();
            for (d, k, s) in ops {
                let fp = d.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let want = model(&mut seen, fp, k, s, tolerance);
                prop_assert_eq!(t.observe(fp, k, s, tolerance).unwrap(), want, "fp {} key {} step {}", fp, k, s);
            }
        }
    }

    #[test]
    fn sixteen_steps_of_disorder_are_deduplicated_and_older_is_late() {
        let mut t = RingTable::anonymous().unwrap();
        let k = ring_key(2, 7);
        assert_eq!(t.observe(1, k, 100, 16).unwrap(), Ring::Pass);
        assert_eq!(t.observe(1, k, 100, 16).unwrap(), Ring::Again);
        assert_eq!(t.observe(1, k, 84, 16).unwrap(), Ring::Pass);
        assert_eq!(t.observe(1, k, 84, 16).unwrap(), Ring::Again);
        assert_eq!(t.observe(1, k, 83, 16).unwrap(), Ring::Late);
        assert_eq!(t.observe(1, ring_key(3, 7), 83, 16).unwrap(), Ring::Pass, "another source has its own ring");
        assert_eq!(t.observe(1, k, 200, 16).unwrap(), Ring::Pass);
        assert_eq!(t.observe(1, k, 100, 16).unwrap(), Ring::Late);
    }
}

//! The per-shard dedup table: which (device, group key) pairs were seen in
//! a period, and in which slice first.
//!
//! Hot path: one probe per event into a [`Table`] of 16-byte entries (20
//! to 30 bytes of state per entry at its loads). Callers may
//! [`DedupTable::prefetch`] a few events ahead so the cache misses of a
//! batch overlap.

use std::io;

use bytemuck::{Pod, Zeroable};

pub use super::table::Written;
use super::table::{home, Slot, Table};

/// One (device, key) pair. `first_slice == 0` marks an empty entry: slice
/// indexes count steps since 1970, and events before 2000 are rejected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Entry {
    pub device_fp: u64,
    pub key: u32,
    pub first_slice: u32,
}

pub const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();
const _: () = assert!(ENTRY_BYTES == 16);

/// What an observation changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// First time in this period: count a new distinct device in `slice`.
    New,
    /// Seen before, first in a later slice: move it from `was` to `slice`.
    Earlier { was: u32 },
    /// Already counted in this slice or an earlier one.
    Again,
}

/// Bytes of one delta record of a dedup table.
pub const DELTA_RECORD_BYTES: usize = DedupTable::DELTA_RECORD_BYTES;

impl Slot for Entry {
    #[inline]
    fn is_empty(&self) -> bool {
        self.first_slice == 0
    }

    #[inline]
    fn hash(&self) -> u64 {
        mix(self.device_fp, self.key)
    }

    #[inline]
    fn same_key(&self, other: &Entry) -> bool {
        self.device_fp == other.device_fp && self.key == other.key
    }
}

/// The set of (device, key) pairs of one period, with first-seen slices.
pub type DedupTable = Table<Entry>;

#[inline]
pub(crate) fn mix(device_fp: u64, key: u32) -> u64 {
    let h = device_fp ^ (key as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let h = (h ^ (h >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^ (h >> 32)
}

impl DedupTable {
    /// Hints the CPU to load the home slot of (device, key).
    #[inline]
    pub fn prefetch(&self, device_fp: u64, key: u32) {
        self.prefetch_home(mix(device_fp, key));
    }

    /// Records that `device_fp` had an event with `key` in `slice`.
    #[inline]
    pub fn observe(&mut self, device_fp: u64, key: u32, slice: u32) -> io::Result<Seen> {
        debug_assert!(slice != 0, "slice 0 is the empty marker");
        self.reserve_one()?;
        let capacity = self.capacity();
        let mut i = home(mix(device_fp, key), capacity);
        let entries = self.entries_mut();
        loop {
            let e = &mut entries[i];
            if e.first_slice == 0 {
                *e = Entry { device_fp, key, first_slice: slice };
                self.len += 1;
                self.mark(i);
                return Ok(Seen::New);
            }
            if e.device_fp == device_fp && e.key == key {
                if slice < e.first_slice {
                    let was = e.first_slice;
                    e.first_slice = slice;
                    self.mark(i);
                    return Ok(Seen::Earlier { was });
                }
                return Ok(Seen::Again);
            }
            i += 1;
            if i == capacity {
                i = 0;
            }
        }
    }

    /// Looks an entry up without changing anything.
    pub fn get(&self, device_fp: u64, key: u32) -> Option<Entry> {
        let entries = self.entries();
        let mut i = home(mix(device_fp, key), self.capacity());
        loop {
            let e = entries[i];
            if e.first_slice == 0 {
                return None;
            }
            if e.device_fp == device_fp && e.key == key {
                return Some(e);
            }
            i = (i + 1) % self.capacity();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        #[test]
        fn matches_a_hashmap_of_first_slices(ops in proptest::collection::vec((0u64..300, 0u32..4, 1u32..50), 1..3000)) {
            let mut t = DedupTable::anonymous().unwrap();
            let mut model: HashMap<(u64, u32), u32> = HashMap::new();
            for (d, k, s) in ops {
                let fp = d.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let want = match model.get(&(fp, k)).copied() {
                    None => { model.insert((fp, k), s); Seen::New }
                    Some(w) if s < w => { model.insert((fp, k), s); Seen::Earlier { was: w } }
                    Some(_) => Seen::Again,
                };
                prop_assert_eq!(t.observe(fp, k, s).unwrap(), want);
            }
            prop_assert_eq!(t.len(), model.len());
            for ((fp, k), s) in model {
                prop_assert_eq!(t.get(fp, k).map(|e| e.first_slice), Some(s));
            }
        }
    }

    proptest! {
        #[test]
        fn base_and_deltas_restore_the_same_table(
            rounds in proptest::collection::vec(proptest::collection::vec((0u64..2000, 0u32..3, 1u32..40), 0..1500), 1..5)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut t = DedupTable::anonymous().unwrap();
            t.track_changes();
            let mut base = None;
            let mut base_capacity = 0;
            let mut deltas = Vec::new();
            for (r, ops) in rounds.iter().enumerate() {
                for &(d, k, s) in ops {
                    t.observe(d.wrapping_mul(0x9E37_79B9_7F4A_7C15), k, s).unwrap();
                }
                // A base first (and every third round), else a delta: the
                // table grows between them, and deltas still apply.
                if t.changes().is_none() || r % 3 == 2 {
                    let p = dir.path().join(format!("b{r}"));
                    base = Some((p.clone(), t.write_base(&p).unwrap()));
                    base_capacity = t.capacity();
                    deltas.clear();
                } else {
                    let p = dir.path().join(format!("d{r}"));
                    deltas.push((p.clone(), t.write_delta(&p).unwrap()));
                }
                let (bp, bw) = base.clone().unwrap();
                let back = DedupTable::restore(None, "t".into(), base_capacity, t.len(), (&bp, bw), &deltas).unwrap();
                prop_assert_eq!(back.len(), t.len());
                for e in t.entries().iter().filter(|e| e.first_slice != 0) {
                    prop_assert_eq!(back.get(e.device_fp, e.key), Some(*e));
                }
            }
        }
    }

    #[test]
    fn a_damaged_delta_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = DedupTable::anonymous().unwrap();
        t.track_changes();
        t.observe(1, 0, 5).unwrap();
        let b = dir.path().join("b");
        let bw = t.write_base(&b).unwrap();
        t.observe(2, 0, 5).unwrap();
        let d = dir.path().join("d");
        let dw = t.write_delta(&d).unwrap();
        assert_eq!(dw.bytes, DELTA_RECORD_BYTES as u64);
        let mut bytes = std::fs::read(&d).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&d, bytes).unwrap();
        let e = DedupTable::restore(None, "t".into(), t.capacity(), 2, (&b, bw), &[(d, dw)]).err().unwrap();
        assert_eq!(dw.bytes, ENTRY_BYTES as u64, "a delta record is the entry");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn a_base_holds_the_entries_only_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = DedupTable::anonymous().unwrap();
        t.track_changes();
        for d in 1..=3u64 {
            t.observe(d.wrapping_mul(0x9E37_79B9_7F4A_7C15), 0, 5).unwrap();
        }
        let b = dir.path().join("b");
        let bw = t.write_base(&b).unwrap();
        assert_eq!(bw.bytes, 3 * ENTRY_BYTES as u64, "a base is the entries, not the {} slots", t.capacity());
        let back = DedupTable::restore(None, "t".into(), t.capacity(), 3, (&b, bw), &[]).unwrap();
        assert_eq!(back.len(), 3);
        let bytes = std::fs::read(&b).unwrap();
        let refused = |bytes: &[u8], w: Written| {
            std::fs::write(&b, bytes).unwrap();
            DedupTable::restore(None, "t".into(), t.capacity(), 3, (&b, w), &[]).err().unwrap().to_string()
        };
        let e = refused(&bytes[..bytes.len() - 1], bw);
        assert!(e.contains("bytes, the checkpoint says"), "{e}");
        let cut = &bytes[..bytes.len() - 1];
        let e = refused(cut, Written { bytes: cut.len() as u64, xxh3: xxhash_rust::xxh3::xxh3_64(cut) });
        assert!(e.contains("whole number"), "{e}");
        let mut zeroed = bytes.clone();
        zeroed[ENTRY_BYTES..2 * ENTRY_BYTES].fill(0);
        let e = refused(&zeroed, Written { bytes: bw.bytes, xxh3: xxhash_rust::xxh3::xxh3_64(&zeroed) });
        assert!(e.contains("an empty entry"), "{e}");
        let e = refused(&bytes, Written { bytes: bw.bytes, xxh3: bw.xxh3 ^ 1 });
        assert!(e.contains("checksum"), "{e}");
    }

    /// Device fingerprints whose entry (key 0) has home slot `slot` in a
    /// table of `capacity` slots.
    fn homed_at(slot: usize, capacity: usize, count: usize) -> Vec<u64> {
        (1u64..).filter(|&d| home(mix(d, 0), capacity) == slot).take(count).collect()
    }

    #[test]
    fn a_base_restores_every_entry_to_its_slot_across_the_table_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = DedupTable::anonymous().unwrap();
        let c = t.capacity();
        // A run that wraps: four entries homed at the last slot fill it and
        // the first three; one homed at slot 0 lands after them; and two
        // runs in the middle of the table.
        let mut fps = homed_at(c - 1, c, 4);
        fps.extend(homed_at(0, c, 1));
        fps.extend(homed_at(7, c, 3));
        fps.extend(homed_at(c / 2, c, 2));
        for &d in &fps {
            assert_eq!(t.observe(d, 0, 9).unwrap(), Seen::New);
        }
        let slot_of = |t: &DedupTable, d: u64| t.entries().iter().position(|e| e.device_fp == d && e.first_slice != 0);
        assert_eq!(slot_of(&t, fps[3]), Some(2), "the run wraps past the table's end");
        let b = dir.path().join("b");
        let bw = t.write_base(&b).unwrap();
        let back = DedupTable::restore(None, "t".into(), c, fps.len(), (&b, bw), &[]).unwrap();
        assert_eq!(back.entries(), t.entries(), "every entry at its own slot");
        for &d in &fps {
            assert_eq!(back.get(d, 0).map(|e| e.first_slice), Some(9));
        }
    }

    #[test]
    fn a_base_in_another_order_still_restores() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = DedupTable::anonymous().unwrap();
        let fps: Vec<u64> = (1..200u64).map(|d| d.wrapping_mul(0x2545_F491_4F6C_DD1D)).collect();
        for &d in &fps {
            t.observe(d, 0, 9).unwrap();
        }
        let b = dir.path().join("b");
        t.write_base(&b).unwrap();
        // Two entries of the base swapped: placed in file order, the one
        // now second would land past the other, away from its home.
        let mut entries: Vec<Entry> =
            std::fs::read(&b).unwrap().chunks_exact(ENTRY_BYTES).map(bytemuck::pod_read_unaligned).collect();
        let home_of = |e: &Entry| home(e.hash(), t.capacity());
        assert!(home_of(&entries[1]) + 1 < home_of(&entries[2]), "two runs apart");
        entries.swap(1, 2);
        let bytes: &[u8] = bytemuck::cast_slice(&entries);
        std::fs::write(&b, bytes).unwrap();
        let w = Written { bytes: bytes.len() as u64, xxh3: xxhash_rust::xxh3::xxh3_64(bytes) };
        let back = DedupTable::restore(None, "t".into(), t.capacity(), t.len(), (&b, w), &[]).unwrap();
        assert_eq!(back.len(), t.len());
        for &d in &fps {
            assert_eq!(back.get(d, 0).map(|e| e.first_slice), Some(9), "device {d:#x}");
        }
    }

    #[test]
    fn grows_in_a_file_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = DedupTable::in_dir(dir.path().to_owned(), "m0-p1".into(), 0).unwrap();
        for d in 0..20_000u64 {
            assert_eq!(t.observe(d.wrapping_mul(0x2545_F491_4F6C_DD1D), 1, 5).unwrap(), Seen::New);
        }
        assert!(t.bytes() as f64 / t.len() as f64 <= 32.0);
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1, "old generations are removed");
        drop(t);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

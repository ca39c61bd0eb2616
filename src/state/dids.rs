//! Device id texts of a DAU metric, per shard: the history and the dedup
//! tables know a device only by its fingerprint, and `tally devices
//! export` (and nothing on the hot path) must write the id itself back.
//!
//! An append-only arena of `[length u16 LE][id bytes]` records, and an
//! index: a [`Table`] of 16-byte slots from fingerprint to the record's
//! place in the arena. A device costs its id's length + 2 bytes of arena
//! and one slot (≈ 22 bytes at the table's load). Checkpoints write the
//! index like any table and the arena's new bytes as a file of their own
//! ([`DidTable::take_tail`]); a restart concatenates the files.

use std::io;
use std::path::PathBuf;

use bytemuck::{Pod, Zeroable};

use super::table::{home, Slot, Table};

/// One device: where its id's record starts in the arena, plus one (0: an
/// empty slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct DidSlot {
    pub device_fp: u64,
    pub at: u64,
}

const _: () = assert!(std::mem::size_of::<DidSlot>() == 16);

#[inline]
fn mix(device_fp: u64) -> u64 {
    let h = (device_fp ^ (device_fp >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^ (h >> 32)
}

impl Slot for DidSlot {
    #[inline]
    fn is_empty(&self) -> bool {
        self.at == 0
    }

    #[inline]
    fn hash(&self) -> u64 {
        mix(self.device_fp)
    }

    #[inline]
    fn same_key(&self, other: &DidSlot) -> bool {
        self.device_fp == other.device_fp
    }
}

/// The id texts of one shard's devices.
pub struct DidTable {
    pub index: Table<DidSlot>,
    arena: Vec<u8>,
    /// Arena bytes already handed to a checkpoint.
    saved: usize,
}

impl DidTable {
    pub fn anonymous() -> io::Result<DidTable> {
        Ok(DidTable { index: Table::anonymous()?, arena: Vec::new(), saved: 0 })
    }

    /// An empty table for `expected` devices (its index file-backed in
    /// `dir` when given, like the other tables).
    pub fn create(dir: Option<PathBuf>, name: String, expected: usize) -> io::Result<DidTable> {
        Ok(DidTable { index: Table::create(dir, name, expected)?, arena: Vec::new(), saved: 0 })
    }

    /// A table put back from a checkpoint: its index and whole arena.
    pub fn restored(index: Table<DidSlot>, arena: Vec<u8>) -> DidTable {
        let saved = arena.len();
        DidTable { index, arena, saved }
    }

    pub fn track_changes(&mut self) {
        self.index.track_changes();
    }

    /// Devices with an id.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes held: index and arena.
    pub fn bytes(&self) -> usize {
        self.index.bytes() + self.arena.len()
    }

    /// The slot of a device, or of the empty slot where it would go.
    #[inline]
    fn find(&self, device_fp: u64) -> usize {
        let capacity = self.index.capacity();
        let slots = self.index.entries();
        let mut i = home(mix(device_fp), capacity);
        loop {
            let e = &slots[i];
            if e.is_empty() || e.device_fp == device_fp {
                return i;
            }
            i = if i + 1 == capacity { 0 } else { i + 1 };
        }
    }

    /// Records a device's id text (cut at 64 KiB) unless it has one.
    #[inline]
    pub fn insert(&mut self, device_fp: u64, text: &[u8]) -> io::Result<()> {
        if !self.index.entries()[self.find(device_fp)].is_empty() {
            return Ok(()); // known (ids of one fingerprint are one id)
        }
        self.index.reserve_one()?;
        let i = self.find(device_fp);
        let text = &text[..text.len().min(u16::MAX as usize)];
        let at = self.arena.len() as u64 + 1;
        self.arena.extend_from_slice(&(text.len() as u16).to_le_bytes());
        self.arena.extend_from_slice(text);
        self.index.entries_mut()[i] = DidSlot { device_fp, at };
        self.index.len += 1;
        self.index.mark(i);
        Ok(())
    }

    /// Appends a device's id text to `out`; false if it has none (or the
    /// arena does not hold its record: a damaged checkpoint).
    pub fn get(&self, device_fp: u64, out: &mut Vec<u8>) -> bool {
        let e = self.index.entries()[self.find(device_fp)];
        if e.is_empty() {
            return false;
        }
        let at = e.at as usize - 1;
        let Some(head) = self.arena.get(at..at + 2) else {
            return false;
        };
        let n = u16::from_le_bytes([head[0], head[1]]) as usize;
        match self.arena.get(at + 2..at + 2 + n) {
            Some(text) => {
                out.extend_from_slice(text);
                true
            }
            None => false,
        }
    }

    /// Every device with an id (for moving ids between shards).
    pub fn devices(&self) -> impl Iterator<Item = u64> + '_ {
        self.index.entries().iter().filter(|e| !e.is_empty()).map(|e| e.device_fp)
    }

    /// The arena bytes added since the last call (or the whole arena when
    /// `all`), for a checkpoint.
    pub fn take_tail(&mut self, all: bool) -> Vec<u8> {
        let from = if all { 0 } else { self.saved };
        self.saved = self.arena.len();
        self.arena[from..].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_every_length_read_back() {
        let mut t = DidTable::anonymous().unwrap();
        let ids: Vec<Vec<u8>> = (0..300usize).map(|n| (0..n).map(|i| b'a' + (i % 26) as u8).collect()).collect();
        for (fp, id) in ids.iter().enumerate() {
            t.insert(fp as u64, id).unwrap();
            t.insert(fp as u64, b"ignored: the device has an id").unwrap();
        }
        for (fp, id) in ids.iter().enumerate() {
            let mut out = Vec::new();
            assert!(t.get(fp as u64, &mut out), "id {fp}");
            assert_eq!(&out, id, "id {fp}");
        }
        assert!(!t.get(10_000, &mut Vec::new()));
        assert_eq!((t.devices().count(), t.len()), (ids.len(), ids.len()));
        // A checkpoint's tails add up to the arena; a table restored from
        // them reads the same ids.
        let first = t.take_tail(false);
        t.insert(5_000, b"late").unwrap();
        let second = t.take_tail(false);
        assert_eq!(second, b"\x04\x00late");
        let arena = [first, second].concat();
        assert_eq!(arena, t.arena, "the tails are the whole arena");
        let mut index = Table::anonymous().unwrap();
        for e in t.index.entries().iter().filter(|e| !e.is_empty()) {
            index.upsert(*e).unwrap();
        }
        let mut back = DidTable::restored(index, arena);
        let mut out = Vec::new();
        assert!(back.get(5_000, &mut out) && out == b"late");
        assert!(back.take_tail(false).is_empty(), "a restored arena is all in the checkpoint");
    }
}

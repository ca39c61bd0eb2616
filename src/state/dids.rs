//! Device id texts of a DAU metric, per shard: the history and the dedup
//! tables know a device only by its fingerprint, and `tally devices
//! export` must write the id itself back.
//!
//! A [`Table`] of 48-byte entries keyed by (fingerprint, piece): an id
//! fits one entry up to [`PIECE_BYTES`] bytes (a UUID does) and takes one
//! more per [`PIECE_BYTES`] beyond. Inserting an id already there costs one
//! probe; ids arrive with every DAU record, but the shard inserts one only
//! when a (device, key) pair is first seen on a day.

use std::io;

use bytemuck::{Pod, Zeroable};

use super::table::{home, Slot, Table};

/// Id bytes one entry holds.
pub const PIECE_BYTES: usize = 37;

/// One piece of a device id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct DidEntry {
    pub device_fp: u64,
    /// Which piece of the id: bytes `piece * PIECE_BYTES ..`.
    pub piece: u16,
    /// Bytes of the piece + 1 (0: an empty slot); a piece shorter than
    /// [`PIECE_BYTES`] is the id's last.
    pub used: u8,
    pub text: [u8; PIECE_BYTES],
}

const _: () = assert!(std::mem::size_of::<DidEntry>() == 48);

#[inline]
fn mix(device_fp: u64, piece: u16) -> u64 {
    let h = (device_fp ^ (piece as u64).rotate_left(47) ^ (device_fp >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^ (h >> 32)
}

impl Slot for DidEntry {
    #[inline]
    fn is_empty(&self) -> bool {
        self.used == 0
    }

    #[inline]
    fn hash(&self) -> u64 {
        mix(self.device_fp, self.piece)
    }

    #[inline]
    fn same_key(&self, other: &DidEntry) -> bool {
        self.device_fp == other.device_fp && self.piece == other.piece
    }
}

/// The id texts of one shard's devices.
pub type DidTable = Table<DidEntry>;

impl DidTable {
    /// The slot of a piece, or of the empty slot where it would go.
    #[inline]
    fn find(&self, device_fp: u64, piece: u16) -> usize {
        let capacity = self.capacity();
        let entries = self.entries();
        let mut i = home(mix(device_fp, piece), capacity);
        loop {
            let e = &entries[i];
            if e.is_empty() || (e.device_fp == device_fp && e.piece == piece) {
                return i;
            }
            i = if i + 1 == capacity { 0 } else { i + 1 };
        }
    }

    /// Records a device's id text unless it is there already.
    #[inline]
    pub fn insert(&mut self, device_fp: u64, text: &[u8]) -> io::Result<()> {
        if !self.entries()[self.find(device_fp, 0)].is_empty() {
            return Ok(()); // known (ids of one fingerprint are one id)
        }
        // Full pieces, then a shorter last one (empty when the id fills
        // its pieces exactly).
        for p in 0..=text.len() / PIECE_BYTES {
            let chunk = &text[p * PIECE_BYTES..((p + 1) * PIECE_BYTES).min(text.len())];
            self.reserve_one()?;
            let i = self.find(device_fp, p as u16);
            let mut e = DidEntry { device_fp, piece: p as u16, used: chunk.len() as u8 + 1, text: [0; PIECE_BYTES] };
            e.text[..chunk.len()].copy_from_slice(chunk);
            self.entries_mut()[i] = e;
            self.len += 1;
            self.mark(i);
        }
        Ok(())
    }

    /// Appends a device's id text to `out`; false if it has none.
    pub fn get(&self, device_fp: u64, out: &mut Vec<u8>) -> bool {
        for piece in 0..=u16::MAX {
            let e = &self.entries()[self.find(device_fp, piece)];
            if e.is_empty() {
                return piece > 0;
            }
            let n = e.used as usize - 1;
            out.extend_from_slice(&e.text[..n]);
            if n < PIECE_BYTES {
                return true;
            }
        }
        true
    }

    /// Hints the CPU to load the slot of a device's first piece.
    #[inline]
    pub fn prefetch(&self, device_fp: u64) {
        self.prefetch_home(mix(device_fp, 0));
    }

    /// Every device with its id (for moving ids between shards).
    pub fn devices(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries().iter().filter(|e| !e.is_empty() && e.piece == 0).map(|e| e.device_fp)
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
            t.insert(fp as u64, id).unwrap();
        }
        for (fp, id) in ids.iter().enumerate() {
            let mut out = Vec::new();
            assert!(t.get(fp as u64, &mut out), "id {fp}");
            assert_eq!(&out, id, "id {fp}");
        }
        assert!(!t.get(10_000, &mut Vec::new()));
        assert_eq!(t.devices().count(), ids.len());
        let pieces: usize = ids.iter().map(|id| id.len() / PIECE_BYTES + 1).sum();
        assert_eq!(t.len(), pieces);
    }
}

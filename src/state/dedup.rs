//! The per-shard dedup table: which (device, group key) pairs were seen in
//! a period, and in which slice first.
//!
//! Hot path: one probe per event. Open addressing with linear probing over
//! fixed 16-byte `Pod` entries in a memory map (a file under the state
//! directory, or anonymous memory). The home slot comes from a fast range
//! reduction of a mixed hash, so capacity need not be a power of two and
//! the table can grow by 1.5× (at 80% load), keeping state between 20 and
//! 30 bytes per entry. Callers may [`DedupTable::prefetch`] a few events
//! ahead so the cache misses of a batch overlap.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytemuck::{Pod, Zeroable};
use memmap2::MmapMut;

/// Smallest table; a fresh period starts here.
pub const CAPACITY_MIN_ENTRIES: usize = 1 << 12;
/// A table sized for an expected count starts at this load (per mille), so
/// the estimate can be exceeded by a third before the first growth.
pub const LOAD_EXPECTED_PER_MILLE: usize = 600;
/// Grow when entries exceed this share of capacity (per mille).
pub const LOAD_MAX_PER_MILLE: usize = 800;

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

/// One changed entry in a delta file: its slot and its value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DeltaRecord {
    pub slot: u64,
    pub entry: Entry,
}

pub const DELTA_RECORD_BYTES: usize = std::mem::size_of::<DeltaRecord>();
const _: () = assert!(DELTA_RECORD_BYTES == 24);

/// Bytes and xxh3-64 of a file written for a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub xxh3: u64,
}

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

enum Backing {
    Anon,
    File { dir: PathBuf, name: String, generation: u32 },
}

/// A growable open-addressing set of [`Entry`].
pub struct DedupTable {
    map: MmapMut,
    capacity: usize,
    len: usize,
    backing: Backing,
    /// One bit per slot written since the last checkpoint (empty when
    /// changes are not tracked).
    dirty: Vec<u64>,
    /// Every slot may have moved (new or grown table): the next checkpoint
    /// must write a base.
    moved: bool,
}

#[inline]
fn mix(device_fp: u64, key: u32) -> u64 {
    let h = device_fp ^ (key as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let h = (h ^ (h >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^ (h >> 32)
}

fn capacity_for(expected: usize) -> usize {
    (expected * 1000 / LOAD_EXPECTED_PER_MILLE).max(CAPACITY_MIN_ENTRIES)
}

#[inline]
fn home(h: u64, capacity: usize) -> usize {
    ((h as u128 * capacity as u128) >> 64) as usize
}

impl DedupTable {
    /// An empty table in anonymous memory.
    pub fn anonymous() -> io::Result<DedupTable> {
        DedupTable::anonymous_for(0)
    }

    /// An empty table in anonymous memory with room for `expected` entries
    /// before its first growth (at [`LOAD_EXPECTED_PER_MILLE`] load).
    pub fn anonymous_for(expected: usize) -> io::Result<DedupTable> {
        DedupTable::with_capacity(Backing::Anon, capacity_for(expected))
    }

    /// An empty table backed by `dir/name.N.dedup` files (N grows with
    /// each rehash; the previous file is removed once the new one is built).
    pub fn in_dir(dir: PathBuf, name: String, expected: usize) -> io::Result<DedupTable> {
        DedupTable::with_capacity(Backing::File { dir, name, generation: 0 }, capacity_for(expected))
    }

    fn with_capacity(backing: Backing, capacity: usize) -> io::Result<DedupTable> {
        let map = match &backing {
            Backing::Anon => anon_map(capacity)?,
            Backing::File { dir, name, generation } => {
                std::fs::create_dir_all(dir)?;
                map_file(dir, name, *generation, capacity)?
            }
        };
        Ok(DedupTable { map, capacity, len: 0, backing, dirty: Vec::new(), moved: true })
    }

    /// Where a table lives: `dir` for a file-backed one, else anonymous.
    pub fn create(dir: Option<PathBuf>, name: String, expected: usize) -> io::Result<DedupTable> {
        match dir {
            None => DedupTable::anonymous_for(expected),
            Some(d) => DedupTable::in_dir(d, name, expected),
        }
    }

    /// Starts tracking which slots change, for incremental checkpoints.
    pub fn track_changes(&mut self) {
        self.dirty = vec![0; self.capacity.div_ceil(64)];
    }

    /// Slots changed since the last checkpoint, or `None` if every slot
    /// may have moved (a base must be written).
    pub fn changes(&self) -> Option<usize> {
        if self.moved {
            return None;
        }
        Some(self.dirty.iter().map(|w| w.count_ones() as usize).sum())
    }

    #[inline]
    fn mark(&mut self, slot: usize) {
        if let Some(w) = self.dirty.get_mut(slot / 64) {
            *w |= 1 << (slot % 64);
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of state the table holds (its whole mapping).
    pub fn bytes(&self) -> usize {
        self.capacity * ENTRY_BYTES
    }

    #[inline]
    fn entries(&self) -> &[Entry] {
        bytemuck::cast_slice(&self.map[..self.capacity * ENTRY_BYTES])
    }

    #[inline]
    fn entries_mut(&mut self) -> &mut [Entry] {
        bytemuck::cast_slice_mut(&mut self.map[..self.capacity * ENTRY_BYTES])
    }

    /// Hints the CPU to load the home slot of (device, key).
    #[inline]
    pub fn prefetch(&self, device_fp: u64, key: u32) {
        let i = home(mix(device_fp, key), self.capacity);
        let p = self.entries()[i..].as_ptr();
        #[cfg(target_arch = "x86_64")]
        // SAFETY: prefetch is a hint that never faults; `p` points into the map.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    }

    /// Records that `device_fp` had an event with `key` in `slice`.
    #[inline]
    pub fn observe(&mut self, device_fp: u64, key: u32, slice: u32) -> io::Result<Seen> {
        debug_assert!(slice != 0, "slice 0 is the empty marker");
        if (self.len + 1) * 1000 > self.capacity * LOAD_MAX_PER_MILLE {
            self.grow()?;
        }
        let capacity = self.capacity;
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
        let mut i = home(mix(device_fp, key), self.capacity);
        loop {
            let e = entries[i];
            if e.first_slice == 0 {
                return None;
            }
            if e.device_fp == device_fp && e.key == key {
                return Some(e);
            }
            i = (i + 1) % self.capacity;
        }
    }

    /// Rehashes into a map 1.5× larger.
    #[cold]
    fn grow(&mut self) -> io::Result<()> {
        let capacity = self.capacity + self.capacity / 2;
        let mut map = match &mut self.backing {
            Backing::Anon => anon_map(capacity)?,
            Backing::File { dir, name, generation } => {
                *generation += 1;
                map_file(dir, name, *generation, capacity)?
            }
        };
        {
            let new: &mut [Entry] = bytemuck::cast_slice_mut(&mut map[..capacity * ENTRY_BYTES]);
            for e in self.entries().iter().filter(|e| e.first_slice != 0) {
                let mut i = home(mix(e.device_fp, e.key), capacity);
                while new[i].first_slice != 0 {
                    i = if i + 1 == capacity { 0 } else { i + 1 };
                }
                new[i] = *e;
            }
        }
        self.map = map;
        self.capacity = capacity;
        self.moved = true;
        if !self.dirty.is_empty() {
            self.track_changes();
        }
        if let Backing::File { dir, name, generation } = &self.backing {
            let _ = std::fs::remove_file(file_path(dir, name, *generation - 1));
        }
        Ok(())
    }
}

/// Checkpoint files of a table.
impl DedupTable {
    /// Writes every slot to `path` (a base) and clears the change bitmap.
    pub fn write_base(&mut self, path: &Path) -> io::Result<Written> {
        let bytes = &self.map[..self.capacity * ENTRY_BYTES];
        let mut f = File::create(path)?;
        f.write_all(bytes)?;
        let written = Written { bytes: bytes.len() as u64, xxh3: xxhash_rust::xxh3::xxh3_64(bytes) };
        self.moved = false;
        self.dirty.fill(0);
        Ok(written)
    }

    /// Writes the slots changed since the last checkpoint to `path` (a
    /// delta) and clears the change bitmap. Must follow a base of this
    /// capacity ([`DedupTable::changes`] is `Some`).
    pub fn write_delta(&mut self, path: &Path) -> io::Result<Written> {
        assert!(!self.moved, "a delta needs a base of the same layout");
        let mut out: Vec<DeltaRecord> = Vec::with_capacity(self.changes().unwrap_or(0));
        let entries: &[Entry] = bytemuck::cast_slice(&self.map[..self.capacity * ENTRY_BYTES]);
        for (w, word) in self.dirty.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let slot = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                out.push(DeltaRecord { slot: slot as u64, entry: entries[slot] });
            }
        }
        let bytes: &[u8] = bytemuck::cast_slice(&out);
        File::create(path)?.write_all(bytes)?;
        Ok(Written { bytes: bytes.len() as u64, xxh3: xxhash_rust::xxh3::xxh3_64(bytes) })
    }

    /// Rebuilds a table from its base and deltas (checked against their
    /// recorded sizes and checksums), tracking changes from there on.
    /// `dir`/`name` as for [`DedupTable::create`].
    pub fn restore(
        dir: Option<PathBuf>,
        name: String,
        capacity: usize,
        len: usize,
        base: (&Path, Written),
        deltas: &[(PathBuf, Written)],
    ) -> io::Result<DedupTable> {
        if base.1.bytes != (capacity * ENTRY_BYTES) as u64 {
            return Err(corrupt(base.0, "base size does not match the table's capacity"));
        }
        let backing = match dir {
            None => Backing::Anon,
            Some(dir) => Backing::File { dir, name, generation: 0 },
        };
        let mut t = DedupTable::with_capacity(backing, capacity)?;
        let bytes = &mut t.map[..capacity * ENTRY_BYTES];
        read_exactly(base.0, bytes)?;
        if xxhash_rust::xxh3::xxh3_64(bytes) != base.1.xxh3 {
            return Err(corrupt(base.0, "checksum mismatch"));
        }
        for (path, w) in deltas {
            let mut buf = vec![0u8; w.bytes as usize];
            read_exactly(path, &mut buf)?;
            if !buf.len().is_multiple_of(DELTA_RECORD_BYTES) || xxhash_rust::xxh3::xxh3_64(&buf) != w.xxh3 {
                return Err(corrupt(path, "checksum mismatch"));
            }
            let entries = t.entries_mut();
            for r in buf.chunks_exact(DELTA_RECORD_BYTES).map(bytemuck::pod_read_unaligned::<DeltaRecord>) {
                let slot = usize::try_from(r.slot).ok().filter(|&s| s < capacity);
                let Some(slot) = slot else {
                    return Err(corrupt(path, "slot outside the table"));
                };
                entries[slot] = r.entry;
            }
        }
        let held = t.entries().iter().filter(|e| e.first_slice != 0).count();
        if held != len {
            return Err(corrupt(base.0, &format!("holds {held} entries, the checkpoint says {len}")));
        }
        t.len = len;
        t.moved = false;
        t.track_changes();
        Ok(t)
    }
}

fn corrupt(path: &Path, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: {why}", path.display()))
}

/// Fills `buf` from the file at `path`, which must be exactly that long.
fn read_exactly(path: &Path, buf: &mut [u8]) -> io::Result<()> {
    let mut f = File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let size = f.metadata()?.len();
    if size != buf.len() as u64 {
        return Err(corrupt(path, &format!("{size} bytes, the checkpoint says {}", buf.len())));
    }
    f.read_exact(buf)
}

impl Drop for DedupTable {
    /// A dropped table is a finished period: its file goes too.
    fn drop(&mut self) {
        if let Backing::File { dir, name, generation } = &self.backing {
            let _ = std::fs::remove_file(file_path(dir, name, *generation));
        }
    }
}

/// Anonymous memory for `capacity` entries. Large tables ask for huge
/// pages: a probe is a random access, and with 4 KiB pages almost every one
/// also misses the TLB.
fn anon_map(capacity: usize) -> io::Result<MmapMut> {
    let map = MmapMut::map_anon(capacity * ENTRY_BYTES)?;
    if capacity * ENTRY_BYTES >= HUGE_PAGE_MIN_BYTES {
        // Advice only: where huge pages are off, the table works as before.
        let _ = map.advise(memmap2::Advice::HugePage);
    }
    Ok(map)
}

/// Tables at least this large are advised to use huge pages.
const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

fn file_path(dir: &std::path::Path, name: &str, generation: u32) -> PathBuf {
    dir.join(format!("{name}.{generation}.dedup"))
}

fn map_file(dir: &std::path::Path, name: &str, generation: u32, capacity: usize) -> io::Result<MmapMut> {
    let path = file_path(dir, name, generation);
    let file: File = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    file.set_len((capacity * ENTRY_BYTES) as u64)?;
    // SAFETY: the file is ours (created and truncated just now under the
    // job's state directory); nothing else maps or resizes it while we do.
    unsafe { MmapMut::map_mut(&file) }
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
            let mut deltas = Vec::new();
            for (r, ops) in rounds.iter().enumerate() {
                for &(d, k, s) in ops {
                    t.observe(d.wrapping_mul(0x9E37_79B9_7F4A_7C15), k, s).unwrap();
                }
                // What the checkpoint writer does: a base when slots moved, else a delta.
                if t.changes().is_none() {
                    let p = dir.path().join(format!("b{r}"));
                    base = Some((p.clone(), t.write_base(&p).unwrap()));
                    deltas.clear();
                } else {
                    let p = dir.path().join(format!("d{r}"));
                    deltas.push((p.clone(), t.write_delta(&p).unwrap()));
                }
                let (bp, bw) = base.clone().unwrap();
                let back = DedupTable::restore(None, "t".into(), t.capacity(), t.len(), (&bp, bw), &deltas).unwrap();
                prop_assert_eq!(back.entries(), t.entries());
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
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("checksum"), "{e}");
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

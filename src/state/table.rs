//! The open-addressing table under every per-shard state: fixed-size
//! `Pod` slots in a memory map (a file under the state directory, or
//! anonymous memory), linear probing from a fast-range home slot, growth by
//! 1.5× at 80% load, and what checkpoints need.
//!
//! The home slot comes from a fast range reduction of a mixed hash, so
//! capacity need not be a power of two and the table can grow by 1.5×,
//! keeping state between 1.25× and 1.9× the entries' own size.
//!
//! Checkpoints: with [`Table::track_changes`] on, every slot written sets one
//! bit in a bitmap (a bit per slot), so a checkpoint writes only the slots
//! that changed since the last one (a delta: the changed entries, which
//! stay marked when a growth moves them) or every entry (a base). Both
//! files are entries only, in slot order, never empty slots: a base is the
//! table's entries and nothing of its layout, so it costs its entries'
//! bytes whatever the load. A base starts after an empty slot and goes
//! round the table from there, so no probe run is cut by the file's start:
//! [`Table::restore`] puts each of its entries back into a table of the
//! base's capacity at the slot it had (its home, or the slot after the
//! previous entry's, whichever comes later), writing the table front to
//! back without probing; then it upserts the deltas' entries in order.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytemuck::Pod;
use memmap2::MmapMut;

use super::snapshot::{Snapshot, SnapshotPool};

/// Smallest table; a fresh period starts here.
pub const CAPACITY_MIN_ENTRIES: usize = 1 << 12;
/// A table sized for an expected count starts at this load (per mille), so
/// the estimate can be exceeded by a third before the first growth.
pub const LOAD_EXPECTED_PER_MILLE: usize = 600;
/// Grow when entries exceed this share of capacity (per mille).
pub const LOAD_MAX_PER_MILLE: usize = 800;

/// A table's slot type.
pub trait Slot: Pod {
    const BYTES: usize = std::mem::size_of::<Self>();
    /// Whether the slot holds nothing (an all-zero slot must be empty).
    fn is_empty(&self) -> bool;
    /// The mixed hash of the slot's key (decides its home slot).
    fn hash(&self) -> u64;
    /// Whether two slots hold the same key.
    fn same_key(&self, other: &Self) -> bool;
}

/// Bytes and xxh3-64 of a file written for a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub xxh3: u64,
}

enum Backing {
    Anon,
    File { dir: PathBuf, name: String, generation: u32 },
}

/// A growable open-addressing set of `E` slots.
pub struct Table<E: Slot> {
    map: MmapMut,
    capacity: usize,
    pub(crate) len: usize,
    backing: Backing,
    /// One bit per slot written since the last checkpoint (empty when
    /// changes are not tracked).
    dirty: Vec<u64>,
    /// Every slot may have moved (new or grown table): the next checkpoint
    /// must write a base.
    moved: bool,
    _entry: PhantomData<E>,
}

fn capacity_for(expected: usize) -> usize {
    (expected * 1000 / LOAD_EXPECTED_PER_MILLE).max(CAPACITY_MIN_ENTRIES)
}

/// The home slot of hash `h` in a table of `capacity` slots.
#[inline]
pub fn home(h: u64, capacity: usize) -> usize {
    ((h as u128 * capacity as u128) >> 64) as usize
}

impl<E: Slot> Table<E> {
    /// Bytes of one delta record: the changed entry itself.
    pub const DELTA_RECORD_BYTES: usize = E::BYTES;

    /// Hints the CPU to load the home slot of hash `h`, so the cache
    /// misses of a batch of probes overlap. When changes are tracked, the
    /// slot's change bit too: a new entry sets it, and the bitmap is too
    /// large for the cache (a bit per slot), so an unprefetched bit
    /// stalls every insert on a second miss.
    #[inline]
    pub fn prefetch_home(&self, h: u64) {
        let slot = home(h, self.capacity);
        prefetch(self.entries()[slot..].as_ptr().cast());
        if let Some(w) = self.dirty.get(slot / 64) {
            prefetch((w as *const u64).cast());
        }
    }

    /// Grows first if one more entry would pass the load limit.
    #[inline]
    pub(crate) fn reserve_one(&mut self) -> io::Result<()> {
        if (self.len + 1) * 1000 > self.capacity * LOAD_MAX_PER_MILLE {
            self.grow()?;
        }
        Ok(())
    }
}

impl<E: Slot> Table<E> {
    /// An empty table in anonymous memory.
    pub fn anonymous() -> io::Result<Table<E>> {
        Table::anonymous_for(0)
    }

    /// An empty table in anonymous memory with room for `expected` entries
    /// before its first growth (at [`LOAD_EXPECTED_PER_MILLE`] load).
    pub fn anonymous_for(expected: usize) -> io::Result<Table<E>> {
        Table::with_capacity(Backing::Anon, capacity_for(expected))
    }

    /// An empty table backed by `dir/name.N.dedup` files (N grows with
    /// each rehash; the previous file is removed once the new one is built).
    pub fn in_dir(dir: PathBuf, name: String, expected: usize) -> io::Result<Table<E>> {
        Table::with_capacity(Backing::File { dir, name, generation: 0 }, capacity_for(expected))
    }

    fn with_capacity(backing: Backing, capacity: usize) -> io::Result<Table<E>> {
        let map = match &backing {
            Backing::Anon => anon_map(capacity * E::BYTES)?,
            Backing::File { dir, name, generation } => {
                std::fs::create_dir_all(dir)?;
                map_file(dir, name, *generation, capacity * E::BYTES)?
            }
        };
        Ok(Table { map, capacity, len: 0, backing, dirty: Vec::new(), moved: true, _entry: PhantomData })
    }

    /// Where a table lives: `dir` for a file-backed one, else anonymous.
    pub fn create(dir: Option<PathBuf>, name: String, expected: usize) -> io::Result<Table<E>> {
        match dir {
            None => Table::anonymous_for(expected),
            Some(d) => Table::in_dir(d, name, expected),
        }
    }

    /// Empties an anonymous table for reuse (by the next period), keeping
    /// its memory: zeroing pages already mapped costs far less than mapping
    /// fresh ones, whose first writes fault and flush TLBs. `None` for a
    /// file-backed table (its file is named after its period).
    pub fn recycle(mut self) -> Option<Table<E>> {
        if !matches!(self.backing, Backing::Anon) {
            return None;
        }
        self.map.fill(0);
        self.len = 0;
        self.dirty.fill(0);
        self.moved = true;
        Some(self)
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
    pub(crate) fn mark(&mut self, slot: usize) {
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
        self.capacity * E::BYTES
    }

    #[inline]
    pub(crate) fn entries(&self) -> &[E] {
        bytemuck::cast_slice(&self.map[..self.capacity * E::BYTES])
    }

    #[inline]
    pub(crate) fn entries_mut(&mut self) -> &mut [E] {
        bytemuck::cast_slice_mut(&mut self.map[..self.capacity * E::BYTES])
    }

    /// Rehashes into a map 1.5× larger.
    #[cold]
    pub(crate) fn grow(&mut self) -> io::Result<()> {
        let capacity = self.capacity + self.capacity / 2;
        let mut map = match &mut self.backing {
            Backing::Anon => anon_map(capacity * E::BYTES)?,
            Backing::File { dir, name, generation } => {
                *generation += 1;
                map_file(dir, name, *generation, capacity * E::BYTES)?
            }
        };
        // Changed entries stay marked where they move: deltas hold entries,
        // not slots, so a growth does not force a base.
        let mut dirty = if self.dirty.is_empty() { Vec::new() } else { vec![0u64; capacity.div_ceil(64)] };
        {
            let new: &mut [E] = bytemuck::cast_slice_mut(&mut map[..capacity * E::BYTES]);
            for (j, e) in self.entries().iter().enumerate().filter(|(_, e)| !e.is_empty()) {
                let mut i = home(e.hash(), capacity);
                while !new[i].is_empty() {
                    i = if i + 1 == capacity { 0 } else { i + 1 };
                }
                new[i] = *e;
                if self.dirty.get(j / 64).is_some_and(|w| w & (1 << (j % 64)) != 0) {
                    dirty[i / 64] |= 1 << (i % 64);
                }
            }
        }
        self.map = map;
        self.capacity = capacity;
        self.dirty = dirty;
        if let Backing::File { dir, name, generation } = &self.backing {
            let _ = std::fs::remove_file(file_path(dir, name, *generation - 1));
        }
        Ok(())
    }
}

/// Checkpoint files of a table.
impl<E: Slot> Table<E> {
    /// Copies every entry (a base) and clears the change bitmap. The copy
    /// is written out later, off the hot path (see [`Table::write_base`]).
    /// The entries go in slot order from just after the first empty slot
    /// round to it (see [`BasePlacer`]).
    pub fn snapshot_base(&mut self, pool: &Arc<SnapshotPool>, generation: u64) -> io::Result<(Snapshot, Written)> {
        let mut copy = pool.take(self.len * E::BYTES, generation)?;
        let entries = self.entries();
        let empty = entries.iter().position(|e| e.is_empty()).unwrap_or(0);
        let (before, after) = entries.split_at(empty);
        let held = after.iter().chain(before).filter(|e| !e.is_empty());
        let copied = copy_entries(&mut copy, held);
        debug_assert_eq!(copied, self.len, "the table's length counts its entries");
        let written = Written { bytes: copy.len() as u64, xxh3: xxhash_rust::xxh3::xxh3_64(&copy) };
        self.moved = false;
        self.dirty.fill(0);
        Ok((copy, written))
    }

    /// Copies the entries changed since the last checkpoint (a delta) and
    /// clears the change bitmap. Must follow a base ([`Table::changes`] is
    /// `Some`).
    pub fn snapshot_delta(&mut self, pool: &Arc<SnapshotPool>, generation: u64) -> io::Result<(Snapshot, Written)> {
        assert!(!self.moved, "a delta needs a base of the same layout");
        let mut copy = pool.take(self.changes().unwrap_or(0) * Self::DELTA_RECORD_BYTES, generation)?;
        let entries: &[E] = bytemuck::cast_slice(&self.map[..self.capacity * E::BYTES]);
        let changed = self.dirty.iter_mut().enumerate().flat_map(|(w, word)| {
            let mut bits = std::mem::take(word);
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let slot = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    &entries[slot]
                })
            })
        });
        copy_entries(&mut copy, changed);
        let written = Written { bytes: copy.len() as u64, xxh3: xxhash_rust::xxh3::xxh3_64(&copy) };
        Ok((copy, written))
    }

    /// [`Table::snapshot_base`] written to `path` (not synced).
    pub fn write_base(&mut self, path: &Path) -> io::Result<Written> {
        let (bytes, written) = self.snapshot_base(&Arc::default(), 0)?;
        File::create(path)?.write_all(&bytes)?;
        Ok(written)
    }

    /// [`Table::snapshot_delta`] written to `path` (not synced).
    pub fn write_delta(&mut self, path: &Path) -> io::Result<Written> {
        let (bytes, written) = self.snapshot_delta(&Arc::default(), 0)?;
        File::create(path)?.write_all(&bytes)?;
        Ok(written)
    }

    /// Rebuilds a table from its base and deltas (checked against their
    /// recorded sizes and checksums), tracking changes from there on.
    /// `dir`/`name` as for [`Table::create`]; `capacity` is the base's.
    pub fn restore(
        dir: Option<PathBuf>,
        name: String,
        capacity: usize,
        len: usize,
        base: (&Path, Written),
        deltas: &[(PathBuf, Written)],
    ) -> io::Result<Table<E>> {
        if base.1.bytes > (capacity * E::BYTES) as u64 {
            return Err(corrupt(base.0, "holds more entries than the table's capacity"));
        }
        let backing = match dir {
            None => Backing::Anon,
            Some(dir) => Backing::File { dir, name, generation: 0 },
        };
        let mut t: Table<E> = Table::with_capacity(backing, capacity)?;
        let mut buf = vec![0u8; RESTORE_CHUNK_ENTRIES * E::BYTES];
        let mut placer = BasePlacer::default();
        for (i, (path, w)) in
            std::iter::once((base.0, base.1)).chain(deltas.iter().map(|(p, w)| (p.as_path(), *w))).enumerate()
        {
            read_entries(path, w, &mut buf, |e: E| {
                if e.is_empty() {
                    return Err(corrupt(path, "an empty entry"));
                }
                if i == 0 && placer.put(&mut t, e) {
                    return Ok(());
                }
                t.upsert(e)
            })?;
        }
        let held = t.entries().iter().filter(|e| !e.is_empty()).count();
        if held != len || t.len != len {
            return Err(corrupt(base.0, &format!("holds {held} entries, the checkpoint says {len}")));
        }
        t.moved = false;
        t.track_changes();
        Ok(t)
    }
}

/// Puts a base's entries back at their slots without probing. A base
/// lists the entries in slot order starting after an empty slot, so its
/// first entry sits at its own home (the slot before it is empty), and
/// counting slots from there (unrolled: no probe run crosses the empty
/// slot) each entry sits at its home or right after the previous entry,
/// whichever is later. Every placement is checked to leave a valid table
/// (the home lies in the run of filled slots that ends at the entry, and
/// the table keeps an empty slot); the first one that would not, and
/// everything after it, goes through [`Table::upsert`] instead, so a base
/// in another order still restores, only slower.
#[derive(Default)]
struct BasePlacer {
    /// Slot of the first entry (unrolled position 0).
    origin: Option<usize>,
    /// Unrolled position after the last entry placed.
    next: usize,
    /// Unrolled position where the run of filled slots ending at `next` starts.
    run_start: usize,
    off: bool,
}

impl BasePlacer {
    /// Places `e` into `t` (a table being restored); false if it must be
    /// upserted instead.
    #[inline]
    fn put<E: Slot>(&mut self, t: &mut Table<E>, e: E) -> bool {
        let c = t.capacity;
        if self.off || (t.len + 1) * 1000 > c * LOAD_MAX_PER_MILLE {
            self.off = true;
            return false;
        }
        let h = home(e.hash(), c);
        let origin = *self.origin.get_or_insert(h);
        let unrolled_home = if h >= origin { h - origin } else { h + c - origin };
        let u = unrolled_home.max(self.next);
        if u > self.next {
            self.run_start = u;
        }
        if unrolled_home < self.run_start || u >= c {
            self.off = true;
            return false;
        }
        let slot = if u + origin >= c { u + origin - c } else { u + origin };
        t.entries_mut()[slot] = e;
        t.len += 1;
        self.next = u + 1;
        true
    }
}

/// Entries a restore reads per `read` call.
const RESTORE_CHUNK_ENTRIES: usize = 1 << 16;

/// Copies `entries` into `out` one after the other; returns how many fit.
fn copy_entries<'a, E: Slot>(out: &mut [u8], entries: impl Iterator<Item = &'a E>) -> usize {
    out.chunks_exact_mut(E::BYTES).zip(entries).map(|(o, e)| o.copy_from_slice(bytemuck::bytes_of(e))).count()
}

/// Reads the entries of a checkpoint file written as `w` (a base or a
/// delta) through `buf`, a whole number of entries long, handing each to
/// `each`; checks the file's size first and its checksum at the end.
fn read_entries<E: Slot>(
    path: &Path,
    w: Written,
    buf: &mut [u8],
    mut each: impl FnMut(E) -> io::Result<()>,
) -> io::Result<()> {
    let mut f = File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let size = f.metadata()?.len();
    if size != w.bytes {
        return Err(corrupt(path, &format!("{size} bytes, the checkpoint says {}", w.bytes)));
    }
    if !size.is_multiple_of(E::BYTES as u64) {
        return Err(corrupt(path, &format!("{size} bytes is not a whole number of {}-byte entries", E::BYTES)));
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut left = size as usize;
    while left > 0 {
        let n = left.min(buf.len());
        let chunk = &mut buf[..n];
        f.read_exact(chunk)?;
        hasher.update(chunk);
        for r in chunk.chunks_exact(E::BYTES) {
            each(bytemuck::pod_read_unaligned(r))?;
        }
        left -= chunk.len();
    }
    if hasher.digest() != w.xxh3 {
        return Err(corrupt(path, "checksum mismatch"));
    }
    Ok(())
}

impl<E: Slot> Table<E> {
    /// Inserts `e`, or overwrites the entry with its key.
    pub(crate) fn upsert(&mut self, e: E) -> io::Result<()> {
        self.reserve_one()?;
        let capacity = self.capacity;
        let mut i = home(e.hash(), capacity);
        loop {
            let slot = &mut self.entries_mut()[i];
            if slot.is_empty() {
                *slot = e;
                self.len += 1;
                return Ok(());
            }
            if slot.same_key(&e) {
                *slot = e;
                return Ok(());
            }
            i = if i + 1 == capacity { 0 } else { i + 1 };
        }
    }
}

fn corrupt(path: &Path, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: {why}", path.display()))
}

impl<E: Slot> Drop for Table<E> {
    /// A dropped table is a finished period: its file goes too.
    fn drop(&mut self) {
        if let Backing::File { dir, name, generation } = &self.backing {
            let _ = std::fs::remove_file(file_path(dir, name, *generation));
        }
    }
}

/// Anonymous memory for `capacity` entries, its pages faulted in writable
/// from the start. Otherwise each page's first probe (a read) maps the
/// shared zero page, and its first write faults again, copies and flushes
/// that mapping from the TLB of every core with an interrupt (a rehash
/// reads and writes every page of the new table at once; a tumble metric
/// opens tables every step).
/// Large tables also ask for huge pages: a probe is a random access, and
/// with 4 KiB pages almost every one also misses the TLB.
fn anon_map(bytes: usize) -> io::Result<MmapMut> {
    if bytes < HUGE_PAGE_MIN_BYTES {
        return memmap2::MmapOptions::new().len(bytes.max(1)).populate().map_anon();
    }
    let map = MmapMut::map_anon(bytes)?;
    // Advice only: where huge pages are off, or the kernel predates
    // MADV_POPULATE_WRITE (5.14), the table works as before.
    let _ = map.advise(memmap2::Advice::HugePage);
    let _ = map.advise(memmap2::Advice::PopulateWrite);
    Ok(map)
}

/// Advises huge pages for the buffer of `v` (the 2 MiB-aligned part of
/// its capacity) before its elements are first written, where it is large
/// enough: random lookups into a large index then miss the TLB far less
/// (in a VM a TLB miss is a nested page walk). Advice only.
pub(crate) fn advise_huge_pages<T>(v: &mut Vec<T>) {
    const HUGE_PAGE: usize = 2 << 20;
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if bytes < HUGE_PAGE_MIN_BYTES {
        return;
    }
    let start = v.as_mut_ptr() as usize;
    let (lo, hi) = (start.next_multiple_of(HUGE_PAGE), (start + bytes) / HUGE_PAGE * HUGE_PAGE);
    if lo < hi {
        // SAFETY: the range lies inside the vector's own allocation, and
        // MADV_HUGEPAGE changes no contents.
        unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
    }
}

/// Hints the CPU to load the cache line at `p` (never faults).
#[inline(always)]
pub(crate) fn prefetch(p: *const i8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is a hint that never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Tables at least this large are advised to use huge pages.
const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

fn file_path(dir: &std::path::Path, name: &str, generation: u32) -> PathBuf {
    dir.join(format!("{name}.{generation}.dedup"))
}

fn map_file(dir: &std::path::Path, name: &str, generation: u32, bytes: usize) -> io::Result<MmapMut> {
    let path = file_path(dir, name, generation);
    let file: File = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    file.set_len(bytes as u64)?;
    // SAFETY: the file is ours (created and truncated just now under the
    // job's state directory); nothing else maps or resizes it while we do.
    unsafe { MmapMut::map_mut(&file) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags` of the mapping that holds address `at`, from
    /// `/proc/self/smaps`.
    fn vm_flags(at: usize) -> String {
        smaps_line(at, "VmFlags:")
    }

    /// The line starting with `key` of the mapping that holds address
    /// `at`, from `/proc/self/smaps`.
    fn smaps_line(at: usize, key: &str) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ').filter(|(r, _)| r.contains('-') && !r.ends_with(':')) {
                let (lo, hi) = range.split_once('-').unwrap();
                let (lo, hi) = (usize::from_str_radix(lo, 16).unwrap(), usize::from_str_radix(hi, 16).unwrap());
                inside = (lo..hi).contains(&at);
            } else if inside && line.starts_with(key) {
                return line.to_string();
            }
        }
        panic!("no mapping holds {at:#x}");
    }

    #[test]
    fn a_large_table_is_resident_before_its_first_write() {
        let bytes = HUGE_PAGE_MIN_BYTES * 2;
        let probe = MmapMut::map_anon(4096).unwrap();
        if probe.advise(memmap2::Advice::PopulateWrite).is_err() {
            return; // a kernel before 5.14 faults pages in as they are used
        }
        let map = anon_map(bytes).unwrap();
        let at = map.as_ptr() as usize;
        let rss_kb: usize = smaps_line(at, "Rss:").split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(rss_kb * 1024 >= bytes, "{rss_kb} kB resident of {bytes} bytes");
        assert!(map.iter().all(|&b| b == 0), "a new table is empty");
    }

    #[test]
    fn a_large_vector_is_advised_huge_pages_and_a_small_one_is_not() {
        if !Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            return; // a kernel without huge pages takes no such advice
        }
        let mut big: Vec<u64> = Vec::with_capacity(HUGE_PAGE_MIN_BYTES * 2 / 8);
        advise_huge_pages(&mut big);
        big.resize(big.capacity(), 7);
        let middle = big.as_ptr() as usize + HUGE_PAGE_MIN_BYTES;
        assert!(vm_flags(middle).split_whitespace().any(|f| f == "hg"), "{}", vm_flags(middle));
        assert_eq!(big.iter().sum::<u64>(), 7 * big.len() as u64, "advice changes no contents");
        let mut small: Vec<u64> = Vec::with_capacity(1024);
        advise_huge_pages(&mut small);
        small.push(1);
        assert!(!vm_flags(small.as_ptr() as usize).split_whitespace().any(|f| f == "hg"));
    }
}

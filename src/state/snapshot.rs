//! Memory for checkpoint copies of tables, reused from one checkpoint to
//! the next.
//!
//! Workers wait while their tables are copied for a checkpoint, so the
//! copy must run at memory speed. Fresh memory does not on these VMs: the
//! first touch of each page costs more than the copy itself (a 145 MiB copy
//! into fresh memory took 0.22–0.34 s, with or without huge pages or
//! `MAP_POPULATE`; into memory touched before, 0.02–0.03 s). So a copy's
//! buffer goes back to this pool once the checkpoint writer has written it,
//! and the next checkpoint copies into it. A new buffer gets half again the
//! size asked for, room for the table's next growth; a buffer no
//! checkpoint used for [`IDLE_CHECKPOINTS_MAX`] checkpoints is released.

use std::io;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use memmap2::MmapMut;

/// Buffers unused for more checkpoints than this are released.
pub const IDLE_CHECKPOINTS_MAX: u64 = 2;
/// Copies smaller than this are not worth keeping.
const POOLED_BYTES_MIN: usize = 1 << 20;

struct Buffer {
    map: MmapMut,
    /// Checkpoint generation that last used it.
    used: u64,
}

/// Buffers free for the next checkpoint's copies.
#[derive(Default)]
pub struct SnapshotPool {
    free: Mutex<Vec<Buffer>>,
}

/// A checkpoint's copy of table bytes, held until it is written; its
/// buffer returns to the pool when dropped.
pub struct Snapshot {
    map: Option<MmapMut>,
    len: usize,
    generation: u64,
    pool: Option<Arc<SnapshotPool>>,
}

impl SnapshotPool {
    /// A buffer of at least `len` bytes for checkpoint `generation`.
    pub fn take(self: &Arc<SnapshotPool>, len: usize, generation: u64) -> io::Result<Snapshot> {
        if len < POOLED_BYTES_MIN {
            return Ok(Snapshot { map: Some(MmapMut::map_anon(len)?), len, generation, pool: None });
        }
        let found = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            free.retain(|b| b.used + IDLE_CHECKPOINTS_MAX >= generation);
            let best = (0..free.len()).filter(|&i| free[i].map.len() >= len).min_by_key(|&i| free[i].map.len());
            best.map(|i| free.swap_remove(i).map)
        };
        let map = match found {
            Some(m) => m,
            None => {
                let map = MmapMut::map_anon(len + len / 2)?;
                // Advice only: fewer page faults where huge pages are on.
                let _ = map.advise(memmap2::Advice::HugePage);
                map
            }
        };
        Ok(Snapshot { map: Some(map), len, generation, pool: Some(self.clone()) })
    }

    /// Bytes the pool holds.
    pub fn bytes(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|b| b.map.len()).sum()
    }
}

impl Deref for Snapshot {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_deref().map_or(&[], |m| &m[..self.len])
    }
}

impl DerefMut for Snapshot {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        self.map.as_deref_mut().map_or(&mut [], |m| &mut m[..len])
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let (Some(pool), Some(map)) = (self.pool.take(), self.map.take()) {
            pool.free.lock().unwrap_or_else(|p| p.into_inner()).push(Buffer { map, used: self.generation });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_then_released_when_idle() {
        let pool = Arc::new(SnapshotPool::default());
        let mut a = pool.take(4 << 20, 1).unwrap();
        assert_eq!(a.len(), 4 << 20);
        a[0] = 7;
        let ptr = a.as_ptr();
        drop(a);
        assert_eq!(pool.bytes(), 6 << 20, "kept with room to grow");
        // A larger copy that still fits reuses the buffer.
        let b = pool.take(5 << 20, 2).unwrap();
        assert_eq!((b.as_ptr(), b.len()), (ptr, 5 << 20));
        assert_eq!(pool.bytes(), 0);
        drop(b);
        // One too large for it gets a new buffer; the old one stays.
        let c = pool.take(7 << 20, 3).unwrap();
        assert_ne!(c.as_ptr(), ptr);
        assert_eq!(pool.bytes(), 6 << 20);
        drop(c);
        // Unused for more than IDLE_CHECKPOINTS_MAX checkpoints: released.
        let d = pool.take(1 << 20, 3 + IDLE_CHECKPOINTS_MAX + 1).unwrap();
        drop(d);
        assert_eq!(pool.bytes(), (1 << 20) * 3 / 2, "idle buffers were released, the new one kept");
    }

    #[test]
    fn small_and_empty_copies_work() {
        let pool = Arc::new(SnapshotPool::default());
        let e = pool.take(0, 1).unwrap();
        assert!(e.is_empty());
        let mut s = pool.take(100, 1).unwrap();
        s.copy_from_slice(&[1; 100]);
        assert_eq!(s.iter().map(|&b| b as u32).sum::<u32>(), 100);
        drop((e, s));
        assert_eq!(pool.bytes(), 0, "small copies are not kept");
    }
}

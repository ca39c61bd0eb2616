//! The N×N mesh of bounded lock-free queues between routers and shards.
//!
//! Router `r` sends to shard `s` through queue `(r, s)`, which only `r`
//! pushes to and only `s` pops from. Each block a router handles yields
//! exactly one [`Batch`] per shard (possibly without records): its tail
//! carries the block's watermark marker in-band, so a shard knows which
//! blocks it has fully received. Emptied batches go back through a return
//! queue and are reused: no allocation per event or per block once warm.

use crossbeam::queue::ArrayQueue;

/// Batches a queue holds before its router must wait.
pub const QUEUE_BATCHES: usize = 8;
/// Parsed blocks a router may hold before they leave: lets it run ahead of
/// a neighbour whose block it waits on for the watermark.
pub const STAGED_BLOCKS_MAX: usize = 4;
/// Batches a (router, shard) pair may own in all (queued, staged, spare).
pub const POOL_BATCHES: usize = QUEUE_BATCHES + STAGED_BLOCKS_MAX + 2;

/// Position of a block in its source: a file's blocks, or a stream's
/// (64 bits: a daemon reading a trickle for months makes many).
pub type BlockSeq = u64;

/// One counted event for one metric, as a shard receives it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// xxh3-64 of the device id text: decides the shard and dedups.
    pub device_fp: u64,
    /// `metric << KEY_BITS | key id`.
    pub key: u32,
    /// Slice (step index since 1970, local time) the event counts in.
    pub slice: u32,
}

/// The records of one block for one shard, and the block's marker.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<Record>,
    /// The device id text of each record of a DAU metric, in record order:
    /// `[length u16 LE][bytes]` (the shard keeps it for `tally devices
    /// export` and the `minute_devices` rows).
    pub texts: Vec<u8>,
    /// The value fields of each record of a summary metric, in record
    /// order (as many as the metric has; NaN: none).
    pub vals: Vec<f64>,
    pub source: usize,
    /// Position of the block in its source.
    pub seq: BlockSeq,
    /// The source's watermark once this block is counted.
    pub wm_ms: i64,
    /// And before it: what placed its late records.
    pub wm_before_ms: i64,
}

/// Appends a device id text to a batch's `texts` (cut at 64 KiB).
#[inline]
pub fn push_text(texts: &mut Vec<u8>, text: &[u8]) {
    let text = &text[..text.len().min(u16::MAX as usize)];
    texts.extend_from_slice(&(text.len() as u16).to_le_bytes());
    texts.extend_from_slice(text);
}

/// Bytes the text at `at` of a batch's `texts` takes, its header included.
#[inline]
pub fn text_bytes(texts: &[u8], at: usize) -> usize {
    2 + u16::from_le_bytes([texts[at], texts[at + 1]]) as usize
}

/// The text at `*at` of a batch's `texts`; moves `*at` past it.
#[inline]
pub fn next_text<'a>(texts: &'a [u8], at: &mut usize) -> &'a [u8] {
    let n = text_bytes(texts, *at);
    let text = &texts[*at + 2..*at + n];
    *at += n;
    text
}

/// The queues of a run.
pub struct Mesh {
    pub n: usize,
    to_shard: Vec<ArrayQueue<Batch>>,
    returned: Vec<ArrayQueue<Batch>>,
}

impl Mesh {
    pub fn new(n: usize) -> Mesh {
        Mesh {
            n,
            to_shard: (0..n * n).map(|_| ArrayQueue::new(QUEUE_BATCHES)).collect(),
            returned: (0..n * n).map(|_| ArrayQueue::new(POOL_BATCHES)).collect(),
        }
    }

    /// Router `r` sends; gives the batch back if the queue is full.
    #[inline]
    pub fn send(&self, r: usize, s: usize, b: Batch) -> Result<(), Batch> {
        self.to_shard[r * self.n + s].push(b)
    }

    /// Shard `s` takes the next batch from router `r`.
    #[inline]
    pub fn recv(&self, r: usize, s: usize) -> Option<Batch> {
        self.to_shard[r * self.n + s].pop()
    }

    /// Shard `s` hands an emptied batch back to router `r`.
    #[inline]
    pub fn give_back(&self, r: usize, s: usize, mut b: Batch) {
        b.records.clear();
        b.texts.clear();
        b.vals.clear();
        // The return queue holds a whole pool, so this cannot fail; if it
        // ever did, the batch would simply be freed.
        let _ = self.returned[r * self.n + s].push(b);
    }

    /// Batches queued for shard `s` (from every router) and not taken yet.
    pub fn queued(&self, s: usize) -> usize {
        (0..self.n).map(|r| self.to_shard[r * self.n + s].len()).sum()
    }

    /// Router `r` reuses a batch it sent to shard `s` earlier.
    #[inline]
    pub fn reuse(&self, r: usize, s: usize) -> Option<Batch> {
        self.returned[r * self.n + s].pop()
    }
}

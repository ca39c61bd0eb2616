//! Stream sources: input that arrives while the job runs (Kafka topics,
//! TCP connections), handed to the routers as a sequence of blocks.
//!
//! A reader thread (one per topic, one per TCP source) packs the messages
//! of one partition (a topic's partition, a TCP connection) into
//! a [`StreamBlock`] and pushes it onto the source's [`Stream`], which
//! numbers blocks in push order. Routers claim blocks in that order, like
//! a file's blocks; a checkpoint's cut is "blocks before seq S". Changes of
//! a partition's state (assigned, revoked, idle, done) travel as blocks
//! without records, so every shard sees them in the same place.
//!
//! Watermarks ([`Chain`]): each partition has its own (largest event time
//! seen − `max_out_of_orderness`); the source's watermark is the minimum
//! over assigned partitions that are neither idle nor done (when every
//! one is idle or done: the largest of theirs), and never moves back. A block's lateness is judged against the larger of its
//! partition's watermark and the source's, both as of the block before it:
//! so which events are late depends only on each partition's own order
//! (and on idleness, a processing-time decision, as in Flink), never on how
//! partitions interleave.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::throttle::Throttle;
use crate::event::binary::BINARY_RECORD_BYTES;
use crate::job::Format;
use crate::runtime::mesh::BlockSeq;
use crate::runtime::{Wake, NO_EVENTS};

/// Bytes of messages a reader packs into one block before pushing it.
pub const STREAM_BLOCK_BYTES: usize = 1 << 20;
/// Blocks a stream holds before its readers wait for the routers.
pub const STREAM_QUEUE_BLOCKS: usize = 32;
/// Bytes a new block's buffer starts with: a full block and one read past
/// it, so a reader fills it without growing it. (Growing a megabyte buffer
/// is an `mremap`, which waits on the process's memory map for every other
/// thread's page faults and table growth, and they then wait on it.)
const STREAM_BLOCK_CAPACITY: usize = STREAM_BLOCK_BYTES + STREAM_BLOCK_BYTES / 4;
/// Emptied blocks a stream keeps for its readers. Blocks in flight are
/// the queue's, one open per partition and one per router, so keeping
/// as many as the queue holds would free some at every drain and allocate
/// them again at the next fill: twice as many lets a full queue refill
/// from kept blocks (80 MiB at most a stream).
const STREAM_FREE_BLOCKS: usize = 2 * STREAM_QUEUE_BLOCKS;
/// How long a reader that is not woken for room (Kafka, followed files)
/// waits before it offers a block to a full queue again. The queue holds
/// ~30 ms of the routers' work at full speed, so they never run dry
/// meanwhile; each wake-up takes a core from a router (a TCP reader
/// retrying every 500 µs woke 2,500 times in a 10M-event bench round, and
/// the daemon took 15% more CPU than at 5 ms).
pub const FULL_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

/// What a block says about its partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// Messages.
    Data,
    /// The partition was assigned to this consumer (a TCP connection was
    /// accepted): it holds the watermark back until it has data, goes idle
    /// or is done. A done partition assigned again starts afresh (a TCP
    /// source reuses the index of a closed connection).
    Assigned,
    /// The partition went to another consumer of the group.
    Revoked,
    /// No message for `idle_timeout`: the partition stops holding the
    /// watermark back until its next message.
    Idle,
    /// The partition was read to its end (`stop = "caught_up"`).
    Done,
    /// The source ended: every partition is done.
    End,
}

/// Messages of one partition (or a change of its state), in offset order.
#[derive(Debug)]
pub struct StreamBlock {
    pub seq: BlockSeq,
    /// Dense index of the partition in the source's [`Stream::parts`].
    pub part: u32,
    pub kind: BlockKind,
    /// Message payloads, back to back.
    pub data: Vec<u8>,
    /// End of each message in `data`.
    pub ends: Vec<u32>,
    /// Offset of each message.
    pub offsets: Vec<i64>,
}

impl StreamBlock {
    pub fn marker(part: u32, kind: BlockKind) -> StreamBlock {
        StreamBlock { seq: 0, part, kind, data: Vec::new(), ends: Vec::new(), offsets: Vec::new() }
    }

    /// What the watermark chain needs of the block, once it is parsed.
    pub fn meta(&self) -> BlockMeta {
        BlockMeta {
            seq: self.seq,
            part: self.part,
            kind: self.kind,
            next_offset: self.offsets.last().map(|o| o + 1),
            messages: self.ends.len() as u64,
        }
    }

    /// Message `i`'s payload.
    pub fn message(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.data[start..self.ends[i] as usize]
    }
}

/// A block as the watermark chain counts it.
#[derive(Clone, Copy, Debug)]
pub struct BlockMeta {
    pub seq: BlockSeq,
    pub part: u32,
    pub kind: BlockKind,
    /// The offset after the block's last message.
    pub next_offset: Option<i64>,
    pub messages: u64,
}

/// A partition of a stream source: topic and partition number.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PartId {
    pub topic: String,
    pub partition: i32,
}

impl std::fmt::Display for PartId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// A partition's part in the source watermark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartState {
    Active,
    Idle,
    Unassigned,
    Done,
}

/// A partition as the chain (and a checkpoint) knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartWm {
    pub id: PartId,
    /// Largest event time of its messages so far ([`NO_EVENTS`] if none).
    pub max_ts_ms: i64,
    pub state: PartState,
    /// Offset of the first message not yet counted (-1: none counted).
    pub next_offset: i64,
    /// Messages counted.
    pub messages: u64,
}

/// The watermark state of a stream source after its first `next_seq`
/// blocks: what a checkpoint saves of the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    pub next_seq: BlockSeq,
    pub parts: Vec<PartWm>,
    pub wm_ms: i64,
    /// The source ended (`End` counted): every window may be flushed.
    pub ended: bool,
}

/// How a block's events are judged, once it is its turn in the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Events before this are late.
    pub late_before_ms: i64,
    /// The source's watermark once the block is counted.
    pub wm_after_ms: i64,
    /// The largest event time of the block's partition before it
    /// (`i64::MIN`: none).
    pub before_max_ms: i64,
}

impl Default for Chain {
    /// A stream before its first block: no partition, no watermark.
    fn default() -> Chain {
        Chain { next_seq: 0, parts: Vec::new(), wm_ms: i64::MIN, ended: false }
    }
}

impl Chain {
    /// Counts a block whose latest event time is `ts_max` (`i64::MIN` if
    /// it has none) if it is the next; `None` if an earlier block is not
    /// counted yet. `ids` names the partitions by index.
    pub fn resolve(&mut self, b: &BlockMeta, ts_max: i64, delay_ms: i64, ids: &[PartId]) -> Option<Resolved> {
        if b.seq != self.next_seq {
            return None;
        }
        self.next_seq += 1;
        let (part, kind) = (b.part as usize, b.kind);
        while self.parts.len() <= part && self.parts.len() < ids.len() {
            let id = ids[self.parts.len()].clone();
            self.parts.push(PartWm {
                id,
                max_ts_ms: NO_EVENTS,
                state: PartState::Unassigned,
                next_offset: -1,
                messages: 0,
            });
        }
        let wm_before = self.wm_ms;
        let mut late_before_ms = wm_before;
        let mut before_max_ms = i64::MIN;
        if kind == BlockKind::End {
            self.ended = true;
            self.wm_ms = i64::MAX;
        } else if let Some(p) = self.parts.get_mut(part) {
            match kind {
                BlockKind::Data => {
                    late_before_ms = late_before_ms.max(to_wm(p.max_ts_ms, delay_ms));
                    if p.max_ts_ms != NO_EVENTS {
                        before_max_ms = p.max_ts_ms;
                    }
                    if ts_max != i64::MIN {
                        p.max_ts_ms = p.max_ts_ms.max(ts_max);
                    }
                    if let Some(o) = b.next_offset {
                        p.next_offset = o;
                    }
                    p.messages += b.messages;
                    p.state = PartState::Active;
                }
                BlockKind::Assigned if p.state == PartState::Done => {
                    let id = ids.get(part).cloned().unwrap_or_else(|| p.id.clone());
                    *p = PartWm { id, max_ts_ms: NO_EVENTS, state: PartState::Active, next_offset: -1, messages: 0 };
                }
                BlockKind::Assigned => p.state = PartState::Active,
                BlockKind::Idle if p.state == PartState::Active => p.state = PartState::Idle,
                BlockKind::Idle => {}
                BlockKind::Revoked => p.state = PartState::Unassigned,
                BlockKind::Done => p.state = PartState::Done,
                BlockKind::End => {}
            }
            let active = self.parts.iter().filter(|p| p.state == PartState::Active);
            let wm = match active.map(|p| to_wm(p.max_ts_ms, delay_ms)).min() {
                Some(wm) => wm,
                // None is active (all idle or done, e.g. traffic stopped for
                // the night): every event seen is in, so the windows they
                // fill may close.
                None => self
                    .parts
                    .iter()
                    .filter(|p| p.state != PartState::Unassigned)
                    .map(|p| to_wm(p.max_ts_ms, delay_ms))
                    .max()
                    .unwrap_or(i64::MIN),
            };
            self.wm_ms = self.wm_ms.max(wm);
        }
        Some(Resolved { late_before_ms, wm_after_ms: self.wm_ms, before_max_ms })
    }

    /// Where each partition stands: (partition, next offset), for those
    /// with messages counted.
    pub fn offsets(&self) -> Vec<(PartId, i64)> {
        self.parts.iter().filter(|p| p.next_offset >= 0).map(|p| (p.id.clone(), p.next_offset)).collect()
    }
}

/// A partition's watermark from its largest event time.
fn to_wm(max_ts_ms: i64, delay_ms: i64) -> i64 {
    if max_ts_ms == NO_EVENTS {
        i64::MIN
    } else {
        max_ts_ms - delay_ms
    }
}

/// What a router gets when it asks a stream for a block.
pub enum StreamClaim {
    Block(StreamBlock),
    /// Nothing queued now.
    Empty,
    /// A checkpoint is being cut.
    Paused,
    /// The source ended and every block was claimed.
    Exhausted,
}

struct Queue {
    blocks: VecDeque<StreamBlock>,
    /// The routers to wake when a block arrives (set when a run starts).
    wake: Option<Arc<Wake>>,
    /// Seq of the next block pushed.
    next_push: BlockSeq,
    /// Seq of the next block claimed.
    next_claim: BlockSeq,
    paused: bool,
    end_pushed: bool,
    /// Wakes a reader that found the queue full (see [`Stream::set_room_waker`]).
    room: Option<Arc<mio::Waker>>,
    /// A push found the queue full since the reader was last woken.
    full: bool,
}

/// One stream source's blocks between its readers and the routers, its
/// partition table and its watermark chain. Locks are taken per block,
/// never per event.
pub struct Stream {
    pub source: usize,
    pub delay_ms: i64,
    queue: Mutex<Queue>,
    chain: Mutex<Chain>,
    /// Partitions by dense index (only ever appended to).
    parts: Mutex<Vec<PartId>>,
    /// Buffers of parsed blocks, for readers to reuse.
    free: Mutex<Vec<StreamBlock>>,
    /// Payload bytes pushed.
    pub bytes: AtomicU64,
    /// Readers stop when this is set.
    pub stop: AtomicBool,
    /// Nothing will be claimed any more (the run's last checkpoint): readers
    /// drop what they would wait to push.
    pub draining: AtomicBool,
    created: std::time::Instant,
    /// Microseconds from `created` to the first partition assignment (0: none yet).
    assigned_after_us: AtomicU64,
    /// Set once every partition assigned (to every reader) was read to
    /// its end: `tally serve` is ready from then on.
    pub caught_up: AtomicBool,
    /// Whether the input can be read again from a checkpoint's positions
    /// (Kafka). If not (TCP), a stop lets the routers take every block the
    /// reader holds before the last checkpoint is cut: see `closing`.
    pub replayable: bool,
    /// Set at a stop: the reader takes no more input, pushes what it holds
    /// and then sets `closed`.
    pub closing: AtomicBool,
    pub closed: AtomicBool,
    /// `max_events_per_second`: readers take a token per record.
    pub throttle: Option<Throttle>,
    /// Messages are binary records back to back: the throttle counts each
    /// record, not each message.
    binary: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Stream {
    /// A stream at the start, or at a checkpoint's `chain`.
    pub fn new(source: usize, delay_ms: i64, chain: Option<Chain>) -> Stream {
        let chain = chain.unwrap_or_default();
        let seq = chain.next_seq;
        let parts = chain.parts.iter().map(|p| p.id.clone()).collect();
        Stream {
            source,
            delay_ms,
            queue: Mutex::new(Queue {
                blocks: VecDeque::new(),
                wake: None,
                next_push: seq,
                next_claim: seq,
                paused: false,
                end_pushed: chain.ended,
                room: None,
                full: false,
            }),
            chain: Mutex::new(chain),
            parts: Mutex::new(parts),
            free: Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            created: std::time::Instant::now(),
            assigned_after_us: AtomicU64::new(0),
            caught_up: AtomicBool::new(false),
            replayable: true,
            closing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            throttle: None,
            binary: false,
        }
    }

    /// A stream whose readers hand on at most `per_second` records a
    /// second, of records in `format`.
    pub fn throttled(mut self, per_second: Option<u64>, format: Format) -> Stream {
        self.throttle = per_second.map(Throttle::new);
        self.binary = format == Format::Binary;
        self
    }

    /// Records in a block as the throttle counts them, as routers do: a
    /// message each, or a binary message's whole records plus one for a
    /// truncated tail (one if it holds nothing).
    fn records(&self, block: &StreamBlock) -> u64 {
        if !self.binary {
            return block.ends.len() as u64;
        }
        (0..block.ends.len()).map(|i| block.message(i).len().div_ceil(BINARY_RECORD_BYTES).max(1) as u64).sum()
    }

    /// A stream whose input cannot be read again (see `replayable`).
    pub fn not_replayable(mut self) -> Stream {
        self.replayable = false;
        self
    }

    /// Blocks pushed and not claimed yet.
    pub fn queued(&self) -> usize {
        lock(&self.queue).blocks.len()
    }

    /// Notes the first partition assignment (for the run summary).
    pub fn assigned(&self) {
        let us = (self.created.elapsed().as_micros() as u64).max(1);
        let _ = self.assigned_after_us.compare_exchange(0, us, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Seconds from the stream's creation (the run's start) to its first
    /// partition assignment.
    pub fn assigned_after_seconds(&self) -> Option<f64> {
        let us = self.assigned_after_us.load(Ordering::Relaxed);
        (us > 0).then(|| us as f64 / 1e6)
    }

    /// The dense index of a partition, adding it if new.
    pub fn part_index(&self, id: &PartId) -> u32 {
        let mut parts = lock(&self.parts);
        match parts.iter().position(|p| p == id) {
            Some(i) => i as u32,
            None => {
                parts.push(id.clone());
                (parts.len() - 1) as u32
            }
        }
    }

    /// Gives a done partition's index to a new one (a TCP source's new
    /// connection); its `Assigned` block then starts it afresh.
    pub fn reuse_part(&self, part: u32, id: PartId) {
        if let Some(p) = lock(&self.parts).get_mut(part as usize) {
            *p = id;
        }
    }

    pub fn part_id(&self, part: u32) -> Option<PartId> {
        lock(&self.parts).get(part as usize).cloned()
    }

    /// Queues a block; gives it back if the queue is full.
    pub fn push(&self, mut block: StreamBlock) -> Result<(), StreamBlock> {
        let mut q = lock(&self.queue);
        if q.end_pushed {
            return Ok(());
        }
        if q.blocks.len() >= STREAM_QUEUE_BLOCKS && block.kind == BlockKind::Data {
            q.full = true;
            return Err(block);
        }
        block.seq = q.next_push;
        q.next_push += 1;
        q.end_pushed = block.kind == BlockKind::End;
        self.bytes.fetch_add(block.data.len() as u64, Ordering::Relaxed);
        q.blocks.push_back(block);
        let wake = q.wake.clone();
        drop(q);
        if let Some(w) = wake {
            w.all();
        }
        Ok(())
    }

    /// Has the routers wake `waker` once a queue that was full is half
    /// empty, so a reader polling for it (TCP) can sleep until then
    /// instead of retrying every [`FULL_QUEUE_WAIT`]: it then reads half a
    /// queue at a time, and the half left keeps the routers busy meanwhile.
    pub fn set_room_waker(&self, waker: Arc<mio::Waker>) {
        lock(&self.queue).room = Some(waker);
    }

    /// Wakes the run's workers whenever a block arrives from now on.
    pub fn set_wake(&self, wake: Arc<Wake>) {
        lock(&self.queue).wake = Some(wake);
    }

    /// Queues a block for a reader that may wait (Kafka, followed files):
    /// first for `max_events_per_second`, then while the routers are
    /// behind (which holds the reader's input back). Gives up on `stop`,
    /// or on `draining` (nothing will be claimed any more).
    pub fn push_waiting(&self, mut block: StreamBlock) {
        let gone = || self.stop.load(Ordering::Relaxed) || self.draining.load(Ordering::Relaxed);
        if let Some(t) = &self.throttle {
            let until = std::time::Instant::now() + t.take(self.records(&block));
            while std::time::Instant::now() < until && !gone() {
                let left = until.saturating_duration_since(std::time::Instant::now());
                std::thread::sleep(left.min(std::time::Duration::from_millis(10)));
            }
        }
        loop {
            match self.push(block) {
                Ok(()) => return,
                Err(_) if gone() => return,
                Err(b) => {
                    block = b;
                    std::thread::sleep(FULL_QUEUE_WAIT);
                }
            }
        }
    }

    /// The next block, in push order.
    pub fn claim(&self) -> StreamClaim {
        let mut q = lock(&self.queue);
        if q.paused {
            return StreamClaim::Paused;
        }
        match q.blocks.pop_front() {
            Some(b) => {
                debug_assert_eq!(b.seq, q.next_claim, "stream blocks are claimed in order");
                q.next_claim += 1;
                if q.full && q.blocks.len() <= STREAM_QUEUE_BLOCKS / 2 {
                    q.full = false;
                    if let Some(w) = q.room.clone() {
                        drop(q);
                        let _ = w.wake();
                    }
                }
                StreamClaim::Block(b)
            }
            None if q.end_pushed => StreamClaim::Exhausted,
            None => StreamClaim::Empty,
        }
    }

    /// Stops claims; returns the seq of the first block not claimed (the cut).
    pub fn pause(&self) -> BlockSeq {
        let mut q = lock(&self.queue);
        q.paused = true;
        q.next_claim
    }

    pub fn resume(&self) {
        lock(&self.queue).paused = false;
    }

    /// Whether every block of an ended source was claimed.
    pub fn exhausted(&self) -> bool {
        let q = lock(&self.queue);
        q.end_pushed && q.blocks.is_empty()
    }

    /// Counts a parsed block in the watermark chain (see [`Chain::resolve`]).
    pub fn resolve(&self, block: &BlockMeta, ts_max: i64) -> Option<Resolved> {
        let mut chain = lock(&self.chain);
        if block.seq != chain.next_seq {
            return None;
        }
        let ids = lock(&self.parts);
        chain.resolve(block, ts_max, self.delay_ms, &ids)
    }

    /// The source's watermark as of the blocks counted so far.
    pub fn watermark(&self) -> i64 {
        lock(&self.chain).wm_ms
    }

    /// The chain as it stands (at a cut: exactly the blocks before it).
    pub fn chain(&self) -> Chain {
        lock(&self.chain).clone()
    }

    /// A block's buffers, emptied, for a reader to fill again (a marker's
    /// are empty: it is dropped).
    pub fn recycle(&self, mut block: StreamBlock) {
        if block.data.capacity() == 0 {
            return;
        }
        block.data.clear();
        block.ends.clear();
        block.offsets.clear();
        let mut free = lock(&self.free);
        if free.len() < STREAM_FREE_BLOCKS {
            free.push(block);
        }
    }

    /// An empty data block for partition `part`, reusing buffers.
    pub fn fresh_block(&self, part: u32) -> StreamBlock {
        let mut b = lock(&self.free).pop().unwrap_or_else(|| StreamBlock::marker(part, BlockKind::Data));
        b.data.reserve_exact(STREAM_BLOCK_CAPACITY);
        b.part = part;
        b.kind = BlockKind::Data;
        b
    }
}

/// A stream's reader thread: told to stop and joined on [`ReaderThread::stop`]
/// or when dropped.
pub struct ReaderThread {
    stream: Arc<Stream>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReaderThread {
    pub fn new(stream: Arc<Stream>, thread: std::thread::JoinHandle<()>) -> ReaderThread {
        ReaderThread { stream, thread: Some(thread) }
    }

    pub fn stop(&mut self) {
        self.stream.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ReaderThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Calls `f` with the position of every `\n` in `data`, in order, until
/// it returns false. A reader cuts every line it receives: 64 bytes at a
/// time become a bit mask of their newlines, and each line costs a
/// `trailing_zeros`. (A `memchr` call per ~150-byte line took 6.4% of a TCP
/// daemon's samples; the reader's whole loop now takes 6.1%.)
#[inline]
pub fn for_each_newline(data: &[u8], mut f: impl FnMut(usize) -> bool) {
    let mut chunks = data.chunks_exact(64);
    let mut base = 0;
    for chunk in &mut chunks {
        let mut bits = newline_bits(chunk.try_into().expect("64-byte chunks"));
        while bits != 0 {
            if !f(base + bits.trailing_zeros() as usize) {
                return;
            }
            bits &= bits - 1;
        }
        base += 64;
    }
    for (i, _) in chunks.remainder().iter().enumerate().filter(|&(_, &b)| b == b'\n') {
        if !f(base + i) {
            return;
        }
    }
}

/// One bit per `\n` among 64 bytes, byte `i` at bit `i`.
#[inline]
fn newline_bits(chunk: &[u8; 64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8};
        let p = chunk.as_ptr();
        // SAFETY: SSE2 is part of x86-64; each unaligned 16-byte load lies
        // inside the 64-byte chunk.
        let quarter = |at: usize| unsafe {
            let v = _mm_loadu_si128(p.add(at).cast());
            u64::from(_mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\n' as i8))) as u16)
        };
        quarter(0) | quarter(16) << 16 | quarter(32) << 32 | quarter(48) << 48
    }
    #[cfg(not(target_arch = "x86_64"))]
    chunk.iter().enumerate().fold(0, |bits, (i, &b)| bits | u64::from(b == b'\n') << i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_are_found_at_every_position_and_the_scan_stops_when_told() {
        // Lengths around the 64-byte chunks and every newline position.
        for len in [0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 200] {
            for seed in 0..8u64 {
                let data: Vec<u8> = (0..len as u64)
                    .map(|i| {
                        if ((i * 0x9E37_79B9) ^ (seed * 0x85EB_CA6B)) % 7 == 0 {
                            b'\n'
                        } else {
                            b'a' + (i % 26) as u8
                        }
                    })
                    .collect();
                let want: Vec<usize> = (0..len).filter(|&i| data[i] == b'\n').collect();
                let mut got = Vec::new();
                for_each_newline(&data, |i| {
                    got.push(i);
                    true
                });
                assert_eq!(got, want, "len {len} seed {seed}");
                if let Some(&stop) = want.get(want.len() / 2) {
                    let mut seen = Vec::new();
                    for_each_newline(&data, |i| {
                        seen.push(i);
                        i != stop
                    });
                    assert_eq!(seen.last(), Some(&stop), "stops at the first false");
                }
            }
        }
        let mut all = Vec::new();
        for_each_newline(&[b'\n'; 130], |i| {
            all.push(i);
            true
        });
        assert_eq!(all, (0..130).collect::<Vec<_>>());
    }

    #[test]
    fn a_reader_that_found_the_queue_full_is_woken_once_half_of_it_is_claimed() {
        let stream = Stream::new(0, 0, None);
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(4);
        stream.set_room_waker(Arc::new(mio::Waker::new(poll.registry(), mio::Token(7)).unwrap()));
        let mut woken = |poll: &mut mio::Poll| {
            poll.poll(&mut events, Some(std::time::Duration::ZERO)).unwrap();
            events.iter().any(|e| e.token() == mio::Token(7))
        };
        for _ in 0..STREAM_QUEUE_BLOCKS {
            stream.push(StreamBlock::marker(0, BlockKind::Data)).expect("room");
        }
        let refused = stream.push(StreamBlock::marker(0, BlockKind::Data)).expect_err("the queue is full");
        for left in (STREAM_QUEUE_BLOCKS / 2 + 1..STREAM_QUEUE_BLOCKS).rev() {
            assert!(matches!(stream.claim(), StreamClaim::Block(_)));
            assert!(!woken(&mut poll), "woken with {left} blocks left");
        }
        assert!(matches!(stream.claim(), StreamClaim::Block(_)));
        assert!(woken(&mut poll), "not woken with half the queue claimed");
        // Once per full queue: the claims after that wake nobody.
        assert!(matches!(stream.claim(), StreamClaim::Block(_)));
        assert!(!woken(&mut poll));
        stream.push(refused).expect("room again");
    }

    #[test]
    fn blocks_of_a_full_queue_and_open_partitions_come_back_without_allocating() {
        let stream = Stream::new(0, 0, None);
        // A full queue, a block open on each of 8 connections, one per router.
        let n = STREAM_QUEUE_BLOCKS + 8 + 2;
        let blocks: Vec<StreamBlock> = (0..n).map(|i| stream.fresh_block(i as u32 % 8)).collect();
        assert!(blocks.iter().all(|b| b.data.capacity() >= STREAM_BLOCK_CAPACITY), "a reader never grows a new block");
        let buffers: std::collections::HashSet<*const u8> = blocks.iter().map(|b| b.data.as_ptr()).collect();
        for b in blocks {
            stream.recycle(b);
        }
        // A marker's empty buffers take no place among the kept ones.
        stream.recycle(StreamBlock::marker(0, BlockKind::Done));
        for i in 0..n {
            let b = stream.fresh_block(0);
            assert!(buffers.contains(&b.data.as_ptr()), "block {i} of {n} was allocated again");
            assert!(b.data.capacity() >= STREAM_BLOCK_CAPACITY);
        }
    }

    fn ids(n: i32) -> Vec<PartId> {
        (0..n).map(|partition| PartId { topic: "t".into(), partition }).collect()
    }

    #[test]
    fn a_pushed_block_wakes_the_parked_workers() {
        let (wake, parkers) = Wake::new(2);
        let stream = Stream::new(0, 0, None);
        stream.set_wake(Arc::new(wake));
        stream.push(StreamBlock::marker(0, BlockKind::Data)).expect("room in the queue");
        // Woken before it parks: each park returns at once, not after a minute.
        for p in &parkers {
            let t = std::time::Instant::now();
            p.park_timeout(std::time::Duration::from_secs(60));
            assert!(t.elapsed() < std::time::Duration::from_secs(30), "a push must wake every worker");
        }
    }

    #[test]
    fn the_throttle_counts_binary_records_not_messages() {
        let mut block = StreamBlock::marker(0, BlockKind::Data);
        for len in [3 * BINARY_RECORD_BYTES, BINARY_RECORD_BYTES, 5, 2 * BINARY_RECORD_BYTES + 7, 0] {
            block.data.extend(std::iter::repeat_n(0u8, len));
            block.ends.push(block.data.len() as u32);
            block.offsets.push(block.offsets.len() as i64);
        }
        let stream = |format| Stream::new(0, 0, None).throttled(Some(1000), format);
        assert_eq!(
            stream(Format::Binary).records(&block),
            3 + 1 + 1 + (2 + 1) + 1,
            "whole records, a truncated tail once, an empty message once"
        );
        assert_eq!(stream(Format::Jsonl).records(&block), 5, "a message per record");
    }

    #[test]
    fn source_watermark_is_the_minimum_over_active_partitions() {
        let ids = ids(2);
        let mut c = Chain::default();
        let meta = |seq, part, kind| BlockMeta { seq, part, kind, next_offset: Some(1), messages: 1 };
        let r = |c: &mut Chain, seq, part, kind, ts| c.resolve(&meta(seq, part, kind), ts, 10, &ids).unwrap();
        r(&mut c, 0, 0, BlockKind::Assigned, i64::MIN);
        r(&mut c, 1, 1, BlockKind::Assigned, i64::MIN);
        let a = r(&mut c, 2, 0, BlockKind::Data, 1000);
        assert_eq!(a.wm_after_ms, i64::MIN, "partition 1 has no data yet");
        let b = r(&mut c, 3, 1, BlockKind::Data, 500);
        assert_eq!(b.wm_after_ms, 490);
        // Late against its own partition's watermark, not the source's.
        let d = r(&mut c, 4, 0, BlockKind::Data, 1100);
        assert_eq!(d.late_before_ms, 990);
        assert_eq!(d.wm_after_ms, 490);
        // An idle partition stops holding the watermark back ...
        let e = r(&mut c, 5, 1, BlockKind::Idle, i64::MIN);
        assert_eq!(e.wm_after_ms, 1090);
        // ... and its events below the source's watermark are then late.
        let f = r(&mut c, 6, 1, BlockKind::Data, 600);
        assert_eq!(f.late_before_ms, 1090);
        assert_eq!(f.wm_after_ms, 1090, "the watermark never moves back");
        assert!(c.resolve(&meta(8, 0, BlockKind::Data), 1, 10, &ids).is_none(), "blocks count in order");
        let g = r(&mut c, 7, 0, BlockKind::End, i64::MIN);
        assert_eq!(g.wm_after_ms, i64::MAX);
        assert_eq!(c.offsets(), vec![(ids[0].clone(), 1), (ids[1].clone(), 1)]);
    }

    #[test]
    fn with_none_active_the_largest_counts_and_a_reused_index_starts_afresh() {
        let mut ids = ids(2);
        let mut c = Chain::default();
        let meta = |seq, part, kind| BlockMeta { seq, part, kind, next_offset: Some(1), messages: 1 };
        let mut seq = 0;
        let mut r = |c: &mut Chain, ids: &[PartId], part, kind, ts| {
            seq += 1;
            c.resolve(&meta(seq - 1, part, kind), ts, 10, ids).unwrap()
        };
        r(&mut c, &ids, 0, BlockKind::Assigned, i64::MIN);
        r(&mut c, &ids, 1, BlockKind::Assigned, i64::MIN);
        r(&mut c, &ids, 0, BlockKind::Data, 1000);
        assert_eq!(r(&mut c, &ids, 0, BlockKind::Done, i64::MIN).wm_after_ms, i64::MIN, "1 holds it back");
        // The last active one goes idle: everything seen is in.
        assert_eq!(r(&mut c, &ids, 1, BlockKind::Idle, i64::MIN).wm_after_ms, 990);
        // Index 0 goes to a new connection: its own watermark starts over,
        // and the source's never moves back.
        ids[0] = PartId { topic: "new".into(), partition: 9 };
        r(&mut c, &ids, 0, BlockKind::Assigned, i64::MIN);
        assert_eq!((c.parts[0].id.clone(), c.parts[0].max_ts_ms, c.parts[0].messages), (ids[0].clone(), NO_EVENTS, 0));
        let late = r(&mut c, &ids, 0, BlockKind::Data, 500);
        assert_eq!((late.late_before_ms, late.wm_after_ms), (990, 990));
    }

    #[test]
    fn claims_follow_push_order_and_stop_at_a_pause() {
        let s = Stream::new(0, 0, None);
        for part in 0..3 {
            s.push(StreamBlock::marker(part, BlockKind::Assigned)).unwrap();
        }
        assert!(matches!(s.claim(), StreamClaim::Block(b) if b.seq == 0));
        assert_eq!(s.pause(), 1);
        assert!(matches!(s.claim(), StreamClaim::Paused));
        s.resume();
        assert!(matches!(s.claim(), StreamClaim::Block(b) if b.seq == 1 && b.part == 1));
        s.push(StreamBlock::marker(0, BlockKind::End)).unwrap();
        assert!(matches!(s.claim(), StreamClaim::Block(b) if b.seq == 2));
        assert!(matches!(s.claim(), StreamClaim::Block(b) if b.kind == BlockKind::End));
        assert!(matches!(s.claim(), StreamClaim::Exhausted));
    }
}

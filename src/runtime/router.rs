//! Routers: parse the input blocks they claim, join dimensions, filter,
//! intern group keys, hash device ids and stage one batch per shard.
//!
//! Hot path: per event one parse, a probe per dimension the source uses
//! (a file or topic table as of the block's start, or a Redis dimension's
//! worker cache: an event whose key it lacks waits for the block's end,
//! when the missing keys are fetched at once and the waiting events parsed
//! again), one xxh3 of the device id, per metric a filter evaluation (once
//! per summary, for all its grouping sets), a key-cache probe and a
//! 16-byte record push (plus a summary's value fields, a DAU metric's
//! device id), and a JSON line per detail sink. Before a block's batches
//! leave, its detail lines go to the emitter, and the router learns the
//! source's watermark as of the previous block (published by whichever
//! router parsed it) and places late events by the metric's policy; so
//! lateness depends only on the input and the block size, never on thread
//! timing or the number of workers.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ahash::AHashMap;
use crossbeam::channel::Sender;

use super::mesh::{push_text, text_bytes, Batch, BlockSeq, Record, POOL_BATCHES, STAGED_BLOCKS_MAX};
use super::stats::{DimCount, Lateness, SourceStats};
use super::{Claim, Shared, ToEmitter, NOT_READY, NO_EVENTS};
use crate::dim::redis::{Lookup, RemoteRow};
use crate::dim::{key_text, DimTable};
use crate::event::binary::{self, BinaryRecord, BINARY_DIMS, BINARY_RECORD_BYTES};
use crate::event::csv::CsvParser;
use crate::event::jsonl::JsonlParser;
use crate::event::rows::RowsParser;
use crate::event::{EventBuf, FieldSet, Raw, Reject};
use crate::job::filter::{FieldValue, SlotFilter};
use crate::job::{EventsSpec, Format, LatePolicy, OnMissing};
use crate::metric::cumulate::{Geometry, Placement};
use crate::metric::keys::{write_json_str, write_json_value, KeyCache, KEY_BITS};
use crate::metric::values::{number, SUMMARY_VALUES_MAX};
use crate::source::file::{for_each_line, Block, BlockReader, Line, READS_IN_FLIGHT};
use crate::source::stream::{BlockMeta, StreamBlock, StreamClaim};

/// A metric as one source feeds it.
struct SourceMetric {
    metric: usize,
    /// A DAU metric: its records carry the device id text.
    text: bool,
    filter: Option<SlotFilter>,
    group_slots: Vec<usize>,
    /// A summary's value fields: its records carry them as numbers.
    value_slots: Vec<usize>,
    /// A grouping set after the first of its summary: same filter and
    /// values as the metric before it, so their results are reused.
    same_as_prev: bool,
    geo: Geometry,
}

/// A dimension a source's events are joined with.
struct Enrich {
    dim: usize,
    /// Slot of the event field joined on.
    key_slot: usize,
    /// (field of the dimension, slot it fills).
    targets: Vec<(usize, usize)>,
    drop: bool,
    /// The table as this router last took it, and its generation.
    table: Arc<DimTable>,
    generation: u64,
    /// A Redis dimension: this router's caches instead of the table.
    remote: Option<Lookup>,
    /// A Redis dimension: the current event's key fingerprint (none for
    /// a null key), hashed once for both of `enrich`'s passes.
    key_fp: Option<u64>,
    /// A table larger than the caches: its rows are prefetched a record
    /// ahead (see [`route_parsed`]).
    large: bool,
}

/// Index size from which a dimension's lookups are prefetched a record
/// ahead; smaller tables stay in the caches.
const LARGE_INDEX_BYTES: usize = 256 << 10;

impl Enrich {
    /// Takes `table` as the dimension's table from now on.
    fn take_table(&mut self, generation: u64, table: Arc<DimTable>) {
        self.large = self.remote.is_none() && table.index_bytes() >= LARGE_INDEX_BYTES;
        (self.generation, self.table) = (generation, table);
    }
}

/// A text record parsed but not yet routed. With a dimension table larger
/// than the caches, routing runs one record behind parsing: a record's
/// rows are prefetched as soon as it is parsed, and the DRAM miss of its
/// lookup overlaps parsing the next record instead of stalling the join.
struct Behind {
    ev: EventBuf,
    record: Vec<u8>,
    /// Whether `ev` holds a record to route.
    full: bool,
}

/// A dimension's row for one event.
enum Found<'a> {
    Table(&'a DimTable, u32),
    Remote(&'a RemoteRow),
}

/// What joining an event with its dimensions came to.
enum Join {
    Joined,
    /// A dimension with `on_missing = "drop"` lacks its key.
    Dropped,
    /// A Redis dimension's key is in no cache: the event waits for the
    /// block's fetch.
    Waiting,
}

/// Events rendered for a detail sink: JSON lines, and each line's device
/// id (a topic keys its messages by it).
#[derive(Default)]
pub(crate) struct EventLines {
    pub text: Vec<u8>,
    /// Where each line ends in `text`.
    pub ends: Vec<u32>,
    pub dids: Vec<u8>,
    pub did_ends: Vec<u32>,
}

impl EventLines {
    /// Line `i` (with its newline) and its device id.
    pub fn line(&self, i: usize) -> (&[u8], &[u8]) {
        let start = |ends: &[u32]| if i == 0 { 0 } else { ends[i - 1] as usize };
        (
            &self.text[start(&self.ends)..self.ends[i] as usize],
            &self.dids[start(&self.did_ends)..self.did_ends[i] as usize],
        )
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// How one detail sink renders a source's events.
struct EventOut {
    sink: usize,
    /// `{"source":"app","ts":`
    head: Vec<u8>,
    /// Per field: `,"name":` and the field's slot.
    fields: Vec<(Vec<u8>, usize)>,
    lines: EventLines,
}

impl EventOut {
    #[inline]
    fn render(&mut self, ev: &EventBuf, record: &[u8]) {
        let t = &mut self.lines.text;
        t.extend_from_slice(&self.head);
        t.extend_from_slice(itoa::Buffer::new().format(ev.ts_ms).as_bytes());
        t.extend_from_slice(b",\"did\":");
        let did = ev.did_bytes(record);
        write_json_str(did, t);
        for (name, slot) in &self.fields {
            t.extend_from_slice(name);
            write_json_value(ev.value(record, *slot), t);
        }
        t.extend_from_slice(b"}\n");
        self.lines.ends.push(t.len() as u32);
        self.lines.dids.extend_from_slice(did);
        self.lines.did_ends.push(self.lines.dids.len() as u32);
    }
}

/// Events of the current block waiting for a Redis dimension's fetch, as
/// their record bytes (a line, or a binary record) to parse again.
#[derive(Default)]
struct Waiting {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

/// The parser a block's waiting events go through again.
#[derive(Clone, Copy)]
enum Reparse {
    Jsonl,
    Rows,
    /// A CSV file's parser (by file index).
    Csv(usize),
    /// A stream source's CSV parser.
    CsvStream,
    Binary,
}

/// A source's parsing state in one router.
struct SourceRt {
    format: Format,
    fields: FieldSet,
    jsonl: JsonlParser,
    rows: RowsParser,
    /// CSV parsers by file index (each file has its own header).
    csv: AHashMap<usize, CsvParser>,
    /// A stream source's CSV parser (columns from the job).
    csv_stream: Option<CsvParser>,
    binary_slots: [Option<usize>; BINARY_DIMS],
    ev: EventBuf,
    enrich: Vec<Enrich>,
    /// Whether a dimension of `enrich` is a Redis one.
    remote: bool,
    /// With a large table in `enrich`, the text record routed next.
    behind: Behind,
    waiting: Waiting,
    /// The detail sinks that take this source's events.
    events: Vec<EventOut>,
    metrics: Vec<SourceMetric>,
    delay_ms: i64,
    max_line_bytes: usize,
}

impl SourceRt {
    /// The events rendered for detail sinks since the last call.
    fn take_events(&mut self) -> Vec<(usize, EventLines)> {
        self.events.iter_mut().filter(|o| !o.lines.is_empty()).map(|o| (o.sink, std::mem::take(&mut o.lines))).collect()
    }
}

/// Where a staged block came from.
enum Origin {
    /// A file block (index into the plan's tasks).
    File(usize),
    /// A stream source's block.
    Stream { source: usize, meta: BlockMeta },
}

/// A parsed block whose batches have not all left yet.
struct Staged {
    origin: Origin,
    batches: Vec<Option<Batch>>,
    /// The block's events for detail sinks (by sink index), sent to the
    /// emitter before any of its batches leaves.
    events: Vec<(usize, EventLines)>,
    ts_min: i64,
    ts_max: i64,
    /// Each routed event's time, in the order read (for [`Lateness`]).
    times: Vec<i64>,
    resolved: bool,
}

pub struct Router {
    w: usize,
    /// Blocks this router claimed whose reads are queued, in claim order.
    claimed: usize,
    /// No file block is left to claim.
    exhausted: bool,
    /// Stream sources (by source index) that still have blocks to claim.
    streams_open: Vec<usize>,
    /// Stream to ask first next time (round robin).
    next_stream: usize,
    reader: BlockReader,
    sources: Vec<SourceRt>,
    keys: KeyCache,
    /// To the emitter: detail sinks' events.
    tx: Sender<ToEmitter>,
    /// Parsed blocks, oldest first, waiting for their watermark or for queue room.
    staged: VecDeque<Staged>,
    /// One empty batch per shard, acquired before a block is parsed.
    ready: Vec<Option<Batch>>,
    allocated: Vec<usize>,
    /// `Staged::times` vectors to reuse.
    spare_times: Vec<Vec<i64>>,
    pub stats: Vec<SourceStats>,
}

impl Router {
    pub fn new(w: usize, sh: &Shared, tx: Sender<ToEmitter>) -> Router {
        let n = sh.mesh.n;
        let sources = (0..sh.job.sources.len()).map(|s| source_rt(s, sh)).collect();
        Router {
            w,
            claimed: 0,
            exhausted: false,
            streams_open: (0..sh.streams.len()).filter(|&s| sh.streams[s].is_some()).collect(),
            next_stream: 0,
            reader: BlockReader::new(sh.plan.clone()),
            sources,
            keys: KeyCache::new(sh.job.metrics.len()),
            tx,
            staged: VecDeque::new(),
            ready: (0..n).map(|_| None).collect(),
            allocated: vec![0; n],
            spare_times: Vec::new(),
            stats: sh
                .job
                .sources
                .iter()
                .map(|_| SourceStats { dims: vec![DimCount::default(); sh.dims.len()], ..SourceStats::default() })
                .collect(),
        }
    }

    pub fn done(&self) -> bool {
        self.staged.is_empty() && self.exhausted && self.claimed == 0 && self.streams_open.is_empty()
    }

    /// Nothing claimed is left unsent (the state of a checkpoint's cut).
    pub fn idle(&self) -> bool {
        self.staged.is_empty() && self.claimed == 0
    }

    /// Whether reads this router queued are still to complete.
    pub fn reading(&self) -> bool {
        self.claimed > 0
    }

    pub fn uses_io_uring(&self) -> bool {
        self.reader.uses_io_uring()
    }

    /// Does one piece of work if one can be done without waiting; returns
    /// whether anything moved.
    pub fn step(&mut self, sh: &Shared) -> io::Result<bool> {
        let moved = self.push_staged(sh);
        if self.staged.len() >= STAGED_BLOCKS_MAX {
            return Ok(moved);
        }
        // Blocks are claimed in order from one counter: a router that runs
        // faster (its core less busy) simply takes more of them.
        while !self.exhausted && self.reader.in_flight() < READS_IN_FLIGHT {
            match sh.claim() {
                Claim::Task(task) => {
                    self.reader.submit(task)?;
                    self.claimed += 1;
                }
                Claim::Paused => break,
                Claim::Exhausted => self.exhausted = true,
            }
        }
        if !self.acquire_batches(sh) {
            return Ok(moved);
        }
        if self.claimed > 0 {
            if let Some(block) = self.reader.poll(false) {
                self.claimed -= 1;
                self.parse(sh, block?)?;
                self.push_staged(sh);
                return Ok(true);
            }
        }
        if let Some((source, block)) = self.claim_stream(sh) {
            self.parse_stream(sh, source, block)?;
            self.push_staged(sh);
            return Ok(true);
        }
        Ok(moved)
    }

    /// The next block of a stream source that has one, taking the sources
    /// in turn.
    fn claim_stream(&mut self, sh: &Shared) -> Option<(usize, StreamBlock)> {
        let n = self.streams_open.len();
        for k in 0..n {
            let i = (self.next_stream + k) % n;
            let Some(stream) = &sh.streams[self.streams_open[i]] else { continue };
            match stream.claim() {
                StreamClaim::Block(b) => {
                    self.next_stream = i + 1;
                    return Some((stream.source, b));
                }
                StreamClaim::Exhausted => {
                    self.streams_open.remove(i);
                    return None;
                }
                StreamClaim::Empty | StreamClaim::Paused => {}
            }
        }
        None
    }

    /// Parses a stream block: each message is one record (JSON or CSV
    /// text), or whole binary records.
    fn parse_stream(&mut self, sh: &Shared, source: usize, block: StreamBlock) -> io::Result<()> {
        let mut batches: Vec<Option<Batch>> = self.ready.iter_mut().map(Option::take).collect();
        let mut acc =
            Accumulator { ts_min: i64::MAX, ts_max: i64::MIN, times: self.spare_times.pop().unwrap_or_default() };
        let src = &mut self.sources[source];
        refresh_dims(src, sh);
        let stats = &mut self.stats[source];
        let mark = stats.mark();
        let keys = &mut self.keys;
        let mut records = 0u64;
        for i in 0..block.ends.len() {
            let msg = block.message(i);
            let offset = block.offsets[i];
            if src.format == Format::Binary {
                let whole = msg.len() / BINARY_RECORD_BYTES * BINARY_RECORD_BYTES;
                for chunk in msg[..whole].chunks_exact(BINARY_RECORD_BYTES) {
                    records += 1;
                    let rec: BinaryRecord = bytemuck::pod_read_unaligned(chunk);
                    match binary::decode(&rec, &src.binary_slots, &mut src.ev) {
                        Ok(()) => {
                            route(src, keys, sh, chunk, &mut batches, &mut acc, &mut stats.dims)?;
                            stats.events += 1;
                        }
                        Err(reason) => stats.reject_message(reason, block.part, offset, &[]),
                    }
                }
                if whole < msg.len() || msg.is_empty() {
                    records += 1;
                    stats.reject_message(Reject::TruncatedRecord, block.part, offset, &[]);
                }
                continue;
            }
            records += 1;
            let text = trim_eol(msg);
            let parsed = if text.len() > src.max_line_bytes {
                Err(Reject::LineTooLong)
            } else if src.format == Format::Csv {
                src.csv_stream.as_mut().map_or(Err(Reject::InvalidCsv), |p| p.parse(text, &mut src.ev))
            } else if src.format == Format::Rows {
                src.rows.parse(text, &mut src.ev)
            } else {
                src.jsonl.parse(text, &mut src.ev)
            };
            match parsed {
                Ok(()) => {
                    route_parsed(src, keys, sh, text, &mut batches, &mut acc, &mut stats.dims)?;
                    stats.events += 1;
                }
                Err(reason) => {
                    let snippet = if reason == Reject::LineTooLong { &[][..] } else { text };
                    stats.reject_message(reason, block.part, offset, snippet);
                }
            }
        }
        route_behind(src, keys, sh, &mut batches, &mut acc, &mut stats.dims)?;
        let how = match src.format {
            Format::Binary => Reparse::Binary,
            Format::Csv => Reparse::CsvStream,
            Format::Jsonl => Reparse::Jsonl,
            Format::Rows => Reparse::Rows,
        };
        join_waiting(src, keys, sh, &mut batches, &mut acc, stats, how)?;
        stats.lines += records;
        sh.counts[source].publish(&mark, stats);
        let meta = block.meta();
        if let Some(stream) = &sh.streams[source] {
            stream.recycle(block);
        }
        self.staged.push_back(Staged {
            origin: Origin::Stream { source, meta },
            batches,
            events: src.take_events(),
            ts_min: acc.ts_min,
            ts_max: acc.ts_max,
            times: acc.times,
            resolved: false,
        });
        Ok(())
    }

    /// Takes one empty batch per shard; false if a pool is exhausted.
    fn acquire_batches(&mut self, sh: &Shared) -> bool {
        for s in 0..sh.mesh.n {
            if self.ready[s].is_some() {
                continue;
            }
            self.ready[s] = sh.mesh.reuse(self.w, s).or_else(|| {
                (self.allocated[s] < POOL_BATCHES).then(|| {
                    self.allocated[s] += 1;
                    Batch::default()
                })
            });
            if self.ready[s].is_none() {
                return false;
            }
        }
        true
    }

    fn parse(&mut self, sh: &Shared, mut block: Block) -> io::Result<()> {
        let task = sh.plan.tasks[block.task];
        let mut batches: Vec<Option<Batch>> = self.ready.iter_mut().map(Option::take).collect();
        let mut acc =
            Accumulator { ts_min: i64::MAX, ts_max: i64::MIN, times: self.spare_times.pop().unwrap_or_default() };
        let src = &mut self.sources[task.source];
        refresh_dims(src, sh);
        let stats = &mut self.stats[task.source];
        let mark = stats.mark();
        let keys = &mut self.keys;
        let lines = match src.format {
            Format::Binary => parse_binary(src, keys, sh, &block.data, block.task, &mut batches, &mut acc, stats)?,
            Format::Jsonl | Format::Csv | Format::Rows => {
                let file = &sh.plan.files[task.file];
                let is_csv = src.format == Format::Csv;
                let is_rows = src.format == Format::Rows;
                if is_csv && !src.csv.contains_key(&task.file) {
                    let header = file.csv_header.clone().unwrap_or_default();
                    src.csv.insert(task.file, CsvParser::new(&src.fields, &header));
                }
                let max_line = src.max_line_bytes;
                let task_id = block.task;
                let mut err = None;
                let n = for_each_line(&mut block, &task, file, max_line, |idx, line| {
                    if is_csv && task.lo == 0 && idx == 0 {
                        return; // the header
                    }
                    let r = match line {
                        Line::TooLong => Err(Reject::LineTooLong),
                        Line::Text(text) => {
                            let parsed = if is_csv {
                                match src.csv.get_mut(&task.file) {
                                    Some(p) => p.parse(text, &mut src.ev),
                                    None => Err(Reject::InvalidCsv),
                                }
                            } else if is_rows {
                                src.rows.parse(text, &mut src.ev)
                            } else {
                                src.jsonl.parse(text, &mut src.ev)
                            };
                            parsed.map(|()| text)
                        }
                    };
                    match r {
                        Ok(text) => {
                            if let Err(e) = route_parsed(src, keys, sh, text, &mut batches, &mut acc, &mut stats.dims) {
                                err.get_or_insert(e);
                            }
                            stats.events += 1;
                        }
                        Err(reason) => {
                            let snippet = match line {
                                Line::Text(t) => t,
                                Line::TooLong => &[],
                            };
                            stats.reject(reason, task_id, idx, snippet);
                        }
                    }
                })?;
                if let Some(e) = err {
                    return Err(e);
                }
                route_behind(src, keys, sh, &mut batches, &mut acc, &mut stats.dims)?;
                let how = match src.format {
                    Format::Csv => Reparse::Csv(task.file),
                    Format::Rows => Reparse::Rows,
                    _ => Reparse::Jsonl,
                };
                join_waiting(src, keys, sh, &mut batches, &mut acc, stats, how)?;
                n
            }
        };
        sh.line_counts[block.task].store(lines, Ordering::Relaxed);
        stats.lines += lines as u64;
        sh.counts[task.source].publish(&mark, stats);
        let task_id = block.task;
        self.reader.recycle(block);
        self.staged.push_back(Staged {
            origin: Origin::File(task_id),
            batches,
            events: src.take_events(),
            ts_min: acc.ts_min,
            ts_max: acc.ts_max,
            times: acc.times,
            resolved: false,
        });
        Ok(())
    }

    /// Resolves lateness of the oldest staged blocks (once the previous
    /// block's watermark is known) and sends what the queues take, in order.
    /// Returns whether anything moved.
    fn push_staged(&mut self, sh: &Shared) -> bool {
        // Every staged block, not only the oldest: a block waiting for its
        // predecessor (on another router, maybe behind a block that waits
        // for one of ours) must not hold back the blocks staged after it.
        // Shards take a source's blocks in any order.
        let mut moved = false;
        let mut resolved = false;
        let mut i = 0;
        while i < self.staged.len() {
            let st = &mut self.staged[i];
            if !st.resolved {
                if !resolve(st, sh, &self.sources, &mut self.stats) {
                    i += 1;
                    continue;
                }
                moved = true;
                resolved = true;
                let mut times = std::mem::take(&mut st.times);
                times.clear();
                self.spare_times.push(times);
                // Before any batch: a cut the shards reach after this
                // block finds its events at the emitter.
                for (sink, lines) in st.events.drain(..) {
                    let _ = self.tx.send(ToEmitter::Events { sink, lines });
                }
            }
            for (s, slot) in st.batches.iter_mut().enumerate() {
                if let Some(b) = slot.take() {
                    match sh.mesh.send(self.w, s, b) {
                        Ok(()) => {
                            moved = true;
                            if s != self.w {
                                sh.wake.one(s);
                            }
                        }
                        Err(b) => *slot = Some(b),
                    }
                }
            }
            if st.batches.iter().any(Option::is_some) {
                i += 1;
            } else {
                self.staged.remove(i);
            }
        }
        if resolved {
            // The next blocks of these sources may wait on another router.
            sh.wake.others(self.w);
        }
        moved
    }
}

/// Publishes a block's event-time prefix and places its late events, once
/// the previous block of its source has published; false if not yet.
fn resolve(st: &mut Staged, sh: &Shared, sources: &[SourceRt], stats: &mut [SourceStats]) -> bool {
    let task = match st.origin {
        Origin::File(task) => task,
        Origin::Stream { source, meta } => return resolve_stream(st, sh, source, &meta, stats),
    };
    let task = sh.plan.tasks[task];
    let prefix = &sh.prefix[task.source];
    let prev = if task.seq == 0 { NO_EVENTS } else { prefix[task.seq as usize - 1].load(Ordering::Acquire) };
    if prev == NOT_READY {
        return false;
    }
    let mine = if st.ts_max == i64::MIN { prev } else { prev.max(st.ts_max) };
    prefix[task.seq as usize].store(mine, Ordering::Release);
    count_lateness(&st.times, if prev == NO_EVENTS { i64::MIN } else { prev }, sh, task.source, stats);
    let delay_ms = sources[task.source].delay_ms;
    let wm_before = to_wm(prev, delay_ms);
    let wm_after = to_wm(mine, delay_ms);
    if st.ts_min < wm_before {
        place_late(&mut st.batches, wm_before, sh, task.source, &mut stats[task.source]);
    }
    for b in st.batches.iter_mut().flatten() {
        b.source = task.source;
        b.seq = BlockSeq::from(task.seq);
        b.wm_ms = wm_after;
        b.wm_before_ms = wm_before;
    }
    st.resolved = true;
    true
}

/// A stream block's [`resolve`]: its partition's and source's watermark
/// come from the stream's chain.
fn resolve_stream(st: &mut Staged, sh: &Shared, source: usize, meta: &BlockMeta, stats: &mut [SourceStats]) -> bool {
    let Some(stream) = &sh.streams[source] else {
        return false;
    };
    let Some(r) = stream.resolve(meta, st.ts_max) else {
        return false;
    };
    count_lateness(&st.times, r.before_max_ms, sh, source, stats);
    if st.ts_min < r.late_before_ms {
        place_late(&mut st.batches, r.late_before_ms, sh, source, &mut stats[source]);
    }
    for b in st.batches.iter_mut().flatten() {
        b.source = source;
        b.seq = meta.seq;
        b.wm_ms = r.wm_after_ms;
        b.wm_before_ms = r.late_before_ms;
    }
    st.resolved = true;
    true
}

/// Counts a resolved block's events in its source's lateness histogram,
/// `before` being the largest event time of its input before it.
fn count_lateness(times: &[i64], before: i64, sh: &Shared, source: usize, stats: &mut [SourceStats]) {
    if times.is_empty() {
        return;
    }
    let mut l = Lateness::default();
    l.add_block(before, times);
    stats[source].lateness.merge(&l);
    sh.counts[source].publish_lateness(&l);
}

/// A message without its line end, if it has one.
#[inline]
fn trim_eol(msg: &[u8]) -> &[u8] {
    let msg = msg.strip_suffix(b"\n").unwrap_or(msg);
    msg.strip_suffix(b"\r").unwrap_or(msg)
}

/// A source's watermark from the largest event time seen so far.
#[inline]
fn to_wm(prefix_max: i64, delay_ms: i64) -> i64 {
    if prefix_max == NO_EVENTS {
        i64::MIN
    } else {
        prefix_max - delay_ms
    }
}

/// Applies each record's metric late policy against `wm_ms`.
fn place_late(batches: &mut [Option<Batch>], wm_ms: i64, sh: &Shared, source: usize, stats: &mut SourceStats) {
    let before = (stats.late_folded, stats.late_dropped);
    for b in batches.iter_mut().flatten() {
        // A DAU record's text and a summary record's values go (or stay)
        // with it: compacted in place.
        let texts = &mut b.texts;
        let (mut read, mut write) = (0, 0);
        let vals = &mut b.vals;
        let (mut vread, mut vwrite) = (0, 0);
        b.records.retain_mut(|r| {
            let m = (r.key >> KEY_BITS) as usize;
            let late: LatePolicy = sh.job.metrics[m].late;
            let keep = match sh.geometry[m].place(r.slice, wm_ms, late) {
                Placement::OnTime => true,
                Placement::Folded(target) => {
                    r.slice = target;
                    stats.late_folded += 1;
                    true
                }
                Placement::Dropped => {
                    stats.late_dropped += 1;
                    false
                }
            };
            if sh.job.metrics[m].dau.is_some() {
                let n = text_bytes(texts, read);
                if keep {
                    texts.copy_within(read..read + n, write);
                    write += n;
                }
                read += n;
            }
            let nv = sh.job.metrics[m].value_fields().len();
            if keep {
                vals.copy_within(vread..vread + nv, vwrite);
                vwrite += nv;
            }
            vread += nv;
            keep
        });
        texts.truncate(write);
        vals.truncate(vwrite);
    }
    let live = &sh.counts[source];
    live.late_folded.fetch_add(stats.late_folded - before.0, Ordering::Relaxed);
    live.late_dropped.fetch_add(stats.late_dropped - before.1, Ordering::Relaxed);
}

struct Accumulator {
    ts_min: i64,
    ts_max: i64,
    times: Vec<i64>,
}

/// Takes the tables of a source's dimensions that were reloaded since.
fn refresh_dims(src: &mut SourceRt, sh: &Shared) {
    for e in &mut src.enrich {
        if let Some(l) = &mut e.remote {
            l.tick();
        } else if sh.dims[e.dim].generation() != e.generation {
            let (generation, table) = sh.dims[e.dim].current();
            e.take_table(generation, table);
        }
    }
}

/// Routes the text record just parsed into `src.ev` from `record`, or,
/// with a lookahead, prefetches its dimension rows and routes the record
/// parsed before it (the last one of a block goes by [`route_behind`]).
#[inline]
#[allow(clippy::too_many_arguments)]
fn route_parsed(
    src: &mut SourceRt,
    keys: &mut KeyCache,
    sh: &Shared,
    record: &[u8],
    batches: &mut [Option<Batch>],
    acc: &mut Accumulator,
    dim_counts: &mut [DimCount],
) -> io::Result<()> {
    let mut large = false;
    for e in src.enrich.iter().filter(|e| e.large) {
        large = true;
        let mut buf = [0u8; 32];
        if let Some(key) = key_text(src.ev.value(record, e.key_slot), &mut buf) {
            e.table.prefetch(key);
        }
    }
    if !large {
        return route(src, keys, sh, record, batches, acc, dim_counts);
    }
    std::mem::swap(&mut src.ev, &mut src.behind.ev);
    let mut before = std::mem::take(&mut src.behind.record);
    let routed = if src.behind.full { route(src, keys, sh, &before, batches, acc, dim_counts) } else { Ok(()) };
    before.clear();
    before.extend_from_slice(record);
    src.behind.record = before;
    src.behind.full = true;
    routed
}

/// Routes the record [`route_parsed`] holds back, if any: at the end of
/// every block, so that each record goes out with its own block.
fn route_behind(
    src: &mut SourceRt,
    keys: &mut KeyCache,
    sh: &Shared,
    batches: &mut [Option<Batch>],
    acc: &mut Accumulator,
    dim_counts: &mut [DimCount],
) -> io::Result<()> {
    if !std::mem::take(&mut src.behind.full) {
        return Ok(());
    }
    std::mem::swap(&mut src.ev, &mut src.behind.ev);
    let record = std::mem::take(&mut src.behind.record);
    let routed = route(src, keys, sh, &record, batches, acc, dim_counts);
    src.behind.record = record;
    routed
}

/// Fetches the keys a block's waiting events need from Redis and routes
/// the events (parsed again: they parsed before, so they parse now).
#[allow(clippy::too_many_arguments)]
fn join_waiting(
    src: &mut SourceRt,
    keys: &mut KeyCache,
    sh: &Shared,
    batches: &mut [Option<Batch>],
    acc: &mut Accumulator,
    stats: &mut SourceStats,
    how: Reparse,
) -> io::Result<()> {
    // Routing a waiting event again cannot make it wait (its keys were
    // answered), but should a key expire in between it just waits again.
    while !src.waiting.ends.is_empty() {
        for e in &mut src.enrich {
            if let Some(l) = e.remote.as_mut().filter(|l| l.waiting()) {
                l.fetch(&sh.abort, &mut stats.dims[e.dim])?;
            }
        }
        let waiting = std::mem::take(&mut src.waiting);
        let mut start = 0;
        for &end in &waiting.ends {
            let record = &waiting.bytes[start..end];
            start = end;
            let parsed = match how {
                Reparse::Jsonl => src.jsonl.parse(record, &mut src.ev),
                Reparse::Rows => src.rows.parse(record, &mut src.ev),
                Reparse::Csv(file) => {
                    src.csv.get_mut(&file).map_or(Err(Reject::InvalidCsv), |p| p.parse(record, &mut src.ev))
                }
                Reparse::CsvStream => {
                    src.csv_stream.as_mut().map_or(Err(Reject::InvalidCsv), |p| p.parse(record, &mut src.ev))
                }
                Reparse::Binary => {
                    let rec: BinaryRecord = bytemuck::pod_read_unaligned(record);
                    binary::decode(&rec, &src.binary_slots, &mut src.ev)
                }
            };
            if parsed.is_ok() {
                route(src, keys, sh, record, batches, acc, &mut stats.dims)?;
            }
        }
        for l in src.enrich.iter_mut().filter_map(|e| e.remote.as_mut()) {
            l.end_block();
        }
        if src.waiting.ends.is_empty() {
            let mut reuse = waiting;
            reuse.bytes.clear();
            reuse.ends.clear();
            src.waiting = reuse;
        }
    }
    Ok(())
}

/// Joins a parsed event with its source's dimensions: fills the slots of
/// the enriched fields (`null` where the table lacks the key). An event
/// whose key a Redis dimension's caches lack waits (all such keys of the
/// event noted for the block's fetch) and is joined when routed again.
#[inline]
fn enrich(src: &mut SourceRt, record: &[u8], counts: &mut [DimCount]) -> Join {
    let SourceRt { enrich, ev, remote, .. } = src;
    if *remote {
        // Bit d: the key of the event's d-th dimension is in no cache.
        let mut misses = 0u64;
        for (d, e) in enrich.iter_mut().enumerate() {
            let Some(l) = &mut e.remote else { continue };
            let mut buf = [0u8; 32];
            e.key_fp = key_text(ev.value(record, e.key_slot), &mut buf).map(xxhash_rust::xxh3::xxh3_64);
            let ready = e.key_fp.is_none_or(|fp| l.ready(fp, &mut counts[e.dim]));
            misses |= u64::from(!ready) << d.min(63);
        }
        if misses != 0 {
            // Every key of the event waits, also those cached now: the
            // block's fetch may evict them before the event comes back.
            for (d, e) in enrich.iter_mut().enumerate() {
                let Some(l) = &mut e.remote else { continue };
                let mut buf = [0u8; 32];
                if let (Some(fp), Some(k)) = (e.key_fp, key_text(ev.value(record, e.key_slot), &mut buf)) {
                    l.want(fp, k);
                }
                counts[e.dim].waited += misses >> d.min(63) & 1;
            }
            return Join::Waiting;
        }
    }
    for e in enrich.iter() {
        let c = &mut counts[e.dim];
        c.lookups += 1;
        let found = match &e.remote {
            None => {
                let mut buf = [0u8; 32];
                let key = key_text(ev.value(record, e.key_slot), &mut buf);
                key.and_then(|k| e.table.lookup(k)).map(|row| Found::Table(&e.table, row))
            }
            // The key as hashed above.
            Some(l) => e.key_fp.and_then(|fp| l.get(fp)).filter(|r| r.found()).map(Found::Remote),
        };
        let Some(found) = found else {
            c.missing += 1;
            if e.drop {
                c.dropped += 1;
                return Join::Dropped;
            }
            for &(_, slot) in &e.targets {
                ev.values[slot] = Raw::Null;
            }
            continue;
        };
        for &(f, slot) in &e.targets {
            let v = match found {
                Found::Table(t, row) => t.value(row, f),
                Found::Remote(r) => r.value(f),
            };
            ev.values[slot] = match v {
                FieldValue::Null => Raw::Null,
                FieldValue::Int(i) => Raw::Int(i),
                FieldValue::Float(x) => Raw::Float(x),
                FieldValue::Str(s) => ev.push_scratch(s),
            };
        }
    }
    Join::Joined
}

/// Sends one parsed event to its shard, once per metric it passes.
#[inline]
#[allow(clippy::too_many_arguments)]
fn route(
    src: &mut SourceRt,
    keys: &mut KeyCache,
    sh: &Shared,
    record: &[u8],
    batches: &mut [Option<Batch>],
    acc: &mut Accumulator,
    dim_counts: &mut [DimCount],
) -> io::Result<()> {
    if !src.enrich.is_empty() {
        match enrich(src, record, dim_counts) {
            Join::Joined => {}
            Join::Dropped => return Ok(()),
            Join::Waiting => {
                src.waiting.bytes.extend_from_slice(record);
                src.waiting.ends.push(src.waiting.bytes.len());
                return Ok(());
            }
        }
    }
    for out in &mut src.events {
        out.render(&src.ev, record);
    }
    let ev = &src.ev;
    let ts = ev.ts_ms;
    acc.ts_min = acc.ts_min.min(ts);
    acc.ts_max = acc.ts_max.max(ts);
    acc.times.push(ts);
    let device_fp = xxhash_rust::xxh3::xxh3_64(ev.did_bytes(record));
    let shard = ((device_fp as u128 * batches.len() as u128) >> 64) as usize;
    // A summary's filter, values and slice, evaluated once for all its
    // sets (they share its window).
    let mut passes = true;
    let mut nums = [0f64; SUMMARY_VALUES_MAX];
    let mut slice = 0;
    for sm in &mut src.metrics {
        if !sm.same_as_prev {
            passes = sm.filter.as_mut().is_none_or(|f| f.passes(&|slot: &usize| ev.value(record, *slot)));
            if passes {
                for (n, &slot) in nums.iter_mut().zip(&sm.value_slots) {
                    *n = number(ev.value(record, slot));
                }
                slice = sm.geo.slice_of(ts);
            }
        }
        if !passes {
            continue;
        }
        let m = sm.metric;
        let values = sm.group_slots.iter().map(|&s| ev.value(record, s));
        let key = keys
            .id(m, &sh.dicts[m], &sh.job.metrics[m].group_by, values)
            .map_err(|e| io::Error::other(format!("metric {:?}: {e}", sh.job.metrics[m].name)))?;
        debug_assert_eq!(slice, sm.geo.slice_of(ts), "a summary's sets share its window");
        if let Some(b) = &mut batches[shard] {
            b.records.push(Record { device_fp, key: (m as u32) << KEY_BITS | key, slice });
            if sm.text {
                push_text(&mut b.texts, ev.did_bytes(record));
            }
            b.vals.extend_from_slice(&nums[..sm.value_slots.len()]);
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn parse_binary(
    src: &mut SourceRt,
    keys: &mut KeyCache,
    sh: &Shared,
    data: &[u8],
    task: usize,
    batches: &mut [Option<Batch>],
    acc: &mut Accumulator,
    stats: &mut SourceStats,
) -> io::Result<u32> {
    let whole = data.len() / BINARY_RECORD_BYTES * BINARY_RECORD_BYTES;
    let mut index = 0u32;
    for chunk in data[..whole].chunks_exact(BINARY_RECORD_BYTES) {
        let rec: BinaryRecord = bytemuck::pod_read_unaligned(chunk);
        match binary::decode(&rec, &src.binary_slots, &mut src.ev) {
            Ok(()) => {
                route(src, keys, sh, chunk, batches, acc, &mut stats.dims)?;
                stats.events += 1;
            }
            Err(reason) => stats.reject(reason, task, index, &[]),
        }
        index += 1;
    }
    if whole < data.len() {
        stats.reject(Reject::TruncatedRecord, task, index, &[]);
        index += 1;
    }
    join_waiting(src, keys, sh, batches, acc, stats, Reparse::Binary)?;
    Ok(index)
}

fn source_rt(s: usize, sh: &Shared) -> SourceRt {
    let spec = &sh.job.sources[s];
    let mut slots: Vec<String> = Vec::new();
    let reading: Vec<usize> = (0..sh.job.metrics.len()).filter(|&m| sh.job.metrics[m].sources.contains(&s)).collect();
    for &m in &reading {
        let metric = &sh.job.metrics[m];
        let filter_fields = metric.filter.as_ref().map(|f| f.fields()).unwrap_or_default();
        for f in metric.group_by.iter().chain(&filter_fields).chain(metric.value_fields()) {
            if !slots.contains(f) {
                slots.push(f.clone());
            }
        }
    }
    // The fields detail sinks write.
    let job = &sh.job;
    let detail: Vec<(usize, &EventsSpec)> = (0..job.sinks.len())
        .filter_map(|k| job.sinks[k].events.as_ref().filter(|e| e.sources.contains(&s)).map(|e| (k, e)))
        .collect();
    for f in detail.iter().flat_map(|(_, e)| &e.fields) {
        if !slots.contains(f) {
            slots.push(f.clone());
        }
    }
    // Dimensions whose fields the metrics (or detail sinks) use, and those
    // that drop events they lack (from every source that has the key).
    let wanted: Vec<usize> = (0..job.dimensions.len())
        .filter(|&d| {
            let dim = &job.dimensions[d];
            let used = (0..dim.fields.len()).any(|f| slots.contains(&dim.field_name(f)));
            used || dim.on_missing == OnMissing::Drop && spec.can_supply(&dim.key)
        })
        .collect();
    for &d in &wanted {
        if !slots.contains(&job.dimensions[d].key) {
            slots.push(job.dimensions[d].key.clone());
        }
    }
    let fields = FieldSet { ts: spec.ts_field.clone(), did: spec.did_field.clone(), slots };
    let slot_of = |name: &str| fields.slot_of(name).unwrap_or(0);
    let enrich: Vec<Enrich> = wanted
        .iter()
        .map(|&d| {
            let dim = &job.dimensions[d];
            let targets =
                (0..dim.fields.len()).filter_map(|f| Some((f, fields.slot_of(&dim.field_name(f))?))).collect();
            let (generation, table) = sh.dims[d].current();
            let mut e = Enrich {
                dim: d,
                key_slot: slot_of(&dim.key),
                targets,
                drop: dim.on_missing == OnMissing::Drop,
                table: Arc::default(),
                generation: 0,
                remote: sh.dims[d].redis.clone().map(Lookup::new),
                key_fp: None,
                large: false,
            };
            e.take_table(generation, table);
            e
        })
        .collect();
    let metrics = reading
        .iter()
        .map(|&m| {
            let metric = &sh.job.metrics[m];
            SourceMetric {
                metric: m,
                text: metric.dau.is_some(),
                filter: metric.filter.as_ref().map(|f| SlotFilter::new(f.compile(&slot_of))),
                group_slots: metric.group_by.iter().map(|g| slot_of(g)).collect(),
                value_slots: metric.value_fields().iter().map(|v| slot_of(v)).collect(),
                same_as_prev: metric.summary.as_ref().is_some_and(|s| s.set > 0),
                geo: sh.geometry[m],
            }
        })
        .collect();
    let binary_slots = std::array::from_fn(|i| fields.slot_of(&spec.binary_dims[i]));
    SourceRt {
        format: spec.format,
        jsonl: JsonlParser::new(&fields),
        rows: RowsParser::new(&fields),
        csv: AHashMap::new(),
        csv_stream: match (spec.is_stream(), spec.format, &spec.csv_header) {
            (true, Format::Csv, Some(header)) => Some(CsvParser::new(&fields, header)),
            _ => None,
        },
        binary_slots,
        ev: EventBuf::new(fields.slots.len()),
        remote: enrich.iter().any(|e: &Enrich| e.remote.is_some()),
        behind: Behind { ev: EventBuf::new(fields.slots.len()), record: Vec::new(), full: false },
        waiting: Waiting::default(),
        events: detail
            .iter()
            .map(|&(sink, e)| {
                let mut head = b"{\"source\":".to_vec();
                write_json_str(spec.name.as_bytes(), &mut head);
                head.extend_from_slice(b",\"ts\":");
                let fields = e
                    .fields
                    .iter()
                    .map(|f| {
                        let mut name = b",".to_vec();
                        write_json_str(f.as_bytes(), &mut name);
                        name.push(b':');
                        (name, slot_of(f))
                    })
                    .collect();
                EventOut { sink, head, fields, lines: EventLines::default() }
            })
            .collect(),
        enrich,
        fields,
        metrics,
        delay_ms: spec.max_out_of_orderness_ms,
        max_line_bytes: spec.max_line_bytes,
    }
}

//! The thread-per-core runtime: N pinned workers, each a router (input
//! blocks, claimed in order from one counter) and a shard (its device-hash
//! range), joined by the SPSC mesh; the calling thread is the emitter.
//!
//! The emitter merges shipped slices from all shards, and when every shard
//! has passed a window's end (the job watermark), renders that window's
//! rows in a fixed order — by window end, metric, then key — so output is
//! identical whatever the number of workers.
//!
//! Checkpoints (with a state directory) cut the run between two blocks: the
//! coordinator pauses the block counter at index T, every worker finishes
//! the blocks before T, copies its shard's changed state and reports; the
//! coordinator, having merged everything the shards shipped before, lets
//! the routers go on, encodes its own state and hands the checkpoint to a
//! writer thread that writes, syncs and commits it (see [`coordinator`]).

mod coordinator;
pub mod mesh;
mod resume;
mod router;
pub(crate) use router::EventLines;
mod shard;
pub mod stats;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam::channel::{unbounded, Sender};
use crossbeam::sync::{Parker, Unparker};
use serde::Serialize;

use crate::checkpoint::CheckpointError;
use crate::dim::{DimExample, DimHandle, Watcher};
use crate::event::Reject;
use crate::job::{Format, Job, SinkRows, SinkTarget};
use crate::metric::cumulate::{Geometry, SliceCols};
use crate::metric::keys::KeyDict;
use crate::serve::Live;
use crate::sink::jsonl::SinkError;
use crate::sink::Sink;
use crate::source::file::{InputError, Plan};
use crate::source::kafka::{KafkaSource, KafkaSourceError};
use crate::source::stream::{Chain, Stream};
use crate::source::tail::TailSource;
use crate::source::tcp::{TcpSource, TcpSourceError};
use crate::state::history::{HistoryError, ImportReport, Imported};
use coordinator::{Coordinator, CutReport, CutRequest};
use mesh::Mesh;
use router::Router;
use shard::Shard;
use stats::{Example, SourceReport, SourceStats};

/// A block's prefix maximum not yet published.
pub(crate) const NOT_READY: i64 = i64::MIN;
/// Published prefix maximum of blocks that held no event yet.
pub(crate) const NO_EVENTS: i64 = i64::MIN + 1;

/// Idle time after which a worker waiting for its own reads sleeps
/// instead of yielding.
const IDLE_BEFORE_SLEEP: Duration = Duration::from_millis(2);
/// How long an idle worker parks before it looks again, unless woken:
/// whatever gives it work wakes it at once (see [`Wake`]), the timeout
/// bounds the wait for anything that does not. Not shorter: on these VMs a
/// timed sleep and its wake-up cost tens of microseconds of CPU each (a
/// daemon taking 200k events/s used 0.23 cores with 200 µs parks, 0.08
/// with 2 ms) ...
const IDLE_SLEEP: Duration = Duration::from_millis(2);
/// ... and once idle this long (a stream with nothing new),
/// [`IDLE_SLEEP_LONG`].
const IDLE_BEFORE_SLEEP_LONG: Duration = Duration::from_millis(200);
const IDLE_SLEEP_LONG: Duration = Duration::from_millis(10);

/// Wakes workers parked with nothing to do. What gives a worker work wakes
/// it: a stream block pushed (every worker), a batch sent to its shard, an
/// emptied batch handed back to its router, a neighbour's block resolved
/// (the watermark its own blocks wait for), a cut asked for. A wake before
/// the worker parks makes that park return at once, so none is lost.
pub struct Wake {
    workers: Vec<Unparker>,
}

impl Wake {
    /// Parkers for `n` workers, and the wake that reaches them.
    pub fn new(n: usize) -> (Wake, Vec<Parker>) {
        let parkers: Vec<Parker> = (0..n).map(|_| Parker::new()).collect();
        (Wake { workers: parkers.iter().map(|p| p.unparker().clone()).collect() }, parkers)
    }

    /// Wakes worker `w`.
    #[inline]
    pub fn one(&self, w: usize) {
        self.workers[w].unpark();
    }

    /// Wakes every worker but `me`.
    pub fn others(&self, me: usize) {
        for (w, u) in self.workers.iter().enumerate() {
            if w != me {
                u.unpark();
            }
        }
    }

    pub fn all(&self) {
        self.workers.iter().for_each(Unparker::unpark);
    }
}

/// What every worker reads.
pub(crate) struct Shared {
    pub job: Job,
    pub plan: Arc<Plan>,
    pub mesh: Mesh,
    pub wake: Arc<Wake>,
    pub dicts: Vec<Arc<KeyDict>>,
    pub geometry: Vec<Geometry>,
    /// Per source, per block: the largest event time up to that block.
    pub prefix: Vec<Vec<AtomicI64>>,
    /// Per task: lines in the block (for locating examples).
    pub line_counts: Vec<AtomicU32>,
    /// Next block (index into the plan's tasks) a router may claim, with
    /// [`PAUSED`] set while a checkpoint's cut is taken.
    pub next_task: AtomicUsize,
    pub abort: AtomicBool,
    /// The checkpoint cut workers are asked to reach, and its generation (0: none yet).
    pub cut: Mutex<Option<Arc<CutRequest>>>,
    pub cut_epoch: AtomicU64,
    /// Per source: its stream, for a source read while the job runs (Kafka).
    pub streams: Vec<Option<Arc<Stream>>>,
    /// Per dimension: its current table.
    pub dims: Vec<Arc<DimHandle>>,
    /// Per source: its counts so far (`tally serve`'s `/metrics`).
    pub counts: Arc<[stats::LiveCounts]>,
    pub progress: Arc<stats::Progress>,
}

/// Bit of [`Shared::next_task`] that stops routers from claiming blocks.
pub(crate) const PAUSED: usize = 1 << (usize::BITS - 1);

/// What a router gets when it asks for a block.
pub(crate) enum Claim {
    Task(usize),
    /// A checkpoint is being cut: ask again later.
    Paused,
    Exhausted,
}

impl Shared {
    pub fn claim(&self) -> Claim {
        let mut cur = self.next_task.load(Ordering::Relaxed);
        loop {
            if cur & PAUSED != 0 {
                return Claim::Paused;
            }
            if cur >= self.plan.tasks.len() {
                return Claim::Exhausted;
            }
            match self.next_task.compare_exchange_weak(cur, cur + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Claim::Task(cur),
                Err(now) => cur = now,
            }
        }
    }

    /// Stops claims; returns the first block not claimed (the cut).
    pub fn pause(&self) -> usize {
        self.next_task.fetch_or(PAUSED, Ordering::SeqCst) & !PAUSED
    }

    /// Tells every worker to stop, waking the parked ones.
    pub fn stop_workers(&self) {
        self.abort.store(true, Ordering::Relaxed);
        self.wake.all();
    }

    pub fn resume(&self) {
        self.next_task.fetch_and(!PAUSED, Ordering::SeqCst);
        for s in self.streams.iter().flatten() {
            s.resume();
        }
        self.wake.all();
    }

    /// Stops claims of stream blocks; per source, the seq of the first
    /// block not claimed (`None` for file sources).
    pub fn pause_streams(&self) -> Vec<Option<mesh::BlockSeq>> {
        self.streams.iter().map(|s| s.as_ref().map(|s| s.pause())).collect()
    }

    /// Whether a stream source may still deliver blocks.
    pub fn streams_live(&self) -> bool {
        self.streams.iter().flatten().any(|s| !s.exhausted())
    }

    /// Every stream source's watermark chain now.
    pub fn chains(&self) -> Vec<Option<Chain>> {
        self.streams.iter().map(|s| s.as_ref().map(|s| s.chain())).collect()
    }

    /// The cut this worker has yet to reach, if one is asked for.
    fn cut_wanted(&self, done_epoch: u64) -> Option<Arc<CutRequest>> {
        if self.cut_epoch.load(Ordering::Acquire) == done_epoch {
            return None;
        }
        self.cut.lock().unwrap_or_else(|p| p.into_inner()).clone().filter(|c| c.generation != done_epoch)
    }
}

/// Messages from shards to the emitter.
pub(crate) enum ToEmitter {
    Slice {
        metric: usize,
        cols: SliceCols,
    },
    /// `minute_devices` rows of shipped slices.
    Details {
        metric: usize,
        slice: u32,
        rows: crate::metric::detail::DetailBuf,
    },
    Watermark {
        shard: usize,
        wm_ms: i64,
    },
    /// A block's events for detail sink `sink` (from a router).
    Events {
        sink: usize,
        lines: router::EventLines,
    },
    Cut(Box<CutReport>),
    Finished(Box<WorkerReport>),
    Failed(String),
}

pub(crate) struct WorkerReport {
    /// Time the worker found nothing to do (waiting on neighbours or reads).
    idle_seconds: f64,
    stats: Vec<SourceStats>,
    state_bytes_max: usize,
    dedup_entries_max: usize,
    closed_tables: (usize, usize),
    dau_tables: [(usize, usize); 3],
    io_uring: bool,
    /// The shard itself, for the checkpoint of the end of input (a DAU
    /// metric's device history outlives the input).
    shard: Option<Box<Shard>>,
}

/// A run that could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// A sink that could not be opened (nothing ran).
    #[error(transparent)]
    SinkOpen(SinkError),
    #[error(transparent)]
    State(#[from] CheckpointError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Kafka(#[from] KafkaSourceError),
    #[error(transparent)]
    Tcp(#[from] TcpSourceError),
    #[error("dimension {name:?}: {reason}")]
    Dimension { name: String, reason: String },
    #[error("shard state: {0}")]
    Table(io::Error),
    #[error("worker failed: {0}")]
    Worker(String),
}

/// What a run did, for people (printed) and tools (JSON).
#[derive(Debug, Serialize)]
pub struct RunSummary {
    pub workers: usize,
    pub io_uring: bool,
    pub input_bytes: u64,
    pub records: u64,
    pub events: u64,
    pub rejected: u64,
    pub late_folded: u64,
    pub late_dropped: u64,
    pub rows: u64,
    /// `minute_devices` rows written by this process.
    pub minute_devices_rows: u64,
    /// Events written to detail sinks by this process.
    pub detail_events: u64,
    pub seconds: f64,
    /// Events this process counted (not those of a resumed checkpoint) per second.
    pub events_per_second: f64,
    /// Largest dedup state held at once, all shards (bytes).
    pub state_bytes_max: u64,
    /// Distinct (device, key) pairs in that state at most.
    pub dedup_entries_max: u64,
    /// Bytes of dedup table per (device, key) entry, over every day's
    /// table at the day's close: the state cost of one distinct pair.
    pub dedup_bytes_per_entry: f64,
    /// DAU: bytes of minute-dedup ring per (source, device, key) entry,
    /// over every day's rings at the day's close.
    pub ring_bytes_per_entry: f64,
    /// DAU: device history entries at the end, and bytes per device.
    pub history_devices: u64,
    pub history_bytes_per_device: f64,
    /// DAU: bytes of device id text table per device (`tally devices
    /// export` writes ids back from it).
    pub device_id_bytes_per_device: f64,
    /// Per worker: seconds spent waiting with nothing to do.
    pub worker_idle_seconds: Vec<f64>,
    pub sources: Vec<SourceReport>,
    /// From the start of the run until workers start on input (includes
    /// checking and restoring a checkpoint).
    pub startup_seconds: f64,
    /// Checkpoint generation this run resumed from.
    pub resumed_from: Option<u64>,
    /// The run stopped on a signal before its input ended.
    pub stopped: bool,
    pub checkpoints: CheckpointReport,
    /// Device histories imported for DAU metrics (a fresh start only).
    pub history_imports: Vec<HistoryImport>,
    /// Each dimension table: its last load, and the lookups of this run.
    pub dimensions: Vec<DimensionReport>,
    /// Writes sinks sent again after their target failed (Redis away).
    pub sink_retries: u64,
}

/// What a run did with one dimension.
#[derive(Debug, Serialize)]
pub struct DimensionReport {
    pub name: String,
    pub path: String,
    /// Rows of the table as last loaded, malformed rows skipped and keys
    /// repeated (the last row won) in that load.
    pub rows: u64,
    pub malformed: u64,
    pub duplicate_keys: u64,
    pub examples: Vec<DimExample>,
    /// Times the file was read again after it changed.
    pub reloads: u64,
    /// Events looked up, events whose key the table lacked, and of those
    /// the events dropped (`on_missing = "drop"`).
    pub lookups: u64,
    pub missing: u64,
    pub dropped: u64,
    /// A Redis dimension: how its caches did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheReport>,
}

/// A Redis dimension's lookups in one run.
#[derive(Debug, Serialize)]
pub struct CacheReport {
    /// Events whose key this worker's cache held (fresh).
    pub local_hit_rate: f64,
    /// Events that waited for their block's fetch; of their distinct keys,
    /// those the shared cache held and those asked of Redis.
    pub waited: u64,
    pub shared_hits: u64,
    pub fetched: u64,
    /// Round trips to Redis (retries included), and per million events.
    pub round_trips: u64,
    pub round_trips_per_million: f64,
    pub retries: u64,
    /// Keys that held something other than a hash (taken as missing).
    pub not_hashes: u64,
    /// Rows in the shared cache at the end.
    pub cached: usize,
}

/// One DAU metric's device history import.
#[derive(Debug, Serialize)]
pub struct HistoryImport {
    pub metric: String,
    pub path: String,
    #[serde(flatten)]
    pub report: ImportReport,
}

/// Checkpoints a run wrote.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckpointReport {
    pub count: u64,
    /// Generation of the last one committed.
    pub generation: Option<u64>,
    /// Longest time routers were paused for a cut.
    pub pause_seconds_max: f64,
    /// Of a pause, the longest a worker took to finish its blocks before
    /// the cut (from seeing the request) ...
    pub drain_seconds_max: f64,
    /// ... and to copy its shard's part to memory (the writer thread
    /// puts it on disk).
    pub shard_copy_seconds_max: f64,
    /// Longest time from pause to committed manifest.
    pub seconds_max: f64,
    pub seconds_total: f64,
    pub bytes_written: u64,
}

impl RunSummary {
    /// A short human report.
    pub fn print(&self, w: &mut impl io::Write) -> io::Result<()> {
        writeln!(
            w,
            "tally: {} events ({} records, {} skipped) in {:.3} s = {:.2} M events/s on {} workers{}; {} rows",
            self.events,
            self.records,
            self.rejected,
            self.seconds,
            self.events_per_second / 1e6,
            self.workers,
            if self.io_uring { " (io_uring)" } else { "" },
            self.rows
        )?;
        if self.detail_events > 0 {
            writeln!(w, "tally: {} events to detail sinks", self.detail_events)?;
        }
        if self.minute_devices_rows > 0 {
            writeln!(w, "tally: {} minute_devices rows", self.minute_devices_rows)?;
        }
        if let Some(g) = self.resumed_from {
            writeln!(
                w,
                "tally: resumed from checkpoint {g} ({:.3} s from start to reading input)",
                self.startup_seconds
            )?;
        }
        if let Some(g) = self.checkpoints.generation {
            let c = &self.checkpoints;
            writeln!(
                w,
                "tally: {} checkpoint(s), last {g}{}; longest {:.3} s (routers paused {:.3} s: drain {:.3}, shard copies {:.3}), {} bytes written",
                c.count,
                if self.stopped { " (stopped by a signal; run again to resume)" } else { "" },
                c.seconds_max,
                c.pause_seconds_max,
                c.drain_seconds_max,
                c.shard_copy_seconds_max,
                c.bytes_written
            )?;
        }
        for h in &self.history_imports {
            let r = &h.report;
            writeln!(
                w,
                "tally: metric {:?}: device history {}: {} rows, {} devices, {} malformed, {} duplicate dids, {:.3} s",
                h.metric, h.path, r.rows, r.devices, r.malformed, r.duplicates, r.seconds
            )?;
            for (line, why) in &r.examples {
                writeln!(w, "tally:   {}:{line}: {why}", h.path)?;
            }
        }
        for d in &self.dimensions {
            writeln!(
                w,
                "tally: dimension {:?}: {} rows ({} malformed, {} duplicate keys, {} reloads); {} lookups, {} missing, {} dropped",
                d.name, d.rows, d.malformed, d.duplicate_keys, d.reloads, d.lookups, d.missing, d.dropped
            )?;
            for e in &d.examples {
                writeln!(w, "tally:   {}: {}", e.at, e.reason)?;
            }
        }
        if self.late_folded + self.late_dropped > 0 {
            writeln!(w, "tally: late events: {} folded, {} dropped", self.late_folded, self.late_dropped)?;
        }
        for s in &self.sources {
            if let Some(u) = s.upserts.filter(|u| u.unchanged + u.replaced + u.late_updates > 0) {
                writeln!(
                    w,
                    "tally: source {:?}: {} rows came again unchanged, {} replaced earlier values, {} updates came after their window was out (not applied)",
                    s.name, u.unchanged, u.replaced, u.late_updates
                )?;
            }
            if let Some(t) = s.assigned_after_seconds {
                writeln!(w, "tally: source {:?}: first partitions assigned {t:.3} s after the start", s.name)?;
            }
            if s.rejected == 0 {
                continue;
            }
            let reasons: Vec<String> = s.rejected_by_reason.iter().map(|(r, n)| format!("{r}={n}")).collect();
            writeln!(w, "tally: source {:?}: {} skipped ({})", s.name, s.rejected, reasons.join(", "))?;
            for e in &s.examples {
                writeln!(w, "tally:   {}: {} {:?}", e.at, e.reason, e.snippet)?;
            }
        }
        Ok(())
    }
}

/// Runs a job over its files to the end and writes every row.
pub fn run(job: &Job) -> Result<RunSummary, RunError> {
    run_until(job, &AtomicBool::new(false))
}

/// Runs a job until its input ends or `stop` is set (by a signal): then,
/// with a state directory, it cuts a checkpoint at the next block boundary
/// and returns, to be resumed by the next run with the same directory.
pub fn run_until(job: &Job, stop: &AtomicBool) -> Result<RunSummary, RunError> {
    run_with(job, stop, None)
}

/// [`run_until`], also handing every row to `live` (`tally serve`) and
/// telling it when the state is restored and the input ends.
pub fn run_with(job: &Job, stop: &AtomicBool, serving: Option<Arc<Live>>) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let plan = Arc::new(Plan::new(job)?);
    let n = job.workers;
    let resume = match &job.state_dir {
        Some(dir) => Some(resume::open(job, &plan, dir)?),
        None => None,
    };
    // Device histories are read before anything is written: a bad one
    // stops the run here.
    let fresh = resume.as_ref().is_none_or(|r| r.manifest.is_none());
    let live = resume.as_ref().filter(|_| job.state_tables_mapped).map(|r| r.state.live());
    let (histories, history_imports) = if fresh { import_histories(job, live.as_deref())? } else { Default::default() };
    // Stopped when dropped, at the end of this function.
    let mut kafka = Vec::new();
    let mut tcp = Vec::new();
    let mut tail = Vec::new();
    for (s, spec) in job.sources.iter().enumerate() {
        let chain = resume
            .as_ref()
            .and_then(|r| r.manifest.as_ref())
            .and_then(|m| m.input.sources.get(s))
            .and_then(|c| c.stream.clone());
        kafka.push(match spec.kafka {
            Some(_) => Some(KafkaSource::start(s, spec, chain.clone())?),
            None => None,
        });
        tcp.push(match spec.tcp {
            Some(_) => Some(TcpSource::start(s, spec, chain.clone())?),
            None => None,
        });
        tail.push(match spec.follow {
            Some(_) => Some(TailSource::start(s, spec, chain).map_err(|e| InputError {
                path: spec.follow.as_ref().and_then(|f| f.paths.first().cloned()).unwrap_or_default(),
                reason: format!("source {:?}: cannot follow: {e}", spec.name),
            })?),
            None => None,
        });
    }
    let streams: Vec<Option<Arc<Stream>>> = (0..job.sources.len())
        .map(|s| {
            let k = kafka[s].as_ref().map(|k| k.stream.clone());
            k.or_else(|| tcp[s].as_ref().map(|t| t.stream.clone()))
                .or_else(|| tail[s].as_ref().map(|t| t.stream.clone()))
        })
        .collect();
    // Dimension tables are read before anything runs (a changelog topic
    // to its end); their readers stop when dropped, at the end.
    let mut dims = Vec::new();
    let mut _changelogs = Vec::new();
    for d in &job.dimensions {
        let err = |reason| RunError::Dimension { name: d.name.clone(), reason };
        if d.kafka.is_some() {
            let h = Arc::new(DimHandle::empty());
            _changelogs.push(crate::dim::kafka::start(d, h.clone()).map_err(err)?);
            dims.push(h);
        } else if d.redis.is_some() {
            dims.push(Arc::new(DimHandle::remote(d).map_err(err)?));
        } else {
            dims.push(Arc::new(DimHandle::open(d).map_err(err)?));
        }
    }
    let files: Vec<usize> =
        (0..dims.len()).filter(|&d| job.dimensions[d].kafka.is_none() && job.dimensions[d].redis.is_none()).collect();
    let _watcher = Watcher::start(
        files.iter().map(|&d| job.dimensions[d].clone()).collect(),
        files.iter().map(|&d| dims[d].clone()).collect(),
    );
    let sink_resume = |i: usize| resume.as_ref().and_then(|r| r.manifest.as_ref()).map(|m| m.sinks[i].bytes);
    let mut sinks = job
        .sinks
        .iter()
        .enumerate()
        .map(|(i, s)| Sink::open(s, job, sink_resume(i)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(RunError::SinkOpen)?;
    let manifest = resume.as_ref().and_then(|r| r.manifest.as_ref());
    if let (Some(l), Some(m)) = (&serving, manifest.filter(|m| m.api.is_empty())) {
        // A checkpoint without the API's store (an earlier version's): the
        // rows before it, as its file sinks were cut back to.
        for s in &job.sinks {
            if let (SinkTarget::File(path), SinkRows::Results) = (&s.target, s.rows) {
                match l.refill(path) {
                    Ok(n) => eprintln!(
                        "tally serve: {n} rows of checkpoint {} read back from {} for the API",
                        m.generation,
                        path.display()
                    ),
                    Err(e) => eprintln!("tally serve: cannot read back {} for the API: {e}", path.display()),
                }
            }
        }
    }
    let counts: Arc<[stats::LiveCounts]> = job.sources.iter().map(|_| stats::LiveCounts::default()).collect();
    let progress = Arc::new(stats::Progress::new(n));
    if let Some(l) = &serving {
        l.counts(counts.clone(), progress.clone());
        sinks.push(Sink::live(l.clone()));
        for (s, stream) in streams.iter().enumerate() {
            if let Some(stream) = stream {
                l.watch(stream.clone());
            }
            if let Some(t) = &tcp[s] {
                l.tcp(s, t.addr, t.stats.clone());
            }
        }
    }
    let geometry: Vec<Geometry> = job.metrics.iter().map(|m| Geometry::new(job, m)).collect();
    let dicts: Vec<Arc<KeyDict>> = match &resume {
        Some(r) => r.dicts.to_vec(),
        None => job.metrics.iter().map(|_| Arc::new(KeyDict::default())).collect(),
    };
    let (wake, parkers) = Wake::new(n);
    let wake = Arc::new(wake);
    for stream in streams.iter().flatten() {
        stream.set_wake(wake.clone());
    }
    let sh = Shared {
        job: job.clone(),
        mesh: Mesh::new(n),
        wake: wake.clone(),
        dicts: dicts.clone(),
        geometry: geometry.clone(),
        prefix: plan.blocks_per_source.iter().map(|&b| (0..b).map(|_| AtomicI64::new(NOT_READY)).collect()).collect(),
        line_counts: (0..plan.tasks.len()).map(|_| AtomicU32::new(0)).collect(),
        next_task: AtomicUsize::new(0),
        abort: AtomicBool::new(false),
        cut: Mutex::new(None),
        cut_epoch: AtomicU64::new(0),
        plan: plan.clone(),
        streams,
        dims,
        counts: counts.clone(),
        progress: progress.clone(),
    };
    let mut shards = match &resume {
        Some(r) => r.place(&sh)?,
        None => (0..n).map(|w| Shard::new(w, &sh, None, false)).collect::<io::Result<_>>().map_err(RunError::Table)?,
    };
    for (m, tables) in histories {
        for (shard, table) in shards.iter_mut().zip(tables) {
            shard.set_history(m, table, resume.is_some());
        }
    }
    let mut coord = Coordinator::new(&sh, resume, stop, &kafka);
    if let Some(l) = &serving {
        if coord.keep_api(l.clone())? {
            let (rows, _) = l.with_store(|s| s.curve_usage());
            eprintln!("tally serve: the API's rows restored from the checkpoint ({rows} bytes of curves)");
        }
    }
    let startup_seconds = started.elapsed().as_secs_f64();
    if let Some(l) = &serving {
        l.restored.store(true, Ordering::Release);
    }
    let (tx, rx) = unbounded();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let outcome = std::thread::scope(|scope| {
        for ((w, shard), parker) in shards.into_iter().enumerate().zip(parkers) {
            let (sh, tx, core) = (&sh, tx.clone(), cores.get(w % cores.len().max(1)).copied());
            scope.spawn(move || worker(w, sh, shard, parker, tx, core));
        }
        drop(tx);
        // If the coordinator fails or panics, the workers must stop too, or
        // the scope would wait for them forever.
        let _stop_workers = StopOnDrop(&sh);
        coord.run(&sh, &rx, &mut sinks)
    });
    let mut reports = outcome?;
    for s in &mut sinks {
        s.flush()?;
    }
    coord.finish(&sh, &mut reports, &mut sinks)?;
    if let Some(l) = &serving {
        l.finished.store(!coord.stopped(), Ordering::Release);
    }
    let rows = sinks.iter().map(Sink::rows).sum::<u64>() + coord.rows_before();
    let mut summary = summarize(job, &sh, reports, coord.stats_before(), rows, started.elapsed());
    summary.startup_seconds = startup_seconds;
    summary.minute_devices_rows = sinks.iter().map(Sink::detail_rows).sum();
    summary.detail_events = sinks.iter().map(Sink::event_rows).sum();
    summary.resumed_from = coord.resumed_from();
    summary.stopped = coord.stopped();
    summary.checkpoints = coord.report();
    summary.history_imports = history_imports;
    summary.sink_retries = sinks.iter().map(Sink::retries).sum();
    for (report, t) in summary.sources.iter_mut().zip(&tcp) {
        report.tcp = t.as_ref().map(|t| t.stats.report());
    }
    Ok(summary)
}

/// DAU metrics' device histories: per metric, one table per shard.
type Histories = Vec<(usize, Vec<Imported>)>;

/// Reads the device history snapshot of every DAU metric that names one,
/// cut by device hash like the shards.
fn import_histories(job: &Job, live: Option<&std::path::Path>) -> Result<(Histories, Vec<HistoryImport>), RunError> {
    let mut tables = Vec::new();
    let mut imports = Vec::new();
    for (m, spec) in job.metrics.iter().enumerate() {
        let Some(path) = spec.dau.as_ref().and_then(|d| d.device_history.as_ref()) else {
            continue;
        };
        let dir = live.map(|l| l.join(format!("history-m{m}")));
        let (t, report) = crate::state::history::import(path, job.workers, dir.as_deref())?;
        tables.push((m, t));
        imports.push(HistoryImport { metric: spec.name.clone(), path: path.display().to_string(), report });
    }
    Ok((tables, imports))
}

/// Stops the workers when dropped (also while unwinding).
struct StopOnDrop<'a>(&'a Shared);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop_workers();
    }
}

fn worker(
    w: usize,
    sh: &Shared,
    mut shard: Shard,
    parker: Parker,
    tx: Sender<ToEmitter>,
    core: Option<core_affinity::CoreId>,
) {
    if let Some(core) = core {
        core_affinity::set_for_current(core);
    }
    let mut router = Router::new(w, sh, tx.clone());
    let backoff = crossbeam::utils::Backoff::new();
    let mut idle_since: Option<Instant> = None;
    let mut idle = Duration::ZERO;
    let mut cut_done = 0;
    let mut cut_seen: Option<Instant> = None;
    let result: io::Result<()> = (|| {
        while !sh.abort.load(Ordering::Relaxed) {
            let a = shard.poll(sh, &tx)?;
            let b = if router.done() { false } else { router.step(sh)? };
            if let Some(cut) = sh.cut_wanted(cut_done) {
                let seen = *cut_seen.get_or_insert_with(Instant::now);
                if router.idle() && shard.at_cut(&cut.blocks) {
                    let drained = seen.elapsed();
                    let t = Instant::now();
                    let written = shard.checkpoint(&cut)?;
                    let timing = (drained.as_secs_f64(), t.elapsed().as_secs_f64());
                    cut_seen = None;
                    let mut stats = router.stats.clone();
                    shard.add_counts(&mut stats);
                    let report = CutReport::new(w, &cut, written, stats, timing);
                    let _ = tx.send(ToEmitter::Cut(Box::new(report)));
                    cut_done = cut.generation;
                    if cut.stop {
                        return Ok(());
                    }
                }
            }
            if router.done() && shard.done() {
                return Ok(());
            }
            if a || b {
                if let Some(t) = idle_since.take() {
                    idle += t.elapsed();
                }
                backoff.reset();
                continue;
            }
            // A read of its own completes within microseconds: spin, then
            // yield. Anything else (a stream block, a neighbour's batch or
            // block) wakes a parked worker, which then costs nothing while
            // the input is slower than the cores.
            let since = *idle_since.get_or_insert_with(Instant::now);
            if !backoff.is_completed() {
                backoff.snooze();
            } else if router.reading() && since.elapsed() < IDLE_BEFORE_SLEEP {
                std::thread::yield_now();
            } else if since.elapsed() < IDLE_BEFORE_SLEEP_LONG {
                parker.park_timeout(IDLE_SLEEP);
            } else {
                parker.park_timeout(IDLE_SLEEP_LONG);
            }
        }
        Ok(())
    })();
    let _ = match result {
        Err(e) => {
            sh.stop_workers();
            tx.send(ToEmitter::Failed(format!("worker {w}: {e}")))
        }
        Ok(()) => tx.send(ToEmitter::Finished(Box::new(WorkerReport {
            io_uring: router.uses_io_uring(),
            idle_seconds: idle.as_secs_f64(),
            stats: {
                let mut stats = router.stats;
                shard.add_counts(&mut stats);
                stats
            },
            state_bytes_max: shard.state_bytes_max,
            dedup_entries_max: shard.dedup_entries_max,
            closed_tables: shard.closed_tables(),
            dau_tables: shard.dau_tables(),
            shard: Some(Box::new(shard)),
        }))),
    };
}

fn summarize(
    job: &Job,
    sh: &Shared,
    reports: Vec<WorkerReport>,
    before: Vec<SourceStats>,
    rows: u64,
    elapsed: Duration,
) -> RunSummary {
    let events_before: u64 = before.iter().map(|s| s.events).sum();
    let mut per_source = before;
    per_source.resize_with(job.sources.len(), SourceStats::default);
    for r in &reports {
        for (a, b) in per_source.iter_mut().zip(&r.stats) {
            a.merge(b);
        }
    }
    let sources: Vec<SourceReport> =
        per_source.iter().enumerate().map(|(s, st)| source_report(job, sh, s, st)).collect();
    let events: u64 = per_source.iter().map(|s| s.events).sum();
    let seconds = elapsed.as_secs_f64();
    RunSummary {
        workers: job.workers,
        io_uring: reports.iter().any(|r| r.io_uring),
        input_bytes: sh.plan.input_bytes()
            + sh.streams.iter().flatten().map(|s| s.bytes.load(Ordering::Relaxed)).sum::<u64>(),
        records: per_source.iter().map(|s| s.lines).sum(),
        events,
        rejected: per_source.iter().map(|s| s.rejected_total()).sum(),
        late_folded: per_source.iter().map(|s| s.late_folded).sum(),
        late_dropped: per_source.iter().map(|s| s.late_dropped).sum(),
        rows,
        minute_devices_rows: 0,
        detail_events: 0,
        seconds,
        events_per_second: (events - events_before) as f64 / seconds.max(1e-9),
        state_bytes_max: reports.iter().map(|r| r.state_bytes_max as u64).sum(),
        dedup_entries_max: reports.iter().map(|r| r.dedup_entries_max as u64).sum(),
        dedup_bytes_per_entry: {
            let (bytes, entries) =
                reports.iter().fold((0, 0), |(b, e), r| (b + r.closed_tables.0, e + r.closed_tables.1));
            bytes as f64 / entries.max(1) as f64
        },
        ring_bytes_per_entry: {
            let (b, e) = reports.iter().fold((0, 0), |(b, e), r| (b + r.dau_tables[0].0, e + r.dau_tables[0].1));
            b as f64 / e.max(1) as f64
        },
        history_devices: reports.iter().map(|r| r.dau_tables[1].1 as u64).sum(),
        history_bytes_per_device: {
            let (b, e) = reports.iter().fold((0, 0), |(b, e), r| (b + r.dau_tables[1].0, e + r.dau_tables[1].1));
            b as f64 / e.max(1) as f64
        },
        device_id_bytes_per_device: {
            let (b, e) = reports.iter().fold((0, 0), |(b, e), r| (b + r.dau_tables[2].0, e + r.dau_tables[2].1));
            b as f64 / e.max(1) as f64
        },
        worker_idle_seconds: reports.iter().map(|r| r.idle_seconds).collect(),
        sources,
        startup_seconds: 0.0,
        resumed_from: None,
        stopped: false,
        checkpoints: CheckpointReport::default(),
        history_imports: Vec::new(),
        sink_retries: 0,
        dimensions: job
            .dimensions
            .iter()
            .enumerate()
            .map(|(d, spec)| {
                let load = sh.dims[d].load.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let count = |f: fn(&stats::DimCount) -> u64| {
                    per_source.iter().filter_map(|s| s.dims.get(d)).map(f).sum::<u64>()
                };
                DimensionReport {
                    name: spec.name.clone(),
                    path: spec.redis.as_ref().map_or_else(|| spec.path.display().to_string(), |r| r.url.clone()),
                    rows: load.rows,
                    malformed: load.malformed,
                    duplicate_keys: load.duplicate_keys,
                    examples: load.examples,
                    reloads: sh.dims[d].reloads.load(Ordering::Relaxed),
                    lookups: count(|c| c.lookups),
                    missing: count(|c| c.missing),
                    dropped: count(|c| c.dropped),
                    cache: sh.dims[d].redis.as_ref().map(|r| {
                        let lookups = count(|c| c.lookups).max(1) as f64;
                        CacheReport {
                            local_hit_rate: 1.0 - count(|c| c.waited) as f64 / lookups,
                            waited: count(|c| c.waited),
                            shared_hits: count(|c| c.shared_hits),
                            fetched: count(|c| c.fetched),
                            round_trips: count(|c| c.round_trips),
                            round_trips_per_million: count(|c| c.round_trips) as f64 * 1e6 / lookups,
                            retries: count(|c| c.retries),
                            not_hashes: count(|c| c.not_hashes),
                            cached: r.cached(),
                        }
                    }),
                }
            })
            .collect(),
    }
}

fn source_report(job: &Job, sh: &Shared, s: usize, st: &SourceStats) -> SourceReport {
    let mut examples = st.examples.clone();
    examples.sort_by_key(|e| (e.reason, e.at, e.task, e.index));
    let stream = sh.streams[s].as_deref();
    let mut kept: Vec<Example> = Vec::new();
    let mut per_reason = std::collections::BTreeMap::new();
    for e in examples {
        let count = per_reason.entry(e.reason).or_insert(0usize);
        *count += 1;
        if *count > stats::EXAMPLES_PER_REASON {
            continue;
        }
        if let (Some((part, offset)), Some(stream)) = (e.at, stream) {
            let name = stream.part_id(part).map_or_else(|| format!("partition #{part}"), |p| p.to_string());
            kept.push(Example { reason: e.reason.as_str(), at: format!("{name}@{offset}"), snippet: e.snippet });
            continue;
        }
        let task = sh.plan.tasks[e.task];
        let file = &sh.plan.files[task.file];
        // Lines before this block in the same file, then 1-based.
        let before: u64 = sh
            .plan
            .tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.file == task.file && t.lo < task.lo)
            .map(|(i, _)| sh.line_counts[i].load(Ordering::Relaxed) as u64)
            .sum();
        let unit = if job.sources[s].format == Format::Binary { "record " } else { "" };
        kept.push(Example {
            reason: e.reason.as_str(),
            at: format!("{}:{unit}{}", file.path.display(), before + e.index as u64 + 1),
            snippet: e.snippet,
        });
    }
    SourceReport {
        name: job.sources[s].name.clone(),
        records: st.lines,
        events: st.events,
        rejected: st.rejected_total(),
        rejected_by_reason: Reject::ALL
            .iter()
            .filter(|r| st.rejected[r.index()] > 0)
            .map(|r| (r.as_str(), st.rejected[r.index()]))
            .collect(),
        late_folded: st.late_folded,
        late_dropped: st.late_dropped,
        upserts: (job.sources[s].format == Format::Rows).then_some(st.upserts),
        examples: kept,
        partitions: stream.map(|stream| partition_reports(&stream.chain(), st)).unwrap_or_default(),
        assigned_after_seconds: stream.and_then(Stream::assigned_after_seconds),
        lateness: st.lateness.report(),
        tcp: None,
    }
}

fn partition_reports(chain: &Chain, st: &SourceStats) -> Vec<stats::PartitionReport> {
    chain
        .parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let rejects = st.parts.get(i).cloned().unwrap_or_default();
            stats::PartitionReport {
                partition: p.id.to_string(),
                messages: p.messages,
                rejected: rejects.rejected,
                rejected_offsets: rejects.offsets,
                next_offset: p.next_offset,
            }
        })
        .collect()
}

//! The thread-per-core runtime: N pinned workers, each a router (input
//! blocks, claimed in order from one counter) and a shard (its device-hash
//! range), joined by the SPSC mesh; the calling thread is the emitter.
//!
//! The emitter merges shipped slices from all shards, and when every shard
//! has passed a window's end (the job watermark), renders that window's
//! rows in a fixed order — by window end, metric, then key — so output is
//! identical whatever the number of workers.

pub mod mesh;
mod router;
mod shard;
pub mod stats;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{unbounded, Receiver, Sender};
use serde::Serialize;

use crate::event::Reject;
use crate::job::{Format, Job};
use crate::metric::cumulate::{CumulateEmitter, Geometry, Row, SliceCols};
use crate::metric::keys::KeyDict;
use crate::sink::jsonl::{JsonlSink, SinkError};
use crate::source::file::{InputError, Plan};
use mesh::Mesh;
use router::Router;
use shard::Shard;
use stats::{Example, SourceReport, SourceStats};

/// A block's prefix maximum not yet published.
pub(crate) const NOT_READY: i64 = i64::MIN;
/// Published prefix maximum of blocks that held no event yet.
pub(crate) const NO_EVENTS: i64 = i64::MIN + 1;

/// Idle time after which a worker sleeps instead of yielding.
const IDLE_BEFORE_SLEEP: Duration = Duration::from_millis(2);
/// How long an idle worker sleeps between looks.
const IDLE_SLEEP: Duration = Duration::from_micros(100);

/// What every worker reads.
pub(crate) struct Shared {
    pub job: Job,
    pub plan: Arc<Plan>,
    pub mesh: Mesh,
    pub dicts: Vec<Arc<KeyDict>>,
    pub geometry: Vec<Geometry>,
    /// Per source, per block: the largest event time up to that block.
    pub prefix: Vec<Vec<AtomicI64>>,
    /// Per task: lines in the block (for locating examples).
    pub line_counts: Vec<AtomicU32>,
    /// Next block (index into the plan's tasks) a router may claim.
    pub next_task: AtomicUsize,
    pub abort: AtomicBool,
}

/// Messages from shards to the emitter.
pub(crate) enum ToEmitter {
    Slice { metric: usize, cols: SliceCols },
    Watermark { shard: usize, wm_ms: i64 },
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
    io_uring: bool,
}

/// A run that could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Sink(#[from] SinkError),
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
    pub seconds: f64,
    pub events_per_second: f64,
    /// Largest dedup state held at once, all shards (bytes).
    pub state_bytes_max: u64,
    /// Distinct (device, key) pairs in that state at most.
    pub dedup_entries_max: u64,
    /// Bytes of dedup table per (device, key) entry, over every day's
    /// table at the day's close: the state cost of one distinct pair.
    pub dedup_bytes_per_entry: f64,
    /// Per worker: seconds spent waiting with nothing to do.
    pub worker_idle_seconds: Vec<f64>,
    pub sources: Vec<SourceReport>,
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
        if self.late_folded + self.late_dropped > 0 {
            writeln!(w, "tally: late events: {} folded, {} dropped", self.late_folded, self.late_dropped)?;
        }
        for s in &self.sources {
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
    let started = Instant::now();
    let plan = Arc::new(Plan::new(job)?);
    let mut sinks = job.sinks.iter().map(|s| JsonlSink::open(s, job.metrics.len())).collect::<Result<Vec<_>, _>>()?;
    let n = job.workers;
    let geometry: Vec<Geometry> = job.metrics.iter().map(|m| Geometry::new(job, m)).collect();
    let dicts: Vec<Arc<KeyDict>> = job.metrics.iter().map(|_| Arc::new(KeyDict::default())).collect();
    let sh = Shared {
        job: job.clone(),
        mesh: Mesh::new(n),
        dicts: dicts.clone(),
        geometry: geometry.clone(),
        prefix: plan.blocks_per_source.iter().map(|&b| (0..b).map(|_| AtomicI64::new(NOT_READY)).collect()).collect(),
        line_counts: (0..plan.tasks.len()).map(|_| AtomicU32::new(0)).collect(),
        next_task: AtomicUsize::new(0),
        abort: AtomicBool::new(false),
        plan: plan.clone(),
    };
    let mut emitters: Vec<CumulateEmitter> = job
        .metrics
        .iter()
        .enumerate()
        .map(|(m, spec)| CumulateEmitter::new(geometry[m], spec, dicts[m].clone()))
        .collect();
    let (tx, rx) = unbounded();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let outcome = std::thread::scope(|scope| {
        for w in 0..n {
            let (sh, tx, core) = (&sh, tx.clone(), cores.get(w % cores.len().max(1)).copied());
            scope.spawn(move || worker(w, sh, tx, core));
        }
        drop(tx);
        // If the emitter fails or panics, the workers must stop too, or the
        // scope would wait for them forever.
        let _stop_workers = StopOnDrop(&sh.abort);
        let r = emit_loop(&sh, &rx, n, &mut emitters, &mut sinks);
        if r.is_err() {
            sh.abort.store(true, Ordering::Relaxed);
        }
        r
    });
    let reports = outcome?;
    for s in &mut sinks {
        s.flush()?;
    }
    Ok(summarize(job, &sh, reports, sinks.iter().map(|s| s.rows).sum(), started.elapsed()))
}

/// Sets the abort flag when dropped (also while unwinding).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn worker(w: usize, sh: &Shared, tx: Sender<ToEmitter>, core: Option<core_affinity::CoreId>) {
    if let Some(core) = core {
        core_affinity::set_for_current(core);
    }
    let mut router = Router::new(w, sh);
    let mut shard = Shard::new(w, sh);
    let backoff = crossbeam::utils::Backoff::new();
    let mut idle_since: Option<Instant> = None;
    let mut idle = Duration::ZERO;
    let result: io::Result<()> = (|| {
        while !sh.abort.load(Ordering::Relaxed) {
            let a = shard.poll(sh, &tx)?;
            let b = if router.done() { false } else { router.step(sh)? };
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
            // Waits for a neighbour's block or a read are short: spin, then
            // yield; sleep only once idle for long (input exhausted).
            let since = *idle_since.get_or_insert_with(Instant::now);
            if !backoff.is_completed() {
                backoff.snooze();
            } else if since.elapsed() < IDLE_BEFORE_SLEEP {
                std::thread::yield_now();
            } else {
                std::thread::sleep(IDLE_SLEEP);
            }
        }
        Ok(())
    })();
    let _ = match result {
        Err(e) => {
            sh.abort.store(true, Ordering::Relaxed);
            tx.send(ToEmitter::Failed(format!("worker {w}: {e}")))
        }
        Ok(()) => tx.send(ToEmitter::Finished(Box::new(WorkerReport {
            io_uring: router.uses_io_uring(),
            idle_seconds: idle.as_secs_f64(),
            stats: router.stats,
            state_bytes_max: shard.state_bytes_max,
            dedup_entries_max: shard.dedup_entries_max,
            closed_tables: shard.closed_tables(),
        }))),
    };
}

/// Merges shard output and writes rows until every worker finished.
fn emit_loop(
    sh: &Shared,
    rx: &Receiver<ToEmitter>,
    n: usize,
    emitters: &mut [CumulateEmitter],
    sinks: &mut [JsonlSink],
) -> Result<Vec<WorkerReport>, RunError> {
    let mut shard_wm = vec![i64::MIN; n];
    let mut job_wm = i64::MIN;
    let mut reports = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut failure = None;
    while reports.len() + failure.iter().count() < n {
        let Ok(msg) = rx.recv() else { break };
        match msg {
            ToEmitter::Slice { metric, cols } => emitters[metric].add(&cols),
            ToEmitter::Watermark { shard, wm_ms } => {
                shard_wm[shard] = wm_ms;
                let wm = shard_wm.iter().copied().min().unwrap_or(i64::MIN);
                if wm > job_wm {
                    job_wm = wm;
                    for (m, e) in emitters.iter_mut().enumerate() {
                        e.emit(m, wm, wm == i64::MAX, &mut rows);
                    }
                    rows.sort_by_key(|r| (r.window_end_ms, r.metric));
                    for r in rows.drain(..) {
                        for s in sinks.iter_mut() {
                            s.write(r.metric, &r.line)?;
                        }
                    }
                }
            }
            ToEmitter::Finished(r) => reports.push(*r),
            ToEmitter::Failed(e) => {
                sh.abort.store(true, Ordering::Relaxed);
                failure.get_or_insert(e);
            }
        }
    }
    match failure {
        Some(e) => Err(RunError::Worker(e)),
        None => Ok(reports),
    }
}

fn summarize(job: &Job, sh: &Shared, reports: Vec<WorkerReport>, rows: u64, elapsed: Duration) -> RunSummary {
    let mut per_source: Vec<SourceStats> = job.sources.iter().map(|_| SourceStats::default()).collect();
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
        input_bytes: sh.plan.input_bytes(),
        records: per_source.iter().map(|s| s.lines).sum(),
        events,
        rejected: per_source.iter().map(|s| s.rejected_total()).sum(),
        late_folded: per_source.iter().map(|s| s.late_folded).sum(),
        late_dropped: per_source.iter().map(|s| s.late_dropped).sum(),
        rows,
        seconds,
        events_per_second: events as f64 / seconds.max(1e-9),
        state_bytes_max: reports.iter().map(|r| r.state_bytes_max as u64).sum(),
        dedup_entries_max: reports.iter().map(|r| r.dedup_entries_max as u64).sum(),
        dedup_bytes_per_entry: {
            let (bytes, entries) =
                reports.iter().fold((0, 0), |(b, e), r| (b + r.closed_tables.0, e + r.closed_tables.1));
            bytes as f64 / entries.max(1) as f64
        },
        worker_idle_seconds: reports.iter().map(|r| r.idle_seconds).collect(),
        sources,
    }
}

fn source_report(job: &Job, sh: &Shared, s: usize, st: &SourceStats) -> SourceReport {
    let mut examples = st.examples.clone();
    examples.sort_by_key(|e| (e.reason, e.task, e.index));
    let mut kept: Vec<Example> = Vec::new();
    let mut per_reason = std::collections::BTreeMap::new();
    for e in examples {
        let count = per_reason.entry(e.reason).or_insert(0usize);
        *count += 1;
        if *count > stats::EXAMPLES_PER_REASON {
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
        examples: kept,
    }
}

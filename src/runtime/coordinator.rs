//! The coordinator, on the calling thread: merges what shards ship into
//! window rows, and takes checkpoints.
//!
//! Emission: when every shard has passed a window's end (the job
//! watermark), that window's rows are rendered in a fixed order — by window
//! end, metric, then key — so output is identical whatever the number of
//! workers, and whether or not the run was resumed.
//!
//! A checkpoint: pause the block counter at T (`Shared::pause`); each
//! worker, once its router has sent every block before T and its shard has
//! received them all, writes its shard's state and sends a `Cut` report
//! behind everything it shipped before. When all N reports are in, the
//! coordinator has merged exactly the blocks before T: it lets routers go
//! on, encodes its own state, appends new group keys, flushes the sinks,
//! and hands all of it to the checkpoint writer thread, which writes the
//! shards' copies, syncs everything and commits the manifest. Workers wait
//! only for copying their changed state to memory; the emit loop does not
//! wait for the disk either. One checkpoint is in flight at a time.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use super::mesh::BlockSeq;
use super::resume::Resume;
use super::shard::ShardCheckpoint;
use super::stats::SourceStats;
use super::{CheckpointReport, RunError, Shared, ToEmitter, WorkerReport, NO_EVENTS};
use crate::checkpoint::dict::DictLog;
use crate::checkpoint::identity::{job_identity, sink_target};
use crate::checkpoint::{
    CheckpointError, Committer, FileRef, InputCut, Manifest, MetaSaved, PendingFile, SinkCut, SourceCut, StateDir,
    FORMAT_VERSION,
};
use crate::job::SinkTarget;
use crate::metric::cumulate::{CumulateEmitter, Row};
use crate::metric::detail::DetailBuf;
use crate::serve::store::{Store, StoreSaved};
use crate::serve::Live;
use crate::sink::Sink;
use crate::source::kafka::KafkaSource;
use crate::source::stream::Chain;
use crate::state::snapshot::SnapshotPool;

/// How often the coordinator looks at the clock and the stop flag while
/// no message arrives.
const TICK: Duration = Duration::from_millis(20);
/// Longest a stop waits for TCP input held by readers to reach the routers.
const STOP_HANDOVER_MAX: Duration = Duration::from_secs(30);

/// The cut workers are asked to reach.
pub(crate) struct CutRequest {
    /// The generation it will commit as (unique per request: it also
    /// tells workers a new cut is asked for).
    pub generation: u64,
    /// Blocks of each source before the cut.
    pub blocks: Vec<BlockSeq>,
    /// Workers exit after writing their part (stopped by a signal).
    pub stop: bool,
    /// Where checkpoint files go.
    pub dir: PathBuf,
    /// Memory for the shards' copies.
    pub snapshots: Arc<SnapshotPool>,
}

/// One worker's part of a checkpoint.
pub(crate) struct CutReport {
    shard: usize,
    generation: u64,
    written: ShardCheckpoint,
    /// The worker's router counters up to the cut (since this process started).
    stats: Vec<SourceStats>,
    /// Seconds to reach the cut, then to write the shard's part.
    timing: (f64, f64),
}

impl CutReport {
    pub fn new(
        shard: usize,
        cut: &CutRequest,
        written: ShardCheckpoint,
        stats: Vec<SourceStats>,
        timing: (f64, f64),
    ) -> CutReport {
        CutReport { shard, generation: cut.generation, written, stats, timing }
    }
}

struct Pending {
    req: Arc<CutRequest>,
    task: usize,
    started: Instant,
    reports: Vec<CutReport>,
}

/// A checkpoint handed to the writer.
struct CommitJob {
    manifest: Manifest,
    files: Vec<PendingFile>,
    /// Files written before (sinks, key logs) that must be synced too.
    sync: Vec<PathBuf>,
}

/// A checkpoint the writer has not committed yet.
struct InFlight {
    generation: u64,
    started: Instant,
    bytes: u64,
    /// Stream sources' positions, committed to Kafka once the checkpoint is.
    chains: Vec<Option<Chain>>,
}

/// The checkpoint writer thread: writes, syncs and commits checkpoints in
/// the order they are handed over.
struct Writer {
    jobs: Option<Sender<CommitJob>>,
    done: Receiver<Result<u64, CheckpointError>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(committer: Committer) -> Result<Writer, CheckpointError> {
        let (jobs, todo) = crossbeam::channel::unbounded::<CommitJob>();
        let (report, done) = crossbeam::channel::unbounded();
        let dir = committer.root().to_owned();
        let thread = std::thread::Builder::new()
            .name("tally-checkpoint".into())
            .spawn(move || {
                for job in todo {
                    let r = committer.commit(&job.manifest, &job.files, &job.sync);
                    if report.send(r.map(|()| job.manifest.generation)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|source| CheckpointError::Io { dir, context: "start the checkpoint writer".into(), source })?;
        Ok(Writer { jobs: Some(jobs), done, thread: Some(thread) })
    }
}

impl Drop for Writer {
    /// Lets a checkpoint in flight finish (it is whole or not at all anyway).
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Checkpointing state (only with a state directory).
struct Ckpt {
    state: StateDir,
    /// Last committed generation (0: none).
    generation: u64,
    dict_logs: Vec<DictLog>,
    interval: Option<Duration>,
    due: Instant,
    pending: Option<Pending>,
    snapshots: Arc<SnapshotPool>,
    /// Started on the first checkpoint.
    writer: Option<Writer>,
    in_flight: Option<InFlight>,
    /// The checkpoint resumed from had read all input already.
    complete_at_start: bool,
    /// Blocks per source before the last cut asked for: a stream source
    /// that brought nothing new since is not checkpointed again.
    last_cut: Option<Vec<BlockSeq>>,
    /// When a stop asked TCP readers to hand over what they hold.
    stop_asked: Option<Instant>,
    /// The API store's files in the last manifest (base, then rows).
    api_files: Vec<FileRef>,
}

/// `tally serve`'s store, kept in the checkpoints.
struct ApiKept {
    live: Arc<Live>,
    /// Bytes of the base in `Ckpt::api_files`, and of the rows after it.
    base_bytes: u64,
    rows_bytes: u64,
}

/// Rows files (JSON lines) after a base add up to at most this many bytes,
/// or the base's, before a checkpoint writes a new base.
const API_ROWS_MIN_BEFORE_BASE: u64 = 1 << 20;

pub(crate) struct Coordinator<'a> {
    emitters: Vec<CumulateEmitter>,
    shard_wm: Vec<i64>,
    job_wm: i64,
    rows: Vec<Row>,
    stop: &'a AtomicBool,
    /// A stop request was acted on.
    stop_seen: bool,
    stopped: bool,
    ckpt: Option<Ckpt>,
    /// Counters and rows of the run(s) before the resumed checkpoint.
    stats_before: Vec<SourceStats>,
    rows_before: u64,
    resumed_from: Option<u64>,
    report: CheckpointReport,
    /// Per source: its Kafka readers (offsets are committed through them).
    kafka: &'a [Option<KafkaSource>],
    /// Source names as JSON strings.
    source_names: Vec<String>,
    /// Where `minute_devices` rows are rendered, one after the other.
    detail_row: Row,
    progress: Arc<crate::runtime::stats::Progress>,
    api: Option<ApiKept>,
}

impl<'a> Coordinator<'a> {
    pub fn new(
        sh: &Shared,
        resume: Option<Resume>,
        stop: &'a AtomicBool,
        kafka: &'a [Option<KafkaSource>],
    ) -> Coordinator<'a> {
        let n = sh.mesh.n;
        let mut emitters: Vec<CumulateEmitter> = sh
            .job
            .metrics
            .iter()
            .enumerate()
            .map(|(m, spec)| {
                let mut e = CumulateEmitter::new(sh.geometry[m], spec, sh.dicts[m].clone());
                if sh.job.minute_devices(m) {
                    e.details = Some(Default::default());
                }
                e
            })
            .collect();
        let mut c = Coordinator {
            emitters: Vec::new(),
            shard_wm: vec![i64::MIN; n],
            job_wm: i64::MIN,
            rows: Vec::new(),
            stop,
            stop_seen: false,
            stopped: false,
            ckpt: None,
            stats_before: Vec::new(),
            rows_before: 0,
            resumed_from: None,
            report: CheckpointReport::default(),
            kafka,
            source_names: sh.job.sources.iter().map(|s| serde_json::Value::from(s.name.as_str()).to_string()).collect(),
            detail_row: Row { window_end_ms: 0, metric: 0, line: String::new(), key_at: 0..0 },
            progress: sh.progress.clone(),
            api: None,
        };
        if let Some(r) = resume {
            let interval = (sh.job.checkpoint_interval_ms > 0)
                .then(|| Duration::from_millis(sh.job.checkpoint_interval_ms as u64));
            let mut generation = 0;
            let mut complete_at_start = false;
            let mut api_files = Vec::new();
            if let Some(m) = &r.manifest {
                api_files = m.api.clone();
                generation = m.generation;
                complete_at_start = m.input.next_task >= m.input.tasks
                    && m.input.sources.iter().all(|c| c.stream.as_ref().is_none_or(|s| s.ended));
                c.resumed_from = Some(m.generation);
                for (e, saved) in emitters.iter_mut().zip(r.meta.emitters) {
                    e.restore(saved);
                }
                c.shard_wm = r.meta.shard_wm;
                c.job_wm = r.meta.job_wm;
                c.stats_before = r.meta.stats;
                c.rows_before = r.meta.rows;
            }
            c.ckpt = Some(Ckpt {
                state: r.state,
                generation,
                dict_logs: r.dict_logs,
                interval,
                due: Instant::now() + interval.unwrap_or_default(),
                pending: None,
                snapshots: Arc::default(),
                writer: None,
                in_flight: None,
                complete_at_start,
                last_cut: None,
                stop_asked: None,
                api_files,
            });
        }
        c.emitters = emitters;
        c
    }

    pub fn rows_before(&self) -> u64 {
        self.rows_before
    }

    pub fn stats_before(&self) -> Vec<SourceStats> {
        self.stats_before.clone()
    }

    pub fn resumed_from(&self) -> Option<u64> {
        self.resumed_from
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    pub fn report(&self) -> CheckpointReport {
        self.report.clone()
    }

    /// Merges shard output, writes rows and takes checkpoints until every
    /// worker finished.
    pub fn run(
        &mut self,
        sh: &Shared,
        rx: &Receiver<ToEmitter>,
        sinks: &mut [Sink],
    ) -> Result<Vec<WorkerReport>, RunError> {
        let n = sh.mesh.n;
        let mut reports = Vec::new();
        let mut failure = None;
        while reports.len() + failure.iter().count() < n {
            if failure.is_none() {
                self.committed(false)?;
                self.tick(sh);
                if let Some(e) = self.kafka.iter().flatten().find_map(|k| k.failed.lock().ok()?.clone()) {
                    sh.stop_workers();
                    failure = Some(format!("a Kafka source failed: {e}"));
                }
            }
            let msg = match rx.recv_timeout(TICK) {
                Ok(msg) => msg,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            match msg {
                ToEmitter::Slice { metric, cols } => self.emitters[metric].add(cols),
                ToEmitter::Details { metric, slice, rows } => {
                    self.emitters[metric].add_details(slice, rows).map_err(|e| RunError::Worker(e.to_string()))?
                }
                ToEmitter::Watermark { shard, wm_ms } => self.watermark(shard, wm_ms, sinks)?,
                ToEmitter::Events { sink, lines } => sinks[sink].write_events(&lines)?,
                ToEmitter::Cut(r) => self.cut_report(sh, *r, sinks)?,
                ToEmitter::Finished(r) => reports.push(*r),
                ToEmitter::Failed(e) => {
                    sh.stop_workers();
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) => Err(RunError::Worker(e)),
            None => Ok(reports),
        }
    }

    /// `tally serve`: restores the API's store from the checkpoint resumed
    /// from (false if it holds none: a state directory of an earlier
    /// version, or a run without the API), then keeps it in every
    /// checkpoint. Without a state directory it does nothing.
    pub fn keep_api(&mut self, live: Arc<Live>) -> Result<bool, RunError> {
        let Some(ck) = &self.ckpt else {
            return Ok(false);
        };
        let mut kept = ApiKept { live, base_bytes: 0, rows_bytes: 0 };
        let restored = if let Some((base, rows)) = ck.api_files.split_first() {
            let saved: StoreSaved = ck.state.read_saved(base)?;
            let fits = kept.live.with_store(|s| s.restore(saved));
            if !fits {
                let reason = format!("{} does not hold the API store of this job", base.file);
                return Err(CheckpointError::Refused { dir: ck.state.root.clone(), reason }.into());
            }
            for r in rows {
                let text = ck.state.read_checked(r)?;
                kept.live.replay(&String::from_utf8_lossy(&text));
            }
            kept.base_bytes = base.bytes;
            kept.rows_bytes = rows.iter().map(|r| r.bytes).sum();
            true
        } else {
            false
        };
        kept.live.with_store(Store::keep_journal);
        self.api = Some(kept);
        Ok(restored)
    }

    fn watermark(&mut self, shard: usize, wm_ms: i64, sinks: &mut [Sink]) -> Result<(), RunError> {
        self.shard_wm[shard] = wm_ms;
        let wm = self.shard_wm.iter().copied().min().unwrap_or(i64::MIN);
        if wm <= self.job_wm {
            return Ok(());
        }
        self.job_wm = wm;
        self.progress.watermark_ms.store(wm, Ordering::Relaxed);
        for (m, e) in self.emitters.iter_mut().enumerate() {
            e.emit(m, wm, wm == i64::MAX, &mut self.rows);
        }
        self.rows.sort_by_key(|r| (r.window_end_ms, r.metric));
        for r in self.rows.drain(..) {
            for s in sinks.iter_mut() {
                s.write(&r)?;
            }
        }
        // Detail rows by step, then metric, then (in render_details)
        // source, dims and device id: the same bytes whichever shard
        // shipped first, whatever the worker count.
        let mut ready: Vec<(u32, usize, DetailBuf)> = Vec::new();
        for (m, e) in self.emitters.iter_mut().enumerate() {
            ready.extend(e.take_details(wm).into_iter().map(|(slice, buf)| (slice, m, buf)));
        }
        ready.sort_by_key(|&(slice, m, _)| (slice, m));
        for (slice, m, buf) in ready {
            self.emitters[m].render_details(m, slice, &buf, &self.source_names, &mut self.detail_row, &mut |r| {
                sinks.iter_mut().try_for_each(|s| s.write_detail(r))
            })?;
        }
        Ok(())
    }

    /// Acts on a stop request or a due checkpoint.
    fn tick(&mut self, sh: &Shared) {
        for (s, g) in sh.progress.shards.iter().enumerate() {
            g.queued_batches.store(sh.mesh.queued(s) as u64, Ordering::Relaxed);
        }
        let stop = !self.stop_seen && self.stop.load(Ordering::Relaxed);
        let Some(ck) = &mut self.ckpt else {
            if stop {
                // Nothing to save progress in: stop where we are.
                self.stop_seen = true;
                self.stopped = true;
                sh.stop_workers();
            }
            return;
        };
        if ck.pending.is_some() || ck.in_flight.is_some() {
            return;
        }
        if stop && !streams_handed_over(sh, &mut ck.stop_asked) {
            return;
        }
        let due = ck.interval.is_some() && Instant::now() >= ck.due;
        if !stop && !due {
            return;
        }
        let started = Instant::now();
        let task = sh.pause();
        let stream_cut = sh.pause_streams();
        if task >= sh.plan.tasks.len() && !sh.streams_live() {
            // Every block is claimed: the run ends soon and checkpoints then.
            sh.resume();
            self.stop_seen |= stop;
            ck.due = Instant::now() + ck.interval.unwrap_or_default();
            return;
        }
        let mut blocks: Vec<BlockSeq> = vec![0; sh.job.sources.len()];
        for t in &sh.plan.tasks[..task] {
            blocks[t.source] += 1;
        }
        for (b, cut) in blocks.iter_mut().zip(stream_cut) {
            if let Some(seq) = cut {
                *b = seq;
            }
        }
        if !stop && ck.last_cut.as_ref() == Some(&blocks) {
            // Nothing arrived since the last checkpoint (an idle stream).
            sh.resume();
            ck.due = Instant::now() + ck.interval.unwrap_or_default();
            return;
        }
        ck.last_cut = Some(blocks.clone());
        let generation = ck.generation + 1;
        let req =
            Arc::new(CutRequest { generation, blocks, stop, dir: ck.state.ckpt(), snapshots: ck.snapshots.clone() });
        *sh.cut.lock().unwrap_or_else(|p| p.into_inner()) = Some(req.clone());
        sh.cut_epoch.store(generation, Ordering::Release);
        sh.wake.all();
        ck.pending = Some(Pending { req, task, started, reports: Vec::new() });
        if stop {
            self.stop_seen = true;
            self.stopped = true;
        }
    }

    fn cut_report(&mut self, sh: &Shared, r: CutReport, sinks: &mut [Sink]) -> Result<(), RunError> {
        let Some(ck) = &mut self.ckpt else {
            return Ok(());
        };
        let Some(p) = &mut ck.pending else {
            return Ok(());
        };
        debug_assert_eq!(r.generation, p.req.generation, "a cut report from another checkpoint");
        p.reports.push(r);
        if p.reports.len() < sh.mesh.n {
            return Ok(());
        }
        let Some(mut p) = ck.pending.take() else {
            return Ok(());
        };
        // Streams stand at the cut until the routers go on.
        let chains = sh.chains();
        if !p.req.stop {
            sh.resume();
        }
        let pause = p.started.elapsed();
        p.reports.sort_by_key(|r| r.shard);
        let mut stats = self.stats_before.clone();
        let mut shards = Vec::new();
        let mut tables = Vec::new();
        let mut files = Vec::new();
        let mut bytes = 0;
        for r in p.reports {
            self.report.drain_seconds_max = self.report.drain_seconds_max.max(r.timing.0);
            self.report.shard_copy_seconds_max = self.report.shard_copy_seconds_max.max(r.timing.1);
            merge_stats(&mut stats, &r.stats);
            shards.push(r.written.file);
            tables.extend(r.written.tables);
            files.extend(r.written.files);
            bytes += r.written.bytes;
        }
        self.report.pause_seconds_max = self.report.pause_seconds_max.max(pause.as_secs_f64());
        let at = (p.req.generation, p.task, p.started);
        self.commit(sh, at, chains, shards, tables, files, stats, sinks, bytes)
    }

    /// After the last worker finished: the checkpoint of the end of input
    /// (every period was flushed; what shards still hold is the device
    /// history of DAU metrics).
    pub fn finish(&mut self, sh: &Shared, reports: &mut [WorkerReport], sinks: &mut [Sink]) -> Result<(), RunError> {
        self.committed(true)?;
        let Some(ck) = &self.ckpt else {
            if !self.stopped {
                // No checkpoints: the group learns how far the input was
                // read once the rows of all of it are written.
                for (k, chain) in self.kafka.iter().zip(sh.chains()) {
                    if let (Some(k), Some(chain)) = (k, chain) {
                        k.commit(&chain.offsets(), true);
                    }
                }
            }
            return Ok(());
        };
        if self.stopped || ck.complete_at_start {
            return Ok(());
        }
        let generation = ck.generation + 1;
        let cut = CutRequest {
            generation,
            blocks: Vec::new(),
            stop: false,
            dir: ck.state.ckpt(),
            snapshots: ck.snapshots.clone(),
        };
        let chains = sh.chains();
        let mut stats = self.stats_before.clone();
        let (mut shards, mut tables, mut files, mut bytes) = (Vec::new(), Vec::new(), Vec::new(), 0);
        reports.sort_by_key(|r| r.shard.as_ref().map(|s| s.index()));
        for r in reports.iter_mut() {
            merge_stats(&mut stats, &r.stats);
            let Some(shard) = r.shard.as_mut() else {
                return Err(RunError::Worker("a worker ended without handing back its shard".into()));
            };
            let written = shard.checkpoint(&cut).map_err(RunError::Table)?;
            shards.push(written.file);
            tables.extend(written.tables);
            files.extend(written.files);
            bytes += written.bytes;
        }
        let at = (generation, sh.plan.tasks.len(), Instant::now());
        self.commit(sh, at, chains, shards, tables, files, stats, sinks, bytes)?;
        self.committed(true)
    }

    /// Takes the writer's word on the checkpoint in flight, waiting for it
    /// if `wait`; a failed write fails the run.
    fn committed(&mut self, wait: bool) -> Result<(), RunError> {
        let Some(ck) = &mut self.ckpt else {
            return Ok(());
        };
        let (Some(f), Some(w)) = (&ck.in_flight, &ck.writer) else {
            return Ok(());
        };
        let r = match wait {
            true => w.done.recv().map_err(|_| TryRecvError::Disconnected),
            false => w.done.try_recv(),
        };
        let generation = match r {
            Ok(r) => r?,
            Err(TryRecvError::Empty) => return Ok(()),
            Err(TryRecvError::Disconnected) => {
                let source = std::io::Error::other("the checkpoint writer stopped");
                return Err(CheckpointError::Io { dir: ck.state.root.clone(), context: "write".into(), source }.into());
            }
        };
        debug_assert_eq!(generation, f.generation, "checkpoints commit in order");
        ck.generation = generation;
        ck.due = Instant::now() + ck.interval.unwrap_or_default();
        let took = f.started.elapsed().as_secs_f64();
        self.report.count += 1;
        self.report.generation = Some(generation);
        self.report.bytes_written += f.bytes;
        self.report.seconds_max = self.report.seconds_max.max(took);
        self.report.seconds_total += took;
        self.progress.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.progress.checkpoint_last_us.store((took * 1e6) as u64, Ordering::Relaxed);
        self.progress.checkpoint_bytes.fetch_add(f.bytes, Ordering::Relaxed);
        // Only now may the consumer group learn how far the input was read.
        for (k, chain) in self.kafka.iter().zip(&f.chains) {
            if let (Some(k), Some(chain)) = (k, chain) {
                k.commit(&chain.offsets(), wait);
            }
        }
        ck.in_flight = None;
        Ok(())
    }

    /// Encodes the coordinator's part of checkpoint `at` = (generation,
    /// cut before block `task`, started) and hands the checkpoint to the
    /// writer, which syncs everything and commits the manifest.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &mut self,
        sh: &Shared,
        (generation, task, started): (u64, usize, Instant),
        chains: Vec<Option<Chain>>,
        shards: Vec<FileRef>,
        tables: Vec<FileRef>,
        mut files: Vec<PendingFile>,
        stats: Vec<SourceStats>,
        sinks: &mut [Sink],
        shard_bytes: u64,
    ) -> Result<(), RunError> {
        let rows = self.rows_before + sinks.iter().map(Sink::rows).sum::<u64>();
        let Some(ck) = &mut self.ckpt else {
            return Ok(());
        };
        let io = |context: &str| {
            let dir = ck.state.root.clone();
            let context = context.to_owned();
            move |source| CheckpointError::Io { dir, context, source }
        };
        let mut sync = Vec::new();
        let mut sink_cuts = Vec::new();
        for (s, spec) in sinks.iter_mut().zip(&sh.job.sinks) {
            s.flush()?;
            if let SinkTarget::File(p) = &spec.target {
                sync.push(p.clone());
            }
            sink_cuts.push(SinkCut { target: sink_target(&spec.target), bytes: s.bytes() });
        }
        let mut dicts = Vec::new();
        for (m, log) in ck.dict_logs.iter_mut().enumerate() {
            let (cut, changed) =
                log.append(&ck.state.ckpt(), &sh.job.metrics[m].name, &sh.dicts[m]).map_err(io("append keys"))?;
            if changed {
                sync.push(ck.state.ckpt().join(&cut.file));
            }
            dicts.push(cut);
        }
        let meta = MetaSaved {
            emitters: self.emitters.iter().map(CumulateEmitter::saved).collect(),
            shard_wm: self.shard_wm.clone(),
            job_wm: self.job_wm,
            stats,
            line_counts: sh.line_counts[..task].iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            rows,
        };
        let (pending, meta) = ck.state.saved(format!("g{generation}.meta"), &meta)?;
        files.push(pending);
        let mut api_bytes = 0;
        if let Some(api) = &mut self.api {
            // The rows the sinks got up to this cut are in the store: a
            // restart from this checkpoint re-emits only later ones.
            let journal = api.live.with_store(Store::take_journal).filter(|j| {
                !ck.api_files.is_empty()
                    && api.rows_bytes + j.len() as u64 <= api.base_bytes.max(API_ROWS_MIN_BEFORE_BASE)
            });
            match journal {
                None => {
                    let (pending, base) =
                        ck.state.saved(format!("g{generation}.api"), &api.live.with_store(|s| s.saved()))?;
                    files.push(pending);
                    api.base_bytes = base.bytes;
                    api.rows_bytes = 0;
                    api_bytes = base.bytes;
                    ck.api_files = vec![base];
                }
                Some(journal) if !journal.is_empty() => {
                    let (pending, r) =
                        PendingFile::raw(&ck.state.ckpt(), format!("g{generation}.rows"), journal.into_bytes());
                    files.push(pending);
                    api.rows_bytes += r.bytes;
                    api_bytes = r.bytes;
                    ck.api_files.push(r);
                }
                Some(_) => {}
            }
        }
        let bytes = shard_bytes + meta.bytes + api_bytes;
        let manifest = Manifest {
            format: FORMAT_VERSION,
            generation,
            workers: sh.mesh.n,
            job: job_identity(&sh.job),
            input: input_cut(sh, task, &chains),
            sinks: sink_cuts,
            dicts,
            meta,
            shards,
            tables,
            api: ck.api_files.clone(),
        };
        let writer = match &mut ck.writer {
            Some(w) => w,
            None => ck.writer.insert(Writer::start(ck.state.committer())?),
        };
        if let Some(jobs) = &writer.jobs {
            // The writer only hangs up by panicking; `committed` reports that.
            let _ = jobs.send(CommitJob { manifest, files, sync });
        }
        ck.in_flight = Some(InFlight { generation, started, bytes, chains });
        Ok(())
    }
}

/// At a stop: whether every stream that cannot be read again (TCP) took
/// no more input and its routers claimed every block it held, so that the
/// last checkpoint covers all it received. Gives up waiting after
/// [`STOP_HANDOVER_MAX`] (what is still held is then lost, and said).
fn streams_handed_over(sh: &Shared, asked: &mut Option<Instant>) -> bool {
    let since = *asked.get_or_insert_with(Instant::now);
    let mut waiting = false;
    for s in sh.streams.iter().flatten().filter(|s| !s.replayable) {
        s.closing.store(true, Ordering::Relaxed);
        waiting |= !s.closed.load(Ordering::Acquire) || s.queued() > 0;
    }
    if waiting && since.elapsed() >= STOP_HANDOVER_MAX {
        eprintln!(
            "tally: stop: the routers did not take all TCP input within {}s; what is left is not in the checkpoint",
            STOP_HANDOVER_MAX.as_secs()
        );
        return true;
    }
    !waiting
}

fn merge_stats(into: &mut Vec<SourceStats>, from: &[SourceStats]) {
    if into.len() < from.len() {
        into.resize_with(from.len(), SourceStats::default);
    }
    for (a, b) in into.iter_mut().zip(from) {
        a.merge(b);
    }
}

/// Every source's position at a cut before block `task` (stream sources:
/// their chains at the cut).
fn input_cut(sh: &Shared, task: usize, chains: &[Option<Chain>]) -> InputCut {
    let plan = &sh.plan;
    let sources = sh
        .job
        .sources
        .iter()
        .enumerate()
        .map(|(s, spec)| {
            if let Some(chain) = &chains[s] {
                return SourceCut {
                    name: spec.name.clone(),
                    blocks_done: chain.next_seq,
                    prefix_max_ms: NO_EVENTS,
                    files: Vec::new(),
                    resume_at: None,
                    stream: Some(chain.clone()),
                };
            }
            let blocks_done = plan.tasks[..task].iter().filter(|t| t.source == s).count() as BlockSeq;
            let prefix_max_ms = match blocks_done {
                0 => NO_EVENTS,
                b => sh.prefix[s][b as usize - 1].load(Ordering::Acquire),
            };
            let resume_at = plan
                .tasks
                .iter()
                .find(|t| t.source == s && BlockSeq::from(t.seq) == blocks_done)
                .map(|t| (plan.files[t.file].path.display().to_string(), t.lo));
            SourceCut {
                name: spec.name.clone(),
                blocks_done,
                prefix_max_ms,
                files: plan.files.iter().filter(|f| f.source == s).map(|f| f.identity.clone()).collect(),
                resume_at,
                stream: None,
            }
        })
        .collect();
    InputCut { next_task: task, tasks: plan.tasks.len(), sources }
}

//! Opening a state directory: resume from its checkpoint, or start fresh.
//!
//! Everything is checked before any thread starts: the manifest's
//! checksum, that the job computes the same things, that the input files
//! already read are unchanged, and every checkpoint file's size and
//! checksum. A mismatch is refused with what differs; nothing is ever
//! silently mixed. A checkpoint cut into another number of shards (another
//! worker count) is re-sharded: exact, since shards only partition devices.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::shard::Shard;
use super::Shared;
use crate::checkpoint::dict::DictLog;
use crate::checkpoint::identity::{differences, job_identity};
use crate::checkpoint::{CheckpointError, Manifest, MetaSaved, ShardSaved, StateDir};
use crate::job::Job;
use crate::metric::keys::KeyDict;
use crate::source::file::Plan;

/// A state directory opened for a run, with what its checkpoint holds.
pub(crate) struct Resume {
    pub state: StateDir,
    pub manifest: Option<Manifest>,
    pub meta: MetaSaved,
    pub shards: Vec<ShardSaved>,
    pub dict_logs: Vec<DictLog>,
    pub dicts: Vec<Arc<KeyDict>>,
}

/// Differences listed in a refusal, at most.
const DIFFERENCES_SHOWN_MAX: usize = 5;

pub(crate) fn open(job: &Job, plan: &Plan, dir: &Path) -> Result<Resume, CheckpointError> {
    let state = StateDir::open(dir)?;
    let refuse = |reason: String| CheckpointError::Refused { dir: dir.to_owned(), reason };
    let Some(m) = state.manifest()? else {
        state.remove_unnamed(None);
        let dict_logs = (0..job.metrics.len())
            .map(|i| DictLog::fresh(&state.ckpt(), i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CheckpointError::Io { dir: dir.to_owned(), context: "create key logs".into(), source: e })?;
        let dicts = job.metrics.iter().map(|_| Arc::new(KeyDict::default())).collect();
        return Ok(Resume { state, manifest: None, meta: MetaSaved::default(), shards: Vec::new(), dict_logs, dicts });
    };
    let diffs = differences(&m.job, &job_identity(job), DIFFERENCES_SHOWN_MAX);
    if !diffs.is_empty() {
        return Err(refuse(format!(
            "the job changed since its checkpoint ({}); run the job it was written by, or use a new state directory",
            diffs.join("; ")
        )));
    }
    check_input(&m, plan).map_err(|why| {
        refuse(format!("input changed since its checkpoint: {why}; restore the input, or use a new state directory"))
    })?;
    state.check_tables(&m)?;
    let meta: MetaSaved = state.read_saved(&m.meta)?;
    let shards: Vec<ShardSaved> = m.shards.iter().map(|f| state.read_saved(f)).collect::<Result<_, _>>()?;
    let mut meta = meta;
    let shape_ok = shards.len() == m.workers
        && meta.emitters.len() == job.metrics.len()
        && meta.shard_wm.len() == m.workers
        && meta.line_counts.len() == m.input.next_task
        && m.dicts.len() == job.metrics.len()
        && m.sinks.len() == job.sinks.len();
    if !shape_ok {
        return Err(state.corrupt(&m.meta.file, "does not match the manifest's job"));
    }
    if m.workers != job.workers {
        // Re-sharded in `place`: every shard stood at the same cut.
        let wm = meta.shard_wm.iter().copied().min().unwrap_or(i64::MIN);
        meta.shard_wm = vec![wm; job.workers];
    }
    let mut dict_logs = Vec::new();
    let mut dicts = Vec::new();
    for cut in &m.dicts {
        let (log, dict) = DictLog::restore(&state.ckpt(), cut).map_err(|why| state.corrupt(&cut.file, why))?;
        dict_logs.push(log);
        dicts.push(Arc::new(dict));
    }
    state.remove_unnamed(Some(&m));
    Ok(Resume { state, manifest: Some(m), meta, shards, dict_logs, dicts })
}

/// Whether the input files are the ones the checkpoint read.
fn check_input(m: &Manifest, plan: &Plan) -> Result<(), String> {
    for (s, cut) in m.input.sources.iter().enumerate() {
        let now: Vec<_> = plan.files.iter().filter(|f| f.source == s).map(|f| &f.identity).collect();
        if now.len() != cut.files.len() {
            return Err(format!("source {:?} had {} files, now {}", cut.name, cut.files.len(), now.len()));
        }
        for (was, now) in cut.files.iter().zip(now) {
            if let Some(why) = was.change(now) {
                return Err(why);
            }
        }
    }
    if m.input.tasks != plan.tasks.len() {
        return Err(format!("{} blocks, the checkpoint planned {}", plan.tasks.len(), m.input.tasks));
    }
    Ok(())
}

impl Resume {
    /// Puts the checkpoint's input position into the run (block counter,
    /// watermark bases, line counts) and builds the shards, rebuilding
    /// their tables in parallel.
    pub fn place(&self, sh: &Shared) -> Result<Vec<Shard>, CheckpointError> {
        let live = sh.job.state_tables_mapped.then(|| self.state.live());
        let live = live.as_deref();
        let Some(m) = &self.manifest else {
            let fresh = (0..sh.mesh.n).map(|w| Shard::new(w, sh, live, true)).collect::<std::io::Result<Vec<_>>>();
            return fresh.map_err(|e| self.state.table_error(e));
        };
        sh.next_task.store(m.input.next_task, Ordering::Relaxed);
        for (s, cut) in m.input.sources.iter().enumerate() {
            if cut.blocks_done > 0 && cut.stream.is_none() {
                sh.prefix[s][cut.blocks_done as usize - 1].store(cut.prefix_max_ms, Ordering::Relaxed);
            }
        }
        for (c, &n) in sh.line_counts.iter().zip(&self.meta.line_counts) {
            c.store(n, Ordering::Relaxed);
        }
        let ckpt = self.state.ckpt();
        let resharding = self.shards.len() != sh.mesh.n;
        let built: Vec<std::io::Result<Shard>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .shards
                .iter()
                .enumerate()
                .map(|(w, saved)| {
                    let ckpt = &ckpt;
                    // Shards of another worker count are rebuilt in memory, then re-sharded.
                    let live = if resharding { None } else { live };
                    scope.spawn(move || {
                        let mut shard = Shard::new(w, sh, live, !resharding)?;
                        shard.restore(saved, ckpt).map(|()| shard)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(std::io::Error::other("a shard panicked while restoring"))))
                .collect()
        });
        if resharding {
            let old =
                built.into_iter().collect::<std::io::Result<Vec<Shard>>>().map_err(|e| self.state.table_error(e))?;
            let mut new: Vec<Shard> = (0..sh.mesh.n)
                .map(|w| Shard::new(w, sh, live, true))
                .collect::<std::io::Result<_>>()
                .map_err(|e| self.state.table_error(e))?;
            Shard::reshard(&old, &mut new).map_err(|e| self.state.table_error(e))?;
            eprintln!("tally: checkpoint of {} shards re-sharded into {}", old.len(), new.len());
            return Ok(new);
        }
        built.into_iter().map(|r| r.map_err(|e| self.state.table_error(e))).collect()
    }
}

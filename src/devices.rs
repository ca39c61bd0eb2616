//! `tally devices export`: a DAU metric's device history as of a state
//! directory's last checkpoint, written back as the CSV `device_history`
//! imports (`did,first_day,last_day`), so tomorrow's run (or the offline
//! warehouse) starts from today's history.
//!
//! Every device the history holds: those imported, rolled forward with
//! each day that closed (`first_day` when it was new, `last_day` its last
//! day active). Rows are sorted by device id, so an export of the same
//! state is the same file.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::checkpoint::identity::{differences, job_identity};
use crate::checkpoint::{CheckpointError, ShardSaved, StateDir};
use crate::job::Job;
use crate::metric::cumulate::{read_dids, read_table};
use crate::state::dids::DidTable;
use crate::state::history::DeviceHistory;
use crate::verify::civil_from_days;

/// What an export wrote.
#[derive(Debug, Default)]
pub struct ExportReport {
    pub metric: String,
    pub generation: u64,
    pub devices: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    State(#[from] CheckpointError),
    #[error("state directory {dir}: {why}")]
    Table { dir: PathBuf, why: String },
    #[error("{path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// Writes DAU metric `metric` (the job's only DAU metric if `None`) of the
/// checkpoint in `state_dir` to `out` ("-": stdout).
pub fn export(job: &Job, state_dir: &Path, metric: Option<&str>, out: &Path) -> Result<ExportReport, ExportError> {
    let dau: Vec<usize> = (0..job.metrics.len()).filter(|&m| job.metrics[m].dau.is_some()).collect();
    let m = match metric {
        Some(name) => {
            let m = job.metrics.iter().position(|s| s.name == name);
            match m {
                Some(m) if dau.contains(&m) => m,
                Some(_) => return Err(ExportError::Usage(format!("metric {name:?} is not a DAU metric"))),
                None => return Err(ExportError::Usage(format!("the job has no metric {name:?}"))),
            }
        }
        None => match dau[..] {
            [m] => m,
            [] => return Err(ExportError::Usage("the job has no DAU metric".into())),
            _ => return Err(ExportError::Usage("the job has several DAU metrics: name one with --metric".into())),
        },
    };
    let state = StateDir::open(state_dir)?;
    let Some(manifest) = state.manifest()? else {
        let why = "holds no checkpoint yet (run the job with it first)".into();
        return Err(ExportError::Table { dir: state_dir.to_owned(), why });
    };
    let diffs = differences(&manifest.job, &job_identity(job), 5);
    if !diffs.is_empty() {
        let why = format!("written by another job ({})", diffs.join("; "));
        return Err(ExportError::Table { dir: state_dir.to_owned(), why });
    }
    let table_err = |why: String| ExportError::Table { dir: state_dir.to_owned(), why };
    let mut rows: Vec<(Vec<u8>, u32, u32)> = Vec::new();
    for f in &manifest.shards {
        let saved: ShardSaved = state.read_saved(f)?;
        let shard = saved.metrics.get(m).ok_or_else(|| table_err(format!("{}: no metric {m}", f.file)))?;
        let (Some(h), Some(d)) = (&shard.history, &shard.dids) else {
            return Err(table_err(format!("{}: no device history for metric {m}", f.file)));
        };
        let history: DeviceHistory =
            read_table(&state.ckpt(), "history", h).map_err(|e| table_err(format!("{}: {e}", h.chain.base.file)))?;
        let dids: DidTable = read_dids(&state.ckpt(), d).map_err(|e| table_err(format!("{}: {e}", f.file)))?;
        for e in history.entries().iter().filter(|e| e.first_day != 0) {
            let mut id = Vec::new();
            if !dids.get(e.device_fp, &mut id) {
                let why = format!("device {:016x} of the history has no id text", e.device_fp);
                return Err(table_err(why));
            }
            rows.push((id, e.first_day, e.last_day));
        }
    }
    rows.sort_unstable();
    let write_err = |source| ExportError::Write { path: out.to_owned(), source };
    let date = |d: u32| {
        let (y, mo, da) = civil_from_days(d as i64);
        format!("{y:04}-{mo:02}-{da:02}")
    };
    let write = |w: &mut dyn Write| -> io::Result<()> {
        let mut csv = csv::Writer::from_writer(w);
        csv.write_record(["did", "first_day", "last_day"])?;
        for (id, first, last) in &rows {
            csv.write_record([&id[..], date(*first).as_bytes(), date(*last).as_bytes()])?;
        }
        csv.flush()
    };
    if out == Path::new("-") {
        write(&mut io::stdout().lock()).map_err(write_err)?;
    } else {
        // Written aside and renamed: a reader never sees half a file.
        let tmp = out.with_extension("csv.tmp");
        let mut f = io::BufWriter::new(std::fs::File::create(&tmp).map_err(write_err)?);
        write(&mut f).map_err(write_err)?;
        f.into_inner().map_err(|e| write_err(e.into_error()))?.sync_all().map_err(write_err)?;
        std::fs::rename(&tmp, out).map_err(write_err)?;
    }
    Ok(ExportReport {
        metric: job.metrics[m].name.clone(),
        generation: manifest.generation,
        devices: rows.len() as u64,
    })
}

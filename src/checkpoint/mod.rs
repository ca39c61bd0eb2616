//! Checkpoints: a consistent cut of every shard's state, the emitter's
//! state, the key dictionaries, the sinks' lengths and every source's input
//! position, written so that a crash at any instant leaves either the
//! previous or the new checkpoint whole.
//!
//! Layout of a state directory:
//!
//! ```text
//! LOCK                      held (flock) by the one process using the directory
//! MANIFEST                  the current checkpoint: JSON, then a line `xxh3:<hex>`
//! live/shard-S/…            the dedup tables the run works on (memory-mapped)
//! ckpt/sS-mM-pP-gG.base     a table's entries at checkpoint G
//! ckpt/sS-mM-pP-gG.delta    the entries changed since the previous checkpoint
//! ckpt/gG-sS.shard          a shard's open slices, progress and table chains
//! ckpt/gG.meta              emitter state, per-source counters, line counts
//! ckpt/dict-mM.log          a metric's group keys, appended at each checkpoint
//! ```
//!
//! Writing a checkpoint: every file is new (or an append past the length
//! the previous manifest records), then everything is fsynced, then
//! `MANIFEST.tmp` is written, fsynced and renamed over `MANIFEST`. Files
//! the new manifest no longer names are removed afterwards. On restart the
//! `live/` tables are rebuilt from the manifest's files, whose sizes and
//! xxh3 checksums are checked; anything that does not match is refused.

pub mod dict;
pub mod identity;

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::metric::cumulate::{CumulateEmitterSaved, CumulateShardSaved};
use crate::runtime::stats::SourceStats;
use crate::state::dedup::Written;

/// Version of the state directory layout.
pub const FORMAT_VERSION: u32 = 8;
pub const MANIFEST_FILE: &str = "MANIFEST";
pub const CKPT_DIR: &str = "ckpt";
pub const LIVE_DIR: &str = "live";
const LOCK_FILE: &str = "LOCK";

/// A checkpoint file: name (relative to `ckpt/`), size and xxh3-64.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub file: String,
    pub bytes: u64,
    pub xxh3: u64,
}

impl FileRef {
    pub fn new(file: String, w: Written) -> FileRef {
        FileRef { file, bytes: w.bytes, xxh3: w.xxh3 }
    }

    pub fn written(&self) -> Written {
        Written { bytes: self.bytes, xxh3: self.xxh3 }
    }
}

/// A checkpoint file copied out of the live state, held in memory until
/// the checkpoint writer puts it on disk (so workers wait for a copy, not
/// for the disk).
pub struct PendingFile {
    pub path: PathBuf,
    pub bytes: Pending,
}

/// The bytes of a [`PendingFile`]: a table's copy, or encoded state.
pub enum Pending {
    Copy(crate::state::snapshot::Snapshot),
    Encoded(Vec<u8>),
}

impl std::ops::Deref for Pending {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Pending::Copy(m) => m,
            Pending::Encoded(v) => v,
        }
    }
}

impl PendingFile {
    /// `value` encoded (postcard) as `dir/file`, with its reference.
    pub fn saved<T: Serialize>(dir: &Path, file: String, value: &T) -> io::Result<(PendingFile, FileRef)> {
        Ok(PendingFile::raw(dir, file, postcard::to_stdvec(value).map_err(io::Error::other)?))
    }

    /// `bytes` as they are as `dir/file`, with its reference.
    pub fn raw(dir: &Path, file: String, bytes: Vec<u8>) -> (PendingFile, FileRef) {
        let r = FileRef { bytes: bytes.len() as u64, xxh3: xxhash_rust::xxh3::xxh3_64(&bytes), file: file.clone() };
        (PendingFile { path: dir.join(file), bytes: Pending::Encoded(bytes) }, r)
    }

    fn write(&self) -> io::Result<()> {
        File::create(&self.path)?.write_all(&self.bytes)
    }
}

/// The current checkpoint of a state directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub generation: u64,
    /// Shards (= workers) the state is cut into: device-hash ranges depend on it.
    pub workers: usize,
    /// What the job computes (see [`identity::job_identity`]).
    pub job: serde_json::Value,
    pub input: InputCut,
    pub sinks: Vec<SinkCut>,
    pub dicts: Vec<dict::DictCut>,
    pub meta: FileRef,
    pub shards: Vec<FileRef>,
    /// Every table file the shard states name (for checking and cleanup).
    pub tables: Vec<FileRef>,
    /// `tally serve`: what its API answers from, a base of the whole store
    /// (`.api`) then the rows recorded after it, one file per checkpoint
    /// (`.rows`, JSON lines), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api: Vec<FileRef>,
}

/// Where the input stood at the cut.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InputCut {
    /// Blocks before this index in the run's block order are counted.
    pub next_task: usize,
    pub tasks: usize,
    pub sources: Vec<SourceCut>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceCut {
    pub name: String,
    /// Blocks of this source counted.
    pub blocks_done: crate::runtime::mesh::BlockSeq,
    /// Largest event time in those blocks (the watermark's base).
    pub prefix_max_ms: i64,
    pub files: Vec<identity::FileIdentity>,
    /// First byte not yet read (file and offset), if any is left.
    pub resume_at: Option<(String, u64)>,
    /// A stream source's partitions (offsets) and watermarks at the cut.
    pub stream: Option<crate::source::stream::Chain>,
}

/// How long a sink's output was at the cut.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SinkCut {
    pub target: String,
    pub bytes: u64,
}

/// A shard's state at the cut (`gG-sS.shard`, postcard).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ShardSaved {
    pub metrics: Vec<CumulateShardSaved>,
    /// Per source: blocks received and their watermark.
    pub progress: Vec<(crate::runtime::mesh::BlockSeq, i64)>,
    pub wm_ms: i64,
    pub state_bytes_max: u64,
    pub dedup_entries_max: u64,
}

/// The coordinator's state at the cut (`gG.meta`, postcard).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MetaSaved {
    pub emitters: Vec<CumulateEmitterSaved>,
    pub shard_wm: Vec<i64>,
    pub job_wm: i64,
    pub stats: Vec<SourceStats>,
    /// Lines per block, for the blocks before the cut.
    pub line_counts: Vec<u32>,
    pub rows: u64,
}

/// A state directory that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("state directory {dir}: {reason}")]
    Refused { dir: PathBuf, reason: String },
    #[error("state directory {dir}: {file} is damaged: {reason}; remove the directory to start over")]
    Corrupt { dir: PathBuf, file: String, reason: String },
    #[error("state directory {dir}: {context}: {source}")]
    Io { dir: PathBuf, context: String, source: io::Error },
}

/// A state directory held by this process.
pub struct StateDir {
    pub root: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Creates (if needed) and locks a state directory; refuses one that
    /// another process holds.
    pub fn open(root: &Path) -> Result<StateDir, CheckpointError> {
        let io_err = |context: &str| {
            let dir = root.to_owned();
            let context = context.to_owned();
            move |source| CheckpointError::Io { dir, context, source }
        };
        std::fs::create_dir_all(root.join(CKPT_DIR)).map_err(io_err("create"))?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join(LOCK_FILE))
            .map_err(io_err("open LOCK"))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(CheckpointError::Refused {
                dir: root.to_owned(),
                reason: "in use by another tally process".into(),
            });
        }
        // Tables of a previous process hold changes past its last
        // checkpoint: they are rebuilt from the checkpoint instead.
        match std::fs::remove_dir_all(root.join(LIVE_DIR)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("clear live/")(e)),
            _ => {}
        }
        Ok(StateDir { root: root.to_owned(), _lock: lock })
    }

    pub fn ckpt(&self) -> PathBuf {
        self.root.join(CKPT_DIR)
    }

    pub fn live(&self) -> PathBuf {
        self.root.join(LIVE_DIR)
    }

    pub fn corrupt(&self, file: &str, reason: impl Into<String>) -> CheckpointError {
        CheckpointError::Corrupt { dir: self.root.clone(), file: file.into(), reason: reason.into() }
    }

    fn io(&self, context: impl Into<String>, source: io::Error) -> CheckpointError {
        CheckpointError::Io { dir: self.root.clone(), context: context.into(), source }
    }

    /// The current manifest, checked, or `None` for a fresh directory.
    pub fn manifest(&self) -> Result<Option<Manifest>, CheckpointError> {
        let path = self.root.join(MANIFEST_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io("read MANIFEST", e)),
        };
        let text = String::from_utf8(text).map_err(|_| self.corrupt(MANIFEST_FILE, "not UTF-8"))?;
        let (body, sum) = text
            .trim_end()
            .rsplit_once('\n')
            .ok_or_else(|| self.corrupt(MANIFEST_FILE, "truncated (no checksum line)"))?;
        let want = sum.strip_prefix("xxh3:").and_then(|h| u64::from_str_radix(h, 16).ok());
        if want != Some(xxhash_rust::xxh3::xxh3_64(body.as_bytes())) {
            return Err(self.corrupt(MANIFEST_FILE, "checksum mismatch"));
        }
        let m: Manifest =
            serde_json::from_str(body).map_err(|e| self.corrupt(MANIFEST_FILE, format!("unreadable: {e}")))?;
        if m.format != FORMAT_VERSION {
            return Err(CheckpointError::Refused {
                dir: self.root.clone(),
                reason: format!("written in layout version {}, this tally reads version {FORMAT_VERSION}", m.format),
            });
        }
        Ok(Some(m))
    }

    /// Reads a postcard file the manifest names, checking size and checksum.
    pub fn read_saved<T: serde::de::DeserializeOwned>(&self, r: &FileRef) -> Result<T, CheckpointError> {
        let bytes = self.read_checked(r)?;
        postcard::from_bytes(&bytes).map_err(|e| self.corrupt(&r.file, format!("unreadable: {e}")))
    }

    /// Reads a checkpoint file whole, checking size and checksum.
    pub fn read_checked(&self, r: &FileRef) -> Result<Vec<u8>, CheckpointError> {
        let bytes = std::fs::read(self.ckpt().join(&r.file)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => self.corrupt(&r.file, "missing"),
            _ => self.io(format!("read {}", r.file), e),
        })?;
        if bytes.len() as u64 != r.bytes {
            return Err(self.corrupt(&r.file, format!("{} bytes, the manifest says {}", bytes.len(), r.bytes)));
        }
        if xxhash_rust::xxh3::xxh3_64(&bytes) != r.xxh3 {
            return Err(self.corrupt(&r.file, "checksum mismatch"));
        }
        Ok(bytes)
    }

    /// Checks that every table file exists with its recorded size (their
    /// checksums are checked as they are read back).
    pub fn check_tables(&self, m: &Manifest) -> Result<(), CheckpointError> {
        for t in &m.tables {
            match std::fs::metadata(self.ckpt().join(&t.file)) {
                Ok(md) if md.len() == t.bytes => {}
                Ok(md) => {
                    return Err(self.corrupt(&t.file, format!("{} bytes, the manifest says {}", md.len(), t.bytes)))
                }
                Err(_) => return Err(self.corrupt(&t.file, "missing")),
            }
        }
        Ok(())
    }

    /// Maps a table-restore error to a refusal naming the file.
    pub fn table_error(&self, e: io::Error) -> CheckpointError {
        match e.kind() {
            io::ErrorKind::InvalidData => {
                let text = e.to_string();
                let (file, reason) = text.split_once(": ").unwrap_or((&text, "damaged"));
                let file = Path::new(file).file_name().map_or(file.to_owned(), |f| f.to_string_lossy().into_owned());
                self.corrupt(&file, reason)
            }
            _ => self.io("restore a dedup table", e),
        }
    }

    /// A postcard file for the next checkpoint (see [`PendingFile::saved`]).
    pub fn saved<T: Serialize>(&self, file: String, value: &T) -> Result<(PendingFile, FileRef), CheckpointError> {
        PendingFile::saved(&self.ckpt(), file.clone(), value).map_err(|e| self.io(format!("encode {file}"), e))
    }

    /// Writes and commits checkpoints into this directory (from any thread).
    pub fn committer(&self) -> Committer {
        Committer { root: self.root.clone() }
    }

    /// See [`Committer::remove_unnamed`].
    pub fn remove_unnamed(&self, m: Option<&Manifest>) {
        self.committer().remove_unnamed(m)
    }
}

/// The part of a state directory that writes checkpoints; cheap to hand
/// to the checkpoint writer thread (the lock stays with [`StateDir`]).
#[derive(Clone)]
pub struct Committer {
    root: PathBuf,
}

impl Committer {
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn ckpt(&self) -> PathBuf {
        self.root.join(CKPT_DIR)
    }

    fn io(&self, context: impl Into<String>, source: io::Error) -> CheckpointError {
        CheckpointError::Io { dir: self.root.clone(), context: context.into(), source }
    }

    /// Makes `m` the current checkpoint: writes `files`, syncs them and
    /// `sync` (paths written before), writes the manifest atomically, then
    /// removes checkpoint files no longer named.
    pub fn commit(&self, m: &Manifest, files: &[PendingFile], sync: &[PathBuf]) -> Result<(), CheckpointError> {
        for f in files {
            f.write().map_err(|e| self.io(format!("write {}", f.path.display()), e))?;
        }
        crash_point("files-written", m.generation);
        for p in files.iter().map(|f| &f.path).chain(sync) {
            sync_file(p).map_err(|e| self.io(format!("sync {}", p.display()), e))?;
        }
        sync_file(&self.ckpt()).map_err(|e| self.io("sync ckpt/", e))?;
        let body = serde_json::to_string_pretty(m).map_err(|e| self.io("encode MANIFEST", io::Error::other(e)))?;
        let text = format!("{body}\nxxh3:{:016x}\n", xxhash_rust::xxh3::xxh3_64(body.as_bytes()));
        let tmp = self.root.join("MANIFEST.tmp");
        let mut f = File::create(&tmp).map_err(|e| self.io("create MANIFEST.tmp", e))?;
        f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| self.io("write MANIFEST.tmp", e))?;
        crash_point("manifest-written", m.generation);
        std::fs::rename(&tmp, self.root.join(MANIFEST_FILE)).map_err(|e| self.io("rename MANIFEST", e))?;
        sync_file(&self.root).map_err(|e| self.io("sync the directory", e))?;
        crash_point("renamed", m.generation);
        self.remove_unnamed(Some(m));
        Ok(())
    }

    /// Removes checkpoint files `m` does not name (left by a checkpoint
    /// that never committed, or replaced by a newer one).
    pub fn remove_unnamed(&self, m: Option<&Manifest>) {
        let mut keep: BTreeSet<&str> = BTreeSet::new();
        if let Some(m) = m {
            keep.insert(&m.meta.file);
            keep.extend(m.shards.iter().map(|f| f.file.as_str()));
            keep.extend(m.tables.iter().map(|f| f.file.as_str()));
            keep.extend(m.dicts.iter().map(|d| d.file.as_str()));
            keep.extend(m.api.iter().map(|f| f.file.as_str()));
        }
        let Ok(entries) = std::fs::read_dir(self.ckpt()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if !keep.contains(name.to_string_lossy().as_ref()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Test hook: with `TALLY_CRASH_AT=<point>:<generation>` in the
/// environment the process dies at that point of that checkpoint, as under
/// `kill -9` (points: `files-written`, `manifest-written`, `renamed`). The
/// crash tests use it to hit the instants a timed kill rarely hits.
pub fn crash_point(point: &str, generation: u64) {
    static AT: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| {
        let v = std::env::var("TALLY_CRASH_AT").ok()?;
        let (p, g) = v.rsplit_once(':')?;
        Some((p.to_owned(), g.parse().ok()?))
    });
    if let Some((p, g)) = at {
        if p == point && *g == generation {
            eprintln!("tally: TALLY_CRASH_AT={point}:{generation}: aborting");
            std::process::abort();
        }
    }
}

/// fsync a file or directory by path.
pub fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

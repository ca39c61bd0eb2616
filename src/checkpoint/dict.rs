//! Group-key dictionaries on disk: one append-only log per metric.
//!
//! Each checkpoint appends the keys interned since the previous one as
//! records `[fingerprint u64 LE][length u32 LE][dims JSON]`, and the
//! manifest records the log's length, key count and the xxh3 of that whole
//! prefix (kept as a running hash, so appending costs only the new keys).
//! On restart the log is cut back to the recorded length: bytes past it
//! belong to a checkpoint that never committed.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::metric::keys::KeyDict;

/// A metric's key log as the manifest records it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DictCut {
    pub metric: String,
    pub file: String,
    pub keys: u64,
    pub bytes: u64,
    pub xxh3: u64,
}

/// The writer of one metric's key log.
pub struct DictLog {
    file: String,
    keys: u64,
    bytes: u64,
    hash: Xxh3,
}

impl DictLog {
    pub fn file_name(metric: usize) -> String {
        format!("dict-m{metric}.log")
    }

    /// A log for a fresh state directory (replacing any leftover file).
    pub fn fresh(dir: &Path, metric: usize) -> io::Result<DictLog> {
        let file = DictLog::file_name(metric);
        File::create(dir.join(&file))?;
        Ok(DictLog { file, keys: 0, bytes: 0, hash: Xxh3::new() })
    }

    /// Reads a log back up to its recorded cut, checking it, and returns
    /// the dictionary it holds. Errors name what does not match.
    pub fn restore(dir: &Path, cut: &DictCut) -> Result<(DictLog, KeyDict), String> {
        let path = dir.join(&cut.file);
        let data = std::fs::read(&path).map_err(|e| format!("cannot read: {e}"))?;
        if (data.len() as u64) < cut.bytes {
            return Err(format!("{} bytes, the manifest says at least {}", data.len(), cut.bytes));
        }
        let data = &data[..cut.bytes as usize];
        let mut hash = Xxh3::new();
        hash.update(data);
        if hash.digest() != cut.xxh3 {
            return Err("checksum mismatch".into());
        }
        let mut entries = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            if rest.len() < 12 {
                return Err("truncated record".into());
            }
            let fp = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(rest[8..12].try_into().unwrap_or_default()) as usize;
            let tail = &rest[12..];
            if tail.len() < len {
                return Err("truncated record".into());
            }
            let dims = std::str::from_utf8(&tail[..len]).map_err(|_| "dims not UTF-8".to_string())?;
            entries.push((fp, dims.to_owned()));
            rest = &tail[len..];
        }
        if entries.len() as u64 != cut.keys {
            return Err(format!("holds {} keys, the manifest says {}", entries.len(), cut.keys));
        }
        let dict = KeyDict::from_entries(entries).ok_or("a key appears twice")?;
        // Cut off what a checkpoint that never committed appended.
        let f = OpenOptions::new().write(true).open(&path).map_err(|e| format!("cannot open: {e}"))?;
        f.set_len(cut.bytes).map_err(|e| format!("cannot truncate: {e}"))?;
        Ok((DictLog { file: cut.file.clone(), keys: cut.keys, bytes: cut.bytes, hash }, dict))
    }

    /// Appends the keys interned since the last call; returns the cut to
    /// record and whether the file changed (and needs syncing).
    pub fn append(&mut self, dir: &Path, metric: &str, dict: &KeyDict) -> io::Result<(DictCut, bool)> {
        let new = dict.entries_from(self.keys as usize);
        let mut buf = Vec::new();
        for (fp, dims) in &new {
            buf.extend_from_slice(&fp.to_le_bytes());
            buf.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            buf.extend_from_slice(dims.as_bytes());
        }
        if !buf.is_empty() {
            let mut f = OpenOptions::new().append(true).open(dir.join(&self.file))?;
            f.write_all(&buf)?;
            self.hash.update(&buf);
            self.bytes += buf.len() as u64;
            self.keys += new.len() as u64;
        }
        let cut = DictCut {
            metric: metric.to_owned(),
            file: self.file.clone(),
            keys: self.keys,
            bytes: self.bytes,
            xxh3: self.hash.digest(),
        };
        Ok((cut, !buf.is_empty()))
    }
}

//! File sources: the block plan and the io_uring block reader.
//!
//! A source's files are one stream cut into fixed blocks of
//! [`BLOCK_BYTES`]. Routers claim blocks in order from one counter, so
//! event time advances together on every core (and a router on a less busy
//! core takes more blocks). A text block owns the lines that
//! *start* inside it; it reads a little past its end for the last line and
//! fetches more only for a line longer than that. Each worker keeps
//! [`READS_IN_FLIGHT`] reads queued on its own io_uring ring, into buffers it
//! reuses; where io_uring is unavailable it falls back to `pread`, and says
//! so once.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::checkpoint::identity::FileIdentity;
use crate::event::binary::BINARY_RECORD_BYTES;
use crate::event::csv::CsvParser;
use crate::job::{Format, Job};

/// Bytes per block: the unit of parallel work and of watermark progress.
pub const BLOCK_BYTES: u64 = 2 << 20;
/// Extra bytes read after a text block for the line that crosses its end.
pub const TAIL_BYTES: u64 = 64 << 10;
/// Reads each worker keeps queued.
pub const READS_IN_FLIGHT: usize = 4;

/// An input file, opened once before start.
pub struct InputFile {
    pub path: PathBuf,
    pub file: File,
    pub size: u64,
    pub source: usize,
    /// Path, inode, size and modification time when opened.
    pub identity: FileIdentity,
    /// Header of a CSV file (its first line).
    pub csv_header: Option<Vec<String>>,
}

/// One block of one file.
#[derive(Clone, Copy, Debug)]
pub struct Task {
    pub source: usize,
    pub file: usize,
    /// Position of this block in its source's sequence.
    pub seq: u32,
    pub lo: u64,
    pub hi: u64,
}

/// All input of a job, cut into blocks, in the order routers take them.
pub struct Plan {
    pub files: Vec<InputFile>,
    pub formats: Vec<Format>,
    pub tasks: Vec<Task>,
    pub blocks_per_source: Vec<u32>,
}

/// An input file that cannot be opened or read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct InputError {
    pub path: PathBuf,
    pub reason: String,
}

impl Plan {
    /// Opens every file and cuts it into blocks. Sources are interleaved by
    /// progress (block k of n), so they advance together too.
    pub fn new(job: &Job) -> Result<Plan, InputError> {
        let mut files = Vec::new();
        let mut per_source: Vec<Vec<Task>> = Vec::new();
        for (s, spec) in job.sources.iter().enumerate() {
            let mut tasks = Vec::new();
            for path in &spec.paths {
                let err = |reason: String| InputError { path: path.clone(), reason };
                let file = File::open(path).map_err(|e| err(e.to_string()))?;
                let md = file.metadata().map_err(|e| err(e.to_string()))?;
                let size = md.len();
                let identity = FileIdentity::of(path, &md);
                let csv_header = match spec.format {
                    Format::Csv => Some(read_header(&file, size).map_err(err)?),
                    _ => None,
                };
                let block = match spec.format {
                    Format::Binary => BLOCK_BYTES / BINARY_RECORD_BYTES as u64 * BINARY_RECORD_BYTES as u64,
                    _ => BLOCK_BYTES,
                };
                let mut lo = 0;
                while lo < size {
                    let hi = (lo + block).min(size);
                    tasks.push(Task { source: s, file: files.len(), seq: tasks.len() as u32, lo, hi });
                    lo = hi;
                }
                files.push(InputFile { path: path.clone(), file, size, source: s, identity, csv_header });
            }
            per_source.push(tasks);
        }
        let blocks_per_source = per_source.iter().map(|t| t.len() as u32).collect();
        let mut tasks: Vec<Task> = per_source.into_iter().flatten().collect();
        let counts: &Vec<u32> = &blocks_per_source;
        tasks.sort_by(|a, b| {
            let fa = a.seq as u128 * counts[b.source] as u128;
            let fb = b.seq as u128 * counts[a.source] as u128;
            fa.cmp(&fb).then(a.source.cmp(&b.source))
        });
        let formats = job.sources.iter().map(|s| s.format).collect();
        Ok(Plan { files, formats, tasks, blocks_per_source })
    }

    pub fn input_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

fn read_header(file: &File, size: u64) -> Result<Vec<String>, String> {
    let mut buf = vec![0u8; size.min(TAIL_BYTES) as usize];
    file.read_exact_at(&mut buf, 0).map_err(|e| e.to_string())?;
    let end = memchr::memchr(b'\n', &buf).unwrap_or(buf.len());
    CsvParser::split_header(&buf[..end]).map_err(|r| format!("bad CSV header ({})", r.as_str()))
}

/// A block's bytes, as read.
pub struct Block {
    pub task: usize,
    /// File offset of `data[0]`.
    pub base: u64,
    pub data: Vec<u8>,
}

struct Pending {
    block: Block,
    want: usize,
    result: Option<io::Result<usize>>,
}

static SAID_NO_URING: AtomicBool = AtomicBool::new(false);

/// Set to `0` to read with `pread` instead of io_uring (for comparison, or
/// where io_uring is blocked).
pub const IO_URING_ENV: &str = "TALLY_IO_URING";

/// Says once per process why files are read without io_uring.
fn say_once(why: &str) {
    if !SAID_NO_URING.swap(true, Ordering::Relaxed) {
        eprintln!("tally: {why}; reading files with pread");
    }
}

/// Reads a worker's blocks ahead, in order, with buffers reused.
pub struct BlockReader {
    ring: Option<io_uring::IoUring>,
    pending: VecDeque<Pending>,
    free: Vec<Vec<u8>>,
    plan: Arc<Plan>,
    /// Monotone id for io_uring user data, to find a completion's read.
    next_id: u64,
    ids: VecDeque<u64>,
}

impl BlockReader {
    pub fn new(plan: Arc<Plan>) -> BlockReader {
        let ring = if std::env::var_os(IO_URING_ENV).is_some_and(|v| v == "0") {
            say_once(&format!("io_uring disabled by {IO_URING_ENV}=0"));
            None
        } else {
            match io_uring::IoUring::new(READS_IN_FLIGHT as u32 * 2) {
                Ok(r) => Some(r),
                Err(e) => {
                    say_once(&format!("io_uring unavailable ({e})"));
                    None
                }
            }
        };
        BlockReader { ring, pending: VecDeque::new(), free: Vec::new(), plan, next_id: 0, ids: VecDeque::new() }
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    pub fn uses_io_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// The byte range to read for a task: text blocks read one byte before
    /// (to see whether a line starts at `lo`) and a tail after.
    fn range(&self, t: &Task) -> (u64, u64) {
        let size = self.plan.files[t.file].size;
        match self.plan.formats[t.source] {
            Format::Binary => (t.lo, t.hi),
            _ => (t.lo.saturating_sub(1), (t.hi + TAIL_BYTES).min(size)),
        }
    }

    /// Queues the read of a task's block.
    pub fn submit(&mut self, task: usize) -> io::Result<()> {
        let t = self.plan.tasks[task];
        let (from, to) = self.range(&t);
        let want = (to - from) as usize;
        let mut buf = self.free.pop().unwrap_or_default();
        buf.clear();
        buf.reserve(want);
        let mut p = Pending { block: Block { task, base: from, data: buf }, want, result: None };
        match &mut self.ring {
            None => p.result = Some(read_full(&self.plan.files[t.file].file, &mut p.block.data, from, want)),
            Some(ring) => {
                let fd = io_uring::types::Fd(self.plan.files[t.file].file.as_raw_fd());
                let ptr = p.block.data.as_mut_ptr();
                let id = self.next_id;
                self.next_id += 1;
                let sqe = io_uring::opcode::Read::new(fd, ptr, want as u32).offset(from).build().user_data(id);
                // SAFETY: the buffer has capacity for `want` bytes and stays
                // alive and unmoved (it sits in `pending`, its heap storage
                // does not move) until the completion is reaped in `poll`.
                unsafe { ring.submission().push(&sqe) }
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                // From here the kernel may own the buffer: keep it in
                // `pending` (whose drop waits for completions) before anything
                // can fail.
                self.ids.push_back(id);
                self.pending.push_back(p);
                ring.submit()?;
                return Ok(());
            }
        }
        self.pending.push_back(p);
        Ok(())
    }

    /// Returns the oldest block if its read is complete (never blocks when
    /// `wait` is false).
    pub fn poll(&mut self, wait: bool) -> Option<io::Result<Block>> {
        self.reap(wait);
        let front = self.pending.front()?;
        front.result.as_ref()?;
        let mut p = self.pending.pop_front()?;
        if self.ring.is_some() {
            self.ids.pop_front();
        }
        let path = &self.plan.files[self.plan.tasks[p.block.task].file].path;
        let res = match p.result.take()? {
            Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
            Ok(n) => {
                // SAFETY: the kernel (or pread) initialised `n` bytes.
                unsafe { p.block.data.set_len(n) };
                if n < p.want {
                    // A short read: finish it synchronously.
                    let t = self.plan.tasks[p.block.task];
                    let file = &self.plan.files[t.file].file;
                    let more = p.want - n;
                    let mut tail = Vec::with_capacity(more);
                    match read_full(file, &mut tail, p.block.base + n as u64, more) {
                        Ok(_) => {
                            p.block.data.extend_from_slice(&tail);
                            Ok(p.block)
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    Ok(p.block)
                }
            }
        };
        Some(res)
    }

    /// Gives a block's buffer back for reuse.
    pub fn recycle(&mut self, block: Block) {
        self.free.push(block.data);
    }

    fn reap(&mut self, wait: bool) {
        let Some(ring) = &mut self.ring else { return };
        if wait && self.pending.front().is_some_and(|p| p.result.is_none()) {
            let _ = ring.submit_and_wait(1);
        }
        for cqe in ring.completion() {
            let id = cqe.user_data();
            if let Some(pos) = self.ids.iter().position(|&x| x == id) {
                let r = cqe.result();
                self.pending[pos].result =
                    Some(if r < 0 { Err(io::Error::from_raw_os_error(-r)) } else { Ok(r as usize) });
            }
        }
    }
}

impl Drop for BlockReader {
    fn drop(&mut self) {
        // Reads still queued write into our buffers: wait for them first.
        while self.pending.iter().any(|p| p.result.is_none()) && self.ring.is_some() {
            self.reap(true);
        }
    }
}

/// Reads `want` bytes at `at` into `buf` (appending), stopping early only
/// at end of file.
pub fn read_full(file: &File, buf: &mut Vec<u8>, at: u64, want: usize) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + want, 0);
    let mut got = 0;
    while got < want {
        let n = file.read_at(&mut buf[start + got..], at + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(start + got);
    Ok(got)
}

/// A line as a block hands it out.
#[derive(Clone, Copy)]
pub enum Line<'a> {
    Text(&'a [u8]),
    /// Longer than the source's `max_line_bytes`; its bytes are skipped.
    TooLong,
}

/// A line, or `TooLong` if its content (without a CRLF's `\r`) exceeds the limit.
#[inline]
fn classify(line: &[u8], max_line_bytes: usize) -> Line<'_> {
    let content = line.len() - (line.last() == Some(&b'\r')) as usize;
    if content > max_line_bytes {
        Line::TooLong
    } else {
        Line::Text(line)
    }
}

/// Chunk size used to skip over an over-long line without keeping it.
const SKIP_CHUNK_BYTES: usize = 64 << 10;

/// Calls `f(index, line)` for every line that starts inside the block
/// (`index` counts from 0 within the block) and returns how many there
/// were. Reads more of the file only for a line that runs past the tail.
pub fn for_each_line(
    block: &mut Block,
    task: &Task,
    file: &InputFile,
    max_line_bytes: usize,
    mut f: impl FnMut(u32, Line),
) -> io::Result<u32> {
    let mut pos = if task.lo == 0 {
        0
    } else {
        match memchr::memchr(b'\n', &block.data) {
            Some(k) => k + 1,
            None => return Ok(0),
        }
    };
    let mut index = 0u32;
    while block.base + (pos as u64) < task.hi {
        let data = &block.data;
        match memchr::memchr(b'\n', &data[pos..]) {
            Some(k) => {
                let line = &data[pos..pos + k];
                f(index, classify(line, max_line_bytes));
                index += 1;
                pos += k + 1;
            }
            None if block.base + data.len() as u64 >= file.size => {
                if pos < data.len() {
                    let line = &data[pos..];
                    f(index, classify(line, max_line_bytes));
                    index += 1;
                }
                break;
            }
            // +1: a CRLF line's `\r` does not count against the limit.
            None if data.len() - pos > max_line_bytes + 1 => {
                f(index, Line::TooLong);
                index += 1;
                let from = block.base + data.len() as u64;
                match skip_to_newline(&file.file, from, file.size)? {
                    Some(nl) if nl + 1 < task.hi => {
                        // Refill from the line after the long one.
                        let want = ((task.hi + TAIL_BYTES).min(file.size) - (nl + 1)) as usize;
                        block.data.clear();
                        block.base = nl + 1;
                        read_full(&file.file, &mut block.data, block.base, want)?;
                        pos = 0;
                    }
                    _ => break,
                }
            }
            None => {
                // The line runs past what was read: fetch more of it.
                let from = block.base + data.len() as u64;
                let want = (max_line_bytes + 1).min((file.size - from) as usize).max(1);
                if read_full(&file.file, &mut block.data, from, want)? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while being read"));
                }
            }
        }
    }
    Ok(index)
}

/// Offset of the first newline at or after `from`, reading in chunks.
fn skip_to_newline(file: &File, mut from: u64, size: u64) -> io::Result<Option<u64>> {
    let mut buf = Vec::with_capacity(SKIP_CHUNK_BYTES);
    while from < size {
        buf.clear();
        let n = read_full(file, &mut buf, from, SKIP_CHUNK_BYTES)?;
        if n == 0 {
            break;
        }
        if let Some(k) = memchr::memchr(b'\n', &buf) {
            return Ok(Some(from + k as u64));
        }
        from += n as u64;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(content: &[u8], block: u64, max_line: usize) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, content).unwrap();
        let file = InputFile {
            path: path.clone(),
            file: File::open(&path).unwrap(),
            size: content.len() as u64,
            source: 0,
            identity: FileIdentity::of(&path, &std::fs::metadata(&path).unwrap()),
            csv_header: None,
        };
        let mut out = Vec::new();
        let mut lo = 0;
        while lo < file.size {
            let hi = (lo + block).min(file.size);
            let task = Task { source: 0, file: 0, seq: 0, lo, hi };
            let from = lo.saturating_sub(1);
            let mut data = Vec::new();
            // A small tail, so long lines exercise the refill paths.
            read_full(&file.file, &mut data, from, ((hi + 3).min(file.size) - from) as usize).unwrap();
            let mut b = Block { task: 0, base: from, data };
            for_each_line(&mut b, &task, &file, max_line, |_, l| {
                out.push(match l {
                    Line::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    Line::TooLong => "<long>".into(),
                })
            })
            .unwrap();
            lo = hi;
        }
        out
    }

    #[test]
    fn every_line_once_whatever_the_block_size() {
        let content = b"alpha\nbeta\n\ngamma-long-line\ndelta";
        let want: Vec<String> = ["alpha", "beta", "", "gamma-long-line", "delta"].map(String::from).to_vec();
        for block in 1..=content.len() as u64 + 1 {
            assert_eq!(lines_of(content, block, 100), want, "block {block}");
        }
    }

    #[test]
    fn long_lines_are_skipped_and_counted() {
        let content = b"ok1\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\nok2\nyyyyyyyyyyyyyyyyyyyyy";
        for block in [4u64, 7, 13, 64] {
            assert_eq!(lines_of(content, block, 8), ["ok1", "<long>", "ok2", "<long>"], "block {block}");
        }
    }
}

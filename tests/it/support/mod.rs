//! Helpers shared by the end-to-end tests.
//!
//! Every test works in its own temporary directory: it generates events with
//! the library's generator ([`tally::gen::generate`]), writes a job file
//! ([`JobDef`]), runs the real `tally` binary (the build under test) and
//! reads what it wrote: exit code, stderr, the `--summary` JSON and the
//! result rows. Nothing here shares code with the engine's pipeline; the
//! only library pieces used are the generator, the job loader and the
//! offline referee ([`tally::verify::Offline`]), plus [`BLOCK_BYTES`] for
//! the documented lateness model (see [`place_events`]).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

#[allow(unused_imports)]
pub use tally::gen::{GenFormat, GenOptions};
pub use tally::source::file::BLOCK_BYTES;
pub mod http;
pub mod kafka;
pub mod redis_server;

/// The binary under test.
pub const TALLY: &str = env!("CARGO_BIN_EXE_tally");
pub const MINUTE_MS: i64 = 60_000;
pub const DAY_MS: i64 = 86_400_000;
/// The time zone of every test job (the generator's diurnal curve uses it too).
pub const TZ: &str = "+08:00";
pub const TZ_OFFSET_MS: i64 = 8 * 3_600_000;
/// 2026-02-16T00:00:00+08:00: the local midnight the generator's default
/// span (22:00 to 02:00 local) crosses.
pub const MIDNIGHT_MS: i64 = 1_771_171_200_000;

// ---------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("tally-e2e-").tempdir().expect("cannot create a temporary directory")
}

/// Generator options for a test: `events` events over the default 4 h span
/// crossing local midnight, bounded disorder of 2 min (below the jobs' 5 min
/// bound), 2% exact duplicates, device ids half JSON strings, half integers
/// (the same device appears in both forms), few enough devices that most
/// come back many times.
pub fn gen_options(events: u64) -> GenOptions {
    GenOptions {
        events,
        devices: (events / 6).max(50),
        disorder: "2m".into(),
        disorder_fraction: 0.3,
        dup_rate: 0.02,
        did_strings: 0.5,
        ..GenOptions::default()
    }
}

/// Generates events into `out` and returns the files written.
pub fn generate(out: &Path, opts: GenOptions) -> Vec<PathBuf> {
    let opts = GenOptions { out: out.to_path_buf(), ..opts };
    match tally::gen::generate(&opts) {
        Ok(r) => {
            assert!(r.events > 0, "the generator wrote no events");
            r.files
        }
        Err(e) => panic!("tally::gen::generate({opts:?}) failed: {e:#}"),
    }
}

/// The lines of a file without their `\n` (a last line without one included).
pub fn read_lines(path: &Path) -> Vec<Vec<u8>> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut lines: Vec<Vec<u8>> = bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    if lines.last().is_some_and(Vec::is_empty) {
        lines.pop();
    }
    lines
}

/// Writes lines, each followed by `eol`.
pub fn write_lines(path: &Path, lines: &[Vec<u8>], eol: &[u8]) {
    let mut out = Vec::with_capacity(lines.iter().map(|l| l.len() + eol.len()).sum());
    for l in lines {
        out.extend_from_slice(l);
        out.extend_from_slice(eol);
    }
    fs::write(path, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------
// Job files
// ---------------------------------------------------------------------------

/// A TOML basic string (a JSON string is one).
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

#[derive(Clone, Debug)]
pub struct SourceDef {
    pub name: String,
    pub paths: Vec<PathBuf>,
    pub format: String,
    pub max_out_of_orderness: String,
    pub max_line_bytes: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct MetricDef {
    pub name: String,
    pub group_by: Vec<String>,
    pub filter: Option<String>,
    pub late: Option<String>,
    pub emit: Option<String>,
}

impl MetricDef {
    pub fn new(name: &str, group_by: &[&str]) -> MetricDef {
        MetricDef {
            name: name.into(),
            group_by: group_by.iter().map(|s| s.to_string()).collect(),
            filter: None,
            late: None,
            emit: None,
        }
    }

    pub fn filter(mut self, filter: &str) -> MetricDef {
        self.filter = Some(filter.into());
        self
    }

    pub fn late(mut self, policy: &str) -> MetricDef {
        self.late = Some(policy.into());
        self
    }

    pub fn emit(mut self, mode: &str) -> MetricDef {
        self.emit = Some(mode.into());
        self
    }

    pub fn group_by(&self) -> Vec<&str> {
        self.group_by.iter().map(String::as_str).collect()
    }
}

/// The design's example metric: page PV/UV over view events.
pub fn page_uv() -> MetricDef {
    MetricDef::new("page_uv", &["page"]).filter("event = 'view'")
}

/// [`page_uv`] over binary records, whose dimensions are integer codes
/// (event 0 is "view", page k is "pk").
pub fn page_uv_binary() -> MetricDef {
    MetricDef::new("page_uv", &["page"]).filter("event = 0")
}

/// A two-field key over every event (no filter).
pub fn platform_version() -> MetricDef {
    MetricDef::new("platform_version", &["platform", "app_ver"])
}

/// A job: sources, metrics, one JSON-lines sink holding every metric.
#[derive(Clone, Debug)]
pub struct JobDef {
    pub timezone: String,
    /// Extra `[job]` lines (`checkpoint_interval = "100ms"`).
    pub job_lines: Vec<String>,
    pub sources: Vec<SourceDef>,
    pub metrics: Vec<MetricDef>,
}

/// A job file written to disk, with where its run writes.
#[derive(Clone, Debug)]
pub struct JobFile {
    pub path: PathBuf,
    pub results: PathBuf,
    pub summary: PathBuf,
}

impl JobDef {
    /// One file source named `client` with a 5 min disorder bound.
    pub fn new(format: &str, paths: &[PathBuf]) -> JobDef {
        JobDef {
            timezone: TZ.into(),
            job_lines: Vec::new(),
            sources: vec![SourceDef {
                name: "client".into(),
                paths: paths.to_vec(),
                format: format.into(),
                max_out_of_orderness: "5m".into(),
                max_line_bytes: None,
            }],
            metrics: Vec::new(),
        }
    }

    pub fn metric(mut self, m: MetricDef) -> JobDef {
        self.metrics.push(m);
        self
    }

    /// Adds a `[job]` line such as `checkpoint_interval = "100ms"`.
    pub fn job_line(mut self, line: &str) -> JobDef {
        self.job_lines.push(line.into());
        self
    }

    pub fn max_line_bytes(mut self, n: usize) -> JobDef {
        self.sources[0].max_line_bytes = Some(n);
        self
    }

    pub fn toml(&self, results: &Path) -> String {
        let mut t = format!("[job]\ntimezone = {}\n", toml_str(&self.timezone));
        for l in &self.job_lines {
            t += l;
            t += "\n";
        }
        for s in &self.sources {
            let paths: Vec<String> = s.paths.iter().map(|p| toml_str(&p.to_string_lossy())).collect();
            t += &format!(
                "\n[[source]]\nname = {}\nkind = \"file\"\npath = [{}]\nformat = {}\nmax_out_of_orderness = {}\n",
                toml_str(&s.name),
                paths.join(", "),
                toml_str(&s.format),
                toml_str(&s.max_out_of_orderness)
            );
            if let Some(n) = s.max_line_bytes {
                t += &format!("max_line_bytes = {n}\n");
            }
        }
        for m in &self.metrics {
            let group_by: Vec<String> = m.group_by.iter().map(|g| toml_str(g)).collect();
            t += &format!(
                "\n[[metric]]\nname = {}\nkind = \"cumulate\"\ngroup_by = [{}]\nmeasures = [\"pv\", \"uv\"]\n",
                toml_str(&m.name),
                group_by.join(", ")
            );
            if let Some(f) = &m.filter {
                t += &format!("filter = {}\n", toml_str(f));
            }
            if let Some(l) = &m.late {
                t += &format!("late = {}\n", toml_str(l));
            }
            if let Some(e) = &m.emit {
                t += &format!("emit = {}\n", toml_str(e));
            }
        }
        t += &format!("\n[[sink]]\nkind = \"jsonl\"\npath = {}\n", toml_str(&results.to_string_lossy()));
        t
    }

    /// Writes `dir/NAME.toml`; its run writes `dir/NAME-out/results.jsonl`
    /// and `dir/NAME-summary.json`.
    pub fn write(&self, dir: &Path, name: &str) -> JobFile {
        let path = dir.join(format!("{name}.toml"));
        let results = dir.join(format!("{name}-out")).join("results.jsonl");
        fs::write(&path, self.toml(&results)).expect("cannot write the job file");
        JobFile { path, results, summary: dir.join(format!("{name}-summary.json")) }
    }
}

impl JobFile {
    /// The job as the library reads it.
    pub fn load(&self) -> tally::job::Job {
        tally::job::Job::load(&self.path).unwrap_or_else(|e| panic!("job {} does not load: {e}", self.path.display()))
    }
}

// ---------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------

/// What one `tally` process did.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Longest a single `tally` process may take before the test fails (a hung
/// engine must fail the test, not hang the suite).
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `tally ARGS...` to the end (killing it after [`PROCESS_TIMEOUT`]).
pub fn tally<I, S>(args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut child = Command::new(TALLY)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {TALLY}: {e}"));
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read(Box::new(child.stderr.take().expect("piped stderr")));
    let started = Instant::now();
    let status = loop {
        match child.try_wait().expect("cannot wait for tally") {
            Some(status) => break status,
            None if started.elapsed() > PROCESS_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`tally {}` did not finish within {PROCESS_TIMEOUT:?}; killed. stderr:\n{}",
                    args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "),
                    stderr.join().unwrap_or_default()
                );
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    Outcome {
        code: status.code(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// What `tally run` did: its process outcome and the `--summary` JSON, if
/// it wrote one.
#[derive(Debug)]
pub struct RunOutput {
    pub outcome: Outcome,
    pub summary: Option<Value>,
}

impl RunOutput {
    /// The summary of a run that must have succeeded.
    pub fn ok(&self) -> &Value {
        assert_eq!(self.outcome.code, Some(0), "tally run failed; stderr:\n{}", self.outcome.stderr);
        self.summary.as_ref().expect("tally run exited 0 without writing --summary")
    }
}

/// `tally run --job J --workers N --summary S`.
pub fn run(job: &JobFile, workers: usize) -> RunOutput {
    let _ = fs::remove_file(&job.summary);
    let workers = workers.to_string();
    let outcome = tally([
        OsStr::new("run"),
        OsStr::new("--job"),
        job.path.as_os_str(),
        OsStr::new("--workers"),
        OsStr::new(&workers),
        OsStr::new("--summary"),
        job.summary.as_os_str(),
    ]);
    let summary = fs::read(&job.summary).ok().map(|b| {
        serde_json::from_slice(&b)
            .unwrap_or_else(|e| panic!("--summary is not JSON ({e}): {}", String::from_utf8_lossy(&b)))
    });
    RunOutput { outcome, summary }
}

/// Runs several jobs at once (each with its own worker count) and returns
/// their outputs in order.
pub fn run_all(runs: &[(&JobFile, usize)]) -> Vec<RunOutput> {
    std::thread::scope(|s| {
        let handles: Vec<_> = runs.iter().map(|&(job, w)| s.spawn(move || run(job, w))).collect();
        handles.into_iter().map(|h| h.join().expect("a run thread panicked")).collect()
    })
}

/// `tally verify --job J --results R`.
pub fn verify(job: &JobFile, results: &Path) -> Outcome {
    tally([
        OsStr::new("verify"),
        OsStr::new("--job"),
        job.path.as_os_str(),
        OsStr::new("--results"),
        results.as_os_str(),
    ])
}

/// `tally verify` must exit 0 (every row exact, nothing missing).
pub fn assert_verifies(job: &JobFile, results: &Path, what: &str) {
    let v = verify(job, results);
    assert_eq!(v.code, Some(0), "{what}: tally verify failed for {}:\n{}{}", results.display(), v.stdout, v.stderr);
    assert!(v.stdout.contains("verify: OK"), "{what}: tally verify printed no OK line:\n{}", v.stdout);
}

/// The source report `sources[i]` of a summary.
pub fn source_report(summary: &Value, i: usize) -> &Value {
    &summary["sources"][i]
}

/// Starts `tally run --workers 2` on `job` in the background with `extra`
/// arguments, its summary to `job.summary` and its log piped.
pub fn spawn_run(job: &JobFile, extra: &[&OsStr]) -> std::process::Child {
    Command::new(TALLY)
        .args(["run", "--workers", "2", "--job"])
        .arg(&job.path)
        .args(extra)
        .arg("--summary")
        .arg(&job.summary)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tally")
}

/// Runs `job` with 2 workers until it crashes right after checkpoint 2
/// commits (the engine's test hook, as under `kill -9`).
pub fn crash_after_checkpoint_2(job: &JobFile) {
    let crashed = Command::new(TALLY)
        .args(["run", "--workers", "2", "--job"])
        .arg(&job.path)
        .env("TALLY_CRASH_AT", "renamed:2")
        .stdin(Stdio::null())
        .output()
        .expect("start tally");
    let log = String::from_utf8_lossy(&crashed.stderr);
    assert!(!crashed.status.success() && log.contains("TALLY_CRASH_AT"), "no crash at checkpoint 2: {log}");
}

/// The manifest of a state directory's last checkpoint, if any.
pub fn manifest(state: &Path) -> Option<Value> {
    let text = fs::read_to_string(state.join("MANIFEST")).ok()?;
    let json = text.rsplit_once("\nxxh3:").map_or(text.as_str(), |(j, _)| j);
    serde_json::from_str(json).ok()
}

/// Messages of the first source's topic that the last checkpoint counted.
pub fn counted(state: &Path) -> u64 {
    let Some(m) = manifest(state) else { return 0 };
    let parts = m["input"]["sources"][0]["stream"]["parts"].as_array().cloned().unwrap_or_default();
    parts.iter().filter_map(|p| p["messages"].as_u64()).sum()
}

/// A summary counter as an integer.
pub fn count(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("summary field {field:?} is not a count: {v}"))
}

// ---------------------------------------------------------------------------
// Result rows
// ---------------------------------------------------------------------------

/// One output row, parsed strictly: exactly the fields of the PV/UV shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub metric: String,
    pub window_start: i64,
    pub window_end: i64,
    pub dims: Map<String, Value>,
    pub pv: u64,
    pub uv: u64,
}

impl Row {
    /// The dims object in a canonical text form (keys sorted).
    pub fn dims_key(&self) -> String {
        dims_key(&self.dims)
    }

    /// The dims values in `group_by` order (what [`tally::verify::Offline`] takes).
    pub fn dims_in(&self, group_by: &[&str]) -> Vec<Value> {
        group_by.iter().map(|g| self.dims.get(*g).cloned().unwrap_or(Value::Null)).collect()
    }
}

/// A dims object in canonical text form (keys sorted).
pub fn dims_key(dims: &Map<String, Value>) -> String {
    let sorted: BTreeMap<&String, &Value> = dims.iter().collect();
    serde_json::to_string(&sorted).expect("dims serialize")
}

/// The rows of a results file as JSON values, one per line.
pub fn read_values(path: &Path) -> Vec<Value> {
    let file = fs::File::open(path).unwrap_or_else(|e| panic!("cannot open results {}: {e}", path.display()));
    BufReader::new(file)
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let l = l.unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1));
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("{}:{}: not JSON ({e}): {l}", path.display(), i + 1))
        })
        .collect()
}

/// The rows of a results file, parsed strictly.
pub fn read_rows(path: &Path) -> Vec<Row> {
    read_values(path)
        .into_iter()
        .map(|v| {
            let Value::Object(o) = &v else { panic!("row is not an object: {v}") };
            let mut fields: Vec<&str> = o.keys().map(String::as_str).collect();
            fields.sort_unstable();
            assert_eq!(fields, ["dims", "metric", "pv", "uv", "window_end", "window_start"], "row fields: {v}");
            let int = |f: &str| v[f].as_i64().unwrap_or_else(|| panic!("{f} is not an integer: {v}"));
            let count = |f: &str| v[f].as_u64().unwrap_or_else(|| panic!("{f} is not a count: {v}"));
            Row {
                metric: v["metric"].as_str().unwrap_or_else(|| panic!("metric is not a string: {v}")).to_string(),
                window_start: int("window_start"),
                window_end: int("window_end"),
                dims: v["dims"].as_object().unwrap_or_else(|| panic!("dims is not an object: {v}")).clone(),
                pv: count("pv"),
                uv: count("uv"),
            }
        })
        .collect()
}

/// The last row of each (period, key) of one metric: the day totals.
pub fn final_rows<'r>(rows: &'r [Row], metric: &str) -> BTreeMap<(i64, String), &'r Row> {
    let mut out: BTreeMap<(i64, String), &Row> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.metric == metric) {
        let e = out.entry((r.window_start, r.dims_key())).or_insert(r);
        if r.window_end >= e.window_end {
            *e = r;
        }
    }
    out
}

/// Start of the local day holding `ts_ms`.
pub fn day_start(ts_ms: i64) -> i64 {
    (ts_ms + TZ_OFFSET_MS).div_euclid(DAY_MS) * DAY_MS - TZ_OFFSET_MS
}

// ---------------------------------------------------------------------------
// The offline referee
// ---------------------------------------------------------------------------

pub fn offline(job: &JobFile) -> tally::verify::Offline {
    tally::verify::Offline::compute(&job.load()).unwrap_or_else(|e| panic!("offline recomputation failed: {e:#}"))
}

/// Offline day totals of metric `index`: (period start, canonical dims) -> (pv, uv).
pub fn offline_day_totals(
    off: &tally::verify::Offline,
    index: usize,
    group_by: &[&str],
) -> BTreeMap<(i64, String), (u64, u64)> {
    off.period_totals(index)
        .into_iter()
        .map(|(start, dims, pv, uv)| {
            assert_eq!(dims.len(), group_by.len());
            let map: Map<String, Value> = group_by.iter().map(|g| g.to_string()).zip(dims).collect();
            ((start, dims_key(&map)), (pv, uv))
        })
        .collect()
}

/// Day totals (the last window of each period and key) of a run as
/// (period start, canonical dims) -> (pv, uv).
pub fn day_totals(rows: &[Row], metric: &str) -> BTreeMap<(i64, String), (u64, u64)> {
    final_rows(rows, metric).into_iter().map(|(k, r)| (k, (r.pv, r.uv))).collect()
}

/// Asserts two totals maps are equal, listing the first differences.
pub fn assert_totals_equal(
    got: &BTreeMap<(i64, String), (u64, u64)>,
    want: &BTreeMap<(i64, String), (u64, u64)>,
    what: &str,
) {
    if got == want {
        return;
    }
    let keys: std::collections::BTreeSet<_> = got.keys().chain(want.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| got.get(k) != want.get(k))
        .take(10)
        .map(|k| format!("period {} dims {}: got (pv, uv) {:?}, want {:?}", k.0, k.1, got.get(k), want.get(k)))
        .collect();
    panic!("{what}: {} keys, expected {}; first differences:\n  {}", got.len(), want.len(), diffs.join("\n  "));
}

// ---------------------------------------------------------------------------
// A model of lateness (DESIGN §3 plus the block watermark of the file source)
// ---------------------------------------------------------------------------

/// One input event, with the block of its source it belongs to.
#[derive(Clone, Debug)]
pub struct InputEvent {
    /// Index of the block (of `BLOCK_BYTES`) of the source's file sequence
    /// in which the event's line starts.
    pub block: u64,
    pub ts: i64,
    /// Device id in text form (`7` and `"7"` are the same device).
    pub did: String,
    pub fields: Map<String, Value>,
}

/// Reads generated JSON-lines files (every line a valid event) as one
/// source, keeping `fields` of each event.
pub fn read_input_events(paths: &[PathBuf], fields: &[&str]) -> Vec<InputEvent> {
    let mut out = Vec::new();
    let mut first_block = 0u64;
    for path in paths {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut offset = 0usize;
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            let start = offset;
            offset += line.len();
            let text = line.strip_suffix(b"\n").unwrap_or(line);
            if text.is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_slice(text).unwrap_or_else(|e| panic!("{}: bad line ({e})", path.display()));
            let ts = v["ts"].as_i64().unwrap_or_else(|| panic!("no integer ts: {v}"));
            let did = match &v["did"] {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => panic!("unexpected did {other}"),
            };
            let fields = fields.iter().map(|f| (f.to_string(), v.get(*f).cloned().unwrap_or(Value::Null))).collect();
            out.push(InputEvent { block: first_block + (start as u64 / BLOCK_BYTES), ts, did, fields });
        }
        first_block += (bytes.len() as u64).div_ceil(BLOCK_BYTES);
    }
    out
}

/// What happens to one event in one metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// The metric's filter rejects it.
    Filtered,
    /// Counted in its own slice (minute).
    OnTime { slice: i64 },
    /// Late, counted in slice `to` of its period (`late = "fold"`).
    Folded { from: i64, to: i64 },
    /// Late and not counted (`late = "drop"`, or its period already closed).
    Dropped { slice: i64 },
}

/// Slice (minute since 1970 in local time) of a time.
pub fn slice_of(ts: i64) -> i64 {
    (ts + TZ_OFFSET_MS).div_euclid(MINUTE_MS)
}

pub fn slice_end_ms(slice: i64) -> i64 {
    (slice + 1) * MINUTE_MS - TZ_OFFSET_MS
}

fn period_of_slice(slice: i64) -> i64 {
    (slice * MINUTE_MS).div_euclid(DAY_MS)
}

/// Decides each event's fate as the design and the file source define it:
/// the watermark that applies to the events of block `k` of a source is the
/// largest event time in blocks `0..k` minus the source's
/// `max_out_of_orderness` (no watermark in block 0). An event whose minute
/// ended at or before that watermark is late: `fold` counts it in the first
/// open minute of its day (or drops it when its day has no open minute
/// left, i.e. the day's last window is out), `drop` discards it.
pub fn place_events(
    events: &[InputEvent],
    bound_ms: i64,
    fold: bool,
    passes: impl Fn(&InputEvent) -> bool,
) -> Vec<Fate> {
    let mut fates = Vec::with_capacity(events.len());
    let mut block = 0u64;
    let mut max_before: Option<i64> = None; // max ts of blocks before `block`
    let mut max_this: Option<i64> = None;
    for e in events {
        assert!(e.block >= block, "events must come in block order");
        if e.block != block {
            max_before = max_before.max(max_this);
            max_this = None;
            block = e.block;
        }
        max_this = max_this.max(Some(e.ts));
        if !passes(e) {
            fates.push(Fate::Filtered);
            continue;
        }
        let slice = slice_of(e.ts);
        let open = max_before.map(|m| (m - bound_ms + TZ_OFFSET_MS).div_euclid(MINUTE_MS));
        fates.push(match open {
            Some(open) if slice < open => {
                if fold && period_of_slice(open) == period_of_slice(slice) {
                    Fate::Folded { from: slice, to: open }
                } else {
                    Fate::Dropped { slice }
                }
            }
            _ => Fate::OnTime { slice },
        });
    }
    fates
}

/// Cumulative (window end, pv, uv) steps of each (period start, dims key),
/// counting each event in the slice its fate gives.
pub type Series = BTreeMap<(i64, String), Vec<(i64, u64, u64)>>;

pub fn model_series(events: &[InputEvent], fates: &[Fate], group_by: &[&str]) -> Series {
    let mut per_key: BTreeMap<(i64, String), Vec<(i64, &str)>> = BTreeMap::new();
    for (e, f) in events.iter().zip(fates) {
        let slice = match *f {
            Fate::OnTime { slice } => slice,
            Fate::Folded { to, .. } => to,
            Fate::Filtered | Fate::Dropped { .. } => continue,
        };
        let dims: Map<String, Value> =
            group_by.iter().map(|g| (g.to_string(), e.fields.get(*g).cloned().unwrap_or(Value::Null))).collect();
        let period = period_of_slice(slice) * DAY_MS - TZ_OFFSET_MS;
        per_key.entry((period, dims_key(&dims))).or_default().push((slice, e.did.as_str()));
    }
    per_key
        .into_iter()
        .map(|(k, mut evs)| {
            evs.sort_unstable();
            let mut seen = HashSet::new();
            let mut steps: Vec<(i64, u64, u64)> = Vec::new();
            let mut pv = 0;
            for (slice, did) in evs {
                pv += 1;
                seen.insert(did);
                let end = slice_end_ms(slice);
                match steps.last_mut() {
                    Some(last) if last.0 == end => *last = (end, pv, seen.len() as u64),
                    _ => steps.push((end, pv, seen.len() as u64)),
                }
            }
            (k, steps)
        })
        .collect()
}

/// The cumulative (pv, uv) of a series at a window end (`None` before data).
pub fn value_at(steps: &[(i64, u64, u64)], end: i64) -> Option<(u64, u64)> {
    let n = steps.partition_point(|s| s.0 <= end);
    n.checked_sub(1).map(|i| (steps[i].1, steps[i].2))
}

/// Every row of `metric` must carry the model's values, and each key's last
/// row must carry its day total. Returns the number of rows checked.
pub fn assert_rows_match_model(rows: &[Row], metric: &str, model: &Series) -> usize {
    let mut wrong = Vec::new();
    let mut checked = 0;
    for r in rows.iter().filter(|r| r.metric == metric) {
        checked += 1;
        let want = model.get(&(r.window_start, r.dims_key())).and_then(|s| value_at(s, r.window_end));
        if want != Some((r.pv, r.uv)) {
            wrong.push(format!(
                "window_end {} dims {}: got (pv, uv) ({}, {}), model {:?}",
                r.window_end,
                r.dims_key(),
                r.pv,
                r.uv,
                want
            ));
        }
    }
    let finals: BTreeMap<(i64, String), (u64, u64)> =
        model.iter().map(|(k, s)| (k.clone(), s.last().map(|l| (l.1, l.2)).unwrap_or_default())).collect();
    assert!(
        wrong.is_empty(),
        "{metric}: {} of {checked} rows differ from the lateness model; first:\n  {}",
        wrong.len(),
        wrong.iter().take(10).cloned().collect::<Vec<_>>().join("\n  ")
    );
    assert_totals_equal(&day_totals(rows, metric), &finals, &format!("{metric}: day totals vs the lateness model"));
    checked
}

// ---------------------------------------------------------------------------
// Python with DuckDB
// ---------------------------------------------------------------------------

/// The Python interpreter for the DuckDB reference: `$TALLY_PYTHON`, else
/// `python3` if it has duckdb, else a venv under `target/test-venv` that this
/// function creates and installs duckdb into (idempotent), so `cargo test`
/// works on a fresh machine. Fails (never skips) when none can import duckdb.
pub fn python_with_duckdb() -> String {
    static PYTHON: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    PYTHON.get_or_init(find_or_install_duckdb).clone().unwrap_or_else(|e| panic!("{e}"))
}

fn has_duckdb(python: &str) -> bool {
    Command::new(python)
        .args(["-c", "import duckdb"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn find_or_install_duckdb() -> Result<String, String> {
    if let Some(p) = std::env::var("TALLY_PYTHON").ok().filter(|p| !p.is_empty()) {
        return if has_duckdb(&p) { Ok(p) } else { Err(format!("TALLY_PYTHON={p} cannot import duckdb")) };
    }
    if has_duckdb("python3") {
        return Ok("python3".into());
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("test-venv");
    let python = venv.join("bin").join("python3").to_string_lossy().into_owned();
    if !has_duckdb(&python) {
        let run = |cmd: &mut Command| -> Result<(), String> {
            let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr)))
            }
        };
        let help = "the DuckDB reference check needs Python 3 with venv and pip (run .ci/run)";
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv)).map_err(|e| format!("{help}: {e}"))?;
        run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "duckdb"]))
            .map_err(|e| format!("{help}: {e}"))?;
    }
    if has_duckdb(&python) {
        Ok(python)
    } else {
        Err(format!("{python} cannot import duckdb after installing it"))
    }
}

/// `scripts/duckdb_reference.py` of this repository.
pub fn duckdb_reference_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join("duckdb_reference.py")
}

//! `tally verify`: the offline, exact recomputation of a job's metrics, and
//! the row-by-row comparison of an output file against it.
//!
//! # Why this shares nothing with the engine
//!
//! This module is the referee. If it reused the engine's parsers, dedup
//! table, minute buckets or fingerprints, a bug in any of them would be
//! repeated here and the comparison would pass. So it is written the
//! slowest obvious way, from the specification alone:
//!
//! * inputs are read with `serde_json::Value`, the `csv` crate and
//!   `bytemuck`, never with the engine's parsers;
//! * device ids are compared by their full text (interned to integers), not
//!   by 64-bit hashes, so the offline result is exact;
//! * every passing event is kept as `(group key, event time, device)`, the
//!   events are sorted, and the cumulative `pv` / distinct `uv` of each key
//!   is counted at every window end where it changes; no watermark, no
//!   lateness, no minute buckets.
//!
//! Only the job description ([`crate::job`]) is shared: the filter
//! evaluation ([`crate::job::Filter`]), the period arithmetic
//! ([`Job::period_start_ms`]) and the binary record layout
//! ([`crate::event::binary::BinaryRecord`]) are the definitions of the
//! semantics, not engine machinery.
//!
//! Memory is about 16 bytes per passing event per metric while computing,
//! plus the distinct device ids and group keys, plus one point per
//! (key, window with events); 20M events fit in a few GB.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;

use ahash::{AHashMap, AHashSet};
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::event::binary::{BinaryRecord, BINARY_DIMS, BINARY_NULL, BINARY_RECORD_BYTES};
use crate::job::filter::FieldValue;
use crate::job::{
    DimFormat, DimensionSpec, Emit, Format, Job, Measure, MetricSpec, OnMissing, SinkRows, SinkTarget, SourceSpec,
    DAY_MS,
};

/// Earliest accepted event time (2000-01-01T00:00:00Z), inclusive.
const TS_MIN_MS: i64 = 946_684_800_000;
/// Latest accepted event time (2100-01-01T00:00:00Z), exclusive.
const TS_MAX_MS: i64 = 4_102_444_800_000;
/// How many problems a report describes.
const EXAMPLES_MAX: usize = 10;
/// Counting measures in report order; a [`Point`]'s values are in this
/// order. A summary's `sum`, `min` and `max` are kept apart (see
/// [`MetricTruth::xs`]).
const MEASURES: [Measure; MEASURES_N] =
    [Measure::Pv, Measure::Uv, Measure::Active, Measure::New, Measure::Returning, Measure::Count];
const MEASURES_N: usize = 6;

/// A key's values: pv, uv, then for DAU active (= uv), new, returning,
/// then a summary's count (= pv).
type Values = [u64; MEASURES_N];

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

/// The outcome of comparing a results file with the offline recomputation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerifyReport {
    /// Non-blank lines read from the results file (malformed ones included).
    pub rows_checked: u64,
    /// Rows that are malformed, name an unknown metric or a bad window, carry
    /// values different from the offline ones, belong to a key without data
    /// at that window, or (emit = changed) repeat an unchanged key.
    pub rows_wrong: u64,
    /// Keys that must have a row in an emitted window but have none.
    pub rows_missing: u64,
    /// Rows repeating a (metric, window_end, dims) already seen; the last one
    /// counts (outputs are upserts). Not a failure by itself.
    pub rows_duplicate: u64,
    /// Window ends that must be emitted (see [`verify`]) but have no row.
    pub windows_missing: u64,
    /// Per measure (`pv`, `uv`, those some metric outputs): the largest
    /// `|got - expected| / max(expected, 1)` over the compared rows.
    pub worst_rel_diff: Vec<(String, f64)>,
    /// The first few problems, human readable.
    pub examples: Vec<String>,
}

impl VerifyReport {
    /// True when no row is wrong or missing and no window is missing.
    pub fn ok(&self) -> bool {
        self.rows_wrong == 0 && self.rows_missing == 0 && self.windows_missing == 0
    }

    /// Writes a short human summary: the counters, the worst relative
    /// difference per measure, then the examples.
    pub fn print(&self, w: &mut impl Write) -> io::Result<()> {
        if self.ok() {
            writeln!(w, "verify: OK, every result matches the offline recomputation")?;
        } else {
            writeln!(w, "verify: FAILED, results differ from the offline recomputation")?;
        }
        writeln!(w, "  rows checked:     {}", self.rows_checked)?;
        writeln!(w, "  rows wrong:       {}", self.rows_wrong)?;
        writeln!(w, "  rows missing:     {}", self.rows_missing)?;
        writeln!(w, "  rows duplicate:   {} (upserts: the last row of a key counts)", self.rows_duplicate)?;
        writeln!(w, "  windows missing:  {}", self.windows_missing)?;
        if !self.worst_rel_diff.is_empty() {
            let parts: Vec<String> = self.worst_rel_diff.iter().map(|(m, d)| format!("{m} {d:.6}")).collect();
            writeln!(w, "  worst relative difference: {}", parts.join(", "))?;
        }
        if !self.examples.is_empty() {
            writeln!(w, "  first problems:")?;
            for e in &self.examples {
                writeln!(w, "    - {e}")?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Group-key values
// ---------------------------------------------------------------------------

/// One group-by value, hashable. Distinct variants are distinct keys, like
/// distinct `serde_json` values: the integer 7 and the string "7" differ.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Dim {
    Null,
    Int(i64),
    /// `f64` bits, with -0.0 folded into 0.0 (they are equal JSON values).
    Float(u64),
    Str(String),
}

impl Dim {
    fn float(f: f64) -> Dim {
        Dim::Float(if f == 0.0 { 0f64.to_bits() } else { f.to_bits() })
    }

    fn from_field(v: FieldValue) -> Dim {
        match v {
            FieldValue::Null => Dim::Null,
            FieldValue::Int(i) => Dim::Int(i),
            FieldValue::Float(f) => Dim::float(f),
            FieldValue::Str(s) => Dim::Str(String::from_utf8_lossy(s).into_owned()),
        }
    }

    /// The key value a result row's `dims` entry denotes; `None` for values
    /// no event can produce (booleans, arrays, objects).
    fn from_json(v: &Value) -> Option<Dim> {
        match v {
            Value::Null => Some(Dim::Null),
            Value::Number(n) => n.as_i64().map(Dim::Int).or_else(|| n.as_f64().map(Dim::float)),
            Value::String(s) => Some(Dim::Str(s.clone())),
            _ => None,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Dim::Null => Value::Null,
            Dim::Int(i) => Value::from(*i),
            Dim::Float(bits) => serde_json::Number::from_f64(f64::from_bits(*bits)).map_or(Value::Null, Value::Number),
            Dim::Str(s) => Value::String(s.clone()),
        }
    }
}

// ---------------------------------------------------------------------------
// Reading inputs
// ---------------------------------------------------------------------------

/// One accepted input record, for field look-ups by name.
#[derive(Clone, Copy)]
enum Rec<'r> {
    Json(&'r Map<String, Value>),
    Csv { header: &'r csv::ByteRecord, row: &'r csv::ByteRecord },
    Binary { names: &'r [String; BINARY_DIMS], dims: [u32; BINARY_DIMS] },
}

impl<'r> Rec<'r> {
    /// The value of a dimension or filter field (`Null` when absent).
    fn get(&self, name: &str) -> FieldValue<'r> {
        match *self {
            Rec::Json(obj) => obj.get(name).map_or(FieldValue::Null, json_field),
            Rec::Csv { header, row } => header
                .iter()
                .position(|h| h == name.as_bytes())
                .and_then(|i| row.get(i))
                .map_or(FieldValue::Null, csv_field),
            Rec::Binary { names, dims } => {
                names.iter().position(|n| n == name).map_or(FieldValue::Null, |i| binary_field(dims[i]))
            }
        }
    }
}

fn json_field(v: &Value) -> FieldValue<'_> {
    match v {
        Value::String(s) => FieldValue::Str(s.as_bytes()),
        Value::Number(n) => match n.as_i64() {
            Some(i) => FieldValue::Int(i),
            None => n.as_f64().map_or(FieldValue::Null, FieldValue::Float),
        },
        _ => FieldValue::Null,
    }
}

fn csv_field(cell: &[u8]) -> FieldValue<'_> {
    if cell.is_empty() {
        FieldValue::Null
    } else if let Some(i) = canonical_int(cell) {
        FieldValue::Int(i)
    } else {
        FieldValue::Str(cell)
    }
}

fn binary_field(code: u32) -> FieldValue<'static> {
    if code == BINARY_NULL {
        FieldValue::Null
    } else {
        FieldValue::Int(i64::from(code))
    }
}

/// An integer written canonically: exactly the text `i64::to_string` gives
/// (optional `-`, digits, no leading zeros, no `+`, not `-0`).
fn canonical_int(text: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(text).ok()?;
    let i: i64 = s.parse().ok()?;
    (itoa::Buffer::new().format(i) == s).then_some(i)
}

fn ts_in_range(ts: i64) -> bool {
    (TS_MIN_MS..TS_MAX_MS).contains(&ts)
}

/// Receives each accepted event: time, device-id text, fields.
type EventSink<'s> = dyn FnMut(i64, &[u8], Rec<'_>) -> Result<()> + 's;

/// Reads every file of a source in order, calling `f` for each event that has
/// a valid time and device id.
fn read_source(src: &SourceSpec, f: &mut EventSink<'_>) -> Result<()> {
    if src.is_stream() {
        let what = if src.kafka.is_some() { "Kafka topics" } else { "a TCP socket" };
        anyhow::bail!(
            "source {:?} reads {what}: verify recomputes from files; save what it received to a file and pass --input {}=FILE",
            src.name,
            src.name
        );
    }
    if src.format == Format::Rows {
        return read_rows(src, f);
    }
    for path in &src.paths {
        match src.format {
            Format::Rows => unreachable!("read whole above"),
            Format::Jsonl => read_jsonl(src, path, f),
            Format::Csv => read_csv(src, path, f),
            Format::Binary => read_binary(src, path, f),
        }
        .with_context(|| format!("source {:?}: reading {}", src.name, path.display()))?;
    }
    Ok(())
}

fn read_jsonl(src: &SourceSpec, path: &Path, f: &mut EventSink<'_>) -> Result<()> {
    for_each_line(path, src.max_line_bytes, &mut |line| {
        let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(line) else {
            return Ok(());
        };
        let ts = match obj.get(&src.ts_field).and_then(Value::as_i64) {
            Some(ts) if ts_in_range(ts) => ts,
            _ => return Ok(()),
        };
        let mut digits = itoa::Buffer::new();
        let did: &[u8] = match obj.get(&src.did_field) {
            Some(Value::String(s)) if !s.is_empty() => s.as_bytes(),
            Some(Value::Number(n)) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => digits.format(i).as_bytes(),
                (None, Some(u)) => digits.format(u).as_bytes(),
                _ => return Ok(()),
            },
            _ => return Ok(()),
        };
        f(ts, did, Rec::Json(&obj))
    })
}

/// Result rows of another job: the last row of each upsert key (metric,
/// window end, grouping, dims) in input order replaces the ones before it;
/// each survivor is one event whose fields are the row's, its dims, and
/// `grouping` as the set's fields joined by commas.
fn read_rows(src: &SourceSpec, f: &mut EventSink<'_>) -> Result<()> {
    let mut latest: AHashMap<String, (usize, Map<String, Value>)> = AHashMap::new();
    let mut order = 0;
    for path in &src.paths {
        for_each_line(path, src.max_line_bytes, &mut |line| {
            let Ok(Value::Object(mut row)) = serde_json::from_slice::<Value>(line) else {
                return Ok(());
            };
            let (Some(Value::String(metric)), Some(end), Some(Value::Object(dims)), Some(Value::Array(grouping))) = (
                row.remove("metric"),
                row.get("window_end").and_then(Value::as_i64),
                row.remove("dims"),
                row.remove("grouping"),
            ) else {
                return Ok(());
            };
            if !ts_in_range(end - 1) {
                return Ok(());
            }
            let names: Option<Vec<&str>> = grouping.iter().map(Value::as_str).collect();
            let Some(names) = names else {
                return Ok(());
            };
            let mut sorted: Vec<(&String, &Value)> = dims.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            let key =
                format!("{metric}|{end}|{}|{}", serde_json::to_string(&grouping)?, serde_json::to_string(&sorted)?);
            let mut flat: Map<String, Value> = dims.clone();
            flat.insert("grouping".into(), Value::String(names.join(",")));
            flat.insert("metric".into(), Value::String(metric));
            flat.extend(row);
            order += 1;
            latest.insert(key, (order, flat));
            Ok(())
        })
        .with_context(|| format!("source {:?}: reading {}", src.name, path.display()))?;
    }
    let mut rows: Vec<_> = latest.into_iter().collect();
    rows.sort_by_key(|(_, (order, _))| *order);
    for (key, (_, flat)) in &rows {
        let end = flat.get("window_end").and_then(Value::as_i64).unwrap_or_default();
        f(end - 1, key.as_bytes(), Rec::Json(flat))?;
    }
    Ok(())
}

/// Calls `f` with each line of the file that is non-empty and at most
/// `max_len` bytes long, without its `\n` and one trailing `\r`. Overlong
/// lines are skipped without being held in memory.
fn for_each_line(path: &Path, max_len: usize, f: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let file = File::open(path).context("cannot open")?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line: Vec<u8> = Vec::new();
    let mut overlong = false;
    let keep = max_len.saturating_add(1); // room for a trailing '\r'
    loop {
        let buf = reader.fill_buf().context("read failed")?;
        if buf.is_empty() {
            break;
        }
        let (used, ends) = match memchr::memchr(b'\n', buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let chunk = &buf[..if ends { used - 1 } else { used }];
        if !overlong {
            if line.len() + chunk.len() > keep {
                overlong = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        reader.consume(used);
        if ends {
            finish_line(&mut line, &mut overlong, max_len, f)?;
        }
    }
    finish_line(&mut line, &mut overlong, max_len, f)
}

fn finish_line(
    line: &mut Vec<u8>,
    overlong: &mut bool,
    max_len: usize,
    f: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    if !*overlong {
        let text = line.strip_suffix(b"\r").unwrap_or(line);
        if !text.is_empty() && text.len() <= max_len {
            f(text)?;
        }
    }
    line.clear();
    *overlong = false;
    Ok(())
}

fn read_csv(src: &SourceSpec, path: &Path, f: &mut EventSink<'_>) -> Result<()> {
    let mut rdr = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_path(path).context("cannot open")?;
    let header = rdr.byte_headers().context("cannot read the CSV header")?.clone();
    let col = |name: &str| header.iter().position(|h| h == name.as_bytes());
    let (Some(ts_col), Some(did_col)) = (col(&src.ts_field), col(&src.did_field)) else {
        return Ok(()); // no row of this file can have a time and a device
    };
    let mut row = csv::ByteRecord::new();
    while rdr.read_byte_record(&mut row).context("CSV read failed")? {
        if row.len() != header.len() {
            continue;
        }
        let ts = match canonical_int(&row[ts_col]) {
            Some(ts) if ts_in_range(ts) => ts,
            _ => continue,
        };
        let did = &row[did_col];
        if did.is_empty() {
            continue;
        }
        f(ts, did, Rec::Csv { header: &header, row: &row })?;
    }
    Ok(())
}

fn read_binary(src: &SourceSpec, path: &Path, f: &mut EventSink<'_>) -> Result<()> {
    let file = File::open(path).context("cannot open")?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut bytes = [0u8; BINARY_RECORD_BYTES];
    let mut digits = itoa::Buffer::new();
    loop {
        if read_full(&mut reader, &mut bytes).context("read failed")? < BINARY_RECORD_BYTES {
            return Ok(()); // end of file, or a trailing partial record
        }
        let rec: BinaryRecord = bytemuck::pod_read_unaligned(&bytes);
        let ts = i64::from_le(rec.ts_ms);
        if !ts_in_range(ts) {
            continue;
        }
        let did = digits.format(u64::from_le(rec.did)).as_bytes();
        let dims = rec.dims.map(u32::from_le);
        f(ts, did, Rec::Binary { names: &src.binary_dims, dims })?;
    }
}

/// Fills `buf` unless the reader ends first; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------
// The offline truth
// ---------------------------------------------------------------------------

/// Cumulative values of one key at a window end where they changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Point {
    end: i64,
    v: Values,
    /// A summary's `sum` / `min` / `max` values here: the `x`-th run of
    /// [`MetricTruth::xs`].
    x: u32,
}

/// Everything known about one period of one metric.
#[derive(Debug)]
struct PeriodTruth {
    /// (key id, change points ascending by window end), ascending by key id.
    series: Vec<(u32, Vec<Point>)>,
    /// End of the first window holding data.
    first_end: i64,
    /// End of the window holding the period's last event.
    last_end: i64,
}

impl PeriodTruth {
    fn points(&self, key: u32) -> Option<&[Point]> {
        self.series.binary_search_by_key(&key, |(k, _)| *k).ok().map(|i| self.series[i].1.as_slice())
    }
}

/// Cumulative values at window end `end` (`None`: no data yet).
fn value_at(points: &[Point], end: i64) -> Option<Point> {
    let n = points.partition_point(|p| p.end <= end);
    n.checked_sub(1).map(|i| points[i])
}

#[derive(Debug, Default)]
struct MetricTruth {
    key_ids: AHashMap<Vec<Dim>, u32>,
    /// Key values by id, ids in order of first appearance in the input.
    keys: Vec<Vec<Dim>>,
    periods: BTreeMap<i64, PeriodTruth>,
    /// A summary's value measures (`sum`, `min`, `max`), in the job's
    /// order, and their values at each point: `nx` per point (`None`:
    /// `null`, no value counted).
    nx: usize,
    xs: Vec<Option<f64>>,
}

impl MetricTruth {
    /// The value measures of a point.
    fn x(&self, p: &Point) -> &[Option<f64>] {
        let at = p.x as usize * self.nx;
        &self.xs[at..at + self.nx]
    }
}

/// One passing event of one metric.
#[derive(Clone, Copy)]
struct Ev {
    key: u32,
    did: u32,
    ts: i64,
    /// A summary's value fields: `vals[x * fields ..]` (NaN: no value).
    x: u32,
}

/// A summary's value field over some events, counted the plain way:
/// sums in millionths from each value's six-decimal text.
#[derive(Clone, Copy, Debug, Default)]
struct RefAgg {
    n: u64,
    sum: i128,
    min: f64,
    max: f64,
}

impl RefAgg {
    fn add(&mut self, v: f64) {
        if v.is_nan() {
            return;
        }
        // `{:.6}` rounds to six decimals; drop the point and read the digits.
        let text = format!("{v:.6}");
        let sum: i128 = text.replace('.', "").parse().unwrap_or(0);
        if self.n == 0 || v < self.min {
            self.min = v;
        }
        if self.n == 0 || v > self.max {
            self.max = v;
        }
        self.n += 1;
        self.sum += sum;
    }

    /// The value of `m` (a `sum`, `min` or `max`) as a row would carry it.
    fn output(&self, m: Measure) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        match m {
            Measure::Min(_) => Some(self.min),
            Measure::Max(_) => Some(self.max),
            _ => {
                let (neg, a) = (self.sum < 0, self.sum.unsigned_abs());
                let text = format!("{}{}.{:06}", if neg { "-" } else { "" }, a / 1_000_000, a % 1_000_000);
                text.parse().ok()
            }
        }
    }
}

/// A field's value as a summary counts it: a number, or text that holds
/// one; else NaN (not counted).
fn ref_number(v: FieldValue) -> f64 {
    let f = match v {
        FieldValue::Int(i) => i as f64,
        FieldValue::Float(f) => f,
        FieldValue::Str(s) => std::str::from_utf8(s).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(f64::NAN),
        FieldValue::Null => f64::NAN,
    };
    if f.is_finite() {
        f
    } else {
        f64::NAN
    }
}

/// The offline truth, also used by tests: (metric index, window_end_ms,
/// dims as serde_json values in group_by order) -> (pv, uv).
///
/// Computed exactly from the job's input files: no watermark, no lateness,
/// device ids compared by their full text.
#[derive(Debug)]
pub struct Offline {
    job: Job,
    metrics: Vec<MetricTruth>,
}

impl Offline {
    /// Reads every source some metric uses (each once) and computes the
    /// cumulative values of every metric, key and window.
    pub fn compute(job: &Job) -> Result<Offline> {
        let mut truths: Vec<MetricTruth> = job
            .metrics
            .iter()
            .map(|m| MetricTruth { nx: value_measures(m).count(), ..MetricTruth::default() })
            .collect();
        let mut events: Vec<Vec<Ev>> = job.metrics.iter().map(|_| Vec::new()).collect();
        let mut vals: Vec<Vec<f64>> = job.metrics.iter().map(|_| Vec::new()).collect();
        let mut dids: AHashMap<Box<[u8]>, u32> = AHashMap::new();
        let dims = job.dimensions.iter().map(RefDim::read).collect::<Result<Vec<_>>>()?;
        for (si, src) in job.sources.iter().enumerate() {
            let readers: Vec<usize> =
                (0..job.metrics.len()).filter(|&m| job.metrics[m].sources.contains(&si)).collect();
            if readers.is_empty() {
                continue;
            }
            // Dimensions that drop the events they lack: those whose key the
            // source has (any JSON-lines source), and those a metric reads
            // a field of.
            let used: Vec<String> = readers
                .iter()
                .flat_map(|&m| {
                    let spec = &job.metrics[m];
                    let filter = spec.filter.as_ref().map(|f| f.fields()).unwrap_or_default();
                    spec.group_by
                        .iter()
                        .cloned()
                        .chain(filter)
                        .chain(spec.value_fields().iter().cloned())
                        .collect::<Vec<_>>()
                })
                .collect();
            let dropping: Vec<usize> = (0..dims.len())
                .filter(|&d| {
                    let spec = &job.dimensions[d];
                    spec.on_missing == OnMissing::Drop
                        && (src.can_supply(&spec.key) || used.iter().any(|u| job.enriched(u).is_some_and(|e| e.0 == d)))
                })
                .collect();
            read_source(src, &mut |ts, did, rec| {
                for &d in &dropping {
                    if dims[d].row(rec.get(&job.dimensions[d].key)).is_none() {
                        return Ok(());
                    }
                }
                let get = |name: &String| -> FieldValue<'_> {
                    match job.enriched(name) {
                        Some((d, f)) => {
                            dims[d].row(rec.get(&job.dimensions[d].key)).map_or(FieldValue::Null, |r| r[f].field())
                        }
                        None => rec.get(name),
                    }
                };
                let mut did_id = None;
                for &mi in &readers {
                    let spec = &job.metrics[mi];
                    let passes = spec.filter.as_ref().is_none_or(|f| f.root.passes(&get));
                    if !passes {
                        continue;
                    }
                    let did = match did_id {
                        Some(id) => id,
                        None => {
                            let id = intern_did(&mut dids, did)?;
                            did_id = Some(id);
                            id
                        }
                    };
                    let key: Vec<Dim> = spec.group_by.iter().map(|g| Dim::from_field(get(g))).collect();
                    let key = intern_key(&mut truths[mi], key)?;
                    let fields = spec.value_fields();
                    let x = vals[mi].len().checked_div(fields.len()).unwrap_or(0) as u32;
                    vals[mi].extend(fields.iter().map(|f| ref_number(get(f))));
                    events[mi].push(Ev { key, did, ts, x });
                }
                Ok(())
            })?;
        }
        let mut classes = Vec::new();
        for (spec, evs) in job.metrics.iter().zip(&events) {
            classes.push(match &spec.dau {
                None => None,
                Some(d) => Some(DauTruth::new(job, d, evs, &dids)?),
            });
        }
        drop(dids);
        for (mi, evs) in events.into_iter().enumerate() {
            let truth = &mut truths[mi];
            truth.periods = cumulate(job, &job.metrics[mi], evs, classes[mi].as_ref(), &vals[mi], &mut truth.xs);
        }
        Ok(Offline { job: job.clone(), metrics: truths })
    }

    /// `(pv, uv)` of a key at a window end, or `None` when the key has no
    /// data there (or `window_end_ms` is not a window end of the metric, or
    /// `dims` does not have one value per group-by field).
    pub fn value(&self, metric: usize, window_end_ms: i64, dims: &[serde_json::Value]) -> Option<(u64, u64)> {
        let spec = self.job.metrics.get(metric)?;
        let truth = &self.metrics[metric];
        if dims.len() != spec.group_by.len() {
            return None;
        }
        let key: Vec<Dim> = dims.iter().map(Dim::from_json).collect::<Option<_>>()?;
        let id = *truth.key_ids.get(&key)?;
        let period = window_period(&self.job, spec, window_end_ms)?;
        let p = value_at(truth.periods.get(&period)?.points(id)?, window_end_ms)?;
        Some((p.v[0], p.v[1]))
    }

    /// Day (period) totals: for each period start with data, dims -> (pv, uv)
    /// over the whole period. Ordered by period, then by the key's first
    /// appearance in the input.
    pub fn period_totals(&self, metric: usize) -> Vec<(i64, Vec<serde_json::Value>, u64, u64)> {
        let Some(truth) = self.metrics.get(metric) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (&start, period) in &truth.periods {
            for (key, points) in &period.series {
                if let Some(last) = points.last() {
                    let dims = truth.keys[*key as usize].iter().map(Dim::to_json).collect();
                    out.push((start, dims, last.v[0], last.v[1]));
                }
            }
        }
        out
    }
}

fn intern_did(dids: &mut AHashMap<Box<[u8]>, u32>, did: &[u8]) -> Result<u32> {
    if let Some(&id) = dids.get(did) {
        return Ok(id);
    }
    let Ok(id) = u32::try_from(dids.len()) else {
        bail!("more than 2^32 distinct device ids");
    };
    dids.insert(did.into(), id);
    Ok(id)
}

fn intern_key(truth: &mut MetricTruth, key: Vec<Dim>) -> Result<u32> {
    if let Some(&id) = truth.key_ids.get(&key) {
        return Ok(id);
    }
    let Ok(id) = u32::try_from(truth.keys.len()) else {
        bail!("more than 2^32 distinct group keys");
    };
    truth.keys.push(key.clone());
    truth.key_ids.insert(key, id);
    Ok(id)
}

/// What the offline truth knows of devices for one DAU metric: the days
/// each was seen on (its history file, then its events), read with the
/// `csv` crate straight from the file.
struct DauTruth {
    returning_after_days: i64,
    /// By device id: (first, last) day of the history file.
    history: AHashMap<u32, (i64, i64)>,
    /// By device id: the days with events, ascending.
    days: AHashMap<u32, Vec<i64>>,
    tz_ms: i64,
}

impl DauTruth {
    fn new(job: &Job, spec: &crate::job::DauSpec, evs: &[Ev], dids: &AHashMap<Box<[u8]>, u32>) -> Result<DauTruth> {
        let day_of = |ts: i64| (ts + job.timezone_offset_ms).div_euclid(DAY_MS);
        let mut days: AHashMap<u32, Vec<i64>> = AHashMap::new();
        for e in evs {
            days.entry(e.did).or_default().push(day_of(e.ts));
        }
        for d in days.values_mut() {
            d.sort_unstable();
            d.dedup();
        }
        let mut history = AHashMap::new();
        if let Some(path) = &spec.device_history {
            let mut rdr = csv::ReaderBuilder::new()
                .flexible(true)
                .from_path(path)
                .with_context(|| format!("cannot read device history {}", path.display()))?;
            for rec in rdr.byte_records() {
                // Malformed rows are skipped, as the engine does.
                let Ok(rec) = rec else { continue };
                if rec.len() != 3 || rec[0].is_empty() {
                    continue;
                }
                let (Some(first), Some(last)) = (civil_day(&rec[1]), civil_day(&rec[2])) else {
                    continue;
                };
                if first > last {
                    continue;
                }
                let Some(&id) = dids.get(&rec[0]) else {
                    continue; // never in the stream: classifies nothing
                };
                let h = history.entry(id).or_insert((first, last));
                *h = (h.0.min(first), h.1.max(last));
            }
        }
        Ok(DauTruth {
            returning_after_days: spec.returning_after_days as i64,
            history,
            days,
            tz_ms: job.timezone_offset_ms,
        })
    }

    /// (new, returning) of device `did` on the day starting at `period_ms`.
    fn class(&self, did: u32, period_ms: i64) -> (bool, bool) {
        let day = (period_ms + self.tz_ms).div_euclid(DAY_MS);
        let earlier = self.days.get(&did).and_then(|d| d.iter().copied().take_while(|&x| x < day).last());
        let last = match (self.history.get(&did), earlier) {
            (None, None) => return (true, false),
            (Some(h), e) => h.1.max(e.unwrap_or(i64::MIN)),
            (None, Some(e)) => e,
        };
        (false, last + self.returning_after_days < day)
    }
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` date in 2000..=2099.
fn civil_day(text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?;
    let mut it = text.split('-');
    let (y, m, d) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, i64, i64) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(2000..=2099).contains(&y) || !(1..=12).contains(&m) || d < 1 || d > month_days[m as usize - 1] {
        return None;
    }
    // Count days year by year and month by month: slow, and plainly right.
    let mut n = 0;
    for year in 1970..y {
        n += if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) { 366 } else { 365 };
    }
    n += month_days[..m as usize - 1].iter().sum::<i64>();
    Some(n + d - 1)
}

/// End of the window of `period` whose last step holds `ts`.
fn window_end_of(period: i64, ts: i64, step: i64) -> i64 {
    period + ((ts - period) / step + 1) * step
}

/// Sorts one metric's events by (key, time) and walks them: for each key and
/// period, the running pv and the set of distinct devices, recorded at the
/// end of every window that received events.
/// A summary's value measures are counted alongside (`vals`: the events'
/// value fields), their outputs at each point appended to `xs`.
fn cumulate(
    job: &Job,
    spec: &MetricSpec,
    mut evs: Vec<Ev>,
    dau: Option<&DauTruth>,
    vals: &[f64],
    xs: &mut Vec<Option<f64>>,
) -> BTreeMap<i64, PeriodTruth> {
    let nv = spec.value_fields().len();
    let nx = value_measures(spec).count();
    evs.sort_unstable_by_key(|e| (e.key, e.ts));
    let mut periods: BTreeMap<i64, PeriodTruth> = BTreeMap::new();
    let mut devices: AHashSet<u32> = AHashSet::new();
    let mut i = 0;
    while i < evs.len() {
        let key = evs[i].key;
        let period = job.period_start_ms(evs[i].ts, spec.size_ms);
        let period_end = period + spec.size_ms;
        devices.clear();
        let (mut pv, mut new, mut ret) = (0u64, 0u64, 0u64);
        let mut aggs = vec![RefAgg::default(); nv];
        let mut points = Vec::new();
        while i < evs.len() && evs[i].key == key && evs[i].ts < period_end {
            let end = window_end_of(period, evs[i].ts, spec.step_ms);
            while i < evs.len() && evs[i].key == key && evs[i].ts < end {
                pv += 1;
                let at = evs[i].x as usize * nv;
                for (a, &v) in aggs.iter_mut().zip(&vals[at..at + nv]) {
                    a.add(v);
                }
                if devices.insert(evs[i].did) {
                    if let Some(d) = dau {
                        let (n, r) = d.class(evs[i].did, period);
                        new += n as u64;
                        ret += r as u64;
                    }
                }
                i += 1;
            }
            let uv = devices.len() as u64;
            let x = xs.len().checked_div(nx).unwrap_or(0) as u32;
            xs.extend(value_measures(spec).map(|m| m.value_field().and_then(|v| aggs[v].output(m))));
            points.push(Point { end, v: [pv, uv, uv, new, ret, pv], x });
        }
        let (first, last) = match (points.first(), points.last()) {
            (Some(f), Some(l)) => (f.end, l.end),
            _ => continue, // unreachable: the loop above consumed one event at least
        };
        let entry = periods.entry(period).or_insert_with(|| PeriodTruth {
            series: Vec::new(),
            first_end: first,
            last_end: last,
        });
        entry.first_end = entry.first_end.min(first);
        entry.last_end = entry.last_end.max(last);
        entry.series.push((key, points)); // keys arrive in ascending order
    }
    periods
}

/// A key's dims as tally renders them: `{"f":v,…}` in group-by order.
fn dims_text(names: &[String], values: &[Dim]) -> String {
    let parts: Vec<String> =
        names.iter().zip(values).map(|(n, v)| format!("{}:{}", Value::from(n.as_str()), v.to_json())).collect();
    format!("{{{}}}", parts.join(","))
}

/// A summary's `sum`, `min` and `max` measures, in the job's order.
fn value_measures(spec: &MetricSpec) -> impl Iterator<Item = Measure> + '_ {
    spec.measures.iter().copied().filter(|m| m.value_field().is_some())
}

/// A dimension table as the referee reads it (with the `csv` crate and
/// `serde_json`): each key's last row; rows without a key are skipped.
struct RefDim {
    rows: AHashMap<Vec<u8>, Vec<Dim>>,
}

impl Dim {
    fn field(&self) -> FieldValue<'_> {
        match self {
            Dim::Null => FieldValue::Null,
            Dim::Int(i) => FieldValue::Int(*i),
            Dim::Float(bits) => FieldValue::Float(f64::from_bits(*bits)),
            Dim::Str(s) => FieldValue::Str(s.as_bytes()),
        }
    }
}

impl RefDim {
    fn read(spec: &DimensionSpec) -> Result<RefDim> {
        if spec.kafka.is_some() || spec.redis.is_some() {
            bail!(
                "dimension {:?} reads {}: verify reads dimension tables from files; write the table to a file and pass --dimension {}=FILE",
                spec.name,
                if spec.kafka.is_some() { "a topic" } else { "Redis" },
                spec.name
            );
        }
        let path = &spec.path;
        let mut rows = AHashMap::new();
        match spec.format {
            DimFormat::Csv => {
                let mut rdr = csv::ReaderBuilder::new()
                    .flexible(true)
                    .from_path(path)
                    .with_context(|| format!("dimension {:?}: cannot read {}", spec.name, path.display()))?;
                let header = rdr.byte_headers()?.clone();
                let col = |name: &str| header.iter().position(|h| h == name.as_bytes());
                let Some(key) = col(&spec.key) else {
                    bail!("dimension {:?}: {} has no column {:?}", spec.name, path.display(), spec.key);
                };
                let cols = spec.fields.iter().map(|f| col(f)).collect::<Option<Vec<_>>>();
                let Some(cols) = cols else {
                    bail!("dimension {:?}: {} lacks a column of {:?}", spec.name, path.display(), spec.fields);
                };
                for rec in rdr.byte_records() {
                    let Ok(rec) = rec else { continue };
                    if rec.len() != header.len() || rec[key].is_empty() {
                        continue;
                    }
                    rows.insert(rec[key].to_vec(), cols.iter().map(|&c| Dim::from_field(csv_field(&rec[c]))).collect());
                }
            }
            DimFormat::Jsonl => {
                let text = std::fs::read(path)
                    .with_context(|| format!("dimension {:?}: cannot read {}", spec.name, path.display()))?;
                for line in text.split(|&b| b == b'\n') {
                    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(line) else { continue };
                    let key = match obj.get(&spec.key) {
                        Some(Value::String(s)) if !s.is_empty() => s.as_bytes().to_vec(),
                        Some(Value::Number(n)) if n.is_i64() => n.to_string().into_bytes(),
                        _ => continue,
                    };
                    let row =
                        spec.fields.iter().map(|f| obj.get(f).map_or(Dim::Null, |v| Dim::from_field(json_field(v))));
                    rows.insert(key, row.collect());
                }
            }
        }
        Ok(RefDim { rows })
    }

    /// The row joined to an event whose key field holds `v` (keys compare
    /// by text: `7` joins `"7"`).
    fn row(&self, v: FieldValue) -> Option<&[Dim]> {
        let text = match v {
            FieldValue::Null => return None,
            FieldValue::Str(s) => s.to_vec(),
            FieldValue::Int(i) => i.to_string().into_bytes(),
            FieldValue::Float(f) => serde_json::Number::from_f64(f)?.to_string().into_bytes(),
        };
        self.rows.get(&text).map(Vec::as_slice)
    }
}

/// The period a window end belongs to, if it is a window end of the metric
/// (`period < end <= period + size`, on a step boundary).
fn window_period(job: &Job, spec: &MetricSpec, end: i64) -> Option<i64> {
    if !(TS_MIN_MS - DAY_MS..=TS_MAX_MS + DAY_MS).contains(&end) {
        return None;
    }
    let period = job.period_start_ms(end - 1, spec.size_ms);
    ((end - period) % spec.step_ms == 0).then_some(period)
}

// ---------------------------------------------------------------------------
// Checking a results file
// ---------------------------------------------------------------------------

/// Recomputes the job offline ([`Offline::compute`]) and checks every row of
/// the JSON-lines `results` file against it:
///
/// 1. malformed lines, unknown metrics, unexpected fields, a `window_end`
///    off the metric's step grid or a `window_start` that is not its period
///    start are wrong rows;
/// 2. every (metric, window_end, dims) row must carry the offline values of
///    the metric's measures, for a key with data at that window; a repeated
///    row is a duplicate and the last one counts;
/// 3. in every emitted window, every key with data (`emit = "all"`) or every
///    key whose values changed since the previous emitted window of the
///    period (`emit = "changed"`) must have a row; with `changed`, a key
///    whose pv and uv both did not change must not;
/// 4. for each period with data, every window end from the first window with
///    data to the window of the period's last event must be emitted (with
///    `changed`: those where some key's output values changed). When a sink
///    of the job writes to `results`, only its metrics are required here.
pub fn verify(job: &Job, results: &Path) -> Result<VerifyReport> {
    if let Some(metrics) = minute_devices_sink(job, results) {
        return verify_minute_devices(job, &metrics, results);
    }
    let offline = Offline::compute(job)?;
    let file = File::open(results).with_context(|| format!("cannot open results {}", results.display()))?;
    let required = metrics_written_to(job, results);
    check(&offline, BufReader::new(file), &required).with_context(|| format!("reading results {}", results.display()))
}

/// The DAU metrics of the `minute_devices` sink writing to `path`, if one does.
fn minute_devices_sink(job: &Job, path: &Path) -> Option<Vec<usize>> {
    let target = std::fs::canonicalize(path).ok()?;
    job.sinks.iter().find_map(|s| match &s.target {
        SinkTarget::File(p) if s.rows == SinkRows::MinuteDevices && std::fs::canonicalize(p).ok()? == target => {
            Some(s.metrics.clone())
        }
        _ => None,
    })
}

/// A `minute_devices` row reduced to ids: (metric, source, minute, key, device).
type DetailKey = (u32, u32, i64, u32, u32);

/// Checks a `minute_devices` file: its rows must be exactly the distinct
/// (metric, source, step start, dims, device) of the events each DAU metric
/// counts (its sources, its filter), each once. Like the window check, this
/// is the truth without lateness: it holds when no event is late or older
/// than the metric's minute-dedup ring.
fn verify_minute_devices(job: &Job, metrics: &[usize], path: &Path) -> Result<VerifyReport> {
    let mut dids: AHashMap<Box<[u8]>, u32> = AHashMap::new();
    let mut keys: Vec<AHashMap<Vec<String>, u32>> = job.metrics.iter().map(|_| AHashMap::new()).collect();
    let mut want: AHashSet<DetailKey> = AHashSet::new();
    let off = job.timezone_offset_ms;
    for (si, src) in job.sources.iter().enumerate() {
        let readers: Vec<usize> = metrics.iter().copied().filter(|&m| job.metrics[m].sources.contains(&si)).collect();
        if readers.is_empty() {
            continue;
        }
        read_source(src, &mut |ts, did, rec| {
            for &mi in &readers {
                let spec = &job.metrics[mi];
                if !spec.filter.as_ref().is_none_or(|f| f.root.passes(&|name: &String| rec.get(name))) {
                    continue;
                }
                let dims: Vec<String> =
                    spec.group_by.iter().map(|g| Dim::from_field(rec.get(g)).to_json().to_string()).collect();
                let next = keys[mi].len() as u32;
                let key = *keys[mi].entry(dims).or_insert(next);
                let did = intern_did(&mut dids, did)?;
                let minute = (ts + off).div_euclid(spec.step_ms) * spec.step_ms - off;
                want.insert((mi as u32, si as u32, minute, key, did));
            }
            Ok(())
        })?;
    }
    let file = File::open(path).with_context(|| format!("cannot open results {}", path.display()))?;
    let mut report = VerifyReport::default();
    let mut seen: AHashSet<DetailKey> = AHashSet::new();
    let wrong = |report: &mut VerifyReport, line: u64, why: String| {
        report.rows_wrong += 1;
        if report.examples.len() < EXAMPLES_MAX {
            report.examples.push(format!("line {line}: {why}"));
        }
    };
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let n = i as u64 + 1;
        report.rows_checked += 1;
        let row: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                wrong(&mut report, n, format!("not JSON: {e}"));
                continue;
            }
        };
        let metric = job.metrics.iter().position(|m| Some(m.name.as_str()) == row["metric"].as_str());
        let source = job.sources.iter().position(|s| Some(s.name.as_str()) == row["source"].as_str());
        let (Some(mi), Some(si), Some(minute), Some(dims), Some(did)) =
            (metric, source, row["minute"].as_i64(), row["dims"].as_object(), row["did"].as_str())
        else {
            wrong(&mut report, n, "not a minute_devices row of this job (metric, source, minute, dims, did)".into());
            continue;
        };
        let values: Vec<String> =
            job.metrics[mi].group_by.iter().map(|g| dims.get(g).unwrap_or(&Value::Null).to_string()).collect();
        let (Some(&key), Some(&did)) = (keys[mi].get(&values), dids.get(did.as_bytes())) else {
            wrong(&mut report, n, format!("no event has these dims and device: {line}"));
            continue;
        };
        let k = (mi as u32, si as u32, minute, key, did);
        if !want.contains(&k) {
            wrong(&mut report, n, format!("no event of this source, minute, dims and device: {line}"));
        } else if !seen.insert(k) {
            report.rows_duplicate += 1;
            wrong(&mut report, n, format!("written twice: {line}"));
        }
    }
    report.rows_missing = want.len() as u64 - seen.len() as u64;
    if report.rows_missing > 0 && report.examples.len() < EXAMPLES_MAX {
        report.examples.push(format!("{} (source, minute, dims, device) rows missing", report.rows_missing));
    }
    Ok(report)
}

/// Which metrics a results file must cover: those of the sinks writing to
/// that file, or every metric when no sink names it.
fn metrics_written_to(job: &Job, results: &Path) -> Vec<bool> {
    let mut required = vec![false; job.metrics.len()];
    let mut named = false;
    if let Ok(target) = std::fs::canonicalize(results) {
        for sink in &job.sinks {
            if let SinkTarget::File(p) = &sink.target {
                if std::fs::canonicalize(p).ok().as_ref() == Some(&target) {
                    named = true;
                    for &m in &sink.metrics {
                        if let Some(r) = required.get_mut(m) {
                            *r = true;
                        }
                    }
                }
            }
        }
    }
    if !named {
        required.iter_mut().for_each(|r| *r = true);
    }
    required
}

/// One result row, as read.
#[derive(Clone, Debug)]
struct Got {
    key: u32,
    values: [Option<u64>; MEASURES_N],
    /// A summary's `sum` / `min` / `max` values (`None`: `null`).
    x: Vec<Option<f64>>,
    /// A ranked list's `rank`.
    rank: Option<u64>,
    line: u64,
    /// Already counted as wrong while parsing (bad `window_start`).
    counted: bool,
}

/// A parsed row: metric, period, window end, key values, measures, and a
/// problem that makes it wrong without making it unusable.
struct Parsed {
    metric: usize,
    period: i64,
    end: i64,
    key: Vec<Dim>,
    values: [Option<u64>; MEASURES_N],
    x: Vec<Option<f64>>,
    rank: Option<u64>,
    flaw: Option<String>,
}

/// Keys of one metric seen only in the results, with ids continuing after
/// the offline ones.
#[derive(Default)]
struct ExtraKeys {
    ids: AHashMap<Vec<Dim>, u32>,
    keys: Vec<Vec<Dim>>,
}

struct Checker<'a> {
    off: &'a Offline,
    report: VerifyReport,
    /// Per metric: keys that appear in the results but never in the input.
    extra_keys: Vec<ExtraKeys>,
    /// (metric, period, window end) -> rows.
    windows: BTreeMap<(usize, i64, i64), Vec<Got>>,
    worst: [f64; MEASURES_N],
}

fn check(off: &Offline, mut results: impl BufRead, required: &[bool]) -> Result<VerifyReport> {
    let mut c = Checker {
        off,
        report: VerifyReport::default(),
        extra_keys: off.metrics.iter().map(|_| Default::default()).collect(),
        windows: BTreeMap::new(),
        worst: [0.0; MEASURES_N],
    };
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        if results.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        line_no += 1;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        c.report.rows_checked += 1;
        c.read_row(&buf, line_no);
    }
    c.compare_rows();
    c.check_coverage(required);
    let job = &off.job;
    c.report.worst_rel_diff = MEASURES
        .iter()
        .enumerate()
        .filter(|(_, m)| job.metrics.iter().any(|s| s.has(**m)))
        .map(|(i, m)| (m.name().to_string(), c.worst[i]))
        .collect();
    Ok(c.report)
}

impl Checker<'_> {
    fn problem(&mut self, text: String) {
        if self.report.examples.len() < EXAMPLES_MAX {
            self.report.examples.push(text);
        }
    }

    fn wrong(&mut self, text: String) {
        self.report.rows_wrong += 1;
        self.problem(text);
    }

    fn read_row(&mut self, raw: &[u8], line: u64) {
        let p = match self.parse_row(raw) {
            Ok(p) => p,
            Err(reason) => {
                let text = String::from_utf8_lossy(raw);
                let text = text.trim_end();
                let shown: String = text.chars().take(160).collect();
                let more = if shown.len() < text.len() { "…" } else { "" };
                self.wrong(format!("line {line}: {reason}: {shown}{more}"));
                return;
            }
        };
        let counted = match &p.flaw {
            Some(flaw) => {
                let what = self.describe(p.metric, p.end, &p.key);
                self.wrong(format!("{what}: {flaw} (line {line})"));
                true
            }
            None => false,
        };
        let key = self.key_id(p.metric, p.key);
        let got = Got { key, values: p.values, x: p.x, rank: p.rank, line, counted };
        self.windows.entry((p.metric, p.period, p.end)).or_default().push(got);
    }

    fn parse_row(&self, raw: &[u8]) -> Result<Parsed, String> {
        let job = &self.off.job;
        let value: Value = serde_json::from_slice(raw).map_err(|e| format!("not JSON ({e})"))?;
        let Value::Object(obj) = value else {
            return Err("not a JSON object".into());
        };
        let name = obj.get("metric").and_then(Value::as_str).ok_or("no \"metric\" string")?;
        let metric =
            job.metrics.iter().position(|m| m.name == name).ok_or_else(|| format!("unknown metric {name:?}"))?;
        // A summary's rows name their grouping set.
        let metric = match &job.metrics[metric].summary {
            None => metric,
            Some(_) => {
                let grouping: Vec<String> = obj
                    .get("grouping")
                    .and_then(|g| serde_json::from_value(g.clone()).ok())
                    .ok_or("no \"grouping\" array of field names")?;
                job.metrics
                    .iter()
                    .position(|m| m.name == name && m.group_by == grouping)
                    .ok_or_else(|| format!("metric {name:?} has no grouping set {grouping:?}"))?
            }
        };
        let spec = &job.metrics[metric];
        let int = |field: &str| obj.get(field).and_then(Value::as_i64).ok_or_else(|| format!("no integer {field:?}"));
        let start = int("window_start")?;
        let end = int("window_end")?;
        let period = window_period(job, spec, end).ok_or_else(|| {
            format!("window_end {end} is not a window end of metric {:?} (step {} ms)", spec.name, spec.step_ms)
        })?;
        let dims = obj.get("dims").and_then(Value::as_object).ok_or("no \"dims\" object")?;
        if dims.len() != spec.group_by.len() || spec.group_by.iter().any(|g| !dims.contains_key(g)) {
            return Err(format!("dims must have exactly the fields {:?}", spec.group_by));
        }
        let mut key = Vec::with_capacity(spec.group_by.len());
        for g in &spec.group_by {
            let v = &dims[g.as_str()];
            key.push(Dim::from_json(v).ok_or_else(|| format!("dims.{g} = {v} is not a possible value"))?);
        }
        let mut values = [None; MEASURES_N];
        for (i, m) in MEASURES.iter().enumerate() {
            if spec.has(*m) {
                let field = m.name();
                let v = obj.get(field).and_then(Value::as_u64);
                values[i] = Some(v.ok_or_else(|| format!("no non-negative integer {field:?}"))?);
            }
        }
        let mut x = Vec::new();
        for m in value_measures(spec) {
            let field = spec.measure_field(m);
            x.push(match obj.get(&field) {
                Some(Value::Null) => None,
                Some(Value::Number(n)) => n.as_f64(),
                _ => return Err(format!("no number or null {field:?}")),
            });
        }
        let top = spec.summary.as_ref().and_then(|s| s.top.as_ref());
        let rank = match top {
            None => None,
            Some(_) => Some(obj.get("rank").and_then(Value::as_u64).ok_or("no integer \"rank\" in a ranked list")?),
        };
        for field in obj.keys() {
            let known = matches!(field.as_str(), "metric" | "window_start" | "window_end" | "dims")
                || field == "grouping" && spec.summary.is_some()
                || field == "rank" && top.is_some()
                || MEASURES.iter().any(|m| m.name() == field && spec.has(*m))
                || value_measures(spec).any(|m| &spec.measure_field(m) == field);
            if !known {
                return Err(format!("unexpected field {field:?} for metric {:?}", spec.name));
            }
        }
        let flaw = (start != period).then(|| {
            format!(
                "window_start {start} ({}) is not the period start {period} ({})",
                fmt_local(start, job.timezone_offset_ms),
                fmt_local(period, job.timezone_offset_ms)
            )
        });
        Ok(Parsed { metric, period, end, key, values, x, rank, flaw })
    }

    /// Id of a key: the offline id, or a new id past them for keys that never
    /// occur in the input.
    fn key_id(&mut self, metric: usize, key: Vec<Dim>) -> u32 {
        let truth = &self.off.metrics[metric];
        if let Some(&id) = truth.key_ids.get(&key) {
            return id;
        }
        let ExtraKeys { ids, keys } = &mut self.extra_keys[metric];
        if let Some(&id) = ids.get(&key) {
            return id;
        }
        // Saturates only past 2^32 distinct keys; such ids still mean "no data".
        let id = u32::try_from(truth.keys.len() + keys.len()).unwrap_or(u32::MAX);
        keys.push(key.clone());
        ids.insert(key, id);
        id
    }

    fn key_values(&self, metric: usize, id: u32) -> &[Dim] {
        let truth = &self.off.metrics[metric];
        let id = id as usize;
        match truth.keys.get(id) {
            Some(k) => k,
            None => self.extra_keys[metric].keys.get(id - truth.keys.len()).map_or(&[], Vec::as_slice),
        }
    }

    fn describe(&self, metric: usize, end: i64, key: &[Dim]) -> String {
        let spec = &self.off.job.metrics[metric];
        let dims: Map<String, Value> = spec.group_by.iter().zip(key).map(|(g, d)| (g.clone(), d.to_json())).collect();
        format!(
            "{} window_end {end} ({}) dims {}",
            spec.name,
            fmt_local(end, self.off.job.timezone_offset_ms),
            Value::Object(dims)
        )
    }

    fn show_values(&self, metric: usize, values: [Option<u64>; MEASURES_N], x: &[Option<f64>]) -> String {
        let spec = &self.off.job.metrics[metric];
        let mut parts = Vec::new();
        for (m, v) in MEASURES.iter().zip(values) {
            if spec.has(*m) {
                parts.push(format!("{}={}", m.name(), v.map_or("-".to_string(), |v| v.to_string())));
            }
        }
        for (m, v) in value_measures(spec).zip(x) {
            parts.push(format!("{}={}", spec.measure_field(m), v.map_or("null".to_string(), |v| v.to_string())));
        }
        parts.join(" ")
    }

    /// Checks 2 and 3: values, duplicates, completeness of each window.
    fn compare_rows(&mut self) {
        let windows = std::mem::take(&mut self.windows);
        let mut prev: Option<(usize, i64, i64)> = None; // (metric, period, end)
        for (&(metric, period, end), rows) in &windows {
            let prev_end = match prev {
                Some((m, p, e)) if m == metric && p == period => Some(e),
                _ => None,
            };
            let rows = self.dedup(rows);
            let spec = &self.off.job.metrics[metric];
            let emit = spec.emit;
            let truth = &self.off.metrics[metric];
            let period_truth = truth.periods.get(&period);
            let nulls = vec![None; truth.nx];
            let x_of = |p: Option<Point>| p.map_or(&nulls[..], |p| truth.x(&p));
            let before = |points: &[Point]| {
                let p = prev_end.and_then(|e| value_at(points, e));
                (p.map_or([0; MEASURES_N], |p| p.v), x_of(p))
            };
            // A ranked list: the keys that must have rows, with their rank.
            let top = spec.summary.as_ref().and_then(|s| s.top.as_ref());
            let ranks = top.map(|t| self.expected_ranks(metric, period_truth, end, t));
            for row in &rows {
                let points = period_truth.and_then(|t| t.points(row.key));
                let expected = points.and_then(|pts| value_at(pts, end));
                let exp = expected.map_or([0; MEASURES_N], |p| p.v);
                let exp_x = x_of(expected);
                let mut differs = row.x != exp_x;
                for (i, (got, want)) in row.values.into_iter().zip(exp).enumerate() {
                    if let Some(got) = got {
                        let rel = got.abs_diff(want) as f64 / want.max(1) as f64;
                        self.worst[i] = self.worst[i].max(rel);
                        differs |= got != want;
                    }
                }
                if row.counted {
                    continue;
                }
                let what = self.describe(metric, end, self.key_values(metric, row.key));
                let got = self.show_values(metric, row.values, &row.x);
                if expected.is_none() {
                    self.wrong(format!("{what}: the key has no data at this window, got {got} (line {})", row.line));
                } else if differs {
                    let want = self.show_values(metric, exp.map(Some), exp_x);
                    self.wrong(format!("{what}: expected {want}, got {got} (line {})", row.line));
                } else if let Some(ranks) = &ranks {
                    match ranks.get(&row.key) {
                        None => self.wrong(format!("{what}: not among the top of its group (line {})", row.line)),
                        Some(&r) if Some(r) != row.rank => {
                            self.wrong(format!("{what}: rank {r} expected, got {:?} (line {})", row.rank, row.line))
                        }
                        Some(_) => {}
                    }
                } else if emit == Emit::Changed && points.is_some_and(|pts| !changed(spec, before(pts), (&exp, exp_x)))
                {
                    self.wrong(format!(
                        "{what}: emit = changed, but the key did not change since the previous window (line {})",
                        row.line
                    ));
                }
            }
            if let Some(pt) = period_truth {
                for (key, points) in &pt.series {
                    let Some(p) = value_at(points, end) else {
                        continue;
                    };
                    let needed = match (&ranks, emit) {
                        (Some(ranks), _) => ranks.contains_key(key),
                        (None, Emit::All) => true,
                        (None, Emit::Changed) => changed(spec, before(points), (&p.v, truth.x(&p))),
                    };
                    if needed && rows.binary_search_by_key(key, |r| r.key).is_err() {
                        self.report.rows_missing += 1;
                        let what = self.describe(metric, end, self.key_values(metric, *key));
                        let want = self.show_values(metric, p.v.map(Some), truth.x(&p));
                        self.problem(format!("{what}: missing row, expected {want}"));
                    }
                }
            }
            prev = Some((metric, period, end));
        }
        self.windows = windows;
    }

    /// A ranked list's keys at window `end` of a period, with their ranks:
    /// per value of the `per` fields, the `n` keys with the largest `by`
    /// (`null` last; ties by dims as tally renders them).
    fn expected_ranks(
        &self,
        metric: usize,
        period: Option<&PeriodTruth>,
        end: i64,
        top: &crate::job::TopSpec,
    ) -> AHashMap<u32, u64> {
        let spec = &self.off.job.metrics[metric];
        let truth = &self.off.metrics[metric];
        let xi = value_measures(spec).position(|m| m == top.by);
        let mut cands = Vec::new();
        for (key, points) in period.map_or(&[][..], |p| &p.series[..]) {
            let Some(p) = value_at(points, end) else { continue };
            let score = match (xi, top.by) {
                (Some(i), _) => truth.x(&p)[i],
                (None, Measure::Uv) => Some(p.v[1] as f64),
                (None, _) => Some(p.v[5] as f64),
            };
            let dims = self.key_values(metric, *key);
            let group: Vec<Dim> = top.per.iter().map(|&i| dims[i].clone()).collect();
            let text = dims_text(&spec.group_by, dims);
            cands.push((format!("{group:?}"), score, text, *key));
        }
        cands.sort_by(|a, b| {
            let by_score = match (a.1, b.1) {
                (Some(x), Some(y)) => y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            };
            a.0.cmp(&b.0).then(by_score).then_with(|| a.2.cmp(&b.2))
        });
        let mut out = AHashMap::new();
        let mut rank = 0;
        for (i, c) in cands.iter().enumerate() {
            rank = if i > 0 && cands[i - 1].0 == c.0 { rank + 1 } else { 1 };
            if rank <= top.n as u64 {
                out.insert(c.3, rank);
            }
        }
        out
    }

    /// Sorts a window's rows by key, keeping the last row of each key.
    fn dedup(&mut self, rows: &[Got]) -> Vec<Got> {
        let mut sorted = rows.to_vec();
        sorted.sort_by_key(|r| r.key); // stable: file order within a key
        let mut out: Vec<Got> = Vec::with_capacity(sorted.len());
        for r in sorted {
            match out.last_mut() {
                Some(last) if last.key == r.key => {
                    self.report.rows_duplicate += 1;
                    *last = r;
                }
                _ => out.push(r),
            }
        }
        out
    }

    /// Check 4: every window a period's data calls for was emitted.
    fn check_coverage(&mut self, required: &[bool]) {
        let off = self.off;
        for (metric, truth) in off.metrics.iter().enumerate() {
            if !required.get(metric).copied().unwrap_or(true) {
                continue;
            }
            let spec = &off.job.metrics[metric];
            for (&period, pt) in &truth.periods {
                let needed: BTreeSet<i64> = match spec.emit {
                    Emit::All => {
                        (0..).map(|k| pt.first_end + k * spec.step_ms).take_while(|e| *e <= pt.last_end).collect()
                    }
                    Emit::Changed => changed_ends(spec, truth, pt),
                };
                let emitted: BTreeSet<i64> = self
                    .windows
                    .range((metric, period, i64::MIN)..=(metric, period, i64::MAX))
                    .map(|(&(_, _, e), _)| e)
                    .collect();
                let missing: Vec<i64> = needed.difference(&emitted).copied().collect();
                self.report.windows_missing += missing.len() as u64;
                for gap in gaps(&missing, spec.step_ms) {
                    let tz = off.job.timezone_offset_ms;
                    let text = if gap.0 == gap.1 {
                        format!("{}: window_end {} ({}) not emitted", spec.name, gap.0, fmt_local(gap.0, tz))
                    } else {
                        format!(
                            "{}: window_ends {} ({}) to {} ({}) not emitted",
                            spec.name,
                            gap.0,
                            fmt_local(gap.0, tz),
                            gap.1,
                            fmt_local(gap.1, tz)
                        )
                    };
                    self.problem(text);
                }
            }
        }
    }
}

/// Values of a point: counters, and a summary's value measures.
type Shown<'a> = (&'a Values, &'a [Option<f64>]);

/// Whether some measure the metric outputs differs between `a` and `b`.
fn changed(spec: &MetricSpec, a: (Values, &[Option<f64>]), b: Shown<'_>) -> bool {
    MEASURES.iter().enumerate().any(|(i, m)| spec.has(*m) && a.0[i] != b.0[i]) || a.1 != b.1
}

/// Window ends of a period at which some key's output measures changed.
fn changed_ends(spec: &MetricSpec, truth: &MetricTruth, pt: &PeriodTruth) -> BTreeSet<i64> {
    let mut ends = BTreeSet::new();
    let nulls = vec![None; truth.nx];
    for (_, points) in &pt.series {
        let mut before = ([0; MEASURES_N], &nulls[..]);
        for p in points {
            if changed(spec, before, (&p.v, truth.x(p))) {
                ends.insert(p.end);
            }
            before = (p.v, truth.x(p));
        }
    }
    ends
}

/// Runs of consecutive window ends, as (first, last).
fn gaps(ends: &[i64], step: i64) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for &e in ends {
        match out.last_mut() {
            Some(last) if last.1 + step == e => last.1 = e,
            _ => out.push((e, e)),
        }
    }
    out
}

/// `2026-02-16 00:01:00 +08:00`: a time in the job's zone, for messages.
fn fmt_local(ms: i64, tz_ms: i64) -> String {
    let local = ms.saturating_add(tz_ms);
    let (y, m, d) = civil_from_days(local.div_euclid(DAY_MS));
    let rem = local.rem_euclid(DAY_MS);
    let sign = if tz_ms < 0 { '-' } else { '+' };
    let tz = tz_ms.abs();
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} {sign}{:02}:{:02}",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        tz / 3_600_000,
        tz / 60_000 % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// 2026-02-16T00:00:00+08:00, a local midnight in +08:00.
    const M: i64 = 1_771_171_200_000;
    const MIN: i64 = 60_000;

    struct Fx {
        dir: tempfile::TempDir,
    }

    impl Fx {
        fn new() -> Fx {
            Fx { dir: tempfile::tempdir().unwrap() }
        }

        fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
            let p = self.dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            p
        }

        fn job(&self, toml: &str) -> Job {
            Job::parse(toml, Path::new("job.toml"), self.dir.path()).unwrap()
        }

        fn verify(&self, job: &Job, rows: &[String]) -> VerifyReport {
            let mut text = rows.join("\n");
            text.push('\n');
            let p = self.write("results.jsonl", text);
            let report = verify(job, &p).unwrap();
            let mut shown = Vec::new();
            report.print(&mut shown).unwrap();
            eprintln!("{}", String::from_utf8_lossy(&shown));
            report
        }
    }

    fn ev(ts: i64, did: &str, page: &str, event: &str) -> String {
        format!(r#"{{"ts":{ts},"did":{did},"page":"{page}","event":"{event}"}}"#)
    }

    fn row(metric: &str, start: i64, end: i64, dims: &str, pv: u64, uv: u64) -> String {
        format!(
            r#"{{"metric":"{metric}","window_start":{start},"window_end":{end},"dims":{dims},"pv":{pv},"uv":{uv}}}"#
        )
    }

    fn page_row(end: i64, page: &str, pv: u64, uv: u64) -> String {
        row("page_uv", M, end, &format!(r#"{{"page":"{page}"}}"#), pv, uv)
    }

    fn json_job(extra_source: &str, extra_metric: &str) -> String {
        format!(
            r#"
[job]
timezone = "+08:00"
[[source]]
name = "client"
kind = "file"
path = "events.jsonl"
format = "jsonl"
{extra_source}
[[metric]]
name = "page_uv"
kind = "cumulate"
group_by = ["page"]
filter = "event = 'view'"
measures = ["pv", "uv"]
{extra_metric}
"#
        )
    }

    /// Six events, one filtered out; windows M+1m, M+2m, M+3m.
    fn basic() -> (Fx, Job, Vec<String>) {
        let fx = Fx::new();
        let events = [
            ev(M + 10_000, "\"a\"", "home", "view"),
            ev(M + 20_000, "\"b\"", "home", "view"),
            ev(M + 30_000, "\"a\"", "home", "view"),
            ev(M + 70_000, "\"a\"", "cart", "view"),
            ev(M + 80_000, "\"c\"", "home", "click"),
            ev(M + 130_000, "\"b\"", "home", "view"),
        ];
        fx.write("events.jsonl", events.join("\n") + "\n");
        let job = fx.job(&json_job("", ""));
        let rows = vec![
            page_row(M + MIN, "home", 3, 2),
            page_row(M + 2 * MIN, "home", 3, 2),
            page_row(M + 2 * MIN, "cart", 1, 1),
            page_row(M + 3 * MIN, "cart", 1, 1),
            page_row(M + 3 * MIN, "home", 4, 2),
        ];
        (fx, job, rows)
    }

    #[test]
    fn verify_correct_results_pass() {
        let (fx, job, rows) = basic();
        let off = Offline::compute(&job).unwrap();
        let home = [Value::from("home")];
        assert_eq!(off.value(0, M + MIN, &home), Some((3, 2)));
        assert_eq!(off.value(0, M + 3 * MIN, &home), Some((4, 2)));
        assert_eq!(off.value(0, M + 10 * MIN, &home), Some((4, 2)));
        assert_eq!(off.value(0, M + MIN, &[Value::from("cart")]), None);
        assert_eq!(off.value(0, M + MIN + 1, &home), None, "not a window end");
        assert_eq!(
            off.period_totals(0),
            vec![(M, vec![Value::from("home")], 4, 2), (M, vec![Value::from("cart")], 1, 1)]
        );
        let r = fx.verify(&job, &rows);
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.rows_checked, 5);
        assert_eq!((r.rows_wrong, r.rows_missing, r.rows_duplicate, r.windows_missing), (0, 0, 0, 0));
        assert_eq!(r.worst_rel_diff, vec![("pv".to_string(), 0.0), ("uv".to_string(), 0.0)]);
        assert!(r.examples.is_empty());
    }

    #[test]
    fn verify_later_windows_up_to_period_end_are_checked() {
        let (fx, job, mut rows) = basic();
        rows.push(page_row(M + 10 * MIN, "home", 4, 2));
        rows.push(page_row(M + 10 * MIN, "cart", 1, 1));
        rows.push(page_row(M + DAY_MS, "home", 4, 2));
        rows.push(page_row(M + DAY_MS, "cart", 1, 1));
        assert!(fx.verify(&job, &rows).ok());
        rows.push(page_row(M + 11 * MIN, "home", 4, 2)); // cart missing
        let r = fx.verify(&job, &rows);
        assert_eq!((r.rows_wrong, r.rows_missing, r.windows_missing), (0, 1, 0));
    }

    #[test]
    fn verify_changed_pv_is_wrong() {
        let (fx, job, mut rows) = basic();
        rows[4] = page_row(M + 3 * MIN, "home", 5, 2);
        let r = fx.verify(&job, &rows);
        assert!(!r.ok());
        assert_eq!((r.rows_wrong, r.rows_missing, r.windows_missing), (1, 0, 0));
        assert_eq!(r.worst_rel_diff[0], ("pv".to_string(), 0.25));
        assert_eq!(r.worst_rel_diff[1], ("uv".to_string(), 0.0));
        assert!(r.examples[0].contains("expected pv=4 uv=2, got pv=5 uv=2"), "{:?}", r.examples);
        assert!(r.examples[0].contains(r#"{"page":"home"}"#), "{:?}", r.examples);
    }

    #[test]
    fn verify_missing_row_is_counted() {
        let (fx, job, mut rows) = basic();
        rows.remove(2); // cart at M+2m
        let r = fx.verify(&job, &rows);
        assert!(!r.ok());
        assert_eq!((r.rows_wrong, r.rows_missing, r.windows_missing), (0, 1, 0));
        assert!(r.examples[0].contains("missing row, expected pv=1 uv=1"), "{:?}", r.examples);
    }

    #[test]
    fn verify_missing_window_is_counted() {
        let (fx, job, rows) = basic();
        let without_middle: Vec<String> =
            rows.iter().filter(|r| !r.contains(&format!("{}", M + 2 * MIN))).cloned().collect();
        let r = fx.verify(&job, &without_middle);
        assert!(!r.ok());
        assert_eq!((r.rows_wrong, r.rows_missing, r.windows_missing), (0, 0, 1));
        assert!(r.examples[0].contains("not emitted"), "{:?}", r.examples);
        // The final day totals are required too.
        let r = fx.verify(&job, &rows[..3]);
        assert_eq!(r.windows_missing, 1);
        // No output at all: every window is missing.
        let r = fx.verify(&job, &[]);
        assert_eq!(r.windows_missing, 3);
    }

    #[test]
    fn verify_wrong_window_start_is_wrong() {
        let (fx, job, mut rows) = basic();
        rows[4] = row("page_uv", M - DAY_MS, M + 3 * MIN, r#"{"page":"home"}"#, 4, 2);
        let r = fx.verify(&job, &rows);
        assert!(!r.ok());
        assert_eq!((r.rows_wrong, r.rows_missing, r.windows_missing), (1, 0, 0));
        assert!(r.examples[0].contains("is not the period start"), "{:?}", r.examples);
    }

    #[test]
    fn verify_malformed_rows_are_wrong() {
        let (fx, job, mut rows) = basic();
        rows.push("not json".into());
        rows.push("[1,2]".into());
        rows.push(row("nope", M, M + MIN, r#"{"page":"home"}"#, 3, 2));
        rows.push(page_row(M + MIN + 30_000, "home", 3, 2)); // off the step grid
        rows.push(format!(
            r#"{{"metric":"page_uv","window_start":{M},"window_end":{},"dims":{{"page":"home"}},"pv":3}}"#,
            M + MIN
        ));
        rows.push(format!(
            r#"{{"metric":"page_uv","window_start":{M},"window_end":{},"dims":{{"page":"home"}},"pv":3,"uv":2,"x":1}}"#,
            M + MIN
        ));
        rows.push(row("page_uv", M, M + MIN, r#"{"page":"home","extra":1}"#, 3, 2));
        rows.push(row("page_uv", M, M + MIN, r#"{"page":true}"#, 3, 2));
        rows.push(String::new()); // blank lines are not rows
        let r = fx.verify(&job, &rows);
        assert_eq!(r.rows_checked, 13);
        assert_eq!((r.rows_wrong, r.rows_missing, r.rows_duplicate, r.windows_missing), (8, 0, 0, 0));
        assert!(r.examples.iter().any(|e| e.contains("unknown metric \"nope\"")), "{:?}", r.examples);
        assert!(r.examples.iter().any(|e| e.contains("is not a window end")), "{:?}", r.examples);
    }

    #[test]
    fn verify_rows_for_keys_without_data_are_wrong() {
        let (fx, job, mut rows) = basic();
        rows.push(page_row(M + MIN, "cart", 0, 0)); // cart starts at M+2m
        rows.push(page_row(M + MIN, "nope", 1, 1));
        let r = fx.verify(&job, &rows);
        assert_eq!((r.rows_wrong, r.rows_missing), (2, 0));
        assert!(r.examples[0].contains("no data"), "{:?}", r.examples);
    }

    #[test]
    fn verify_duplicates_keep_the_last_row() {
        let (fx, job, rows) = basic();
        let mut fixed = vec![page_row(M + MIN, "home", 99, 99)];
        fixed.extend(rows.iter().cloned());
        let r = fx.verify(&job, &fixed);
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.rows_duplicate, 1);
        let mut broken = rows.clone();
        broken.push(page_row(M + MIN, "home", 99, 99));
        let r = fx.verify(&job, &broken);
        assert_eq!((r.rows_duplicate, r.rows_wrong), (1, 1));
    }

    #[test]
    fn did_123_and_string_123_are_one_device() {
        let fx = Fx::new();
        let events = [
            ev(M + 1_000, "123", "home", "view"),
            ev(M + 2_000, "\"123\"", "home", "view"),
            ev(M + 3_000, "\"0123\"", "home", "view"),
            ev(M + 4_000, "-5", "home", "view"),
            ev(M + 5_000, "\"-5\"", "home", "view"),
        ];
        fx.write("events.jsonl", events.join("\n"));
        let job = fx.job(&json_job("", ""));
        let off = Offline::compute(&job).unwrap();
        assert_eq!(off.value(0, M + MIN, &[Value::from("home")]), Some((5, 3)));
        assert!(fx.verify(&job, &[page_row(M + MIN, "home", 5, 3)]).ok());
    }

    /// Pads a JSON object line with spaces after `{` to exactly `len` bytes.
    fn pad(line: &str, len: usize) -> String {
        assert!(line.len() <= len);
        format!("{{{}{}", " ".repeat(len - line.len()), &line[1..])
    }

    #[test]
    fn malformed_input_lines_are_skipped() {
        let fx = Fx::new();
        let t = M + 10_000;
        let good = |did: &str| ev(t, did, "home", "view");
        let lines = [
            good("\"a\""),
            "not json".to_string(),
            "[1,2,3]".to_string(),
            "\"a string\"".to_string(),
            r#"{"ts":1771171210000,"did":"x","page":"home""#.to_string(), // truncated
            format!(r#"{{"ts":"{t}","did":"x","page":"home","event":"view"}}"#),
            format!(r#"{{"ts":{t}.0,"did":"x","page":"home","event":"view"}}"#),
            format!(r#"{{"ts":{t}.5,"did":"x","page":"home","event":"view"}}"#),
            ev(946_684_799_999, "\"x\"", "home", "view"),   // before 2000
            ev(4_102_444_800_000, "\"x\"", "home", "view"), // 2100
            r#"{"did":"x","page":"home","event":"view"}"#.to_string(),
            good("null"),
            good("\"\""),
            good("1.5"),
            good("true"),
            good("{}"),
            format!(r#"{{"ts":{t},"page":"home","event":"view"}}"#),
            String::new(),
            "   ".to_string(),
            pad(&good("\"x\""), 81),        // one byte too long
            pad(&good("\"b\""), 80) + "\r", // exactly the limit, CRLF
            format!(r#"{{"ts":{t},"did":"x","did":"c","page":"home","event":"view"}}"#), // last key wins
            good("\"a\"") + "\r",
            format!(r#"{{"ts":{t},"did":"d","event":"view"}}"#), // no page: null key
            good("\"e\""),                                       // last line, no newline
        ];
        fx.write("events.jsonl", lines.join("\n"));
        let job = fx.job(&json_job("max_line_bytes = 80", ""));
        let off = Offline::compute(&job).unwrap();
        // home: a, b, c, a, e -> pv 5, uv 4; null page: d.
        assert_eq!(off.value(0, M + MIN, &[Value::from("home")]), Some((5, 4)));
        assert_eq!(off.value(0, M + MIN, &[Value::Null]), Some((1, 1)));
        assert_eq!(off.period_totals(0).len(), 2);
        let rows = [page_row(M + MIN, "home", 5, 4), row("page_uv", M, M + MIN, r#"{"page":null}"#, 1, 1)];
        assert!(fx.verify(&job, &rows).ok());
    }

    #[test]
    fn window_crossing_local_midnight_resets() {
        let fx = Fx::new();
        let events = [
            ev(M - 30 * MIN, "\"a\"", "home", "view"), // 23:30 local, previous day
            ev(M + 10 * MIN, "\"a\"", "home", "view"), // 00:10 local
            ev(M + 20 * MIN, "\"b\"", "home", "view"),
        ];
        fx.write("events.jsonl", events.join("\n"));
        let job = fx.job(&json_job("", "step = \"1h\""));
        let home = [Value::from("home")];
        let off = Offline::compute(&job).unwrap();
        assert_eq!(off.value(0, M, &home), Some((1, 1)), "23:00-24:00 window of the previous day");
        assert_eq!(off.value(0, M + 60 * MIN, &home), Some((2, 2)), "new day starts from zero");
        assert_eq!(off.period_totals(0), vec![(M - DAY_MS, home.to_vec(), 1, 1), (M, home.to_vec(), 2, 2)]);
        let good = [
            row("page_uv", M - DAY_MS, M, r#"{"page":"home"}"#, 1, 1),
            row("page_uv", M, M + 60 * MIN, r#"{"page":"home"}"#, 2, 2),
        ];
        assert!(fx.verify(&job, &good).ok());
        let carried = [
            row("page_uv", M - DAY_MS, M, r#"{"page":"home"}"#, 1, 1),
            row("page_uv", M, M + 60 * MIN, r#"{"page":"home"}"#, 3, 2),
        ];
        assert_eq!(fx.verify(&job, &carried).rows_wrong, 1);
        // The window ending at local midnight belongs to the day before.
        let bad_start = [
            row("page_uv", M, M, r#"{"page":"home"}"#, 1, 1),
            row("page_uv", M, M + 60 * MIN, r#"{"page":"home"}"#, 2, 2),
        ];
        assert_eq!(fx.verify(&job, &bad_start).rows_wrong, 1);
        // In UTC the same events fall in one day (local midnight is 16:00 UTC).
        let utc = fx.job(&json_job("", "step = \"1h\"").replace("+08:00", "UTC"));
        let off = Offline::compute(&utc).unwrap();
        assert_eq!(off.value(0, M + 60 * MIN, &home), Some((3, 2)));
    }

    #[test]
    fn emit_changed_completeness() {
        let fx = Fx::new();
        let events = [
            ev(M + 10_000, "\"a\"", "home", "view"),
            ev(M + 70_000, "\"b\"", "cart", "view"),
            ev(M + 80_000, "\"a\"", "home", "view"),
            ev(M + 130_000, "\"c\"", "cart", "view"),
        ];
        fx.write("events.jsonl", events.join("\n"));
        let job = fx.job(&json_job("", "emit = \"changed\""));
        let good = vec![
            page_row(M + MIN, "home", 1, 1),
            page_row(M + 2 * MIN, "home", 2, 1),
            page_row(M + 2 * MIN, "cart", 1, 1),
            page_row(M + 3 * MIN, "cart", 2, 2),
        ];
        let r = fx.verify(&job, &good);
        assert!(r.ok(), "{r:?}");
        // An unchanged key must not be emitted.
        let mut extra = good.clone();
        extra.push(page_row(M + 3 * MIN, "home", 2, 1));
        let r = fx.verify(&job, &extra);
        assert_eq!((r.rows_wrong, r.rows_missing, r.windows_missing), (1, 0, 0));
        assert!(r.examples[0].contains("did not change"), "{:?}", r.examples);
        // A changed key must be emitted.
        let mut missing = good.clone();
        missing.remove(1);
        let r = fx.verify(&job, &missing);
        assert_eq!((r.rows_wrong, r.rows_missing, r.windows_missing), (0, 1, 0));
        // A window with changes must be emitted.
        let r = fx.verify(&job, &good[..3]);
        assert_eq!((r.rows_wrong, r.rows_missing, r.windows_missing), (0, 0, 1));
        // A skipped window: the next one is compared with the last emitted one.
        let skipped = [good[0].clone(), good[3].clone(), page_row(M + 3 * MIN, "home", 2, 1)];
        let r = fx.verify(&job, &skipped);
        assert_eq!((r.rows_wrong, r.rows_missing, r.windows_missing), (0, 0, 1));
    }

    #[test]
    fn csv_sources_are_read_with_their_own_headers() {
        let fx = Fx::new();
        let t = |s: i64| M + s * 1000;
        fx.write(
            "a.csv",
            format!(
                "ts,did,app_ver,page\n\
                 {},d1,7,home\n\
                 {},d2,007,home\n\
                 {},d3,,home\n\
                 {},d4,7\n\
                 {},,7,home\n\
                 0{},d5,7,home\n\
                 +{},d5,7,home\n\
                 {},d5,7,cart\n\
                 {},d1,7,home\r\n",
                t(10),
                t(20),
                t(30),
                t(40),
                t(50),
                t(51),
                t(51),
                t(52),
                t(53)
            ),
        );
        fx.write(
            "b.csv",
            format!("page,did,ts,app_ver\nhome,d2,{},7\nhome,\"d6\",{},-3\nhome,123,{},-3\n", t(54), t(55), t(56)),
        );
        // A JSON source with did 123 (an integer) for the same key and device.
        fx.write("e.jsonl", format!(r#"{{"ts":{},"did":123,"page":"home","app_ver":-3}}"#, t(57)));
        let job = fx.job(
            r#"
[job]
timezone = "+08:00"
[[source]]
name = "csv"
kind = "file"
path = ["a.csv", "b.csv"]
format = "csv"
[[source]]
name = "json"
kind = "file"
path = "e.jsonl"
format = "jsonl"
[[metric]]
name = "ver"
kind = "cumulate"
group_by = ["app_ver"]
filter = "page = 'home'"
"#,
        );
        let off = Offline::compute(&job).unwrap();
        let v = |dim: Value| off.value(0, M + MIN, &[dim]);
        assert_eq!(v(Value::from(7)), Some((3, 2)));
        assert_eq!(v(Value::from("7")), None, "integer 7 and string \"7\" are different keys");
        assert_eq!(v(Value::from("007")), Some((1, 1)));
        assert_eq!(v(Value::Null), Some((1, 1)));
        assert_eq!(v(Value::from(-3)), Some((3, 2)));
        let r = |dims: &str, pv, uv| row("ver", M, M + MIN, dims, pv, uv);
        let good = vec![
            r(r#"{"app_ver":7}"#, 3, 2),
            r(r#"{"app_ver":"007"}"#, 1, 1),
            r(r#"{"app_ver":null}"#, 1, 1),
            r(r#"{"app_ver":-3}"#, 3, 2),
        ];
        assert!(fx.verify(&job, &good).ok());
        let mut as_string = good.clone();
        as_string[0] = r(r#"{"app_ver":"7"}"#, 3, 2);
        let rep = fx.verify(&job, &as_string);
        assert_eq!((rep.rows_wrong, rep.rows_missing), (1, 1));
    }

    fn record(ts: i64, did: u64, dims: [u32; BINARY_DIMS]) -> BinaryRecord {
        BinaryRecord { ts_ms: ts.to_le(), did: did.to_le(), dims: dims.map(u32::to_le) }
    }

    #[test]
    fn binary_sources_union_with_json() {
        let fx = Fx::new();
        let n = BINARY_NULL;
        let recs = [
            record(M + 10_000, 123, [3, 1, n, n]),
            record(M + 20_000, 456, [3, 1, n, n]),
            record(M + 30_000, 789, [n, 1, n, n]),
            record(0, 999, [3, 1, n, n]), // time out of range
            record(M + 70_000, 456, [3, 2, n, n]),
        ];
        let mut bytes: Vec<u8> = recs.iter().flat_map(|r| bytemuck::bytes_of(r).to_vec()).collect();
        bytes.extend_from_slice(&[7u8; 10]); // trailing partial record
        fx.write("e.bin", bytes);
        fx.write("e.jsonl", format!(r#"{{"ts":{},"did":"123","page":3}}"#, M + 40_000));
        let job = fx.job(
            r#"
[job]
timezone = "+08:00"
[[source]]
name = "json"
kind = "file"
path = "e.jsonl"
format = "jsonl"
[[source]]
name = "bin"
kind = "file"
path = "e.bin"
format = "binary"
[[metric]]
name = "all_pv_uv"
kind = "cumulate"
group_by = ["page"]
[[metric]]
name = "bin_uv"
kind = "cumulate"
group_by = ["page"]
sources = ["bin"]
filter = "event = 1"
measures = ["uv"]
"#,
        );
        let off = Offline::compute(&job).unwrap();
        assert_eq!(off.value(0, M + MIN, &[Value::from(3)]), Some((3, 2)));
        assert_eq!(off.value(0, M + 2 * MIN, &[Value::from(3)]), Some((4, 2)));
        assert_eq!(off.value(0, M + MIN, &[Value::Null]), Some((1, 1)));
        assert_eq!(off.value(1, M + MIN, &[Value::from(3)]), Some((2, 2)));
        let uv = |end: i64, dims: &str, uv: u64| {
            format!(r#"{{"metric":"bin_uv","window_start":{M},"window_end":{end},"dims":{dims},"uv":{uv}}}"#)
        };
        let good = vec![
            row("all_pv_uv", M, M + MIN, r#"{"page":3}"#, 3, 2),
            row("all_pv_uv", M, M + MIN, r#"{"page":null}"#, 1, 1),
            row("all_pv_uv", M, M + 2 * MIN, r#"{"page":3}"#, 4, 2),
            row("all_pv_uv", M, M + 2 * MIN, r#"{"page":null}"#, 1, 1),
            uv(M + MIN, r#"{"page":3}"#, 2),
            uv(M + MIN, r#"{"page":null}"#, 1),
        ];
        let r = fx.verify(&job, &good);
        assert!(r.ok(), "{r:?}");
        // A uv-only metric must not carry pv.
        let mut with_pv = good.clone();
        with_pv[4] = row("bin_uv", M, M + MIN, r#"{"page":3}"#, 2, 2);
        assert_eq!(fx.verify(&job, &with_pv).rows_wrong, 1);
    }

    #[test]
    fn sink_file_limits_the_metrics_required() {
        let (fx, _, rows) = basic();
        let text = json_job(
            "",
            "[[metric]]\nname = \"other\"\nkind = \"cumulate\"\n\
             [[sink]]\nkind = \"jsonl\"\npath = \"results.jsonl\"\nmetrics = [\"page_uv\"]\n",
        );
        let job = fx.job(&text);
        assert!(fx.verify(&job, &rows).ok(), "metric `other` is not written to this file");
    }

    #[test]
    fn report_prints_counters_and_examples() {
        let (fx, job, mut rows) = basic();
        rows[0] = page_row(M + MIN, "home", 4, 2);
        let r = fx.verify(&job, &rows);
        let mut out = Vec::new();
        r.print(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("FAILED"), "{text}");
        assert!(text.contains("rows wrong:       1"), "{text}");
        assert!(text.contains("2026-02-16 00:01:00 +08:00"), "{text}");
        assert!(text.contains("pv 0.333333"), "{text}");
    }
}

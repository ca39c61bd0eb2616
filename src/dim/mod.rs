//! Dimension tables: what events are joined with before they are counted
//! (`[[dimension]]`), so `author.category` can be filtered on and grouped
//! by like an event field.
//!
//! A file dimension (CSV with a header, or JSON lines) is read whole into
//! a [`DimTable`] before the run starts; a watcher thread reads it again
//! when its size or modification time changes and publishes the new table,
//! which routers pick up at their next block. So a lookup sees the table as
//! it was when the event was routed: Flink's lookup join (the value at
//! processing time), not a join on event time.
//!
//! Keys compare by text form, as device ids do: an event's `7` joins a
//! table's `"7"`. A row without a key, or that does not parse, is counted
//! and skipped; when a key repeats, the last row wins (and the repeat is
//! counted).

pub mod kafka;
pub mod redis;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ahash::AHashMap;
use serde::Serialize;
use serde_json::Value;

use crate::event::jsonl::JsonlParser;
use crate::event::{parse_canonical_int, EventBuf, FieldSet};
use crate::job::filter::FieldValue;
use crate::job::{DimFormat, DimensionSpec};

/// Malformed rows reported per load.
pub(crate) const EXAMPLES_MAX: usize = 3;
/// How often the watcher looks at the files.
pub const RELOAD_CHECK: Duration = Duration::from_millis(500);

/// One value of a dimension row.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cell {
    Null,
    Int(i64),
    Float(f64),
    /// Bytes of the table's text arena.
    Str {
        start: u32,
        len: u32,
    },
    /// Text of at most [`INLINE_TEXT`] bytes, kept in the cell: a lookup
    /// then touches the row's cells only, not the arena too (one cache
    /// miss less per event on a large table).
    Inline {
        len: u8,
        bytes: [u8; INLINE_TEXT],
    },
    /// The head of a used slot of the lookup index: its key's fingerprint.
    Key(u64),
}

/// A [`DimTable::lookup`] result naming a row of `cells` (a key looked up
/// by text) rather than a slot of the index.
const BY_ROW: u32 = 1 << 31;

/// Longest text a cell holds itself (a cell stays 16 bytes).
const INLINE_TEXT: usize = 14;
const _: () = assert!(size_of::<Cell>() == 16);

/// Hashes a u64 that already is a hash (an xxh3 fingerprint) to itself.
#[derive(Default)]
pub struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A dimension table in memory: rows by the xxh3-64 fingerprint of their
/// key text. Like device ids, keys are exact up to 64-bit fingerprint
/// collisions (an event key taken for another key of the table: about
/// rows / 2^64 per lookup); keys of the table that collide with each
/// other are kept apart by their text.
#[derive(Debug, Default)]
pub struct DimTable {
    /// Rows by key fingerprint while the table is built (until [`DimTable::seal`]).
    rows: std::collections::HashMap<u64, u32, std::hash::BuildHasherDefault<Prehashed>>,
    /// Keys whose fingerprint another key of the table has, by text.
    collided: AHashMap<Box<[u8]>, u32>,
    /// Fingerprints shared by two keys (looked up by text).
    shared: Vec<u64>,
    /// Per row: its key text in `text`.
    keys: Vec<(u32, u32)>,
    /// `fields` cells per row.
    cells: Vec<Cell>,
    fields: usize,
    text: Vec<u8>,
    /// Rows a later row of the same key replaced.
    replaced: usize,
    /// The lookup index ([`DimTable::seal`]): open addressing with linear
    /// probing, `1 + fields` cells per slot, a [`Cell::Key`] head and the
    /// row's cells next to it, so a lookup on a large table costs one
    /// cache miss rather than three (map control bytes, map slot, row).
    /// Empty until sealed (lookups then go through `rows`).
    index: Vec<Cell>,
    index_mask: usize,
}

impl DimTable {
    /// The row of key text `key`: a slot of the index, or a row (tagged
    /// [`BY_ROW`]); for [`DimTable::value`].
    #[inline]
    pub fn lookup(&self, key: &[u8]) -> Option<u32> {
        let fp = xxhash_rust::xxh3::xxh3_64(key);
        if !self.shared.is_empty() && self.shared.contains(&fp) {
            return self.collided.get(key).map(|&row| row | BY_ROW);
        }
        if self.index.is_empty() {
            return self.rows.get(&fp).map(|&row| row | BY_ROW);
        }
        let stride = 1 + self.fields;
        let mut i = fp as usize & self.index_mask;
        loop {
            match self.index[i * stride] {
                Cell::Key(k) if k == fp => return Some(i as u32),
                Cell::Null => return None,
                _ => i = (i + 1) & self.index_mask,
            }
        }
    }

    /// Bytes of the lookup index: above the caches' size, a lookup's
    /// first load is a DRAM miss worth prefetching.
    pub fn index_bytes(&self) -> usize {
        self.index.len() * size_of::<Cell>()
    }

    /// Asks the CPU for the index slot where [`DimTable::lookup`] of `key`
    /// starts (its key and row), without waiting for it.
    #[inline]
    pub fn prefetch(&self, key: &[u8]) {
        if self.index.is_empty() {
            return;
        }
        let stride = 1 + self.fields;
        let i = xxhash_rust::xxh3::xxh3_64(key) as usize & self.index_mask;
        let slot = self.index[i * stride..].as_ptr();
        // The slot may straddle two cache lines.
        crate::state::table::prefetch(slot.cast());
        crate::state::table::prefetch(slot.wrapping_add(stride - 1).cast());
    }

    /// Builds the lookup index of the rows loaded, once the last row is
    /// added; the build map is not needed after it and is freed.
    pub(crate) fn seal(&mut self) {
        let stride = 1 + self.fields;
        let rows = std::mem::take(&mut self.rows);
        let slots = (rows.len() * 2).next_power_of_two().max(2);
        self.index = Vec::with_capacity(slots * stride);
        crate::state::table::advise_huge_pages(&mut self.index);
        self.index.resize(slots * stride, Cell::Null);
        self.index_mask = slots - 1;
        for (&fp, &row) in &rows {
            let mut i = fp as usize & self.index_mask;
            while self.index[i * stride] != Cell::Null {
                i = (i + 1) & self.index_mask;
            }
            self.index[i * stride] = Cell::Key(fp);
            let from = row as usize * self.fields;
            self.index[i * stride + 1..(i + 1) * stride].copy_from_slice(&self.cells[from..from + self.fields]);
        }
    }

    fn key_of(&self, row: u32) -> &[u8] {
        let (start, len) = self.keys[row as usize];
        &self.text[start as usize..(start + len) as usize]
    }

    /// Field `f` of the row [`DimTable::lookup`] found.
    #[inline]
    pub fn value(&self, found: u32, f: usize) -> FieldValue<'_> {
        let cell = if found & BY_ROW != 0 {
            &self.cells[(found & !BY_ROW) as usize * self.fields + f]
        } else {
            &self.index[found as usize * (1 + self.fields) + 1 + f]
        };
        match cell {
            Cell::Key(_) | Cell::Null => FieldValue::Null,
            Cell::Int(i) => FieldValue::Int(*i),
            Cell::Float(x) => FieldValue::Float(*x),
            Cell::Str { start, len } => FieldValue::Str(&self.text[*start as usize..(start + len) as usize]),
            Cell::Inline { len, bytes } => FieldValue::Str(&bytes[..*len as usize]),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len() - self.replaced
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn push_cell(&mut self, v: FieldValue) {
        let cell = match v {
            FieldValue::Null => Cell::Null,
            FieldValue::Int(i) => Cell::Int(i),
            FieldValue::Float(f) => Cell::Float(f),
            FieldValue::Str(s) if s.len() <= INLINE_TEXT => {
                let mut bytes = [0; INLINE_TEXT];
                bytes[..s.len()].copy_from_slice(s);
                Cell::Inline { len: s.len() as u8, bytes }
            }
            FieldValue::Str(s) => {
                let start = self.text.len() as u32;
                self.text.extend_from_slice(s);
                Cell::Str { start, len: s.len() as u32 }
            }
        };
        self.cells.push(cell);
    }

    /// Adds a row (its cells already pushed); a repeated key now names it.
    pub(crate) fn finish_row(&mut self, key: &[u8]) -> bool {
        let row = (self.cells.len() / self.fields - 1) as u32;
        let start = self.text.len() as u32;
        self.text.extend_from_slice(key);
        self.keys.push((start, key.len() as u32));
        let fp = xxhash_rust::xxh3::xxh3_64(key);
        let repeat = if self.shared.contains(&fp) {
            self.collided.insert(key.into(), row).is_some()
        } else {
            match self.rows.get(&fp).copied() {
                None => {
                    self.rows.insert(fp, row);
                    false
                }
                Some(old) if self.key_of(old) == key => {
                    self.rows.insert(fp, row);
                    true
                }
                Some(old) => {
                    // Two keys, one fingerprint: both go by text from now.
                    let old_key: Box<[u8]> = self.key_of(old).into();
                    self.collided.insert(old_key, old);
                    self.collided.insert(key.into(), row);
                    self.shared.push(fp);
                    false
                }
            }
        };
        self.replaced += repeat as usize;
        repeat
    }
}

/// The text form a join key compares by: a string's bytes, an integer's
/// digits, a decimal's shortest form; none for `null`.
#[inline]
pub fn key_text<'a>(v: FieldValue<'a>, buf: &'a mut [u8; 32]) -> Option<&'a [u8]> {
    match v {
        FieldValue::Null => None,
        FieldValue::Str(s) => Some(s),
        FieldValue::Int(i) => {
            let mut b = itoa::Buffer::new();
            let t = b.format(i).as_bytes();
            buf[..t.len()].copy_from_slice(t);
            Some(&buf[..t.len()])
        }
        FieldValue::Float(f) if f.is_finite() => {
            let mut b = ryu::Buffer::new();
            let t = b.format_finite(f).as_bytes();
            let n = t.len().min(32);
            buf[..n].copy_from_slice(&t[..n]);
            Some(&buf[..n])
        }
        FieldValue::Float(_) => None,
    }
}

/// A row that was skipped.
#[derive(Clone, Debug, Serialize)]
pub struct DimExample {
    /// `path:line`.
    pub at: String,
    pub reason: String,
}

/// What loading a dimension file found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadReport {
    pub rows: u64,
    pub malformed: u64,
    pub duplicate_keys: u64,
    pub examples: Vec<DimExample>,
}

/// Reads a dimension file. Errors (the file unreadable, a CSV header
/// without the key or a field) name the file; bad rows are counted.
pub fn load(spec: &DimensionSpec) -> Result<(DimTable, LoadReport), String> {
    let path = &spec.path;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut t = DimTable { fields: spec.fields.len(), ..DimTable::default() };
    let mut rep = LoadReport::default();
    let skip = |rep: &mut LoadReport, line: u64, reason: String| {
        rep.malformed += 1;
        if rep.examples.len() < EXAMPLES_MAX {
            rep.examples.push(DimExample { at: format!("{}:{line}", path.display()), reason });
        }
    };
    match spec.format {
        DimFormat::Csv => {
            let mut rdr = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(&bytes[..]);
            let header =
                rdr.byte_headers().map_err(|e| format!("{}: cannot read the CSV header: {e}", path.display()))?;
            let col = |name: &str| header.iter().position(|h| h == name.as_bytes());
            let key_col = col(&spec.key)
                .ok_or_else(|| format!("{}: the CSV header has no key column {:?}", path.display(), spec.key))?;
            let field_cols = spec
                .fields
                .iter()
                .map(|f| col(f).ok_or_else(|| format!("{}: the CSV header has no column {f:?}", path.display())))
                .collect::<Result<Vec<_>, _>>()?;
            let width = header.len();
            let mut rec = csv::ByteRecord::new();
            loop {
                let line = rdr.position().line();
                match rdr.read_byte_record(&mut rec) {
                    Ok(false) => break,
                    Ok(true) => {}
                    Err(e) => {
                        skip(&mut rep, line, format!("invalid CSV: {e}"));
                        continue;
                    }
                }
                if rec.len() != width {
                    skip(&mut rep, line, format!("{} fields, the header has {width}", rec.len()));
                    continue;
                }
                let key = &rec[key_col];
                if key.is_empty() {
                    skip(&mut rep, line, format!("no key {:?}", spec.key));
                    continue;
                }
                for &c in &field_cols {
                    t.push_cell(csv_cell(&rec[c]));
                }
                rep.rows += 1;
                rep.duplicate_keys += t.finish_row(key) as u64;
            }
        }
        DimFormat::Jsonl => {
            // The events' parser picks the key and the fields without
            // building the object; a line it refuses goes through serde_json
            // for the reason.
            let names = FieldSet {
                ts: "\u{0}ts".into(),
                did: "\u{0}did".into(),
                slots: std::iter::once(&spec.key).chain(&spec.fields).cloned().collect(),
            };
            let mut parser = JsonlParser::new(&names);
            let mut ev = EventBuf::new(names.slots.len());
            for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
                let line = i as u64 + 1;
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                if raw.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if parser.parse_fields(raw, &mut ev).is_ok() {
                    let mut buf = [0u8; 32];
                    let key = match ev.value(raw, 0) {
                        v @ (FieldValue::Str(_) | FieldValue::Int(_)) => key_text(v, &mut buf),
                        _ => None,
                    };
                    if let Some(key) = key.filter(|k| !k.is_empty()) {
                        for f in 1..names.slots.len() {
                            t.push_cell(ev.value(raw, f));
                        }
                        rep.rows += 1;
                        rep.duplicate_keys += t.finish_row(key) as u64;
                        continue;
                    }
                }
                let obj = match serde_json::from_slice::<Value>(raw) {
                    Ok(Value::Object(o)) => o,
                    Ok(_) => {
                        skip(&mut rep, line, "not a JSON object".into());
                        continue;
                    }
                    Err(e) => {
                        skip(&mut rep, line, format!("invalid JSON: {e}"));
                        continue;
                    }
                };
                let mut buf = [0u8; 32];
                let key = match obj.get(&spec.key).map(json_cell) {
                    Some(v @ (FieldValue::Str(_) | FieldValue::Int(_))) => key_text(v, &mut buf).map(<[u8]>::to_vec),
                    _ => None,
                };
                let Some(key) = key.filter(|k| !k.is_empty()) else {
                    skip(&mut rep, line, format!("no key {:?} (a string or an integer)", spec.key));
                    continue;
                };
                for f in &spec.fields {
                    t.push_cell(obj.get(f).map_or(FieldValue::Null, json_cell));
                }
                rep.rows += 1;
                rep.duplicate_keys += t.finish_row(&key) as u64;
            }
        }
    }
    t.seal();
    Ok((t, rep))
}

/// A CSV cell as event CSV cells are read: empty is `null`, a canonical
/// integer is a number, anything else text.
pub(crate) fn csv_cell(cell: &[u8]) -> FieldValue<'_> {
    if cell.is_empty() {
        FieldValue::Null
    } else if let Some(i) = parse_canonical_int(cell) {
        FieldValue::Int(i)
    } else {
        FieldValue::Str(cell)
    }
}

pub(crate) fn json_cell(v: &Value) -> FieldValue<'_> {
    match v {
        Value::String(s) => FieldValue::Str(s.as_bytes()),
        Value::Number(n) => match n.as_i64() {
            Some(i) => FieldValue::Int(i),
            None => n.as_f64().map_or(FieldValue::Null, FieldValue::Float),
        },
        _ => FieldValue::Null,
    }
}

/// A dimension's current table, as routers read it.
pub struct DimHandle {
    table: Mutex<Arc<DimTable>>,
    /// Bumped on every reload: a router whose copy is older takes the lock.
    generation: AtomicU64,
    /// (size, modification time) of the file the table was read from.
    stamp: Mutex<Option<(u64, SystemTime)>>,
    pub load: Mutex<LoadReport>,
    pub reloads: AtomicU64,
    /// A Redis dimension: rows come from its caches instead of the table.
    pub redis: Option<Arc<redis::RedisDim>>,
}

impl DimHandle {
    /// Loads the table for the first time.
    pub fn open(spec: &DimensionSpec) -> Result<DimHandle, String> {
        let stamp = stamp(&spec.path);
        let (table, report) = load(spec)?;
        Ok(DimHandle {
            table: Mutex::new(Arc::new(table)),
            generation: AtomicU64::new(0),
            stamp: Mutex::new(stamp),
            load: Mutex::new(report),
            reloads: AtomicU64::new(0),
            redis: None,
        })
    }

    /// A dimension whose table comes later ([`DimHandle::publish`]).
    pub fn empty() -> DimHandle {
        DimHandle {
            table: Mutex::new(Arc::new(DimTable::default())),
            generation: AtomicU64::new(0),
            stamp: Mutex::new(None),
            load: Mutex::new(LoadReport::default()),
            reloads: AtomicU64::new(0),
            redis: None,
        }
    }

    /// A Redis dimension (checked to answer now).
    pub fn remote(spec: &DimensionSpec) -> Result<DimHandle, String> {
        Ok(DimHandle { redis: Some(Arc::new(redis::RedisDim::open(spec)?)), ..DimHandle::empty() })
    }

    /// Replaces the table (routers take it at their next block).
    pub fn publish(&self, table: DimTable, report: LoadReport) {
        *self.table.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
        *self.load.lock().unwrap_or_else(|p| p.into_inner()) = report;
        if self.generation.fetch_add(1, Ordering::AcqRel) > 0 {
            self.reloads.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current table and its generation.
    pub fn current(&self) -> (u64, Arc<DimTable>) {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        (self.generation(), t.clone())
    }

    /// Reads the file again if it changed; a file that cannot be read now
    /// leaves the table as it was (and says so).
    fn refresh(&self, spec: &DimensionSpec) {
        let now = stamp(&spec.path);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if now.is_none() || now == *last {
            return;
        }
        match load(spec) {
            Ok((table, report)) => {
                *self.table.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
                *self.load.lock().unwrap_or_else(|p| p.into_inner()) = report;
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.reloads.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => eprintln!("tally: dimension {:?}: keeping the table loaded before: {e}", spec.name),
        }
        *last = now;
    }
}

fn stamp(path: &Path) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// Watches every file dimension of a run until dropped.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    pub fn start(specs: Vec<DimensionSpec>, handles: Vec<Arc<DimHandle>>) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = (!specs.is_empty()).then(|| {
            std::thread::Builder::new()
                .name("tally-dims".into())
                .spawn(move || {
                    while !flag.load(Ordering::Relaxed) {
                        std::thread::park_timeout(RELOAD_CHECK);
                        for (spec, h) in specs.iter().zip(&handles) {
                            h.refresh(spec);
                        }
                    }
                })
                .expect("cannot start the dimension watcher thread")
        });
        Watcher { stop, thread }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::OnMissing;

    fn spec(dir: &Path, file: &str, text: &str) -> DimensionSpec {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        DimensionSpec {
            name: "author".into(),
            path,
            format: if file.ends_with(".csv") { DimFormat::Csv } else { DimFormat::Jsonl },
            kafka: None,
            redis: None,
            key: "author_id".into(),
            fields: vec!["category".into(), "agency".into()],
            on_missing: OnMissing::Null,
        }
    }

    fn get<'a>(t: &'a DimTable, key: &[u8], f: usize) -> Option<FieldValue<'a>> {
        t.lookup(key).map(|r| t.value(r, f))
    }

    #[test]
    fn csv_rows_by_key_text_with_bad_rows_counted() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(
            dir.path(),
            "a.csv",
            "agency,author_id,category\nx,7,music\n,8,\"game, pc\"\nbad\n,,music\ny,7,talk\nz,9,fifteen letters\n",
        );
        let (t, rep) = load(&s).unwrap();
        assert_eq!((rep.rows, rep.malformed, rep.duplicate_keys), (4, 2, 1));
        assert_eq!(t.len(), 3);
        assert_eq!(get(&t, b"7", 0), Some(FieldValue::Str(b"talk")));
        assert_eq!(get(&t, b"8", 0), Some(FieldValue::Str(b"game, pc")));
        assert_eq!(get(&t, b"9", 0), Some(FieldValue::Str(b"fifteen letters")), "text past a cell's inline room");
        assert_eq!(get(&t, b"8", 1), Some(FieldValue::Null));
        assert!(rep.examples[0].at.ends_with("a.csv:4"), "{:?}", rep.examples);
        let mut buf = [0; 32];
        assert_eq!(key_text(FieldValue::Int(7), &mut buf), Some(&b"7"[..]));
    }

    #[test]
    fn the_sealed_index_finds_what_the_rows_hold() {
        let mut t = DimTable { fields: 2, ..DimTable::default() };
        for i in 0..1000i64 {
            t.push_cell(FieldValue::Int(i));
            t.push_cell(if i % 3 == 0 { FieldValue::Null } else { FieldValue::Str(b"a longer text than a cell") });
            t.finish_row(i.to_string().as_bytes());
        }
        let all =
            |t: &DimTable| (0..1010).map(|i| format!("{:?}", get(t, i.to_string().as_bytes(), 1))).collect::<Vec<_>>();
        let before = all(&t);
        assert!(t.index.is_empty());
        t.seal();
        assert_eq!(before, all(&t));
        assert!(
            before[1].starts_with("Some(Str(") && before[3] == "Some(Null)" && before[1005] == "None",
            "{before:?}"
        );
        assert_eq!(get(&t, b"999", 0), Some(FieldValue::Int(999)));
        assert_eq!(get(&t, b"1000", 0), None);
    }

    #[test]
    fn jsonl_rows_take_string_or_integer_keys() {
        let dir = tempfile::tempdir().unwrap();
        let text = "{\"author_id\":7,\"category\":\"music\",\"agency\":3}\n{\"author_id\":\"8\"}\n[1]\n{\"author_id\":1.5}\n\n";
        let (t, rep) = load(&spec(dir.path(), "a.jsonl", text)).unwrap();
        assert_eq!((rep.rows, rep.malformed), (2, 2));
        assert_eq!(get(&t, b"7", 1), Some(FieldValue::Int(3)));
        assert_eq!(get(&t, b"8", 0), Some(FieldValue::Null));
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_old_table() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path(), "a.csv", "author_id,category,agency\n7,music,x\n");
        let h = DimHandle::open(&s).unwrap();
        let (g0, t0) = h.current();
        h.refresh(&s);
        assert_eq!(h.generation(), g0, "unchanged file, no reload");
        std::fs::write(&s.path, "author_id,category,agency\n7,dance,x\n8,game,y\n").unwrap();
        h.refresh(&s);
        let (g1, t1) = h.current();
        assert_eq!((g1, h.reloads.load(Ordering::Relaxed)), (g0 + 1, 1));
        assert_eq!(get(&t1, b"7", 0), Some(FieldValue::Str(b"dance")));
        assert_eq!(get(&t0, b"7", 0), Some(FieldValue::Str(b"music")), "a router's old copy stays valid");
        std::fs::write(&s.path, "id,category\n7,talk\n").unwrap();
        h.refresh(&s);
        assert_eq!(h.generation(), g1, "a broken file is not loaded");
        assert_eq!(get(&h.current().1, b"8", 0), Some(FieldValue::Str(b"game")));
    }

    #[test]
    fn csv_without_the_key_column_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(&spec(dir.path(), "a.csv", "id,category,agency\n1,x,y\n")).unwrap_err();
        assert!(err.contains("a.csv") && err.contains("author_id"), "{err}");
    }
}

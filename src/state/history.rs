//! Device history for DAU metrics: per device, the first and the last day
//! it was seen, imported from an offline snapshot and rolled forward by the
//! engine as days close.
//!
//! Kept per shard in a [`Table`] of 16-byte entries keyed by the device
//! fingerprint (xxh3-64 of the id's text, as for events), so a shard only
//! ever looks up devices of its own hash range. Days count from 1970-01-01
//! (day 0, which no valid date reaches, marks an empty slot).
//!
//! The snapshot is a CSV file with the header `did,first_day,last_day` and
//! days as `YYYY-MM-DD`. A malformed row (bad date, `first_day` after
//! `last_day`, wrong field count) is counted with its line number and
//! skipped; a device listed twice keeps the widest range and is counted;
//! the import fails only when rows exist and none parses.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytemuck::{Pod, Zeroable};

use super::dids::DidTable;
use super::table::{home, Slot, Table};

/// One device's history.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HistEntry {
    pub device_fp: u64,
    pub first_day: u32,
    pub last_day: u32,
}

const _: () = assert!(std::mem::size_of::<HistEntry>() == 16);

#[inline]
fn mix(device_fp: u64) -> u64 {
    let h = (device_fp ^ (device_fp >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 29)
}

impl Slot for HistEntry {
    #[inline]
    fn is_empty(&self) -> bool {
        self.first_day == 0
    }

    #[inline]
    fn hash(&self) -> u64 {
        mix(self.device_fp)
    }

    #[inline]
    fn same_key(&self, other: &HistEntry) -> bool {
        self.device_fp == other.device_fp
    }
}

/// The history table of one shard.
pub type DeviceHistory = Table<HistEntry>;

impl DeviceHistory {
    /// The history of a device, if it has one.
    pub fn get(&self, device_fp: u64) -> Option<HistEntry> {
        let entries = self.entries();
        let mut i = home(mix(device_fp), self.capacity());
        loop {
            let e = entries[i];
            if e.is_empty() {
                return None;
            }
            if e.device_fp == device_fp {
                return Some(e);
            }
            i = (i + 1) % self.capacity();
        }
    }

    /// Hints the CPU to load a device's home slot.
    #[inline]
    pub fn prefetch(&self, device_fp: u64) {
        self.prefetch_home(mix(device_fp));
    }

    /// Widens a device's range to include `first..=last` (inserting it if
    /// new); returns whether the device was already there.
    pub fn merge(&mut self, device_fp: u64, first_day: u32, last_day: u32) -> io::Result<bool> {
        debug_assert!(first_day != 0 && first_day <= last_day);
        self.reserve_one()?;
        let capacity = self.capacity();
        let mut i = home(mix(device_fp), capacity);
        loop {
            let e = self.entries()[i];
            if e.is_empty() {
                self.entries_mut()[i] = HistEntry { device_fp, first_day, last_day };
                self.len += 1;
                self.mark(i);
                return Ok(false);
            }
            if e.device_fp == device_fp {
                let wider =
                    HistEntry { device_fp, first_day: e.first_day.min(first_day), last_day: e.last_day.max(last_day) };
                if wider != e {
                    self.entries_mut()[i] = wider;
                    self.mark(i);
                }
                return Ok(true);
            }
            i = if i + 1 == capacity { 0 } else { i + 1 };
        }
    }
}

/// Days from 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Earliest and latest dates a history may hold (as event times do).
const YEAR_MIN: i64 = 2000;
const YEAR_MAX: i64 = 2099;

/// Parses `YYYY-MM-DD` into a day number.
pub fn parse_day(text: &[u8]) -> Option<u32> {
    if text.len() != 10 || text[4] != b'-' || text[7] != b'-' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        text[r].iter().try_fold(0i64, |v, &c| c.is_ascii_digit().then(|| v * 10 + (c - b'0') as i64))
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(YEAR_MIN..=YEAR_MAX).contains(&y) || !(1..=12).contains(&m) || d < 1 {
        return None;
    }
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if d > month_days[(m - 1) as usize] {
        return None;
    }
    u32::try_from(days_from_civil(y, m, d)).ok()
}

/// Rows reported by line number, at most.
pub const IMPORT_EXAMPLES_MAX: usize = 5;

/// What an import read.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ImportReport {
    pub rows: u64,
    /// Distinct devices imported.
    pub devices: u64,
    pub malformed: u64,
    /// Rows of a device already listed (ranges merged).
    pub duplicates: u64,
    /// `(line, reason)` of the first malformed rows.
    pub examples: Vec<(u64, String)>,
    pub seconds: f64,
}

/// A history file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("device history {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("device history {path}: the header must be `did,first_day,last_day`, found {found:?}")]
    Header { path: PathBuf, found: String },
    #[error("device history {path}: none of its {rows} rows parses (first: {examples})")]
    NothingParsed { path: PathBuf, rows: u64, examples: String },
}

/// A shard's imported history and the id texts of its devices.
pub type Imported = (DeviceHistory, DidTable);

/// Reads a history snapshot into one table per shard (device ranges cut
/// like the shards': fast range of the fingerprint over `shards`), with
/// the id texts of its devices (for `tally devices export`).
/// `dir`: where file-backed tables live (`history-S` in it), else anonymous.
///
/// Two passes, each on every core: the file is cut at line boundaries into
/// one part per core, each parsed into per-shard rows; then each shard's
/// table takes its rows, parts in file order (merging is order-free
/// anyway: the widest range wins).
pub fn import(path: &Path, shards: usize, dir: Option<&Path>) -> Result<(Vec<Imported>, ImportReport), HistoryError> {
    let started = Instant::now();
    let err = |source| HistoryError::Read { path: path.to_owned(), source };
    let data = std::fs::read(path).map_err(err)?;
    let header_end = memchr::memchr(b'\n', &data).map_or(data.len(), |i| i + 1);
    let header = data[..header_end].strip_suffix(b"\n").unwrap_or(&data[..header_end]);
    let header = header.strip_suffix(b"\r").unwrap_or(header);
    if header != b"did,first_day,last_day" {
        let found = String::from_utf8_lossy(header).into_owned();
        return Err(HistoryError::Header { path: path.to_owned(), found });
    }
    let shards = shards.max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let parts = line_parts(&data[header_end..], cores.min(IMPORT_PARTS_MAX));
    // Line number (1-based) of each part's first line: the header is line 1.
    let mut first_line = Vec::with_capacity(parts.len());
    let mut line = 2u64;
    for p in &parts {
        first_line.push(line);
        line += memchr::memchr_iter(b'\n', p).count() as u64;
    }
    let parsed: Vec<Parsed> = std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .iter()
            .zip(&first_line)
            .map(|(&part, &first)| scope.spawn(move || parse_part(part, first, shards)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    let mut report = ImportReport::default();
    for p in &parsed {
        report.rows += p.report.rows;
        report.malformed += p.report.malformed;
        for e in &p.report.examples {
            if report.examples.len() < IMPORT_EXAMPLES_MAX {
                report.examples.push(e.clone());
            }
        }
    }
    let filled: Vec<io::Result<(Imported, u64)>> = std::thread::scope(|scope| {
        let parsed = &parsed;
        let handles: Vec<_> = (0..shards)
            .map(|s| {
                scope.spawn(move || {
                    let rows: usize = parsed.iter().map(|p| p.rows[s].len()).sum();
                    let sub = dir.map(|d| d.join(format!("history-{s}")));
                    let mut table = DeviceHistory::create(sub.clone(), "history".into(), rows)?;
                    let mut dids = DidTable::create(sub, "dids".into(), rows)?;
                    let mut duplicates = 0;
                    for p in parsed {
                        duplicates += insert(&mut table, &p.rows[s])?;
                        let mut start = 0;
                        for (&(fp, ..), &end) in p.rows[s].iter().zip(&p.id_ends[s]) {
                            dids.insert(fp, &p.ids[s][start..end as usize])?;
                            start = end as usize;
                        }
                    }
                    Ok(((table, dids), duplicates))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(io::Error::other("a history import thread panicked"))))
            .collect()
    });
    let mut tables = Vec::with_capacity(shards);
    for f in filled {
        let (table, duplicates) = f.map_err(err)?;
        report.duplicates += duplicates;
        tables.push(table);
    }
    report.devices = tables.iter().map(|(t, _)| t.len() as u64).sum();
    report.seconds = started.elapsed().as_secs_f64();
    if report.rows > 0 && report.devices == 0 {
        let examples: Vec<String> = report.examples.iter().map(|(l, r)| format!("line {l}: {r}")).collect();
        return Err(HistoryError::NothingParsed {
            path: path.to_owned(),
            rows: report.rows,
            examples: examples.join("; "),
        });
    }
    Ok((tables, report))
}

/// Parts a file is cut into for parsing, at most.
const IMPORT_PARTS_MAX: usize = 8;
/// Inserts ahead of which a home slot is prefetched.
const IMPORT_PREFETCH_ROWS: usize = 16;

/// One part of a history file, parsed: per shard (fingerprint, first,
/// last), and the ids, one after the other, with where each ends.
#[derive(Default)]
struct Parsed {
    rows: Vec<Vec<(u64, u32, u32)>>,
    ids: Vec<Vec<u8>>,
    id_ends: Vec<Vec<u32>>,
    report: ImportReport,
}

/// Cuts `body` into at most `n` parts, each ending at a line end.
fn line_parts(body: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts = Vec::with_capacity(n);
    let mut rest = body;
    for k in (1..=n.max(1)).rev() {
        if k == 1 || rest.is_empty() {
            parts.push(rest);
            break;
        }
        let at = rest.len() / k;
        let cut = memchr::memchr(b'\n', &rest[at..]).map_or(rest.len(), |i| at + i + 1);
        parts.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    parts
}

/// Parses the rows of one part; `first_line` is the file line of its first.
fn parse_part(part: &[u8], first_line: u64, shards: usize) -> Parsed {
    let mut out = Parsed {
        rows: vec![Vec::new(); shards],
        ids: vec![Vec::new(); shards],
        id_ends: vec![Vec::new(); shards],
        report: ImportReport::default(),
    };
    let mut quoted = csv::ByteRecord::new();
    // (`split` would yield an empty piece after the last line end.)
    let body = part.strip_suffix(b"\n").unwrap_or(part);
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        out.report.rows += 1;
        let parsed = if line.contains(&b'"') { quoted_row(line, &mut quoted) } else { plain_row(line) };
        match parsed {
            Ok((did, first, last)) => {
                let fp = xxhash_rust::xxh3::xxh3_64(did);
                let shard = ((fp as u128 * shards as u128) >> 64) as usize;
                out.rows[shard].push((fp, first, last));
                out.ids[shard].extend_from_slice(did);
                out.id_ends[shard].push(out.ids[shard].len() as u32);
            }
            Err(why) => malformed(&mut out.report, first_line + i as u64, why),
        }
    }
    out
}

/// Merges rows into a table, prefetching ahead; returns the duplicates.
fn insert(table: &mut DeviceHistory, rows: &[(u64, u32, u32)]) -> io::Result<u64> {
    let mut duplicates = 0;
    for (i, &(fp, first, last)) in rows.iter().enumerate() {
        if let Some(&(ahead, _, _)) = rows.get(i + IMPORT_PREFETCH_ROWS) {
            table.prefetch(ahead);
        }
        if table.merge(fp, first, last)? {
            duplicates += 1;
        }
    }
    Ok(duplicates)
}

fn malformed(report: &mut ImportReport, line: u64, why: String) {
    report.malformed += 1;
    if report.examples.len() < IMPORT_EXAMPLES_MAX {
        report.examples.push((line, why));
    }
}

/// A row without quotes: `did,first,last`.
fn plain_row(line: &[u8]) -> Result<(&[u8], u32, u32), String> {
    let mut it = line.split(|&b| b == b',');
    let (Some(did), Some(first), Some(last), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(format!("{} fields, expected 3", line.split(|&b| b == b',').count()));
    };
    fields(did, first, last)
}

/// A row with a quoted field, read by the CSV parser (one line: a device
/// id holding a line break is not supported).
fn quoted_row<'a>(line: &[u8], rec: &'a mut csv::ByteRecord) -> Result<(&'a [u8], u32, u32), String> {
    let mut rdr = csv::ReaderBuilder::new().has_headers(false).from_reader(line);
    match rdr.read_byte_record(rec) {
        Ok(true) if rec.len() == 3 => fields(&rec[0], &rec[1], &rec[2]),
        Ok(true) => Err(format!("{} fields, expected 3", rec.len())),
        Ok(false) => Err("empty row".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn fields<'a>(did: &'a [u8], first: &[u8], last: &[u8]) -> Result<(&'a [u8], u32, u32), String> {
    if did.is_empty() {
        return Err("empty did".into());
    }
    let day = |text: &[u8], name: &str| {
        parse_day(text).ok_or_else(|| {
            format!("{name} {:?} is not a date YYYY-MM-DD in {YEAR_MIN}..={YEAR_MAX}", String::from_utf8_lossy(text))
        })
    };
    let (first, last) = (day(first, "first_day")?, day(last, "last_day")?);
    if first > last {
        return Err("first_day is after last_day".into());
    }
    Ok((did, first, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_strictly() {
        assert_eq!(parse_day(b"1970-01-02"), None, "before 2000");
        assert_eq!(parse_day(b"2026-02-16"), Some(20_500));
        assert_eq!(parse_day(b"2024-02-29"), Some(19_782));
        assert_eq!(parse_day(b"2025-02-29"), None);
        assert_eq!(parse_day(b"2026-13-01"), None);
        assert_eq!(parse_day(b"2026-2-16"), None);
        assert_eq!(parse_day(b"2026-02-16 "), None);
    }

    #[test]
    fn import_counts_bad_rows_and_merges_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("devices.csv");
        let text = "did,first_day,last_day\n\
                    a,2026-01-01,2026-02-01\n\
                    b,2026-02-10,2026-01-01\n\
                    \"c,1\",2025-12-31,2026-02-15\n\
                    a,2025-06-01,2026-01-15\n\
                    d,yesterday,2026-01-01\n\
                    e,2026-01-01\n\
                    7,2026-01-05,2026-01-06\n";
        std::fs::write(&p, text).unwrap();
        let (tables, r) = import(&p, 2, None).unwrap();
        assert_eq!((r.rows, r.devices, r.malformed, r.duplicates), (7, 3, 3, 1));
        let lines: Vec<u64> = r.examples.iter().map(|e| e.0).collect();
        assert_eq!(lines, [3, 6, 7]);
        let find = |did: &str| {
            let fp = xxhash_rust::xxh3::xxh3_64(did.as_bytes());
            tables.iter().find_map(|(t, _)| t.get(fp))
        };
        let id = |did: &str| {
            let fp = xxhash_rust::xxh3::xxh3_64(did.as_bytes());
            let mut out = Vec::new();
            tables.iter().any(|(_, d)| d.get(fp, &mut out)).then(|| String::from_utf8(out).unwrap())
        };
        assert_eq!(id("c,1").as_deref(), Some("c,1"), "a quoted id keeps its text, unquoted");
        assert_eq!(id("7").as_deref(), Some("7"));
        assert_eq!(id("b"), None);
        let a = find("a").unwrap();
        assert_eq!((a.first_day, a.last_day), (parse_day(b"2025-06-01").unwrap(), parse_day(b"2026-02-01").unwrap()));
        assert!(find("c,1").is_some() && find("7").is_some() && find("b").is_none());
    }

    #[test]
    fn import_refuses_a_file_where_nothing_parses_or_the_header_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("devices.csv");
        std::fs::write(&p, "did,first_day,last_day\na,x,y\n").unwrap();
        assert!(matches!(import(&p, 1, None), Err(HistoryError::NothingParsed { rows: 1, .. })));
        std::fs::write(&p, "device,first,last\na,2026-01-01,2026-01-01\n").unwrap();
        assert!(matches!(import(&p, 1, None), Err(HistoryError::Header { .. })));
        std::fs::write(&p, "did,first_day,last_day\n").unwrap();
        assert_eq!(import(&p, 1, None).unwrap().1.devices, 0);
    }

    #[test]
    fn parts_keep_line_numbers_and_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("devices.csv");
        let mut text = String::from("did,first_day,last_day\r\n");
        let bad = [500u64, 4_999, 5_000, 9_001, 9_999];
        for line in 2..=10_001u64 {
            if bad.contains(&line) {
                text += "broken\r\n";
            } else {
                text += &format!("d{},2026-01-01,2026-01-{:02}\r\n", line % 7_000, 1 + line % 28);
            }
        }
        text.pop(); // the last line ends without "\n" (but with "\r")
        std::fs::write(&p, text).unwrap();
        for parts in [1, 2, 3, 8] {
            let body_start = b"did,first_day,last_day\r\n".len();
            let data = std::fs::read(&p).unwrap();
            let cut = line_parts(&data[body_start..], parts);
            assert_eq!(cut.concat(), &data[body_start..], "{parts} parts cover the body");
            assert!(cut[..cut.len() - 1].iter().all(|c| c.ends_with(b"\n")), "parts end at line ends");
        }
        let (tables, r) = import(&p, 3, None).unwrap();
        assert_eq!((r.rows, r.malformed), (10_000, 5));
        assert_eq!(r.examples.iter().map(|e| e.0).collect::<Vec<_>>(), bad);
        assert_eq!(r.devices, 6_998, "d4999 and d5000 appear only on broken lines");
        assert_eq!(r.devices + r.duplicates, r.rows - r.malformed);
        assert_eq!(tables.iter().map(|(t, _)| t.len() as u64).sum::<u64>(), 6_998);
        assert_eq!(tables.iter().map(|(_, d)| d.devices().count() as u64).sum::<u64>(), 6_998);
    }
}

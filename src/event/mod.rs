//! The event model and the record formats tally reads.
//!
//! A parser turns one input record (a JSON line, a CSV row, a binary record)
//! into an [`EventBuf`]: event time, device-id text and the values of the
//! fields the job asked for, by slot. Values point into the record itself
//! (or into the buffer's scratch space when escapes had to be resolved), so
//! parsing allocates nothing per event once the buffer is warm.

pub mod binary;
pub mod csv;
pub mod jsonl;
pub mod rows;

use crate::job::filter::FieldValue;

/// Earliest accepted event time: 2000-01-01T00:00:00Z.
pub const TS_MIN_MS: i64 = 946_684_800_000;
/// Latest accepted event time (exclusive): 2100-01-01T00:00:00Z.
pub const TS_MAX_MS: i64 = 4_102_444_800_000;

/// Why a record was skipped. Counted per source and reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Reject {
    EmptyLine,
    LineTooLong,
    InvalidUtf8,
    ControlCharacter,
    InvalidJson,
    NotAnObject,
    MissingTs,
    TsNotInteger,
    TsOutOfRange,
    MissingDeviceId,
    BadDeviceId,
    CsvFieldCount,
    InvalidCsv,
    TruncatedRecord,
    /// A `format = "rows"` line without `metric`, `grouping` or `dims`.
    NotARow,
}

impl Reject {
    /// All reasons, in report order.
    pub const ALL: [Reject; 15] = [
        Reject::EmptyLine,
        Reject::LineTooLong,
        Reject::InvalidUtf8,
        Reject::ControlCharacter,
        Reject::InvalidJson,
        Reject::NotAnObject,
        Reject::MissingTs,
        Reject::TsNotInteger,
        Reject::TsOutOfRange,
        Reject::MissingDeviceId,
        Reject::BadDeviceId,
        Reject::CsvFieldCount,
        Reject::InvalidCsv,
        Reject::TruncatedRecord,
        Reject::NotARow,
    ];

    /// Stable snake_case name used in summaries and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::EmptyLine => "empty_line",
            Reject::LineTooLong => "line_too_long",
            Reject::InvalidUtf8 => "invalid_utf8",
            Reject::ControlCharacter => "control_character",
            Reject::InvalidJson => "invalid_json",
            Reject::NotAnObject => "not_an_object",
            Reject::MissingTs => "missing_ts",
            Reject::TsNotInteger => "ts_not_integer",
            Reject::TsOutOfRange => "ts_out_of_range",
            Reject::MissingDeviceId => "missing_device_id",
            Reject::BadDeviceId => "bad_device_id",
            Reject::CsvFieldCount => "csv_field_count",
            Reject::InvalidCsv => "invalid_csv",
            Reject::TruncatedRecord => "truncated_record",
            Reject::NotARow => "not_a_row",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A parsed value before it is borrowed: spans index into the record or
/// into [`EventBuf::scratch`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Raw {
    Null,
    Int(i64),
    Float(f64),
    /// Bytes `[start, start+len)` of the record.
    Span {
        start: u32,
        len: u32,
    },
    /// Bytes `[start, start+len)` of the scratch buffer.
    Scratch {
        start: u32,
        len: u32,
    },
    /// A JSON integer that fits i64, with its text (a device id keeps it).
    IntText {
        start: u32,
        len: u32,
        value: i64,
    },
    /// A JSON integer beyond i64 but within u64: a device id, or a float
    /// when used as a value.
    BigText {
        start: u32,
        len: u32,
    },
    /// A boolean, object or array: `null` as a value, invalid as an id.
    Other,
}

/// One parsed event; reused from record to record.
#[derive(Debug, Default)]
pub struct EventBuf {
    pub ts_ms: i64,
    /// Device id text: always a span (record or scratch).
    pub did: Option<Raw>,
    /// Values of the requested fields, by slot.
    pub values: Vec<Raw>,
    /// Unescaped strings and formatted integers live here.
    pub scratch: Vec<u8>,
}

impl EventBuf {
    pub fn new(slots: usize) -> EventBuf {
        EventBuf { ts_ms: 0, did: None, values: vec![Raw::Null; slots], scratch: Vec::with_capacity(256) }
    }

    /// Clears values for the next record without freeing anything.
    pub fn reset(&mut self) {
        self.did = None;
        self.values.fill(Raw::Null);
        self.scratch.clear();
    }

    /// The bytes of a span value.
    #[inline]
    pub fn bytes<'a>(&'a self, record: &'a [u8], raw: Raw) -> &'a [u8] {
        match raw {
            Raw::Span { start, len } => &record[start as usize..(start + len) as usize],
            Raw::Scratch { start, len } => &self.scratch[start as usize..(start + len) as usize],
            _ => &[],
        }
    }

    /// The device id text.
    #[inline]
    pub fn did_bytes<'a>(&'a self, record: &'a [u8]) -> &'a [u8] {
        self.did.map_or(&[], |d| self.bytes(record, d))
    }

    /// A field value in the form filters and keys use.
    #[inline]
    pub fn value<'a>(&'a self, record: &'a [u8], slot: usize) -> FieldValue<'a> {
        match self.values[slot] {
            Raw::Null | Raw::Other => FieldValue::Null,
            Raw::Int(i) => FieldValue::Int(i),
            Raw::Float(f) => FieldValue::Float(f),
            Raw::IntText { value, .. } => FieldValue::Int(value),
            Raw::BigText { start, len } => big_number(&record[start as usize..(start + len) as usize]),
            span => FieldValue::Str(self.bytes(record, span)),
        }
    }

    /// Appends bytes to scratch and returns their span.
    pub fn push_scratch(&mut self, bytes: &[u8]) -> Raw {
        let start = self.scratch.len() as u32;
        self.scratch.extend_from_slice(bytes);
        Raw::Scratch { start, len: bytes.len() as u32 }
    }
}

/// An integer too large for i64, as a float (rare: kept out of line so
/// that [`EventBuf::value`] stays small enough to inline).
#[cold]
#[inline(never)]
fn big_number(text: &[u8]) -> FieldValue<'static> {
    let f = std::str::from_utf8(text).ok().and_then(|t| t.parse().ok());
    FieldValue::Float(f.unwrap_or(f64::NAN))
}

/// Which fields a parser extracts: event time, device id, and named slots.
#[derive(Clone, Debug)]
pub struct FieldSet {
    pub ts: String,
    pub did: String,
    pub slots: Vec<String>,
}

impl FieldSet {
    pub fn slot_of(&self, name: &str) -> Option<usize> {
        self.slots.iter().position(|s| s == name)
    }
}

/// Checks the event-time range shared by every format.
#[inline]
pub fn check_ts(ts: i64) -> Result<i64, Reject> {
    if (TS_MIN_MS..TS_MAX_MS).contains(&ts) {
        Ok(ts)
    } else {
        Err(Reject::TsOutOfRange)
    }
}

/// Parses a canonical decimal integer (`0`, `-12`, no leading zeros, no
/// `+`), as CSV cells and binary-free formats define integers.
pub fn parse_canonical_int(s: &[u8]) -> Option<i64> {
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if digits.len() > 1 && digits[0] == b'0' || s == b"-0" {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

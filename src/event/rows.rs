//! Result rows of another tally job, read as input (`format = "rows"`):
//! the ADS layer's source is the DWS layer's output, a file or a topic.
//!
//! A row becomes an event whose fields are the row's own (`metric`,
//! `window_start`, `window_end`, each measure such as `count` or
//! `sum_amount`), `grouping` as its fields joined by commas (`""` for the
//! empty set, `"author.category,platform"`), and each of its `dims` by
//! name. Its event time is the last millisecond of its window, so a
//! tumble row lands in the same step of a metric with that step. Its
//! identity (the "device id") is its upsert key: metric, window end,
//! grouping and dims. A summary over rows counts each upsert key once,
//! with the latest value it arrived with (see `metric::upsert`): a row a
//! restarted upstream writes again changes nothing.
//!
//! Rows are few next to events (one per key and window), so this parser
//! takes the simple road: `serde_json` per line.

use serde_json::{Map, Value};

use super::{check_ts, EventBuf, FieldSet, Raw, Reject};

/// Parses result rows into [`EventBuf`]s.
pub struct RowsParser {
    slots: Vec<String>,
    key: Vec<u8>,
}

impl RowsParser {
    pub fn new(fields: &FieldSet) -> RowsParser {
        RowsParser { slots: fields.slots.clone(), key: Vec::new() }
    }

    /// Parses one line (without its `\n`; a trailing `\r` is ignored).
    pub fn parse(&mut self, line: &[u8], ev: &mut EventBuf) -> Result<(), Reject> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        ev.reset();
        if line.is_empty() {
            return Err(Reject::EmptyLine);
        }
        let row = match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(row)) => row,
            Ok(_) => return Err(Reject::NotAnObject),
            Err(_) if std::str::from_utf8(line).is_err() => return Err(Reject::InvalidUtf8),
            Err(_) => return Err(Reject::InvalidJson),
        };
        let end = match row.get("window_end") {
            None | Some(Value::Null) => return Err(Reject::MissingTs),
            Some(v) => v.as_i64().ok_or(Reject::TsNotInteger)?,
        };
        ev.ts_ms = check_ts(end.saturating_sub(1))?;
        let (Some(Value::String(metric)), Some(Value::Object(dims)), Some(Value::Array(grouping))) =
            (row.get("metric"), row.get("dims"), row.get("grouping"))
        else {
            return Err(Reject::NotARow);
        };
        let mut set = String::new();
        for (i, g) in grouping.iter().enumerate() {
            let Value::String(g) = g else {
                return Err(Reject::NotARow);
            };
            if i > 0 {
                set.push(',');
            }
            set.push_str(g);
        }
        upsert_key(metric, end, grouping, dims, &mut self.key);
        ev.did = Some(ev.push_scratch(&self.key));
        for (slot, name) in self.slots.iter().enumerate() {
            let v = match name.as_str() {
                "grouping" => Some(ev.push_scratch(set.as_bytes())),
                "dims" => None,
                _ => row.get(name).or_else(|| dims.get(name)).map(|v| raw(v, ev)),
            };
            ev.values[slot] = v.unwrap_or(Raw::Null);
        }
        Ok(())
    }
}

/// A JSON value as a field: strings and numbers; anything else is `null`
/// as a value.
fn raw(v: &Value, ev: &mut EventBuf) -> Raw {
    match v {
        Value::Null => Raw::Null,
        Value::String(s) => ev.push_scratch(s.as_bytes()),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Raw::Int(i),
            None => n.as_f64().map_or(Raw::Null, Raw::Float),
        },
        _ => Raw::Other,
    }
}

/// A row's upsert key as text: metric, window end, grouping and the dims
/// sorted by name (whatever order a writer put them in), unit-separated.
pub fn upsert_key(metric: &str, end: i64, grouping: &[Value], dims: &Map<String, Value>, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(metric.as_bytes());
    out.push(0x1f);
    out.extend_from_slice(itoa::Buffer::new().format(end).as_bytes());
    out.push(0x1f);
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, grouping);
    let mut names: Vec<&String> = dims.keys().collect();
    names.sort();
    for n in names {
        out.push(0x1f);
        let _ = serde_json::to_writer(&mut *out, n);
        out.push(b':');
        let _ = serde_json::to_writer(&mut *out, &dims[n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::filter::FieldValue;

    fn fields(slots: &[&str]) -> FieldSet {
        FieldSet { ts: "ts".into(), did: "did".into(), slots: slots.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn a_row_becomes_an_event_keyed_by_its_upsert_key() {
        let f = fields(&["room_id", "count", "sum_amount", "grouping", "metric", "absent"]);
        let mut p = RowsParser::new(&f);
        let mut ev = EventBuf::new(f.slots.len());
        let line = br#"{"metric":"live","window_start":1771171200000,"window_end":1771171260000,"grouping":["room_id","platform"],"dims":{"room_id":"r7","platform":null},"count":31,"sum_amount":420.5}"#;
        p.parse(line, &mut ev).unwrap();
        assert_eq!(ev.ts_ms, 1771171259999);
        assert_eq!(ev.value(line, 0), FieldValue::Str(b"r7"));
        assert_eq!(ev.value(line, 1), FieldValue::Int(31));
        assert_eq!(ev.value(line, 2), FieldValue::Float(420.5));
        assert_eq!(ev.value(line, 3), FieldValue::Str(b"room_id,platform"));
        assert_eq!(ev.value(line, 4), FieldValue::Str(b"live"));
        assert_eq!(ev.value(line, 5), FieldValue::Null);
        let key = ev.did_bytes(line).to_vec();
        // The same row with its dims in another order, and other values:
        // the same key. Another window: another key.
        let again = br#"{"metric":"live","window_start":1771171200000,"window_end":1771171260000,"grouping":["room_id","platform"],"dims":{"platform":null,"room_id":"r7"},"count":32,"sum_amount":1}"#;
        p.parse(again, &mut ev).unwrap();
        assert_eq!(ev.did_bytes(again), key.as_slice());
        let later = br#"{"metric":"live","window_start":1771171260000,"window_end":1771171320000,"grouping":["room_id","platform"],"dims":{"platform":null,"room_id":"r7"},"count":32}"#;
        p.parse(later, &mut ev).unwrap();
        assert_ne!(ev.did_bytes(later), key.as_slice());
    }

    #[test]
    fn lines_that_are_not_rows_are_rejected_with_a_reason() {
        let f = fields(&["count"]);
        let mut p = RowsParser::new(&f);
        let mut ev = EventBuf::new(1);
        let cases: [(&[u8], Reject); 7] = [
            (b"", Reject::EmptyLine),
            (b"{\"metric\":", Reject::InvalidJson),
            (b"[1]", Reject::NotAnObject),
            (br#"{"metric":"m","grouping":[],"dims":{}}"#, Reject::MissingTs),
            (br#"{"metric":"m","window_end":"x","grouping":[],"dims":{}}"#, Reject::TsNotInteger),
            (br#"{"metric":"m","window_end":5,"grouping":[],"dims":{}}"#, Reject::TsOutOfRange),
            (br#"{"ts":1771171260000,"did":"d","window_end":1771171260000}"#, Reject::NotARow),
        ];
        for (line, want) in cases {
            assert_eq!(p.parse(line, &mut ev), Err(want), "{}", String::from_utf8_lossy(line));
        }
    }
}

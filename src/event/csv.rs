//! CSV rows (RFC 4180 quoting, one record per line) mapped by header name.
//!
//! Every file of a CSV source starts with its own header; a parser is built
//! per header. Cells are untyped text: an empty cell is `null`, a canonical
//! integer (`-12`, `0`, no leading zeros) is an integer, anything else is a
//! string. A record may not contain a newline inside quotes.

use super::{check_ts, parse_canonical_int, EventBuf, FieldSet, Raw, Reject};

/// Where each column goes, for one header.
pub struct CsvParser {
    columns: usize,
    ts_col: Option<usize>,
    did_col: Option<usize>,
    /// For each column: the slot it fills, if any.
    slot_of_col: Vec<Option<usize>>,
    cells: Vec<Raw>,
}

impl CsvParser {
    pub fn new(fields: &FieldSet, header: &[String]) -> CsvParser {
        let find = |name: &str| header.iter().position(|h| h == name);
        CsvParser {
            columns: header.len(),
            ts_col: find(&fields.ts),
            did_col: find(&fields.did),
            slot_of_col: header.iter().map(|h| fields.slot_of(h)).collect(),
            cells: Vec::with_capacity(header.len()),
        }
    }

    /// Splits a header line into names.
    pub fn split_header(line: &[u8]) -> Result<Vec<String>, Reject> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut ev = EventBuf::new(0);
        let mut cells = Vec::new();
        split(line, &mut ev, &mut cells)?;
        Ok(cells.iter().map(|c| String::from_utf8_lossy(ev.bytes(line, *c)).into_owned()).collect())
    }

    /// Parses one row (without its `\n`).
    pub fn parse(&mut self, line: &[u8], ev: &mut EventBuf) -> Result<(), Reject> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        ev.reset();
        if line.is_empty() {
            return Err(Reject::EmptyLine);
        }
        if line.iter().any(|&b| b >= 0x80) && std::str::from_utf8(line).is_err() {
            return Err(Reject::InvalidUtf8);
        }
        if line.iter().any(|&b| b < 0x20 && b != b'\t') {
            return Err(Reject::ControlCharacter);
        }
        split(line, ev, &mut self.cells)?;
        if self.cells.len() != self.columns {
            return Err(Reject::CsvFieldCount);
        }
        let ts_cell = self.ts_col.map(|c| self.cells[c]);
        let ts_text = ts_cell.map_or(&[][..], |c| ev.bytes(line, c));
        if ts_text.is_empty() {
            return Err(Reject::MissingTs);
        }
        ev.ts_ms = check_ts(parse_canonical_int(ts_text).ok_or(Reject::TsNotInteger)?)?;
        match self.did_col.map(|c| self.cells[c]) {
            Some(d) if !ev.bytes(line, d).is_empty() => ev.did = Some(d),
            _ => return Err(Reject::MissingDeviceId),
        }
        for (col, slot) in self.slot_of_col.iter().enumerate() {
            if let Some(slot) = *slot {
                let cell = self.cells[col];
                let text = ev.bytes(line, cell);
                ev.values[slot] = if text.is_empty() {
                    Raw::Null
                } else if let Some(i) = parse_canonical_int(text) {
                    Raw::Int(i)
                } else {
                    cell
                };
            }
        }
        Ok(())
    }
}

/// Splits a CSV record into cell spans; quoted cells with `""` are
/// unescaped into scratch.
fn split(line: &[u8], ev: &mut EventBuf, cells: &mut Vec<Raw>) -> Result<(), Reject> {
    cells.clear();
    let mut i = 0;
    loop {
        if line.get(i) == Some(&b'"') {
            let start = ev.scratch.len() as u32;
            i += 1;
            loop {
                match memchr::memchr(b'"', &line[i..]) {
                    None => return Err(Reject::InvalidCsv),
                    Some(k) => {
                        ev.scratch.extend_from_slice(&line[i..i + k]);
                        i += k + 1;
                        if line.get(i) == Some(&b'"') {
                            ev.scratch.push(b'"');
                            i += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            cells.push(Raw::Scratch { start, len: ev.scratch.len() as u32 - start });
            match line.get(i) {
                None => return Ok(()),
                Some(b',') => i += 1,
                Some(_) => return Err(Reject::CsvFieldCount),
            }
        } else {
            let end = memchr::memchr(b',', &line[i..]).map_or(line.len(), |k| i + k);
            cells.push(Raw::Span { start: i as u32, len: (end - i) as u32 });
            if end == line.len() {
                return Ok(());
            }
            i = end + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::filter::FieldValue;

    #[test]
    fn maps_by_header_and_types_cells() {
        let fields = FieldSet { ts: "ts".into(), did: "did".into(), slots: vec!["page".into(), "v".into()] };
        let header = CsvParser::split_header(b"v,ts,did,page\r").unwrap();
        assert_eq!(header, ["v", "ts", "did", "page"]);
        let mut p = CsvParser::new(&fields, &header);
        let mut ev = EventBuf::new(2);
        let line = b"7,1771171200000,123,\"a,\"\"b\"\"\"";
        p.parse(line, &mut ev).unwrap();
        assert_eq!(ev.ts_ms, 1_771_171_200_000);
        assert_eq!(ev.did_bytes(line), b"123");
        assert_eq!(ev.value(line, 0), FieldValue::Str(b"a,\"b\""));
        assert_eq!(ev.value(line, 1), FieldValue::Int(7));
        let line = b",1771171200000,x,007";
        p.parse(line, &mut ev).unwrap();
        assert_eq!(ev.value(line, 0), FieldValue::Str(b"007"));
        assert_eq!(ev.value(line, 1), FieldValue::Null);
        assert_eq!(p.parse(b"1,2", &mut ev), Err(Reject::CsvFieldCount));
        assert_eq!(p.parse(b"1,x,3,4", &mut ev), Err(Reject::TsNotInteger));
        assert_eq!(p.parse(b"1,1771171200000,,4", &mut ev), Err(Reject::MissingDeviceId));
    }
}

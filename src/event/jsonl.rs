//! JSON-lines parser: one flat JSON object per line, fields picked by name.
//!
//! Hot path. The scanner walks the top-level object once, validating its
//! structure (strings and their escapes, numbers, literals, commas), and
//! keeps only the fields the job asked for; nested values it does not need
//! are skipped by bracket matching. Lines with control characters or
//! non-ASCII bytes (rare in logs) take a slow path that validates them with
//! `serde_json` / `str::from_utf8` first, so what is accepted agrees with a
//! strict JSON parser. Nothing is allocated per line.
//!
//! On x86-64 with AVX2, a line of up to [`MARKED_BYTES`] is first marked in
//! one pass, 32 bytes at a time: a bit per quote, and whether it holds a
//! backslash, a control byte or a non-ASCII byte. Without a backslash every
//! string ends at the next marked quote, so the scan finds each one with a
//! `trailing_zeros` instead of searching the bytes eight at a time.

use super::{check_ts, EventBuf, FieldSet, Raw, Reject};

/// Deepest nesting accepted (the top-level object is level 1), as serde_json.
pub const NESTING_MAX: usize = 128;

/// Lines up to this long are marked in one pass (see the module's text);
/// longer ones are searched eight bytes at a time.
pub const MARKED_BYTES: usize = 512;

/// What the marking pass found in a line.
struct Marks {
    /// Bit `i % 64` of word `i / 64` set when byte `i` is a `"`.
    quotes: [u64; MARKED_BYTES / 64],
    /// Words of `quotes` the line covers.
    words: usize,
    backslash: bool,
    /// A byte below 0x20 (a tab is valid only outside strings, so it, too,
    /// sends the line to the strict check).
    ctrl: bool,
    /// A byte at or above 0x80.
    high: bool,
}

impl Marks {
    /// Index of the first quote at or after `from`.
    #[inline(always)]
    fn next_quote(&self, from: usize) -> Option<usize> {
        let mut w = from / 64;
        if w >= self.words {
            return None; // past the line: words there hold an earlier line's bits
        }
        let mut bits = self.quotes[w] & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                return Some(w * 64 + bits.trailing_zeros() as usize);
            }
            w += 1;
            if w >= self.words {
                return None;
            }
            bits = self.quotes[w];
        }
    }
}

/// Marks `line` (at most [`MARKED_BYTES`] long) 32 bytes at a time.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn mark_avx2(line: &[u8], m: &mut Marks) {
    use std::arch::x86_64::*;
    debug_assert!(line.len() <= MARKED_BYTES);
    let (quote, slash, space) = (_mm256_set1_epi8(b'"' as i8), _mm256_set1_epi8(b'\\' as i8), _mm256_set1_epi8(0x20));
    let (mut slashes, mut ctrl, mut high) = (0u32, 0u32, 0u32);
    // Marks 32 bytes from `at`, of which the first `skip` were marked
    // before (an overlapping last load) and are shifted out.
    let mut mark = |v: __m256i, at: usize, skip: u32| {
        let q = (_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, quote)) as u32 >> skip) as u64;
        slashes |= _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, slash)) as u32 >> skip;
        let h = _mm256_movemask_epi8(v) as u32 >> skip;
        high |= h;
        // Signed: bytes below 0x20, and the non-ASCII ones, taken out.
        ctrl |= (_mm256_movemask_epi8(_mm256_cmpgt_epi8(space, v)) as u32 >> skip) & !h;
        if at.is_multiple_of(64) {
            m.quotes[at / 64] = q;
        } else {
            m.quotes[at / 64] |= q << 32;
        }
    };
    let n = line.len();
    let whole = n / 32 * 32;
    for at in (0..whole).step_by(32) {
        // SAFETY: bytes `at..at + 32` are in the line; the load is unaligned.
        mark(unsafe { _mm256_loadu_si256(line.as_ptr().add(at).cast()) }, at, 0);
    }
    if whole < n {
        let v = if n >= 32 {
            // The last 32 bytes, overlapping the ones marked above.
            // SAFETY: `n - 32..n` is in the line.
            unsafe { _mm256_loadu_si256(line.as_ptr().add(n - 32).cast()) }
        } else {
            // A short line, padded with spaces: no quote, backslash,
            // control or non-ASCII byte.
            let mut pad = [b' '; 32];
            pad[..n].copy_from_slice(line);
            // SAFETY: as above, from the stack.
            unsafe { _mm256_loadu_si256(pad.as_ptr().cast()) }
        };
        let skip = if n >= 32 { 32 - (n - whole) as u32 } else { 0 };
        mark(v, whole, skip);
    }
    m.words = n.div_ceil(64);
    (m.backslash, m.ctrl, m.high) = (slashes != 0, ctrl != 0, high != 0);
}

/// Where a key lands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Ts,
    Did,
    Slot(usize),
}

/// Parses JSON lines into [`EventBuf`]s.
pub struct JsonlParser {
    names: Vec<(Vec<u8>, Target)>,
    /// Names of up to 8 bytes packed into a word, for one-compare matching.
    packed: Vec<Option<u64>>,
    /// Bit i set when `names[i]` starts with that byte: a cheap pre-filter.
    first_byte: [u64; 256],
    key_scratch: Vec<u8>,
    /// The CPU has AVX2: lines are marked first.
    avx2: bool,
    marks: Marks,
}

impl JsonlParser {
    pub fn new(fields: &FieldSet) -> JsonlParser {
        let mut names =
            vec![(fields.ts.as_bytes().to_vec(), Target::Ts), (fields.did.as_bytes().to_vec(), Target::Did)];
        for (i, s) in fields.slots.iter().enumerate() {
            names.push((s.as_bytes().to_vec(), Target::Slot(i)));
        }
        assert!(names.len() <= 64, "at most 62 fields per source");
        let mut first_byte = [0u64; 256];
        for (i, (n, _)) in names.iter().enumerate() {
            let b = n.first().copied().unwrap_or(0);
            first_byte[b as usize] |= 1 << i;
        }
        let packed = names.iter().map(|(n, _)| pack(n)).collect();
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        let marks = Marks { quotes: [0; MARKED_BYTES / 64], words: 0, backslash: false, ctrl: false, high: false };
        JsonlParser { names, packed, first_byte, key_scratch: Vec::new(), avx2, marks }
    }

    /// Parses one line (without its `\n`; a trailing `\r` is ignored).
    pub fn parse(&mut self, line: &[u8], ev: &mut EventBuf) -> Result<(), Reject> {
        let ts = self.scan(line, ev)?;
        finish(ts, ev)
    }

    /// Parses one line's fields only: no event time or device id needed
    /// (a dimension table's row). `ev.did` and `ev.ts_ms` mean nothing.
    pub fn parse_fields(&mut self, line: &[u8], ev: &mut EventBuf) -> Result<(), Reject> {
        self.scan(line, ev).map(|_| ())
    }

    /// Validates the line and picks its fields; returns the event time's raw value.
    fn scan(&mut self, line: &[u8], ev: &mut EventBuf) -> Result<Option<Raw>, Reject> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        ev.reset();
        if line.is_empty() {
            return Err(Reject::EmptyLine);
        }
        let marked = self.mark(line);
        let (ctrl, high) = if marked { (self.marks.ctrl, self.marks.high) } else { scan_special(line) };
        if ctrl && serde_json::from_slice::<serde::de::IgnoredAny>(line).is_err() {
            return Err(Reject::ControlCharacter);
        }
        if high && std::str::from_utf8(line).is_err() {
            return Err(Reject::InvalidUtf8);
        }
        match self.fast_any(line, marked, ev) {
            Some(ts) => Ok(ts),
            None => {
                ev.reset();
                self.general(line, ev)
            }
        }
    }

    /// Marks the line if it can (AVX2, not too long); true if it did.
    #[inline(always)]
    fn mark(&mut self, line: &[u8]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 && line.len() <= MARKED_BYTES {
            // SAFETY: `avx2` says the CPU has it.
            unsafe { mark_avx2(line, &mut self.marks) };
            return true;
        }
        false
    }

    /// [`Self::fast`], finding string ends by the marks when the line was
    /// marked and has no backslash.
    #[inline(always)]
    fn fast_any(&self, line: &[u8], marked: bool, ev: &mut EventBuf) -> Option<Option<Raw>> {
        if marked && !self.marks.backslash {
            self.fast(line, ev, |i| self.marks.next_quote(i))
        } else {
            self.fast(line, ev, |i| find_quote_or_backslash(line, i))
        }
    }

    /// The common shape, `{"k":v,...}` with no whitespace, escapes, nested
    /// values, booleans or non-integer numbers, in one tight pass. `None`
    /// means "not that shape" (not "invalid"): the general scanner decides.
    /// `find(i)`: the first `"` or `\` at or after `i`.
    #[inline(always)]
    fn fast(&self, b: &[u8], ev: &mut EventBuf, find: impl Fn(usize) -> Option<usize>) -> Option<Option<Raw>> {
        let n = b.len();
        if n < 2 || b[0] != b'{' || b[n - 1] != b'}' {
            return None;
        }
        let mut ts = None;
        let mut i = 1;
        loop {
            if *b.get(i)? != b'"' {
                return None;
            }
            let ks = i + 1;
            let ke = find(ks)?;
            if b[ke] != b'"' || *b.get(ke + 1)? != b':' {
                return None;
            }
            let target = self.match_key(&b[ks..ke], b.get(ks..ks + 8));
            i = ke + 2;
            let c = *b.get(i)?;
            let v = if c == b'"' {
                let vs = i + 1;
                let ve = find(vs)?;
                if b[ve] != b'"' {
                    return None;
                }
                i = ve + 1;
                Raw::Span { start: vs as u32, len: (ve - vs) as u32 }
            } else if c == b'-' || c.is_ascii_digit() {
                let start = i;
                i += (c == b'-') as usize;
                let digits = i;
                let mut v: i64 = 0;
                while let Some(&d) = b.get(i) {
                    if !d.is_ascii_digit() {
                        break;
                    }
                    v = v.wrapping_mul(10).wrapping_add((d - b'0') as i64);
                    i += 1;
                }
                let len = i - digits;
                // Leading zeros, fractions, exponents and long numbers: general path.
                if len == 0
                    || len > 18
                    || (b[digits] == b'0' && len > 1)
                    || matches!(b.get(i), Some(b'.' | b'e' | b'E'))
                {
                    return None;
                }
                if start != digits && v == 0 {
                    return None; // `-0` is a float: the general path reads it.
                }
                let value = if start != digits { -v } else { v };
                Raw::IntText { start: start as u32, len: (i - start) as u32, value }
            } else if b.get(i..i + 4) == Some(b"null") {
                i += 4;
                Raw::Null
            } else {
                return None;
            };
            match target {
                Some(Target::Ts) => ts = Some(v),
                Some(Target::Did) => ev.did = Some(v),
                Some(Target::Slot(k)) => ev.values[k] = v,
                None => {}
            }
            match b.get(i) {
                Some(b',') => i += 1,
                Some(b'}') if i == n - 1 => return Some(ts),
                _ => return None,
            }
        }
    }

    /// Any valid JSON object; returns the raw `ts` value.
    fn general(&mut self, line: &[u8], ev: &mut EventBuf) -> Result<Option<Raw>, Reject> {
        let mut ts: Option<Raw> = None;
        let mut s = Scanner { b: line, i: 0 };
        s.ws();
        match s.peek() {
            Some(b'{') => s.i += 1,
            Some(b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => return Err(Reject::NotAnObject),
            _ => return Err(Reject::InvalidJson),
        }
        s.ws();
        if s.peek() == Some(b'}') {
            s.i += 1;
        } else {
            loop {
                // Whitespace between tokens is rare in logs: look before skipping.
                if s.peek() != Some(b'"') {
                    s.ws();
                }
                let target = self.key(&mut s)?;
                if s.peek() != Some(b':') {
                    s.ws();
                }
                s.expect(b':')?;
                if let Some(b' ' | b'\t' | b'\r' | b'\n') = s.peek() {
                    s.ws();
                }
                let v = s.value(ev, target.is_some())?;
                match target {
                    Some(Target::Ts) => ts = Some(v),
                    Some(Target::Did) => ev.did = Some(v),
                    Some(Target::Slot(i)) => ev.values[i] = v,
                    None => {}
                }
                if let Some(b' ' | b'\t' | b'\r' | b'\n') = s.peek() {
                    s.ws();
                }
                match s.next() {
                    Some(b',') => continue,
                    Some(b'}') => break,
                    _ => return Err(Reject::InvalidJson),
                }
            }
        }
        s.ws();
        if s.i != line.len() {
            return Err(Reject::InvalidJson);
        }
        Ok(ts)
    }

    /// Reads a key and says which field it names, if any.
    #[inline(always)]
    fn key(&mut self, s: &mut Scanner) -> Result<Option<Target>, Reject> {
        s.expect(b'"')?;
        let start = s.i;
        let escaped = s.string_body()?;
        let raw = &s.b[start..s.i - 1];
        if !escaped {
            return Ok(self.match_key(raw, s.b.get(start..start + 8)));
        }
        let key: &[u8] = if escaped {
            self.key_scratch.clear();
            unescape_into(raw, &mut self.key_scratch)?;
            &self.key_scratch
        } else {
            raw
        };
        Ok(self.match_key(key, None))
    }

    /// Which field `key` names. `window`, when given, is 8 bytes of the
    /// line starting at the key, so short keys pack without a copy.
    #[inline(always)]
    fn match_key(&self, key: &[u8], window: Option<&[u8]>) -> Option<Target> {
        let mut cands = self.first_byte[key.first().copied().unwrap_or(0) as usize];
        if cands == 0 {
            return None;
        }
        let word = match window {
            Some(w) if key.len() <= 8 => {
                let w = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
                let keep = if key.len() == 8 { u64::MAX } else { (1u64 << (8 * key.len())) - 1 };
                Some(w & keep)
            }
            _ => pack(key),
        };
        while cands != 0 {
            let i = cands.trailing_zeros() as usize;
            cands &= cands - 1;
            let hit = match (word, self.packed[i]) {
                (Some(a), Some(b)) => a == b && key.len() == self.names[i].0.len(),
                (None, None) => self.names[i].0 == key,
                _ => false,
            };
            if hit {
                return Some(self.names[i].1);
            }
        }
        None
    }
}

/// Checks the event time and device id the scan found.
#[inline(always)]
fn finish(ts: Option<Raw>, ev: &mut EventBuf) -> Result<(), Reject> {
    ev.ts_ms = match ts {
        None | Some(Raw::Null) => return Err(Reject::MissingTs),
        Some(Raw::IntText { value, .. }) => check_ts(value)?,
        Some(_) => return Err(Reject::TsNotInteger),
    };
    ev.did = match ev.did {
        None | Some(Raw::Null) => return Err(Reject::MissingDeviceId),
        Some(Raw::Span { len: 0, .. } | Raw::Scratch { len: 0, .. }) => return Err(Reject::MissingDeviceId),
        Some(Raw::IntText { start, len, .. } | Raw::BigText { start, len }) => Some(Raw::Span { start, len }),
        Some(d @ (Raw::Span { .. } | Raw::Scratch { .. })) => Some(d),
        Some(_) => return Err(Reject::BadDeviceId),
    };
    Ok(())
}

/// A name of at most 8 bytes as a little-endian word (zero padded).
#[inline]
fn pack(name: &[u8]) -> Option<u64> {
    if name.len() > 8 {
        return None;
    }
    let mut w = [0u8; 8];
    w[..name.len()].copy_from_slice(name);
    Some(u64::from_le_bytes(w))
}

/// Whether the line has bytes below 0x20 or at/above 0x80. A tab is valid
/// only outside strings, so it, too, sends the line to the strict check.
#[inline]
fn scan_special(line: &[u8]) -> (bool, bool) {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let mut ctrl = 0u64;
    let mut high = 0u64;
    let mut chunks = line.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        high |= w & HI;
        // A byte b < 0x20 iff (b - 0x20) borrows into bit 7 while b < 0x80.
        ctrl |= w.wrapping_sub(LO * 0x20) & !w & HI;
    }
    let mut tail_ctrl = false;
    for &b in chunks.remainder() {
        high |= (b & 0x80) as u64;
        tail_ctrl |= b < 0x20;
    }
    let mut has_ctrl = ctrl != 0 || tail_ctrl;
    if has_ctrl {
        // The word trick has false positives next to high bytes.
        has_ctrl = line.iter().any(|&b| b < 0x20);
    }
    (has_ctrl, high != 0)
}

/// Index of the first `"` or `\\` at or after `i`, eight bytes at a time.
#[inline]
fn find_quote_or_backslash(b: &[u8], mut i: usize) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = b.get(i..i + 8) {
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        let q = w ^ (LO * b'"' as u64);
        let s = w ^ (LO * b'\\' as u64);
        // A zero byte in q or s is a match; the lowest flagged byte is exact.
        let m = (q.wrapping_sub(LO) & !q | s.wrapping_sub(LO) & !s) & HI;
        if m != 0 {
            return Some(i + (m.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    b.get(i..)?.iter().position(|&c| c == b'"' || c == b'\\').map(|k| i + k)
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline(always)]
    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }

    #[inline(always)]
    fn ws(&mut self) {
        // Log producers rarely put whitespace between tokens: test once.
        while let Some(b' ' | b'\t' | b'\r' | b'\n') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    #[inline(always)]
    fn expect(&mut self, c: u8) -> Result<(), Reject> {
        if self.next() == Some(c) {
            Ok(())
        } else {
            Err(Reject::InvalidJson)
        }
    }

    /// After an opening quote: advances past the closing quote; returns
    /// whether the string has escapes (validated).
    #[inline(always)]
    fn string_body(&mut self) -> Result<bool, Reject> {
        let mut escaped = false;
        loop {
            let k = find_quote_or_backslash(self.b, self.i).ok_or(Reject::InvalidJson)?;
            self.i = k + 1;
            if self.b[k] == b'"' {
                return Ok(escaped);
            }
            escaped = true;
            match self.next() {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {}
                Some(b'u') => {
                    let hex = self.b.get(self.i..self.i + 4).ok_or(Reject::InvalidJson)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return Err(Reject::InvalidJson);
                    }
                    self.i += 4;
                }
                _ => return Err(Reject::InvalidJson),
            }
        }
    }

    /// Parses a value; when `keep` is false only validates and skips it.
    #[inline(always)]
    fn value(&mut self, ev: &mut EventBuf, keep: bool) -> Result<Raw, Reject> {
        match self.peek() {
            Some(b'"') => {
                self.i += 1;
                let start = self.i;
                let escaped = self.string_body()?;
                let end = self.i - 1;
                if !keep {
                    return Ok(Raw::Null);
                }
                if escaped {
                    let s0 = ev.scratch.len() as u32;
                    unescape_into(&self.b[start..end], &mut ev.scratch)?;
                    Ok(Raw::Scratch { start: s0, len: ev.scratch.len() as u32 - s0 })
                } else {
                    Ok(Raw::Span { start: start as u32, len: (end - start) as u32 })
                }
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true").map(|_| Raw::Other),
            Some(b'f') => self.literal(b"false").map(|_| Raw::Other),
            Some(b'n') => self.literal(b"null").map(|_| Raw::Null),
            Some(b'{' | b'[') => self.skip_nested().map(|_| Raw::Other),
            _ => Err(Reject::InvalidJson),
        }
    }

    #[inline(always)]
    fn literal(&mut self, word: &[u8]) -> Result<(), Reject> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(Reject::InvalidJson)
        }
    }

    /// A JSON number. Integers that fit i64 become `IntText` (so a device
    /// id keeps its text); others become floats.
    #[inline(always)]
    fn number(&mut self) -> Result<Raw, Reject> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let int_start = self.i;
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(Reject::InvalidJson),
        }
        let int_end = self.i;
        let mut is_int = true;
        if self.peek() == Some(b'.') {
            is_int = false;
            self.i += 1;
            self.require_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            is_int = false;
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.require_digits()?;
        }
        let text = &self.b[start..self.i];
        if is_int && start != int_start && text == b"-0" {
            // serde_json reads `-0` as the float -0.0; so do we.
            return Ok(Raw::Float(-0.0));
        }
        if is_int && int_end - int_start <= 18 {
            let mut v: i64 = 0;
            for &d in &self.b[int_start..int_end] {
                v = v * 10 + (d - b'0') as i64;
            }
            let v = if start != int_start { -v } else { v };
            return Ok(Raw::IntText { start: start as u32, len: text.len() as u32, value: v });
        }
        // Long integers (device ids up to u64) keep their text; floats parse.
        let s = std::str::from_utf8(text).map_err(|_| Reject::InvalidJson)?;
        let (start, len) = (start as u32, text.len() as u32);
        if is_int {
            if let Ok(value) = s.parse::<i64>() {
                return Ok(Raw::IntText { start, len, value });
            }
            if s.parse::<u64>().is_ok() {
                return Ok(Raw::BigText { start, len });
            }
        }
        // Like serde_json: out-of-range numbers are errors, not infinities.
        match s.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Raw::Float(f)),
            _ => Err(Reject::InvalidJson),
        }
    }

    #[inline(always)]
    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    fn require_digits(&mut self) -> Result<(), Reject> {
        let s = self.i;
        self.digits();
        if self.i == s {
            Err(Reject::InvalidJson)
        } else {
            Ok(())
        }
    }

    /// Validates and skips an object or array, as strictly as a JSON parser
    /// would, up to [`NESTING_MAX`] levels (the top-level object is one).
    fn skip_nested(&mut self) -> Result<(), Reject> {
        self.skip_value(2)
    }

    fn skip_value(&mut self, depth: usize) -> Result<(), Reject> {
        match self.peek() {
            Some(open @ (b'{' | b'[')) => {
                if depth > NESTING_MAX {
                    return Err(Reject::InvalidJson);
                }
                let close = if open == b'{' { b'}' } else { b']' };
                self.i += 1;
                self.ws();
                if self.peek() == Some(close) {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    if open == b'{' {
                        self.expect(b'"')?;
                        self.string_body()?;
                        self.ws();
                        self.expect(b':')?;
                        self.ws();
                    }
                    self.skip_value(depth + 1)?;
                    self.ws();
                    match self.next() {
                        Some(b',') => continue,
                        Some(c) if c == close => return Ok(()),
                        _ => return Err(Reject::InvalidJson),
                    }
                }
            }
            Some(b'"') => {
                self.i += 1;
                self.string_body().map(|_| ())
            }
            Some(b'-' | b'0'..=b'9') => self.number().map(|_| ()),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            _ => Err(Reject::InvalidJson),
        }
    }
}

/// Resolves JSON escapes (already validated) into `out`.
fn unescape_into(raw: &[u8], out: &mut Vec<u8>) -> Result<(), Reject> {
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        if c != b'\\' {
            out.push(c);
            i += 1;
            continue;
        }
        let e = *raw.get(i + 1).ok_or(Reject::InvalidJson)?;
        i += 2;
        let simple = match e {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let (ch, used) = decode_u_escape(raw, i)?;
                i += used;
                let mut buf = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                continue;
            }
            _ => return Err(Reject::InvalidJson),
        };
        out.push(simple);
    }
    Ok(())
}

/// Decodes the hex of a `\u` escape at `raw[i..]`, joining surrogate pairs.
fn decode_u_escape(raw: &[u8], i: usize) -> Result<(char, usize), Reject> {
    let hex = |at: usize| -> Result<u32, Reject> {
        let h = raw.get(at..at + 4).ok_or(Reject::InvalidJson)?;
        let s = std::str::from_utf8(h).map_err(|_| Reject::InvalidJson)?;
        u32::from_str_radix(s, 16).map_err(|_| Reject::InvalidJson)
    };
    let hi = hex(i)?;
    if (0xD800..0xDC00).contains(&hi) {
        if raw.get(i + 4..i + 6) != Some(b"\\u") {
            return Err(Reject::InvalidJson);
        }
        let lo = hex(i + 6)?;
        if !(0xDC00..0xE000).contains(&lo) {
            return Err(Reject::InvalidJson);
        }
        let c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
        return char::from_u32(c).map(|ch| (ch, 10)).ok_or(Reject::InvalidJson);
    }
    char::from_u32(hi).map(|ch| (ch, 4)).ok_or(Reject::InvalidJson)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::filter::FieldValue;

    fn fields() -> FieldSet {
        FieldSet { ts: "ts".into(), did: "did".into(), slots: vec!["page".into(), "v".into()] }
    }

    fn parse(line: &str) -> Result<(i64, Vec<u8>, String, String), Reject> {
        let mut p = JsonlParser::new(&fields());
        let mut ev = EventBuf::new(2);
        p.parse(line.as_bytes(), &mut ev)?;
        let show = |v: FieldValue| match v {
            FieldValue::Null => "null".to_string(),
            FieldValue::Int(i) => format!("int:{i}"),
            FieldValue::Float(f) => format!("float:{f}"),
            FieldValue::Str(s) => format!("str:{}", String::from_utf8_lossy(s)),
        };
        let b = line.as_bytes();
        Ok((ev.ts_ms, ev.did_bytes(b).to_vec(), show(ev.value(b, 0)), show(ev.value(b, 1))))
    }

    const TS: &str = "1771171200000";

    #[test]
    fn picks_fields_and_skips_others() {
        let line = format!(r#"{{"x":{{"a":[1,{{"b":"}}"}}]}},"did":"d1","ts":{TS},"page":"home","v":7,"z":null}}"#);
        let (ts, did, page, v) = parse(&line).unwrap();
        assert_eq!(ts, 1_771_171_200_000);
        assert_eq!(did, b"d1");
        assert_eq!(page, "str:home");
        assert_eq!(v, "int:7");
    }

    #[test]
    fn integer_and_string_device_ids_share_text() {
        let a = parse(&format!(r#"{{"ts":{TS},"did":123}}"#)).unwrap();
        let b = parse(&format!(r#"{{"ts":{TS},"did":"123"}}"#)).unwrap();
        assert_eq!(a.1, b.1);
        let big = parse(&format!(r#"{{"ts":{TS},"did":18446744073709551615}}"#)).unwrap();
        assert_eq!(big.1, b"18446744073709551615");
    }

    #[test]
    fn integers_past_i64_are_floats_as_values() {
        let (_, _, _, v) = parse(&format!(r#"{{"ts":{TS},"did":1,"v":18446744073709551615}}"#)).unwrap();
        assert_eq!(v, format!("float:{}", 18446744073709551615u64 as f64));
        let (_, _, _, v) = parse(&format!(r#"{{"ts":{TS},"did":1,"v":-9223372036854775808}}"#)).unwrap();
        assert_eq!(v, "int:-9223372036854775808");
    }

    #[test]
    fn escapes_are_resolved() {
        let (_, did, page, _) = parse(&format!(r#"{{"ts":{TS},"did":"a\"b","page":"\u00e9\ud83d\ude00\n"}}"#)).unwrap();
        assert_eq!(did, b"a\"b");
        assert_eq!(page, "str:\u{e9}\u{1F600}\n");
    }

    #[test]
    fn missing_dims_are_null_floats_kept() {
        let (_, _, page, v) = parse(&format!(r#"{{"ts":{TS},"did":1,"v":1.5}}"#)).unwrap();
        assert_eq!((page.as_str(), v.as_str()), ("null", "float:1.5"));
    }

    #[test]
    fn crlf_and_whitespace() {
        assert!(parse(&format!("{{ \"ts\" : {TS} , \"did\" : 1 }}\r")).is_ok());
    }

    #[test]
    fn rejects_with_reasons() {
        let cases: Vec<(String, Reject)> = vec![
            ("".into(), Reject::EmptyLine),
            (format!(r#"{{"ts":{TS},"did":"a"#), Reject::InvalidJson),
            (format!(r#"{{"ts":{TS},"did":1,}}"#), Reject::InvalidJson),
            (format!(r#"{{"ts":{TS},"did":1}} x"#), Reject::InvalidJson),
            ("[1,2]".into(), Reject::NotAnObject),
            ("\"str\"".into(), Reject::NotAnObject),
            ("hello".into(), Reject::InvalidJson),
            (r#"{"did":1}"#.into(), Reject::MissingTs),
            (r#"{"ts":"1771171200000","did":1}"#.into(), Reject::TsNotInteger),
            (r#"{"ts":1771171200000.5,"did":1}"#.into(), Reject::TsNotInteger),
            (r#"{"ts":17,"did":1}"#.into(), Reject::TsOutOfRange),
            (format!(r#"{{"ts":{TS}}}"#), Reject::MissingDeviceId),
            (format!(r#"{{"ts":{TS},"did":null}}"#), Reject::MissingDeviceId),
            (format!(r#"{{"ts":{TS},"did":""}}"#), Reject::MissingDeviceId),
            (format!(r#"{{"ts":{TS},"did":{{"a":1}}}}"#), Reject::BadDeviceId),
            (format!(r#"{{"ts":{TS},"did":1.5}}"#), Reject::BadDeviceId),
            (format!("{{\"ts\":{TS},\"did\":\"a\0b\"}}"), Reject::ControlCharacter),
            (format!(r#"{{"ts":{TS},"did":01}}"#), Reject::InvalidJson),
            (format!(r#"{{"ts":{TS},"did":"\x"}}"#), Reject::InvalidJson),
        ];
        for (line, want) in cases {
            assert_eq!(parse(&line).map(|_| ()), Err(want), "line {line:?}");
        }
        let mut bad_utf8 = format!(r#"{{"ts":{TS},"did":"ab"}}"#).into_bytes();
        bad_utf8[18] = 0xff;
        let mut p = JsonlParser::new(&fields());
        let mut ev = EventBuf::new(2);
        assert_eq!(p.parse(&bad_utf8, &mut ev), Err(Reject::InvalidUtf8));
    }

    #[test]
    fn tab_outside_strings_is_whitespace_but_not_inside() {
        assert!(parse(&format!("{{\"ts\":\t{TS},\"did\":1}}")).is_ok());
        assert_eq!(parse(&format!("{{\"ts\":{TS},\"did\":\"a\tb\"}}")).map(|_| ()), Err(Reject::ControlCharacter));
    }

    #[test]
    fn last_duplicate_key_wins() {
        let (_, did, _, _) = parse(&format!(r#"{{"ts":{TS},"did":"a","did":"b"}}"#)).unwrap();
        assert_eq!(did, b"b");
    }

    proptest::proptest! {
        // Cheap cases: enough of them that lines without a backslash cross
        // the 32- and 64-byte boundaries of the marks many times.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// The fast path, when it answers, agrees with the general scanner.
        #[test]
        fn fast_path_agrees_with_general(
            members in proptest::collection::vec((0usize..5, 0usize..8), 0..7),
            ws in proptest::bool::ANY,
            cut in 0usize..4,
        ) {
            let keys = ["ts", "did", "page", "v", "x\\\"y"];
            let values = ["1771171200000", "\"d1\"", "-12", "null", "1.5", "\"a\\\"b\"", "[1,{\"a\":2}]", "007"];
            let sep = if ws { " , " } else { "," };
            let body: Vec<String> = members.iter().map(|(k, v)| format!("\"{}\":{}", keys[*k], values[*v])).collect();
            let mut line = format!("{{{}}}", body.join(sep));
            line.truncate(line.len() - cut.min(line.len()));
            let mut p = JsonlParser::new(&fields());
            let line = line.as_bytes();
            let mut b = EventBuf::new(2);
            let ts_general = p.general(line, &mut b);
            // Word at a time, and from the marks where the CPU can mark.
            let mut a = EventBuf::new(2);
            let words = p.fast(line, &mut a, |i| find_quote_or_backslash(line, i));
            if let Some(ts_fast) = words {
                proptest::prop_assert_eq!(Ok(ts_fast), ts_general);
                proptest::prop_assert_eq!(a.did, b.did);
                proptest::prop_assert_eq!(&a.values, &b.values);
            }
            let marked = p.mark(line);
            let mut c = EventBuf::new(2);
            let from_marks = p.fast_any(line, marked, &mut c);
            proptest::prop_assert_eq!(from_marks, words);
            if from_marks.is_some() {
                proptest::prop_assert_eq!(c.did, a.did);
                proptest::prop_assert_eq!(&c.values, &a.values);
            }
        }
    }

    #[test]
    fn lines_of_any_length_around_the_marked_limit() {
        // Strings that end on either side of 32- and 64-byte boundaries,
        // in lines shorter and longer than the marking pass takes.
        let head = format!(r#"{{"ts":{TS},"did":"d","page":""#);
        for len in (0..70).chain(MARKED_BYTES - 40..MARKED_BYTES + 40).chain([1000, 5000]) {
            let page = "p".repeat(len.saturating_sub(head.len() + 9));
            let line = format!(r#"{head}{page}","v":-3}}"#);
            // The fast path answers, and finds the same strings by the
            // marks as by searching.
            let mut p = JsonlParser::new(&fields());
            let mut ev = EventBuf::new(2);
            let b = line.as_bytes();
            let words = p.fast(b, &mut ev, |i| find_quote_or_backslash(b, i));
            assert!(words.is_some(), "{line}");
            let marked = p.mark(b);
            assert_eq!(p.fast_any(b, marked, &mut ev), words, "{line}");
            let (ts, did, got, v) = parse(&line).unwrap_or_else(|e| panic!("{line}: {e:?}"));
            assert_eq!(
                (ts, did.as_slice(), got, v),
                (1_771_171_200_000, b"d".as_slice(), format!("str:{page}"), "int:-3".into())
            );
            let bad = line.replacen(r#""page":""#, "\"page\":\"\t", 1);
            assert_eq!(parse(&bad), Err(Reject::ControlCharacter), "{bad}");
            let cut = &line[..line.len() - 1];
            assert_eq!(parse(cut), Err(Reject::InvalidJson), "{cut}");
        }
    }

    #[test]
    fn no_quote_past_the_end_of_a_shorter_line() {
        let mut p = JsonlParser::new(&fields());
        let long = format!(r#"{{"ts":{TS},"did":"d","page":"{}"}}"#, "p".repeat(100));
        if !p.mark(long.as_bytes()) {
            return; // no AVX2: lines are not marked
        }
        assert_eq!(p.marks.next_quote(130), Some(long.len() - 2));
        assert!(p.mark(br#"{"ts":1}"#));
        assert_eq!(p.marks.next_quote(2), Some(4));
        assert_eq!(p.marks.next_quote(130), None, "a quote of the line before");
    }

    #[test]
    fn non_ascii_values_pass() {
        let (_, _, page, _) = parse(&format!(r#"{{"ts":{TS},"did":1,"page":"首页"}}"#)).unwrap();
        assert_eq!(page, "str:首页");
    }
}

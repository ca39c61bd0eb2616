//! Group keys: the values of a metric's `group_by` fields, interned into
//! dense ids shared by every router, shard and the emitter.
//!
//! A router hashes a key's values in place and looks the hash up in its
//! own cache; only a key it has never seen is fingerprinted (xxh3 over a
//! tagged encoding) and takes the dictionary's lock, once per router. The
//! dictionary keeps the key's `dims` object rendered as JSON, which is all
//! the emitter needs.

use std::sync::Mutex;

use ahash::AHashMap;

use crate::dim::Prehashed;
use crate::job::filter::FieldValue;

/// Bits of a record's key word that hold the key id; the rest hold the
/// metric index.
pub const KEY_BITS: u32 = 26;
/// Most distinct group keys per metric.
pub const KEYS_MAX: u32 = 1 << KEY_BITS;

/// Appends the tagged encoding of one value to `out` (for fingerprints).
#[inline]
pub fn encode_value(v: FieldValue, out: &mut Vec<u8>) {
    match v {
        FieldValue::Null => out.push(b'n'),
        FieldValue::Int(i) => {
            out.push(b'i');
            out.extend_from_slice(&i.to_le_bytes());
        }
        FieldValue::Float(f) => {
            out.push(b'f');
            out.extend_from_slice(&key_float(f).to_bits().to_le_bytes());
        }
        FieldValue::Str(s) => {
            out.push(b's');
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s);
        }
    }
}

/// A float as a key value: -0.0 and 0.0 are one value, as in SQL.
#[inline]
fn key_float(f: f64) -> f64 {
    if f == 0.0 {
        0.0
    } else {
        f
    }
}

/// Renders a `dims` object: `{"page":"home","app_ver":7,"x":null}`.
pub fn render_dims(names: &[String], values: &[FieldValue]) -> String {
    let mut out = Vec::from(b"{".as_slice());
    for (i, (n, v)) in names.iter().zip(values).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(n.as_bytes(), &mut out);
        out.push(b':');
        write_json_value(*v, &mut out);
    }
    out.push(b'}');
    String::from_utf8(out).expect("JSON text is UTF-8")
}

/// Appends a value as JSON: text as a string (invalid UTF-8 replaced),
/// numbers as numbers (`-0` as `0`), `null`.
#[inline]
pub fn write_json_value(v: FieldValue, out: &mut Vec<u8>) {
    match v {
        FieldValue::Null => out.extend_from_slice(b"null"),
        FieldValue::Int(x) => out.extend_from_slice(itoa::Buffer::new().format(x).as_bytes()),
        FieldValue::Float(f) if f.is_finite() => {
            // Render -0.0 and 0.0, one key, one way, whichever came first.
            out.extend_from_slice(serde_json::to_string(&key_float(f)).unwrap_or_else(|_| "null".into()).as_bytes())
        }
        FieldValue::Float(_) => out.extend_from_slice(b"null"),
        FieldValue::Str(s) => write_json_str(s, out),
    }
}

/// Appends text as a JSON string.
#[inline]
pub fn write_json_str(s: &[u8], out: &mut Vec<u8>) {
    if s.iter().all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s);
        out.push(b'"');
    } else {
        let text = serde_json::to_string(&String::from_utf8_lossy(s)).expect("a string renders as JSON");
        out.extend_from_slice(text.as_bytes());
    }
}

/// The shared dictionary of one metric's group keys.
#[derive(Default)]
pub struct KeyDict {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    ids: AHashMap<u64, u32>,
    /// Per id: the key's fingerprint and rendered dims.
    fps: Vec<u64>,
    dims_json: Vec<String>,
}

/// A key dictionary that is full (more than [`KEYS_MAX`] keys).
#[derive(Debug, thiserror::Error)]
#[error("more than {KEYS_MAX} distinct group keys in one metric")]
pub struct TooManyKeys;

impl KeyDict {
    /// Id of the key with fingerprint `fp`, registering it (with its
    /// rendered dims) if new.
    pub fn intern(&self, fp: u64, render: impl FnOnce() -> String) -> Result<u32, TooManyKeys> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&id) = g.ids.get(&fp) {
            return Ok(id);
        }
        let id = g.dims_json.len() as u32;
        if id >= KEYS_MAX {
            return Err(TooManyKeys);
        }
        g.dims_json.push(render());
        g.fps.push(fp);
        g.ids.insert(fp, id);
        Ok(id)
    }

    /// Keys with ids `from..`, in id order: (fingerprint, rendered dims).
    pub fn entries_from(&self, from: usize) -> Vec<(u64, String)> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let from = from.min(g.fps.len());
        g.fps[from..].iter().copied().zip(g.dims_json[from..].iter().cloned()).collect()
    }

    /// Number of keys interned.
    pub fn count(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).fps.len()
    }

    /// A dictionary holding these keys with ids in order (from a
    /// checkpoint); false if a fingerprint repeats.
    pub fn from_entries(entries: impl IntoIterator<Item = (u64, String)>) -> Option<KeyDict> {
        let mut inner = Inner::default();
        for (fp, dims) in entries {
            let id = inner.fps.len() as u32;
            if inner.ids.insert(fp, id).is_some() {
                return None;
            }
            inner.fps.push(fp);
            inner.dims_json.push(dims);
        }
        Some(KeyDict { inner: Mutex::new(inner) })
    }

    /// Appends the rendered dims of keys `out.len()..` to `out`.
    pub fn catch_up(&self, out: &mut Vec<String>) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(g.dims_json[out.len().min(g.dims_json.len())..].iter().cloned());
    }
}

/// Single-integer keys below this use a direct table instead of a hash map.
const SMALL_INT_KEYS: usize = 1 << 16;
const NO_ID: u32 = u32::MAX;

/// Key ids by [`values_hash`], a hash already.
type FpMap = std::collections::HashMap<u64, u32, std::hash::BuildHasherDefault<Prehashed>>;

/// A router's cache in front of the dictionaries, one map per metric.
pub struct KeyCache {
    maps: Vec<FpMap>,
    /// Per metric, the id of the empty key (a metric without group-by).
    empty: Vec<u32>,
    /// Per metric, key ids of single small non-negative integer keys.
    small: Vec<Vec<u32>>,
    scratch: Vec<u8>,
}

impl KeyCache {
    pub fn new(metrics: usize) -> KeyCache {
        KeyCache {
            maps: (0..metrics).map(|_| FpMap::default()).collect(),
            empty: vec![NO_ID; metrics],
            small: vec![Vec::new(); metrics],
            scratch: Vec::with_capacity(128),
        }
    }

    /// The key id for these values of metric `m`'s group-by fields.
    #[inline]
    pub fn id<'a>(
        &mut self,
        m: usize,
        dict: &KeyDict,
        names: &[String],
        mut values: impl Iterator<Item = FieldValue<'a>> + Clone,
    ) -> Result<u32, TooManyKeys> {
        if names.is_empty() {
            if self.empty[m] == NO_ID {
                self.empty[m] = self.hashed(m, dict, names, values)?;
            }
            return Ok(self.empty[m]);
        }
        if names.len() > 1 {
            return self.hashed(m, dict, names, values);
        }
        // One field: its value is read once (reading it is not free: a
        // joined field is a span into the dimension's row).
        let value = values.next().unwrap_or(FieldValue::Null);
        let FieldValue::Int(v) = value else {
            return self.hashed(m, dict, names, std::iter::once(value));
        };
        // One small integer dimension (binary codes, versions): a direct
        // table (a negative value casts past its end).
        if let Some(id) = self.small[m].get(v as usize).copied().filter(|&id| id != NO_ID) {
            return Ok(id);
        }
        let id = self.hashed(m, dict, names, std::iter::once(value))?;
        if (0..SMALL_INT_KEYS as i64).contains(&v) {
            let table = &mut self.small[m];
            if table.len() <= v as usize {
                table.resize(v as usize + 1, NO_ID);
            }
            table[v as usize] = id;
        }
        Ok(id)
    }

    fn hashed<'a>(
        &mut self,
        m: usize,
        dict: &KeyDict,
        names: &[String],
        values: impl Iterator<Item = FieldValue<'a>> + Clone,
    ) -> Result<u32, TooManyKeys> {
        let h = values_hash(values.clone());
        if let Some(&id) = self.maps[m].get(&h) {
            return Ok(id);
        }
        self.scratch.clear();
        for v in values.clone() {
            encode_value(v, &mut self.scratch);
        }
        let fp = xxhash_rust::xxh3::xxh3_64(&self.scratch);
        let id = dict.intern(fp, || render_dims(names, &values.collect::<Vec<_>>()))?;
        self.maps[m].insert(h, id);
        Ok(id)
    }
}

/// A router's own 64-bit hash of a key's values, for its cache: each value
/// hashed where it lies (xxh3 seeded by the hash so far and the value's
/// type), not first encoded into a buffer as the dictionary's fingerprint
/// is. Hashing that buffer right after writing it stalled on store
/// forwarding (the hash's 8-byte loads span the encoding's smaller
/// stores): 29% of the cache's samples in the live scenario's summary job.
/// Like the fingerprint, exact up to 64-bit collisions; it never leaves
/// the process, so it may change between versions.
#[inline]
fn values_hash<'a>(values: impl Iterator<Item = FieldValue<'a>>) -> u64 {
    use xxhash_rust::xxh3::xxh3_64_with_seed;
    const NULL: u64 = 0x9E37_79B9_7F4A_7C15;
    const INT: u64 = 0xBF58_476D_1CE4_E5B9;
    const FLOAT: u64 = 0x94D0_49BB_1331_11EB;
    const STR: u64 = 0xD6E8_FEB8_6659_FD93;
    let mut h = 0;
    for v in values {
        h = match v {
            FieldValue::Null => xxh3_64_with_seed(&[], h ^ NULL),
            FieldValue::Int(i) => xxh3_64_with_seed(&i.to_le_bytes(), h ^ INT),
            FieldValue::Float(f) => xxh3_64_with_seed(&key_float(f).to_bits().to_le_bytes(), h ^ FLOAT),
            FieldValue::Str(s) => xxh3_64_with_seed(s, h ^ STR),
        };
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_render_as_json_with_types() {
        let names = ["page".to_string(), "v".to_string(), "x".to_string()];
        let s = render_dims(&names, &[FieldValue::Str(b"h\"o"), FieldValue::Int(7), FieldValue::Null]);
        assert_eq!(s, r#"{"page":"h\"o","v":7,"x":null}"#);
    }

    #[test]
    fn negative_zero_renders_as_zero() {
        let names = ["v".to_string()];
        assert_eq!(render_dims(&names, &[FieldValue::Float(-0.0)]), r#"{"v":0.0}"#);
    }

    #[test]
    fn int_and_string_are_different_keys() {
        let dict = KeyDict::default();
        let mut cache = KeyCache::new(1);
        let names = ["v".to_string()];
        let a = cache.id(0, &dict, &names, [FieldValue::Int(7)].into_iter()).unwrap();
        let b = cache.id(0, &dict, &names, [FieldValue::Str(b"7")].into_iter()).unwrap();
        let c = cache.id(0, &dict, &names, [FieldValue::Int(7)].into_iter()).unwrap();
        assert_ne!(a, b);
        assert_eq!(a, c);
        let mut other = KeyCache::new(1);
        assert_eq!(other.id(0, &dict, &names, [FieldValue::Str(b"7")].into_iter()).unwrap(), b);
        let mut dims = Vec::new();
        dict.catch_up(&mut dims);
        assert_eq!(dims, [r#"{"v":7}"#, r#"{"v":"7"}"#]);
    }

    #[test]
    fn keys_that_differ_only_in_boundaries_or_types_stay_apart() {
        use FieldValue::*;
        let keys: [[FieldValue; 2]; 10] = [
            [Str(b"ab"), Str(b"c")],
            [Str(b"a"), Str(b"bc")],
            [Null, Str(b"")],
            [Str(b""), Null],
            [Int(0), Null],
            [Float(0.0), Null],
            [Str(&[0; 8]), Null],
            [Int(1), Int(2)],
            [Int(2), Int(1)],
            [Null, Null],
        ];
        let names = ["a".to_string(), "b".to_string()];
        let dict = KeyDict::default();
        let (mut one, mut other) = (KeyCache::new(1), KeyCache::new(1));
        let ids: Vec<u32> = keys.iter().map(|k| one.id(0, &dict, &names, k.iter().copied()).unwrap()).collect();
        assert_eq!(ids, (0..keys.len() as u32).collect::<Vec<_>>(), "every key is a new one");
        // Another router, keys in the other order: the dictionary's ids.
        for (k, &id) in keys.iter().zip(&ids).rev() {
            assert_eq!(other.id(0, &dict, &names, k.iter().copied()).unwrap(), id);
        }
        // -0.0 is 0.0, in the cache as in the dictionary.
        assert_eq!(one.id(0, &dict, &names, [Float(-0.0), Null].into_iter()).unwrap(), ids[5]);
        assert_eq!(dict.count(), keys.len());
    }
}

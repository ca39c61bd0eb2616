//! A dimension whose rows are Redis hashes (`kind = "redis"`), looked up
//! when the caches miss: the hash `{key_prefix}{key text}`, one hash field
//! per dimension field. Values are read like CSV cells (empty is `null`, a
//! canonical integer a number, anything else text); a key Redis does not
//! hold is missing (`on_missing` applies), and so is a key that holds no
//! hash (counted as `not_hashes`).
//!
//! Lookups go through two caches, both bounded by entries, bytes and age
//! (`cache_ttl`: a row, or a key found missing, older than that is asked
//! again, so a lookup sees Redis as it was at most that long ago: Flink's
//! lookup join with a cache):
//!
//! - each worker's own cache ([`Lookup`]), read without locks on every
//!   event: two-way set associative, `local_cache_entries` slots;
//! - one cache shared by the workers ([`RedisDim`]), in 16 locked shards
//!   with second-chance (CLOCK) eviction, looked up on a worker miss (the
//!   worker's cache then takes the row).
//!
//! An event whose key neither cache holds waits, with the others of its
//! block that missed; at the block's end the worker asks Redis for every
//! distinct missing key at once ([`FETCH_KEYS_MAX`] keys per round trip, a
//! Lua script doing `HMGET` per key) and routes the waiting events. Redis
//! away or slow: the worker reconnects and asks again with growing pauses,
//! saying so on stderr and counting retries; no event goes on unjoined.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ahash::AHashMap;

use super::csv_cell;
use crate::job::filter::FieldValue;
use crate::job::DimensionSpec;
use crate::runtime::stats::DimCount;
use crate::sink::redis::{transient, BACKOFF_MAX, BACKOFF_MIN, LOG_EVERY, REPLY_TIMEOUT};

/// Keys asked per round trip.
pub const FETCH_KEYS_MAX: usize = 1024;
/// Shards of the shared cache (a power of two).
const SHARDS: usize = 16;
/// Bytes a cached row costs beyond its text (entry, map slot, clock slot).
const ROW_OVERHEAD: usize = 96;

/// Per key: `0` if Redis lacks it, `1` if it holds no hash, else the
/// fields (`HMGET`). KEYS: the hashes; ARGV: the fields.
const LOOKUP: &str = r"
local out = {}
for i, k in ipairs(KEYS) do
  local t = redis.call('TYPE', k)['ok']
  if t == 'hash' then
    out[i] = redis.call('HMGET', k, unpack(ARGV))
  elseif t == 'none' then
    out[i] = 0
  else
    out[i] = 1
  end
end
return out
";

/// One value of a row: text of up to 14 bytes in the cell itself (a
/// lookup touches one allocation less), longer text boxed.
#[derive(Debug)]
enum Cell {
    Null,
    Int(i64),
    Inline { len: u8, bytes: [u8; 14] },
    Str(Box<[u8]>),
}

/// A row as Redis gave it, or the news that it has none.
#[derive(Debug)]
pub struct RemoteRow {
    /// `None`: Redis lacks the key.
    cells: Option<Box<[Cell]>>,
    /// When it was read (ms on the dimension's clock).
    fetched_ms: u64,
    bytes: usize,
    /// Looked up in the shared cache since the clock hand last passed.
    referenced: AtomicBool,
}

impl RemoteRow {
    fn new(cells: Option<Vec<Option<Vec<u8>>>>, fetched_ms: u64) -> RemoteRow {
        let mut bytes = ROW_OVERHEAD;
        let cells = cells.map(|values| {
            values
                .into_iter()
                .map(|v| match v {
                    None => Cell::Null,
                    Some(v) => match csv_cell(&v) {
                        FieldValue::Null => Cell::Null,
                        FieldValue::Int(i) => Cell::Int(i),
                        _ if v.len() <= 14 => {
                            let mut inline = [0; 14];
                            inline[..v.len()].copy_from_slice(&v);
                            Cell::Inline { len: v.len() as u8, bytes: inline }
                        }
                        _ => {
                            bytes += v.len();
                            Cell::Str(v.into_boxed_slice())
                        }
                    },
                })
                .collect()
        });
        bytes += cells.as_deref().map_or(0, std::mem::size_of_val::<[Cell]>);
        RemoteRow { cells, fetched_ms, bytes, referenced: AtomicBool::new(false) }
    }

    #[inline]
    pub fn found(&self) -> bool {
        self.cells.is_some()
    }

    /// Field `f` (`null` when the key is missing).
    #[inline]
    pub fn value(&self, f: usize) -> FieldValue<'_> {
        match self.cells.as_ref().map(|c| &c[f]) {
            None | Some(Cell::Null) => FieldValue::Null,
            Some(Cell::Int(i)) => FieldValue::Int(*i),
            Some(Cell::Inline { len, bytes }) => FieldValue::Str(&bytes[..*len as usize]),
            Some(Cell::Str(s)) => FieldValue::Str(s),
        }
    }
}

type Row = Arc<RemoteRow>;

#[derive(Default)]
struct CacheShard {
    rows: AHashMap<u64, Row>,
    /// Fingerprints in the order the clock hand meets them.
    clock: VecDeque<u64>,
    bytes: usize,
}

/// A Redis dimension as the workers share it: where it lives and the
/// shared cache.
pub struct RedisDim {
    name: String,
    client: redis::Client,
    prefix: String,
    fields: Vec<String>,
    ttl_ms: u64,
    local_entries: usize,
    local_bytes: usize,
    shard_entries: usize,
    shard_bytes: usize,
    shards: Box<[Mutex<CacheShard>]>,
    epoch: Instant,
}

impl RedisDim {
    /// Checks that Redis answers (a dimension that cannot be read now is
    /// refused before anything runs).
    pub fn open(spec: &DimensionSpec) -> Result<RedisDim, String> {
        let r = spec.redis.as_ref().ok_or("not a Redis dimension")?;
        let client = redis::Client::open(r.url.as_str()).map_err(|e| format!("{}: not a Redis URL: {e}", r.url))?;
        let mut conn = connect(&client).map_err(|e| format!("{}: cannot connect ({e}); is it running?", r.url))?;
        redis::cmd("PING").query::<()>(&mut conn).map_err(|e| format!("{}: no answer to PING: {e}", r.url))?;
        Ok(RedisDim {
            name: spec.name.clone(),
            client,
            prefix: r.key_prefix.clone(),
            fields: spec.fields.clone(),
            ttl_ms: r.cache_ttl_ms as u64,
            local_entries: r.local_cache_entries.next_power_of_two().max(2),
            local_bytes: r.cache_bytes as usize,
            shard_entries: r.cache_entries.div_ceil(SHARDS),
            shard_bytes: (r.cache_bytes as usize).div_ceil(SHARDS),
            shards: (0..SHARDS).map(|_| Mutex::new(CacheShard::default())).collect(),
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn fresh(&self, row: &RemoteRow, now_ms: u64) -> bool {
        now_ms.saturating_sub(row.fetched_ms) < self.ttl_ms
    }

    fn shard(&self, fp: u64) -> std::sync::MutexGuard<'_, CacheShard> {
        self.shards[(fp >> 60) as usize % SHARDS].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get_shared(&self, fp: u64, now_ms: u64) -> Option<Row> {
        let shard = self.shard(fp);
        let row = shard.rows.get(&fp).filter(|r| self.fresh(r, now_ms))?;
        row.referenced.store(true, Ordering::Relaxed);
        Some(row.clone())
    }

    fn put_shared(&self, fp: u64, row: Row) {
        let mut shard = self.shard(fp);
        let s = &mut *shard;
        s.bytes += row.bytes;
        match s.rows.insert(fp, row) {
            Some(old) => s.bytes -= old.bytes,
            None => s.clock.push_back(fp),
        }
        // Second chance: a row looked up since the hand last passed stays.
        let mut turns = 2 * s.clock.len();
        while (s.rows.len() > self.shard_entries || s.bytes > self.shard_bytes) && turns > 0 {
            turns -= 1;
            let Some(victim) = s.clock.pop_front() else { break };
            let Some(r) = s.rows.get(&victim) else { continue };
            if r.referenced.swap(false, Ordering::Relaxed) {
                s.clock.push_back(victim);
                continue;
            }
            let r = s.rows.remove(&victim).expect("looked up above");
            s.bytes -= r.bytes;
        }
    }

    /// Rows in the shared cache now.
    pub fn cached(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).rows.len()).sum()
    }
}

fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let conn = client.get_connection_with_timeout(REPLY_TIMEOUT)?;
    conn.set_read_timeout(Some(REPLY_TIMEOUT))?;
    conn.set_write_timeout(Some(REPLY_TIMEOUT))?;
    Ok(conn)
}

/// One worker's side of a Redis dimension: its cache, its connection, the
/// keys its block waits for and their answers.
pub struct Lookup {
    dim: Arc<RedisDim>,
    /// Two-way set associative: slots `2i` and `2i + 1` hold the rows of
    /// the fingerprints `fp & mask` maps to `2i`.
    local: Vec<Option<(u64, Row)>>,
    local_bytes: usize,
    conn: Option<redis::Connection>,
    /// Keys no cache held, by fingerprint.
    wanted: AHashMap<u64, Box<[u8]>>,
    /// The rows fetched for the current block's waiting events.
    answered: AHashMap<u64, Row>,
    now_ms: u64,
    logged: Option<Instant>,
}

impl Lookup {
    pub fn new(dim: Arc<RedisDim>) -> Lookup {
        Lookup {
            local: vec![None; dim.local_entries],
            local_bytes: 0,
            conn: None,
            wanted: AHashMap::new(),
            answered: AHashMap::new(),
            now_ms: dim.now_ms(),
            logged: None,
            dim,
        }
    }

    /// Reads the clock (once per block: rows age by blocks).
    pub fn tick(&mut self) {
        self.now_ms = self.dim.now_ms();
    }

    /// The row of fingerprint `fp` if this worker holds it fresh (or it was
    /// fetched for this block).
    #[inline]
    pub fn get(&self, fp: u64) -> Option<&RemoteRow> {
        self.local_row(fp).or_else(|| self.answered.get(&fp)).map(|r| &**r)
    }

    /// The row of `fp` in this worker's cache, if fresh.
    #[inline]
    fn local_row(&self, fp: u64) -> Option<&Row> {
        let i = (fp as usize & (self.local.len() - 1)) & !1;
        self.local[i..i + 2].iter().flatten().find(|(h, r)| *h == fp && self.dim.fresh(r, self.now_ms)).map(|(_, r)| r)
    }

    /// Notes a key to fetch before the block ends.
    pub fn want(&mut self, fp: u64, key: &[u8]) {
        self.wanted.entry(fp).or_insert_with(|| key.into());
    }

    /// Takes a row into this worker's cache. Over its bytes, the cache
    /// starts empty again (rows are small and few are that large).
    fn keep(&mut self, fp: u64, row: Row) {
        let i = (fp as usize & (self.local.len() - 1)) & !1;
        // The way holding the same key, else an empty one, else the older.
        let way = (0..2)
            .find(|&w| self.local[i + w].as_ref().is_some_and(|(h, _)| *h == fp))
            .or_else(|| (0..2).find(|&w| self.local[i + w].is_none()))
            .unwrap_or_else(|| {
                let age = |w: usize| self.local[i + w].as_ref().map_or(0, |(_, r)| r.fetched_ms);
                usize::from(age(1) < age(0))
            });
        if let Some((_, old)) = self.local[i + way].take() {
            self.local_bytes -= old.bytes;
        }
        if self.local_bytes + row.bytes > self.dim.local_bytes {
            self.local.iter_mut().for_each(|slot| *slot = None);
            self.local_bytes = 0;
        }
        self.local_bytes += row.bytes;
        self.local[i + way] = Some((fp, row));
    }

    /// Whether this worker can join key `fp` now: its cache holds it, or
    /// the shared one does (then this worker's cache takes it).
    #[inline]
    pub fn ready(&mut self, fp: u64, count: &mut DimCount) -> bool {
        if self.get(fp).is_some() {
            return true;
        }
        match self.dim.get_shared(fp, self.now_ms) {
            Some(row) => {
                count.shared_hits += 1;
                self.keep(fp, row);
                true
            }
            None => false,
        }
    }

    /// Whether keys wait for a fetch.
    pub fn waiting(&self) -> bool {
        !self.wanted.is_empty()
    }

    /// Finds every wanted key: in this worker's cache, in the shared one,
    /// else from Redis in batches. Waits out Redis failures (returns an
    /// error only when `abort` is set, or Redis refuses the lookup itself).
    pub fn fetch(&mut self, abort: &AtomicBool, count: &mut DimCount) -> io::Result<()> {
        let mut ask = Vec::new();
        for (fp, key) in std::mem::take(&mut self.wanted) {
            if let Some(row) = self.local_row(fp).cloned() {
                self.answered.insert(fp, row);
                continue;
            }
            match self.dim.get_shared(fp, self.now_ms) {
                Some(row) => {
                    count.shared_hits += 1;
                    self.keep(fp, row.clone());
                    self.answered.insert(fp, row);
                }
                None => ask.push((fp, key)),
            }
        }
        for batch in ask.chunks(FETCH_KEYS_MAX) {
            let replies = self.ask(batch, abort, count)?;
            let now_ms = self.dim.now_ms();
            for ((fp, _), reply) in batch.iter().zip(replies) {
                let cells = match reply {
                    redis::Value::Array(values) => Some(
                        values
                            .into_iter()
                            .map(|v| match v {
                                redis::Value::BulkString(b) => Some(b),
                                redis::Value::SimpleString(s) => Some(s.into_bytes()),
                                redis::Value::Int(i) => Some(i.to_string().into_bytes()),
                                _ => None,
                            })
                            .collect(),
                    ),
                    redis::Value::Int(1) => {
                        count.not_hashes += 1;
                        None
                    }
                    _ => None,
                };
                let row = Arc::new(RemoteRow::new(cells, now_ms));
                self.dim.put_shared(*fp, row.clone());
                self.keep(*fp, row.clone());
                self.answered.insert(*fp, row);
            }
            count.fetched += batch.len() as u64;
        }
        Ok(())
    }

    /// One round trip for `batch`, repeated until Redis answers.
    fn ask(
        &mut self,
        batch: &[(u64, Box<[u8]>)],
        abort: &AtomicBool,
        count: &mut DimCount,
    ) -> io::Result<Vec<redis::Value>> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LOOKUP).arg(batch.len());
        let mut key = Vec::new();
        for (_, k) in batch {
            key.clear();
            key.extend_from_slice(self.dim.prefix.as_bytes());
            key.extend_from_slice(k);
            cmd.arg(&key[..]);
        }
        for f in &self.dim.fields {
            cmd.arg(f);
        }
        let mut backoff = BACKOFF_MIN;
        loop {
            count.round_trips += 1;
            let result = match &mut self.conn {
                Some(c) => cmd.query::<Vec<redis::Value>>(c),
                None => connect(&self.dim.client).and_then(|mut c| {
                    let r = cmd.query::<Vec<redis::Value>>(&mut c);
                    self.conn = Some(c);
                    r
                }),
            };
            match result {
                Ok(v) if v.len() == batch.len() => return Ok(v),
                Ok(v) => {
                    let why = format!("Redis answered {} rows for {} keys", v.len(), batch.len());
                    return Err(io::Error::other(format!("dimension {:?}: {why}", self.dim.name)));
                }
                Err(e) if !transient(&e) => {
                    let why = format!("dimension {:?}: Redis refused the lookup: {e}", self.dim.name);
                    return Err(io::Error::other(why));
                }
                Err(e) => {
                    // A half-read reply would poison the connection.
                    self.conn = None;
                    count.retries += 1;
                    if abort.load(Ordering::Relaxed) {
                        return Err(io::Error::other(format!("dimension {:?}: {e}", self.dim.name)));
                    }
                    if self.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                        self.logged = Some(Instant::now());
                        eprintln!(
                            "tally: dimension {:?}: {e}; asking again for {} keys in {backoff:?} ({} retries so far)",
                            self.dim.name,
                            batch.len(),
                            count.retries
                        );
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Forgets the block's answers (its waiting events are routed).
    pub fn end_block(&mut self) {
        self.answered.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dim(entries: usize, bytes: u64, ttl_ms: u64) -> RedisDim {
        RedisDim {
            name: "user".into(),
            client: redis::Client::open("redis://127.0.0.1:1").unwrap(),
            prefix: "user:".into(),
            fields: vec!["tier".into()],
            ttl_ms,
            local_entries: 4,
            local_bytes: bytes as usize,
            shard_entries: entries.div_ceil(SHARDS),
            shard_bytes: (bytes as usize).div_ceil(SHARDS),
            shards: (0..SHARDS).map(|_| Mutex::new(CacheShard::default())).collect(),
            epoch: Instant::now(),
        }
    }

    fn row(tier: &str, at: u64) -> Row {
        Arc::new(RemoteRow::new(Some(vec![Some(tier.as_bytes().to_vec())]), at))
    }

    #[test]
    fn values_read_like_csv_cells_and_a_missing_key_has_none() {
        let long = b"a tier with a long name".to_vec();
        let cells = vec![Some(b"gold".to_vec()), Some(b"7".to_vec()), Some(Vec::new()), None, Some(long.clone())];
        let r = RemoteRow::new(Some(cells), 0);
        assert_eq!(
            (0..5).map(|f| r.value(f)).collect::<Vec<_>>(),
            [FieldValue::Str(b"gold"), FieldValue::Int(7), FieldValue::Null, FieldValue::Null, FieldValue::Str(&long)]
        );
        let missing = RemoteRow::new(None, 0);
        assert!(!missing.found() && missing.value(0) == FieldValue::Null);
    }

    #[test]
    fn the_shared_cache_keeps_to_its_entries_and_gives_referenced_rows_a_second_chance() {
        // 16 entries: one per shard.
        let d = dim(16, 1 << 20, 60_000);
        let (a, b) = (1u64 << 60 | 1, 1u64 << 60 | 2); // the same shard
        d.put_shared(a, row("gold", 0));
        assert!(d.get_shared(a, 0).is_some());
        d.put_shared(b, row("silver", 0));
        assert!(d.get_shared(b, 0).is_none(), "a was referenced: b goes, not a");
        d.put_shared(b, row("silver", 0));
        assert!(d.get_shared(b, 0).is_some() && d.get_shared(a, 0).is_none(), "a's second chance is used up");
        assert_eq!(d.cached(), 1);
    }

    #[test]
    fn the_shared_cache_keeps_to_its_bytes_and_rows_expire() {
        let d = dim(1_000, (SHARDS * (ROW_OVERHEAD + 64)) as u64, 1_000);
        for i in 0..10u64 {
            d.put_shared(i, row("platinum", 0));
        }
        assert_eq!(d.cached(), 1, "one row fits the shard's bytes");
        assert!(d.get_shared(9, 999).is_some());
        assert!(d.get_shared(9, 1_000).is_none(), "older than the TTL");
    }

    #[test]
    fn a_worker_keeps_two_rows_per_set_and_its_block_answers() {
        let mut l = Lookup::new(Arc::new(dim(100, 1 << 20, 60_000)));
        // Fingerprints 0, 8 and 16 share set 0 (4 slots, mask 3).
        for fp in [0u64, 8, 16] {
            l.keep(fp, row("gold", fp));
        }
        l.now_ms = 20;
        assert!(l.get(0).is_none(), "the oldest of the set was replaced");
        l.answered.insert(0, row("gold", 0));
        assert!(l.get(0).is_some(), "answered in this block");
        l.end_block();
        assert!(l.get(0).is_none());
        assert!(l.get(8).is_some() && l.get(16).is_some());
        l.now_ms = 60_008;
        assert!(l.get(8).is_none() && l.get(16).is_some(), "8 is older than the TTL");
    }
}

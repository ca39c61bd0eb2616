//! Redis sink: the latest row of every (metric, dims) as a hash, for the
//! point queries of client-facing pages (one room, one author), and on
//! request each key's day curve.
//!
//! Row `{"metric":"live","window_start":S,"window_end":E,"grouping":[…],
//! "dims":{"room_id":"r7"},"count":31,…}` is written as the hash
//! `{prefix}live:{"room_id":"r7"}` (the dims as the row has them, fields
//! in group-by order) with the fields `window_start`, `window_end`,
//! `grouping` and one per measure, each holding the value's JSON text
//! (`31`, `420.5`, `null`). With `curve = true` the row also goes to the
//! hash `{prefix}live:{"room_id":"r7"}:curve:{S}`, one field per window end
//! holding the row's JSON.
//!
//! Writes are idempotent: a Lua script (loaded once, called by `EVALSHA`)
//! sets the latest hash only if the row's window does not end before the
//! stored one, so rows replayed after a restart, which repeat earlier
//! windows with the same values, change nothing. Rows go out in pipelines
//! of [`PIPELINE_ROWS`]; a flush (at every checkpoint and at the end)
//! waits until Redis acknowledged every row. While Redis is unreachable or
//! does not answer within [`REPLY_TIMEOUT`], the sink reconnects and sends
//! the pipeline again with growing pauses, saying so on stderr and counting
//! the retries: rows are never dropped, the run waits.

use std::time::{Duration, Instant};

use super::jsonl::SinkError;
use crate::job::{MetricSpec, RedisSinkSpec};

/// Rows per pipeline.
pub const PIPELINE_ROWS: usize = 512;
/// A reply slower than this counts as a failure (the connection is
/// dropped and the pipeline sent again).
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before the first retry; doubled up to [`BACKOFF_MAX`].
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Least time between two log lines about retries.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(5);

/// Sets the latest hash unless it holds a later window. KEYS[1]: the hash;
/// ARGV[1]: window end; ARGV[2]: TTL seconds (0: none); ARGV[3..]: field,
/// value pairs.
const UPSERT: &str = r"
local cur = redis.call('HGET', KEYS[1], 'window_end')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'window_end', ARGV[1], unpack(ARGV, 3))
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 1
";

/// One row, parsed for Redis.
struct Pending {
    key: String,
    window_start: i64,
    window_end: i64,
    /// (field, JSON text) of `window_start` and every measure.
    fields: Vec<(String, String)>,
    line: String,
}

/// Result rows to Redis hashes.
pub struct RedisSink {
    client: redis::Client,
    conn: Option<redis::Connection>,
    /// SHA1 of [`UPSERT`] as the server knows it.
    sha: String,
    prefix: String,
    ttl_s: u64,
    curve: bool,
    /// Per metric: whether it goes here.
    wanted: Vec<bool>,
    pending: Vec<Pending>,
    pub rows: u64,
    pub bytes: u64,
    /// Pipelines sent again after a failure.
    pub retries: u64,
    logged: Option<Instant>,
    name: String,
}

impl RedisSink {
    /// Connects and loads the script; a Redis that cannot be reached now
    /// is an error (nothing has run yet).
    pub fn open(spec: &RedisSinkSpec, wanted: &[usize], metrics: &[MetricSpec]) -> Result<RedisSink, SinkError> {
        let name = format!("redis {}", spec.url);
        let err = |reason: String| SinkError { name: name.clone(), source: std::io::Error::other(reason) };
        let client = redis::Client::open(spec.url.as_str()).map_err(|e| err(format!("not a Redis URL: {e}")))?;
        let mut sink = RedisSink {
            client,
            conn: None,
            sha: String::new(),
            prefix: spec.key_prefix.clone(),
            ttl_s: spec.ttl_s,
            curve: spec.curve,
            wanted: (0..metrics.len()).map(|m| wanted.contains(&m)).collect(),
            pending: Vec::with_capacity(PIPELINE_ROWS),
            rows: 0,
            bytes: 0,
            retries: 0,
            logged: None,
            name: name.clone(),
        };
        sink.connect().map_err(|e| err(format!("cannot connect ({e}); is it running?")))?;
        Ok(sink)
    }

    fn connect(&mut self) -> redis::RedisResult<()> {
        self.conn = None;
        let mut conn = self.client.get_connection_with_timeout(REPLY_TIMEOUT)?;
        conn.set_read_timeout(Some(REPLY_TIMEOUT))?;
        conn.set_write_timeout(Some(REPLY_TIMEOUT))?;
        self.sha = redis::cmd("SCRIPT").arg("LOAD").arg(UPSERT).query(&mut conn)?;
        self.conn = Some(conn);
        Ok(())
    }

    /// Queues a row of metric `metric` (`dims`: its dims object as
    /// rendered); sends a pipeline once enough wait.
    pub fn write(&mut self, metric: usize, line: &str, dims: &str) -> Result<(), SinkError> {
        if !self.wanted.get(metric).copied().unwrap_or(false) {
            return Ok(());
        }
        let row = self.parse(line, dims)?;
        self.pending.push(row);
        self.rows += 1;
        self.bytes += line.len() as u64;
        if self.pending.len() >= PIPELINE_ROWS {
            self.send()?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), SinkError> {
        if !self.pending.is_empty() {
            self.send()?;
        }
        Ok(())
    }

    /// A rendered row as hash fields: every field but `metric` and `dims`,
    /// as JSON text.
    fn parse(&self, line: &str, dims: &str) -> Result<Pending, SinkError> {
        let bad =
            |why: &str| SinkError { name: self.name.clone(), source: std::io::Error::other(format!("{why}: {line}")) };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|_| bad("a row that is not JSON"))?;
        let obj = v.as_object().ok_or_else(|| bad("a row that is not an object"))?;
        let metric = obj.get("metric").and_then(|m| m.as_str()).ok_or_else(|| bad("a row without metric"))?;
        let int = |f: &str| obj.get(f).and_then(|x| x.as_i64()).ok_or_else(|| bad("a row without its window"));
        let (window_start, window_end) = (int("window_start")?, int("window_end")?);
        let fields = obj
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "metric" | "dims" | "window_end"))
            .map(|(k, x)| (k.clone(), x.to_string()))
            .collect();
        Ok(Pending {
            key: format!("{}{metric}:{dims}", self.prefix),
            window_start,
            window_end,
            fields,
            line: line.trim_end().to_string(),
        })
    }

    /// Sends the queued rows as one pipeline, until Redis acknowledges it.
    fn send(&mut self) -> Result<(), SinkError> {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.try_send() {
                Ok(()) => {
                    self.pending.clear();
                    return Ok(());
                }
                Err(e) if !transient(&e) => {
                    let why = format!("Redis refused a write ({e}); rows cannot be stored");
                    return Err(SinkError { name: self.name.clone(), source: std::io::Error::other(why) });
                }
                Err(e) => {
                    self.retries += 1;
                    if self.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                        self.logged = Some(Instant::now());
                        eprintln!(
                            "tally: sink {}: {e}; retrying {} rows in {backoff:?} ({} retries so far)",
                            self.name,
                            self.pending.len(),
                            self.retries
                        );
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    if let Err(e) = self.connect() {
                        if self.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                            self.logged = Some(Instant::now());
                            eprintln!("tally: sink {}: reconnecting: {e}", self.name);
                        }
                    }
                }
            }
        }
    }

    fn try_send(&mut self) -> redis::RedisResult<()> {
        if self.conn.is_none() {
            self.connect()?;
        }
        let mut pipe = redis::pipe();
        for r in &self.pending {
            let cmd = pipe.cmd("EVALSHA").arg(&self.sha).arg(1).arg(&r.key).arg(r.window_end).arg(self.ttl_s);
            for (f, v) in &r.fields {
                cmd.arg(f).arg(v);
            }
            cmd.ignore();
            if self.curve {
                let curve = format!("{}:curve:{}", r.key, r.window_start);
                pipe.cmd("HSET").arg(&curve).arg(r.window_end).arg(&r.line).ignore();
                if self.ttl_s > 0 {
                    pipe.cmd("EXPIRE").arg(&curve).arg(self.ttl_s).ignore();
                }
            }
        }
        let conn = self.conn.as_mut().expect("connected above");
        let r = pipe.query::<()>(conn);
        if r.is_err() {
            // A half-read reply would poison the connection: start afresh.
            self.conn = None;
        }
        r
    }
}

/// Whether a failed pipeline may succeed when sent again: Redis away, slow,
/// restarted (its script cache empty) or loading; not a refused command.
pub(crate) fn transient(e: &redis::RedisError) -> bool {
    use redis::ErrorKind as K;
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(e.kind(), K::NoScriptError | K::BusyLoadingError | K::TryAgain | K::MasterDown | K::ReadOnly)
}

//! `tally serve`: a job run as a daemon, with an HTTP API beside it.
//!
//! The job runs as `tally run` runs it (Kafka sources keep it going;
//! SIGTERM or SIGINT finish the batch, checkpoint and end it). Every row
//! the emitter writes also lands in [`Live`], the latest row per (metric,
//! dims); a server on a thread of its own (a one-thread tokio runtime, off
//! the shard cores) answers from it:
//!
//! - `GET /healthz`: 200 while the process runs;
//! - `GET /readyz`: 200 once the state is restored and the input was read
//!   to its end once (files: the run finished them; Kafka: every assigned
//!   partition reached its end), else 503 with what it waits for;
//! - `GET /api/v1/latest?metric=NAME&dims={"room_id":"r7"}`: the latest row
//!   (largest window end) of that metric and group key, as written to the
//!   sinks; `dims` is the row's `dims` object (omitted: `{}`);
//! - `GET /api/v1/curve?metric=NAME&dims={..}&day=latest|previous|YYYY-MM-DD`:
//!   the key's day curve, every row of that day so far (`limit`: the last
//!   N), for the newest day with rows and the one before it;
//! - `GET /api/v1/top?metric=NAME&by=MEASURE&n=10[&group_by=a,b]`: the `n`
//!   keys with the largest measure at the metric's newest window end;
//! - `GET /api/v1/status`: the job's sources and metrics, rows, readiness;
//! - `GET /metrics`: Prometheus text.
//!
//! With `[serve] token`, every path but `/healthz` and `/readyz` wants
//! `Authorization: Bearer <token>` (401 otherwise). Bad parameters get a
//! 400 with the reason. The server binds `[serve] http` (127.0.0.1 unless
//! the job says otherwise).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::Value;

use crate::event::Reject;
use crate::job::filter::FieldValue;
use crate::job::Job;
use crate::job::SERVE_CURVE_BYTES_DEFAULT;
use crate::metric::cumulate::Row;
use crate::metric::keys::render_dims;
use crate::runtime::stats::{LiveCounts, Progress, ShardGauges, LATENESS_BOUNDS_MS};
use crate::source::stream::Stream;
use crate::source::tcp::TcpStats;

pub mod store;
use store::{format_day, measure, parse_day, Store};

/// The dashboard page: assets built into the binary.
const DASHBOARD: &str = include_str!("dashboard.html");
/// The delay SLA the dashboard draws (the practice's 5 minutes).
const SLA_SECONDS: f64 = 300.0;
/// How often the dashboard's stream sends a snapshot.
const STREAM_EVERY: Duration = Duration::from_secs(1);

/// Longest `dims` parameter accepted (bytes).
const DIMS_MAX_BYTES: usize = 4096;

/// Paths whose answer times `/metrics` reports (any other: `other`).
const TIMED_PATHS: [&str; 10] = [
    "/",
    "/api/v1/stream",
    "/healthz",
    "/readyz",
    "/api/v1/latest",
    "/api/v1/curve",
    "/api/v1/top",
    "/api/v1/status",
    "/metrics",
    "other",
];
/// Upper bounds (seconds) of the answer-time histogram's buckets.
const LATENCY_BUCKETS: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

/// Answer times per path: a Prometheus histogram.
#[derive(Default)]
struct ApiTimes {
    /// Per path: per bucket (the last one is +Inf), answers at or under it.
    buckets: [[AtomicU64; LATENCY_BUCKETS.len() + 1]; TIMED_PATHS.len()],
    sum_us: [AtomicU64; TIMED_PATHS.len()],
}

impl ApiTimes {
    fn observe(&self, path: &str, took: Duration) {
        let p = TIMED_PATHS.iter().position(|&t| t == path).unwrap_or(TIMED_PATHS.len() - 1);
        let secs = took.as_secs_f64();
        let b = LATENCY_BUCKETS.iter().position(|&le| secs <= le).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[p][b].fetch_add(1, Ordering::Relaxed);
        self.sum_us[p].fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        out.push_str(
            "# HELP tally_api_request_duration_seconds Time to answer an HTTP request (to its headers), per path.\n",
        );
        out.push_str("# TYPE tally_api_request_duration_seconds histogram\n");
        for (p, path) in TIMED_PATHS.iter().enumerate() {
            let mut cumulative = 0;
            for (b, n) in self.buckets[p].iter().enumerate() {
                cumulative += n.load(Ordering::Relaxed);
                let le = LATENCY_BUCKETS.get(b).map_or("+Inf".to_string(), |v| v.to_string());
                out.push_str(&format!(
                    "tally_api_request_duration_seconds_bucket{{path=\"{path}\",le=\"{le}\"}} {cumulative}\n"
                ));
            }
            let sum = self.sum_us[p].load(Ordering::Relaxed) as f64 / 1e6;
            out.push_str(&format!("tally_api_request_duration_seconds_sum{{path=\"{path}\"}} {sum}\n"));
            out.push_str(&format!("tally_api_request_duration_seconds_count{{path=\"{path}\"}} {cumulative}\n"));
        }
    }
}

/// The longest request target (path and query) answered.
const URI_MAX_BYTES: usize = 8192;
/// The largest request body accepted (no endpoint reads one).
const BODY_MAX_BYTES: u64 = 4096;
/// The longest a request may take to its response's headers.
const ANSWER_TIME_MAX: Duration = Duration::from_secs(10);

/// Bounds every request ([`bounded`]) and times it ([`ApiTimes`]).
async fn timed(State(live): State<Arc<Live>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path().to_string();
    let started = Instant::now();
    let response = bounded(req, next, ANSWER_TIME_MAX).await;
    live.api_times.observe(&path, started.elapsed());
    response
}

/// Refuses a request target over [`URI_MAX_BYTES`] (414) and a body over
/// [`BODY_MAX_BYTES`] or of unknown length (413) unread, and answers 503
/// when the handler takes longer than `time_max`.
async fn bounded(req: axum::extract::Request, next: axum::middleware::Next, time_max: Duration) -> Response {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    let body = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    if target > URI_MAX_BYTES {
        text(StatusCode::URI_TOO_LONG, format!("the request target is longer than {URI_MAX_BYTES} bytes\n"))
    } else if chunked || body.is_some_and(|b| b > BODY_MAX_BYTES) {
        text(StatusCode::PAYLOAD_TOO_LARGE, format!("request bodies are not read; at most {BODY_MAX_BYTES} bytes\n"))
    } else {
        match tokio::time::timeout(time_max, next.run(req)).await {
            Ok(r) => r,
            Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, format!("no answer within {} ms\n", time_max.as_millis())),
        }
    }
}

/// Per source counts and the run's progress, as the run publishes them.
type RunCounts = (Arc<[LiveCounts]>, Arc<Progress>);

/// A TCP source's bound address and counters.
type TcpSeen = (SocketAddr, Arc<TcpStats>);

/// One family of TCP source counters in `/metrics`: name, type, help, value.
type TcpFamily = (&'static str, &'static str, &'static str, fn(&TcpStats) -> &AtomicU64);

/// What the server answers from: the latest rows and the run's progress.
pub struct Live {
    /// Per metric (a summary's grouping sets apart) and key: the latest row
    /// and the day curve.
    store: Mutex<Store>,
    names: Vec<String>,
    group_by: Vec<Vec<String>>,
    tz_ms: i64,
    /// (name, kind, format) of each source.
    sources: Vec<(String, &'static str, &'static str)>,
    token: Option<String>,
    rows: AtomicU64,
    started: Instant,
    /// The state was restored (or a fresh one made) and workers run.
    pub restored: AtomicBool,
    /// The run read all its input and ended (a job of files only).
    pub finished: AtomicBool,
    /// Its stream sources, for readiness.
    streams: Mutex<Vec<Arc<Stream>>>,
    /// Per source: a TCP source's bound address and counters.
    tcp: Mutex<Vec<Option<TcpSeen>>>,
    /// Per source: records, events and rejects so far; the run's progress.
    counts: Mutex<Option<RunCounts>>,
    api_times: ApiTimes,
}

impl Live {
    pub fn new(job: &Job) -> Arc<Live> {
        Arc::new(Live {
            store: Mutex::new(Store::new(
                job.metrics.len(),
                job.timezone_offset_ms,
                job.serve.as_ref().map_or(SERVE_CURVE_BYTES_DEFAULT, |s| s.curve_bytes),
            )),
            names: job.metrics.iter().map(|m| m.name.clone()).collect(),
            tz_ms: job.timezone_offset_ms,
            group_by: job.metrics.iter().map(|m| m.group_by.clone()).collect(),
            sources: job.sources.iter().map(|s| (s.name.clone(), s.kind(), s.format.name())).collect(),
            token: job.serve.as_ref().and_then(|s| s.token.clone()),
            rows: AtomicU64::new(0),
            started: Instant::now(),
            restored: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
            tcp: Mutex::new(job.sources.iter().map(|_| None).collect()),
            counts: Mutex::new(None),
            api_times: ApiTimes::default(),
        })
    }

    /// The run's per-source counts, as the routers publish them.
    pub fn counts(&self, counts: Arc<[LiveCounts]>, progress: Arc<Progress>) {
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()) = Some((counts, progress));
    }

    /// Reports TCP source `source`'s address and counters.
    pub fn tcp(&self, source: usize, addr: SocketAddr, stats: Arc<TcpStats>) {
        if let Some(t) = self.tcp.lock().unwrap_or_else(|p| p.into_inner()).get_mut(source) {
            *t = Some((addr, stats));
        }
    }

    /// Watches a stream source for readiness.
    pub fn watch(&self, stream: Arc<Stream>) {
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).push(stream);
    }

    /// Keeps a row if it is the latest of its metric and dims (on the
    /// emitter thread: a map probe by the row's dims text, no parsing).
    pub fn record(&self, row: &Row) {
        self.rows.fetch_add(1, Ordering::Relaxed);
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.record(row.metric, row.window_end_ms, &row.line, row.key_at.clone());
    }

    /// Fills the store from a JSON-lines file of the job's rows (its sink's
    /// file, cut back to the checkpoint a resumed run starts from), so the
    /// API answers after a restart as it did before. Returns the rows read;
    /// lines that are not rows of this job are skipped.
    pub fn refill(&self, path: &std::path::Path) -> std::io::Result<u64> {
        match std::fs::read_to_string(path) {
            Ok(t) => Ok(self.replay(&t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Records the rows of `text` (JSON lines) as if they were written now;
    /// returns how many were rows of this job.
    pub fn replay(&self, text: &str) -> u64 {
        #[derive(serde::Deserialize)]
        struct Head<'a> {
            metric: &'a str,
            window_end: i64,
            #[serde(default)]
            grouping: Option<Vec<String>>,
            #[serde(borrow)]
            dims: &'a serde_json::value::RawValue,
        }
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        let mut line = String::new();
        for l in text.lines() {
            let Ok(h) = serde_json::from_str::<Head>(l) else { continue };
            let m = (0..self.names.len())
                .find(|&m| self.names[m] == h.metric && h.grouping.as_ref().is_none_or(|g| *g == self.group_by[m]));
            let Some(m) = m else { continue };
            let at = h.dims.get().as_ptr() as usize - l.as_ptr() as usize;
            line.clear();
            line.push_str(l);
            line.push('\n');
            store.record(m, h.window_end, &line, at..at + h.dims.get().len());
            n += 1;
        }
        n
    }

    /// Runs `f` on the store (checkpoints save and restore it through this).
    pub fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        f(&mut self.store.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The metric (grouping set) and dims text of a key: metric `name`'s
    /// set with exactly the fields of `dims` (any order), its dims text
    /// rendered as the engine renders it.
    fn key_of(&self, name: &str, dims: &serde_json::Map<String, Value>) -> Result<(usize, String), String> {
        let mut fields: Vec<&String> = dims.keys().collect();
        fields.sort();
        let set = (0..self.names.len()).find(|&m| {
            let mut g: Vec<&String> = self.group_by[m].iter().collect();
            g.sort();
            self.names[m] == name && g == fields
        });
        let Some(m) = set else {
            return Err(format!("metric {name:?} has no grouping by exactly {fields:?}"));
        };
        let mut values = Vec::with_capacity(dims.len());
        for f in &self.group_by[m] {
            values.push(match &dims[f] {
                Value::Null => FieldValue::Null,
                Value::String(s) => FieldValue::Str(s.as_bytes()),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => FieldValue::Int(i),
                    None => FieldValue::Float(n.as_f64().unwrap_or(f64::NAN)),
                },
                _ => return Err(format!("dims field {f:?}: a string, a number or null")),
            });
        }
        Ok((m, render_dims(&self.group_by[m], &values)))
    }

    /// Why the daemon is not ready yet, if it is not.
    fn waiting_for(&self) -> Option<&'static str> {
        if !self.restored.load(Ordering::Acquire) {
            return Some("restoring the state");
        }
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if streams.is_empty() {
            return (!self.finished.load(Ordering::Acquire)).then_some("reading the input files");
        }
        if streams.iter().any(|s| !s.caught_up.load(Ordering::Acquire)) {
            return Some("reading the Kafka partitions to their end");
        }
        None
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        given.and_then(|v| v.strip_prefix("Bearer ")) == Some(token.as_str())
    }

    /// For a browser (which cannot set headers on an event stream): the
    /// header, or `?token=`.
    fn authorized_browser(&self, headers: &HeaderMap, params: &HashMap<String, String>) -> bool {
        self.authorized(headers) || self.token.as_ref().is_some_and(|t| params.get("token") == Some(t))
    }

    /// What the dashboard shows, as one JSON object: readiness, rows, the
    /// data delay, per source its counts, per metric name the curve of one
    /// key (its coarsest grouping's leader by `uv`, else its first measure)
    /// for the newest day and the one before.
    fn snapshot(&self) -> String {
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let wm = counts
            .as_ref()
            .map(|(_, p)| p.watermark_ms.load(Ordering::Relaxed))
            .filter(|&w| w != i64::MIN && w != i64::MAX);
        let sources: Vec<Value> = self
            .sources
            .iter()
            .enumerate()
            .map(|(s, (name, kind, _))| {
                let c = counts.as_ref().and_then(|(c, _)| c.get(s));
                let get = |f: &dyn Fn(&LiveCounts) -> u64| c.map_or(0, f);
                serde_json::json!({
                    "name": name,
                    "kind": kind,
                    "records": get(&|c| c.records.load(Ordering::Relaxed)),
                    "events": get(&|c| c.events.load(Ordering::Relaxed)),
                    "rejected": get(&|c| c.rejected.iter().map(|r| r.load(Ordering::Relaxed)).sum()),
                    "late_folded": get(&|c| c.late_folded.load(Ordering::Relaxed)),
                    "late_dropped": get(&|c| c.late_dropped.load(Ordering::Relaxed)),
                })
            })
            .collect();
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let mut metrics = Vec::new();
        let mut seen: Vec<&str> = Vec::new();
        for name in &self.names {
            if seen.contains(&name.as_str()) {
                continue;
            }
            seen.push(name);
            let sets = (0..self.names.len()).filter(|&m| &self.names[m] == name);
            let Some(m) = sets.min_by_key(|&m| self.group_by[m].len()) else { continue };
            let (Some((dims, by)), Some(day)) = (store.leader(m), store.newest_day(m)) else { continue };
            let points = |d: i64| -> Vec<(i64, f64)> {
                let pts = store.curve(m, &dims, d, usize::MAX).unwrap_or_default();
                pts.iter().filter_map(|&(end, tail)| Some((end, measure(tail, &by)??))).collect()
            };
            metrics.push(serde_json::json!({
                "name": name,
                "dims": dims,
                "measure": by,
                "day": format_day(day),
                "day_start_ms": day * 86_400_000 - self.tz_ms,
                "points": points(day),
                "previous": points(day - 1),
            }));
        }
        drop(store);
        serde_json::json!({
            "now_ms": now_ms,
            "ready": self.waiting_for().is_none(),
            "waiting_for": self.waiting_for(),
            "rows": self.rows.load(Ordering::Relaxed),
            "watermark_ms": wm,
            "data_delay_seconds": wm.map(|w| (now_ms - w) as f64 / 1e3),
            "sla_seconds": SLA_SECONDS,
            "sources": sources,
            "metrics": metrics,
        })
        .to_string()
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body.into()).into_response()
}

async fn healthz() -> Response {
    text(StatusCode::OK, "ok\n")
}

async fn readyz(State(live): State<Arc<Live>>) -> Response {
    match live.waiting_for() {
        None => text(StatusCode::OK, "ready\n"),
        Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

/// A bad request's answer.
type Refusal = Box<Response>;

fn refuse(status: StatusCode, why: impl Into<String>) -> Refusal {
    Box::new(text(status, why.into() + "\n"))
}

/// Checks the token and that every parameter is one of `allowed`; returns
/// `metric`, which every such path requires, known to the job.
fn checked<'p>(
    live: &Live,
    headers: &HeaderMap,
    params: &'p HashMap<String, String>,
    allowed: &[&str],
) -> Result<&'p str, Refusal> {
    if !live.authorized(headers) {
        return Err(refuse(StatusCode::UNAUTHORIZED, "missing or wrong bearer token"));
    }
    if let Some(k) = params.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("unknown parameter {k:?} (expected {})", allowed.join(", ")),
        ));
    }
    let Some(metric) = params.get("metric") else {
        return Err(refuse(StatusCode::BAD_REQUEST, "`metric` is required"));
    };
    if !live.names.contains(metric) {
        return Err(refuse(StatusCode::NOT_FOUND, format!("the job has no metric {metric:?}")));
    }
    Ok(metric)
}

/// The grouping set and dims text `metric` and `dims` name.
fn key_param(live: &Live, metric: &str, params: &HashMap<String, String>) -> Result<(usize, String), Refusal> {
    let dims = params.get("dims").map_or("{}", String::as_str);
    if dims.len() > DIMS_MAX_BYTES {
        return Err(refuse(StatusCode::BAD_REQUEST, format!("`dims` is longer than {DIMS_MAX_BYTES} bytes")));
    }
    let dims = match serde_json::from_str::<Value>(dims) {
        Ok(Value::Object(d)) => d,
        _ => return Err(refuse(StatusCode::BAD_REQUEST, "`dims` must be a JSON object, e.g. {\"room_id\":\"r7\"}")),
    };
    live.key_of(metric, &dims).map_err(|why| refuse(StatusCode::BAD_REQUEST, why))
}

/// A whole number parameter within `1..=max` (`default` when absent).
fn count_param(params: &HashMap<String, String>, name: &str, default: usize, max: usize) -> Result<usize, Refusal> {
    match params.get(name) {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(refuse(StatusCode::BAD_REQUEST, format!("`{name}` must be a whole number from 1 to {max}"))),
        },
    }
}

fn json(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn latest(
    State(live): State<Arc<Live>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let answer = || -> Result<Response, Refusal> {
        let metric = checked(&live, &headers, &params, &["metric", "dims"])?;
        let (m, dims) = key_param(&live, metric, &params)?;
        let store = live.store.lock().unwrap_or_else(|p| p.into_inner());
        match store.latest(m, &dims) {
            // A row's line ends with its newline.
            Some(line) => Ok(json(line.to_string())),
            None => Err(refuse(StatusCode::NOT_FOUND, "no row for these dims yet")),
        }
    };
    answer().unwrap_or_else(|r| *r)
}

async fn dashboard(
    State(live): State<Arc<Live>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    if !live.authorized_browser(&headers, &params) {
        return text(StatusCode::UNAUTHORIZED, "missing or wrong token (add ?token=…)\n");
    }
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], DASHBOARD).into_response()
}

/// Server-sent events: a [`Live::snapshot`] now and every [`STREAM_EVERY`].
async fn stream(
    State(live): State<Arc<Live>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    use axum::response::sse::{Event, Sse};
    if !live.authorized_browser(&headers, &params) {
        return text(StatusCode::UNAUTHORIZED, "missing or wrong token\n");
    }
    let ticks = tokio::time::interval(STREAM_EVERY);
    let events = futures_util::stream::unfold((live, ticks), |(live, mut ticks)| async move {
        ticks.tick().await;
        let event = Event::default().data(live.snapshot());
        Some((Ok::<_, std::convert::Infallible>(event), (live, ticks)))
    });
    Sse::new(events).into_response()
}

/// Most points one curve request returns.
const CURVE_POINTS_MAX: usize = 100_000;

async fn curve(
    State(live): State<Arc<Live>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let answer = || -> Result<Response, Refusal> {
        let metric = checked(&live, &headers, &params, &["metric", "dims", "day", "limit"])?;
        let (m, dims) = key_param(&live, metric, &params)?;
        let limit = count_param(&params, "limit", CURVE_POINTS_MAX, CURVE_POINTS_MAX)?;
        let store = live.store.lock().unwrap_or_else(|p| p.into_inner());
        let Some(newest) = store.newest_day(m) else {
            return Err(refuse(StatusCode::NOT_FOUND, "no row of this metric yet"));
        };
        let day = match params.get("day").map(String::as_str) {
            None | Some("latest") => newest,
            Some("previous") => newest - 1,
            Some(d) => match parse_day(d) {
                Some(day) if day == newest || day == newest - 1 => day,
                Some(_) => {
                    return Err(refuse(
                        StatusCode::NOT_FOUND,
                        format!("curves are kept for {} and {} only", format_day(newest - 1), format_day(newest)),
                    ))
                }
                None => {
                    return Err(refuse(StatusCode::BAD_REQUEST, "`day` must be latest, previous or a date YYYY-MM-DD"))
                }
            },
        };
        let Some(points) = store.curve(m, &dims, day, limit) else {
            return Err(refuse(StatusCode::NOT_FOUND, "no row for these dims yet"));
        };
        let mut body = String::with_capacity(64 + points.len() * 48);
        body.push_str("{\"metric\":");
        body.push_str(&Value::from(metric).to_string());
        body.push_str(",\"dims\":");
        body.push_str(&dims);
        body.push_str(&format!(",\"day\":\"{}\",\"points\":[", format_day(day)));
        for (i, (end, tail)) in points.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            // A point is its row's window end and measures.
            body.push_str(&format!("{{\"window_end\":{end}{tail}"));
        }
        body.push_str("]}\n");
        Ok(json(body))
    };
    answer().unwrap_or_else(|r| *r)
}

/// Most keys one top request returns.
const TOP_MAX: usize = 1000;

async fn top(
    State(live): State<Arc<Live>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let answer = || -> Result<Response, Refusal> {
        let metric = checked(&live, &headers, &params, &["metric", "by", "n", "group_by"])?;
        let sets: Vec<usize> = (0..live.names.len()).filter(|&m| live.names[m] == metric).collect();
        let m = match params.get("group_by") {
            Some(g) => {
                let mut want: Vec<&str> = g.split(',').filter(|f| !f.is_empty()).collect();
                want.sort_unstable();
                let found = sets.iter().copied().find(|&m| {
                    let mut have: Vec<&str> = live.group_by[m].iter().map(String::as_str).collect();
                    have.sort_unstable();
                    have == want
                });
                found.ok_or_else(|| {
                    refuse(StatusCode::BAD_REQUEST, format!("metric {metric:?} has no grouping by {want:?}"))
                })?
            }
            None if sets.len() == 1 => sets[0],
            None => {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    format!("metric {metric:?} has {} grouping sets: name one with group_by=field,field", sets.len()),
                ))
            }
        };
        let Some(by) = params.get("by") else {
            return Err(refuse(StatusCode::BAD_REQUEST, "`by` (the measure to rank by) is required"));
        };
        let n = count_param(&params, "n", 10, TOP_MAX)?;
        let store = live.store.lock().unwrap_or_else(|p| p.into_inner());
        let (end, rows) = store.top(m, by, n).map_err(|why| refuse(StatusCode::BAD_REQUEST, why))?;
        let Some(end) = end else {
            return Err(refuse(StatusCode::NOT_FOUND, "no row of this grouping yet"));
        };
        let mut body = format!(
            "{{\"metric\":{},\"by\":{},\"window_end\":{end},\"rows\":[",
            Value::from(metric),
            Value::from(by.as_str())
        );
        body.push_str(&rows.join(","));
        body.push_str("]}\n");
        Ok(json(body))
    };
    answer().unwrap_or_else(|r| *r)
}

impl Live {
    /// Keys with a latest row, per metric name (a summary's sets summed).
    fn keys(&self) -> BTreeMap<&str, usize> {
        let mut keys: BTreeMap<&str, usize> = self.names.iter().map(|n| (n.as_str(), 0)).collect();
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        for m in 0..self.names.len() {
            *keys.entry(self.names[m].as_str()).or_default() += store.keys(m);
        }
        keys
    }
}

async fn status(State(live): State<Arc<Live>>, headers: HeaderMap) -> Response {
    if !live.authorized(&headers) {
        return text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
    }
    let keys = live.keys();
    let tcp = live.tcp.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let body = serde_json::json!({
        "ready": live.waiting_for().is_none(),
        "waiting_for": live.waiting_for(),
        "uptime_seconds": live.started.elapsed().as_secs_f64(),
        "rows": live.rows.load(Ordering::Relaxed),
        "metrics": keys.iter().map(|(name, n)| serde_json::json!({"name": name, "keys": n})).collect::<Vec<_>>(),
        "sources": live.sources.iter().zip(&tcp).map(|((name, kind, format), tcp)| {
            let mut s = serde_json::json!({"name": name, "kind": kind, "format": format});
            if let Some((addr, stats)) = tcp {
                s["listen"] = addr.to_string().into();
                s["connections"] = stats.open.load(Ordering::Relaxed).into();
            }
            s
        }).collect::<Vec<_>>(),
    });
    ([(header::CONTENT_TYPE, "application/json")], body.to_string() + "\n").into_response()
}

async fn metrics(State(live): State<Arc<Live>>, headers: HeaderMap) -> Response {
    if !live.authorized(&headers) {
        return text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
    }
    let keys = live.keys();
    let mut out = String::new();
    out.push_str("# HELP tally_ready 1 once the state is restored and the input was read to its end once.\n");
    out.push_str("# TYPE tally_ready gauge\n");
    out.push_str(&format!("tally_ready {}\n", u8::from(live.waiting_for().is_none())));
    out.push_str("# HELP tally_rows_total Result rows the job wrote since the daemon started.\n");
    out.push_str("# TYPE tally_rows_total counter\n");
    out.push_str(&format!("tally_rows_total {}\n", live.rows.load(Ordering::Relaxed)));
    out.push_str("# HELP tally_keys Group keys with a latest row, per metric.\n");
    out.push_str("# TYPE tally_keys gauge\n");
    for (name, n) in keys {
        out.push_str(&format!("tally_keys{{metric=\"{}\"}} {n}\n", label(name)));
    }
    let counts = live.counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let mut gauge = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        if samples.is_empty() {
            return;
        }
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    if let Some((_, p)) = &counts {
        let wm = p.watermark_ms.load(Ordering::Relaxed);
        let known = (wm != i64::MIN && wm != i64::MAX).then_some(wm);
        let at = |f: &dyn Fn(i64) -> f64| known.map(|wm| vec![(String::new(), f(wm))]).unwrap_or_default();
        gauge(
            "tally_watermark_seconds",
            "gauge",
            "The job watermark (event time every window before it is emitted).",
            &at(&|wm| wm as f64 / 1e3),
        );
        gauge(
            "tally_data_delay_seconds",
            "gauge",
            "Now minus the job watermark: the delay of the results (the SLA figure).",
            &at(&|wm| (now_ms - wm) as f64 / 1e3),
        );
        let ck = |v: f64| vec![(String::new(), v)];
        gauge(
            "tally_checkpoints_total",
            "counter",
            "Checkpoints committed by this process.",
            &ck(p.checkpoints.load(Ordering::Relaxed) as f64),
        );
        gauge(
            "tally_checkpoint_last_seconds",
            "gauge",
            "The last checkpoint, from its cut to its commit.",
            &ck(p.checkpoint_last_us.load(Ordering::Relaxed) as f64 / 1e6),
        );
        gauge(
            "tally_checkpoint_written_bytes_total",
            "counter",
            "Bytes the checkpoints of this process wrote.",
            &ck(p.checkpoint_bytes.load(Ordering::Relaxed) as f64),
        );
        let per_shard = |f: &dyn Fn(&ShardGauges) -> &AtomicU64| -> Vec<(String, f64)> {
            let g = p.shards.iter().enumerate();
            g.map(|(i, g)| (format!("{{shard=\"{i}\"}}"), f(g).load(Ordering::Relaxed) as f64)).collect()
        };
        gauge(
            "tally_shard_queued_batches",
            "gauge",
            "Batches the routers queued for a shard and it did not take yet (at most workers x 8; full queues hold the readers back).",
            &per_shard(&|g| &g.queued_batches),
        );
        gauge(
            "tally_shard_state_bytes",
            "gauge",
            "Bytes of a shard's state: dedup tables, device histories, open minutes (as of its last watermark move).",
            &per_shard(&|g| &g.state_bytes),
        );
        gauge(
            "tally_shard_dedup_entries",
            "gauge",
            "Entries in a shard's dedup tables.",
            &per_shard(&|g| &g.dedup_entries),
        );
    }
    let streams = live.streams.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let per_stream = |f: &dyn Fn(&Stream) -> Option<f64>| -> Vec<(String, f64)> {
        streams
            .iter()
            .filter_map(|s| Some((format!("{{source=\"{}\"}}", label(&live.sources.get(s.source)?.0)), f(s)?)))
            .collect()
    };
    let known = |wm: i64| (wm != i64::MIN && wm != i64::MAX).then_some(wm);
    gauge(
        "tally_source_watermark_seconds",
        "gauge",
        "A stream source's watermark.",
        &per_stream(&|s| known(s.watermark()).map(|wm| wm as f64 / 1e3)),
    );
    gauge(
        "tally_source_data_delay_seconds",
        "gauge",
        "Now minus a stream source's watermark.",
        &per_stream(&|s| known(s.watermark()).map(|wm| (now_ms - wm) as f64 / 1e3)),
    );
    gauge(
        "tally_source_queued_blocks",
        "gauge",
        "Blocks a stream source's readers queued and the workers did not take yet.",
        &per_stream(&|s| Some(s.queued() as f64)),
    );
    if let Some((counts, _)) = counts {
        let sources = live.sources.iter().map(|(name, ..)| label(name)).zip(counts.iter());
        let sources: Vec<(String, &LiveCounts)> = sources.collect();
        out.push_str("# HELP tally_records_total Records read per source (good or bad).\n");
        out.push_str("# TYPE tally_records_total counter\n");
        for (name, c) in &sources {
            out.push_str(&format!("tally_records_total{{source=\"{name}\"}} {}\n", c.records.load(Ordering::Relaxed)));
        }
        out.push_str("# HELP tally_events_total Events per source that parsed and went on to the metrics.\n");
        out.push_str("# TYPE tally_events_total counter\n");
        for (name, c) in &sources {
            out.push_str(&format!("tally_events_total{{source=\"{name}\"}} {}\n", c.events.load(Ordering::Relaxed)));
        }
        out.push_str("# HELP tally_late_events_total Events behind their watermark, per source and what was done: folded or dropped.\n");
        out.push_str("# TYPE tally_late_events_total counter\n");
        for (name, c) in &sources {
            for (what, n) in [("folded", &c.late_folded), ("dropped", &c.late_dropped)] {
                let n = n.load(Ordering::Relaxed);
                out.push_str(&format!("tally_late_events_total{{source=\"{name}\",policy=\"{what}\"}} {n}\n"));
            }
        }
        out.push_str("# HELP tally_event_lateness_seconds Per source, how far each event's time is behind the largest event time before it in its input order (a file in file order, a stream partition or TCP connection): out-of-order monitoring.\n");
        out.push_str("# TYPE tally_event_lateness_seconds histogram\n");
        for (name, c) in &sources {
            let mut cumulative = 0;
            for (i, n) in c.lateness.iter().enumerate() {
                cumulative += n.load(Ordering::Relaxed);
                let le =
                    LATENESS_BOUNDS_MS.get(i).map_or_else(|| "+Inf".to_string(), |&b| (b as f64 / 1e3).to_string());
                out.push_str(&format!(
                    "tally_event_lateness_seconds_bucket{{source=\"{name}\",le=\"{le}\"}} {cumulative}\n"
                ));
            }
            let sum = c.lateness_sum_ms.load(Ordering::Relaxed) as f64 / 1e3;
            out.push_str(&format!("tally_event_lateness_seconds_sum{{source=\"{name}\"}} {sum}\n"));
            out.push_str(&format!("tally_event_lateness_seconds_count{{source=\"{name}\"}} {cumulative}\n"));
        }
        out.push_str("# HELP tally_records_rejected_total Malformed records skipped, per source and reason.\n");
        out.push_str("# TYPE tally_records_rejected_total counter\n");
        for (name, c) in &sources {
            for r in Reject::ALL {
                let n = c.rejected[r.index()].load(Ordering::Relaxed);
                out.push_str(&format!(
                    "tally_records_rejected_total{{source=\"{name}\",reason=\"{}\"}} {n}\n",
                    r.as_str()
                ));
            }
        }
    }
    let tcp = live.tcp.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let tcp: Vec<(&str, &TcpStats)> =
        live.sources.iter().zip(&tcp).filter_map(|((name, ..), t)| Some((name.as_str(), &*t.as_ref()?.1))).collect();
    if !tcp.is_empty() {
        let families: [TcpFamily; 6] = [
            ("tally_tcp_connections", "gauge", "Open client connections of a TCP source.", |t| &t.open),
            ("tally_tcp_connections_accepted_total", "counter", "Connections a TCP source accepted.", |t| &t.accepted),
            (
                "tally_tcp_connections_refused_total",
                "counter",
                "Connections closed at once: max_connections were open.",
                |t| &t.refused,
            ),
            (
                "tally_tcp_connections_closed_bad_total",
                "counter",
                "Connections tally closed: a line over max_line_bytes or a read error.",
                |t| &t.closed_bad,
            ),
            ("tally_tcp_received_bytes_total", "counter", "Bytes a TCP source received.", |t| &t.bytes),
            (
                "tally_tcp_backpressure_total",
                "counter",
                "Times a TCP source stopped reading because the routers were behind.",
                |t| &t.backpressure,
            ),
        ];
        for (family, kind, help, value) in families {
            out.push_str(&format!("# HELP {family} {help}\n# TYPE {family} {kind}\n"));
            for (name, t) in &tcp {
                out.push_str(&format!("{family}{{source=\"{}\"}} {}\n", label(name), value(t).load(Ordering::Relaxed)));
            }
        }
    }
    let throttled: Vec<(String, f64)> = live
        .streams
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(|s| Some((label(&live.sources.get(s.source)?.0), s.throttle.as_ref()?.held_seconds())))
        .collect();
    if !throttled.is_empty() {
        out.push_str(
            "# HELP tally_throttled_seconds_total Time a source's reader held back for max_events_per_second.\n",
        );
        out.push_str("# TYPE tally_throttled_seconds_total counter\n");
        for (name, secs) in throttled {
            out.push_str(&format!("tally_throttled_seconds_total{{source=\"{name}\"}} {secs:.3}\n"));
        }
    }
    let (curve_bytes, curve_dropped) = live.store.lock().unwrap_or_else(|p| p.into_inner()).curve_usage();
    out.push_str("# HELP tally_curve_bytes Memory the day curves hold ([serve] curve_bytes bounds it).\n");
    out.push_str("# TYPE tally_curve_bytes gauge\n");
    out.push_str(&format!("tally_curve_bytes {curve_bytes}\n"));
    out.push_str("# HELP tally_curve_points_dropped_total Curve points not kept: curve_bytes was reached.\n");
    out.push_str("# TYPE tally_curve_points_dropped_total counter\n");
    out.push_str(&format!("tally_curve_points_dropped_total {curve_dropped}\n"));
    live.api_times.render(&mut out);
    out.push_str("# HELP tally_uptime_seconds Seconds since the daemon started.\n");
    out.push_str("# TYPE tally_uptime_seconds gauge\n");
    out.push_str(&format!("tally_uptime_seconds {:.3}\n", live.started.elapsed().as_secs_f64()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The HTTP server, running until dropped.
pub struct Server {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` (an error names it) and serves `live` from a thread of
    /// its own.
    pub fn start(addr: &str, live: Arc<Live>) -> Result<Server, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|e| format!("[serve] http = {addr:?}: cannot listen: {e}"))?;
        let local = listener.local_addr().map_err(|e| format!("[serve] http = {addr:?}: {e}"))?;
        let app = Router::new()
            .route("/", get(dashboard))
            .route("/api/v1/stream", get(stream))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/api/v1/latest", get(latest))
            .route("/api/v1/curve", get(curve))
            .route("/api/v1/top", get(top))
            .route("/api/v1/status", get(status))
            .route("/metrics", get(metrics))
            .layer(axum::middleware::from_fn_with_state(live.clone(), timed))
            .with_state(live);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tally-http".into())
            .spawn(move || {
                let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                    let _ = rx.await;
                });
                if let Err(e) = rt.block_on(std::future::IntoFuture::into_future(serve)) {
                    eprintln!("tally serve: HTTP server stopped: {e}");
                }
            })
            .map_err(|e| format!("cannot start the HTTP thread: {e}"))?;
        Ok(Server { addr: local, shutdown: Some(tx), thread: Some(thread) })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Serves `/slow` (answers after 2 s) and `/fast` behind [`bounded`]
    /// with a 100 ms limit; returns each answer's status line.
    fn answers(paths: &[&str]) -> Vec<String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let app: Router = Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    "late"
                }),
            )
            .route("/fast", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(|req, next| bounded(req, next, Duration::from_millis(100))));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = std::thread::spawn(move || {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = rx.await;
            });
            rt.block_on(std::future::IntoFuture::into_future(serve)).unwrap();
        });
        let got = paths
            .iter()
            .map(|path| {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                write!(c, "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
                let mut answer = String::new();
                c.read_to_string(&mut answer).unwrap();
                answer
            })
            .collect();
        tx.send(()).unwrap();
        server.join().unwrap();
        got
    }

    #[test]
    fn a_request_that_takes_too_long_gets_503_and_others_are_answered() {
        let got = answers(&["/slow", "/fast"]);
        assert!(got[0].starts_with("HTTP/1.1 503") && got[0].contains("no answer within 100 ms"), "{:?}", got[0]);
        assert!(got[1].starts_with("HTTP/1.1 200") && got[1].ends_with("ok"), "{:?}", got[1]);
    }
}

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
use std::time::Instant;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::Value;

use crate::event::Reject;
use crate::job::filter::FieldValue;
use crate::job::Job;
use crate::metric::cumulate::Row;
use crate::metric::keys::render_dims;
use crate::runtime::stats::LiveCounts;
use crate::source::stream::Stream;
use crate::source::tcp::TcpStats;

/// Longest `dims` parameter accepted (bytes).
const DIMS_MAX_BYTES: usize = 4096;

/// A TCP source's bound address and counters.
type TcpSeen = (SocketAddr, Arc<TcpStats>);

/// One family of TCP source counters in `/metrics`: name, type, help, value.
type TcpFamily = (&'static str, &'static str, &'static str, fn(&TcpStats) -> &AtomicU64);

/// What the server answers from: the latest rows and the run's progress.
pub struct Live {
    /// Per metric (a summary's grouping sets apart): the row's `dims` text
    /// as the engine renders it -> (window end, row).
    latest: Mutex<Vec<HashMap<String, (i64, String)>>>,
    names: Vec<String>,
    group_by: Vec<Vec<String>>,
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
    /// Per source: records, events and rejects so far.
    counts: Mutex<Option<Arc<[LiveCounts]>>>,
}

impl Live {
    pub fn new(job: &Job) -> Arc<Live> {
        Arc::new(Live {
            latest: Mutex::new(job.metrics.iter().map(|_| HashMap::new()).collect()),
            names: job.metrics.iter().map(|m| m.name.clone()).collect(),
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
        })
    }

    /// The run's per-source counts, as the routers publish them.
    pub fn counts(&self, counts: Arc<[LiveCounts]>) {
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()) = Some(counts);
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
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let Some(map) = latest.get_mut(row.metric) else {
            return;
        };
        match map.get_mut(row.key()) {
            Some((end, line)) => {
                if *end <= row.window_end_ms {
                    *end = row.window_end_ms;
                    line.clone_from(&row.line);
                }
            }
            None => {
                map.insert(row.key().to_string(), (row.window_end_ms, row.line.clone()));
            }
        }
    }

    /// The latest row of metric `name` whose dims are `dims` (any field
    /// order): the grouping set with exactly those fields, its dims text
    /// rendered as the engine renders it.
    fn find(&self, name: &str, dims: &serde_json::Map<String, Value>) -> Result<Option<String>, String> {
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
        let text = render_dims(&self.group_by[m], &values);
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        Ok(latest[m].get(&text).map(|(_, line)| line.clone()))
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

async fn latest(
    State(live): State<Arc<Live>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    if !live.authorized(&headers) {
        return text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
    }
    if let Some(k) = params.keys().find(|k| *k != "metric" && *k != "dims") {
        return text(StatusCode::BAD_REQUEST, format!("unknown parameter {k:?} (expected metric, dims)\n"));
    }
    let Some(metric) = params.get("metric") else {
        return text(StatusCode::BAD_REQUEST, "`metric` is required\n");
    };
    if !live.names.contains(metric) {
        return text(StatusCode::NOT_FOUND, format!("the job has no metric {metric:?}\n"));
    }
    let dims = params.get("dims").map_or("{}", String::as_str);
    if dims.len() > DIMS_MAX_BYTES {
        return text(StatusCode::BAD_REQUEST, format!("`dims` is longer than {DIMS_MAX_BYTES} bytes\n"));
    }
    let dims = match serde_json::from_str::<Value>(dims) {
        Ok(Value::Object(d)) => d,
        _ => return text(StatusCode::BAD_REQUEST, "`dims` must be a JSON object, e.g. {\"room_id\":\"r7\"}\n"),
    };
    match live.find(metric, &dims) {
        // A row's line ends with its newline.
        Ok(Some(line)) => ([(header::CONTENT_TYPE, "application/json")], line).into_response(),
        Ok(None) => text(StatusCode::NOT_FOUND, "no row for these dims yet\n"),
        Err(why) => text(StatusCode::BAD_REQUEST, format!("{why}\n")),
    }
}

impl Live {
    /// Keys with a latest row, per metric name (a summary's sets summed).
    fn keys(&self) -> BTreeMap<&str, usize> {
        let mut keys: BTreeMap<&str, usize> = self.names.iter().map(|n| (n.as_str(), 0)).collect();
        for (m, map) in self.latest.lock().unwrap_or_else(|p| p.into_inner()).iter().enumerate() {
            *keys.entry(self.names[m].as_str()).or_default() += map.len();
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
    if let Some(counts) = counts {
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
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/api/v1/latest", get(latest))
            .route("/api/v1/status", get(status))
            .route("/metrics", get(metrics))
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

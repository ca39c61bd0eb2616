//! The job file as written (serde, unknown keys refused), and its
//! validation into a [`Job`].

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    default_binary_dims, filter::Filter, parse_bytes, parse_duration_ms, parse_timezone_offset_ms, DauSpec, DimFormat,
    DimKafkaSpec, DimRedisSpec, DimensionSpec, Emit, EventsSpec, FollowSpec, Format, Job, KafkaSinkSpec, KafkaSpec,
    KafkaStart, KafkaStop, LatePolicy, Measure, MetricSpec, OnMissing, RedisSinkSpec, ServeSpec, SinkRows, SinkSpec,
    SinkTarget, SourceSpec, SummarySpec, SummaryWindow, TcpSpec, TopSpec, DAY_MS, DEDUP_TOLERANCE_DEFAULT,
    DIM_CACHE_BYTES_DEFAULT, DIM_CACHE_ENTRIES_DEFAULT, DIM_CACHE_TTL_DEFAULT_MS, DIM_LOCAL_CACHE_ENTRIES_DEFAULT,
    KAFKA_RESERVED_PROPERTIES, MAX_LINE_BYTES_DEFAULT, METRICS_MAX, MINUTE_MS, RETURNING_AFTER_DAYS_DEFAULT,
    SERVE_CURVE_BYTES_DEFAULT, SERVE_HTTP_DEFAULT, STREAM_IDLE_TIMEOUT_DEFAULT_MS, TCP_MAX_CONNECTIONS_DEFAULT,
};
use crate::event::binary::BINARY_DIMS;
use crate::metric::values::SUMMARY_VALUES_MAX;
use crate::state::ring::{RING_SOURCES_MAX, TOLERANCE_MAX};

/// (key path, reason)
type Invalid = (String, String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJob {
    #[serde(default)]
    job: RawJobSection,
    #[serde(default)]
    source: Vec<RawSource>,
    #[serde(default)]
    dimension: Vec<RawDimension>,
    #[serde(default)]
    metric: Vec<RawMetric>,
    #[serde(default)]
    sink: Vec<RawSink>,
    serve: Option<RawServe>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServe {
    http: Option<String>,
    token: Option<String>,
    curve_bytes: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawJobSection {
    timezone: Option<String>,
    workers: Option<usize>,
    state_dir: Option<PathBuf>,
    checkpoint_interval: Option<String>,
    state_tables: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    kind: String,
    path: Option<OneOrMany>,
    format: Option<String>,
    max_out_of_orderness: Option<String>,
    max_line_bytes: Option<usize>,
    ts_field: Option<String>,
    did_field: Option<String>,
    binary_dims: Option<Vec<String>>,
    brokers: Option<String>,
    topic: Option<OneOrMany>,
    group_id: Option<String>,
    start: Option<String>,
    stop: Option<String>,
    idle_timeout: Option<String>,
    group_settle: Option<String>,
    csv_columns: Option<Vec<String>>,
    properties: Option<toml::Table>,
    listen: Option<String>,
    max_connections: Option<usize>,
    max_events_per_second: Option<u64>,
    follow: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDimension {
    name: String,
    kind: String,
    path: Option<String>,
    format: Option<String>,
    brokers: Option<String>,
    topic: Option<String>,
    properties: Option<toml::Table>,
    url: Option<String>,
    key_prefix: Option<String>,
    cache_entries: Option<usize>,
    cache_bytes: Option<toml::Value>,
    cache_ttl: Option<String>,
    local_cache_entries: Option<usize>,
    key: String,
    fields: Vec<String>,
    on_missing: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetric {
    name: String,
    kind: String,
    #[serde(default)]
    group_by: Vec<String>,
    filter: Option<String>,
    measures: Option<Vec<String>>,
    step: Option<String>,
    size: Option<String>,
    emit: Option<String>,
    late: Option<String>,
    sources: Option<Vec<String>>,
    returning_after_days: Option<u32>,
    device_history: Option<PathBuf>,
    dedup_tolerance: Option<u32>,
    window: Option<String>,
    grouping_sets: Option<Vec<Vec<String>>>,
    top: Option<RawTop>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTop {
    n: usize,
    by: String,
    #[serde(default)]
    per: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    kind: String,
    path: Option<String>,
    url: Option<String>,
    key_prefix: Option<String>,
    ttl: Option<String>,
    curve: Option<bool>,
    metrics: Option<Vec<String>>,
    sources: Option<Vec<String>>,
    fields: Option<Vec<String>>,
    brokers: Option<String>,
    topic: Option<String>,
    properties: Option<toml::Table>,
}

pub(super) fn parse(text: &str) -> Result<RawJob, String> {
    let de = toml::Deserializer::parse(text).map_err(|e| e.to_string())?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let inner = inner.trim_end();
        if path == "." || path.is_empty() {
            inner.to_string()
        } else {
            format!("`{path}`: {inner}")
        }
    })
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Invalid {
    (key.into(), reason.into())
}

pub(super) fn build(raw: RawJob, base: &Path) -> Result<Job, Invalid> {
    let timezone_offset_ms = match &raw.job.timezone {
        Some(tz) => parse_timezone_offset_ms(tz).map_err(|r| invalid("job.timezone", r))?,
        None => 0,
    };
    let workers = match raw.job.workers {
        Some(0) => return Err(invalid("job.workers", "must be at least 1")),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    if raw.source.is_empty() {
        return Err(invalid("source", "a job needs at least one [[source]]"));
    }
    let sources =
        raw.source.iter().enumerate().map(|(i, s)| build_source(i, s, base)).collect::<Result<Vec<_>, _>>()?;
    for (i, s) in sources.iter().enumerate() {
        if sources[..i].iter().any(|o| o.name == s.name) {
            return Err(invalid(format!("source[{i}].name"), format!("duplicate source name {:?}", s.name)));
        }
    }
    if raw.metric.is_empty() {
        return Err(invalid("metric", "a job needs at least one [[metric]]"));
    }
    if raw.metric.len() > METRICS_MAX {
        return Err(invalid("metric", format!("at most {METRICS_MAX} metrics per job")));
    }
    let dimensions = raw
        .dimension
        .iter()
        .enumerate()
        .map(|(i, d)| build_dimension(i, d, &sources, base))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, d) in dimensions.iter().enumerate() {
        if dimensions[..i].iter().any(|o| o.name == d.name) {
            return Err(invalid(format!("dimension[{i}].name"), format!("duplicate dimension name {:?}", d.name)));
        }
    }
    let mut metrics = Vec::new();
    for (i, m) in raw.metric.iter().enumerate() {
        let built = build_metric(i, m, &sources, &dimensions, base)?;
        if metrics.iter().any(|o: &MetricSpec| o.name == built[0].name) {
            return Err(invalid(format!("metric[{i}].name"), format!("duplicate metric name {:?}", built[0].name)));
        }
        metrics.extend(built);
        if metrics.len() > METRICS_MAX {
            let why = format!("at most {METRICS_MAX} metrics per job, each grouping set of a summary counting as one");
            return Err(invalid(format!("metric[{i}]"), why));
        }
    }
    let mut sinks =
        raw.sink.iter().enumerate().map(|(i, s)| build_sink(i, s, &metrics, base)).collect::<Result<Vec<_>, _>>()?;
    for (i, (s, spec)) in raw.sink.iter().zip(&mut sinks).enumerate() {
        if spec.rows == SinkRows::Events {
            spec.events = Some(build_events(i, s, &sources, &dimensions, &metrics)?);
        }
    }
    let state_dir = raw.job.state_dir.map(|p| base.join(p));
    let checkpoint_interval_ms = match &raw.job.checkpoint_interval {
        None => super::CHECKPOINT_INTERVAL_DEFAULT_MS,
        Some(t) => parse_duration_ms(t).map_err(|e| invalid("job.checkpoint_interval", &e))?,
    };
    let state_tables_mapped = match raw.job.state_tables.as_deref().unwrap_or("memory") {
        "memory" => false,
        "mapped" => true,
        other => return Err(invalid("job.state_tables", format!("unknown value {other:?} (expected memory, mapped)"))),
    };
    let serve = match &raw.serve {
        None => None,
        Some(s) => {
            let http = s.http.clone().unwrap_or_else(|| SERVE_HTTP_DEFAULT.into());
            if http.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "serve.http".to_string(),
                    format!("{http:?} is not an address such as \"127.0.0.1:8080\""),
                ));
            }
            if s.token.as_deref().is_some_and(|t| t.is_empty() || t.chars().any(|c| c.is_whitespace())) {
                return Err(invalid("serve.token".to_string(), "must be non-empty, without whitespace"));
            }
            let curve_bytes = match &s.curve_bytes {
                None => SERVE_CURVE_BYTES_DEFAULT,
                Some(toml::Value::Integer(n)) if *n >= 0 => *n as u64,
                Some(toml::Value::String(t)) => parse_bytes(t).map_err(|r| invalid("serve.curve_bytes", r))?,
                Some(_) => return Err(invalid("serve.curve_bytes", "a size such as \"256MiB\" or a number of bytes")),
            };
            Some(ServeSpec { http, token: s.token.clone(), curve_bytes })
        }
    };
    Ok(Job {
        timezone_offset_ms,
        workers,
        state_dir,
        checkpoint_interval_ms,
        state_tables_mapped,
        sources,
        dimensions,
        metrics,
        sinks,
        serve,
    })
}

fn build_dimension(i: usize, d: &RawDimension, sources: &[SourceSpec], base: &Path) -> Result<DimensionSpec, Invalid> {
    let key = |k: &str| format!("dimension[{i}].{k}");
    if d.name.is_empty() || d.name.contains('.') {
        return Err(invalid(key("name"), format!("{:?}: a dimension name must be non-empty and without `.`", d.name)));
    }
    let only = |kind: &str, keys: &[(&str, bool)]| match keys.iter().find(|(_, set)| *set) {
        Some((k, _)) => Err(invalid(key(k), format!("only a `kind = \"{kind}\"` dimension takes this key"))),
        None => Ok(()),
    };
    let kafka_keys =
        [("brokers", d.brokers.is_some()), ("topic", d.topic.is_some()), ("properties", d.properties.is_some())];
    let redis_keys = [
        ("url", d.url.is_some()),
        ("key_prefix", d.key_prefix.is_some()),
        ("cache_entries", d.cache_entries.is_some()),
        ("cache_bytes", d.cache_bytes.is_some()),
        ("cache_ttl", d.cache_ttl.is_some()),
        ("local_cache_entries", d.local_cache_entries.is_some()),
    ];
    let (mut kafka, mut redis) = (None, None);
    match d.kind.as_str() {
        "file" => {
            only("kafka", &kafka_keys)?;
            only("redis", &redis_keys)?;
        }
        "kafka" => {
            only("redis", &redis_keys)?;
            for (k, set) in [("path", d.path.is_some()), ("format", d.format.is_some())] {
                if set {
                    return Err(invalid(key(k), "a Kafka dimension reads `topic` (JSON object values)"));
                }
            }
            let brokers = match &d.brokers {
                Some(b) if !b.trim().is_empty() => b.clone(),
                _ => return Err(invalid(key("brokers"), "a Kafka dimension needs `brokers`")),
            };
            let topic = match &d.topic {
                Some(t) if !t.is_empty() => t.clone(),
                _ => return Err(invalid(key("topic"), "a Kafka dimension needs `topic` (its changelog)")),
            };
            let properties = properties(d.properties.as_ref(), &key, &["bootstrap.servers", "enable.partition.eof"])?;
            kafka = Some(DimKafkaSpec { brokers, topic, properties });
        }
        "redis" => {
            only("kafka", &kafka_keys)?;
            for (k, set) in [("path", d.path.is_some()), ("format", d.format.is_some())] {
                if set {
                    return Err(invalid(key(k), "a Redis dimension reads hashes at `url`"));
                }
            }
            let url = match &d.url {
                Some(u) if u.starts_with("redis://") || u.starts_with("unix://") => u.clone(),
                Some(u) => return Err(invalid(key("url"), format!("{u:?} is not a redis:// URL"))),
                None => return Err(invalid(key("url"), "a Redis dimension needs `url` (redis://host:port)")),
            };
            let positive = |k: &str, v: Option<usize>, default: usize| match v {
                Some(0) => Err(invalid(key(k), "must be at least 1")),
                v => Ok(v.unwrap_or(default)),
            };
            let cache_bytes = match &d.cache_bytes {
                None => DIM_CACHE_BYTES_DEFAULT,
                Some(toml::Value::Integer(n)) if *n > 0 => *n as u64,
                Some(toml::Value::String(t)) => parse_bytes(t).map_err(|e| invalid(key("cache_bytes"), e))?,
                Some(v) => return Err(invalid(key("cache_bytes"), format!("{v}: expected a size like \"64MiB\""))),
            };
            let cache_ttl_ms = match &d.cache_ttl {
                None => DIM_CACHE_TTL_DEFAULT_MS,
                Some(t) => match parse_duration_ms(t).map_err(|e| invalid(key("cache_ttl"), e))? {
                    0 => return Err(invalid(key("cache_ttl"), "must be longer than 0")),
                    ms => ms,
                },
            };
            redis = Some(DimRedisSpec {
                url,
                key_prefix: d.key_prefix.clone().unwrap_or_else(|| format!("{}:", d.name)),
                cache_entries: positive("cache_entries", d.cache_entries, DIM_CACHE_ENTRIES_DEFAULT)?,
                cache_bytes,
                cache_ttl_ms,
                local_cache_entries: positive(
                    "local_cache_entries",
                    d.local_cache_entries,
                    DIM_LOCAL_CACHE_ENTRIES_DEFAULT,
                )?,
            });
        }
        other => {
            let why = format!("unknown dimension kind {other:?} (expected \"file\", \"kafka\" or \"redis\")");
            return Err(invalid(key("kind"), why));
        }
    }
    let (path, format) = match kafka.is_some() || redis.is_some() {
        true => (PathBuf::new(), DimFormat::Jsonl),
        false => {
            let path = match &d.path {
                None => return Err(invalid(key("path"), "a file dimension needs `path`")),
                Some(p) => base.join(p),
            };
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => {}
                Ok(_) => return Err(invalid(key("path"), format!("{} is not a file", path.display()))),
                Err(e) => return Err(invalid(key("path"), format!("cannot open {}: {e}", path.display()))),
            }
            let by_extension = if path.extension().is_some_and(|e| e == "csv") { "csv" } else { "jsonl" };
            let format = match d.format.as_deref().unwrap_or(by_extension) {
                "csv" => DimFormat::Csv,
                "jsonl" => DimFormat::Jsonl,
                other => {
                    return Err(invalid(key("format"), format!("unknown format {other:?} (expected csv or jsonl)")))
                }
            };
            (path, format)
        }
    };
    if d.key.is_empty() || d.key.contains('.') {
        let why = format!("{:?}: the key must be an event field (dimensions join on event fields only)", d.key);
        return Err(invalid(key("key"), why));
    }
    if d.fields.is_empty() {
        return Err(invalid(key("fields"), "names no field"));
    }
    for (j, f) in d.fields.iter().enumerate() {
        if f.is_empty() || f == &d.key || d.fields[..j].contains(f) {
            return Err(invalid(key("fields"), format!("{f:?}: empty, the key, or listed twice")));
        }
        let enriched = format!("{}.{f}", d.name);
        // A source whose records carry a field of that name would be shadowed.
        if let Some(s) =
            sources.iter().find(|s| !matches!(s.format, Format::Jsonl | Format::Rows) && s.can_supply(&enriched))
        {
            let why = format!("{enriched:?} collides with a field of source {:?}", s.name);
            return Err(invalid(key("fields"), why));
        }
        if sources.iter().any(|s| s.ts_field == enriched || s.did_field == enriched) {
            return Err(invalid(key("fields"), format!("{enriched:?} collides with an event time or device id field")));
        }
    }
    let on_missing = match d.on_missing.as_deref().unwrap_or("null") {
        "null" => OnMissing::Null,
        "drop" => OnMissing::Drop,
        other => return Err(invalid(key("on_missing"), format!("unknown value {other:?} (expected null, drop)"))),
    };
    Ok(DimensionSpec {
        name: d.name.clone(),
        path,
        format,
        kafka,
        redis,
        key: d.key.clone(),
        fields: d.fields.clone(),
        on_missing,
    })
}

fn build_source(i: usize, s: &RawSource, base: &Path) -> Result<SourceSpec, Invalid> {
    let key = |k: &str| format!("source[{i}].{k}");
    match s.kind.as_str() {
        "file" | "kafka" | "tcp" => {}
        other => {
            return Err(invalid(
                key("kind"),
                format!("unknown source kind {other:?} (expected \"file\", \"kafka\" or \"tcp\")"),
            ))
        }
    }
    let kafka = if s.kind == "kafka" { Some(build_kafka(s, &key)?) } else { None };
    let tcp = if s.kind == "tcp" { Some(build_tcp(s, &key)?) } else { None };
    let only = |k: &str, kinds: &str| Err(invalid(key(k), format!("not a key of a {:?} source ({kinds})", s.kind)));
    if s.kind != "file" && s.path.is_some() {
        return only("path", "only a file source reads `path`");
    }
    if s.kind != "kafka" {
        let kafka_keys = [
            ("brokers", s.brokers.is_some()),
            ("topic", s.topic.is_some()),
            ("group_id", s.group_id.is_some()),
            ("start", s.start.is_some()),
            ("stop", s.stop.is_some()),
            ("group_settle", s.group_settle.is_some()),
            ("properties", s.properties.is_some()),
        ];
        if let Some((k, _)) = kafka_keys.iter().find(|(_, set)| *set) {
            return only(k, "only a `kind = \"kafka\"` source takes it");
        }
    }
    if s.kind != "tcp" {
        if let Some((k, _)) = [("listen", s.listen.is_some()), ("max_connections", s.max_connections.is_some())]
            .iter()
            .find(|(_, set)| *set)
        {
            return only(k, "only a `kind = \"tcp\"` source takes it");
        }
    }
    if s.max_events_per_second == Some(0) {
        return Err(invalid(key("max_events_per_second"), "must be at least 1"));
    }
    let follow = s.follow == Some(true);
    if s.follow.is_some() && s.kind != "file" {
        return only("follow", "only a file source can be followed");
    }
    if s.kind == "file" && !follow {
        if let Some((k, _)) = [
            ("idle_timeout", s.idle_timeout.is_some()),
            ("csv_columns", s.csv_columns.is_some()),
            ("max_events_per_second", s.max_events_per_second.is_some()),
        ]
        .iter()
        .find(|(_, set)| *set)
        {
            return only(k, "only a Kafka, TCP or followed file source takes it");
        }
    }
    let stream = kafka.is_some() || tcp.is_some() || follow;
    let format = match s.format.as_deref().unwrap_or("jsonl") {
        "jsonl" => Format::Jsonl,
        "csv" => Format::Csv,
        "binary" => Format::Binary,
        "rows" => Format::Rows,
        other => {
            return Err(invalid(
                key("format"),
                format!("unknown format {other:?} (expected jsonl, csv, binary or rows)"),
            ))
        }
    };
    if format == Format::Rows {
        for (k, set) in [("ts_field", s.ts_field.is_some()), ("did_field", s.did_field.is_some())] {
            if set {
                let why = "a rows source takes event time from each row's window and identity from its upsert key";
                return Err(invalid(key(k), why));
            }
        }
    }
    let paths = match (&s.path, stream) {
        (_, true) if !follow => Vec::new(),
        (None, _) => return Err(invalid(key("path"), "a file source needs `path`")),
        (Some(p), _) => expand_paths(&one_or_many(p), base).map_err(|r| invalid(key("path"), r))?,
    };
    let (paths, follow) = if follow {
        if !matches!(format, Format::Jsonl | Format::Rows) {
            return Err(invalid(key("follow"), "a followed file is read as JSON lines or rows"));
        }
        (Vec::new(), Some(FollowSpec { paths, idle_timeout_ms: idle_timeout(s, &key)? }))
    } else {
        (paths, None)
    };
    let max_out_of_orderness_ms = match &s.max_out_of_orderness {
        Some(d) => parse_duration_ms(d).map_err(|r| invalid(key("max_out_of_orderness"), r))?,
        None => 0,
    };
    let max_line_bytes = s.max_line_bytes.unwrap_or(MAX_LINE_BYTES_DEFAULT);
    if max_line_bytes < 16 {
        return Err(invalid(key("max_line_bytes"), "must be at least 16"));
    }
    let binary_dims = match &s.binary_dims {
        None => default_binary_dims(),
        Some(names) => <[String; BINARY_DIMS]>::try_from(names.clone())
            .map_err(|_| invalid(key("binary_dims"), format!("needs exactly {BINARY_DIMS} names")))?,
    };
    let csv_header = match (format, stream) {
        (Format::Csv, false) => Some(read_csv_header(&paths[0]).map_err(|r| invalid(key("path"), r))?),
        (Format::Csv, true) => match &s.csv_columns {
            Some(c) if !c.is_empty() => Some(c.clone()),
            _ => {
                return Err(invalid(
                    key("csv_columns"),
                    "a CSV Kafka or TCP source needs its column names (its records carry no header)",
                ))
            }
        },
        (_, true) if s.csv_columns.is_some() => {
            return Err(invalid(key("csv_columns"), "only a `format = \"csv\"` source takes this key"))
        }
        _ => None,
    };
    Ok(SourceSpec {
        name: s.name.clone(),
        paths,
        format,
        max_out_of_orderness_ms,
        max_line_bytes,
        ts_field: s.ts_field.clone().unwrap_or_else(|| "ts".into()),
        did_field: s.did_field.clone().unwrap_or_else(|| "did".into()),
        binary_dims,
        csv_header,
        kafka,
        tcp,
        follow,
        max_events_per_second: s.max_events_per_second,
    })
}

fn one_or_many(v: &OneOrMany) -> Vec<String> {
    match v {
        OneOrMany::One(p) => vec![p.clone()],
        OneOrMany::Many(ps) => ps.clone(),
    }
}

fn build_kafka(s: &RawSource, key: &dyn Fn(&str) -> String) -> Result<KafkaSpec, Invalid> {
    let brokers = match &s.brokers {
        Some(b) if !b.trim().is_empty() => b.clone(),
        _ => return Err(invalid(key("brokers"), "a Kafka source needs `brokers` (host:port, comma-separated)")),
    };
    let topics = match &s.topic {
        None => return Err(invalid(key("topic"), "a Kafka source needs `topic` (a name or a list)")),
        Some(t) => one_or_many(t),
    };
    if topics.is_empty() || topics.iter().any(|t| t.is_empty()) {
        return Err(invalid(key("topic"), "topic names must not be empty"));
    }
    if topics.iter().enumerate().any(|(i, t)| topics[..i].contains(t)) {
        return Err(invalid(key("topic"), "a topic is listed twice"));
    }
    let group_id = match &s.group_id {
        Some(g) if !g.is_empty() => g.clone(),
        _ => return Err(invalid(key("group_id"), "a Kafka source needs `group_id` (its consumer group)")),
    };
    let start = match s.start.as_deref().unwrap_or("committed") {
        "committed" => KafkaStart::Committed,
        "earliest" => KafkaStart::Earliest,
        "latest" => KafkaStart::Latest,
        other => {
            return Err(invalid(
                key("start"),
                format!("unknown start {other:?} (expected committed, earliest, latest)"),
            ))
        }
    };
    let stop = match s.stop.as_deref().unwrap_or("never") {
        "never" => KafkaStop::Never,
        "caught_up" => KafkaStop::CaughtUp,
        other => return Err(invalid(key("stop"), format!("unknown stop {other:?} (expected never, caught_up)"))),
    };
    let idle_timeout_ms = idle_timeout(s, key)?;
    let group_settle_ms = match &s.group_settle {
        None => 0,
        Some(d) => parse_duration_ms(d).map_err(|r| invalid(key("group_settle"), r))?,
    };
    let properties = properties(s.properties.as_ref(), key, &KAFKA_RESERVED_PROPERTIES)?;
    Ok(KafkaSpec { brokers, topics, group_id, start, stop, idle_timeout_ms, group_settle_ms, properties })
}

/// A stream source's `idle_timeout` (default [`STREAM_IDLE_TIMEOUT_DEFAULT_MS`]).
fn idle_timeout(s: &RawSource, key: &dyn Fn(&str) -> String) -> Result<i64, Invalid> {
    let ms = match &s.idle_timeout {
        None => STREAM_IDLE_TIMEOUT_DEFAULT_MS,
        Some(d) => parse_duration_ms(d).map_err(|r| invalid(key("idle_timeout"), r))?,
    };
    if ms <= 0 {
        return Err(invalid(key("idle_timeout"), "must be positive"));
    }
    Ok(ms)
}

fn build_tcp(s: &RawSource, key: &dyn Fn(&str) -> String) -> Result<TcpSpec, Invalid> {
    use std::net::ToSocketAddrs;
    let Some(text) = &s.listen else {
        return Err(invalid(key("listen"), "a TCP source needs `listen` (host:port, e.g. \"127.0.0.1:9000\")"));
    };
    let listen = text
        .to_socket_addrs()
        .map_err(|e| invalid(key("listen"), format!("{text:?} is not an address to listen on: {e}")))?
        .next()
        .ok_or_else(|| invalid(key("listen"), format!("{text:?} names no address")))?;
    let max_connections = s.max_connections.unwrap_or(TCP_MAX_CONNECTIONS_DEFAULT);
    if max_connections == 0 {
        return Err(invalid(key("max_connections"), "must be at least 1"));
    }
    Ok(TcpSpec { listen, max_connections, idle_timeout_ms: idle_timeout(s, key)? })
}

/// A `properties` table of librdkafka settings, as text; `reserved` ones
/// (set by tally itself) are refused.
fn properties(
    table: Option<&toml::Table>,
    key: &dyn Fn(&str) -> String,
    reserved: &[&str],
) -> Result<Vec<(String, String)>, Invalid> {
    let mut out = Vec::new();
    for (k, v) in table.into_iter().flatten() {
        let at = || key(&format!("properties.{k:?}"));
        if reserved.contains(&k.as_str()) {
            return Err(invalid(
                at(),
                "tally sets this itself (offsets are committed with checkpoints; use `brokers`, `group_id`)",
            ));
        }
        let text = match v {
            toml::Value::String(t) => t.clone(),
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            _ => return Err(invalid(at(), "must be a string, number or boolean")),
        };
        out.push((k.clone(), text));
    }
    Ok(out)
}

/// Expands each entry (a file or a glob, relative to `base`) in order; glob
/// matches are sorted so a source's files are always read in the same order.
fn expand_paths(patterns: &[String], base: &Path) -> Result<Vec<PathBuf>, String> {
    if patterns.is_empty() {
        return Err("the list of paths is empty".into());
    }
    let mut out = Vec::new();
    for p in patterns {
        let full = base.join(p);
        if p.contains(['*', '?', '[']) {
            let text = full.to_string_lossy().into_owned();
            let mut matched: Vec<PathBuf> = glob::glob(&text)
                .map_err(|e| format!("bad glob {p:?}: {e}"))?
                .filter_map(Result::ok)
                .filter(|m| m.is_file())
                .collect();
            if matched.is_empty() {
                return Err(format!("glob {p:?} matches no file"));
            }
            matched.sort();
            out.extend(matched);
        } else {
            match std::fs::metadata(&full) {
                Ok(m) if m.is_file() => out.push(full),
                Ok(_) => return Err(format!("{} is not a file", full.display())),
                Err(e) => return Err(format!("cannot open {}: {e}", full.display())),
            }
        }
    }
    Ok(out)
}

fn read_csv_header(path: &Path) -> Result<Vec<String>, String> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(path)
        .map_err(|e| format!("cannot read CSV header of {}: {e}", path.display()))?;
    let header = rdr.headers().map_err(|e| format!("cannot read CSV header of {}: {e}", path.display()))?;
    Ok(header.iter().map(str::to_string).collect())
}

fn build_metric(
    i: usize,
    m: &RawMetric,
    sources: &[SourceSpec],
    dims: &[DimensionSpec],
    base: &Path,
) -> Result<Vec<MetricSpec>, Invalid> {
    let key = |k: &str| format!("metric[{i}].{k}");
    let only = |k: &str, set: bool, kind: &str| -> Result<(), Invalid> {
        if set {
            return Err(invalid(key(k), format!("only a `kind = \"{kind}\"` metric takes this key")));
        }
        Ok(())
    };
    if m.kind != "dau" {
        only("returning_after_days", m.returning_after_days.is_some(), "dau")?;
        only("device_history", m.device_history.is_some(), "dau")?;
        only("dedup_tolerance", m.dedup_tolerance.is_some(), "dau")?;
    }
    if m.kind != "summary" {
        only("window", m.window.is_some(), "summary")?;
        only("grouping_sets", m.grouping_sets.is_some(), "summary")?;
        only("top", m.top.is_some(), "summary")?;
    }
    let dau = match m.kind.as_str() {
        "cumulate" | "summary" => None,
        "dau" => {
            let dedup_tolerance = m.dedup_tolerance.unwrap_or(DEDUP_TOLERANCE_DEFAULT);
            if dedup_tolerance > TOLERANCE_MAX {
                return Err(invalid(key("dedup_tolerance"), format!("at most {TOLERANCE_MAX} steps")));
            }
            if sources.len() > RING_SOURCES_MAX {
                return Err(invalid(key("kind"), format!("a dau metric reads at most {RING_SOURCES_MAX} sources")));
            }
            Some(DauSpec {
                returning_after_days: m.returning_after_days.unwrap_or(RETURNING_AFTER_DAYS_DEFAULT),
                device_history: m.device_history.as_ref().map(|p| base.join(p)),
                dedup_tolerance,
            })
        }
        other => {
            return Err(invalid(
                key("kind"),
                format!("unknown metric kind {other:?} (expected \"cumulate\", \"dau\" or \"summary\")"),
            ))
        }
    };
    let summary = m.kind == "summary";
    let mut values: Vec<String> = Vec::new();
    let measures = if summary {
        let list = m.measures.clone().unwrap_or_else(|| vec!["count".into(), "uv".into()]);
        if list.is_empty() {
            return Err(invalid(key("measures"), "is empty"));
        }
        let mut out = Vec::new();
        for text in &list {
            let measure = summary_measure(text, &mut values).map_err(|r| invalid(key("measures"), r))?;
            if out.contains(&measure) {
                return Err(invalid(key("measures"), format!("{text:?} listed twice")));
            }
            out.push(measure);
        }
        out
    } else {
        let allowed: &[Measure] = match dau {
            None => &[Measure::Pv, Measure::Uv],
            Some(_) => &[Measure::Active, Measure::New, Measure::Returning],
        };
        match &m.measures {
            None => allowed.to_vec(),
            Some(list) if list.is_empty() => return Err(invalid(key("measures"), "is empty")),
            Some(list) => list
                .iter()
                .map(|name| {
                    allowed.iter().copied().find(|a| a.name() == name).ok_or_else(|| {
                        let names: Vec<&str> = allowed.iter().map(|a| a.name()).collect();
                        invalid(
                            key("measures"),
                            format!("unknown measure {name:?} for a {} metric (expected {})", m.kind, names.join(", ")),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        }
    };
    let window = match (summary, m.window.as_deref()) {
        (false, _) => None,
        (true, None | Some("tumble")) => Some(SummaryWindow::Tumble),
        (true, Some("cumulate")) => Some(SummaryWindow::Cumulate),
        (true, Some(other)) => {
            return Err(invalid(key("window"), format!("unknown window {other:?} (expected tumble, cumulate)")))
        }
    };
    let step_ms = duration_or(m.step.as_deref(), MINUTE_MS).map_err(|r| invalid(key("step"), r))?;
    if window == Some(SummaryWindow::Tumble) && m.size.is_some() {
        return Err(invalid(key("size"), "a tumble window is `step` long: `size` is for `window = \"cumulate\"`"));
    }
    let size_default = if window == Some(SummaryWindow::Tumble) { step_ms } else { DAY_MS };
    let size_ms = duration_or(m.size.as_deref(), size_default).map_err(|r| invalid(key("size"), r))?;
    if step_ms <= 0 || step_ms % MINUTE_MS != 0 {
        return Err(invalid(key("step"), "must be a whole number of minutes"));
    }
    if size_ms <= 0 || DAY_MS % size_ms != 0 && size_ms % DAY_MS != 0 || size_ms > DAY_MS {
        let k = if window == Some(SummaryWindow::Tumble) { "step" } else { "size" };
        return Err(invalid(key(k), "must divide a day (e.g. 1h, 1d)"));
    }
    if size_ms % step_ms != 0 {
        return Err(invalid(key("step"), "must divide `size` evenly"));
    }
    if dau.is_some() && size_ms != DAY_MS {
        return Err(invalid(key("size"), "a dau metric counts per day: `size` must be 1d"));
    }
    let emit = match m.emit.as_deref().unwrap_or("all") {
        "all" => Emit::All,
        "changed" => Emit::Changed,
        other => return Err(invalid(key("emit"), format!("unknown emit mode {other:?} (expected all, changed)"))),
    };
    let late = match m.late.as_deref().unwrap_or("fold") {
        "fold" => LatePolicy::Fold,
        "drop" => LatePolicy::Drop,
        other => return Err(invalid(key("late"), format!("unknown late policy {other:?} (expected fold, drop)"))),
    };
    let source_ids = source_ids(m.sources.as_deref(), sources, &key("sources"))?;
    let upsert = check_rows_sources(m, &source_ids, sources, &measures, &key)?;
    let supplied = |fields: &[String]| check_fields_supplied(fields, &source_ids, sources, dims);
    let sets = match (&m.grouping_sets, summary) {
        (_, false) => vec![m.group_by.clone()],
        (None, true) => return Err(invalid(key("grouping_sets"), "a summary metric needs `grouping_sets`")),
        (Some(_), true) if !m.group_by.is_empty() => {
            return Err(invalid(key("group_by"), "a summary metric groups by `grouping_sets`"))
        }
        (Some(sets), true) if sets.is_empty() => return Err(invalid(key("grouping_sets"), "is empty")),
        (Some(sets), true) => sets.clone(),
    };
    let sets_key = if summary { "grouping_sets" } else { "group_by" };
    for (j, set) in sets.iter().enumerate() {
        supplied(set).map_err(|r| invalid(key(sets_key), r))?;
        for (k, g) in set.iter().enumerate() {
            if set[..k].contains(g) {
                return Err(invalid(key(sets_key), format!("field {g:?} listed twice in one set")));
            }
        }
        let sorted = |s: &[String]| {
            let mut v = s.to_vec();
            v.sort();
            v
        };
        if sets[..j].iter().any(|o| sorted(o) == sorted(set)) {
            return Err(invalid(key(sets_key), format!("grouping set {set:?} listed twice")));
        }
    }
    supplied(&values).map_err(|r| invalid(key("measures"), r))?;
    let filter = match &m.filter {
        None => None,
        Some(text) => {
            let f = Filter::parse(text).map_err(|r| invalid(key("filter"), r))?;
            supplied(&f.fields()).map_err(|r| invalid(key("filter"), r))?;
            // Binary records hold dimension columns as integer codes, which
            // compare as their decimal text: 'view' can never match one.
            let binary = source_ids.iter().all(|&s| sources[s].format == Format::Binary);
            for (field, text) in f.text_comparisons() {
                let code_column = source_ids.iter().all(|&s| sources[s].binary_dims.iter().any(|d| d == field));
                if binary && code_column && text.parse::<f64>().is_err() {
                    return Err(invalid(
                        key("filter"),
                        format!(
                            "compares {field:?} with '{text}', but binary records hold {field:?} as an integer \
                             code, which never equals that text: compare with the code (e.g. {field} = 0)"
                        ),
                    ));
                }
            }
            Some(f)
        }
    };
    // A ranked list: by one of the measures, within fields every set has.
    let top = match &m.top {
        None => None,
        Some(t) => {
            if !(1..=TOP_N_MAX).contains(&t.n) {
                return Err(invalid(key("top.n"), format!("must be 1..={TOP_N_MAX}")));
            }
            let field_of = |x: &Measure| match x.value_field() {
                Some(v) => format!("{}_{}", x.name(), values[v]),
                None => x.name().to_string(),
            };
            let Some(by) = measures.iter().copied().find(|x| field_of(x) == t.by) else {
                let names: Vec<String> = measures.iter().map(field_of).collect();
                let why = format!("{:?} is not a measure of the metric ({})", t.by, names.join(", "));
                return Err(invalid(key("top.by"), why));
            };
            if let Some(f) = t.per.iter().find(|f| sets.iter().any(|s| !s.contains(f))) {
                return Err(invalid(key("top.per"), format!("field {f:?} is not in every grouping set")));
            }
            if emit == Emit::Changed {
                return Err(invalid(key("top"), "a ranked list is written whole each window: use emit = \"all\""));
            }
            Some((t.n, by, t.per.clone()))
        }
    };
    let n = sets.len();
    Ok(sets
        .into_iter()
        .enumerate()
        .map(|(set, group_by)| MetricSpec {
            name: m.name.clone(),
            summary: window.map(|window| SummarySpec {
                window,
                set,
                sets: n,
                grouping_json: serde_json::to_string(&group_by).unwrap_or_default(),
                values: values.clone(),
                top: top.as_ref().map(|(n, by, per)| TopSpec {
                    n: *n,
                    by: *by,
                    per: per.iter().filter_map(|f| group_by.iter().position(|g| g == f)).collect(),
                }),
                upsert,
            }),
            group_by,
            filter: filter.clone(),
            measures: measures.clone(),
            step_ms,
            size_ms,
            emit,
            late,
            sources: source_ids.clone(),
            dau: dau.clone(),
        })
        .collect())
}

/// Whether the metric reads result rows (`format = "rows"`): then all its
/// sources do, it is a summary, and its measures can take a replaced
/// row's value back (`count`, `sum`).
fn check_rows_sources(
    m: &RawMetric,
    source_ids: &[usize],
    sources: &[SourceSpec],
    measures: &[Measure],
    key: &dyn Fn(&str) -> String,
) -> Result<bool, Invalid> {
    let rows = source_ids.iter().filter(|&&s| sources[s].format == Format::Rows).count();
    if rows == 0 {
        return Ok(false);
    }
    if rows != source_ids.len() {
        let why = "reads both result rows (format = \"rows\") and events: list only one kind in `sources`";
        return Err(invalid(key("sources"), why));
    }
    if m.kind != "summary" {
        return Err(invalid(key("kind"), "a metric over result rows (format = \"rows\") is a `kind = \"summary\"`"));
    }
    if let Some(x) = measures.iter().find(|x| matches!(x, Measure::Uv | Measure::Min(_) | Measure::Max(_))) {
        let why =
            format!("{:?} over result rows cannot take back a replaced row's value: use count and sum(f)", x.name());
        return Err(invalid(key("measures"), why));
    }
    Ok(true)
}

/// Most rows of one ranked list.
const TOP_N_MAX: usize = 100_000;

/// A summary measure: `count`, `uv`, `sum(f)`, `min(f)`, `max(f)`; a value
/// field new to `values` is added to it.
fn summary_measure(text: &str, values: &mut Vec<String>) -> Result<Measure, String> {
    let t = text.trim();
    match t {
        "count" => return Ok(Measure::Count),
        "uv" => return Ok(Measure::Uv),
        _ => {}
    }
    let call = t.split_once('(').and_then(|(f, rest)| Some((f.trim(), rest.strip_suffix(')')?.trim())));
    let Some((func, field)) = call.filter(|(_, field)| !field.is_empty() && !field.contains([' ', '(', ')', ',']))
    else {
        return Err(format!("unknown measure {text:?} (expected count, uv, sum(field), min(field), max(field))"));
    };
    let v = match values.iter().position(|x| x == field) {
        Some(v) => v,
        None => {
            if values.len() == SUMMARY_VALUES_MAX {
                return Err(format!("at most {SUMMARY_VALUES_MAX} distinct value fields"));
            }
            values.push(field.to_string());
            values.len() - 1
        }
    } as u8;
    match func {
        "sum" => Ok(Measure::Sum(v)),
        "min" => Ok(Measure::Min(v)),
        "max" => Ok(Measure::Max(v)),
        _ => Err(format!("unknown measure {text:?} (expected count, uv, sum(field), min(field), max(field))")),
    }
}

fn duration_or(text: Option<&str>, default_ms: i64) -> Result<i64, String> {
    text.map_or(Ok(default_ms), parse_duration_ms)
}

/// Every field must be supplied by every source the metric reads (an
/// enriched field `dim.field`: its dimension's key).
fn check_fields_supplied(
    fields: &[String],
    source_ids: &[usize],
    sources: &[SourceSpec],
    dims: &[DimensionSpec],
) -> Result<(), String> {
    for f in fields {
        let dim = f.split_once('.').and_then(|(d, _)| dims.iter().find(|x| x.name == d));
        let f = match dim {
            Some(d) if d.fields.iter().any(|x| Some(x.as_str()) == f.split_once('.').map(|p| p.1)) => &d.key,
            Some(d) => return Err(format!("dimension {:?} has no field {f:?} (it has {:?})", d.name, d.fields)),
            None => f,
        };
        for &s in source_ids {
            let src = &sources[s];
            if f == &src.ts_field || f == &src.did_field {
                return Err(format!("field {f:?} is the event time or device id, not a dimension"));
            }
            if !src.can_supply(f) {
                return Err(format!(
                    "field {f:?} is not supplied by source {:?} ({} input)",
                    src.name,
                    src.format.name()
                ));
            }
        }
    }
    Ok(())
}

/// The indexes of the sources `names` lists (all sources when absent).
fn source_ids(names: Option<&[String]>, sources: &[SourceSpec], key: &str) -> Result<Vec<usize>, Invalid> {
    let Some(names) = names else { return Ok((0..sources.len()).collect()) };
    names
        .iter()
        .map(|n| {
            sources.iter().position(|s| &s.name == n).ok_or_else(|| invalid(key, format!("no source named {n:?}")))
        })
        .collect()
}

/// The events and fields of a `kind = "detail"` sink. By default every
/// source, and every field the job reads plus every dimension's fields.
fn build_events(
    i: usize,
    s: &RawSink,
    sources: &[SourceSpec],
    dimensions: &[DimensionSpec],
    metrics: &[MetricSpec],
) -> Result<EventsSpec, Invalid> {
    let key = |k: &str| format!("sink[{i}].{k}");
    let ids = source_ids(s.sources.as_deref(), sources, &key("sources"))?;
    let reserved = |f: &str| {
        f == "source" || f == "ts" || f == "did" || sources.iter().any(|s| s.ts_field == f || s.did_field == f)
    };
    let fields = match &s.fields {
        Some(fields) => {
            for (j, f) in fields.iter().enumerate() {
                if f.is_empty() || fields[..j].contains(f) || reserved(f) {
                    let why = format!("{f:?}: empty, listed twice, or the event time / device id (always written)");
                    return Err(invalid(key("fields"), why));
                }
                let (name, field) = f.split_once('.').unwrap_or((f, ""));
                let known = match dimensions.iter().find(|d| d.name == name) {
                    Some(d) => d.fields.iter().any(|x| x == field),
                    None => !f.contains('.') && ids.iter().any(|&s| sources[s].can_supply(f)),
                };
                if !known {
                    return Err(invalid(key("fields"), format!("{f:?}: no source or dimension supplies it")));
                }
            }
            fields.clone()
        }
        None => {
            let mut all: Vec<String> = Vec::new();
            let read = metrics.iter().flat_map(|m| {
                let filter = m.filter.as_ref().map(|f| f.fields()).unwrap_or_default();
                m.group_by.iter().cloned().chain(filter).chain(m.value_fields().iter().cloned()).collect::<Vec<_>>()
            });
            let dims = dimensions
                .iter()
                .flat_map(|d| std::iter::once(d.key.clone()).chain((0..d.fields.len()).map(|f| d.field_name(f))));
            for f in read.chain(dims) {
                if !all.contains(&f) && !reserved(&f) {
                    all.push(f);
                }
            }
            all
        }
    };
    Ok(EventsSpec { sources: ids, fields })
}

fn build_sink(i: usize, s: &RawSink, metrics: &[MetricSpec], base: &Path) -> Result<SinkSpec, Invalid> {
    let key = |k: &str| format!("sink[{i}].{k}");
    let events = s.kind == "detail";
    let detail = s.kind == "minute_devices" || events;
    if !events {
        for (k, set) in [("sources", s.sources.is_some()), ("fields", s.fields.is_some())] {
            if set {
                return Err(invalid(key(k), "only a `kind = \"detail\"` sink takes this key"));
            }
        }
    } else if s.metrics.is_some() {
        return Err(invalid(key("metrics"), "a detail sink writes events, not metrics (choose `sources`)"));
    }
    // A detail sink goes to a topic when given one, else a file.
    let kind = match s.kind.as_str() {
        "minute_devices" | "detail" if s.brokers.is_some() || s.topic.is_some() => "kafka",
        "minute_devices" | "detail" => "jsonl",
        other => other,
    };
    if kind != "redis" {
        let redis_keys = [
            ("url", s.url.is_some()),
            ("key_prefix", s.key_prefix.is_some()),
            ("ttl", s.ttl.is_some()),
            ("curve", s.curve.is_some()),
        ];
        if let Some((k, _)) = redis_keys.iter().find(|(_, set)| *set) {
            return Err(invalid(key(k), "only a `kind = \"redis\"` sink takes this key"));
        }
    }
    let target = match kind {
        "jsonl" => {
            if let Some(k) =
                [("brokers", s.brokers.is_some()), ("topic", s.topic.is_some()), ("properties", s.properties.is_some())]
                    .iter()
                    .find_map(|&(k, set)| set.then_some(k))
            {
                return Err(invalid(key(k), "only a `kind = \"kafka\"` sink takes this key"));
            }
            match s.path.as_deref() {
                None | Some("-") => SinkTarget::Stdout,
                Some(p) => SinkTarget::File(base.join(p)),
            }
        }
        "kafka" => {
            if s.path.is_some() {
                return Err(invalid(key("path"), "a Kafka sink writes to `topic`"));
            }
            let brokers = match &s.brokers {
                Some(b) if !b.trim().is_empty() => b.clone(),
                _ => return Err(invalid(key("brokers"), "a Kafka sink needs `brokers`")),
            };
            let topic = match &s.topic {
                Some(t) if !t.is_empty() => t.clone(),
                _ => return Err(invalid(key("topic"), "a Kafka sink needs `topic`")),
            };
            let properties = properties(s.properties.as_ref(), &key, &["bootstrap.servers"])?;
            SinkTarget::Kafka(KafkaSinkSpec { brokers, topic, properties })
        }
        "redis" if !detail => {
            if let Some(k) = [
                ("path", s.path.is_some()),
                ("brokers", s.brokers.is_some()),
                ("topic", s.topic.is_some()),
                ("properties", s.properties.is_some()),
            ]
            .iter()
            .find_map(|&(k, set)| set.then_some(k))
            {
                let why = "not a key of a `kind = \"redis\"` sink (it takes url, key_prefix, ttl, curve)";
                return Err(invalid(key(k), why));
            }
            let url = match &s.url {
                Some(u) if u.starts_with("redis://") || u.starts_with("unix://") => u.clone(),
                Some(u) => return Err(invalid(key("url"), format!("{u:?} is not a redis:// URL"))),
                None => return Err(invalid(key("url"), "a Redis sink needs `url` (redis://host:port)")),
            };
            let ttl_ms = match &s.ttl {
                None => 0,
                Some(t) => parse_duration_ms(t).map_err(|r| invalid(key("ttl"), r))?,
            };
            if ttl_ms != 0 && ttl_ms < 1000 {
                return Err(invalid(key("ttl"), "at least 1s (or none)"));
            }
            let key_prefix = s.key_prefix.clone().unwrap_or_else(|| "tally:".into());
            let curve = s.curve.unwrap_or(false);
            SinkTarget::Redis(RedisSinkSpec { url, key_prefix, ttl_s: (ttl_ms / 1000) as u64, curve })
        }
        other => {
            let expected = "expected \"jsonl\", \"kafka\", \"redis\", \"minute_devices\" or \"detail\"";
            return Err(invalid(key("kind"), format!("unknown sink kind {other:?} ({expected})")));
        }
    };
    if events {
        return Ok(SinkSpec { target, metrics: Vec::new(), rows: SinkRows::Events, events: None });
    }
    let ids: Vec<usize> = match &s.metrics {
        None if detail => (0..metrics.len()).filter(|&m| metrics[m].dau.is_some()).collect(),
        None => (0..metrics.len()).collect(),
        Some(names) => {
            let mut ids = Vec::new();
            for n in names {
                // A summary's grouping sets share its name.
                let of_name: Vec<usize> = (0..metrics.len()).filter(|&m| &metrics[m].name == n).collect();
                if of_name.is_empty() {
                    return Err(invalid(key("metrics"), format!("no metric named {n:?}")));
                }
                ids.extend(of_name);
            }
            ids
        }
    };
    if detail {
        if let Some(&m) = ids.iter().find(|&&m| metrics[m].dau.is_none()) {
            let why = format!("metric {:?} is not a DAU metric: only those have a minute dedup", metrics[m].name);
            return Err(invalid(key("metrics"), why));
        }
        if ids.is_empty() {
            return Err(invalid(key("kind"), "a minute_devices sink needs a `kind = \"dau\"` metric"));
        }
    }
    let rows = if detail { SinkRows::MinuteDevices } else { SinkRows::Results };
    Ok(SinkSpec { target, metrics: ids, rows, events: None })
}

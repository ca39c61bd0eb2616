//! Kafka sink: one message per result row, keyed by `{"metric":…,"dims":…}`
//! so a compacted topic keeps each key's latest row.
//!
//! Rows are produced asynchronously (librdkafka batches them) by an
//! idempotent producer whose messages never time out: while a broker is
//! away librdkafka retries, in order, without duplicates, and a flush — at
//! every checkpoint and at the end — waits until every row is delivered
//! (saying so every few seconds). A delivery that fails for good (a row too
//! large, a topic the client may not write) stops the run with the reason:
//! rows are never dropped silently, and never re-sent out of order (which
//! would let an older row win the compaction). After a restart, rows since
//! the last checkpoint are produced again, with the same values (upserts).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use super::jsonl::SinkError;
use crate::job::{KafkaSinkSpec, MetricSpec};

/// How long a flush waits for deliveries before it looks again.
const FLUSH_WAIT: Duration = Duration::from_secs(1);
/// Least time between two log lines about deliveries.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Deliveries that failed for good.
#[derive(Default)]
struct Failed {
    count: u64,
    first_error: Option<String>,
    logged: Option<Instant>,
}

struct Ctx {
    name: String,
    failed: Mutex<Failed>,
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            f.logged = Some(Instant::now());
            eprintln!("tally: sink {}: kafka: {error}: {reason} (retrying)", self.name);
        }
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, msg)) = result {
            let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            f.count += 1;
            if f.first_error.is_none() {
                let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
                f.first_error = Some(format!("{e} (row of {key})"));
            }
        }
    }
}

/// Result rows to a Kafka topic.
pub struct KafkaSink {
    producer: rdkafka::producer::BaseProducer<Ctx>,
    topic: String,
    /// Per metric: whether it goes here, and its name as JSON (for keys).
    metrics: Vec<Option<String>>,
    pub rows: u64,
    pub bytes: u64,
    name: String,
    key: Vec<u8>,
}

impl KafkaSink {
    /// Creates the producer (bad settings fail here, before the run).
    pub fn open(spec: &KafkaSinkSpec, wanted: &[usize], metrics: &[MetricSpec]) -> Result<KafkaSink, SinkError> {
        let name = format!("kafka:{}", spec.topic);
        let mut cfg = ClientConfig::new();
        // Retry until delivered, in order, once each (a user may override).
        cfg.set("message.timeout.ms", "0")
            .set("enable.idempotence", "true")
            .set("linger.ms", "20")
            .set("client.id", "tally-sink");
        for (k, v) in &spec.properties {
            cfg.set(k, v);
        }
        cfg.set("bootstrap.servers", &spec.brokers);
        let ctx = Ctx { name: name.clone(), failed: Mutex::default() };
        let producer = cfg.create_with_context(ctx).map_err(|e| SinkError {
            name: name.clone(),
            source: std::io::Error::other(format!("bad producer settings: {e}")),
        })?;
        let names = metrics
            .iter()
            .enumerate()
            .map(|(m, spec)| wanted.contains(&m).then(|| serde_json::Value::from(spec.name.as_str()).to_string()))
            .collect();
        Ok(KafkaSink { producer, topic: spec.topic.clone(), metrics: names, rows: 0, bytes: 0, name, key: Vec::new() })
    }

    /// Produces one row (`line` with its end of line; `dims` its group key
    /// as JSON), waiting while librdkafka's queue is full.
    pub fn write(&mut self, metric: usize, line: &str, dims: &str) -> Result<(), SinkError> {
        let Some(Some(name)) = self.metrics.get(metric) else {
            return Ok(());
        };
        self.key.clear();
        self.key.extend_from_slice(b"{\"metric\":");
        self.key.extend_from_slice(name.as_bytes());
        self.key.extend_from_slice(b",\"dims\":");
        self.key.extend_from_slice(dims.as_bytes());
        self.key.push(b'}');
        self.produce(line)
    }

    /// Produces a `minute_devices` row keyed by its device id (`did`: the
    /// id as a JSON string), so one device's rows share a partition.
    pub fn write_detail(&mut self, metric: usize, line: &str, did: &str) -> Result<(), SinkError> {
        if !matches!(self.metrics.get(metric), Some(Some(_))) {
            return Ok(());
        }
        self.key.clear();
        // Plain ids are rendered as-is between quotes; others are decoded.
        match did.strip_prefix('"').and_then(|d| d.strip_suffix('"')) {
            Some(id) if !id.contains('\\') => self.key.extend_from_slice(id.as_bytes()),
            _ => match serde_json::from_str::<String>(did) {
                Ok(id) => self.key.extend_from_slice(id.as_bytes()),
                Err(_) => self.key.extend_from_slice(did.as_bytes()),
            },
        }
        self.produce(line)
    }

    /// Produces an event of a detail sink keyed by its device id.
    pub fn write_event(&mut self, line: &[u8], did: &[u8]) -> Result<(), SinkError> {
        self.key.clear();
        self.key.extend_from_slice(did);
        self.produce(line)
    }

    /// Produces `line` under `self.key`.
    fn produce(&mut self, line: impl AsRef<[u8]>) -> Result<(), SinkError> {
        let line = line.as_ref();
        let payload = line.strip_suffix(b"\n").unwrap_or(line);
        self.rows += 1;
        self.bytes += payload.len() as u64;
        loop {
            match self.producer.send(BaseRecord::to(&self.topic).key(&self.key).payload(payload)) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => {
                    let key = String::from_utf8_lossy(&self.key);
                    return Err(self.error(format!("cannot produce the row of {key}: {e}")));
                }
            }
        }
        self.producer.poll(Duration::ZERO);
        self.check()
    }

    fn error(&self, why: String) -> SinkError {
        SinkError { name: self.name.clone(), source: std::io::Error::other(why) }
    }

    /// Fails if a delivery failed for good.
    fn check(&self) -> Result<(), SinkError> {
        let f = self.ctx().failed.lock().unwrap_or_else(|p| p.into_inner());
        match (&f.first_error, f.count) {
            (Some(e), n) => Err(self.error(format!(
                "{n} row(s) could not be delivered, first: {e}; stopping (resume from the last checkpoint once fixed)"
            ))),
            (None, _) => Ok(()),
        }
    }

    fn ctx(&self) -> &Ctx {
        self.producer.context()
    }

    /// Waits until every row produced so far is delivered.
    pub fn flush(&mut self) -> Result<(), SinkError> {
        let mut said = Instant::now();
        while self.producer.flush(FLUSH_WAIT).is_err() || self.producer.in_flight_count() > 0 {
            self.check()?;
            if said.elapsed() >= LOG_EVERY {
                said = Instant::now();
                eprintln!(
                    "tally: sink {}: waiting for {} row(s) to be delivered (the broker is retried)",
                    self.name,
                    self.producer.in_flight_count()
                );
            }
        }
        self.check()
    }
}

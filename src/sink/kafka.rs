//! Kafka sink: one message per result row, keyed by `{"metric":…,"dims":…}`
//! so a compacted topic keeps each key's latest row.
//!
//! Rows are produced asynchronously (librdkafka batches them); a flush —
//! at every checkpoint and at the end — waits until each row is delivered.
//! A row whose delivery fails, after librdkafka's own retries, is produced
//! again at the next flush, which does not return until everything is
//! delivered: rows are never dropped, and the failures are logged (at most
//! every few seconds) and counted. After a restart, rows since the last
//! checkpoint are produced again with the same values (upserts).

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
/// Least time between two log lines about failed deliveries.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Rows whose delivery failed, to produce again: (key, payload).
#[derive(Default)]
struct Failed {
    rows: Vec<(Vec<u8>, Vec<u8>)>,
    count: u64,
    last_error: Option<String>,
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
            f.last_error = Some(e.to_string());
            let key = msg.key().unwrap_or_default().to_vec();
            f.rows.push((key, msg.payload().unwrap_or_default().to_vec()));
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
        cfg.set("message.timeout.ms", "30000").set("linger.ms", "20").set("client.id", "tally-sink");
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
        let payload = line.trim_end_matches('\n').as_bytes();
        self.rows += 1;
        self.bytes += payload.len() as u64;
        let key = std::mem::take(&mut self.key);
        self.produce(&key, payload);
        self.key = key;
        Ok(())
    }

    fn produce(&self, key: &[u8], payload: &[u8]) {
        loop {
            match self.producer.send(BaseRecord::to(&self.topic).key(key).payload(payload)) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => {
                    // Not retriable by waiting (e.g. a message too large):
                    // count it with the failed rows and try again at flush.
                    let mut f = self.ctx().failed.lock().unwrap_or_else(|p| p.into_inner());
                    f.count += 1;
                    f.last_error = Some(e.to_string());
                    f.rows.push((key.to_vec(), payload.to_vec()));
                    break;
                }
            }
        }
        self.producer.poll(Duration::ZERO);
    }

    fn ctx(&self) -> &Ctx {
        self.producer.context()
    }

    /// Waits until every row produced so far is delivered, producing
    /// failed ones again; returns only then.
    pub fn flush(&mut self) -> Result<(), SinkError> {
        loop {
            let _ = self.producer.flush(FLUSH_WAIT);
            let retry = {
                let mut f = self.ctx().failed.lock().unwrap_or_else(|p| p.into_inner());
                let rows = std::mem::take(&mut f.rows);
                if !rows.is_empty() && f.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    f.logged = Some(Instant::now());
                    eprintln!(
                        "tally: sink {}: {} row(s) not delivered ({} failures so far, last: {}); producing them again",
                        self.name,
                        rows.len(),
                        f.count,
                        f.last_error.as_deref().unwrap_or("?")
                    );
                }
                rows
            };
            for (key, payload) in &retry {
                self.produce(key, payload);
            }
            if retry.is_empty() && self.producer.in_flight_count() == 0 {
                return Ok(());
            }
        }
    }

    /// Deliveries that failed (and were produced again).
    pub fn failures(&self) -> u64 {
        self.ctx().failed.lock().unwrap_or_else(|p| p.into_inner()).count
    }
}

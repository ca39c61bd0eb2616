//! A dimension read from a changelog topic (`kind = "kafka"`): each
//! message is keyed by the join key's text and holds a JSON object of the
//! fields (the latest message per key is the row); a message without a
//! value (a tombstone) deletes its key. A message without a key takes it
//! from the object's key field.
//!
//! [`start`] reads every partition from the beginning to its end before the
//! run starts (so the first events already see the table), then a thread
//! keeps reading and publishes a new table at most every
//! [`PUBLISH_EVERY`] while messages change it. Like a file dimension, a
//! lookup sees the table as it was when the event was routed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

use super::{json_cell, key_text, DimExample, DimHandle, DimTable, LoadReport, EXAMPLES_MAX};
use crate::job::filter::FieldValue;
use crate::job::DimensionSpec;

/// Longest the topic may take to be read to its end at start.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Least time between two tables published while the topic changes.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(200);
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The reader of a changelog dimension; stops when dropped.
pub struct KafkaDim {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for KafkaDim {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The table as the messages so far make it.
struct Changelog {
    spec: DimensionSpec,
    rows: AHashMap<Vec<u8>, Vec<Value>>,
    report: LoadReport,
}

impl Changelog {
    fn apply(&mut self, key: Option<&[u8]>, value: Option<&[u8]>, at: String) -> bool {
        let Some(value) = value else {
            return match key {
                Some(k) => self.rows.remove(k).is_some(),
                None => self.skip(at, "a tombstone without a key".into()),
            };
        };
        let obj = match serde_json::from_slice::<Value>(value) {
            Ok(Value::Object(o)) => o,
            Ok(_) => return self.skip(at, "not a JSON object".into()),
            Err(e) => return self.skip(at, format!("invalid JSON: {e}")),
        };
        let mut buf = [0u8; 32];
        let key = match key {
            Some(k) if !k.is_empty() => k.to_vec(),
            _ => match obj.get(&self.spec.key).map(json_cell) {
                Some(v @ (FieldValue::Str(_) | FieldValue::Int(_))) => {
                    key_text(v, &mut buf).map(<[u8]>::to_vec).unwrap_or_default()
                }
                _ => Vec::new(),
            },
        };
        if key.is_empty() {
            return self.skip(at, format!("no message key and no {:?} in the value", self.spec.key));
        }
        let row = self.spec.fields.iter().map(|f| obj.get(f).cloned().unwrap_or(Value::Null)).collect();
        self.rows.insert(key, row);
        true
    }

    fn skip(&mut self, at: String, reason: String) -> bool {
        self.report.malformed += 1;
        if self.report.examples.len() < EXAMPLES_MAX {
            self.report.examples.push(DimExample { at, reason });
        }
        false
    }

    fn table(&mut self) -> (DimTable, LoadReport) {
        let mut t = DimTable { fields: self.spec.fields.len(), ..DimTable::default() };
        for (key, row) in &self.rows {
            for v in row {
                t.push_cell(json_cell(v));
            }
            t.finish_row(key);
        }
        t.seal();
        self.report.rows = self.rows.len() as u64;
        (t, self.report.clone())
    }
}

/// Reads the topic to its end, publishes the table into `handle`, and
/// starts the thread that follows it.
pub fn start(spec: &DimensionSpec, handle: Arc<DimHandle>) -> Result<KafkaDim, String> {
    let Some(k) = &spec.kafka else {
        return Err("not a Kafka dimension".into());
    };
    let mut cfg = ClientConfig::new();
    cfg.set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .set("client.id", format!("tally-dim-{}", spec.name))
        .set("group.id", format!("tally-dim-{}", spec.name));
    for (key, value) in &k.properties {
        cfg.set(key, value);
    }
    cfg.set("bootstrap.servers", &k.brokers).set("enable.auto.commit", "false").set("enable.partition.eof", "true");
    let consumer: BaseConsumer = cfg.create().map_err(|e| format!("bad consumer settings: {e}"))?;
    let meta = consumer
        .fetch_metadata(Some(&k.topic), METADATA_TIMEOUT)
        .map_err(|e| format!("topic {:?} on {}: {e}", k.topic, k.brokers))?;
    let parts: Vec<i32> = meta
        .topics()
        .iter()
        .filter(|t| t.name() == k.topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if parts.is_empty() {
        return Err(format!("topic {:?} has no partitions on {} (does it exist?)", k.topic, k.brokers));
    }
    let mut tpl = TopicPartitionList::new();
    for &p in &parts {
        tpl.add_partition_offset(&k.topic, p, Offset::Beginning).map_err(|e| e.to_string())?;
    }
    consumer.assign(&tpl).map_err(|e| format!("cannot read topic {:?}: {e}", k.topic))?;
    let mut log = Changelog { spec: spec.clone(), rows: AHashMap::new(), report: LoadReport::default() };
    // Catch up: every partition read to its end once.
    let mut at_end = vec![false; parts.len()];
    let started = Instant::now();
    while at_end.iter().any(|e| !e) {
        if started.elapsed() > CATCH_UP_TIMEOUT {
            return Err(format!("topic {:?} not read to its end within {CATCH_UP_TIMEOUT:?}", k.topic));
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                let at = format!("{}[{}]@{}", m.topic(), m.partition(), m.offset());
                log.apply(m.key(), m.payload(), at);
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if let Some(i) = parts.iter().position(|&x| x == p) {
                    at_end[i] = true;
                }
            }
            Some(Err(e)) => return Err(format!("reading topic {:?}: {e}", k.topic)),
        }
    }
    let (table, report) = log.table();
    handle.publish(table, report);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let name = spec.name.clone();
    let thread = std::thread::Builder::new()
        .name(format!("tally-dim-{name}"))
        .spawn(move || {
            let mut dirty = false;
            let mut published = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                match consumer.poll(Duration::from_millis(50)) {
                    Some(Ok(m)) => {
                        let at = format!("{}[{}]@{}", m.topic(), m.partition(), m.offset());
                        dirty |= log.apply(m.key(), m.payload(), at);
                    }
                    Some(Err(KafkaError::PartitionEOF(_))) | None => {}
                    Some(Err(e)) => eprintln!("tally: dimension {name:?}: {e} (retrying)"),
                }
                if dirty && published.elapsed() >= PUBLISH_EVERY {
                    let (table, report) = log.table();
                    handle.publish(table, report);
                    dirty = false;
                    published = Instant::now();
                }
            }
        })
        .map_err(|e| format!("cannot start the reader thread: {e}"))?;
    Ok(KafkaDim { stop, thread: Some(thread) })
}

//! Sinks: where result rows go. Each consumes rendered rows; a flush (at
//! every checkpoint and at the end) makes everything written so far
//! durable or delivered.

pub mod jsonl;
pub mod kafka;
pub mod redis;

use crate::job::{Job, SinkRows, SinkSpec, SinkTarget};
use crate::metric::cumulate::Row;
use crate::runtime::EventLines;
use crate::serve::Live;
use jsonl::{JsonlSink, SinkError};
use kafka::KafkaSink;
use redis::RedisSink;
use std::sync::Arc;

/// One `[[sink]]` of a job: where its rows go, and which rows it takes.
pub struct Sink {
    out: Out,
    rows: SinkRows,
}

enum Out {
    Jsonl(JsonlSink),
    Kafka(KafkaSink),
    Redis(Box<RedisSink>),
    /// `tally serve`'s latest rows (not a `[[sink]]`: counts no rows).
    Live(Arc<Live>),
}

impl Sink {
    /// Opens a sink before anything runs; `resume_bytes` is what a resumed
    /// checkpoint had written to a file sink.
    pub fn open(spec: &SinkSpec, job: &Job, resume_bytes: Option<u64>) -> Result<Sink, SinkError> {
        let out = match &spec.target {
            SinkTarget::Kafka(k) => KafkaSink::open(k, &spec.metrics, &job.metrics).map(Out::Kafka),
            SinkTarget::Redis(r) => RedisSink::open(r, &spec.metrics, &job.metrics).map(|s| Out::Redis(Box::new(s))),
            _ => JsonlSink::open(spec, job.metrics.len(), resume_bytes).map(Out::Jsonl),
        }?;
        Ok(Sink { out, rows: spec.rows })
    }

    /// The rows `tally serve` answers from.
    pub fn live(live: Arc<Live>) -> Sink {
        Sink { out: Out::Live(live), rows: SinkRows::Results }
    }

    /// A window row (ignored by a `minute_devices` sink).
    pub fn write(&mut self, row: &Row) -> Result<(), SinkError> {
        if self.rows != SinkRows::Results {
            return Ok(());
        }
        match &mut self.out {
            Out::Jsonl(s) => s.write(row.metric, &row.line),
            Out::Kafka(s) => s.write(row.metric, &row.line, row.key()),
            Out::Redis(s) => s.write(row.metric, &row.line, row.key()),
            Out::Live(l) => {
                l.record(row);
                Ok(())
            }
        }
    }

    /// A `minute_devices` row (ignored by other sinks); a topic's
    /// messages are keyed by the device id.
    pub fn write_detail(&mut self, row: &Row) -> Result<(), SinkError> {
        if self.rows != SinkRows::MinuteDevices {
            return Ok(());
        }
        match &mut self.out {
            Out::Jsonl(s) => s.write(row.metric, &row.line),
            Out::Kafka(s) => s.write_detail(row.metric, &row.line, row.key()),
            // Validation keeps minute_devices rows away from Redis.
            Out::Redis(_) | Out::Live(_) => Ok(()),
        }
    }

    /// A block's events (a detail sink's; ignored by others); a topic's
    /// messages are keyed by the device id.
    pub(crate) fn write_events(&mut self, lines: &EventLines) -> Result<(), SinkError> {
        if self.rows != SinkRows::Events {
            return Ok(());
        }
        match &mut self.out {
            Out::Jsonl(s) => s.write_raw(&lines.text, lines.len() as u64),
            Out::Kafka(s) => (0..lines.len()).try_for_each(|i| {
                let (line, did) = lines.line(i);
                s.write_event(line, did)
            }),
            // Validation keeps events away from Redis.
            Out::Redis(_) | Out::Live(_) => Ok(()),
        }
    }

    /// Events written by this process (a detail sink).
    pub fn event_rows(&self) -> u64 {
        if self.rows == SinkRows::Events {
            self.written()
        } else {
            0
        }
    }

    pub fn flush(&mut self) -> Result<(), SinkError> {
        match &mut self.out {
            Out::Jsonl(s) => s.flush(),
            Out::Kafka(s) => s.flush(),
            Out::Redis(s) => s.flush(),
            Out::Live(_) => Ok(()),
        }
    }

    /// Rows written by this process, of either kind.
    fn written(&self) -> u64 {
        match &self.out {
            Out::Jsonl(s) => s.rows,
            Out::Kafka(s) => s.rows,
            Out::Redis(s) => s.rows,
            Out::Live(_) => 0,
        }
    }

    /// Window rows written by this process.
    pub fn rows(&self) -> u64 {
        if self.rows == SinkRows::Results {
            self.written()
        } else {
            0
        }
    }

    /// `minute_devices` rows written by this process.
    pub fn detail_rows(&self) -> u64 {
        if self.rows == SinkRows::MinuteDevices {
            self.written()
        } else {
            0
        }
    }

    /// Bytes of output (a file sink: including what a resumed run kept).
    pub fn bytes(&self) -> u64 {
        match &self.out {
            Out::Jsonl(s) => s.bytes,
            Out::Kafka(s) => s.bytes,
            Out::Redis(s) => s.bytes,
            Out::Live(_) => 0,
        }
    }

    /// Writes sent again after the target failed (Redis).
    pub fn retries(&self) -> u64 {
        match &self.out {
            Out::Redis(s) => s.retries,
            _ => 0,
        }
    }
}

//! Sinks: where result rows go. Each consumes rendered rows; a flush (at
//! every checkpoint and at the end) makes everything written so far
//! durable or delivered.

pub mod jsonl;
pub mod kafka;

use crate::job::{Job, SinkRows, SinkSpec, SinkTarget};
use crate::metric::cumulate::Row;
use jsonl::{JsonlSink, SinkError};
use kafka::KafkaSink;

/// One `[[sink]]` of a job.
pub enum Sink {
    Jsonl(JsonlSink),
    Kafka(KafkaSink),
    /// A `minute_devices` sink: detail rows only.
    Detail(Box<Sink>),
}

impl Sink {
    /// Opens a sink before anything runs; `resume_bytes` is what a resumed
    /// checkpoint had written to a file sink.
    pub fn open(spec: &SinkSpec, job: &Job, resume_bytes: Option<u64>) -> Result<Sink, SinkError> {
        let sink = match &spec.target {
            SinkTarget::Kafka(k) => KafkaSink::open(k, &spec.metrics, &job.metrics).map(Sink::Kafka),
            _ => JsonlSink::open(spec, job.metrics.len(), resume_bytes).map(Sink::Jsonl),
        }?;
        Ok(match spec.rows {
            SinkRows::Results => sink,
            SinkRows::MinuteDevices => Sink::Detail(Box::new(sink)),
        })
    }

    /// A window row (ignored by a `minute_devices` sink).
    pub fn write(&mut self, row: &Row) -> Result<(), SinkError> {
        match self {
            Sink::Jsonl(s) => s.write(row.metric, &row.line),
            Sink::Kafka(s) => s.write(row.metric, &row.line, row.dims()),
            Sink::Detail(_) => Ok(()),
        }
    }

    /// A `minute_devices` row (ignored by other sinks); a topic's
    /// messages are keyed by the device id.
    pub fn write_detail(&mut self, row: &Row) -> Result<(), SinkError> {
        match self {
            Sink::Detail(inner) => match &mut **inner {
                Sink::Jsonl(s) => s.write(row.metric, &row.line),
                Sink::Kafka(s) => s.write_detail(row.metric, &row.line, row.dims()),
                Sink::Detail(_) => Ok(()),
            },
            _ => Ok(()),
        }
    }

    pub fn flush(&mut self) -> Result<(), SinkError> {
        match self {
            Sink::Jsonl(s) => s.flush(),
            Sink::Kafka(s) => s.flush(),
            Sink::Detail(s) => s.flush(),
        }
    }

    /// Window rows written by this process.
    pub fn rows(&self) -> u64 {
        match self {
            Sink::Jsonl(s) => s.rows,
            Sink::Kafka(s) => s.rows,
            Sink::Detail(_) => 0,
        }
    }

    /// `minute_devices` rows written by this process.
    pub fn detail_rows(&self) -> u64 {
        match self {
            Sink::Detail(s) => s.rows(),
            _ => 0,
        }
    }

    /// Bytes of output (a file sink: including what a resumed run kept).
    pub fn bytes(&self) -> u64 {
        match self {
            Sink::Jsonl(s) => s.bytes,
            Sink::Kafka(s) => s.bytes,
            Sink::Detail(s) => s.bytes(),
        }
    }
}

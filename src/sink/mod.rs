//! Sinks: where result rows go. Each consumes rendered rows; a flush (at
//! every checkpoint and at the end) makes everything written so far
//! durable or delivered.

pub mod jsonl;
pub mod kafka;

use crate::job::{Job, SinkSpec, SinkTarget};
use crate::metric::cumulate::Row;
use jsonl::{JsonlSink, SinkError};
use kafka::KafkaSink;

/// One `[[sink]]` of a job.
pub enum Sink {
    Jsonl(JsonlSink),
    Kafka(KafkaSink),
}

impl Sink {
    /// Opens a sink before anything runs; `resume_bytes` is what a resumed
    /// checkpoint had written to a file sink.
    pub fn open(spec: &SinkSpec, job: &Job, resume_bytes: Option<u64>) -> Result<Sink, SinkError> {
        match &spec.target {
            SinkTarget::Kafka(k) => KafkaSink::open(k, &spec.metrics, &job.metrics).map(Sink::Kafka),
            _ => JsonlSink::open(spec, job.metrics.len(), resume_bytes).map(Sink::Jsonl),
        }
    }

    pub fn write(&mut self, row: &Row) -> Result<(), SinkError> {
        match self {
            Sink::Jsonl(s) => s.write(row.metric, &row.line),
            Sink::Kafka(s) => s.write(row.metric, &row.line, row.dims()),
        }
    }

    pub fn flush(&mut self) -> Result<(), SinkError> {
        match self {
            Sink::Jsonl(s) => s.flush(),
            Sink::Kafka(s) => s.flush(),
        }
    }

    /// Rows written by this process.
    pub fn rows(&self) -> u64 {
        match self {
            Sink::Jsonl(s) => s.rows,
            Sink::Kafka(s) => s.rows,
        }
    }

    /// Bytes of output (a file sink: including what a resumed run kept).
    pub fn bytes(&self) -> u64 {
        match self {
            Sink::Jsonl(s) => s.bytes,
            Sink::Kafka(s) => s.bytes,
        }
    }
}

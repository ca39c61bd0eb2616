//! Metrics: the per-shard logic and the emitter's merge.

pub mod cumulate;
pub mod detail;
pub mod keys;
pub mod upsert;
pub mod values;

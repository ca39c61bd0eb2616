//! Per-shard state: the dedup tables of distinct (device, key) pairs.

pub mod dedup;
pub mod table;

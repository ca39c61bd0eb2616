//! Per-shard state: the dedup tables of distinct (device, key) pairs and
//! the device history of DAU metrics, both on one open-addressing table.

pub mod dedup;
pub mod dids;
pub mod history;
pub mod ring;
pub mod snapshot;
pub mod table;

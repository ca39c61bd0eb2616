//! tally: exact real-time warehouse metrics from event logs.
pub mod checkpoint;
pub mod demo;
pub mod devices;
pub mod dim;
pub mod event;
pub mod gen;
pub mod job;
pub mod merge;
pub mod metric;
pub mod runtime;
pub mod serve;
pub mod sink;
pub mod source;
pub mod state;
pub mod verify;

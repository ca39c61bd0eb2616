//! Sinks: where result rows go.

pub mod jsonl;

//! Every end-to-end test, in one test binary.
//!
//! Each file under `tests/` used to be a binary of its own, and with the
//! release profile's thin LTO each one took about a minute of a 2-core
//! machine to link: most of a clean `cargo test --release`. One binary
//! links once. Its modules are the former files; `support` holds the
//! helpers they share.

mod support;

mod bad_input;
mod checkpoints;
mod dau;
mod exact_results;
mod kafka;
mod kafka_harness;
mod late_events;
mod layers;
mod run_options;
mod serve;
mod summary;
mod tcp;

//! Per-source counters: events, skipped records by reason with the first
//! examples, late events. Each router keeps its own; they are summed once
//! at the end.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::event::Reject;

/// Examples kept per source and reason.
pub const EXAMPLES_PER_REASON: usize = 3;
/// Bytes of a bad line shown in an example.
pub const EXAMPLE_SNIPPET_BYTES: usize = 80;

/// A skipped record, located by block and index until line numbers are
/// known.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RawExample {
    pub reason: Reject,
    pub task: usize,
    pub index: u32,
    pub snippet: String,
    /// A stream source's message: (partition index, offset).
    #[serde(default)]
    pub at: Option<(u32, i64)>,
}

/// A stream source's skipped messages in one partition.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PartRejects {
    pub rejected: u64,
    /// Offsets of the first few.
    pub offsets: Vec<i64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SourceStats {
    /// Records read (lines, or binary records), good or bad.
    pub lines: u64,
    /// Records parsed into events.
    pub events: u64,
    pub rejected: [u64; Reject::ALL.len()],
    /// Late (event, metric) records counted in a later window.
    pub late_folded: u64,
    /// Late (event, metric) records not counted.
    pub late_dropped: u64,
    pub examples: Vec<RawExample>,
    /// Stream sources: skipped messages per partition (by dense index).
    #[serde(default)]
    pub parts: Vec<PartRejects>,
    /// Per dimension: events whose join key it lacked, and of those the
    /// events dropped (`on_missing = "drop"`).
    #[serde(default)]
    pub dims: Vec<DimCount>,
    /// A rows source: (metric, row) records that came again unchanged,
    /// that replaced an earlier value, and updates too late to apply (see
    /// `metric::upsert`), since this process started.
    #[serde(default)]
    pub upserts: UpsertCount,
    /// How far events came behind the largest event time before them.
    #[serde(default)]
    pub lateness: Lateness,
}

/// Upper bounds (ms) of the lateness histogram's buckets; one more bucket
/// takes the rest.
pub const LATENESS_BOUNDS_MS: [i64; 10] =
    [0, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 300_000, 1_800_000, 3_600_000];
pub const LATENESS_BUCKETS: usize = LATENESS_BOUNDS_MS.len() + 1;

/// Out-of-order monitoring: how far each event's time is behind the
/// largest event time before it in its input order (a file source's
/// blocks in file order, a stream source's partition or connection).
/// Counts per bucket (not cumulative) and the sum of the lags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lateness {
    pub buckets: [u64; LATENESS_BUCKETS],
    pub sum_ms: u64,
}

impl Lateness {
    /// Counts the events of a block in the order read, `before` being the
    /// largest event time of the input before the block (`i64::MIN`: none).
    pub fn add_block(&mut self, before: i64, times: &[i64]) {
        let mut max = before;
        for &t in times {
            if t >= max {
                max = t;
                self.buckets[0] += 1;
            } else {
                let lag = max - t;
                self.buckets[LATENESS_BOUNDS_MS.iter().take_while(|&&b| lag > b).count()] += 1;
                self.sum_ms += lag as u64;
            }
        }
    }

    pub fn merge(&mut self, o: &Lateness) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.sum_ms += o.sum_ms;
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// What a rows source's records did to the summaries over them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpsertCount {
    pub unchanged: u64,
    pub replaced: u64,
    pub late_updates: u64,
}

/// One source's lookups in one dimension.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct DimCount {
    pub lookups: u64,
    pub missing: u64,
    pub dropped: u64,
    /// A Redis dimension: events that waited for a fetch (their key in no
    /// cache), keys found in the shared cache, keys asked of Redis, round
    /// trips (retries included), retries, keys that hold no hash.
    #[serde(default)]
    pub waited: u64,
    #[serde(default)]
    pub shared_hits: u64,
    #[serde(default)]
    pub fetched: u64,
    #[serde(default)]
    pub round_trips: u64,
    #[serde(default)]
    pub retries: u64,
    #[serde(default)]
    pub not_hashes: u64,
}

impl SourceStats {
    pub fn reject(&mut self, reason: Reject, task: usize, index: u32, snippet: &[u8]) {
        self.count_reject(reason, task, index, None, snippet);
    }

    fn count_reject(&mut self, reason: Reject, task: usize, index: u32, at: Option<(u32, i64)>, snippet: &[u8]) {
        let i = reason.index();
        self.rejected[i] += 1;
        if self.rejected[i] as usize <= EXAMPLES_PER_REASON {
            let cut = &snippet[..snippet.len().min(EXAMPLE_SNIPPET_BYTES)];
            let snippet = String::from_utf8_lossy(cut).into_owned();
            self.examples.push(RawExample { reason, task, index, snippet, at });
        }
    }

    /// A stream source's message at `offset` of partition `part` skipped.
    pub fn reject_message(&mut self, reason: Reject, part: u32, offset: i64, snippet: &[u8]) {
        self.count_reject(reason, 0, 0, Some((part, offset)), snippet);
        let p = part as usize;
        if self.parts.len() <= p {
            self.parts.resize_with(p + 1, PartRejects::default);
        }
        let pr = &mut self.parts[p];
        pr.rejected += 1;
        if pr.offsets.len() < EXAMPLES_PER_REASON {
            pr.offsets.push(offset);
        }
    }

    pub fn merge(&mut self, o: &SourceStats) {
        self.lines += o.lines;
        self.events += o.events;
        for (a, b) in self.rejected.iter_mut().zip(&o.rejected) {
            *a += b;
        }
        self.late_folded += o.late_folded;
        self.late_dropped += o.late_dropped;
        self.upserts.unchanged += o.upserts.unchanged;
        self.upserts.replaced += o.upserts.replaced;
        self.upserts.late_updates += o.upserts.late_updates;
        self.lateness.merge(&o.lateness);
        self.examples.extend(o.examples.iter().cloned());
        if self.parts.len() < o.parts.len() {
            self.parts.resize_with(o.parts.len(), PartRejects::default);
        }
        if self.dims.len() < o.dims.len() {
            self.dims.resize(o.dims.len(), DimCount::default());
        }
        for (a, b) in self.dims.iter_mut().zip(&o.dims) {
            a.lookups += b.lookups;
            a.missing += b.missing;
            a.dropped += b.dropped;
            a.waited += b.waited;
            a.shared_hits += b.shared_hits;
            a.fetched += b.fetched;
            a.round_trips += b.round_trips;
            a.retries += b.retries;
            a.not_hashes += b.not_hashes;
        }
        for (a, b) in self.parts.iter_mut().zip(&o.parts) {
            a.rejected += b.rejected;
            a.offsets.extend(&b.offsets);
            a.offsets.sort_unstable();
            a.offsets.truncate(EXAMPLES_PER_REASON);
        }
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }
}

/// A skipped record as the summary reports it.
#[derive(Clone, Debug, Serialize)]
pub struct Example {
    pub reason: &'static str,
    /// `path:line` (1-based line, or record number for binary input).
    pub at: String,
    pub snippet: String,
}

/// What a run did to one source.
#[derive(Clone, Debug, Serialize)]
pub struct SourceReport {
    pub name: String,
    pub records: u64,
    pub events: u64,
    pub rejected: u64,
    /// Skipped records per reason (only reasons that occurred).
    pub rejected_by_reason: std::collections::BTreeMap<&'static str, u64>,
    pub late_folded: u64,
    pub late_dropped: u64,
    /// A rows source: what its records did to the summaries over them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upserts: Option<UpsertCount>,
    pub examples: Vec<Example>,
    /// Stream sources: each partition read.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionReport>,
    /// Stream sources: seconds from the start of the run until the group
    /// first assigned partitions (the join; part of `seconds`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assigned_after_seconds: Option<f64>,
    /// How far events came behind the largest event time before them
    /// (absent before any event).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lateness: Option<LatenessReport>,
    /// A TCP source: its connections and bytes in this process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<crate::source::tcp::TcpReport>,
}

/// [`Lateness`] for the run summary.
#[derive(Clone, Debug, Serialize)]
pub struct LatenessReport {
    /// Upper bounds of the buckets; a last bucket takes the rest.
    pub le_seconds: Vec<f64>,
    /// Events per bucket (not cumulative): `le_seconds.len() + 1` counts.
    pub events: Vec<u64>,
    /// Events behind an earlier one (every bucket but the first).
    pub out_of_order: u64,
    pub lag_sum_seconds: f64,
}

impl Lateness {
    pub fn report(&self) -> Option<LatenessReport> {
        (self.count() > 0).then(|| LatenessReport {
            le_seconds: LATENESS_BOUNDS_MS.iter().map(|&b| b as f64 / 1e3).collect(),
            events: self.buckets.to_vec(),
            out_of_order: self.count() - self.buckets[0],
            lag_sum_seconds: self.sum_ms as f64 / 1e3,
        })
    }
}

/// What a run did to one partition of a stream source.
#[derive(Clone, Debug, Serialize)]
pub struct PartitionReport {
    /// `topic[partition]`.
    pub partition: String,
    /// Messages counted (good or bad), over every run of the state directory.
    pub messages: u64,
    pub rejected: u64,
    /// Offsets of the first skipped messages.
    pub rejected_offsets: Vec<i64>,
    /// Offset of the first message not counted (-1: none counted).
    pub next_offset: i64,
}

/// A source's counts so far, published by the routers once per block (for
/// `/metrics` while the job runs; the summary is built from [`SourceStats`]).
#[derive(Debug, Default)]
pub struct LiveCounts {
    pub records: AtomicU64,
    pub events: AtomicU64,
    pub rejected: [AtomicU64; Reject::ALL.len()],
    /// Late events placed by the routers (folded into the open window, or
    /// dropped), as blocks are judged.
    pub late_folded: AtomicU64,
    pub late_dropped: AtomicU64,
    /// [`Lateness`], as blocks are judged.
    pub lateness: [AtomicU64; LATENESS_BUCKETS],
    pub lateness_sum_ms: AtomicU64,
}

impl LiveCounts {
    /// Adds what `now` counts beyond `before` (the same router's stats
    /// before a block).
    pub fn publish(&self, before: &(u64, u64, [u64; Reject::ALL.len()]), now: &SourceStats) {
        self.records.fetch_add(now.lines - before.0, Ordering::Relaxed);
        self.events.fetch_add(now.events - before.1, Ordering::Relaxed);
        for (i, (a, b)) in now.rejected.iter().zip(&before.2).enumerate() {
            if a != b {
                self.rejected[i].fetch_add(a - b, Ordering::Relaxed);
            }
        }
    }

    /// Adds a block's lateness counts.
    pub fn publish_lateness(&self, l: &Lateness) {
        for (a, &b) in self.lateness.iter().zip(&l.buckets) {
            if b > 0 {
                a.fetch_add(b, Ordering::Relaxed);
            }
        }
        self.lateness_sum_ms.fetch_add(l.sum_ms, Ordering::Relaxed);
    }
}

impl SourceStats {
    /// What [`LiveCounts::publish`] compares against.
    pub fn mark(&self) -> (u64, u64, [u64; Reject::ALL.len()]) {
        (self.lines, self.events, self.rejected)
    }
}

/// How far the run is, for `/metrics`: the job watermark (the coordinator
/// sets it as it emits), the checkpoints committed, and each shard's
/// gauges.
#[derive(Debug)]
pub struct Progress {
    /// The job watermark (`i64::MIN`: none yet).
    pub watermark_ms: std::sync::atomic::AtomicI64,
    pub checkpoints: AtomicU64,
    /// Microseconds from the last checkpoint's pause to its commit.
    pub checkpoint_last_us: AtomicU64,
    pub checkpoint_bytes: AtomicU64,
    pub shards: Vec<ShardGauges>,
}

/// One shard's state and backlog, as last seen.
#[derive(Debug, Default)]
pub struct ShardGauges {
    /// Batches the routers queued for the shard and it did not take yet
    /// (the coordinator samples the queues every tick).
    pub queued_batches: AtomicU64,
    /// Bytes of its state (dedup tables, device histories, open minutes),
    /// as of its last watermark move.
    pub state_bytes: AtomicU64,
    pub dedup_entries: AtomicU64,
}

impl Progress {
    pub fn new(shards: usize) -> Progress {
        Progress {
            watermark_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
            checkpoints: AtomicU64::new(0),
            checkpoint_last_us: AtomicU64::new(0),
            checkpoint_bytes: AtomicU64::new(0),
            shards: (0..shards).map(|_| ShardGauges::default()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each event against the largest time before it, bucket by bucket.
    fn reference(before: i64, times: &[i64]) -> Lateness {
        let mut l = Lateness::default();
        let mut max = before;
        for &t in times {
            if max == i64::MIN || t >= max {
                l.buckets[0] += 1;
            } else {
                let lag = max - t;
                let bucket = LATENESS_BOUNDS_MS.iter().rposition(|&b| lag > b).map_or(0, |i| i + 1);
                l.buckets[bucket] += 1;
                l.sum_ms += lag as u64;
            }
            max = max.max(t);
        }
        l
    }

    #[test]
    fn lateness_buckets_each_event_by_its_lag() {
        let t0 = 1_700_000_000_000;
        let mut times = vec![t0, t0, t0 - 1, t0 + 5_000, t0 + 4_000, t0 + 3_999, t0 - 3_600_000, t0 - 7_200_000];
        // Every bucket's bounds, exactly and one past.
        let top = t0 + 10_000_000;
        times.push(top);
        for &b in &LATENESS_BOUNDS_MS {
            times.extend([top - b, top - b - 1]);
        }
        for before in [i64::MIN, t0 - 1, t0 + 60_000] {
            let mut l = Lateness::default();
            l.add_block(before, &times);
            assert_eq!(l, reference(before, &times), "before {before}");
            assert_eq!(l.count(), times.len() as u64);
        }
        let mut l = Lateness::default();
        l.add_block(i64::MIN, &[top, top - 1, top - 1_001, top - 3_600_001]);
        assert_eq!(l.buckets[..3], [1, 1, 1]);
        assert_eq!(l.buckets[LATENESS_BUCKETS - 1], 1);
        assert_eq!(l.sum_ms, 1 + 1_001 + 3_600_001);
    }
}

//! Shards: own a device-hash range, count its events per metric, and ship
//! closed slices to the emitter when their watermark passes.
//!
//! Hot path: per record one dedup probe (prefetched a few records ahead)
//! and two counter bumps. A shard's watermark is the minimum over sources
//! of the watermark of the longest run of blocks it has fully received
//! (block markers arrive in-band, after the block's records).
//!
//! With a DAU metric, a shard applies each source's blocks in their order
//! in the source (holding a block that arrives from one router before an
//! earlier one from another): its minute dedup must see a source's events
//! in input order, so what it drops depends only on the input, never on
//! thread timing or the number of workers.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;

use crossbeam::channel::Sender;

use super::coordinator::CutRequest;
use super::mesh::{next_text, Batch, BlockSeq};
use super::stats::{ShardGauges, SourceStats, UpsertCount};
use super::{Shared, ToEmitter};
use crate::checkpoint::{FileRef, PendingFile, ShardSaved};
use crate::metric::cumulate::{CumulateShard, Dau, Upserted};
use crate::metric::detail::Details;
use crate::metric::keys::KEY_BITS;
use crate::metric::upsert::Upserts;
use crate::state::dids::DidTable;
use crate::state::history::DeviceHistory;

/// Records ahead whose dedup slot is prefetched.
pub const PREFETCH_DISTANCE: usize = 16;
/// Batches taken from one router queue per poll, so routers are served fairly.
pub const BATCHES_PER_POLL: usize = 4;

/// Which blocks of a source this shard has fully received.
struct Progress {
    next_seq: BlockSeq,
    blocks: BlockSeq,
    wm_ms: i64,
    early: BTreeMap<BlockSeq, i64>,
}

impl Progress {
    fn watermark(&self) -> i64 {
        if self.next_seq == self.blocks {
            i64::MAX
        } else {
            self.wm_ms
        }
    }

    fn mark(&mut self, seq: BlockSeq, wm_ms: i64) {
        self.early.insert(seq, wm_ms);
        while let Some(wm) = self.early.remove(&self.next_seq) {
            debug_assert!(wm >= self.wm_ms, "a source watermark moved backwards");
            self.wm_ms = self.wm_ms.max(wm);
            self.next_seq += 1;
        }
    }
}

/// A shard's part of a checkpoint, copied out of its state.
pub struct ShardCheckpoint {
    pub file: FileRef,
    /// Every table file its state names (new or from earlier checkpoints).
    pub tables: Vec<FileRef>,
    /// Files to write for this checkpoint, the state file included.
    pub files: Vec<PendingFile>,
    pub bytes: u64,
}

pub struct Shard {
    s: usize,
    metrics: Vec<CumulateShard>,
    progress: Vec<Progress>,
    wm_ms: i64,
    pub state_bytes_max: usize,
    pub dedup_entries_max: usize,
    /// Per source: events a minute-dedup ring found late.
    ring_late: Vec<u64>,
    /// Per source: what upstream rows did to summaries over them.
    upserts: Vec<UpsertCount>,
    /// Apply each source's blocks in order (a DAU metric's rings need it).
    ordered: bool,
    /// Per source, when `ordered`: blocks that arrived before an earlier
    /// one, by position, with the router they came from.
    held: Vec<BTreeMap<BlockSeq, (usize, Batch)>>,
}

impl Shard {
    /// (bytes, entries) of the dedup tables of every finished period.
    pub fn closed_tables(&self) -> (usize, usize) {
        self.metrics.iter().fold((0, 0), |(b, e), m| (b + m.closed_bytes, e + m.closed_entries))
    }

    /// DAU: (bytes, entries) of the minute-dedup rings of finished days,
    /// of the device histories now, and (bytes, devices) of the id texts.
    pub fn dau_tables(&self) -> [(usize, usize); 3] {
        let mut out = [(0, 0); 3];
        for m in &self.metrics {
            out[0].0 += m.closed_rings.0;
            out[0].1 += m.closed_rings.1;
            if let Some(d) = &m.dau {
                out[1].0 += d.history.bytes();
                out[1].1 += d.history.len();
                out[2].0 += d.dids.bytes();
                out[2].1 += d.dids.len();
            }
        }
        out
    }
}

impl Shard {
    /// A shard with empty state; `live_dir` holds its tables (anonymous
    /// memory if none), `track` turns on change tracking for checkpoints.
    /// A DAU metric starts with an empty device history.
    pub fn new(s: usize, sh: &Shared, live_dir: Option<&Path>, track: bool) -> io::Result<Shard> {
        let mut metrics = Vec::with_capacity(sh.job.metrics.len());
        for (m, spec) in sh.job.metrics.iter().enumerate() {
            let dir = live_dir.map(|d| d.join(format!("shard-{s}")));
            let mut st = CumulateShard::new(sh.geometry[m], dir.clone(), format!("m{m}"), track);
            if let Some(d) = &spec.dau {
                let mut history = DeviceHistory::create(dir.clone(), format!("m{m}-history"), 0)?;
                let mut dids = DidTable::create(dir, format!("m{m}-dids"), 0)?;
                if track {
                    history.track_changes();
                    dids.track_changes();
                }
                st.dau = Some(Dau::new(history, dids, d));
                if sh.job.minute_devices(m) {
                    st.details = Some(Details::default());
                }
            }
            st.values = spec.summary.as_ref().map_or(0, |s| s.values.len());
            if spec.summary.as_ref().is_some_and(|s| s.upsert) {
                st.upserts = Some(Upserts::new(st.values));
            }
            metrics.push(st);
        }
        // A stream's length is unknown: it ends with a block whose
        // watermark is the end of time.
        let progress = sh
            .plan
            .blocks_per_source
            .iter()
            .zip(&sh.streams)
            .map(|(&blocks, stream)| Progress {
                next_seq: 0,
                blocks: if stream.is_some() { BlockSeq::MAX } else { BlockSeq::from(blocks) },
                wm_ms: i64::MIN,
                early: BTreeMap::new(),
            })
            .collect();
        Ok(Shard {
            s,
            metrics,
            progress,
            wm_ms: i64::MIN,
            state_bytes_max: 0,
            dedup_entries_max: 0,
            ring_late: vec![0; sh.job.sources.len()],
            upserts: vec![UpsertCount::default(); sh.job.sources.len()],
            // Upstream rows: the latest value of a row is the one last in
            // its source, whatever router parsed it.
            ordered: sh.job.metrics.iter().any(|m| m.dau.is_some() || m.summary.as_ref().is_some_and(|s| s.upsert)),
            held: sh.job.sources.iter().map(|_| BTreeMap::new()).collect(),
        })
    }

    /// Puts in the device history imported for DAU metric `m`.
    pub fn set_history(&mut self, m: usize, (mut history, mut dids): (DeviceHistory, DidTable), track: bool) {
        if let Some(dau) = &mut self.metrics[m].dau {
            if track {
                history.track_changes();
                dids.track_changes();
            }
            dau.history = history;
            dau.dids = dids;
        }
    }

    /// Puts back a checkpoint's state.
    pub fn restore(&mut self, saved: &ShardSaved, ckpt_dir: &Path) -> io::Result<()> {
        if saved.metrics.len() != self.metrics.len() || saved.progress.len() != self.progress.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "shard state: metrics or sources differ"));
        }
        for (m, st) in self.metrics.iter_mut().zip(&saved.metrics) {
            m.restore(st, ckpt_dir, saved.wm_ms)?;
        }
        for (p, &(next_seq, wm_ms)) in self.progress.iter_mut().zip(&saved.progress) {
            p.next_seq = next_seq;
            p.wm_ms = wm_ms;
        }
        self.wm_ms = saved.wm_ms;
        self.state_bytes_max = saved.state_bytes_max as usize;
        self.dedup_entries_max = saved.dedup_entries_max as usize;
        Ok(())
    }

    /// Re-sharding: moves the state of `old` shards (another worker count,
    /// all at the same cut) into these fresh ones.
    pub fn reshard(old: &[Shard], new: &mut [Shard]) -> io::Result<()> {
        let Some(first) = old.first() else {
            return Ok(());
        };
        for m in 0..first.metrics.len() {
            let olds: Vec<&CumulateShard> = old.iter().map(|o| &o.metrics[m]).collect();
            let mut news: Vec<&mut CumulateShard> = new.iter_mut().map(|s| &mut s.metrics[m]).collect();
            crate::metric::cumulate::reshard(&olds, &mut news, first.wm_ms)?;
        }
        for s in new.iter_mut() {
            for (p, q) in s.progress.iter_mut().zip(&first.progress) {
                p.next_seq = q.next_seq;
                p.wm_ms = q.wm_ms;
            }
            s.wm_ms = first.wm_ms;
        }
        new[0].state_bytes_max = old.iter().map(|o| o.state_bytes_max).sum();
        new[0].dedup_entries_max = old.iter().map(|o| o.dedup_entries_max).sum();
        Ok(())
    }

    /// Whether exactly `blocks[s]` blocks of every source `s` are in (and
    /// nothing past them): the shard stands at that cut.
    pub fn at_cut(&self, blocks: &[BlockSeq]) -> bool {
        self.progress.iter().zip(blocks).all(|(p, &b)| p.next_seq == b && p.early.is_empty())
            && self.held.iter().all(BTreeMap::is_empty)
    }

    /// Copies this shard's part of checkpoint `generation`: its table
    /// files and `g{generation}-s{s}.shard`, to be written into `dir`.
    pub fn checkpoint(&mut self, cut: &CutRequest) -> io::Result<ShardCheckpoint> {
        let (dir, generation) = (cut.dir.as_path(), cut.generation);
        let mut bytes = 0;
        let mut files = Vec::new();
        let mut metrics = Vec::with_capacity(self.metrics.len());
        for (m, st) in self.metrics.iter_mut().enumerate() {
            let (saved, written) =
                st.checkpoint(dir, &format!("s{}-m{m}", self.s), generation, &cut.snapshots, &mut files)?;
            bytes += written;
            metrics.push(saved);
        }
        let saved = ShardSaved {
            metrics,
            progress: self.progress.iter().map(|p| (p.next_seq, p.wm_ms)).collect(),
            wm_ms: self.wm_ms,
            state_bytes_max: self.state_bytes_max as u64,
            dedup_entries_max: self.dedup_entries_max as u64,
        };
        let (pending, file) = PendingFile::saved(dir, format!("g{generation}-s{}.shard", self.s), &saved)?;
        files.push(pending);
        bytes += file.bytes;
        let tables: Vec<FileRef> = saved
            .metrics
            .iter()
            .flat_map(|m| {
                m.tables
                    .iter()
                    .flat_map(|t| std::iter::once(t).chain(t.rings.as_deref()))
                    .chain(&m.history)
                    .flat_map(|t| std::iter::once(&t.chain.base).chain(&t.chain.deltas))
                    .chain(m.dids.iter().flat_map(|d| d.files()))
            })
            .cloned()
            .collect();
        Ok(ShardCheckpoint { file, tables, files, bytes })
    }

    /// Which shard (device-hash range) this is.
    pub fn index(&self) -> usize {
        self.s
    }

    /// True once every source is fully received and everything shipped.
    pub fn done(&self) -> bool {
        self.wm_ms == i64::MAX
    }

    /// Takes what the routers sent; returns whether anything moved.
    pub fn poll(&mut self, sh: &Shared, out: &Sender<ToEmitter>) -> io::Result<bool> {
        let mut moved = false;
        for r in 0..sh.mesh.n {
            for _ in 0..BATCHES_PER_POLL {
                let Some(batch) = sh.mesh.recv(r, self.s) else {
                    break;
                };
                moved = true;
                let source = batch.source;
                if self.ordered && batch.seq != self.progress[source].next_seq {
                    self.held[source].insert(batch.seq, (r, batch));
                    continue;
                }
                self.take(sh, r, batch)?;
                while let Some((r, b)) = self.held[source].remove(&self.progress[source].next_seq) {
                    self.take(sh, r, b)?;
                }
            }
        }
        if moved || self.wm_ms == i64::MIN {
            self.advance(out, &sh.progress.shards[self.s])?;
        }
        Ok(moved)
    }

    /// Applies one block's batch and gives it back to its router.
    fn take(&mut self, sh: &Shared, r: usize, batch: Batch) -> io::Result<()> {
        self.apply(&batch, sh.mesh.n)?;
        self.progress[batch.source].mark(batch.seq, batch.wm_ms);
        sh.mesh.give_back(r, self.s, batch);
        if r != self.s {
            sh.wake.one(r);
        }
        Ok(())
    }

    fn apply(&mut self, batch: &Batch, n: usize) -> io::Result<()> {
        let recs = &batch.records;
        let mask = (1u32 << KEY_BITS) - 1;
        let source = batch.source;
        let (mut text_at, mut vals_at) = (0, 0);
        for (i, r) in recs.iter().enumerate() {
            if let Some(ahead) = recs.get(i + PREFETCH_DISTANCE) {
                let m = &self.metrics[(ahead.key >> KEY_BITS) as usize];
                m.prefetch(ahead.device_fp, ahead.key & mask, ahead.slice, source);
            }
            debug_assert_eq!(
                ((r.device_fp as u128 * n as u128) >> 64) as usize,
                self.s,
                "record outside the shard's range"
            );
            let m = &mut self.metrics[(r.key >> KEY_BITS) as usize];
            let did = if m.dau.is_some() { next_text(&batch.texts, &mut text_at) } else { &[] };
            let vals = &batch.vals[vals_at..vals_at + m.values];
            vals_at += m.values;
            if m.upserts.is_some() {
                let u = &mut self.upserts[source];
                match m.apply_upsert(r.device_fp, r.key & mask, r.slice, vals, batch.wm_before_ms) {
                    Upserted::New => {}
                    Upserted::Unchanged => u.unchanged += 1,
                    Upserted::Replaced => u.replaced += 1,
                    Upserted::LateUpdate => u.late_updates += 1,
                }
                continue;
            }
            if !m.apply(r.device_fp, r.key & mask, r.slice, source, did, vals)? {
                self.ring_late[source] += 1;
            }
        }
        Ok(())
    }

    /// Adds what the shard dropped (events older than a DAU metric's
    /// minute-dedup ring, since this process started) to the router's
    /// counters of each source.
    pub fn add_counts(&self, stats: &mut [SourceStats]) {
        for ((st, &late), u) in stats.iter_mut().zip(&self.ring_late).zip(&self.upserts) {
            st.late_dropped += late;
            st.upserts.unchanged += u.unchanged;
            st.upserts.replaced += u.replaced;
            st.upserts.late_updates += u.late_updates;
        }
    }

    /// Moves the shard watermark and ships what it closed.
    fn advance(&mut self, out: &Sender<ToEmitter>, gauges: &ShardGauges) -> io::Result<()> {
        let wm = self.progress.iter().map(Progress::watermark).min().unwrap_or(i64::MAX);
        if wm <= self.wm_ms {
            return Ok(());
        }
        let bytes: usize = self.metrics.iter().map(CumulateShard::state_bytes).sum();
        let entries: usize = self.metrics.iter().map(CumulateShard::dedup_entries).sum();
        self.state_bytes_max = self.state_bytes_max.max(bytes);
        self.dedup_entries_max = self.dedup_entries_max.max(entries);
        gauges.state_bytes.store(bytes as u64, Ordering::Relaxed);
        gauges.dedup_entries.store(entries as u64, Ordering::Relaxed);
        self.wm_ms = wm;
        for (metric, m) in self.metrics.iter_mut().enumerate() {
            m.ship(
                wm,
                &mut |cols| {
                    let _ = out.send(ToEmitter::Slice { metric, cols });
                },
                &mut |slice, rows| {
                    let _ = out.send(ToEmitter::Details { metric, slice, rows });
                },
            )?;
        }
        let _ = out.send(ToEmitter::Watermark { shard: self.s, wm_ms: wm });
        Ok(())
    }
}

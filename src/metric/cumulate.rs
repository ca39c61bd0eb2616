//! The cumulate metric: PV and UV per group key on windows that grow by one
//! `step` from the start of each `size` period (Flink's CUMULATE window).
//!
//! A shard keeps, per open slice (one `step` of event time), two columns of
//! u32 counters indexed by key id: events (`pv`) and devices first seen in
//! that slice (`uv`, from the dedup table of the slice's period). When the
//! shard's watermark passes a slice's end it ships the columns to the
//! emitter. Shards own disjoint device ranges, so the emitter merges by
//! adding; a window's values are the prefix sum of its period's slices.
//!
//! A DAU metric (`kind = "dau"`, periods of a day) is the same machinery:
//! `active` is the `uv` column, and two more columns count the devices
//! first seen in a slice that are *new* on the day (never seen before it)
//! or *returning* (last seen more than N days before it). A device's class
//! on day D depends only on days before D, read from the shard's device
//! history (imported from a snapshot, rolled forward as each day closes).
//! So a (device, key) pair is classified when first seen if every earlier
//! day is closed already; otherwise, when the shard's watermark passes D's
//! start (closing D − 1 and rolling it into the history), one scan of D's
//! dedup table classifies every pair seen so far, before any slice of D is
//! shipped.

use std::cmp::Ordering;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{FileRef, Pending, PendingFile};
use crate::job::{DauSpec, Emit, Job, LatePolicy, Measure, MetricSpec};
use crate::state::dedup::{DedupTable, Seen, Written};
use crate::state::dids::DidTable;
use crate::state::history::DeviceHistory;
use crate::state::ring::{ring_key, Ring, RingTable};
use crate::state::snapshot::SnapshotPool;
use crate::state::table::{Slot, Table};

use super::detail::{DetailBuf, Details};
use super::keys::KeyDict;
use super::upsert::{Arrival, Counted, Upserts, UpsertsSaved};
use super::values::{Agg, Which, SUMMARY_VALUES_MAX};

/// Event-time arithmetic of one metric: slices, windows, periods.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub step_ms: i64,
    pub size_ms: i64,
    pub offset_ms: i64,
    /// `size_ms / step_ms` (a job's step divides its size): slices and
    /// periods convert without a 64-bit division, which a shard would
    /// otherwise pay on most records of a tumbling window (a period of
    /// one slice).
    slices_per_period: u32,
}

impl Geometry {
    pub fn new(job: &Job, m: &MetricSpec) -> Geometry {
        Geometry::of(m.step_ms, m.size_ms, job.timezone_offset_ms)
    }

    pub fn of(step_ms: i64, size_ms: i64, offset_ms: i64) -> Geometry {
        assert!(step_ms > 0 && size_ms % step_ms == 0, "a step of {step_ms} ms does not divide {size_ms} ms");
        Geometry { step_ms, size_ms, offset_ms, slices_per_period: (size_ms / step_ms) as u32 }
    }

    /// Slice index (steps since 1970 in local time) holding `ts_ms`.
    #[inline]
    pub fn slice_of(&self, ts_ms: i64) -> u32 {
        (ts_ms + self.offset_ms).div_euclid(self.step_ms) as u32
    }

    #[inline]
    pub fn slice_start_ms(&self, s: u32) -> i64 {
        s as i64 * self.step_ms - self.offset_ms
    }

    #[inline]
    pub fn slice_end_ms(&self, s: u32) -> i64 {
        self.slice_start_ms(s) + self.step_ms
    }

    #[inline]
    pub fn period_of_slice(&self, s: u32) -> u32 {
        match self.slices_per_period {
            1 => s,
            k => s / k,
        }
    }

    pub fn period_start_ms(&self, p: u32) -> i64 {
        p as i64 * self.size_ms - self.offset_ms
    }

    pub fn first_slice_of_period(&self, p: u32) -> u32 {
        p * self.slices_per_period
    }

    pub fn last_slice_of_period(&self, p: u32) -> u32 {
        self.first_slice_of_period(p + 1) - 1
    }

    /// The first slice whose end is after `wm_ms`: slices before it are
    /// closed (their windows may already be out). `i64::MIN` closes none.
    #[inline]
    pub fn open_slice(&self, wm_ms: i64) -> i64 {
        if wm_ms == i64::MIN {
            return i64::MIN;
        }
        (wm_ms.saturating_add(self.offset_ms)).div_euclid(self.step_ms)
    }

    /// Where an event in slice `s` goes when the watermark is `wm_ms`:
    /// its own slice, the first open slice of its period (late, folded),
    /// or nowhere (late, dropped).
    #[inline]
    pub fn place(&self, s: u32, wm_ms: i64, late: LatePolicy) -> Placement {
        let open = self.open_slice(wm_ms);
        if (s as i64) >= open {
            return Placement::OnTime;
        }
        match late {
            LatePolicy::Drop => Placement::Dropped,
            LatePolicy::Fold => {
                let target = open as u32;
                if self.period_of_slice(target) == self.period_of_slice(s) {
                    Placement::Folded(target)
                } else {
                    Placement::Dropped
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    OnTime,
    Folded(u32),
    Dropped,
}

/// The counters of one slice as shipped and checkpointed: the keys it
/// touched, each with its values (a few keys of many: one minute of a
/// per-user summary).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SliceCols {
    pub slice: u32,
    pub keys: Vec<u32>,
    /// Per key (in `keys` order): events, devices first seen here.
    pub pv: Vec<u32>,
    pub uv: Vec<u32>,
    /// DAU metrics only (else empty): of the devices first seen in this
    /// slice, those new on the day, and those returning.
    pub new: Vec<u32>,
    pub ret: Vec<u32>,
    /// Summary metrics with value fields (else empty): per key, one
    /// aggregate per value field (`i * values + field`).
    pub vals: Vec<Agg>,
}

/// Counters of one open slice in a shard, indexed by key id, with the
/// keys touched (so shipping and clearing cost what the slice holds, and
/// the columns are reused by the next slice).
#[derive(Debug, Default)]
struct OpenSlice {
    slice: u32,
    pv: Vec<u32>,
    uv: Vec<u32>,
    new: Vec<u32>,
    ret: Vec<u32>,
    /// `key * values + field`.
    vals: Vec<Agg>,
    /// One bit per key touched, and the touched keys in first-touch order.
    seen: Vec<u64>,
    touched: Vec<u32>,
}

impl OpenSlice {
    /// Makes room for key `key` and marks it touched; `values`: the
    /// metric's value fields.
    #[inline]
    fn fit(&mut self, key: usize, dau: bool, values: usize) {
        if key >= self.pv.len() {
            self.widen(key, dau, values);
        }
        let (w, bit) = (key / 64, 1u64 << (key % 64));
        if self.seen[w] & bit == 0 {
            self.seen[w] |= bit;
            self.touched.push(key as u32);
        }
    }

    /// Columns long enough for key `key` (out of line: rare, and `fit`
    /// runs for every record).
    #[cold]
    #[inline(never)]
    fn widen(&mut self, key: usize, dau: bool, values: usize) {
        let n = (key + 1).max(self.pv.len() * 2).max(16);
        self.pv.resize(n, 0);
        self.uv.resize(n, 0);
        if dau {
            self.new.resize(n, 0);
            self.ret.resize(n, 0);
        }
        self.vals.resize(n * values, Agg::default());
        self.seen.resize(n.div_ceil(64), 0);
    }

    /// The touched keys' values, in key order (but keys left at zero:
    /// every upstream row counted there was taken back). A key may count
    /// devices and no events (a re-sharded slice's events all went to the
    /// first shard).
    fn sparse(&self, values: usize) -> SliceCols {
        let mut keys = self.touched.clone();
        let zero = |col: &Vec<u32>, k: usize| col.get(k).is_none_or(|&x| x == 0);
        keys.retain(|&k| {
            let k = k as usize;
            !(zero(&self.pv, k) && zero(&self.uv, k) && zero(&self.new, k) && zero(&self.ret, k))
        });
        keys.sort_unstable();
        let pick =
            |col: &Vec<u32>| if col.is_empty() { Vec::new() } else { keys.iter().map(|&k| col[k as usize]).collect() };
        let vals =
            keys.iter().flat_map(|&k| &self.vals[k as usize * values..(k as usize + 1) * values]).copied().collect();
        SliceCols {
            slice: self.slice,
            pv: pick(&self.pv),
            uv: pick(&self.uv),
            new: pick(&self.new),
            ret: pick(&self.ret),
            vals,
            keys,
        }
    }

    /// Zeroes what the slice touched, for reuse by another slice.
    fn clear(&mut self, values: usize) {
        for &k in &self.touched {
            let k = k as usize;
            self.pv[k] = 0;
            self.uv[k] = 0;
            if !self.new.is_empty() {
                self.new[k] = 0;
                self.ret[k] = 0;
            }
            self.vals[k * values..(k + 1) * values].fill(Agg::default());
            self.seen[k / 64] = 0;
        }
        self.touched.clear();
    }

    /// A slice with the values of a checkpoint's.
    fn from_sparse(c: &SliceCols, dau: bool, values: usize) -> OpenSlice {
        let mut o = OpenSlice { slice: c.slice, ..OpenSlice::default() };
        for (i, &k) in c.keys.iter().enumerate() {
            let k = k as usize;
            o.fit(k, dau, values);
            o.pv[k] = c.pv[i];
            o.uv[k] = c.uv[i];
            if dau {
                o.new[k] = c.new.get(i).copied().unwrap_or(0);
                o.ret[k] = c.ret.get(i).copied().unwrap_or(0);
            }
            o.vals[k * values..(k + 1) * values].copy_from_slice(&c.vals[i * values..(i + 1) * values]);
        }
        o
    }

    fn bytes(&self) -> usize {
        (self.pv.len() + self.uv.len() + self.new.len() + self.ret.len()) * 4
            + self.vals.len() * size_of::<Agg>()
            + self.seen.len() * 8
    }

    /// The column counting devices of `class` (none for known devices).
    #[inline]
    fn class_col(&mut self, class: Class) -> Option<&mut Vec<u32>> {
        match class {
            Class::New => Some(&mut self.new),
            Class::Returning => Some(&mut self.ret),
            Class::Known => None,
        }
    }
}

/// What a device is on a day, for DAU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Never seen before the day.
    New,
    /// Last seen more than `returning_after_days` days before it.
    Returning,
    Known,
}

/// A DAU metric's device history in one shard.
pub struct Dau {
    pub history: DeviceHistory,
    /// The history's files in the last checkpoint written.
    chain: Option<Chain>,
    /// The id text of every device in the history or seen since.
    pub dids: DidTable,
    dids_chain: Option<Chain>,
    /// The id arena's files in the last checkpoint written, in order.
    dids_arena: Vec<FileRef>,
    returning_after_days: u32,
    /// Steps of disorder the minute dedup of each source tolerates.
    tolerance: u32,
}

impl Dau {
    pub fn new(history: DeviceHistory, dids: DidTable, spec: &DauSpec) -> Dau {
        Dau {
            history,
            chain: None,
            dids,
            dids_chain: None,
            dids_arena: Vec::new(),
            returning_after_days: spec.returning_after_days,
            tolerance: spec.dedup_tolerance,
        }
    }

    /// The class of a device on `day` (days since 1970, local), from the
    /// history of the days before it.
    #[inline]
    pub fn class(&self, device_fp: u64, day: u32) -> Class {
        match self.history.get(device_fp) {
            None => Class::New,
            Some(h) if (h.last_day as u64) + (self.returning_after_days as u64) < day as u64 => Class::Returning,
            Some(_) => Class::Known,
        }
    }
}

/// The checkpoint files a table is rebuilt from: a base and the deltas
/// written since.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Chain {
    pub base: FileRef,
    /// Slots in the base (the table may have grown since).
    pub base_capacity: u64,
    pub deltas: Vec<FileRef>,
}

impl Chain {
    fn delta_bytes(&self) -> u64 {
        self.deltas.iter().map(|d| d.bytes).sum()
    }
}

/// A dedup table of one open period.
struct OpenTable {
    period: u32,
    table: DedupTable,
    /// Its files in the last checkpoint written (none before the first).
    chain: Option<Chain>,
    /// DAU: its pairs are classified (new / returning counted); every
    /// earlier day was closed and rolled into the history.
    classified: bool,
    /// DAU: the day's minute-dedup rings of every source.
    rings: Option<(RingTable, Option<Chain>)>,
}

/// A table as a checkpoint records it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TableSaved {
    pub period: u32,
    /// Slots of the chain's base.
    pub capacity: u64,
    pub len: u64,
    pub chain: Chain,
    pub classified: bool,
    /// DAU: the day's rings.
    pub rings: Option<Box<TableSaved>>,
}

/// A [`DidTable`] as a checkpoint records it: its index, and its arena as
/// files to concatenate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DidsSaved {
    pub index: TableSaved,
    pub arena: Vec<FileRef>,
}

impl DidsSaved {
    /// Every file it names.
    pub fn files(&self) -> impl Iterator<Item = &FileRef> {
        std::iter::once(&self.index.chain.base).chain(&self.index.chain.deltas).chain(&self.arena)
    }
}

/// Arena files a DidTable's checkpoint may name before its whole arena is
/// written as one again.
const DID_ARENA_FILES_MAX: usize = 64;

/// One metric's shard state as a checkpoint records it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CumulateShardSaved {
    /// Open slices.
    pub slices: Vec<SliceCols>,
    pub tables: Vec<TableSaved>,
    /// DAU: the device history table.
    pub history: Option<TableSaved>,
    /// DAU: the device id texts.
    pub dids: Option<DidsSaved>,
    /// DAU with a `minute_devices` sink: rows of slices not shipped yet.
    pub details: Option<Details>,
    pub entries_seen_max: u64,
    pub closed_bytes: u64,
    pub closed_entries: u64,
    /// A summary over result rows: the rows of open periods as counted.
    pub upserts: Option<UpsertsSaved>,
}

/// A delta is written while the deltas since the base stay under this
/// share of the table's entries (per mille, as bytes: what a base of the
/// table would hold now), and [`DELTAS_PER_BASE_MAX`]; past either a new
/// base replaces them. That bounds restore work and disk use to twice the
/// entries, and lets a table that only grows (a day's dedup table fills
/// all day) write deltas of its new entries instead of a base of all of
/// them at every checkpoint.
pub const DELTAS_PER_BASE_MAX_PER_MILLE: u64 = 1000;
/// Delta files a chain may hold before a new base (a restore opens them all).
pub const DELTAS_PER_BASE_MAX: usize = 64;

/// Cleared slices a shard keeps for the slices it opens next.
const FREE_SLICES_MAX: usize = 8;

/// Emptied tables a shard keeps for the periods it opens next.
const SPARE_TABLES_MAX: usize = 8;

/// One metric's state in one shard.
pub struct CumulateShard {
    geo: Geometry,
    /// Open slices, sorted by slice index.
    slices: Vec<OpenSlice>,
    /// Shipped slices, cleared, for the next ones.
    free_slices: Vec<OpenSlice>,
    last_hit: usize,
    /// Dedup tables of open periods, sorted by period.
    tables: Vec<OpenTable>,
    /// Whether tables track changes for incremental checkpoints.
    track: bool,
    /// The last lookup: its period's first and last slice, and its index
    /// into `tables` (a period's slices are whole: its size is a multiple
    /// of the step).
    table_hit: Option<(u32, u32, usize)>,
    /// Most entries a finished period's table held (sizes the next ones).
    entries_seen_max: usize,
    /// Bytes and entries of the tables of finished periods, at their close.
    pub closed_bytes: usize,
    pub closed_entries: usize,
    /// DAU: (bytes, entries) of the minute-dedup rings of finished days.
    pub closed_rings: (usize, usize),
    state_dir: Option<PathBuf>,
    name: String,
    /// Set for a DAU metric.
    pub dau: Option<Dau>,
    /// DAU with a `minute_devices` sink: what the minute dedup passed in
    /// slices not shipped yet.
    pub details: Option<Details>,
    /// Watermark of the last ship: days starting at or before it have
    /// every earlier day closed.
    wm_ms: i64,
    /// Summary: value fields aggregated per key (`sum`, `min`, `max`).
    pub values: usize,
    /// Anonymous tables of finished periods, emptied, for the next ones
    /// (a tumble metric opens one per step, several per block).
    spare: Vec<DedupTable>,
    /// A summary over result rows: what each upstream row counted.
    pub upserts: Option<Upserts>,
}

/// What an upstream row did to a summary over result rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upserted {
    /// Counted: the first arrival of its upsert key.
    New,
    /// Came again with the values it had: nothing changed.
    Unchanged,
    /// Came with other values: the earlier ones were taken back.
    Replaced,
    /// Came with other values after the earlier ones were shipped:
    /// nothing changed.
    LateUpdate,
}

impl CumulateShard {
    /// `state_dir`: where this shard keeps its tables (anonymous if none);
    /// `name` prefixes the table files.
    pub fn new(geo: Geometry, state_dir: Option<PathBuf>, name: String, track: bool) -> CumulateShard {
        CumulateShard {
            geo,
            slices: Vec::new(),
            free_slices: Vec::new(),
            last_hit: 0,
            tables: Vec::new(),
            track,
            table_hit: None,
            entries_seen_max: 0,
            closed_bytes: 0,
            closed_entries: 0,
            closed_rings: (0, 0),
            state_dir,
            name,
            dau: None,
            details: None,
            wm_ms: i64::MIN,
            values: 0,
            spare: Vec::new(),
            upserts: None,
        }
    }

    /// Index of `slice` among the open slices, opening it if new.
    /// Consecutive records mostly share a slice (the last answer is
    /// cached); out-of-order ones mostly fall in a run of consecutive open
    /// slices, found by their offset from the first without a search.
    #[inline]
    fn slice_index(&mut self, slice: u32) -> usize {
        if let Some(c) = self.slices.get(self.last_hit) {
            if c.slice == slice {
                return self.last_hit;
            }
        }
        if let Some(first) = self.slices.first() {
            let i = slice.wrapping_sub(first.slice) as usize;
            if self.slices.get(i).is_some_and(|c| c.slice == slice) {
                self.last_hit = i;
                return i;
            }
        }
        let i = match self.slices.binary_search_by_key(&slice, |c| c.slice) {
            Ok(i) => i,
            Err(i) => {
                let mut c = self.free_slices.pop().unwrap_or_default();
                c.slice = slice;
                self.slices.insert(i, c);
                i
            }
        };
        self.last_hit = i;
        i
    }

    /// Index of the dedup table of `slice`'s period, creating it if new.
    /// Consecutive records mostly share a period: the last answer is cached.
    #[inline]
    fn table_of(&mut self, slice: u32) -> io::Result<usize> {
        if let Some((first, last, i)) = self.table_hit {
            if (first..=last).contains(&slice) {
                return Ok(i);
            }
        }
        let period = self.geo.period_of_slice(slice);
        let i = match self.tables.iter().position(|t| t.period == period) {
            Some(i) => i,
            None => {
                // Days look alike: size a new day's table like the largest
                // one this shard holds or held, instead of growing it again.
                let expected = self.tables.iter().map(|t| t.table.len()).max().unwrap_or(0).max(self.entries_seen_max);
                self.table_of_period(period, expected)?
            }
        };
        self.table_hit = Some((self.geo.first_slice_of_period(period), self.geo.last_slice_of_period(period), i));
        Ok(i)
    }

    /// Index of `period`'s table, created for `expected` entries if new.
    fn table_of_period(&mut self, period: u32, expected: usize) -> io::Result<usize> {
        if let Some(i) = self.tables.iter().position(|t| t.period == period) {
            return Ok(i);
        }
        let mut table = match self.spare.pop() {
            Some(t) if t.capacity() * 3 >= expected * 4 => t,
            _ => DedupTable::create(self.state_dir.clone(), format!("{}-p{period}", self.name), expected)?,
        };
        let mut rings = match &self.dau {
            None => None,
            Some(_) => {
                Some(RingTable::create(self.state_dir.clone(), format!("{}-p{period}-rings", self.name), expected)?)
            }
        };
        if self.track {
            table.track_changes();
            if let Some(r) = &mut rings {
                r.track_changes();
            }
        }
        let at = self.tables.partition_point(|t| t.period < period);
        let classified = self.geo.period_start_ms(period) <= self.wm_ms;
        let rings = rings.map(|r| (r, None));
        self.tables.insert(at, OpenTable { period, table, chain: None, classified, rings });
        Ok(at)
    }

    /// Hints the dedup probe of a coming record.
    #[inline]
    pub fn prefetch(&self, device_fp: u64, key: u32, slice: u32, source: usize) {
        let table = match self.table_hit {
            Some((first, last, i)) if (first..=last).contains(&slice) => self.tables.get(i),
            _ => {
                let period = self.geo.period_of_slice(slice);
                self.tables.iter().find(|t| t.period == period)
            }
        };
        if let Some(t) = table {
            t.table.prefetch(device_fp, key);
            if let Some((r, _)) = &t.rings {
                r.prefetch(device_fp, ring_key(source, key));
            }
        }
    }

    /// Counts one event of `device_fp` with `key` in `slice`, from
    /// `source` (`did`: the device id text, for a DAU metric; `vals`: a
    /// summary's value fields, NaN for none); returns false if a DAU
    /// metric's minute dedup found it late (older than its ring).
    #[inline]
    pub fn apply(
        &mut self,
        device_fp: u64,
        key: u32,
        slice: u32,
        source: usize,
        did: &[u8],
        vals: &[f64],
    ) -> io::Result<bool> {
        let t = self.table_of(slice)?;
        if let (Some((rings, _)), Some(dau)) = (&mut self.tables[t].rings, &self.dau) {
            match rings.observe(device_fp, ring_key(source, key), slice, dau.tolerance)? {
                Ring::Pass => {}
                Ring::Again => return Ok(true),
                Ring::Late => return Ok(false),
            }
            if let Some(d) = &mut self.details {
                d.push(slice, source as u32, key, did)?;
            }
        }
        let seen = self.tables[t].table.observe(device_fp, key, slice)?;
        let classified = self.tables[t].classified;
        let class = match (&self.dau, seen) {
            (Some(dau), Seen::New | Seen::Earlier { .. }) if classified => dau.class(device_fp, self.tables[t].period),
            _ => Class::Known,
        };
        if seen == Seen::New && (class == Class::New || !classified) {
            // A device in the history has its id already (imported with
            // it, or recorded on the day it was first seen).
            if let Some(dau) = &mut self.dau {
                dau.dids.insert(device_fp, did)?;
            }
        }
        let k = key as usize;
        let i = self.slice_index(slice);
        let dau = self.dau.is_some();
        let nv = self.values;
        let c = &mut self.slices[i];
        c.fit(k, dau, nv);
        c.pv[k] += 1;
        for (a, &v) in c.vals[k * nv..(k + 1) * nv].iter_mut().zip(vals) {
            if !v.is_nan() {
                a.add(v);
            }
        }
        match seen {
            Seen::Again => {}
            Seen::New => {
                c.uv[k] += 1;
                if let Some(col) = c.class_col(class) {
                    col[k] += 1;
                }
            }
            Seen::Earlier { was } => {
                c.uv[k] += 1;
                if let Some(col) = c.class_col(class) {
                    col[k] += 1;
                }
                let j = self.slice_index(was);
                let old = &mut self.slices[j];
                debug_assert!(old.uv[k] > 0, "moved a device out of a slice that never had it");
                old.uv[k] -= 1;
                if let Some(col) = old.class_col(class) {
                    col[k] -= 1;
                }
            }
        }
        Ok(true)
    }

    /// Counts (or with `take_back`, uncounts) one record of key `key` in
    /// `slice` with these values: a summary over result rows, no dedup.
    fn count(&mut self, key: u32, slice: u32, vals: &[f64], take_back: bool) {
        let k = key as usize;
        let i = self.slice_index(slice);
        let nv = self.values;
        let c = &mut self.slices[i];
        c.fit(k, false, nv);
        let aggs = c.vals[k * nv..(k + 1) * nv].iter_mut().zip(vals).filter(|(_, v)| !v.is_nan());
        if take_back {
            debug_assert!(c.pv[k] > 0, "took back a row its slice never counted");
            c.pv[k] -= 1;
            aggs.for_each(|(a, &v)| a.take_back(v));
        } else {
            c.pv[k] += 1;
            aggs.for_each(|(a, &v)| a.add(v));
        }
    }

    /// A summary over result rows: counts one arrival of the upstream row
    /// `fp` (see [`super::upsert`]). `wm_before_ms`: the source's
    /// watermark before the record's block, which placed it.
    pub fn apply_upsert(&mut self, fp: u64, key: u32, slice: u32, vals: &[f64], wm_before_ms: i64) -> Upserted {
        let Some(u) = &self.upserts else {
            return Upserted::New;
        };
        let mut old = [0f64; SUMMARY_VALUES_MAX];
        let (at, outcome) = match u.arrival(fp, key, vals) {
            Arrival::Unchanged => return Upserted::Unchanged,
            Arrival::New => (None, Upserted::New),
            Arrival::Changed { at, was } => {
                // Its slice went out already: what the row counted there
                // cannot be taken back.
                if (was.slice as i64) < self.geo.open_slice(wm_before_ms) {
                    return Upserted::LateUpdate;
                }
                old[..self.values].copy_from_slice(u.vals(at));
                self.count(was.key, was.slice, &old[..self.values], true);
                (Some(at), Upserted::Replaced)
            }
        };
        self.count(key, slice, vals, false);
        if let Some(u) = &mut self.upserts {
            u.set(at, Counted { fp, key, slice }, vals);
        }
        outcome
    }

    /// DAU, as the watermark reaches `wm_ms`: in day order, classifies the
    /// pairs of each day that now has every earlier day closed, and rolls
    /// each day that closed into the device history.
    fn roll_days(&mut self, wm_ms: i64) -> io::Result<()> {
        let geo = self.geo;
        for ti in 0..self.tables.len() {
            let period = self.tables[ti].period;
            if geo.period_start_ms(period) > wm_ms {
                break;
            }
            if !self.tables[ti].classified {
                self.classify(ti);
            }
            if geo.period_start_ms(period + 1) <= wm_ms {
                let Some(dau) = &mut self.dau else {
                    return Ok(());
                };
                for e in self.tables[ti].table.entries().iter().filter(|e| e.first_slice != 0) {
                    dau.history.merge(e.device_fp, period, period)?;
                }
            }
        }
        Ok(())
    }

    /// Counts the new and returning devices among every pair of table `ti`
    /// in the slice the pair was first seen in (still open: no slice of
    /// the day was shipped before its day had every earlier day closed).
    fn classify(&mut self, ti: usize) {
        let Some(dau) = &self.dau else {
            return;
        };
        let t = &mut self.tables[ti];
        t.classified = true;
        for e in t.table.entries().iter().filter(|e| e.first_slice != 0) {
            let class = dau.class(e.device_fp, t.period);
            if class == Class::Known {
                continue;
            }
            let k = e.key as usize;
            let i = match self.slices.binary_search_by_key(&e.first_slice, |c| c.slice) {
                Ok(i) => i,
                Err(_) => {
                    debug_assert!(false, "slice {} of a pair was shipped before its day was classified", e.first_slice);
                    continue;
                }
            };
            let nv = self.values;
            let c = &mut self.slices[i];
            c.fit(k, true, nv);
            if let Some(col) = c.class_col(class) {
                col[k] += 1;
            }
        }
    }

    /// Ships every slice that ends at or before `wm_ms` (and the detail
    /// rows of those slices) and frees the dedup tables of periods that
    /// ended.
    pub fn ship(
        &mut self,
        wm_ms: i64,
        out: &mut impl FnMut(SliceCols),
        details: &mut impl FnMut(u32, DetailBuf),
    ) -> io::Result<()> {
        if self.dau.is_some() {
            self.roll_days(wm_ms)?;
        }
        self.wm_ms = self.wm_ms.max(wm_ms);
        let n = self.slices.iter().take_while(|c| self.geo.slice_end_ms(c.slice) <= wm_ms).count();
        let nv = self.values;
        for mut c in self.slices.drain(..n) {
            if !c.touched.is_empty() {
                out(c.sparse(nv));
            }
            c.clear(nv);
            if self.free_slices.len() < FREE_SLICES_MAX {
                self.free_slices.push(c);
            }
        }
        if let Some(d) = &mut self.details {
            let geo = self.geo;
            for (slice, buf) in d.take_while(|s| geo.slice_end_ms(s) <= wm_ms) {
                details(slice, buf);
            }
        }
        self.last_hit = 0;
        self.table_hit = None;
        let geo = self.geo;
        for t in self.tables.iter().filter(|t| geo.period_start_ms(t.period + 1) <= wm_ms) {
            self.entries_seen_max = self.entries_seen_max.max(t.table.len());
            self.closed_bytes += t.table.bytes();
            self.closed_entries += t.table.len();
            if let Some((r, _)) = &t.rings {
                self.closed_rings.0 += r.bytes();
                self.closed_rings.1 += r.len();
            }
        }
        if let Some(u) = &mut self.upserts {
            u.retain(|s| geo.period_start_ms(geo.period_of_slice(s) + 1) > wm_ms);
        }
        let (open, closed): (Vec<OpenTable>, Vec<OpenTable>) =
            std::mem::take(&mut self.tables).into_iter().partition(|t| geo.period_start_ms(t.period + 1) > wm_ms);
        self.tables = open;
        for t in closed {
            if self.spare.len() < SPARE_TABLES_MAX {
                self.spare.extend(t.table.recycle());
            }
        }
        Ok(())
    }

    pub fn state_bytes(&self) -> usize {
        self.tables.iter().map(|t| t.table.bytes()).sum::<usize>()
            + self.dau.as_ref().map_or(0, |d| d.history.bytes())
            + self.slices.iter().chain(&self.free_slices).map(OpenSlice::bytes).sum::<usize>()
            + self.upserts.as_ref().map_or(0, Upserts::bytes)
    }

    pub fn dedup_entries(&self) -> usize {
        self.tables.iter().map(|t| t.table.len()).sum()
    }

    /// Copies what changed since the last checkpoint into `files` (to be
    /// written as `dir/{prefix}-p{period}-g{generation}.base|.delta`, and
    /// `{prefix}-history-g{generation}.…` for a DAU history) and returns
    /// the state to record, with the bytes to write.
    pub fn checkpoint(
        &mut self,
        dir: &Path,
        prefix: &str,
        generation: u64,
        pool: &Arc<SnapshotPool>,
        files: &mut Vec<PendingFile>,
    ) -> io::Result<(CumulateShardSaved, u64)> {
        let mut written = 0;
        let mut tables = Vec::with_capacity(self.tables.len());
        let mut out = TableOut { dir, generation, pool, files, written: &mut written };
        for t in &mut self.tables {
            let stem = format!("{prefix}-p{}-g{generation}", t.period);
            let (chain, capacity, len) = out.table(&mut t.table, &mut t.chain, &stem)?;
            let rings = match &mut t.rings {
                None => None,
                Some((r, rchain)) => {
                    let (chain, capacity, len) = out.table(r, rchain, &format!("{stem}-rings"))?;
                    Some(Box::new(TableSaved { period: t.period, capacity, len, chain, classified: true, rings: None }))
                }
            };
            tables.push(TableSaved { period: t.period, capacity, len, chain, classified: t.classified, rings });
        }
        let history = match &mut self.dau {
            None => None,
            Some(dau) => {
                let stem = format!("{prefix}-history-g{generation}");
                let (chain, capacity, len) = out.table(&mut dau.history, &mut dau.chain, &stem)?;
                Some(TableSaved { period: 0, capacity, len, chain, classified: true, rings: None })
            }
        };
        let dids = match &mut self.dau {
            None => None,
            Some(dau) => {
                let stem = format!("{prefix}-dids-g{generation}");
                let (chain, capacity, len) = out.table(&mut dau.dids.index, &mut dau.dids_chain, &stem)?;
                let index = TableSaved { period: 0, capacity, len, chain, classified: true, rings: None };
                // The arena's new bytes; all of it once it spans too many files.
                let all = dau.dids_arena.len() >= DID_ARENA_FILES_MAX;
                if all {
                    dau.dids_arena.clear();
                }
                let tail = dau.dids.take_tail(all);
                if !tail.is_empty() {
                    let file = format!("{stem}.ids");
                    let w = Written { bytes: tail.len() as u64, xxh3: xxhash_rust::xxh3::xxh3_64(&tail) };
                    *out.written += w.bytes;
                    out.files.push(PendingFile { path: dir.join(&file), bytes: Pending::Encoded(tail) });
                    dau.dids_arena.push(FileRef::new(file, w));
                }
                Some(DidsSaved { index, arena: dau.dids_arena.clone() })
            }
        };
        let slices = self.slices.iter().map(|c| c.sparse(self.values)).collect();
        let saved = CumulateShardSaved {
            slices,
            tables,
            history,
            dids,
            details: self.details.clone(),
            entries_seen_max: self.entries_seen_max as u64,
            closed_bytes: self.closed_bytes as u64,
            closed_entries: self.closed_entries as u64,
            upserts: self.upserts.as_ref().map(Upserts::saved),
        };
        Ok((saved, written))
    }

    /// Puts back the state of a checkpoint (tables rebuilt from the files
    /// in `ckpt_dir`, checked against their checksums) cut when the shard's
    /// watermark was `wm_ms`.
    pub fn restore(&mut self, saved: &CumulateShardSaved, ckpt_dir: &Path, wm_ms: i64) -> io::Result<()> {
        assert!(self.tables.is_empty() && self.slices.is_empty(), "restore into a fresh shard");
        for t in &saved.tables {
            let table = restore_table(ckpt_dir, self.state_dir.clone(), format!("{}-p{}", self.name, t.period), t)?;
            let chain = Some(t.chain.clone());
            let rings = match (&self.dau, &t.rings) {
                (Some(_), Some(r)) => {
                    let name = format!("{}-p{}-rings", self.name, t.period);
                    Some((restore_table(ckpt_dir, self.state_dir.clone(), name, r)?, Some(r.chain.clone())))
                }
                (None, None) => None,
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "shard state: dedup rings differ from the job",
                    ))
                }
            };
            self.tables.push(OpenTable { period: t.period, table, chain, classified: t.classified, rings });
        }
        match (&mut self.dau, &saved.history, &saved.dids) {
            (Some(dau), Some(h), Some(d)) => {
                dau.history = restore_table(ckpt_dir, self.state_dir.clone(), format!("{}-history", self.name), h)?;
                dau.chain = Some(h.chain.clone());
                let index = restore_table(ckpt_dir, self.state_dir.clone(), format!("{}-dids", self.name), &d.index)?;
                dau.dids = DidTable::restored(index, read_arena(ckpt_dir, &d.arena)?);
                dau.dids_chain = Some(d.index.chain.clone());
                dau.dids_arena = d.arena.clone();
            }
            (None, None, None) => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "shard state: device history differs from the job",
                ))
            }
        }
        if self.details.is_some() {
            // A checkpoint of a job without the sink has none: start empty.
            self.details = Some(saved.details.clone().unwrap_or_default());
        }
        let dau = self.dau.is_some();
        self.slices = saved.slices.iter().map(|c| OpenSlice::from_sparse(c, dau, self.values)).collect();
        self.wm_ms = wm_ms;
        self.entries_seen_max = saved.entries_seen_max as usize;
        self.closed_bytes = saved.closed_bytes as usize;
        self.closed_entries = saved.closed_entries as usize;
        match (&mut self.upserts, &saved.upserts) {
            (Some(u), Some(rows)) => u.extend_from(rows),
            (None, None) => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "shard state: upstream rows differ from the job",
                ))
            }
        }
        Ok(())
    }
}

/// Where a checkpoint's table copies go.
struct TableOut<'a> {
    dir: &'a Path,
    generation: u64,
    pool: &'a Arc<SnapshotPool>,
    files: &'a mut Vec<PendingFile>,
    written: &'a mut u64,
}

impl TableOut<'_> {
    /// Copies a table's changes since its chain's last file (a delta), or
    /// the whole table (a base: when new, or when the deltas would pass
    /// [`DELTAS_PER_BASE_MAX_PER_MILLE`] of the table's entries or
    /// [`DELTAS_PER_BASE_MAX`] files); returns the chain to record, the
    /// base's capacity and the table's length.
    fn table<E: Slot>(
        &mut self,
        table: &mut Table<E>,
        chain: &mut Option<Chain>,
        stem: &str,
    ) -> io::Result<(Chain, u64, u64)> {
        let record = Table::<E>::DELTA_RECORD_BYTES as u64;
        let c = match (chain.as_mut(), table.changes()) {
            (Some(c), Some(0)) => c.clone(),
            (Some(c), Some(n))
                if c.deltas.len() < DELTAS_PER_BASE_MAX
                    && (c.delta_bytes() + n as u64 * record) * 1000
                        <= table.len() as u64 * record * DELTAS_PER_BASE_MAX_PER_MILLE =>
            {
                let file = format!("{stem}.delta");
                let (bytes, w) = table.snapshot_delta(self.pool, self.generation)?;
                self.files.push(PendingFile { path: self.dir.join(&file), bytes: Pending::Copy(bytes) });
                *self.written += w.bytes;
                c.deltas.push(FileRef::new(file, w));
                c.clone()
            }
            _ => {
                let file = format!("{stem}.base");
                let (bytes, w) = table.snapshot_base(self.pool, self.generation)?;
                self.files.push(PendingFile { path: self.dir.join(&file), bytes: Pending::Copy(bytes) });
                *self.written += w.bytes;
                let c =
                    Chain { base: FileRef::new(file, w), base_capacity: table.capacity() as u64, deltas: Vec::new() };
                *chain = Some(c.clone());
                c
            }
        };
        Ok((c.clone(), c.base_capacity, table.len() as u64))
    }
}

/// The id arena of a checkpoint: its files, checked, one after the other.
fn read_arena(ckpt_dir: &Path, files: &[FileRef]) -> io::Result<Vec<u8>> {
    let mut arena = Vec::with_capacity(files.iter().map(|f| f.bytes as usize).sum());
    for f in files {
        let path = ckpt_dir.join(&f.file);
        let bytes = std::fs::read(&path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        if bytes.len() as u64 != f.bytes || xxhash_rust::xxh3::xxh3_64(&bytes) != f.xxh3 {
            let why = format!("{}: size or checksum differs from the manifest's", path.display());
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
        arena.extend_from_slice(&bytes);
    }
    Ok(arena)
}

/// A checkpoint's device id table, rebuilt in anonymous memory (for
/// reading a state directory offline).
pub fn read_dids(ckpt_dir: &Path, saved: &DidsSaved) -> io::Result<DidTable> {
    let index = restore_table(ckpt_dir, None, "dids".into(), &saved.index)?;
    Ok(DidTable::restored(index, read_arena(ckpt_dir, &saved.arena)?))
}

/// A table of a checkpoint, rebuilt in anonymous memory (for reading a
/// state directory offline).
pub fn read_table<E: Slot>(ckpt_dir: &Path, name: &str, t: &TableSaved) -> io::Result<Table<E>> {
    restore_table(ckpt_dir, None, name.to_owned(), t)
}

/// Rebuilds a table from the chain a checkpoint recorded.
fn restore_table<E: Slot>(ckpt_dir: &Path, dir: Option<PathBuf>, name: String, t: &TableSaved) -> io::Result<Table<E>> {
    let base = ckpt_dir.join(&t.chain.base.file);
    let deltas: Vec<_> = t.chain.deltas.iter().map(|d| (ckpt_dir.join(&d.file), d.written())).collect();
    Table::restore(dir, name, t.capacity as usize, t.len as usize, (&base, t.chain.base.written()), &deltas)
}

/// Re-sharding: moves this metric's state from shards cut for one worker
/// count into shards cut for another (same geometry, same watermark
/// `wm_ms`). Every (device, key) entry goes to the shard that owns its
/// fingerprint now, and so does every device's history; an open slice's
/// `uv` (and, once its day is classified, `new` and `returning`) counts
/// exactly the entries whose first slice it is (late events are only ever
/// moved into open slices), so it is recounted from the entries; `pv` and
/// the counters are sums and land in the first shard.
pub fn reshard(old: &[&CumulateShard], new: &mut [&mut CumulateShard], wm_ms: i64) -> io::Result<()> {
    let n = new.len();
    let owner = |fp: u64| ((fp as u128 * n as u128) >> 64) as usize;
    // Entries arrive in hash order: tables must be sized for all of them
    // first, or the first ones would all share the few home slots of a
    // small table (quadratic probing).
    // Every old shard stood at the same cut: a day is classified in all or none.
    let mut per_period: std::collections::BTreeMap<u32, (usize, bool)> = Default::default();
    for t in old.iter().flat_map(|o| &o.tables) {
        let p = per_period.entry(t.period).or_default();
        p.0 += t.table.len();
        p.1 |= t.classified;
    }
    for (&period, &(total, classified)) in &per_period {
        for target in new.iter_mut() {
            let ti = target.table_of_period(period, total / n + total / (4 * n) + 64)?;
            target.tables[ti].classified = classified;
        }
    }
    let histories: usize = old.iter().filter_map(|o| o.dau.as_ref()).map(|d| d.history.len()).sum();
    let dids: usize = old.iter().filter_map(|o| o.dau.as_ref()).map(|d| d.dids.len()).sum();
    let share = |total: usize| total / n + total / (4 * n) + 64;
    for target in new.iter_mut() {
        target.wm_ms = wm_ms;
        if let Some(dau) = &mut target.dau {
            // The empty table goes first: a file-backed one would share its file.
            drop(std::mem::replace(&mut dau.history, DeviceHistory::anonymous()?));
            let name = format!("{}-history", target.name);
            dau.history = DeviceHistory::create(target.state_dir.clone(), name, share(histories))?;
            dau.history.track_changes();
            drop(std::mem::replace(&mut dau.dids, DidTable::anonymous()?));
            dau.dids = DidTable::create(target.state_dir.clone(), format!("{}-dids", target.name), share(dids))?;
            dau.dids.track_changes();
        }
    }
    let mut id = Vec::new();
    for o in old.iter().filter_map(|o| o.dau.as_ref()) {
        for h in o.history.entries().iter().filter(|h| !h.is_empty()) {
            if let Some(dau) = &mut new[owner(h.device_fp)].dau {
                dau.history.merge(h.device_fp, h.first_day, h.last_day)?;
            }
        }
        for fp in o.dids.devices() {
            id.clear();
            o.dids.get(fp, &mut id);
            if let Some(dau) = &mut new[owner(fp)].dau {
                dau.dids.insert(fp, &id)?;
            }
        }
    }
    for o in old {
        for (slice, r, id) in o.details.iter().flat_map(Details::iter) {
            let fp = xxhash_rust::xxh3::xxh3_64(id);
            if let Some(d) = &mut new[owner(fp)].details {
                d.push(slice, r.source, r.key, id)?;
            }
        }
    }
    for o in old {
        for t in &o.tables {
            for r in t.rings.iter().flat_map(|(r, _)| r.entries()).filter(|r| !r.is_empty()) {
                let target = &mut *new[owner(r.device_fp)];
                let ti = target.table_of_period(t.period, 0)?;
                if let Some((rings, _)) = &mut target.tables[ti].rings {
                    rings.upsert(*r)?;
                }
            }
            let open = |slice: u32| o.geo.slice_end_ms(slice) > wm_ms;
            for e in t.table.entries().iter().filter(|e| e.first_slice != 0) {
                let target = &mut *new[owner(e.device_fp)];
                let ti = target.table_of_period(t.period, 0)?;
                let seen = target.tables[ti].table.observe(e.device_fp, e.key, e.first_slice)?;
                debug_assert_eq!(seen, Seen::New, "shards own disjoint devices");
                if open(e.first_slice) {
                    let class = match &target.dau {
                        Some(dau) if t.classified => dau.class(e.device_fp, t.period),
                        _ => Class::Known,
                    };
                    let dau = target.dau.is_some();
                    let nv = target.values;
                    let i = target.slice_index(e.first_slice);
                    let c = &mut target.slices[i];
                    c.fit(e.key as usize, dau, nv);
                    c.uv[e.key as usize] += 1;
                    if let Some(col) = c.class_col(class) {
                        col[e.key as usize] += 1;
                    }
                }
            }
        }
        if let Some(u) = &o.upserts {
            // A row is taken back by the shard that owns it: it counts
            // there, not in the first shard.
            let saved = u.saved();
            let nv = o.values;
            for (i, r) in saved.rows.iter().enumerate() {
                let target = &mut *new[owner(r.fp)];
                let vals = &saved.vals[i * nv..(i + 1) * nv];
                target.upserts.get_or_insert_with(|| Upserts::new(nv)).set(None, *r, vals);
                if o.geo.slice_end_ms(r.slice) > wm_ms {
                    target.count(r.key, r.slice, vals, false);
                }
            }
        } else {
            let first = &mut *new[0];
            let dau = first.dau.is_some();
            let nv = first.values;
            for c in &o.slices {
                let i = first.slice_index(c.slice);
                let into = &mut first.slices[i];
                for &k in &c.touched {
                    let k = k as usize;
                    into.fit(k, dau, nv);
                    into.pv[k] += c.pv[k];
                    for v in k * nv..(k + 1) * nv {
                        into.vals[v].merge(&c.vals[v]);
                    }
                }
            }
        }
        let first = &mut *new[0];
        first.entries_seen_max = first.entries_seen_max.max(o.entries_seen_max);
        first.closed_bytes += o.closed_bytes;
        first.closed_entries += o.closed_entries;
        first.closed_rings.0 += o.closed_rings.0;
        first.closed_rings.1 += o.closed_rings.1;
    }
    for t in new.iter_mut() {
        t.table_hit = None;
        t.last_hit = 0;
    }
    Ok(())
}

/// Appends `text` as a JSON string (invalid UTF-8 replaced).
fn push_json_string(out: &mut String, text: &[u8]) {
    match std::str::from_utf8(text) {
        Ok(t) if t.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') => {
            out.push('"');
            out.push_str(t);
            out.push('"');
        }
        _ => out.push_str(&serde_json::Value::from(String::from_utf8_lossy(text)).to_string()),
    }
}

/// Keeps `order` (key ids sorted by rendered dims) up to date with `dims`
/// (`rank[k]`: the place of key `k` in `order`).
fn sort_dims(dims: &[String], order: &mut Vec<u32>, rank: &mut Vec<u32>) {
    let before = order.len();
    if dims.len() > before {
        // Sort the new keys alone and merge them in: keys trickle in all
        // day, and sorting every key again each time would be quadratic.
        let mut new: Vec<u32> = (before as u32..dims.len() as u32).collect();
        new.sort_by(|a, b| dims[*a as usize].cmp(&dims[*b as usize]));
        let old = std::mem::take(order);
        order.reserve(old.len() + new.len());
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            let take_old = j == new.len() || i < old.len() && dims[old[i] as usize] <= dims[new[j] as usize];
            if take_old {
                order.push(old[i]);
                i += 1;
            } else {
                order.push(new[j]);
                j += 1;
            }
        }
        rank.resize(order.len(), 0);
        for (i, &k) in order.iter().enumerate() {
            rank[k as usize] = i as u32;
        }
    }
}

/// A key's counters at the emitter: pv, uv (DAU: active), new, returning.
type Sums = [u64; 4];

/// Cumulative values of one period at the emitter.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Period {
    /// Next slice whose window is to be emitted.
    next_slice: u32,
    last_data_slice: u32,
    /// Whether any window of the period was emitted.
    started: bool,
    sums: Vec<Sums>,
    /// Values last written per key (for `emit = "changed"`).
    written: Vec<Sums>,
    /// Summary: value aggregates so far, per key and value field, and as
    /// last written.
    vals: Vec<Agg>,
    written_vals: Vec<Agg>,
}

/// Where a row's measure comes from.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// A counter ([`Sums`] index).
    Count(usize),
    /// A value aggregate: (field index, what of it).
    Value(usize, Which),
}

/// One metric's merge of shard slices into window rows.
pub struct CumulateEmitter {
    geo: Geometry,
    name_json: String,
    /// Summary: `,"grouping":[…]` (else empty).
    grouping: String,
    /// Value fields per key (summary).
    values: usize,
    /// (`,"field":`, where from) of each measure written.
    measures: Vec<(String, Source)>,
    emit: Emit,
    dict: Arc<KeyDict>,
    dims: Vec<String>,
    /// Key ids sorted by rendered dims: the row order within a window.
    order: Vec<u32>,
    /// Per key id, its place in `order`.
    rank: Vec<u32>,
    /// Merged slices not yet folded into a window, by slice.
    pending: std::collections::BTreeMap<u32, Vec<SliceCols>>,
    periods: std::collections::BTreeMap<u32, Period>,
    /// DAU with a `minute_devices` sink: shipped detail rows whose slice
    /// the job's watermark has not passed yet.
    pub details: Option<Details>,
    /// Summary with `top`: the ranked list's settings.
    top: Option<Top>,
}

/// The emitter's state of one metric as a checkpoint records it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CumulateEmitterSaved {
    pending: std::collections::BTreeMap<u32, Vec<SliceCols>>,
    periods: std::collections::BTreeMap<u32, Period>,
    details: Option<Details>,
}

/// A rendered row with its sort key.
pub struct Row {
    pub window_end_ms: i64,
    pub metric: usize,
    pub line: String,
    /// Where the part a topic keys the row by sits in `line`: the group
    /// key's JSON (`{"page":"home"}`), or a `minute_devices` row's device
    /// id as a JSON string.
    pub key_at: std::ops::Range<usize>,
}

impl Row {
    /// The part of the row a topic keys its message by, as JSON.
    pub fn key(&self) -> &str {
        &self.line[self.key_at.clone()]
    }
}

impl CumulateEmitter {
    pub fn new(geo: Geometry, spec: &MetricSpec, dict: Arc<KeyDict>) -> CumulateEmitter {
        let measures: Vec<(String, Source)> = spec
            .measures
            .iter()
            .map(|&m| {
                let from = match m {
                    Measure::Pv | Measure::Count => Source::Count(0),
                    Measure::Uv | Measure::Active => Source::Count(1),
                    Measure::New => Source::Count(2),
                    Measure::Returning => Source::Count(3),
                    Measure::Sum(v) => Source::Value(v as usize, Which::Sum),
                    Measure::Min(v) => Source::Value(v as usize, Which::Min),
                    Measure::Max(v) => Source::Value(v as usize, Which::Max),
                };
                let field = serde_json::to_string(&spec.measure_field(m)).unwrap_or_default();
                (format!(",{field}:"), from)
            })
            .collect();
        let summary = spec.summary.as_ref();
        let top = summary.and_then(|s| s.top.as_ref()).map(|t| Top {
            n: t.n,
            by: measures.iter().zip(&spec.measures).find(|(_, &m)| m == t.by).map_or(Source::Count(0), |(x, _)| x.1),
            per: t.per.iter().map(|&i| spec.group_by[i].clone()).collect(),
            groups: Vec::new(),
        });
        CumulateEmitter {
            top,
            geo,
            name_json: serde_json::to_string(&spec.name).unwrap_or_default(),
            grouping: summary.map_or(String::new(), |s| format!(",\"grouping\":{}", s.grouping_json)),
            values: summary.map_or(0, |s| s.values.len()),
            measures,
            emit: spec.emit,
            dict,
            dims: Vec::new(),
            order: Vec::new(),
            rank: Vec::new(),
            pending: Default::default(),
            periods: Default::default(),
            details: None,
        }
    }

    pub fn saved(&self) -> CumulateEmitterSaved {
        CumulateEmitterSaved {
            pending: self.pending.clone(),
            periods: self.periods.clone(),
            details: self.details.clone(),
        }
    }

    pub fn restore(&mut self, saved: CumulateEmitterSaved) {
        self.pending = saved.pending;
        self.periods = saved.periods;
        if self.details.is_some() {
            self.details = Some(saved.details.unwrap_or_default());
        }
    }

    /// Adds one shard's shipped detail rows of `slice`.
    pub fn add_details(&mut self, slice: u32, buf: DetailBuf) -> io::Result<()> {
        match &mut self.details {
            Some(d) => d.add(slice, buf),
            None => Ok(()),
        }
    }

    /// The `minute_devices` rows of every slice the watermark passed, by
    /// slice.
    pub fn take_details(&mut self, wm_ms: i64) -> Vec<(u32, DetailBuf)> {
        let geo = self.geo;
        self.details.as_mut().map_or_else(Vec::new, |d| d.take_while(|s| geo.slice_end_ms(s) <= wm_ms))
    }

    /// Renders the `minute_devices` rows of `slice` into `row`, one after
    /// the other, in a fixed order (source, dims, device id), calling
    /// `write` for each: `{"metric":…,"source":…,"minute":…,"dims":…,
    /// "did":…}`, `minute` being the step's start; `row.key_at` locates
    /// the device id's JSON string. `sources`: the source names as JSON.
    pub fn render_details<E>(
        &mut self,
        metric: usize,
        slice: u32,
        buf: &DetailBuf,
        sources: &[String],
        row: &mut Row,
        write: &mut impl FnMut(&Row) -> Result<(), E>,
    ) -> Result<(), E> {
        self.dict.catch_up(&mut self.dims);
        sort_dims(&self.dims, &mut self.order, &mut self.rank);
        let dims = &self.dims;
        // Keys by their dims' order (ranks compare as the texts do).
        let rank = |k: u32| self.rank.get(k as usize).copied().unwrap_or(u32::MAX);
        let mut order: Vec<(u32, u32, u32)> =
            buf.rows.iter().enumerate().map(|(i, r)| (r.source, rank(r.key), i as u32)).collect();
        order.sort_unstable_by(|a, b| {
            (a.0, a.1).cmp(&(b.0, b.1)).then_with(|| buf.id(a.2 as usize).cmp(buf.id(b.2 as usize)))
        });
        let order = order.into_iter().map(|(_, _, i)| i);
        let mut head = String::with_capacity(64);
        head.push_str(",\"minute\":");
        head.push_str(itoa::Buffer::new().format(self.geo.slice_start_ms(slice)));
        head.push_str(",\"dims\":");
        row.metric = metric;
        row.window_end_ms = self.geo.slice_end_ms(slice);
        for i in order {
            let r = &buf.rows[i as usize];
            let line = &mut row.line;
            line.clear();
            line.push_str("{\"metric\":");
            line.push_str(&self.name_json);
            line.push_str(",\"source\":");
            line.push_str(sources.get(r.source as usize).map_or("null", String::as_str));
            line.push_str(&head);
            line.push_str(dims_of(dims, r.key));
            line.push_str(",\"did\":");
            let at = line.len();
            push_json_string(line, buf.id(i as usize));
            row.key_at = at..line.len();
            line.push_str("}\n");
            write(row)?;
        }
        Ok(())
    }

    /// Adds one shard's shipped slice.
    pub fn add(&mut self, cols: SliceCols) {
        let s = cols.slice;
        // (After re-sharding a shard may ship uv without pv.)
        if cols.pv.iter().all(|&p| p == 0) && cols.uv.iter().all(|&u| u == 0) {
            return;
        }
        self.pending.entry(s).or_default().push(cols);
        let p = self.geo.period_of_slice(s);
        let period = self.periods.entry(p).or_insert_with(|| Period {
            next_slice: s,
            last_data_slice: s,
            started: false,
            sums: Vec::new(),
            written: Vec::new(),
            vals: Vec::new(),
            written_vals: Vec::new(),
        });
        debug_assert!(s >= period.next_slice || !period.started, "slice {s} arrived after its window was emitted");
        if !period.started {
            period.next_slice = period.next_slice.min(s);
        }
        period.last_data_slice = period.last_data_slice.max(s);
    }

    /// Emits every window the watermark passed (or, when `final_flush`,
    /// every window up to the last slice holding data) as rows.
    pub fn emit(&mut self, metric: usize, wm_ms: i64, final_flush: bool, rows: &mut Vec<Row>) {
        let periods: Vec<u32> = self.periods.keys().copied().collect();
        let open = self.geo.open_slice(wm_ms);
        for p in periods {
            let last = self.geo.last_slice_of_period(p);
            let bound = if final_flush { self.periods[&p].last_data_slice as i64 } else { (open - 1).min(last as i64) };
            let Some(period) = self.periods.get(&p) else {
                continue;
            };
            let from = period.next_slice;
            for s in from as i64..=bound {
                self.window(metric, p, s as u32, rows);
            }
            let done = final_flush || bound >= last as i64;
            if let Some(period) = self.periods.get_mut(&p) {
                period.next_slice = period.next_slice.max((bound + 1).max(0) as u32);
            }
            if done {
                self.periods.remove(&p);
            }
        }
    }

    /// Folds slice `s` into its period and renders the window ending with it.
    fn window(&mut self, metric: usize, p: u32, s: u32, rows: &mut Vec<Row>) {
        let Some(period) = self.periods.get_mut(&p) else {
            return;
        };
        period.started = true;
        let nv = self.values;
        let (keys, sums, vals) = merge_shipped(&self.pending.remove(&s).unwrap_or_default(), nv);
        let start = self.geo.period_start_ms(p);
        let end = self.geo.slice_end_ms(s);
        let mut head = String::with_capacity(96);
        head.push_str("{\"metric\":");
        head.push_str(&self.name_json);
        head.push_str(",\"window_start\":");
        head.push_str(itoa::Buffer::new().format(start));
        head.push_str(",\"window_end\":");
        head.push_str(itoa::Buffer::new().format(end));
        head.push_str(&self.grouping);
        head.push_str(",\"dims\":");
        let head = RowHead { text: head, end, metric };
        if keys.last().is_some_and(|&k| k as usize >= self.dims.len()) {
            self.dict.catch_up(&mut self.dims);
        }
        if self.geo.size_ms == self.geo.step_ms {
            // A tumble window is its period: its rows are the keys the
            // slice holds, in dims order; nothing is kept for later.
            // Ranks compare as the dims' texts do (equal texts: by key id,
            // as `keys` is sorted), at the cost of an integer sort.
            sort_dims(&self.dims, &mut self.order, &mut self.rank);
            let rank = |k: u32| self.rank.get(k as usize).copied().unwrap_or(u32::MAX);
            let mut order: Vec<usize> = (0..keys.len()).filter(|&i| sums[i][0] > 0).collect();
            order.sort_unstable_by_key(|&i| (rank(keys[i]), keys[i]));
            let zero = vec![Agg::default(); nv];
            let mut out = Vec::with_capacity(order.len());
            for i in order {
                let v = &vals[i * nv..(i + 1) * nv];
                if self.emit == Emit::Changed && self.measures.iter().all(|(_, f)| f.same(&[0; 4], &zero, &sums[i], v))
                {
                    continue;
                }
                out.push((keys[i], sums[i], i * nv));
            }
            write_rows(&mut self.top, &self.dims, &self.measures, &head, &out, &vals, nv, rows);
            return;
        }
        if let Some(&last) = keys.last() {
            let n = last as usize + 1;
            if period.sums.len() < n {
                period.sums.resize(n, [0; 4]);
                period.written.resize(n, [0; 4]);
                period.vals.resize(n * nv, Agg::default());
                period.written_vals.resize(n * nv, Agg::default());
            }
        }
        for (i, &k) in keys.iter().enumerate() {
            let k = k as usize;
            for (x, y) in period.sums[k].iter_mut().zip(&sums[i]) {
                *x += y;
            }
            for (a, b) in period.vals[k * nv..(k + 1) * nv].iter_mut().zip(&vals[i * nv..(i + 1) * nv]) {
                a.merge(b);
            }
        }
        sort_dims(&self.dims, &mut self.order, &mut self.rank);
        let mut out = Vec::new();
        for &k in &self.order {
            let k = k as usize;
            let sums = match period.sums.get(k) {
                Some(&sums) if sums[0] > 0 => sums,
                _ => continue,
            };
            let vals = &period.vals[k * nv..(k + 1) * nv];
            let was = (&period.written[k], &period.written_vals[k * nv..(k + 1) * nv]);
            if self.emit == Emit::Changed && self.measures.iter().all(|(_, f)| f.same(was.0, was.1, &sums, vals)) {
                continue;
            }
            period.written[k] = sums;
            period.written_vals[k * nv..(k + 1) * nv].copy_from_slice(vals);
            out.push((k as u32, sums, k * nv));
        }
        write_rows(&mut self.top, &self.dims, &self.measures, &head, &out, &period.vals, nv, rows);
    }
}

/// A key's rendered dims.
fn dims_of(dims: &[String], k: u32) -> &str {
    dims.get(k as usize).map_or("{}", String::as_str)
}

/// Renders a window's rows, given in dims order as (key, counters, where
/// its `nv` aggregates start in `vals`); with `top`, only the `n` best of
/// each group of the `per` fields, ranked, by group then rank.
#[allow(clippy::too_many_arguments)]
fn write_rows(
    top: &mut Option<Top>,
    dims: &[String],
    measures: &[(String, Source)],
    head: &RowHead,
    out: &[(u32, Sums, usize)],
    vals: &[Agg],
    nv: usize,
    rows: &mut Vec<Row>,
) {
    let vals_of = |at: usize| &vals[at..at + nv];
    let Some(top) = top else {
        for &(k, sums, at) in out {
            rows.push(head.row(dims_of(dims, k), measures, &sums, vals_of(at), None));
        }
        return;
    };
    // Group, then rank by the measure (largest first, null last); ties
    // keep dims order (the sort is stable).
    let mut ranked: Vec<(String, usize)> = Vec::with_capacity(out.len());
    for (i, &(k, _, _)) in out.iter().enumerate() {
        ranked.push((top.group(k, dims), i));
    }
    let score = |i: usize| top.by.score(&out[i].1, vals_of(out[i].2));
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| score(b.1).partial_cmp(&score(a.1)).unwrap_or(Ordering::Equal)));
    let mut rank = 0;
    for (j, (group, i)) in ranked.iter().enumerate() {
        rank = if j > 0 && ranked[j - 1].0 == *group { rank + 1 } else { 1 };
        if rank <= top.n {
            let (k, sums, at) = out[*i];
            rows.push(head.row(dims_of(dims, k), measures, &sums, vals_of(at), Some(rank)));
        }
    }
}

/// A summary's ranked list at the emitter.
struct Top {
    n: usize,
    by: Source,
    /// Names of the fields ranked within.
    per: Vec<String>,
    /// Per key id: the `per` fields' values as JSON (computed once).
    groups: Vec<Option<String>>,
}

impl Top {
    /// The group of key `k`: its `per` values, as JSON text.
    fn group(&mut self, k: u32, dims: &[String]) -> String {
        let k = k as usize;
        if self.groups.len() <= k {
            self.groups.resize(k + 1, None);
        }
        if self.groups[k].is_none() {
            let parsed: serde_json::Map<String, serde_json::Value> =
                dims.get(k).and_then(|d| serde_json::from_str(d).ok()).unwrap_or_default();
            let values: Vec<&serde_json::Value> =
                self.per.iter().map(|f| parsed.get(f).unwrap_or(&serde_json::Value::Null)).collect();
            self.groups[k] = Some(serde_json::to_string(&values).unwrap_or_default());
        }
        self.groups[k].clone().unwrap_or_default()
    }
}

/// A measure's value for ranking: `null` below every value.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
enum Score {
    Null,
    Int(i128),
    Float(f64),
}

impl Source {
    /// The measure's value, for ranking.
    fn score(&self, sums: &Sums, vals: &[Agg]) -> Score {
        match *self {
            Source::Count(at) => Score::Int(sums[at] as i128),
            Source::Value(v, _) if vals[v].n == 0 => Score::Null,
            Source::Value(v, Which::Sum) => Score::Int(vals[v].sum),
            Source::Value(v, Which::Min) => Score::Float(vals[v].min),
            Source::Value(v, Which::Max) => Score::Float(vals[v].max),
        }
    }

    /// Whether the measure shows the same value for (`a`, `av`) as for
    /// (`b`, `bv`).
    fn same(&self, a: &Sums, av: &[Agg], b: &Sums, bv: &[Agg]) -> bool {
        match *self {
            Source::Count(at) => a[at] == b[at],
            Source::Value(v, _) => av[v] == bv[v],
        }
    }
}

/// What every row of one window starts with.
struct RowHead {
    /// `{"metric":…,"window_start":…,"window_end":…[,"grouping":…],"dims":`
    text: String,
    end: i64,
    metric: usize,
}

impl RowHead {
    fn row(&self, dims: &str, measures: &[(String, Source)], sums: &Sums, vals: &[Agg], rank: Option<usize>) -> Row {
        // Room for every part, so that the line is not copied to grow: a
        // measure's name and up to 24 bytes of number each, the rank and
        // the closing `}\n` in 16.
        let names: usize = measures.iter().map(|(field, _)| field.len()).sum();
        let mut line = String::with_capacity(self.text.len() + dims.len() + names + 24 * measures.len() + 16);
        line.push_str(&self.text);
        let key_at = line.len()..line.len() + dims.len();
        line.push_str(dims);
        for (field, from) in measures {
            line.push_str(field);
            match *from {
                Source::Count(at) => line.push_str(itoa::Buffer::new().format(sums[at])),
                Source::Value(v, what) => vals[v].render(what, &mut line),
            }
        }
        if let Some(r) = rank {
            line.push_str(",\"rank\":");
            line.push_str(itoa::Buffer::new().format(r));
        }
        line.push_str("}\n");
        Row { window_end_ms: self.end, metric: self.metric, line, key_at }
    }
}

/// The slices the shards shipped for one slice, summed per key: keys
/// ascending, their counters and (`nv` per key) value aggregates.
fn merge_shipped(shipped: &[SliceCols], nv: usize) -> (Vec<u32>, Vec<Sums>, Vec<Agg>) {
    let mut at: Vec<(u32, u32, u32)> = Vec::with_capacity(shipped.iter().map(|c| c.keys.len()).sum());
    for (c, cols) in shipped.iter().enumerate() {
        at.extend(cols.keys.iter().enumerate().map(|(i, &k)| (k, c as u32, i as u32)));
    }
    at.sort_unstable();
    let (mut keys, mut sums, mut vals) = (Vec::new(), Vec::<Sums>::new(), Vec::new());
    let col = |v: &Vec<u32>, i: usize| v.get(i).copied().unwrap_or(0) as u64;
    for (k, c, i) in at {
        let (cols, i) = (&shipped[c as usize], i as usize);
        if keys.last() != Some(&k) {
            keys.push(k);
            sums.push([0; 4]);
            vals.resize(vals.len() + nv, Agg::default());
        }
        let sum = sums.last_mut().expect("pushed above");
        sum[0] += col(&cols.pv, i);
        sum[1] += col(&cols.uv, i);
        sum[2] += col(&cols.new, i);
        sum[3] += col(&cols.ret, i);
        let from = vals.len() - nv;
        for (a, b) in vals[from..].iter_mut().zip(&cols.vals[i * nv..(i + 1) * nv]) {
            a.merge(b);
        }
    }
    (keys, sums, vals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::dedup::ENTRY_BYTES;

    fn geo() -> Geometry {
        Geometry::of(60_000, 86_400_000, 8 * 3_600_000)
    }

    /// Checkpoints of one table through [`TableOut::table`]: each round
    /// adds `new` entries and rewrites `changed` of the old ones; returns
    /// "B" (base) or "d" (delta) per round.
    fn chain_decisions(rounds: &[(u64, u64)]) -> String {
        let dir = Path::new("/nonexistent");
        let pool = Arc::new(SnapshotPool::default());
        let (mut files, mut written) = (Vec::new(), 0);
        let mut table = DedupTable::anonymous().unwrap();
        table.track_changes();
        let (mut chain, mut next, mut decided) = (None, 0u64, String::new());
        for (g, &(new, changed)) in rounds.iter().enumerate() {
            for d in 0..changed.min(next) {
                // an earlier first slice: the entry is rewritten
                table.observe(d.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, 0, 1_000 - g as u32).unwrap();
            }
            for d in next..next + new {
                table.observe(d.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, 0, 1_000).unwrap();
            }
            next += new;
            let mut out = TableOut { dir, generation: g as u64, pool: &pool, files: &mut files, written: &mut written };
            let (c, _, len) = out.table(&mut table, &mut chain, &format!("t-g{g}")).unwrap();
            assert_eq!(len, next);
            let held: u64 = std::iter::once(&c.base).chain(&c.deltas).map(|f| f.bytes).sum();
            assert!(held <= 2 * next * ENTRY_BYTES as u64, "the chain holds at most twice the entries");
            decided.push(if c.deltas.is_empty() { 'B' } else { 'd' });
        }
        decided
    }

    #[test]
    fn a_growing_table_writes_deltas_of_its_new_entries() {
        // Doubling at every checkpoint: each delta is as large as the
        // table was before, never more than its entries now.
        assert_eq!(chain_decisions(&[(1_000, 0), (1_000, 0), (2_000, 0), (4_000, 0)]), "Bddd");
        let base = ENTRY_BYTES as u64 * 1_000;
        let pool = Arc::new(SnapshotPool::default());
        let mut table = DedupTable::anonymous().unwrap();
        table.track_changes();
        for d in 0..1_000u64 {
            table.observe(d.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, 0, 1_000).unwrap();
        }
        let (mut files, mut written, mut chain) = (Vec::new(), 0, None);
        let mut out =
            TableOut { dir: Path::new("/x"), generation: 1, pool: &pool, files: &mut files, written: &mut written };
        let (c, capacity, _) = out.table(&mut table, &mut chain, "t").unwrap();
        assert_eq!((c.base.bytes, capacity), (base, table.capacity() as u64), "a base is the entries only");
    }

    #[test]
    fn a_chain_gets_a_new_base_past_the_entries_or_the_file_limit() {
        // 1,000 entries rewritten at every checkpoint: the second delta
        // would make the deltas 2,000 entries against 1,000 in the table.
        assert_eq!(chain_decisions(&[(1_000, 0), (0, 600), (0, 600), (0, 600)]), "BdBd");
        let many = vec![(10, 0); DELTAS_PER_BASE_MAX + 3];
        let decided = chain_decisions(&[&[(100_000, 0)][..], &many].concat());
        let want = format!("B{}B{}", "d".repeat(DELTAS_PER_BASE_MAX), "dd");
        assert_eq!(decided, want, "a base after {DELTAS_PER_BASE_MAX} deltas");
    }

    #[test]
    fn slices_and_periods_follow_local_midnight() {
        let g = geo();
        let midnight = 1_771_171_200_000; // 2026-02-16T00:00+08:00
        let s = g.slice_of(midnight);
        assert_eq!(g.slice_start_ms(s), midnight);
        assert_eq!(g.period_start_ms(g.period_of_slice(s)), midnight);
        assert_eq!(g.period_of_slice(s - 1) + 1, g.period_of_slice(s));
        assert_eq!(g.first_slice_of_period(g.period_of_slice(s)), s);
        assert_eq!(g.last_slice_of_period(g.period_of_slice(s - 1)), s - 1);
    }

    #[test]
    fn every_slice_lies_in_its_period_whatever_the_step_and_size() {
        for (step, size) in [(60_000, 60_000), (600_000, 3_600_000), (60_000, 86_400_000), (3_600_000, 86_400_000)] {
            let g = Geometry::of(step, size, 8 * 3_600_000);
            let s0 = g.slice_of(1_771_171_200_000);
            for s in s0 - 3000..s0 + 3000 {
                let p = g.period_of_slice(s);
                let start = g.slice_start_ms(s);
                assert!(g.period_start_ms(p) <= start && start < g.period_start_ms(p + 1), "{step}/{size}: slice {s}");
                assert!(g.first_slice_of_period(p) <= s && s <= g.last_slice_of_period(p), "{step}/{size}: slice {s}");
                assert_eq!(g.slice_start_ms(g.first_slice_of_period(p)), g.period_start_ms(p), "{step}/{size}");
            }
        }
    }

    #[test]
    fn late_events_fold_into_the_open_slice_of_their_period() {
        let g = geo();
        let midnight = 1_771_171_200_000;
        let s = g.slice_of(midnight + 10 * 60_000);
        let wm = midnight + 12 * 60_000 + 5;
        assert_eq!(g.place(s, wm, LatePolicy::Fold), Placement::Folded(s + 2));
        assert_eq!(g.place(s, wm, LatePolicy::Drop), Placement::Dropped);
        assert_eq!(g.place(s + 2, wm, LatePolicy::Drop), Placement::OnTime);
        // The day ended: no window of it is left to fold into.
        assert_eq!(g.place(s - 1, midnight + 86_400_000, LatePolicy::Fold), Placement::Dropped);
        assert_eq!(g.place(s, i64::MIN, LatePolicy::Drop), Placement::OnTime);
    }

    #[test]
    fn shard_moves_a_device_to_its_earlier_slice() {
        let g = geo();
        let mut sh = CumulateShard::new(g, None, "t".into(), false);
        sh.apply(1, 0, 100, 0, b"", &[]).unwrap();
        sh.apply(1, 0, 98, 0, b"", &[]).unwrap();
        sh.apply(2, 0, 100, 0, b"", &[]).unwrap();
        let mut got = Vec::new();
        sh.ship(i64::MAX, &mut |c| got.push((c.slice, c.pv[0], c.uv[0])), &mut |_, _| {}).unwrap();
        assert_eq!(got, [(98, 1, 1), (100, 2, 1)]);
    }
}

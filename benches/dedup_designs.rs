//! Three designs of the per-source minute dedup in front of a DAU metric,
//! on one generated stream with real disorder (issue #3):
//!
//! 1. **exact set**: one entry per (device, key, minute) in an `AHashSet`;
//!    entries older than `latest minute seen - tolerance` are evicted each
//!    time the latest minute advances, events older than that are dropped
//!    as late. (1b: the same set never evicted, for scale.)
//! 2. **latest only**: per (device, key) the latest minute seen, in an
//!    `AHashMap`; an event whose minute is <= the latest is dropped.
//! 3. **ring**: the engine's `tally::state::ring::RingTable` (latest minute
//!    plus a bitmap of the `tolerance` minutes before it; 20-byte entries).
//!    (3b: the same, prefetching 16 records ahead as the shard loop does.)
//!
//! Each design sees the stream in arrival order; the records it passes are
//! counted into a cumulative `active` curve per (key, minute) (a device
//! counts from the smallest minute among its passed records for that key),
//! compared with the curve computed from the event times.
//!
//! ```sh
//! cargo bench --bench dedup_designs
//! DEDUP_BENCH_EVENTS=2000000 DEDUP_BENCH_DEVICES=200000 cargo bench --bench dedup_designs  # quick
//! ```
//!
//! env:
//! - `DEDUP_BENCH_EVENTS` (default 16_000_000): events before duplicates
//! - `DEDUP_BENCH_DEVICES` (default 1_000_000)
//! - `DEDUP_BENCH_REPS` (default 3): timed runs per design, interleaved
//!   across designs (best reported)
//!
//! Speed times only the dedup decisions (each design's loop over the
//! arrival-ordered records, counting its verdicts), not the generation,
//! the curves or the drop of the structure. State bytes: the structure's
//! slot arrays at their largest (hash sets never shrink here, so that is
//! their size at the end): `capacity x 20 B` for the ring table, and for
//! the std/hashbrown tables `buckets x (entry + 1 control byte) + 16`,
//! cross-checked against the peak heap bytes seen by a counting allocator
//! during the run (which also includes the old array during a growth).
//! The report (markdown) goes to stdout, progress to stderr.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::hash_map::Entry;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use ahash::{AHashMap, AHashSet};
use rand_xoshiro::rand_core::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use tally::state::ring::{ring_key, Ring, RingTable};

// ---------------------------------------------------------------- allocator

/// Counts live heap bytes and their peak, to check the hash-set estimates.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Relaxed) + new - l.size();
                PEAK.fetch_max(now, Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---------------------------------------------------------------- stream

const TOLERANCE: u32 = 16;
const KEYS: usize = 3;
/// 2026-11-25T00:00Z in minutes since 1970; the stream covers its first 4 h.
const DAY_START_MIN: u32 = 1_795_564_800 / 60;
const SPAN_S: u32 = 4 * 3600;
const MINUTES: usize = (SPAN_S / 60) as usize;
const DELAYED_PER_MILLE: u64 = 300;
const DELAY_MAX_S: u64 = 12 * 60;
const DUP_PER_MILLE: u64 = 20;
const DUP_LAG_MAX_S: u64 = 120;
const SEED: u64 = 0x07A1_1DA0_2026_0003;

/// One event as a source delivers it.
#[derive(Clone, Copy)]
#[repr(C)]
struct Rec {
    fp: u64,
    /// `ring_key(0, platform)`: one source.
    rkey: u32,
    /// Minutes since 1970 of the event time (never 0).
    step: u32,
    dev: u32,
    arrival_s: u32,
}

fn unit(rng: &mut Xoshiro256PlusPlus) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn below(rng: &mut Xoshiro256PlusPlus, n: u64) -> u64 {
    ((rng.next_u64() as u128 * n as u128) >> 64) as u64
}

struct Stream {
    recs: Vec<Rec>,
    delayed: u64,
    dups: u64,
    sessions: u64,
}

/// Sessions of 1–6 events of one device on one platform, 0–90 s apart,
/// starting uniformly over 4 h; devices skewed (`N·u^1.5`: device 0 has
/// about 1,600 events, the tail about 10); a device's platform is fixed by
/// its id (55/35/10%) except in 10% of sessions. 30% of events arrive
/// 1 s–12 min late; 2% are sent twice, the copy 0–120 s after the original.
/// Arrival order: by arrival second, ties in generation order.
fn generate(events: u64, devices: u32) -> Stream {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(SEED);
    let fps: Vec<u64> =
        (0..devices).map(|d| xxhash_rust::xxh3::xxh3_64(itoa::Buffer::new().format(d).as_bytes())).collect();
    let mut recs = Vec::with_capacity((events + events / 40) as usize);
    let (mut n, mut delayed, mut dups, mut sessions) = (0u64, 0u64, 0u64, 0u64);
    while n < events {
        let dev = ((devices as f64) * unit(&mut rng).powf(1.5)) as u32;
        let dev = dev.min(devices - 1);
        let primary = match fps[dev as usize] % 100 {
            0..=54 => 0u32,
            55..=89 => 1,
            _ => 2,
        };
        let platform = if below(&mut rng, 10) == 0 { (primary + 1 + below(&mut rng, 2) as u32) % 3 } else { primary };
        let mut t = below(&mut rng, SPAN_S as u64) as u32;
        let len = 1 + below(&mut rng, 6);
        sessions += 1;
        for _ in 0..len {
            if t >= SPAN_S || n >= events {
                break;
            }
            let delay = if below(&mut rng, 1000) < DELAYED_PER_MILLE {
                delayed += 1;
                1 + below(&mut rng, DELAY_MAX_S) as u32
            } else {
                0
            };
            let r = Rec {
                fp: fps[dev as usize],
                rkey: ring_key(0, platform),
                step: DAY_START_MIN + t / 60,
                dev,
                arrival_s: t + delay,
            };
            recs.push(r);
            n += 1;
            if below(&mut rng, 1000) < DUP_PER_MILLE {
                dups += 1;
                recs.push(Rec { arrival_s: r.arrival_s + below(&mut rng, DUP_LAG_MAX_S + 1) as u32, ..r });
            }
            t += below(&mut rng, 91) as u32;
        }
    }
    recs.sort_by_key(|r| r.arrival_s); // stable: ties keep generation order
    Stream { recs, delayed, dups, sessions }
}

// ---------------------------------------------------------------- designs

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass = 0,
    /// Same minute seen already.
    Again = 1,
    /// Dropped because older: late for the set and the ring, "minute <
    /// latest" for latest-only.
    Older = 2,
}

trait Design {
    const NAME: &'static str;
    fn new() -> Self;
    fn decide(&mut self, r: &Rec) -> Verdict;
    #[inline]
    fn prefetch(&self, _r: &Rec) {}
    /// Bytes of the slot arrays at their largest.
    fn bytes(&self) -> usize;
    fn entries(&self) -> usize;
    fn peak_entries(&self) -> usize {
        self.entries()
    }
}

/// Bytes of a std (hashbrown) table with room for `capacity` items of `T`:
/// power-of-two buckets at 7/8 load, one control byte per bucket plus one
/// 16-byte group.
fn swiss_bytes<T>(capacity: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets =
        if capacity < 8 { (capacity + 1).next_power_of_two() } else { (capacity / 7 * 8).next_power_of_two() };
    buckets * (std::mem::size_of::<T>() + 1) + 16
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct MinuteKey {
    fp: u64,
    rkey: u32,
    step: u32,
}

struct ExactSet<const EVICT: bool> {
    set: AHashSet<MinuteKey>,
    latest: u32,
    peak: usize,
}

impl<const EVICT: bool> Design for ExactSet<EVICT> {
    const NAME: &'static str =
        if EVICT { "1. exact set (evicted each minute)" } else { "1b. exact set, never evicted" };
    fn new() -> Self {
        ExactSet { set: AHashSet::new(), latest: 0, peak: 0 }
    }
    #[inline]
    fn decide(&mut self, r: &Rec) -> Verdict {
        if r.step > self.latest {
            self.latest = r.step;
            if EVICT {
                let horizon = self.latest - TOLERANCE;
                self.set.retain(|k| k.step >= horizon);
            }
        }
        if EVICT && self.latest - r.step > TOLERANCE {
            return Verdict::Older;
        }
        if self.set.insert(MinuteKey { fp: r.fp, rkey: r.rkey, step: r.step }) {
            if self.set.len() > self.peak {
                self.peak = self.set.len();
            }
            Verdict::Pass
        } else {
            Verdict::Again
        }
    }
    fn bytes(&self) -> usize {
        swiss_bytes::<MinuteKey>(self.set.capacity())
    }
    fn entries(&self) -> usize {
        self.set.len()
    }
    fn peak_entries(&self) -> usize {
        self.peak
    }
}

/// (device, key), 12 bytes, so a map slot (key, latest minute) is 16.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C, packed(4))]
struct PairKey {
    fp: u64,
    rkey: u32,
}

struct LatestOnly {
    map: AHashMap<PairKey, u32>,
}

impl Design for LatestOnly {
    const NAME: &'static str = "2. latest only";
    fn new() -> Self {
        LatestOnly { map: AHashMap::new() }
    }
    #[inline]
    fn decide(&mut self, r: &Rec) -> Verdict {
        match self.map.entry(PairKey { fp: r.fp, rkey: r.rkey }) {
            Entry::Vacant(v) => {
                v.insert(r.step);
                Verdict::Pass
            }
            Entry::Occupied(mut o) => {
                let latest = *o.get();
                if r.step > latest {
                    o.insert(r.step);
                    Verdict::Pass
                } else if r.step == latest {
                    Verdict::Again
                } else {
                    Verdict::Older
                }
            }
        }
    }
    fn bytes(&self) -> usize {
        swiss_bytes::<(PairKey, u32)>(self.map.capacity())
    }
    fn entries(&self) -> usize {
        self.map.len()
    }
}

struct RingDesign<const PREFETCH: bool> {
    table: RingTable,
}

impl<const PREFETCH: bool> Design for RingDesign<PREFETCH> {
    const NAME: &'static str = if PREFETCH { "3b. ring, prefetch 16 ahead" } else { "3. ring (engine)" };
    fn new() -> Self {
        // Grown from empty, like the hash sets (and the engine's first day).
        RingDesign { table: RingTable::anonymous_for(0).expect("ring table") }
    }
    #[inline]
    fn decide(&mut self, r: &Rec) -> Verdict {
        match self.table.observe(r.fp, r.rkey, r.step, TOLERANCE).expect("observe") {
            Ring::Pass => Verdict::Pass,
            Ring::Again => Verdict::Again,
            Ring::Late => Verdict::Older,
        }
    }
    #[inline]
    fn prefetch(&self, r: &Rec) {
        if PREFETCH {
            self.table.prefetch(r.fp, r.rkey);
        }
    }
    fn bytes(&self) -> usize {
        self.table.bytes()
    }
    fn entries(&self) -> usize {
        self.table.len()
    }
}

const PREFETCH_AHEAD: usize = 16;

struct Run<D> {
    seconds: f64,
    counts: [u64; 3],
    heap_peak: usize,
    design: D,
}

/// One pass of design `D` over the stream; `out` gets each verdict when given.
#[inline(never)]
fn run<D: Design>(recs: &[Rec], out: Option<&mut Vec<u8>>) -> Run<D> {
    let heap_before = LIVE.load(Relaxed);
    PEAK.store(heap_before, Relaxed);
    let mut d = D::new();
    let mut counts = [0u64; 3];
    let t0 = Instant::now();
    match out {
        None => {
            for i in 0..recs.len() {
                if let Some(a) = recs.get(i + PREFETCH_AHEAD) {
                    d.prefetch(a);
                }
                counts[d.decide(&recs[i]) as usize] += 1;
            }
        }
        Some(v) => {
            v.clear();
            for i in 0..recs.len() {
                if let Some(a) = recs.get(i + PREFETCH_AHEAD) {
                    d.prefetch(a);
                }
                let x = d.decide(&recs[i]);
                counts[x as usize] += 1;
                v.push(x as u8);
            }
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let heap_peak = PEAK.load(Relaxed) - heap_before;
    Run { seconds, counts: black_box(counts), heap_peak, design: d }
}

// ---------------------------------------------------------------- curves

/// `active[key][minute]`: (device, key) pairs whose first minute is <= minute.
fn curve(first: &[u32]) -> Vec<[u64; MINUTES]> {
    let mut c = vec![[0u64; MINUTES]; KEYS];
    for (i, &m) in first.iter().enumerate() {
        if m != u32::MAX {
            c[i % KEYS][(m - DAY_START_MIN) as usize] += 1;
        }
    }
    for k in c.iter_mut() {
        for m in 1..MINUTES {
            k[m] += k[m - 1];
        }
    }
    c
}

fn first_minutes<'a>(devices: u32, recs: impl Iterator<Item = &'a Rec>) -> Vec<u32> {
    let mut first = vec![u32::MAX; devices as usize * KEYS];
    for r in recs {
        let i = r.dev as usize * KEYS + (r.rkey as usize);
        first[i] = first[i].min(r.step);
    }
    first
}

struct Accuracy {
    max_rel: f64,
    /// (key, minute of the day) of `max_rel`.
    max_at: (usize, usize),
    /// Mean relative difference over minutes 60.. (after the first hour).
    mean_rel_after_1h: f64,
    mean_rel: f64,
    points_off: usize,
    day_total: u64,
    day_total_diff: i64,
}

fn accuracy(truth: &[[u64; MINUTES]], got: &[[u64; MINUTES]]) -> Accuracy {
    let (mut max_rel, mut max_at, mut sum, mut n, mut off) = (0f64, (0, 0), 0f64, 0usize, 0usize);
    let (mut sum_late, mut n_late) = (0f64, 0usize);
    for (k, (t, g)) in truth.iter().zip(got).enumerate() {
        for m in 0..MINUTES {
            let rel = (g[m] as f64 - t[m] as f64).abs() / t[m] as f64;
            if rel > max_rel {
                (max_rel, max_at) = (rel, (k, m));
            }
            if m >= 60 {
                sum_late += rel;
                n_late += 1;
            }
            sum += rel;
            n += 1;
            off += (g[m] != t[m]) as usize;
        }
    }
    let day_total: u64 = got.iter().map(|k| k[MINUTES - 1]).sum();
    let truth_total: u64 = truth.iter().map(|k| k[MINUTES - 1]).sum();
    Accuracy {
        max_rel,
        max_at,
        mean_rel_after_1h: sum_late / n_late as f64,
        mean_rel: sum / n as f64,
        points_off: off,
        day_total,
        day_total_diff: day_total as i64 - truth_total as i64,
    }
}

// ---------------------------------------------------------------- report

/// A ratio in scientific notation, 3 decimals.
struct Sci(f64);

impl std::fmt::Display for Sci {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{:.3e}", self.0)
    }
}

struct Row {
    name: &'static str,
    bytes: usize,
    heap_peak: usize,
    entries: usize,
    peak_entries: usize,
    best_s: f64,
    all_s: Vec<f64>,
    counts: [u64; 3],
    acc: Accuracy,
    verdicts: Vec<u8>,
}

/// The recording pass of design `D`: verdicts, state and accuracy (speed
/// comes from the interleaved timed passes of [`timed`]).
fn measure<D: Design>(s: &Stream, devices: u32, truth: &[[u64; MINUTES]]) -> Row {
    let mut verdicts = Vec::with_capacity(s.recs.len());
    let rec = run::<D>(&s.recs, Some(&mut verdicts));
    let (bytes, entries, peak_entries, heap_peak, counts) =
        (rec.design.bytes(), rec.design.entries(), rec.design.peak_entries(), rec.heap_peak, rec.counts);
    drop(rec);
    let passed =
        first_minutes(devices, s.recs.iter().zip(&verdicts).filter(|(_, &v)| v == Verdict::Pass as u8).map(|(r, _)| r));
    let acc = accuracy(truth, &curve(&passed));
    eprintln!("{}: recorded", D::NAME);
    Row {
        name: D::NAME,
        bytes,
        heap_peak,
        entries,
        peak_entries,
        best_s: f64::INFINITY,
        all_s: Vec::new(),
        counts,
        acc,
        verdicts,
    }
}

/// A timed pass: seconds and verdict counts.
type TimedPass = fn(&[Rec]) -> (f64, [u64; 3]);

/// One timed pass of design `D`: seconds and verdict counts.
fn timed<D: Design>(recs: &[Rec]) -> (f64, [u64; 3]) {
    let r = run::<D>(recs, None);
    (r.seconds, r.counts)
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().map(|v| v.replace('_', "").parse().expect(name)).unwrap_or(default)
}

fn main() {
    let events = env_or("DEDUP_BENCH_EVENTS", 16_000_000);
    let devices = env_or("DEDUP_BENCH_DEVICES", 1_000_000) as u32;
    let reps = env_or("DEDUP_BENCH_REPS", 3) as usize;

    let t0 = Instant::now();
    let s = generate(events, devices);
    eprintln!("generated {} records in {:.1} s", s.recs.len(), t0.elapsed().as_secs_f64());

    let truth_first = first_minutes(devices, s.recs.iter());
    let pairs = truth_first.iter().filter(|&&m| m != u32::MAX).count();
    let active_devices = truth_first.chunks(KEYS).filter(|c| c.iter().any(|&m| m != u32::MAX)).count();
    let truth = curve(&truth_first);
    // Disorder actually present: records arriving after a later-minute
    // record of the same (device, key).
    let mut latest = vec![0u32; devices as usize * KEYS];
    let mut behind = 0u64;
    let mut max_lag = 0u32;
    let mut latest_all = 0u32;
    for r in &s.recs {
        let i = r.dev as usize * KEYS + r.rkey as usize;
        behind += (r.step < latest[i]) as u64;
        latest[i] = latest[i].max(r.step);
        latest_all = latest_all.max(r.step);
        max_lag = max_lag.max(latest_all - r.step);
    }
    drop(latest);

    let mut rows = vec![
        measure::<ExactSet<true>>(&s, devices, &truth),
        measure::<ExactSet<false>>(&s, devices, &truth),
        measure::<LatestOnly>(&s, devices, &truth),
        measure::<RingDesign<false>>(&s, devices, &truth),
        measure::<RingDesign<true>>(&s, devices, &truth),
    ];
    let passes: [TimedPass; 5] = [
        timed::<ExactSet<true>>,
        timed::<ExactSet<false>>,
        timed::<LatestOnly>,
        timed::<RingDesign<false>>,
        timed::<RingDesign<true>>,
    ];
    // Timed passes interleaved across designs, so a busy spell of the
    // shared machine hits every design alike.
    for rep in 0..reps {
        for (row, pass) in rows.iter_mut().zip(passes) {
            let (secs, counts) = pass(&s.recs);
            assert_eq!(counts, row.counts, "{}: verdicts differ between runs", row.name);
            row.all_s.push(secs);
            row.best_s = row.best_s.min(secs);
            eprintln!("rep {rep} {}: {secs:.3} s", row.name);
        }
    }
    let same = |a: usize, b: usize| rows[a].verdicts == rows[b].verdicts;

    let n = s.recs.len();
    println!("### Stream");
    println!();
    println!(
        "{n} records = {events} events + {} exact duplicates, {} sessions; {devices} device ids, {active_devices} active, \
         {pairs} (device, key) pairs; {KEYS} keys; 4 h from 2026-11-25T00:00Z ({MINUTES} minutes); \
         {} events ({:.1}%) delayed 1 s–{} min; {} records arrive after a later-minute record of their (device, key); \
         largest lag behind the latest minute seen: {max_lag} min; tolerance {TOLERANCE}. Day total active (truth): {}.",
        s.dups,
        s.sessions,
        s.delayed,
        100.0 * s.delayed as f64 / events as f64,
        DELAY_MAX_S / 60,
        behind,
        truth.iter().map(|k| k[MINUTES - 1]).sum::<u64>(),
    );
    println!();
    println!("### Results");
    println!();
    println!("| design | state bytes | bytes per (device, key) | M events/s | max rel. diff of active | mean rel. diff | day total diff |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.3e} | {:.3e} | {:+} |",
            r.name,
            r.bytes,
            r.bytes as f64 / pairs as f64,
            n as f64 / r.best_s / 1e6,
            r.acc.max_rel,
            r.acc.mean_rel,
            r.acc.day_total_diff
        );
    }
    println!();
    println!("### Details");
    println!();
    println!("| design | entries at end | entries at peak | heap peak during run (alloc counter) | passed | same minute dropped | older dropped | (key, minute) points off of {} | max rel. diff at (key, minute) | mean rel. diff, minutes 60-239 | day total | runs s |", KEYS * MINUTES);
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.entries,
            r.peak_entries,
            if r.heap_peak > 0 { r.heap_peak.to_string() } else { "– (mmap)".into() },
            r.counts[0],
            r.counts[1],
            r.counts[2],
            r.acc.points_off,
            if r.acc.max_rel > 0.0 { format!("({}, {})", r.acc.max_at.0, r.acc.max_at.1) } else { "–".into() },
            Sci(r.acc.mean_rel_after_1h),
            r.acc.day_total,
            r.all_s.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", ")
        );
    }
    println!();
    println!(
        "Verdicts record by record: ring = exact set (evicted): {}; ring = exact set (never evicted): {}; ring = ring with prefetch: {}.",
        same(3, 0),
        same(3, 1),
        same(3, 4)
    );
}

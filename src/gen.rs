//! `tally gen`: deterministic synthetic event logs for tests, benchmarks and demos.
//!
//! The generator writes `N` events (plus duplicates) as JSON lines, CSV or
//! fixed-width binary records ([`BinaryRecord`]), optionally split into `K`
//! files holding consecutive time ranges. Events have a realistic shape:
//! Zipf-like device activity and page popularity, categorical event kinds,
//! platforms and app versions, a flat or "event day" arrival rate, bounded
//! disorder, optional late events and exact duplicate records.
//!
//! # Determinism contract
//!
//! The bytes written are a pure function of the options (except `--out`):
//!
//! - Events are produced in fixed chunks of [`CHUNK_EVENTS`] consecutive event
//!   indices. Chunk `c` draws all of its randomness from its own
//!   Xoshiro256++ seeded from `(seed, c)`, so the number of threads and their
//!   scheduling cannot change the output; chunks are written in index order.
//! - Sampling never looks at the output format or the file split: every format
//!   draws the same random values in the same order, so JSON lines, CSV and
//!   binary output of one seed carry the same event sequence, and `--files K`
//!   only decides where the byte stream is cut (concatenating the JSON-lines
//!   or binary files gives the single-file output; CSV repeats its header).
//! - Changing [`CHUNK_EVENTS`] or any sampling constant changes the output.

use crate::job::parse_duration_ms;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use crossbeam::channel::{self, Receiver, Sender};
use rand_xoshiro::rand_core::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::event::binary::BinaryRecord;

// ---------------------------------------------------------------------------
// Public names and defaults
// ---------------------------------------------------------------------------

/// Event kinds; the binary `event` dimension is the index into this table.
pub const EVENT_NAMES: [&str; 4] = ["view", "click", "share", "like"];
/// Platforms; the binary `platform` dimension is the index into this table.
pub const PLATFORM_NAMES: [&str; 3] = ["android", "ios", "web"];

const DEFAULT_EVENTS: u64 = 1_000_000;
const DEFAULT_DEVICES: u64 = 100_000;
const DEFAULT_PAGES: u32 = 44;
const DEFAULT_OUT: &str = "data";
const DEFAULT_FILES: usize = 1;
const DEFAULT_SEED: u64 = 42;
/// 2026-02-15T22:00:00+08:00: with the default 4h span the data crosses a
/// local midnight, which exercises day rollover in the engine.
const DEFAULT_START_MS: i64 = 1_771_164_000_000;
const DEFAULT_DURATION: &str = "4h";
const DEFAULT_DISORDER: &str = "0s";
const DEFAULT_DISORDER_FRACTION: f64 = 0.3;
const DEFAULT_LATE_FRACTION: f64 = 0.0;
const DEFAULT_LATE_BY: &str = "10m";
const DEFAULT_DUP_RATE: f64 = 0.01;
const DEFAULT_DID_STRINGS: f64 = 0.5;

// ---------------------------------------------------------------------------
// Limits and pipeline sizing
// ---------------------------------------------------------------------------

/// Events per independently seeded chunk. Part of the determinism contract.
/// Small enough that a chunk of JSON lines (~10 MB) is cheap to keep in flight.
pub const CHUNK_EVENTS: u64 = 1 << 16;
/// More generator threads than this only adds memory: the single writer and
/// the disk are the bottleneck long before.
const MAX_THREADS: usize = 8;
/// Finished chunks each worker may queue ahead of the writer; with the chunk
/// being built this bounds memory to about `threads * (1 + this)` chunks.
const CHUNKS_QUEUED_PER_WORKER: usize = 1;
/// Guards against typos like `--files 1000000000` creating a billion files.
const MAX_FILES: usize = 100_000;

// ---------------------------------------------------------------------------
// Sampling constants
// ---------------------------------------------------------------------------

const SECOND_MS: i64 = 1_000;
const MINUTE_MS: i64 = 60 * SECOND_MS;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

/// Device rank is `D * u^DEVICE_SKEW`: the top 1% of devices make ~21% of
/// events, yet the rarest device still expects `N / D / DEVICE_SKEW` events,
/// so with 20 events per device nearly every device shows up.
const DEVICE_SKEW: i32 = 3;
/// Page `k` has weight `1 / (k + 1)^PAGE_ZIPF_EXPONENT`.
const PAGE_ZIPF_EXPONENT: f64 = 1.1;
const EVENT_WEIGHTS: [f64; 4] = [0.70, 0.20, 0.05, 0.05];
const PLATFORM_WEIGHTS: [f64; 3] = [0.50, 0.40, 0.10];
/// App versions `APP_VER_MIN..`; newer versions are more common.
const APP_VER_MIN: u32 = 120;
const APP_VER_WEIGHTS: [f64; 8] = [1.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0];
/// Network names: an extra JSON/CSV field the engine must skip.
const NET_NAMES: [&str; 3] = ["wifi", "4g", "5g"];
const NET_WEIGHTS: [f64; 3] = [0.5, 0.3, 0.2];
/// `dur_ms` is `DUR_MS_MAX * u^2`: mostly short dwell times.
const DUR_MS_MAX: f64 = 60_000.0;
/// A device keeps its session id for this long (true time), as apps do.
const SESSION_MS: i64 = 30 * MINUTE_MS;
/// Late events land `--late-by` plus this much extra behind their true time,
/// so they are strictly beyond a disorder bound equal to `--late-by`.
const LATE_EXTRA_MIN_MS: i64 = SECOND_MS;
const LATE_EXTRA_MAX_MS: i64 = 60 * SECOND_MS;

/// Resolution of the tabulated cumulative rate curve of the `peak` shape.
const TIME_GRID_BINS: usize = 1 << 14;
/// The diurnal baseline follows local time in UTC+08:00 (the default data's zone).
const LOCAL_UTC_OFFSET_MS: i64 = 8 * HOUR_MS;
/// Baseline rate is `1 + A cos(2π (hour - peak hour) / 24)`: 0.4x at 05:00,
/// 1.6x at 17:00 local time.
const DIURNAL_AMPLITUDE: f64 = 0.6;
const DIURNAL_PEAK_HOUR: f64 = 17.0;
/// The event-day peak: a raised-cosine bump multiplying the baseline by up to
/// `PEAK_GAIN`, `PEAK_WIDTH` of the span wide, centred at `PEAK_CENTER`.
const PEAK_CENTER: f64 = 0.8;
const PEAK_WIDTH: f64 = 0.05;
const PEAK_GAIN: f64 = 6.0;

/// Per-line size estimates, only used to pre-size chunk buffers.
const JSONL_LINE_ESTIMATE: usize = 160;
const CSV_LINE_ESTIMATE: usize = 56;

// ---------------------------------------------------------------------------
// Options and report
// ---------------------------------------------------------------------------

/// Output format of `tally gen`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GenFormat {
    /// One JSON object per line.
    #[default]
    Jsonl,
    /// Comma-separated values with a header line.
    Csv,
    /// Concatenated 32-byte little-endian [`BinaryRecord`]s.
    Binary,
}

impl GenFormat {
    /// File name extension (without the dot) used for this format.
    pub fn extension(self) -> &'static str {
        match self {
            GenFormat::Jsonl => "jsonl",
            GenFormat::Csv => "csv",
            GenFormat::Binary => "bin",
        }
    }

    /// Bytes written at the start of every file.
    fn header(self) -> &'static [u8] {
        match self {
            GenFormat::Csv => b"ts,did,page,event,platform,app_ver,net\n",
            GenFormat::Jsonl | GenFormat::Binary => b"",
        }
    }
}

/// What the events describe.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GenScenario {
    /// Page views: pages, event kinds, platforms, app versions.
    #[default]
    Pages,
    /// Live-stream consumption (`view`, `like`, `comment`, `gift` with an
    /// `amount`) in Zipf-hot rooms of authors, with a Big-V spike, plus the
    /// dimension files `authors.csv`, `authors-later.csv` (some authors
    /// moved category, some added: the table as it is later in the day),
    /// `users.jsonl` and `rooms.jsonl`; some keys are missing from each.
    Live,
}

/// Arrival-rate shape over the generated time span.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GenShape {
    /// Constant rate.
    #[default]
    Flat,
    /// Diurnal baseline plus a sharp ~6x peak for 5% of the span around 80%.
    Peak,
}

/// Options of `tally gen`; [`Default`] matches the command-line defaults.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct GenOptions {
    /// Number of distinct events (duplicates come on top).
    #[arg(long, default_value_t = DEFAULT_EVENTS)]
    pub events: u64,
    /// Number of devices; device ids are 1..=DEVICES.
    #[arg(long, default_value_t = DEFAULT_DEVICES)]
    pub devices: u64,
    /// Number of pages, named p0..p<PAGES-1>.
    #[arg(long, default_value_t = DEFAULT_PAGES)]
    pub pages: u32,
    /// Output format.
    #[arg(long, value_enum, default_value_t = GenFormat::Jsonl)]
    pub format: GenFormat,
    /// Output directory (created if missing).
    #[arg(long, default_value = DEFAULT_OUT)]
    pub out: PathBuf,
    /// Number of files, holding consecutive time ranges (events-000.<ext>, ...).
    #[arg(long, default_value_t = DEFAULT_FILES)]
    pub files: usize,
    /// Random seed; equal options give byte-identical output.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Start of the time span, epoch milliseconds.
    #[arg(long, default_value_t = DEFAULT_START_MS, allow_negative_numbers = true)]
    pub start_ms: i64,
    /// Length of the time span, e.g. 90s, 5m, 4h, 1d, 500ms.
    #[arg(long, default_value = DEFAULT_DURATION)]
    pub duration: String,
    /// Arrival-rate shape.
    #[arg(long, value_enum, default_value_t = GenShape::Flat)]
    pub shape: GenShape,
    /// Maximum backwards shift of disordered events (the disorder bound).
    #[arg(long, default_value = DEFAULT_DISORDER)]
    pub disorder: String,
    /// Fraction of events shifted back by U[0, DISORDER].
    #[arg(long, default_value_t = DEFAULT_DISORDER_FRACTION)]
    pub disorder_fraction: f64,
    /// Fraction of events shifted back by LATE_BY + U[1s, 60s].
    #[arg(long, default_value_t = DEFAULT_LATE_FRACTION)]
    pub late_fraction: f64,
    /// Base shift of late events.
    #[arg(long, default_value = DEFAULT_LATE_BY)]
    pub late_by: String,
    /// Fraction of events written twice in a row (identical records).
    #[arg(long, default_value_t = DEFAULT_DUP_RATE)]
    pub dup_rate: f64,
    /// Fraction of JSON-lines events whose did is a JSON string.
    #[arg(long, default_value_t = DEFAULT_DID_STRINGS)]
    pub did_strings: f64,
    /// What the events describe (and, for `live`, the dimension files
    /// written next to them).
    #[arg(long, value_enum, default_value_t = GenScenario::Pages)]
    pub scenario: GenScenario,
    /// Stream the events to a TCP source (`tcp://HOST:PORT`) instead of
    /// writing files (a live scenario's dimension files still go to --out).
    /// No CSV header is sent: the source names its `csv_columns`.
    #[arg(long)]
    pub to: Option<String>,
    /// With --to: connections to open; consecutive chunks of events go to
    /// them in turn, so each carries the whole span in time order.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// With --to: send at this many events per second on average, following
    /// the time shape (--shape peak sends its peak faster); 0 sends as fast
    /// as the receiver reads.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// With --to: the congestion control of the connections (`cubic`,
    /// `bbr`, ...; default: the kernel's). A generator on the same host as
    /// tally runs it on the cores being measured: a pacing one such as
    /// BBR fires timers there that a producer on another host would not.
    #[arg(long)]
    pub tcp_congestion: Option<String>,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            events: DEFAULT_EVENTS,
            devices: DEFAULT_DEVICES,
            pages: DEFAULT_PAGES,
            format: GenFormat::Jsonl,
            out: PathBuf::from(DEFAULT_OUT),
            files: DEFAULT_FILES,
            seed: DEFAULT_SEED,
            start_ms: DEFAULT_START_MS,
            duration: DEFAULT_DURATION.to_string(),
            shape: GenShape::Flat,
            disorder: DEFAULT_DISORDER.to_string(),
            disorder_fraction: DEFAULT_DISORDER_FRACTION,
            late_fraction: DEFAULT_LATE_FRACTION,
            late_by: DEFAULT_LATE_BY.to_string(),
            dup_rate: DEFAULT_DUP_RATE,
            did_strings: DEFAULT_DID_STRINGS,
            scenario: GenScenario::Pages,
            to: None,
            connections: 1,
            rate: 0.0,
            tcp_congestion: None,
        }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct GenReport {
    /// Files written, in event order.
    pub files: Vec<PathBuf>,
    /// Records written, duplicates included.
    pub events: u64,
    /// Bytes written over all files, headers included.
    pub bytes: u64,
    /// Wall-clock seconds spent.
    pub seconds: f64,
}

/// Generates the event log described by `opts` using all available cores.
pub fn generate(opts: &GenOptions) -> Result<GenReport> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    generate_with_threads(opts, threads)
}

/// Like [`generate`] with an explicit number of generator threads; the output
/// is byte-identical for every thread count.
pub fn generate_with_threads(opts: &GenOptions, threads: usize) -> Result<GenReport> {
    generate_chunked(opts, threads, CHUNK_EVENTS)
}

fn generate_chunked(opts: &GenOptions, threads: usize, chunk_events: u64) -> Result<GenReport> {
    let started = Instant::now();
    let plan = Plan::new(opts, chunk_events)?;
    let (mut files, events, bytes) = match &opts.to {
        Some(to) => {
            if plan.live.is_some() {
                fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
            }
            let mut sink = TcpOut::connect(to, opts.connections, opts.tcp_congestion.as_deref(), opts.rate, started)?;
            run_pipeline(&plan, threads, &mut sink)?;
            (Vec::new(), sink.records, sink.bytes)
        }
        None => {
            let files = output_paths(opts)?;
            let header = match opts.scenario {
                GenScenario::Pages => opts.format.header(),
                GenScenario::Live => live::header(opts.format),
            };
            let mut sink = Sink::open(files.clone(), header)?;
            run_pipeline(&plan, threads, &mut sink)?;
            let (events, bytes) = sink.finish()?;
            (files, events, bytes)
        }
    };
    if let Some(live) = &plan.live {
        files.extend(live.write_dimensions(&opts.out, opts.seed)?);
    }
    Ok(GenReport { files, events, bytes, seconds: started.elapsed().as_secs_f64() })
}

// ---------------------------------------------------------------------------
// Plan: validated options plus precomputed samplers
// ---------------------------------------------------------------------------

/// Everything needed to build any chunk; shared read-only by the workers.
struct Plan {
    events: u64,
    chunk_events: u64,
    seed: u64,
    format: GenFormat,
    clock: Clock,
    devices: DeviceSampler,
    pages: Categorical,
    kinds: Categorical,
    platforms: Categorical,
    app_vers: Categorical,
    nets: Categorical,
    disorder_ms: i64,
    disorder_fraction: f64,
    late_by_ms: i64,
    late_fraction: f64,
    dup_rate: f64,
    did_strings: f64,
    /// First event index of files 1..K (file 0 starts at event 0).
    file_starts: Vec<u64>,
    /// The live scenario's samplers.
    live: Option<live::Live>,
}

impl Plan {
    fn new(opts: &GenOptions, chunk_events: u64) -> Result<Self> {
        validate(opts)?;
        let duration_ms = flag_duration("--duration", &opts.duration)?;
        let disorder_ms = flag_duration("--disorder", &opts.disorder)?;
        let late_by_ms = flag_duration("--late-by", &opts.late_by)?;
        check_time_range(opts.start_ms, duration_ms, disorder_ms.max(late_by_ms))?;
        let page_weights: Vec<f64> = (0..opts.pages).map(|k| 1.0 / f64::from(k + 1).powf(PAGE_ZIPF_EXPONENT)).collect();
        Ok(Plan {
            events: opts.events,
            chunk_events,
            seed: opts.seed,
            format: opts.format,
            clock: Clock::new(opts.start_ms, duration_ms, opts.shape),
            devices: DeviceSampler::new(opts.devices, opts.seed),
            pages: Categorical::new(&page_weights),
            kinds: Categorical::new(&EVENT_WEIGHTS),
            platforms: Categorical::new(&PLATFORM_WEIGHTS),
            app_vers: Categorical::new(&APP_VER_WEIGHTS),
            nets: Categorical::new(&NET_WEIGHTS),
            disorder_ms,
            disorder_fraction: opts.disorder_fraction,
            late_by_ms,
            late_fraction: opts.late_fraction,
            dup_rate: opts.dup_rate,
            did_strings: opts.did_strings,
            file_starts: file_starts(opts.events, opts.files),
            live: match opts.scenario {
                GenScenario::Pages => None,
                GenScenario::Live => Some(live::Live::new(opts.devices, opts.seed)),
            },
        })
    }

    fn chunk_count(&self) -> u64 {
        self.events.div_ceil(self.chunk_events)
    }
}

fn validate(opts: &GenOptions) -> Result<()> {
    ensure!(opts.devices > 0, "--devices must be at least 1");
    ensure!(opts.pages > 0, "--pages must be at least 1");
    ensure!(
        opts.scenario == GenScenario::Pages || opts.format != GenFormat::Binary,
        "--scenario live writes JSON lines or CSV (a binary record has no amount)"
    );
    ensure!((1..=MAX_FILES).contains(&opts.files), "--files must be between 1 and {MAX_FILES}, got {}", opts.files);
    ensure!(opts.connections >= 1, "--connections must be at least 1");
    ensure!(opts.rate >= 0.0 && opts.rate.is_finite(), "--rate must be 0 (unpaced) or a positive number of events/s");
    ensure!(
        opts.to.is_some() || (opts.connections == 1 && opts.rate == 0.0),
        "--connections and --rate pace a stream: they need --to tcp://HOST:PORT"
    );
    ensure!(opts.to.is_some() || opts.tcp_congestion.is_none(), "--tcp-congestion needs --to tcp://HOST:PORT");
    for (flag, value) in [
        ("--disorder-fraction", opts.disorder_fraction),
        ("--late-fraction", opts.late_fraction),
        ("--dup-rate", opts.dup_rate),
        ("--did-strings", opts.did_strings),
    ] {
        ensure!((0.0..=1.0).contains(&value), "{flag} must be within [0, 1], got {value}");
    }
    Ok(())
}

/// Every timestamp lies in `[start - max_shift - LATE_EXTRA_MAX_MS, start +
/// duration]`; checking the ends once keeps the per-event arithmetic plain.
fn check_time_range(start_ms: i64, duration_ms: i64, max_shift_ms: i64) -> Result<()> {
    let end = start_ms.checked_add(duration_ms);
    let earliest = max_shift_ms.checked_add(LATE_EXTRA_MAX_MS).and_then(|shift| start_ms.checked_sub(shift));
    ensure!(
        end.is_some() && earliest.is_some(),
        "--start-ms {start_ms} with --duration/--disorder/--late-by overflows the timestamp range"
    );
    Ok(())
}

fn flag_duration(flag: &str, text: &str) -> Result<i64> {
    parse_duration_ms(text).map_err(|e| anyhow!("{flag}: {e}"))
}

/// Event index where each file after the first begins: `k * N / K`.
fn file_starts(events: u64, files: usize) -> Vec<u64> {
    let files = files as u128;
    (1..files).map(|k| (k * u128::from(events) / files) as u64).collect()
}

fn output_paths(opts: &GenOptions) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(&opts.out).with_context(|| format!("creating output directory {}", opts.out.display()))?;
    let ext = opts.format.extension();
    let paths = if opts.files == 1 {
        vec![opts.out.join(format!("events.{ext}"))]
    } else {
        (0..opts.files).map(|k| opts.out.join(format!("events-{k:03}.{ext}"))).collect()
    };
    Ok(paths)
}

// ---------------------------------------------------------------------------
// Random helpers
// ---------------------------------------------------------------------------

/// SplitMix64 finaliser: a fast bijective 64-bit mixer.
fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The RNG of chunk `chunk`; mixing twice keeps nearby (seed, chunk) pairs apart.
fn chunk_rng(seed: u64, chunk: u64) -> Xoshiro256PlusPlus {
    let golden = 0x9e37_79b9_7f4a_7c15_u64;
    Xoshiro256PlusPlus::seed_from_u64(mix64(seed ^ mix64(chunk.wrapping_add(golden))))
}

/// Uniform in [0, 1) with 53 random bits.
fn unit(rng: &mut Xoshiro256PlusPlus) -> f64 {
    const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
    (rng.next_u64() >> 11) as f64 * SCALE
}

/// Uniform in [lo, hi] (multiply-shift; the bias is far below anything visible).
fn uniform_incl(rng: &mut Xoshiro256PlusPlus, lo: i64, hi: i64) -> i64 {
    let span = (i128::from(hi) - i128::from(lo) + 1) as u128;
    let offset = (u128::from(rng.next_u64()) * span) >> 64;
    (i128::from(lo) + offset as i128) as i64
}

/// Guide-table slots per category: enough that a lookup scans ~1 entry.
const GUIDE_SLOTS_PER_CATEGORY: usize = 4;

/// Samples an index with probability proportional to fixed weights.
///
/// Inverse-CDF sampling with a guide table: `guide[s]` is the first index
/// whose cumulative weight exceeds `s / slots`, so a draw starts its linear
/// scan next to the answer instead of binary-searching (a chain of dependent
/// loads that showed up as ~15% of generation time for 44 pages).
struct Categorical {
    /// Normalised cumulative weights; the last is exactly 1.
    cumulative: Vec<f64>,
    guide: Vec<u32>,
}

impl Categorical {
    fn new(weights: &[f64]) -> Self {
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut cumulative: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w;
                acc / total
            })
            .collect();
        if let Some(last) = cumulative.last_mut() {
            *last = 1.0;
        }
        let slots = cumulative.len() * GUIDE_SLOTS_PER_CATEGORY;
        let guide = (0..slots).map(|s| first_above(&cumulative, s as f64 / slots as f64) as u32).collect();
        Categorical { cumulative, guide }
    }

    fn sample(&self, rng: &mut Xoshiro256PlusPlus) -> u32 {
        let u = unit(rng);
        let slot = (u * self.guide.len() as f64) as usize;
        let mut index = self.guide[slot.min(self.guide.len() - 1)] as usize;
        let last = self.cumulative.len() - 1;
        while index < last && self.cumulative[index] <= u {
            index += 1;
        }
        index as u32
    }
}

/// First index whose cumulative weight exceeds `u` (the last index if none).
fn first_above(cumulative: &[f64], u: f64) -> usize {
    cumulative.partition_point(|&c| c <= u).min(cumulative.len() - 1)
}

/// Draws Zipf-like device ids and scrambles them so that the most active
/// devices are spread over 1..=D instead of being the smallest ids.
struct DeviceSampler {
    devices: u64,
    /// Multiplier of the affine bijection `rank -> rank * mul + add (mod D)`;
    /// coprime with `devices` so that the map is a permutation.
    mul: u64,
    add: u64,
}

impl DeviceSampler {
    fn new(devices: u64, seed: u64) -> Self {
        let mut mul = mix64(seed ^ 0x5eed_d1ce) % devices;
        while gcd(mul, devices) != 1 {
            mul = (mul + 1) % devices;
        }
        let add = mix64(seed ^ 0xadd0_ff5e) % devices;
        DeviceSampler { devices, mul, add }
    }

    fn sample(&self, rng: &mut Xoshiro256PlusPlus) -> u64 {
        let rank = (unit(rng).powi(DEVICE_SKEW) * self.devices as f64) as u64;
        let rank = rank.min(self.devices - 1);
        // rank, mul, add < D, so for D < 2^32 the sum fits in u64 and the
        // (much slower) 128-bit remainder is avoided.
        let scrambled = if self.devices <= SMALL_DEVICE_COUNT {
            (rank * self.mul + self.add) % self.devices
        } else {
            let mixed = u128::from(rank) * u128::from(self.mul) + u128::from(self.add);
            (mixed % u128::from(self.devices)) as u64
        };
        scrambled + 1
    }
}

/// Device counts up to which `rank * mul + add` cannot overflow a `u64`.
const SMALL_DEVICE_COUNT: u64 = u32::MAX as u64;

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

// ---------------------------------------------------------------------------
// Time: true event times from the arrival-rate curve
// ---------------------------------------------------------------------------

/// Maps event index `i` of `N` to its true time: the inverse of the normalised
/// cumulative rate curve at `(i + 0.5) / N`, hence monotone in `i`.
struct Clock {
    start_ms: i64,
    duration_ms: i64,
    /// Tabulated cumulative rate at the `TIME_GRID_BINS + 1` grid edges of the
    /// span (0 to 1); `None` for a flat rate (identity curve).
    cumulative: Option<Vec<f64>>,
}

impl Clock {
    fn new(start_ms: i64, duration_ms: i64, shape: GenShape) -> Self {
        let cumulative = match shape {
            GenShape::Flat => None,
            GenShape::Peak => Some(peak_cumulative(start_ms, duration_ms)),
        };
        Clock { start_ms, duration_ms, cumulative }
    }

    fn true_ts(&self, index: u64, events: u64) -> i64 {
        let u = (index as f64 + 0.5) / events as f64;
        let x = match &self.cumulative {
            None => u,
            Some(cumulative) => invert_cumulative(cumulative, u),
        };
        self.start_ms + (x * self.duration_ms as f64) as i64
    }
}

/// Piecewise-linear inverse of a tabulated cumulative curve; monotone in `u`.
fn invert_cumulative(cumulative: &[f64], u: f64) -> f64 {
    let bins = cumulative.len() - 1;
    let bin = cumulative.partition_point(|&c| c <= u).saturating_sub(1).min(bins - 1);
    let (lo, hi) = (cumulative[bin], cumulative[bin + 1]);
    let within = ((u - lo) / (hi - lo)).clamp(0.0, 1.0);
    (bin as f64 + within) / bins as f64
}

fn peak_cumulative(start_ms: i64, duration_ms: i64) -> Vec<f64> {
    let mut cumulative = Vec::with_capacity(TIME_GRID_BINS + 1);
    let mut acc = 0.0;
    cumulative.push(acc);
    for bin in 0..TIME_GRID_BINS {
        let x = (bin as f64 + 0.5) / TIME_GRID_BINS as f64;
        let t_ms = start_ms as f64 + x * duration_ms as f64;
        acc += diurnal_rate(t_ms) * peak_multiplier(x);
        cumulative.push(acc);
    }
    cumulative.iter_mut().for_each(|c| *c /= acc);
    cumulative
}

/// Relative baseline rate at epoch time `t_ms` by local time of day; always > 0.
fn diurnal_rate(t_ms: f64) -> f64 {
    let local_ms = (t_ms + LOCAL_UTC_OFFSET_MS as f64).rem_euclid(DAY_MS as f64);
    let hour = local_ms / HOUR_MS as f64;
    let phase = std::f64::consts::TAU * (hour - DIURNAL_PEAK_HOUR) / 24.0;
    1.0 + DIURNAL_AMPLITUDE * phase.cos()
}

/// Rate multiplier at span fraction `x`: 1 outside the peak, `PEAK_GAIN` at its centre.
fn peak_multiplier(x: f64) -> f64 {
    let offset = (x - PEAK_CENTER) / (PEAK_WIDTH / 2.0);
    if offset.abs() >= 1.0 {
        return 1.0;
    }
    let bump = 0.5 * (1.0 + (std::f64::consts::PI * offset).cos());
    1.0 + (PEAK_GAIN - 1.0) * bump
}

// ---------------------------------------------------------------------------
// Events: sampling (format-independent) and encoding
// ---------------------------------------------------------------------------

/// One sampled event; every format encodes a subset of these fields.
struct Event {
    ts_ms: i64,
    did: u64,
    page: u32,
    kind: u32,
    platform: u32,
    app_ver: u32,
    net: u32,
    dur_ms: u32,
    session: u64,
    did_as_string: bool,
    duplicated: bool,
}

impl Plan {
    /// Samples event `index`. Draws the same values in the same order for
    /// every format, which keeps formats in step (see the module docs).
    fn sample(&self, rng: &mut Xoshiro256PlusPlus, index: u64) -> Event {
        let true_ts = self.clock.true_ts(index, self.events);
        let ts_ms = true_ts - self.shift_ms(rng);
        let did = self.devices.sample(rng);
        Event {
            ts_ms,
            did,
            page: self.pages.sample(rng),
            kind: self.kinds.sample(rng),
            platform: self.platforms.sample(rng),
            app_ver: APP_VER_MIN + self.app_vers.sample(rng),
            net: self.nets.sample(rng),
            dur_ms: (unit(rng).powi(2) * DUR_MS_MAX) as u32,
            session: mix64(did ^ mix64(self.seed ^ (true_ts.div_euclid(SESSION_MS) as u64))),
            did_as_string: unit(rng) < self.did_strings,
            duplicated: unit(rng) < self.dup_rate,
        }
    }

    /// How far the event's written time lies behind its true time.
    fn shift_ms(&self, rng: &mut Xoshiro256PlusPlus) -> i64 {
        if unit(rng) < self.late_fraction {
            let extra = uniform_incl(rng, LATE_EXTRA_MIN_MS, LATE_EXTRA_MAX_MS);
            return self.late_by_ms + extra;
        }
        if unit(rng) < self.disorder_fraction {
            return uniform_incl(rng, 0, self.disorder_ms);
        }
        0
    }

    fn encode(&self, event: &Event, line: &mut LineBuf, out: &mut Vec<u8>) {
        match self.format {
            GenFormat::Jsonl => push_jsonl(event, line, out),
            GenFormat::Csv => push_csv(event, line, out),
            GenFormat::Binary => push_binary(event, out),
        }
    }

    fn bytes_per_event(&self) -> usize {
        match self.format {
            GenFormat::Jsonl => JSONL_LINE_ESTIMATE,
            GenFormat::Csv => CSV_LINE_ESTIMATE,
            GenFormat::Binary => std::mem::size_of::<BinaryRecord>(),
        }
    }
}

/// Longest JSON line: every field at its widest is ~220 bytes, and
/// [`LineBuf::put_name`] copies `NAME_PAD` bytes past the end of a name.
const LINE_CAPACITY: usize = 320;
/// Every name written by [`LineBuf::put_name`] fits in this many bytes.
const NAME_PAD: usize = 16;

/// A name padded to `NAME_PAD` bytes so it is copied with one fixed-size move.
struct Name {
    bytes: [u8; NAME_PAD],
    len: usize,
}

const fn name(text: &str) -> Name {
    let src = text.as_bytes();
    assert!(src.len() <= NAME_PAD);
    let mut bytes = [0u8; NAME_PAD];
    let mut i = 0;
    while i < src.len() {
        bytes[i] = src[i];
        i += 1;
    }
    Name { bytes, len: src.len() }
}

const EVENT_NAME_PADDED: [Name; 4] =
    [name(EVENT_NAMES[0]), name(EVENT_NAMES[1]), name(EVENT_NAMES[2]), name(EVENT_NAMES[3])];
const PLATFORM_NAME_PADDED: [Name; 3] = [name(PLATFORM_NAMES[0]), name(PLATFORM_NAMES[1]), name(PLATFORM_NAMES[2])];
const NET_NAME_PADDED: [Name; 3] = [name(NET_NAMES[0]), name(NET_NAMES[1]), name(NET_NAMES[2])];

/// "00" "01" … "99": two decimal digits per table lookup.
const DIGIT_PAIRS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// One text record assembled in a reused stack buffer. Every write has a length known at
/// compile time (literals, padded names, fixed digit pairs), so nothing calls
/// `memcpy` per field; the finished line is appended with a single copy.
struct LineBuf {
    bytes: [u8; LINE_CAPACITY],
    len: usize,
}

impl LineBuf {
    fn new() -> Self {
        LineBuf { bytes: [0; LINE_CAPACITY], len: 0 }
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    #[inline(always)]
    fn put<const N: usize>(&mut self, text: &[u8; N]) {
        self.bytes[self.len..self.len + N].copy_from_slice(text);
        self.len += N;
    }

    #[inline(always)]
    fn put_name(&mut self, name: &Name) {
        self.bytes[self.len..self.len + NAME_PAD].copy_from_slice(&name.bytes);
        self.len += name.len;
    }

    /// Decimal digits of `value`, written from the last digit backwards.
    #[inline(always)]
    fn put_u64(&mut self, mut value: u64) {
        let digits = value.checked_ilog10().unwrap_or(0) as usize + 1;
        let mut pos = self.len + digits;
        while value >= 100 {
            let pair = (value % 100) as usize * 2;
            value /= 100;
            pos -= 2;
            self.bytes[pos..pos + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        }
        if value >= 10 {
            let pair = value as usize * 2;
            self.bytes[pos - 2..pos].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        } else {
            self.bytes[pos - 1] = b'0' + value as u8;
        }
        self.len += digits;
    }

    #[inline(always)]
    fn put_i64(&mut self, value: i64) {
        if value < 0 {
            self.put(b"-");
        }
        self.put_u64(value.unsigned_abs());
    }

    fn put_hex16(&mut self, value: u64) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = [0u8; 16];
        for (i, digit) in digits.iter_mut().enumerate() {
            *digit = HEX[((value >> (60 - 4 * i)) & 0xf) as usize];
        }
        self.put(&digits);
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// `{"session":…,"did":…,"ts":…,"page":…,"event":…,"platform":…,"app_ver":…,"net":…,"dur_ms":…}`;
/// `ts` is deliberately not first and unused fields surround the used ones.
fn push_jsonl(e: &Event, line: &mut LineBuf, out: &mut Vec<u8>) {
    line.clear();
    line.put(b"{\"session\":\"");
    line.put_hex16(e.session);
    if e.did_as_string {
        line.put(b"\",\"did\":\"");
        line.put_u64(e.did);
        line.put(b"\",\"ts\":");
    } else {
        line.put(b"\",\"did\":");
        line.put_u64(e.did);
        line.put(b",\"ts\":");
    }
    line.put_i64(e.ts_ms);
    line.put(b",\"page\":\"p");
    line.put_u64(u64::from(e.page));
    line.put(b"\",\"event\":\"");
    line.put_name(&EVENT_NAME_PADDED[e.kind as usize]);
    line.put(b"\",\"platform\":\"");
    line.put_name(&PLATFORM_NAME_PADDED[e.platform as usize]);
    line.put(b"\",\"app_ver\":");
    line.put_u64(u64::from(e.app_ver));
    line.put(b",\"net\":\"");
    line.put_name(&NET_NAME_PADDED[e.net as usize]);
    line.put(b"\",\"dur_ms\":");
    line.put_u64(u64::from(e.dur_ms));
    line.put(b"}\n");
    out.extend_from_slice(line.as_bytes());
}

/// `ts,did,page,event,platform,app_ver,net`.
fn push_csv(e: &Event, line: &mut LineBuf, out: &mut Vec<u8>) {
    line.clear();
    line.put_i64(e.ts_ms);
    line.put(b",");
    line.put_u64(e.did);
    line.put(b",p");
    line.put_u64(u64::from(e.page));
    line.put(b",");
    line.put_name(&EVENT_NAME_PADDED[e.kind as usize]);
    line.put(b",");
    line.put_name(&PLATFORM_NAME_PADDED[e.platform as usize]);
    line.put(b",");
    line.put_u64(u64::from(e.app_ver));
    line.put(b",");
    line.put_name(&NET_NAME_PADDED[e.net as usize]);
    line.put(b"\n");
    out.extend_from_slice(line.as_bytes());
}

/// A [`BinaryRecord`] in little-endian byte order regardless of the host.
fn push_binary(e: &Event, out: &mut Vec<u8>) {
    let record = BinaryRecord {
        ts_ms: e.ts_ms.to_le(),
        did: e.did.to_le(),
        dims: [e.page, e.kind, e.platform, e.app_ver].map(u32::to_le),
    };
    out.extend_from_slice(bytemuck::bytes_of(&record));
}

// ---------------------------------------------------------------------------
// The live scenario
// ---------------------------------------------------------------------------

mod live {
    use super::*;

    const KINDS: [&str; 4] = ["view", "like", "comment", "gift"];
    const KIND_WEIGHTS: [f64; 4] = [0.80, 0.12, 0.05, 0.03];
    /// Gift amounts in cents, cheap ones far more common.
    const GIFT_CENTS: [u32; 8] = [10, 100, 500, 990, 5_200, 9_950, 52_000, 131_400];
    const GIFT_WEIGHTS: [f64; 8] = [40.0, 25.0, 12.0, 8.0, 6.0, 4.0, 3.0, 2.0];
    const CATEGORIES: [&str; 8] = ["music", "game", "talk", "dance", "food", "outdoor", "study", "sport"];
    const TIERS: [&str; 4] = ["bronze", "silver", "gold", "platinum"];
    const TAGS: [&str; 6] = ["night", "pk", "new", "hot", "local", "charity"];
    /// Room `k` (by popularity) has weight `1 / (k + 1)^ROOM_ZIPF`.
    const ROOM_ZIPF: f64 = 1.05;
    /// The Big-V spike: this share of the span, starting at this fraction,
    /// sends `BIG_V_SHARE` of events to one room that is quiet otherwise.
    const SPIKE_START: f64 = 0.5;
    const SPIKE_LENGTH: f64 = 0.05;
    const BIG_V_SHARE: f64 = 0.4;

    /// One live event.
    pub struct LiveEvent {
        ts_ms: i64,
        did: u64,
        did_as_string: bool,
        user: Option<u64>,
        room: u64,
        author: u64,
        platform: u32,
        kind: usize,
        /// Gifts only.
        cents: Option<u32>,
    }

    pub struct Live {
        rooms: u64,
        authors: u64,
        users: u64,
        seed: u64,
        room_rank: Categorical,
        /// Affine permutation of room ranks onto ids 1..=rooms.
        mul: u64,
        add: u64,
        kinds: Categorical,
        gifts: Categorical,
        platforms: Categorical,
        big_v: u64,
    }

    impl Live {
        pub fn new(devices: u64, seed: u64) -> Live {
            let rooms = (devices / 50).clamp(10, 200_000);
            let weights: Vec<f64> = (0..rooms).map(|k| 1.0 / ((k + 1) as f64).powf(ROOM_ZIPF)).collect();
            let mut mul = mix64(seed ^ 0x400e) % rooms;
            while gcd(mul, rooms) != 1 {
                mul = (mul + 1) % rooms;
            }
            let add = mix64(seed ^ 0xadd) % rooms;
            let mut live = Live {
                rooms,
                authors: (rooms / 2).max(5),
                users: (devices * 4 / 5).max(1),
                seed,
                room_rank: Categorical::new(&weights),
                mul,
                add,
                kinds: Categorical::new(&KIND_WEIGHTS),
                gifts: Categorical::new(&GIFT_WEIGHTS),
                platforms: Categorical::new(&PLATFORM_WEIGHTS),
                big_v: 0,
            };
            // The least popular room: quiet until its spike.
            live.big_v = live.room_of_rank(rooms - 1);
            live
        }

        fn room_of_rank(&self, rank: u64) -> u64 {
            (rank * self.mul + self.add) % self.rooms + 1
        }

        fn author_of(&self, room: u64) -> u64 {
            mix64(room ^ self.seed ^ 0xa0) % self.authors + 1
        }

        /// A device's user, if it is logged in (one in ten is not).
        fn user_of(&self, did: u64) -> Option<u64> {
            let h = mix64(did ^ self.seed ^ 0x05e4);
            (!h.is_multiple_of(10)).then(|| (h >> 8) % self.users + 1)
        }

        /// `x`: the event's place in the span (0..1), for the spike.
        pub fn sample(&self, rng: &mut Xoshiro256PlusPlus, ts_ms: i64, did: u64, x: f64, strings: f64) -> LiveEvent {
            let rank = u64::from(self.room_rank.sample(rng));
            let spike = (SPIKE_START..SPIKE_START + SPIKE_LENGTH).contains(&x) && unit(rng) < BIG_V_SHARE;
            let room = if spike { self.big_v } else { self.room_of_rank(rank) };
            let kind = self.kinds.sample(rng) as usize;
            let cents = (KINDS[kind] == "gift").then(|| GIFT_CENTS[self.gifts.sample(rng) as usize]);
            LiveEvent {
                ts_ms,
                did,
                did_as_string: unit(rng) < strings,
                user: self.user_of(did),
                room,
                author: self.author_of(room),
                platform: self.platforms.sample(rng),
                kind,
                cents,
            }
        }

        /// Writes the dimension files; returns their paths.
        pub fn write_dimensions(&self, dir: &Path, seed: u64) -> Result<Vec<PathBuf>> {
            let pick = |key: u64, salt: u64, n: usize| (mix64(key ^ seed ^ salt) % n as u64) as usize;
            // One author in twenty is missing from the table; later in the
            // day one in ten moved category and the missing ones arrived.
            let mut authors = String::from("author_id,category,agency\n");
            let mut later = authors.clone();
            for a in 1..=self.authors {
                let category = CATEGORIES[pick(a, 0xca7, CATEGORIES.len())];
                let agency = if pick(a, 0xa9e, 10) < 3 { String::new() } else { format!("ag{}", pick(a, 0xa9, 40)) };
                if pick(a, 0x0155, 20) != 0 {
                    authors.push_str(&format!("{a},{category},{agency}\n"));
                }
                let moved =
                    if pick(a, 0x30e, 10) == 0 { CATEGORIES[pick(a, 0xca8, CATEGORIES.len())] } else { category };
                later.push_str(&format!("{a},{moved},{agency}\n"));
            }
            let mut users = String::new();
            for u in 1..=self.users.min(2_000_000) {
                if pick(u, 0x05e, 30) != 0 {
                    users.push_str(&format!("{{\"user_id\":\"u{u}\",\"tier\":\"{}\"}}\n", TIERS[pick(u, 0x7e, 4)]));
                }
            }
            let mut rooms = String::new();
            for r in 1..=self.rooms {
                if pick(r, 0x400, 25) != 0 {
                    let tags = format!("{},{}", TAGS[pick(r, 0x7a9, 6)], TAGS[pick(r, 0x7aa, 6)]);
                    rooms.push_str(&format!(
                        "{{\"room_id\":\"r{r}\",\"tags\":\"{tags}\",\"operator\":\"op{}\"}}\n",
                        pick(r, 0x0b, 50)
                    ));
                }
            }
            let mut paths = Vec::new();
            for (name, text) in
                [("authors.csv", authors), ("authors-later.csv", later), ("users.jsonl", users), ("rooms.jsonl", rooms)]
            {
                let path = dir.join(name);
                fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
                paths.push(path);
            }
            Ok(paths)
        }
    }

    pub fn header(format: GenFormat) -> &'static [u8] {
        match format {
            GenFormat::Csv => b"ts,did,user_id,room_id,author_id,platform,event,amount\n",
            _ => b"",
        }
    }

    /// An amount in cents as a decimal without trailing zeros: `0.1`, `52`.
    fn put_amount(line: &mut LineBuf, cents: u32) {
        line.put_u64(u64::from(cents / 100));
        let frac = cents % 100;
        if frac != 0 {
            line.put(b".");
            line.put_u64(u64::from(frac / 10));
            if !frac.is_multiple_of(10) {
                line.put_u64(u64::from(frac % 10));
            }
        }
    }

    /// `{"did":…,"ts":…,"user_id":"u…","room_id":"r…","author_id":…,"platform":…,"event":…,"amount":…}`
    /// (`user_id` absent when logged out, `amount` for gifts only; the
    /// author id an integer, joined to the table's text), or a CSV row.
    pub fn encode(e: &LiveEvent, format: GenFormat, line: &mut LineBuf, out: &mut Vec<u8>) {
        line.clear();
        let csv = format == GenFormat::Csv;
        if csv {
            line.put_i64(e.ts_ms);
            line.put(b",");
            line.put_u64(e.did);
            line.put(b",");
            if let Some(u) = e.user {
                line.put(b"u");
                line.put_u64(u);
            }
            line.put(b",r");
            line.put_u64(e.room);
            line.put(b",");
            line.put_u64(e.author);
            line.put(b",");
            line.put_name(&PLATFORM_NAME_PADDED[e.platform as usize]);
            line.put(b",");
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(KINDS[e.kind].as_bytes());
            line.clear();
            line.put(b",");
            if let Some(c) = e.cents {
                put_amount(line, c);
            }
            line.put(b"\n");
            out.extend_from_slice(line.as_bytes());
            return;
        }
        if e.did_as_string {
            line.put(b"{\"did\":\"");
            line.put_u64(e.did);
            line.put(b"\",\"ts\":");
        } else {
            line.put(b"{\"did\":");
            line.put_u64(e.did);
            line.put(b",\"ts\":");
        }
        line.put_i64(e.ts_ms);
        if let Some(u) = e.user {
            line.put(b",\"user_id\":\"u");
            line.put_u64(u);
            line.put(b"\"");
        }
        line.put(b",\"room_id\":\"r");
        line.put_u64(e.room);
        line.put(b"\",\"author_id\":");
        line.put_u64(e.author);
        line.put(b",\"platform\":\"");
        line.put_name(&PLATFORM_NAME_PADDED[e.platform as usize]);
        line.put(b"\",\"event\":\"");
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(KINDS[e.kind].as_bytes());
        line.clear();
        line.put(b"\"");
        if let Some(c) = e.cents {
            line.put(b",\"amount\":");
            put_amount(line, c);
        }
        line.put(b"}\n");
        out.extend_from_slice(line.as_bytes());
    }
}

// ---------------------------------------------------------------------------
// Chunks and the ordered parallel pipeline
// ---------------------------------------------------------------------------

/// The encoded records of one chunk.
struct Chunk {
    bytes: Vec<u8>,
    /// Byte offsets where a new file starts, in order (may repeat or be 0).
    cuts: Vec<usize>,
    /// Records encoded, duplicates included.
    records: u64,
}

impl Plan {
    /// Builds chunk `chunk` into `bytes` (reused to save allocations).
    fn build_chunk(&self, chunk: u64, mut bytes: Vec<u8>) -> Chunk {
        let first = chunk * self.chunk_events;
        let end = (first + self.chunk_events).min(self.events);
        let estimate = (end - first) as usize * self.bytes_per_event();
        bytes.clear();
        bytes.reserve(estimate + estimate / 16);
        let mut rng = chunk_rng(self.seed, chunk);
        let mut next_file = self.file_starts.partition_point(|&start| start < first);
        let mut cuts = Vec::new();
        let mut line = LineBuf::new();
        let mut records = 0;
        for index in first..end {
            while self.file_starts.get(next_file) == Some(&index) {
                cuts.push(bytes.len());
                next_file += 1;
            }
            let record_start = bytes.len();
            let duplicated = match &self.live {
                None => {
                    let event = self.sample(&mut rng, index);
                    self.encode(&event, &mut line, &mut bytes);
                    event.duplicated
                }
                Some(live) => {
                    let true_ts = self.clock.true_ts(index, self.events);
                    let ts_ms = true_ts - self.shift_ms(&mut rng);
                    let did = self.devices.sample(&mut rng);
                    let x = (index as f64 + 0.5) / self.events as f64;
                    let e = live.sample(&mut rng, ts_ms, did, x, self.did_strings);
                    live::encode(&e, self.format, &mut line, &mut bytes);
                    unit(&mut rng) < self.dup_rate
                }
            };
            records += 1;
            if duplicated {
                bytes.extend_from_within(record_start..);
                records += 1;
            }
        }
        Chunk { bytes, cuts, records }
    }
}

/// Builds all chunks on `threads` workers and writes them to `sink` in order.
///
/// Worker `w` builds chunks `w, w + T, w + 2T, …` into its own bounded queue;
/// the calling thread drains the queues round-robin, which restores chunk
/// order and bounds the chunks in flight. Used buffers go back to the workers.
fn run_pipeline(plan: &Plan, threads: usize, sink: &mut dyn ChunkSink) -> Result<()> {
    let chunks = plan.chunk_count();
    let threads = threads.clamp(1, MAX_THREADS).min(chunks.max(1) as usize);
    let (recycle_tx, recycle_rx) = channel::unbounded::<Vec<u8>>();
    std::thread::scope(|scope| {
        let mut queues = Vec::with_capacity(threads);
        for worker in 0..threads {
            let (tx, rx) = channel::bounded(CHUNKS_QUEUED_PER_WORKER);
            let recycle_rx = recycle_rx.clone();
            scope.spawn(move || run_worker(plan, worker, threads, tx, recycle_rx));
            queues.push(rx);
        }
        // On error the queues drop here, so blocked workers see a closed
        // channel and stop before the scope joins them.
        drain_in_order(plan, chunks, queues, &recycle_tx, sink)
    })
}

fn run_worker(plan: &Plan, worker: usize, threads: usize, tx: Sender<Chunk>, recycle: Receiver<Vec<u8>>) {
    let chunks = plan.chunk_count();
    for chunk in (worker as u64..chunks).step_by(threads) {
        let buffer = recycle.try_recv().unwrap_or_default();
        if tx.send(plan.build_chunk(chunk, buffer)).is_err() {
            return; // the writer gave up
        }
    }
}

fn drain_in_order(
    plan: &Plan,
    chunks: u64,
    queues: Vec<Receiver<Chunk>>,
    recycle: &Sender<Vec<u8>>,
    sink: &mut dyn ChunkSink,
) -> Result<()> {
    for chunk in 0..chunks {
        let queue = &queues[(chunk % queues.len() as u64) as usize];
        let built = queue.recv().map_err(|_| anyhow!("generator thread for chunk {chunk} stopped"))?;
        sink.write_chunk(plan, chunk, &built)?;
        // Workers may all be done already; then the buffer is simply freed.
        let _ = recycle.send(built.bytes);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Output files
// ---------------------------------------------------------------------------

/// Where the ordered chunks go.
trait ChunkSink {
    fn write_chunk(&mut self, plan: &Plan, index: u64, chunk: &Chunk) -> Result<()>;
}

/// Writes the ordered byte stream, switching files at chunk cuts.
struct Sink {
    paths: Vec<PathBuf>,
    header: &'static [u8],
    current: usize,
    file: File,
    records: u64,
    bytes: u64,
}

impl Sink {
    fn open(paths: Vec<PathBuf>, header: &'static [u8]) -> Result<Self> {
        let file = create_file(&paths[0])?;
        let mut sink = Sink { paths, header, current: 0, file, records: 0, bytes: 0 };
        sink.write(header)?;
        Ok(sink)
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.file.write_all(data).with_context(|| format!("writing {}", self.paths[self.current].display()))?;
        self.bytes += data.len() as u64;
        Ok(())
    }

    fn next_file(&mut self) -> Result<()> {
        ensure!(self.current + 1 < self.paths.len(), "internal error: more file cuts than files");
        self.current += 1;
        self.file = create_file(&self.paths[self.current])?;
        self.write(self.header)
    }

    /// Creates any files left (more files than events) and returns
    /// `(records, bytes)` written.
    fn finish(mut self) -> Result<(u64, u64)> {
        while self.current + 1 < self.paths.len() {
            self.next_file()?;
        }
        let path = &self.paths[self.current];
        self.file.flush().with_context(|| format!("writing {}", path.display()))?;
        Ok((self.records, self.bytes))
    }
}

impl ChunkSink for Sink {
    fn write_chunk(&mut self, _: &Plan, _: u64, chunk: &Chunk) -> Result<()> {
        let mut from = 0;
        for &cut in &chunk.cuts {
            self.write(&chunk.bytes[from..cut])?;
            self.next_file()?;
            from = cut;
        }
        self.write(&chunk.bytes[from..])?;
        self.records += chunk.records;
        Ok(())
    }
}

/// Streams the chunks to a TCP source: chunk `k` on connection `k % n`,
/// paced by event time when a rate is given.
struct TcpOut {
    to: String,
    conns: Vec<std::net::TcpStream>,
    /// Events per second on average (0: unpaced).
    rate: f64,
    started: Instant,
    records: u64,
    bytes: u64,
}

/// Sets a connection's congestion control (`TCP_CONGESTION`); before any
/// byte is sent, so the whole stream uses it.
fn set_congestion(conn: &std::net::TcpStream, name: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the option value is `name`'s bytes and their length; the
    // kernel copies at most that many.
    let r = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        let available = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
            .map(|a| format!(" (this kernel has: {})", a.trim()))
            .unwrap_or_default();
        bail!("--tcp-congestion {name}: {e}{available}");
    }
    Ok(())
}

/// Wall-clock pieces a paced chunk is sent in, per second of sending.
const PACE_STEPS_PER_SECOND: f64 = 50.0;

impl TcpOut {
    fn connect(to: &str, connections: usize, congestion: Option<&str>, rate: f64, started: Instant) -> Result<TcpOut> {
        let addr = to.strip_prefix("tcp://").ok_or_else(|| anyhow!("--to {to:?}: expected tcp://HOST:PORT"))?;
        let conns = (0..connections)
            .map(|_| {
                let c = std::net::TcpStream::connect(addr).with_context(|| format!("--to {to}: cannot connect"))?;
                if let Some(name) = congestion {
                    set_congestion(&c, name)?;
                }
                Ok(c)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TcpOut { to: to.to_owned(), conns, rate, started, records: 0, bytes: 0 })
    }

    /// Seconds after the start at which event `index` is due: its place in
    /// the time span, the span lasting `events / rate` seconds.
    fn due(&self, plan: &Plan, index: u64) -> f64 {
        let ts = plan.clock.true_ts(index.min(plan.events.saturating_sub(1)), plan.events);
        let x = (ts - plan.clock.start_ms) as f64 / plan.clock.duration_ms.max(1) as f64;
        x * plan.events as f64 / self.rate
    }
}

impl ChunkSink for TcpOut {
    fn write_chunk(&mut self, plan: &Plan, index: u64, chunk: &Chunk) -> Result<()> {
        let conn = (index % self.conns.len() as u64) as usize;
        let bytes = &chunk.bytes;
        let pieces = if self.rate > 0.0 {
            // Enough pieces that each takes about 1/PACE_STEPS_PER_SECOND s.
            let seconds = chunk.records as f64 / self.rate;
            ((seconds * PACE_STEPS_PER_SECOND).ceil() as usize).clamp(1, bytes.len().max(1))
        } else {
            1
        };
        let first = index * plan.chunk_events;
        for p in 0..pieces {
            let (lo, hi) = (bytes.len() * p / pieces, bytes.len() * (p + 1) / pieces);
            if self.rate > 0.0 {
                let at = first + (plan.chunk_events * p as u64) / pieces as u64;
                let due = self.due(plan, at);
                let now = self.started.elapsed().as_secs_f64();
                if due > now {
                    std::thread::sleep(std::time::Duration::from_secs_f64(due - now));
                }
            }
            self.conns[conn].write_all(&bytes[lo..hi]).with_context(|| format!("--to {}: sending", self.to))?;
        }
        self.records += chunk.records;
        self.bytes += bytes.len() as u64;
        Ok(())
    }
}

fn create_file(path: &Path) -> Result<File> {
    File::create(path).with_context(|| format!("creating {}", path.display()))
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::binary::BINARY_RECORD_BYTES;
    use clap::Parser;

    /// Small chunks so that a few thousand events span many chunks.
    const TEST_CHUNK: u64 = 512;

    fn small(dir: &Path, format: GenFormat) -> GenOptions {
        GenOptions {
            events: 20_000,
            devices: 3_000,
            format,
            out: dir.to_path_buf(),
            duration: "1h".into(),
            disorder: "5s".into(),
            dup_rate: 0.05,
            ..GenOptions::default()
        }
    }

    fn read_all(report: &GenReport) -> Vec<Vec<u8>> {
        report.files.iter().map(|p| fs::read(p).unwrap()).collect()
    }

    fn records(bytes: &[u8]) -> Vec<BinaryRecord> {
        assert_eq!(bytes.len() % BINARY_RECORD_BYTES, 0);
        bytes.chunks_exact(BINARY_RECORD_BYTES).map(bytemuck::pod_read_unaligned).collect()
    }

    fn binary_run(opts: &GenOptions) -> Vec<BinaryRecord> {
        let report = generate_chunked(opts, 2, TEST_CHUNK).unwrap();
        records(&fs::read(&report.files[0]).unwrap())
    }

    fn without_dups(recs: &[BinaryRecord]) -> Vec<BinaryRecord> {
        let mut out: Vec<BinaryRecord> = Vec::new();
        for r in recs {
            if out.last() != Some(r) {
                out.push(*r);
            }
        }
        out
    }

    /// The congestion control a connection uses (`TCP_CONGESTION`).
    fn congestion(conn: &std::net::TcpStream) -> String {
        use std::os::fd::AsRawFd;
        let mut name = [0u8; 16];
        let mut len = name.len() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `name`.
        let r = unsafe {
            libc::getsockopt(
                conn.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_CONGESTION,
                name.as_mut_ptr().cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        String::from_utf8_lossy(&name[..len as usize]).trim_end_matches('\0').to_owned()
    }

    #[test]
    fn tcp_connections_use_the_congestion_control_asked_for() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to = format!("tcp://{}", listener.local_addr().unwrap());
        // One that is not the kernel's default (else this proves nothing):
        // reno is built into every Linux kernel, cubic nearly so.
        let default = fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap_or_default();
        let name = if default.trim() == "reno" { "cubic" } else { "reno" };
        let out = TcpOut::connect(&to, 2, Some(name), 0.0, Instant::now()).unwrap();
        for c in &out.conns {
            assert_eq!(congestion(c), name);
        }
        let err =
            TcpOut::connect(&to, 1, Some("no-such-cc"), 0.0, Instant::now()).err().expect("an unknown name fails");
        assert!(format!("{err:#}").contains("--tcp-congestion no-such-cc"), "{err:#}");
        let opts = GenOptions { tcp_congestion: Some("reno".into()), ..GenOptions::default() };
        assert!(validate(&opts).is_err(), "--tcp-congestion without --to");
    }

    #[test]
    fn clap_defaults_match_default_impl() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            gen: GenOptions,
        }
        let cli = Cli::try_parse_from(["gen"]).unwrap();
        assert_eq!(cli.gen, GenOptions::default());
        let cli = Cli::try_parse_from(["gen", "--format", "binary", "--shape", "peak"]).unwrap();
        assert_eq!(cli.gen.format, GenFormat::Binary);
        assert_eq!(cli.gen.shape, GenShape::Peak);
    }

    #[test]
    fn identical_across_thread_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = small(dir.path(), GenFormat::Jsonl);
        opts.files = 3;
        opts.shape = GenShape::Peak;
        let reference = read_all(&generate_chunked(&opts, 1, TEST_CHUNK).unwrap());
        for threads in [2, 3, 8] {
            let report = generate_chunked(&opts, threads, TEST_CHUNK).unwrap();
            assert_eq!(read_all(&report), reference, "threads = {threads}");
        }
    }

    #[test]
    fn default_chunking_identical_across_thread_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = small(dir.path(), GenFormat::Binary);
        opts.events = 3 * CHUNK_EVENTS + 77;
        let one = read_all(&generate_with_threads(&opts, 1).unwrap());
        let many = read_all(&generate_with_threads(&opts, 4).unwrap());
        assert_eq!(one, many);
    }

    #[test]
    fn split_files_concatenate_to_single_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = small(dir.path(), GenFormat::Jsonl);
        let single = read_all(&generate_chunked(&opts, 2, TEST_CHUNK).unwrap());
        opts.files = 7;
        let report = generate_chunked(&opts, 2, TEST_CHUNK).unwrap();
        assert_eq!(report.files.len(), 7);
        assert!(report.files[3].ends_with("events-003.jsonl"));
        assert_eq!(read_all(&report).concat(), single.concat());
    }

    #[test]
    fn disorder_bound_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = small(dir.path(), GenFormat::Binary);
        opts.disorder_fraction = 0.5;
        let bound = parse_duration_ms(&opts.disorder).unwrap();
        let recs = binary_run(&opts);
        let mut max_seen = i64::MIN;
        let mut shifted = 0;
        for r in &recs {
            assert!(r.ts_ms >= max_seen.saturating_sub(bound), "{r:?}");
            shifted += usize::from(r.ts_ms < max_seen);
            max_seen = max_seen.max(r.ts_ms);
        }
        assert!(shifted > recs.len() / 10, "too little disorder: {shifted}");
    }

    #[test]
    fn late_events_exceed_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = small(dir.path(), GenFormat::Binary);
        opts.disorder_fraction = 0.0;
        opts.late_fraction = 0.01;
        let late_by = parse_duration_ms(&opts.late_by).unwrap();
        let recs = binary_run(&opts);
        let mut max_seen = i64::MIN;
        let mut late = 0;
        for r in &recs {
            if r.ts_ms < max_seen {
                assert!(max_seen - r.ts_ms >= late_by, "{r:?}");
                late += 1;
            }
            max_seen = max_seen.max(r.ts_ms);
        }
        assert!((100..=300).contains(&late), "late = {late}");
    }

    #[test]
    fn dup_rate_roughly_right() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = small(dir.path(), GenFormat::Binary);
        opts.dup_rate = 0.1;
        let report = generate_chunked(&opts, 2, TEST_CHUNK).unwrap();
        let recs = records(&fs::read(&report.files[0]).unwrap());
        assert_eq!(report.events, recs.len() as u64);
        let dups = recs.len() - without_dups(&recs).len();
        assert_eq!(without_dups(&recs).len() as u64, opts.events);
        let expected = opts.events as f64 * opts.dup_rate;
        assert!((dups as f64 - expected).abs() < expected * 0.1, "dups = {dups}");
    }

    #[test]
    fn binary_and_jsonl_carry_the_same_events() {
        let dir = tempfile::tempdir().unwrap();
        let opts = small(dir.path(), GenFormat::Jsonl);
        let report = generate_chunked(&opts, 3, TEST_CHUNK).unwrap();
        let text = String::from_utf8(fs::read(&report.files[0]).unwrap()).unwrap();
        let bin = binary_run(&GenOptions { format: GenFormat::Binary, ..opts.clone() });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), bin.len());
        let (mut as_string, mut as_int) = (0, 0);
        for (line, rec) in lines.iter().zip(&bin) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let did = &v["did"];
            let did = match did.as_str() {
                Some(s) => {
                    as_string += 1;
                    s.parse::<u64>().unwrap()
                }
                None => {
                    as_int += 1;
                    did.as_u64().unwrap()
                }
            };
            assert_eq!((v["ts"].as_i64().unwrap(), did), (rec.ts_ms, rec.did));
            let page = format!("p{}", rec.dims[0]);
            assert_eq!(v["page"].as_str(), Some(page.as_str()));
            assert_eq!(v["event"].as_str(), Some(EVENT_NAMES[rec.dims[1] as usize]));
            assert_eq!(v["platform"].as_str(), Some(PLATFORM_NAMES[rec.dims[2] as usize]));
            assert_eq!(v["app_ver"].as_u64(), Some(u64::from(rec.dims[3])));
        }
        assert!(as_string > lines.len() / 3 && as_int > lines.len() / 3);
    }

    #[test]
    fn fields_are_in_range() {
        let dir = tempfile::tempdir().unwrap();
        let opts = small(dir.path(), GenFormat::Binary);
        let recs = binary_run(&opts);
        let end = opts.start_ms + parse_duration_ms(&opts.duration).unwrap();
        let mut seen = vec![false; opts.devices as usize + 1];
        for r in &recs {
            assert!((1..=opts.devices).contains(&r.did));
            assert!(r.ts_ms <= end && r.ts_ms >= opts.start_ms - 5_000);
            assert!(r.dims[0] < opts.pages && r.dims[1] < 4 && r.dims[2] < 3);
            assert!((APP_VER_MIN..APP_VER_MIN + 8).contains(&r.dims[3]));
            seen[r.did as usize] = true;
        }
        // ~6.7 events per device: nearly all devices appear.
        let seen = seen.iter().filter(|&&s| s).count() as f64;
        assert!(seen > 0.9 * opts.devices as f64, "seen = {seen}");
    }

    #[test]
    fn peak_shape_is_monotone_and_concentrated() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = small(dir.path(), GenFormat::Binary);
        opts.shape = GenShape::Peak;
        opts.disorder_fraction = 0.0;
        let recs = without_dups(&binary_run(&opts));
        assert!(recs.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms));
        let span = parse_duration_ms(&opts.duration).unwrap() as f64;
        let in_peak = recs
            .iter()
            .filter(|r| {
                let x = (r.ts_ms - opts.start_ms) as f64 / span;
                (PEAK_CENTER - PEAK_WIDTH / 2.0..PEAK_CENTER + PEAK_WIDTH / 2.0).contains(&x)
            })
            .count() as f64;
        // A flat rate would put 5% of events there; the bump puts ~15%.
        assert!(in_peak > 0.12 * recs.len() as f64, "in peak = {in_peak}");
    }

    #[test]
    fn csv_has_header_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = small(dir.path(), GenFormat::Csv);
        opts.files = 2;
        let report = generate_chunked(&opts, 2, TEST_CHUNK).unwrap();
        for bytes in read_all(&report) {
            let text = String::from_utf8(bytes).unwrap();
            let mut lines = text.lines();
            assert_eq!(lines.next(), Some("ts,did,page,event,platform,app_ver,net"));
            assert_eq!(lines.next().unwrap().split(',').count(), 7);
        }
    }

    #[test]
    fn zero_events_give_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = small(dir.path(), GenFormat::Jsonl);
        opts.events = 0;
        opts.files = 2;
        let report = generate(&opts).unwrap();
        assert_eq!((report.events, report.bytes), (0, 0));
        assert!(read_all(&report).iter().all(Vec::is_empty));
    }

    #[test]
    fn more_files_than_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = small(dir.path(), GenFormat::Jsonl);
        opts.events = 2;
        opts.files = 5;
        opts.dup_rate = 0.0;
        let report = generate(&opts).unwrap();
        let lines: usize = read_all(&report).iter().map(|b| b.split(|&c| c == b'\n').count() - 1).sum();
        assert_eq!((report.files.len(), lines), (5, 2));
    }

    #[test]
    fn bad_options_are_errors_naming_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let base = small(dir.path(), GenFormat::Jsonl);
        let cases = [
            (GenOptions { devices: 0, ..base.clone() }, "--devices"),
            (GenOptions { duration: "4x".into(), ..base.clone() }, "--duration"),
            (GenOptions { late_by: "".into(), ..base.clone() }, "--late-by"),
            (GenOptions { dup_rate: 1.5, ..base.clone() }, "--dup-rate"),
            (GenOptions { files: 0, ..base.clone() }, "--files"),
            (GenOptions { start_ms: i64::MAX - 1_000, ..base.clone() }, "--start-ms"),
        ];
        for (opts, flag) in cases {
            let err = generate(&opts).unwrap_err().to_string();
            assert!(err.contains(flag), "{err}");
        }
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"").unwrap();
        let opts = GenOptions { out: blocker.join("sub"), ..base };
        let err = format!("{:#}", generate(&opts).unwrap_err());
        assert!(err.contains("sub"), "{err}");
    }
}

//! Checkpoint costs of one dedup table, on the real disk: a full checkpoint
//! (base), incremental ones (deltas) after 1%, 10% and 100% of the entries
//! changed, the base the engine would write instead, and restoring a table
//! from its files (checked entry by entry against the live table). Each
//! write is timed with its fsync, next to a plain sequential write + fsync
//! of the same number of bytes measured in the same run, so the ratios mean
//! something on a noisy shared machine.
//!
//! ```sh
//! cargo bench --bench checkpoint                            # 10M entries
//! CKPT_BENCH_ENTRIES=1000000 cargo bench --bench checkpoint # a quick check
//! ```
//!
//! env:
//! - `CKPT_BENCH_ENTRIES` (default 10_000_000): (device, key) entries in the table
//! - `CKPT_BENCH_DIR` (default `data/ckpt-bench`): where the files go; tmpfs is refused
//! - `CKPT_BENCH_REPS` (default 3): repetitions of each timing (median reported)
//! - `CKPT_BENCH_EXPECTED` (default 0): size the table for this many entries up
//!   front; 0 grows it from empty by 1.5x, as the engine's first day does
//! - `CKPT_BENCH_KEEP=1`: keep the table files afterwards (they are removed)
//!
//! The markdown report goes to stdout, progress to stderr. A restored table
//! that differs from the live one makes the bench panic (exit status 101).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tally::metric::cumulate::{DELTAS_PER_BASE_MAX, DELTAS_PER_BASE_MAX_PER_MILLE};
use tally::state::dedup::{DedupTable, Entry, Seen, Written, DELTA_RECORD_BYTES};

const ENTRIES_DEFAULT: usize = 10_000_000;
const DIR_DEFAULT: &str = "data/ckpt-bench";
/// Keys per device: entry i is (device i / KEYS, key i % KEYS).
const KEYS: usize = 5;
/// First slices sit in one day of minutes after this (2025-02-19).
const SLICE_BASE: u32 = 29_000_000;
const SEED: u64 = 0x7A11_C0DE_2026_0001;
/// Shares of the entries changed, in per cent; the sets are nested.
const CHANGED_PCT: [u64; 3] = [1, 10, 100];
/// Entries compared after every restore (all are compared once per chain).
const SAMPLE: usize = 1_000_000;

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The (device fingerprint, key) of entry `i`; distinct for distinct `i`
/// (splitmix is a bijection).
fn pair(i: usize) -> (u64, u32) {
    (splitmix(SEED ^ (i / KEYS) as u64), (i % KEYS) as u32)
}

fn first_slice(i: usize) -> u32 {
    SLICE_BASE + 10 + (splitmix(SEED.rotate_left(17) ^ i as u64) % 1440) as u32
}

/// Whether entry `i` is in the `pct`% changed set (1% ⊂ 10% ⊂ 100%).
fn changed_in(i: usize, pct: u64) -> bool {
    splitmix(SEED.rotate_left(33) ^ i as u64) % 100 < pct
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.replace('_', "").parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[(v.len() - 1) / 2]
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("ckpt-bench: {}", msg.as_ref());
}

fn fsync(p: &Path) {
    File::open(p).and_then(|f| f.sync_all()).unwrap_or_else(|e| panic!("fsync {}: {e}", p.display()));
}

/// Drops a (clean, fsynced) file's pages from the page cache.
fn evict(p: &Path) {
    let f = File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    // SAFETY: advice on a file descriptor we own; no memory is involved.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise(DONTNEED) {}", p.display());
}

fn remove(p: &Path) {
    let _ = std::fs::remove_file(p);
}

/// Seconds of (the write call, write + fsync).
#[derive(Default)]
struct Timing {
    write: Vec<f64>,
    total: Vec<f64>,
}

/// A plain sequential write + fsync of `bytes` bytes of a zero buffer, the
/// same way the table files are written (create, one write_all, close,
/// open, fsync).
fn plain_write(dir: &Path, buf: &[u8], bytes: usize, t: &mut Timing) {
    let p = dir.join("plain-write.tmp");
    let t0 = Instant::now();
    File::create(&p).and_then(|mut f| f.write_all(&buf[..bytes])).expect("plain write");
    let t1 = Instant::now();
    fsync(&p);
    let t2 = Instant::now();
    t.write.push((t1 - t0).as_secs_f64());
    t.total.push((t2 - t0).as_secs_f64());
    remove(&p);
}

/// A plain sequential read of `files` into a buffer already touched.
fn plain_read(files: &[PathBuf], buf: &mut [u8]) -> f64 {
    let t0 = Instant::now();
    for p in files {
        let mut f = File::open(p).expect("open for plain read");
        let n = f.metadata().expect("stat").len() as usize;
        f.read_exact(&mut buf[..n]).expect("plain read");
    }
    t0.elapsed().as_secs_f64()
}

fn timed_base(t: &mut DedupTable, p: &Path, timing: &mut Timing) -> Written {
    let t0 = Instant::now();
    let w = t.write_base(p).expect("write_base");
    let t1 = Instant::now();
    fsync(p);
    let t2 = Instant::now();
    timing.write.push((t1 - t0).as_secs_f64());
    timing.total.push((t2 - t0).as_secs_f64());
    w
}

fn timed_delta(t: &mut DedupTable, p: &Path, timing: &mut Timing) -> Written {
    let t0 = Instant::now();
    let w = t.write_delta(p).expect("write_delta");
    let t1 = Instant::now();
    fsync(p);
    let t2 = Instant::now();
    timing.write.push((t1 - t0).as_secs_f64());
    timing.total.push((t2 - t0).as_secs_f64());
    w
}

/// Entries of `restored` that differ from `want` (the live table, or a
/// snapshot of it), among `idx`; prints the first.
fn differences(
    restored: &DedupTable,
    want: &dyn Fn(usize) -> Option<Entry>,
    idx: &mut dyn Iterator<Item = usize>,
    quiet: bool,
) -> usize {
    let mut bad = 0;
    let mut first = None;
    for i in idx {
        let (fp, key) = pair(i);
        let got = restored.get(fp, key);
        let w = want(i);
        assert!(w.is_some(), "entry {i} missing from the reference: bench bug");
        if got != w {
            bad += 1;
            first.get_or_insert((i, got, w));
        }
    }
    if let Some((i, got, w)) = first.filter(|_| !quiet) {
        progress(format!("first difference: entry {i}: restored {got:?}, expected {w:?}"));
    }
    bad
}

/// Checks a restored table against the reference; a difference fails the
/// bench. `all`: compare every entry, else a sample.
fn check(
    what: &str,
    restored: &DedupTable,
    len: usize,
    want: &dyn Fn(usize) -> Option<Entry>,
    sample: &[usize],
    all: bool,
) {
    assert_eq!(restored.len(), len, "{what}: restored len differs from the live table");
    assert_eq!(restored.changes(), Some(0), "{what}: a restored table must track changes from a clean state");
    let bad = if all {
        differences(restored, want, &mut (0..len), false)
    } else {
        differences(restored, want, &mut sample.iter().copied(), false)
    };
    assert_eq!(bad, 0, "RESTORE MISMATCH ({what}): {bad} entries differ from the live table");
    // Pairs never inserted must stay absent.
    for d in 0..1000u64 {
        let fp = splitmix(SEED ^ d);
        assert_eq!(restored.get(fp, KEYS as u32 + 3), None, "{what}: a pair never inserted is present");
    }
}

struct Row {
    what: String,
    changed: String,
    bytes: u64,
    t: Timing,
    /// Plain I/O of the same bytes, same run.
    plain: Vec<f64>,
    note: String,
}

fn fs_type(dir: &Path) -> (i64, &'static str) {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs fills a plain struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    assert_eq!(r, 0, "statfs {}", dir.display());
    let t = st.f_type as i64;
    let name = match t {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x794C_7630 => "overlayfs",
        _ => "other",
    };
    (t, name)
}

fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mem = read("/proc/meminfo").lines().find(|l| l.starts_with("MemTotal:")).unwrap_or("MemTotal: ?").to_owned();
    let mem = mem.split_whitespace().collect::<Vec<_>>().join(" ");
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("?".to_owned(), |(_, m)| m.trim().to_owned());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("nproc {nproc} ({cpu}), {mem}, kernel {}", read("/proc/sys/kernel/osrelease").trim())
}

fn git_commit() -> String {
    let out = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let c = out(&["rev-parse", "--short=12", "HEAD"]);
    let dirty = !out(&["status", "--porcelain", "--", "src"]).is_empty();
    format!(
        "{}{}",
        if c.is_empty() { "unknown" } else { &c },
        if dirty { " (+ uncommitted changes in src/)" } else { "" }
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let n = env_usize("CKPT_BENCH_ENTRIES", ENTRIES_DEFAULT);
    let reps = env_usize("CKPT_BENCH_REPS", 3).max(1);
    let expected = env_usize("CKPT_BENCH_EXPECTED", 0);
    let keep = std::env::var("CKPT_BENCH_KEEP").is_ok_and(|v| v == "1");
    let dir = PathBuf::from(std::env::var("CKPT_BENCH_DIR").unwrap_or_else(|_| DIR_DEFAULT.into()));
    assert!(n >= 1000, "CKPT_BENCH_ENTRIES must be at least 1000");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let (fs_magic, fs_name) = fs_type(&dir);
    assert!(fs_name != "tmpfs", "{} is on tmpfs: checkpoint costs must be measured on the real disk", dir.display());
    // Files of an earlier run (this directory is the bench's own).
    for e in std::fs::read_dir(&dir).expect("read dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".base") || name.ends_with(".delta") || name.ends_with(".tmp") {
            remove(&e.path());
        }
    }
    let mut command: Vec<String> =
        ["CKPT_BENCH_ENTRIES", "CKPT_BENCH_DIR", "CKPT_BENCH_REPS", "CKPT_BENCH_EXPECTED", "CKPT_BENCH_KEEP"]
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
            .collect();
    command.push("cargo bench --bench checkpoint".into());
    let load_before = loadavg();
    let started = Instant::now();

    // ------------------------------------------------------------------
    // build
    // ------------------------------------------------------------------
    progress(format!("building a table of {n} entries (expected = {expected})"));
    let mut live = DedupTable::anonymous_for(expected).expect("table");
    live.track_changes();
    let t0 = Instant::now();
    for i in 0..n {
        let (fp, key) = pair(i);
        let seen = live.observe(fp, key, first_slice(i)).expect("observe");
        assert_eq!(seen, Seen::New, "entry {i} is not new: the pairs are not distinct");
    }
    let build_s = t0.elapsed().as_secs_f64();
    assert_eq!(live.len(), n);
    assert_eq!(live.changes(), None, "a new table has no base yet");
    // A base holds the entries only, not the table's empty slots.
    let base_bytes = n * DELTA_RECORD_BYTES;
    progress(format!(
        "built in {build_s:.2} s: capacity {}, load {:.1}%, {} bytes ({:.1} B/entry)",
        live.capacity(),
        100.0 * n as f64 / live.capacity() as f64,
        live.bytes(),
        live.bytes() as f64 / n as f64
    ));
    // Room for the largest plain write or read: a base, or a 100% delta.
    let mut buf = vec![0u8; base_bytes.max(n * DELTA_RECORD_BYTES) * 2];
    for b in buf.iter_mut().step_by(4096) {
        // SAFETY: a valid &mut u8; volatile so the pages are really touched.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    let mut rows: Vec<Row> = Vec::new();

    // ------------------------------------------------------------------
    // full checkpoint
    // ------------------------------------------------------------------
    let mut t = Timing::default();
    let mut plain = Timing::default();
    let mut chain_base = None;
    for r in 0..reps {
        let p = dir.join(format!("full-r{r}.base"));
        let w = timed_base(&mut live, &p, &mut t);
        assert_eq!(w.bytes as usize, base_bytes);
        plain_write(&dir, &buf, base_bytes, &mut plain);
        if let Some((old, _)) = chain_base.replace((p, w)) {
            remove(&old);
        }
        progress(format!("full checkpoint {}/{reps}: {:.3} s (plain {:.3} s)", r + 1, t.total[r], plain.total[r]));
    }
    let (base_path, base_w) = chain_base.expect("a base");
    assert_eq!(live.changes(), Some(0));
    rows.push(Row {
        what: "full checkpoint: write_base + fsync".into(),
        changed: format!("{n} (all)"),
        bytes: base_w.bytes,
        t,
        plain: plain.total,
        note: "base".into(),
    });

    // ------------------------------------------------------------------
    // deltas after 1%, 10%, 100% changed; a base at the same point
    // ------------------------------------------------------------------
    let mut deltas: Vec<(PathBuf, Written)> = Vec::new();
    // The engine's chain when the checkpoints see 1%, then 10%, then 100%
    // changed (the first repetition of each): delta bytes since its base.
    let mut engine_chain: u64 = 0;
    let mut engine_deltas: Vec<(PathBuf, Written)> = Vec::new();
    let mut snapshot: Vec<(usize, Entry)> = Vec::new();
    let mut last_base_at: Option<(PathBuf, Written)> = None;
    let sample: Vec<usize> =
        (0..SAMPLE.min(n)).map(|j| (splitmix(SEED ^ 0xABCD ^ j as u64) % n as u64) as usize).collect();
    for pct in CHANGED_PCT {
        let mut td = Timing::default();
        let mut tb = Timing::default();
        let (mut pd, mut pb) = (Timing::default(), Timing::default());
        let mut changed = 0;
        let mut delta_bytes = 0;
        for r in 0..reps {
            // change: an earlier first slice for every entry of the set
            let mut c = 0;
            for i in (0..n).filter(|&i| changed_in(i, pct)) {
                let (fp, key) = pair(i);
                let was = live.get(fp, key).expect("live entry").first_slice;
                let seen = live.observe(fp, key, was - 1).expect("observe");
                assert_eq!(seen, Seen::Earlier { was }, "entry {i}: a smaller slice must rewrite the entry");
                c += 1;
            }
            assert_eq!(live.changes(), Some(c), "changed slots");
            changed = c;
            let p = dir.join(format!("p{pct}-r{r}.delta"));
            let w = timed_delta(&mut live, &p, &mut td);
            assert_eq!(w.bytes as usize, c * DELTA_RECORD_BYTES);
            delta_bytes = w.bytes;
            plain_write(&dir, &buf, w.bytes as usize, &mut pd);
            deltas.push((p.clone(), w));
            if r == 0 {
                engine_deltas.push((p.clone(), w));
            }
            // what a base would cost here (the table's state equals the
            // base + every delta so far; writing it changes no tracking)
            let pbase = dir.join(format!("at-p{pct}-r{r}.base"));
            let wb = timed_base(&mut live, &pbase, &mut tb);
            plain_write(&dir, &buf, wb.bytes as usize, &mut pb);
            if let Some((old, _)) = last_base_at.replace((pbase, wb)) {
                remove(&old);
            }
            assert_eq!(live.changes(), Some(0));
            if pct == 10 && r == 0 {
                // the state a restore of base + 1% + 10% (first reps) must give
                snapshot = sample.iter().map(|&i| (i, live.get(pair(i).0, pair(i).1).expect("live"))).collect();
            }
            progress(format!(
                "{pct}% changed {}/{reps}: delta {:.3} s (plain {:.3}), base {:.3} s (plain {:.3})",
                r + 1,
                td.total[r],
                pd.total[r],
                tb.total[r],
                pb.total[r]
            ));
        }
        // the engine's rule (TableOut::table; the table holds n entries,
        // and three deltas stay far under the file limit)
        let entry_bytes = (n * DELTA_RECORD_BYTES) as u64;
        let fresh = delta_bytes * 1000 <= entry_bytes * DELTAS_PER_BASE_MAX_PER_MILLE;
        let chained = (engine_chain + delta_bytes) * 1000 <= entry_bytes * DELTAS_PER_BASE_MAX_PER_MILLE;
        let pick = if chained { "delta" } else { "**base**" };
        let why = format!(
            "engine writes: {pick} (deltas since base would be {:.1}% of the entries' bytes; limit {}%){}",
            100.0 * (engine_chain + delta_bytes) as f64 / entry_bytes as f64,
            DELTAS_PER_BASE_MAX_PER_MILLE / 10,
            if fresh == chained {
                String::new()
            } else {
                format!("; right after a base: {}", if fresh { "delta" } else { "base" })
            }
        );
        if chained {
            engine_chain += delta_bytes;
        } else {
            engine_chain = 0;
        }
        rows.push(Row {
            what: format!("{pct}% changed: write_delta + fsync"),
            changed: changed.to_string(),
            bytes: delta_bytes,
            t: td,
            plain: pd.total,
            note: why,
        });
        rows.push(Row {
            what: format!("{pct}% changed: write_base + fsync instead"),
            changed: changed.to_string(),
            bytes: base_w.bytes,
            t: tb,
            plain: pb.total,
            note: format!("for comparison: {:.2}x the delta's bytes", base_w.bytes as f64 / delta_bytes as f64),
        });
    }
    let (last_base_path, last_base_w) = last_base_at.expect("a base at 100%");

    // ------------------------------------------------------------------
    // restore (anonymous), warm and cold page cache
    // ------------------------------------------------------------------
    let live_ref = |i: usize| {
        let (fp, key) = pair(i);
        live.get(fp, key)
    };
    let snap: std::collections::HashMap<usize, Entry> = snapshot.iter().copied().collect();
    let snap_ref = |i: usize| snap.get(&i).copied();
    let snap_sample: Vec<usize> = snapshot.iter().map(|&(i, _)| i).collect();
    type Chain<'a> = (&'a str, (PathBuf, Written), Vec<(PathBuf, Written)>, bool);
    let chains: Vec<Chain> = vec![
        ("restore: full base + every delta above", (base_path.clone(), base_w), deltas.clone(), true),
        (
            "restore: full base + 1% and 10% deltas (the engine's chain before 100%)",
            (base_path.clone(), base_w),
            engine_deltas[..2].to_vec(),
            false,
        ),
        (
            "restore: the base written at 100% (the engine's chain after it)",
            (last_base_path.clone(), last_base_w),
            Vec::new(),
            true,
        ),
    ];
    // Negative control: the checker must see that the base alone is stale.
    {
        let stale =
            DedupTable::restore(None, "x".into(), live.capacity(), n, (&base_path, base_w), &[]).expect("restore");
        let bad = differences(&stale, &live_ref, &mut sample.iter().copied(), true);
        assert!(bad > 0, "the check cannot tell a stale restore from a good one: bench bug");
        progress(format!("negative control: the full base alone differs from the live table in {bad} of {} sampled entries, as it should", sample.len()));
    }
    for (what, (bp, bw), ds, against_live) in &chains {
        let mut files: Vec<PathBuf> = vec![bp.clone()];
        files.extend(ds.iter().map(|(p, _)| p.clone()));
        let bytes: u64 = bw.bytes + ds.iter().map(|(_, w)| w.bytes).sum::<u64>();
        for cold in [false, true] {
            let mut t = Timing::default();
            let mut plain = Vec::new();
            for r in 0..reps {
                if cold {
                    files.iter().for_each(|p| evict(p));
                }
                let t0 = Instant::now();
                let restored = DedupTable::restore(None, "bench".into(), live.capacity(), n, (bp, *bw), ds)
                    .unwrap_or_else(|e| panic!("RESTORE FAILED ({what}): {e}"));
                let s = t0.elapsed().as_secs_f64();
                t.total.push(s);
                // every entry once per chain, a sample otherwise
                let all = !cold && r == 0;
                if *against_live {
                    check(what, &restored, n, &live_ref, &sample, all);
                } else {
                    check(what, &restored, n, &snap_ref, &snap_sample, false);
                }
                drop(restored);
                if cold {
                    files.iter().for_each(|p| evict(p));
                }
                plain.push(plain_read(&files, &mut buf));
                progress(format!(
                    "{what} ({}) {}/{reps}: {s:.3} s, checked{} (plain read {:.3} s)",
                    if cold { "cold" } else { "warm" },
                    r + 1,
                    if all { " every entry" } else { " a sample" },
                    plain[r]
                ));
            }
            rows.push(Row {
                what: format!("{what}, {}", if cold { "cold" } else { "warm" }),
                changed: format!("– ({} file{})", files.len(), if files.len() == 1 { "" } else { "s" }),
                bytes,
                t,
                plain,
                note: match (*against_live, cold) {
                    (true, false) => "= live table (every entry in run 1, then a sample)".into(),
                    (true, true) => "= live table (sample)".into(),
                    (false, _) => "= live table as of that checkpoint (sample)".into(),
                },
            });
        }
    }
    let total_s = started.elapsed().as_secs_f64();

    // ------------------------------------------------------------------
    // report
    // ------------------------------------------------------------------
    let mb = |b: u64, s: f64| b as f64 / 1e6 / s.max(1e-9);
    let mut out = String::new();
    let w = &mut out;
    use std::fmt::Write as _;
    let _ = writeln!(w, "### Checkpoint costs of one dedup table ({n} entries)\n");
    let _ = writeln!(
        w,
        "- machine: {}; load average {load_before} before, {} after (shared machine)",
        machine(),
        loadavg()
    );
    let _ = writeln!(
        w,
        "- files: `{}` on {fs_name} (statfs type {fs_magic:#x}); commit {}; run took {total_s:.0} s",
        dir.display(),
        git_commit()
    );
    let _ = writeln!(w, "- command: `{}`", command.join(" "));
    let _ = writeln!(
        w,
        "- table: {n} distinct (device, key) entries ({KEYS} keys per device), built with `observe` in {build_s:.2} s \
         ({:.1} M/s){}; capacity {} slots ({:.1}% load), {} bytes = {:.1} B/entry",
        n as f64 / build_s / 1e6,
        if expected == 0 {
            ", grown from empty by 1.5x as the engine's first day".into()
        } else {
            format!(", sized for {expected}")
        },
        live.capacity(),
        100.0 * n as f64 / live.capacity() as f64,
        live.bytes(),
        live.bytes() as f64 / n as f64
    );
    let _ = writeln!(
        w,
        "- seconds: median of {reps} (range in brackets); a write is timed from the call to the end of the file's fsync \
         (`write()` column: the call alone, i.e. to the page cache). Plain: the same number of bytes written from a \
         zero buffer with one `write_all`, then fsync (restores: read with `read_exact` into a touched buffer), \
         measured right after each repetition"
    );
    let _ = writeln!(
        w,
        "- restores: `DedupTable::restore` into anonymous memory, checksums and entry count checked by it; warm: files \
         in the page cache (just written); cold: evicted first with posix_fadvise(DONTNEED) (the VM host may still cache)"
    );
    let _ = writeln!(
        w,
        "- a change is an `observe` of an existing (device, key) with a smaller slice (`Seen::Earlier`); the 1%, 10% and \
         100% sets are nested and each repetition changes the set again\n"
    );
    let _ = writeln!(
        w,
        "| what | entries changed | bytes | seconds | `write()` s | MB/s | plain s | ratio to plain | notes |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in &rows {
        let s = median(&r.t.total);
        let lo = r.t.total.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.t.total.iter().copied().fold(0.0, f64::max);
        let p = median(&r.plain);
        let _ = writeln!(
            w,
            "| {} | {} | {} | {s:.3} [{lo:.3}–{hi:.3}] | {} | {:.0} | {p:.3} | {:.2}x | {} |",
            r.what,
            r.changed,
            r.bytes,
            if r.t.write.is_empty() { "–".into() } else { format!("{:.3}", median(&r.t.write)) },
            mb(r.bytes, s),
            s / p.max(1e-9),
            r.note
        );
    }
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Engine policy (`DELTAS_PER_BASE_MAX_PER_MILLE` = {DELTAS_PER_BASE_MAX_PER_MILLE}, `DELTAS_PER_BASE_MAX` = \
         {DELTAS_PER_BASE_MAX}): a delta while the deltas since the base, this one included, stay within {}% of the \
         table's entries (as bytes) and {DELTAS_PER_BASE_MAX} files, else a new base. A base and a delta record are both \
         {DELTA_RECORD_BYTES} B per entry (a base holds no empty slots).",
        DELTAS_PER_BASE_MAX_PER_MILLE / 10,
    );
    print!("{out}");
    if !keep {
        for e in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".base") || name.ends_with(".delta") || name.ends_with(".tmp") {
                remove(&e.path());
            }
        }
    }
    progress(format!("done in {total_s:.0} s"));
}

//! DAU metrics end to end: three sources whose disorder differs, a device
//! history holding new, recently seen and long-absent devices (and rows
//! that are malformed, duplicated or quoted), data crossing a local
//! midnight. Every row must equal the offline recomputation of `tally
//! verify` (which reads the history file itself, with the `csv` crate);
//! the rows are the same bytes whatever the worker count, and after a
//! crash and a restart.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::*;

/// Events per source.
const EVENTS: u64 = 400_000;
/// Devices 1..=DEVICES, shared by the three sources.
const DEVICES: u64 = 40_000;

/// The local day the generated span starts on (it ends on the next one).
fn first_day() -> i64 {
    (MIDNIGHT_MS - 1 + TZ_OFFSET_MS).div_euclid(DAY_MS)
}

/// `YYYY-MM-DD` of days since 1970-01-01.
fn date(days: i64) -> String {
    let (y, m, d) = tally::verify::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The device history: by `did % 6`, no row (new on the first day), last
/// seen 3 days before, 45 days before, 31 days before (returning on the
/// first day after 30), 30 days before (returning only on the second day),
/// or a quoted did. Some devices have a second, narrower row (merged).
/// Four malformed rows; they are reported and skipped.
fn write_history(path: &Path) -> usize {
    let d0 = first_day();
    let mut t = String::from("did,first_day,last_day\n");
    for did in 1..=DEVICES {
        let row = |first: i64, last: i64| format!("{did},{},{}\n", date(first), date(last));
        match did % 6 {
            0 => {}
            1 => t += &row(d0 - 100, d0 - 3),
            2 => t += &row(d0 - 200, d0 - 45),
            3 => t += &row(d0 - 60, d0 - 31),
            4 => t += &row(d0 - 30, d0 - 30),
            _ => t += &format!("\"{did}\",{},{}\n", date(d0 - 400), date(d0 - 8)),
        }
        if did % 12 == 1 {
            t += &row(d0 - 50, d0 - 10);
        }
    }
    t += "x1,2026-13-01,2026-01-01\n";
    t += "x2,2026-02-01,2026-01-01\n";
    t += "x3,2026-01-01\n";
    t += ",2026-01-01,2026-01-02\n";
    fs::write(path, t).unwrap();
    4
}

struct Source {
    name: &'static str,
    format: &'static str,
    files: Vec<PathBuf>,
}

fn sources(dir: &Path) -> Vec<Source> {
    let gen = |name: &'static str, format: GenFormat, seed: u64, disorder: &str, fraction: f64| {
        let opts = GenOptions {
            devices: DEVICES,
            format,
            seed,
            disorder: disorder.into(),
            disorder_fraction: fraction,
            ..gen_options(EVENTS)
        };
        let fmt = if format == GenFormat::Csv { "csv" } else { "jsonl" };
        Source { name, format: fmt, files: generate(&dir.join(name), opts) }
    };
    vec![
        gen("client", GenFormat::Jsonl, 11, "2m", 0.3),
        gen("server", GenFormat::Csv, 22, "4m", 0.6),
        gen("binlog", GenFormat::Jsonl, 33, "20s", 0.05),
    ]
}

fn job_toml(sources: &[Source], history: &Path, results: &Path, extra: &str) -> String {
    let q = |p: &Path| serde_json::to_string(&p.to_string_lossy()).unwrap();
    let mut t = format!("[job]\ntimezone = \"{TZ}\"\n{extra}\n");
    for s in sources {
        let paths: Vec<String> = s.files.iter().map(|p| q(p)).collect();
        t += &format!(
            "[[source]]\nname = \"{}\"\nkind = \"file\"\npath = [{}]\nformat = \"{}\"\nmax_out_of_orderness = \"5m\"\n\n",
            s.name,
            paths.join(", "),
            s.format
        );
    }
    let h = q(history);
    t += &format!(
        "[[metric]]\nname = \"dau_platform\"\nkind = \"dau\"\ngroup_by = [\"platform\"]\ndevice_history = {h}\n\n\
         [[metric]]\nname = \"dau_total\"\nkind = \"dau\"\nsources = [\"client\", \"server\"]\n\
         returning_after_days = 7\nemit = \"changed\"\ndevice_history = {h}\n\n\
         [[metric]]\nname = \"page_uv\"\nkind = \"cumulate\"\ngroup_by = [\"page\"]\n\n\
         [[sink]]\nkind = \"jsonl\"\npath = {}\n\n\
         [[sink]]\nkind = \"minute_devices\"\npath = {}\n",
        q(results),
        q(&details_of(results))
    );
    t
}

/// Where a job's `minute_devices` sink writes, beside its results.
fn details_of(results: &Path) -> PathBuf {
    results.with_file_name("minute_devices.jsonl")
}

/// One event as the offline reference reads it: source, ts, device id
/// text, platform (`null` where missing).
struct Ev {
    source: &'static str,
    ts: i64,
    did: String,
    platform: Value,
}

/// Every event of the fixture's sources, read with serde_json and the
/// `csv` crate (not the engine's parsers).
fn read_events(sources: &[Source]) -> Vec<Ev> {
    let mut out = Vec::new();
    for s in sources {
        for p in &s.files {
            if s.format == "csv" {
                let mut r = csv::Reader::from_path(p).unwrap();
                let h = r.headers().unwrap().clone();
                let col = |n: &str| h.iter().position(|x| x == n).unwrap();
                let (ts, did, platform) = (col("ts"), col("did"), col("platform"));
                for rec in r.records() {
                    let rec = rec.unwrap();
                    let platform = match &rec[platform] {
                        "" => Value::Null,
                        v => Value::from(v),
                    };
                    out.push(Ev { source: s.name, ts: rec[ts].parse().unwrap(), did: rec[did].into(), platform });
                }
            } else {
                for line in read_lines(p) {
                    let v: Value = serde_json::from_slice(&line).unwrap();
                    let did = match &v["did"] {
                        Value::String(d) => d.clone(),
                        other => other.to_string(),
                    };
                    let platform = v.get("platform").cloned().unwrap_or(Value::Null);
                    out.push(Ev { source: s.name, ts: v["ts"].as_i64().unwrap(), did, platform });
                }
            }
        }
    }
    out
}

/// The `minute_devices` rows offline: one per distinct (metric, source,
/// minute, dims, device) over each DAU metric's sources (no event of the
/// fixture is late or older than the ring), sorted as text.
fn expected_details(events: &[Ev]) -> Vec<String> {
    let mut rows = std::collections::BTreeSet::new();
    for e in events {
        let minute = e.ts.div_euclid(60_000) * 60_000;
        let row = |metric: &str, dims: Value| {
            serde_json::json!({"metric": metric, "source": e.source, "minute": minute, "dims": dims, "did": e.did})
                .to_string()
        };
        rows.insert(row("dau_platform", serde_json::json!({ "platform": e.platform })));
        if e.source != "binlog" {
            rows.insert(row("dau_total", serde_json::json!({})));
        }
    }
    rows.into_iter().collect()
}

/// A `minute_devices` file's rows, re-serialized field by field (so key
/// order and spacing do not matter) and sorted.
fn detail_rows(path: &Path) -> Vec<String> {
    let mut rows: Vec<String> = read_lines(path)
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_slice(l).unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(l)));
            let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["did", "dims", "metric", "minute", "source"], "fields of a minute_devices row");
            serde_json::json!({"metric": v["metric"], "source": v["source"], "minute": v["minute"], "dims": v["dims"], "did": v["did"]})
                .to_string()
        })
        .collect();
    rows.sort();
    rows
}

struct Fixture {
    dir: tempfile::TempDir,
    sources: Vec<Source>,
    history: PathBuf,
    malformed: usize,
}

fn fixture() -> Fixture {
    let dir = tempdir();
    let sources = sources(&dir.path().join("data"));
    let history = dir.path().join("history.csv");
    let malformed = write_history(&history);
    Fixture { dir, sources, history, malformed }
}

impl Fixture {
    fn job(&self, name: &str, extra: &str) -> JobFile {
        let d = self.dir.path();
        let results = d.join(format!("{name}-out")).join("results.jsonl");
        let path = d.join(format!("{name}.toml"));
        fs::write(&path, job_toml(&self.sources, &self.history, &results, extra)).unwrap();
        JobFile { path, results, summary: d.join(format!("{name}-summary.json")) }
    }
}

/// The largest `field` of any row of `metric` per local day.
fn max_per_day(results: &Path, metric: &str, field: &str) -> Vec<(i64, u64)> {
    let mut out: std::collections::BTreeMap<i64, u64> = Default::default();
    for line in read_lines(results) {
        let v: Value = serde_json::from_slice(&line).unwrap();
        if v["metric"] != metric {
            continue;
        }
        let day = (v["window_start"].as_i64().unwrap() + TZ_OFFSET_MS).div_euclid(DAY_MS);
        let x = out.entry(day).or_default();
        *x = (*x).max(v[field].as_u64().unwrap());
    }
    out.into_iter().collect()
}

#[test]
fn dau_rows_equal_the_offline_computation() {
    let f = fixture();
    let job = f.job("dau", "");
    let out = run(&job, 2);
    let summary = out.ok();
    let lines: usize = f
        .sources
        .iter()
        .flat_map(|s| s.files.iter().map(move |p| read_lines(p).len() - usize::from(s.format == "csv")))
        .sum();
    assert_eq!(count(summary, "events"), lines as u64, "every event of the three sources is counted");
    let imports = summary["history_imports"].as_array().expect("history_imports in the summary");
    assert_eq!(imports.len(), 2, "one import per dau metric: {imports:?}");
    for i in imports {
        assert_eq!(i["malformed"].as_u64(), Some(f.malformed as u64), "{i}");
        let examples = i["examples"].to_string();
        assert!(examples.contains("first_day is after last_day") && examples.contains("2 fields"), "{examples}");
        assert!(i["duplicates"].as_u64().unwrap() > 0, "{i}");
    }
    assert!(out.outcome.stderr.contains("malformed"), "the import is reported: {}", out.outcome.stderr);
    assert_verifies(&job, &job.results, "dau, 2 workers");
    let want = expected_details(&read_events(&f.sources));
    let got = detail_rows(&details_of(&job.results));
    if let Some(i) = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]) {
        panic!("minute_devices row {i} (sorted): got {}, want {}", got[i], want[i]);
    }
    assert_eq!(got.len(), want.len(), "minute_devices rows (each distinct, none missing)");
    assert_verifies(&job, &details_of(&job.results), "tally verify of the minute_devices file");

    // Not vacuous: each day has new and returning devices, in both metrics.
    for metric in ["dau_platform", "dau_total"] {
        for field in ["active", "new", "returning"] {
            let per_day = max_per_day(&job.results, metric, field);
            assert_eq!(per_day.len(), 2, "{metric}: rows on both sides of midnight");
            assert!(per_day.iter().all(|&(_, x)| x > 0), "{metric}.{field} is zero on some day: {per_day:?}");
        }
    }

    for workers in [1, 3] {
        let other = f.job(&format!("dau-w{workers}"), "");
        run(&other, workers).ok();
        assert!(
            fs::read(&other.results).unwrap() == fs::read(&job.results).unwrap(),
            "{workers} workers write other rows than 2"
        );
        assert!(
            fs::read(details_of(&other.results)).unwrap() == fs::read(details_of(&job.results)).unwrap(),
            "{workers} workers write other minute_devices rows than 2"
        );
    }

    // tally verify fails a detail file missing a row, or holding a row no
    // event gives.
    let details = details_of(&job.results);
    let mut lines = read_lines(&details);
    lines.remove(10);
    let forged = String::from_utf8(lines[20].clone()).unwrap().replace("\"did\":\"", "\"did\":\"x");
    lines[20] = forged.into_bytes();
    write_lines(&details, &lines, b"\n");
    let v = verify(&job, &details);
    assert_eq!(v.code, Some(1), "{}", v.stdout);
    assert!(v.stdout.contains("rows wrong:       1") && v.stdout.contains("rows missing:     2"), "{}", v.stdout);
}

#[test]
fn dau_restarts_after_a_crash_with_the_same_rows() {
    let f = fixture();
    let plain = f.job("plain", "");
    run(&plain, 2).ok();
    let want = fs::read(&plain.results).unwrap();
    let want_details = fs::read(details_of(&plain.results)).unwrap();
    // Crash right after checkpoint 2 commits, then resume: with 2 workers,
    // and (from a second crash) re-sharded onto 3.
    for (i, resume_workers) in [(0, "2"), (1, "3")] {
        let job = f.job(&format!("ckpt{i}"), "checkpoint_interval = \"20ms\"");
        let state = f.dir.path().join(format!("state{i}"));
        let tally = |workers: &str, crash: Option<&str>| {
            let mut cmd = Command::new(TALLY);
            cmd.args(["run", "--workers", workers, "--job"]).arg(&job.path).arg("--state-dir").arg(&state);
            if let Some(at) = crash {
                cmd.env("TALLY_CRASH_AT", at);
            }
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).output().unwrap()
        };
        let crashed = tally("2", Some("renamed:2"));
        let log = String::from_utf8_lossy(&crashed.stderr);
        assert!(!crashed.status.success() && log.contains("TALLY_CRASH_AT"), "no crash at checkpoint 2: {log}");
        let resumed = tally(resume_workers, None);
        let log = String::from_utf8_lossy(&resumed.stderr);
        assert!(resumed.status.success() && log.contains("resumed from checkpoint 2"), "{log}");
        assert!(
            fs::read(&job.results).unwrap() == want,
            "resumed with {resume_workers} workers: rows differ from the uninterrupted run"
        );
        assert!(
            fs::read(details_of(&job.results)).unwrap() == want_details,
            "resumed with {resume_workers} workers: minute_devices rows differ from the uninterrupted run"
        );
    }
}

#[test]
fn bad_device_histories_are_refused_before_the_run() {
    let f = fixture();
    let cases: [(&str, &str, &str); 3] = [
        ("missing", "", "No such file"),
        ("header", "device,first,last\n1,2026-01-01,2026-01-02\n", "header must be `did,first_day,last_day`"),
        (
            "nothing",
            "did,first_day,last_day\n1,yesterday,today\n2,2026-02-30,2026-03-01\n",
            "none of its 2 rows parses",
        ),
    ];
    for (name, text, why) in cases {
        let history = f.dir.path().join(format!("{name}.csv"));
        if !text.is_empty() {
            fs::write(&history, text).unwrap();
        }
        let results = f.dir.path().join(format!("{name}-out")).join("results.jsonl");
        let path = f.dir.path().join(format!("{name}.toml"));
        fs::write(&path, job_toml(&f.sources, &history, &results, "")).unwrap();
        let out = tally([std::ffi::OsString::from("run"), "--job".into(), path.into_os_string()]);
        assert_ne!(out.code, Some(0), "{name}: accepted");
        assert!(out.stderr.contains(why) && out.stderr.contains(&*history.to_string_lossy()), "{name}: {}", out.stderr);
        assert!(!results.exists() || fs::read(&results).unwrap().is_empty(), "{name}: rows were written");
    }
}

#[test]
fn minute_dedup_drops_repeats_and_counts_what_is_older_than_its_ring() {
    let dir = tempdir();
    let at = |h: i64, m: i64, s: i64| MIDNIGHT_MS + ((h * 60 + m) * 60 + s) * 1000;
    let ev = |ts: i64, did: &str| format!("{{\"ts\":{ts},\"did\":\"{did}\",\"platform\":\"ios\"}}\n");
    let input = dir.path().join("e.jsonl");
    let lines = [
        ev(at(10, 30, 0), "a"),
        ev(at(10, 5, 0), "a"), // 25 steps before a's latest: older than the ring
        ev(at(10, 20, 0), "b"),
        ev(at(10, 20, 1), "b"), // same step again
        ev(at(10, 14, 0), "a"), // 16 steps before: inside the ring, a now counts from 10:14
    ];
    fs::write(&input, lines.concat()).unwrap();
    let results = dir.path().join("out.jsonl");
    let path = dir.path().join("job.toml");
    let q = |p: &Path| serde_json::to_string(&p.to_string_lossy()).unwrap();
    fs::write(
        &path,
        format!(
            "[job]\ntimezone = \"{TZ}\"\n[[source]]\nname = \"client\"\nkind = \"file\"\npath = {}\nformat = \"jsonl\"\n\
             max_out_of_orderness = \"1h\"\n[[metric]]\nname = \"dau\"\nkind = \"dau\"\ngroup_by = [\"platform\"]\n\
             dedup_tolerance = 16\nemit = \"changed\"\n[[sink]]\nkind = \"jsonl\"\npath = {}\n\
             [[sink]]\nkind = \"minute_devices\"\npath = {}\n",
            q(&input),
            q(&results),
            q(&details_of(&results))
        ),
    )
    .unwrap();
    let job = JobFile { path, results: results.clone(), summary: dir.path().join("summary.json") };
    let out = run(&job, 2);
    let s = out.ok();
    assert_eq!(count(source_report(s, 0), "late_dropped"), 1, "{s}");
    let rows: Vec<(i64, u64)> = read_lines(&results)
        .iter()
        .map(|l| serde_json::from_slice::<Value>(l).unwrap())
        .map(|v| (v["window_end"].as_i64().unwrap(), v["active"].as_u64().unwrap()))
        .collect();
    let end = |h, m| at(h, m, 0);
    assert_eq!(rows, [(end(10, 15), 1), (end(10, 21), 2)], "a counts from 10:14, b from 10:20; 10:05 is dropped");
    // The detail stream: what the ring passed, once per (source, minute,
    // dims, device), in minute order.
    let detail = |h, m, did: &str| {
        format!(
            "{{\"metric\":\"dau\",\"source\":\"client\",\"minute\":{},\"dims\":{{\"platform\":\"ios\"}},\"did\":\"{did}\"}}",
            at(h, m, 0)
        )
    };
    let got: Vec<String> =
        read_lines(&details_of(&results)).iter().map(|l| String::from_utf8(l.clone()).unwrap()).collect();
    assert_eq!(got, [detail(10, 14, "a"), detail(10, 20, "b"), detail(10, 30, "a")]);
    assert_eq!(count(s, "minute_devices_rows"), 3);
}

/// `tally devices export` after a run: every device of the history file
/// and of the stream, its range widened by the days it was active in the
/// metric's sources, as CSV sorted by id (computed here from the history
/// rules and the raw events, not by the engine).
#[test]
fn devices_export_writes_the_history_rolled_forward() {
    let f = fixture();
    let job = f.job("export", "checkpoint_interval = \"50ms\"");
    let state = f.dir.path().join("state");
    let out = Command::new(TALLY)
        .args(["run", "--workers", "2", "--job"])
        .arg(&job.path)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d0 = first_day();
    let events = read_events(&f.sources);
    let export = |args: &[&str]| {
        let mut cmd = Command::new(TALLY);
        cmd.args(["devices", "export", "--job"]).arg(&job.path).arg("--state-dir").arg(&state).args(args);
        cmd.output().unwrap()
    };
    for (metric, sources) in
        [("dau_total", &["client", "server"][..]), ("dau_platform", &["client", "server", "binlog"])]
    {
        // The history file's rules (see write_history), merged.
        let mut want: std::collections::BTreeMap<String, (i64, i64)> = Default::default();
        for did in 1..=DEVICES as i64 {
            let range = match did % 6 {
                0 => None,
                1 => Some((d0 - 100, d0 - 3)),
                2 => Some((d0 - 200, d0 - 45)),
                3 => Some((d0 - 60, d0 - 31)),
                4 => Some((d0 - 30, d0 - 30)),
                _ => Some((d0 - 400, d0 - 8)),
            };
            let extra = (did % 12 == 1).then_some((d0 - 50, d0 - 10));
            for (a, b) in range.into_iter().chain(extra) {
                let r = want.entry(did.to_string()).or_insert((a, b));
                *r = (r.0.min(a), r.1.max(b));
            }
        }
        for e in events.iter().filter(|e| sources.contains(&e.source)) {
            let day = (e.ts + TZ_OFFSET_MS).div_euclid(DAY_MS);
            let r = want.entry(e.did.clone()).or_insert((day, day));
            *r = (r.0.min(day), r.1.max(day));
        }
        let mut text = String::from("did,first_day,last_day\n");
        for (did, (a, b)) in &want {
            text += &format!("{did},{},{}\n", date(*a), date(*b));
        }
        let path = f.dir.path().join(format!("{metric}-devices.csv"));
        let r = export(&["--metric", metric, "--out", path.to_str().unwrap()]);
        assert!(r.status.success(), "{metric}: {}", String::from_utf8_lossy(&r.stderr));
        let got = fs::read_to_string(&path).unwrap();
        if got != text {
            let (g, w): (Vec<&str>, Vec<&str>) = (got.lines().collect(), text.lines().collect());
            let i = (0..g.len().min(w.len())).find(|&i| g[i] != w[i]).unwrap_or(g.len().min(w.len()));
            panic!("{metric}: export differs at line {}: got {:?}, want {:?}", i + 1, g.get(i), w.get(i));
        }
        assert!(String::from_utf8_lossy(&r.stderr).contains(&format!("{} devices", want.len())));
        // What it wrote is a history a run imports whole.
        let q = |p: &Path| serde_json::to_string(&p.to_string_lossy()).unwrap();
        let one = f.dir.path().join("one.jsonl");
        fs::write(&one, format!("{{\"ts\":{MIDNIGHT_MS},\"did\":\"1\"}}\n")).unwrap();
        let next = JobFile {
            path: f.dir.path().join("next.toml"),
            results: f.dir.path().join("next.jsonl"),
            summary: f.dir.path().join("next-summary.json"),
        };
        fs::write(
            &next.path,
            format!(
                "[job]\ntimezone = \"{TZ}\"\n[[source]]\nname = \"client\"\nkind = \"file\"\npath = {}\n\
                 format = \"jsonl\"\n[[metric]]\nname = \"dau\"\nkind = \"dau\"\ndevice_history = {}\n\
                 [[sink]]\nkind = \"jsonl\"\npath = {}\n",
                q(&one),
                q(&path),
                q(&next.results)
            ),
        )
        .unwrap();
        let s = run(&next, 1);
        let import = &s.ok()["history_imports"][0];
        assert_eq!((count(import, "devices"), count(import, "malformed")), (want.len() as u64, 0), "{import}");
    }
    let r = export(&["--out", "-"]);
    assert_eq!(r.status.code(), Some(2), "two DAU metrics and no --metric");
    assert!(String::from_utf8_lossy(&r.stderr).contains("--metric"));
    let r = export(&["--metric", "page_uv", "--out", "-"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("not a DAU metric"));
}

#[test]
fn a_source_with_no_events_holds_nothing_back() {
    let mut f = fixture();
    let empty = f.dir.path().join("binlog-empty.jsonl");
    fs::write(&empty, "").unwrap();
    f.sources[2].files = vec![empty];
    let job = f.job("empty", "");
    let s = run(&job, 2);
    assert_eq!(count(source_report(s.ok(), 2), "events"), 0);
    assert_verifies(&job, &job.results, "dau with an empty source");
    assert!(!read_lines(&job.results).is_empty());
}

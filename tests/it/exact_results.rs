//! The core correctness property (DESIGN §3): when no event is later than
//! the source's `max_out_of_orderness`, every emitted window is exactly the
//! offline result, whatever the number of workers, the input format, or
//! the day boundary in the job's time zone; checked against tally's own
//! offline referee (`tally verify`, `Offline`) and against an independent
//! DuckDB recomputation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::*;

/// Events in the main exactness test: every minute of both days holds data
/// for every metric, and a debug build runs it in a few seconds.
const EVENTS_MAIN: u64 = 150_000;
const EVENTS_SMALL: u64 = 60_000;

#[test]
fn rows_equal_offline_across_local_midnight_1_and_2_workers() {
    let dir = tempdir();
    let files = generate(&dir.path().join("data"), gen_options(EVENTS_MAIN));
    let job = JobDef::new("jsonl", &files).metric(page_uv()).metric(platform_version());
    let (j1, j2) = (job.write(dir.path(), "w1"), job.write(dir.path(), "w2"));
    let runs = run_all(&[(&j1, 1), (&j2, 2)]);
    let (s1, s2) = (runs[0].ok(), runs[1].ok());
    for (s, w) in [(s1, 1), (s2, 2)] {
        assert_eq!(count(s, "workers"), w);
        assert_eq!(count(s, "rejected"), 0, "generated input has no bad lines: {s}");
        assert_eq!(
            count(s, "late_folded") + count(s, "late_dropped"),
            0,
            "disorder 2m < bound 5m: nothing is late: {s}"
        );
        assert!(count(s, "events") >= EVENTS_MAIN, "{s}");
    }

    // The data crosses local midnight: both days have rows, for both metrics.
    let rows = read_rows(&j1.results);
    for metric in ["page_uv", "platform_version"] {
        let days: std::collections::BTreeSet<i64> =
            rows.iter().filter(|r| r.metric == metric).map(|r| r.window_start).collect();
        assert_eq!(days.into_iter().collect::<Vec<_>>(), [MIDNIGHT_MS - DAY_MS, MIDNIGHT_MS], "{metric}: periods");
    }
    for r in &rows {
        assert_eq!(r.window_start, day_start(r.window_end - 1), "window_start is the local day start: {r:?}");
        assert_eq!((r.window_end + TZ_OFFSET_MS) % MINUTE_MS, 0, "window ends are on the minute grid: {r:?}");
    }

    // `tally verify` (offline recomputation, row by row) passes for both runs,
    // while the offline day totals are computed here at the same time.
    let (v1, v2, off) = std::thread::scope(|s| {
        let v1 = s.spawn(|| verify(&j1, &j1.results));
        let v2 = s.spawn(|| verify(&j2, &j2.results));
        let off = offline(&j1);
        (v1.join().unwrap(), v2.join().unwrap(), off)
    });
    for (v, w) in [(v1, 1), (v2, 2)] {
        assert_eq!(v.code, Some(0), "tally verify failed for the {w}-worker run:\n{}{}", v.stdout, v.stderr);
    }

    // Day totals (last window of each period and key) equal Offline::period_totals.
    let rows2 = read_rows(&j2.results);
    for (index, m) in job.metrics.iter().enumerate() {
        let want = offline_day_totals(&off, index, &m.group_by());
        assert!(want.keys().any(|k| k.0 == MIDNIGHT_MS) && want.keys().any(|k| k.0 == MIDNIGHT_MS - DAY_MS));
        assert_totals_equal(&day_totals(&rows, &m.name), &want, &format!("{}: 1 worker, day totals", m.name));
        assert_totals_equal(&day_totals(&rows2, &m.name), &want, &format!("{}: 2 workers, day totals", m.name));
    }
}

#[test]
fn output_is_identical_whatever_the_number_of_workers() {
    let dir = tempdir();
    let on_time = generate(&dir.path().join("on-time"), gen_options(EVENTS_SMALL));
    let late = generate(
        &dir.path().join("late"),
        GenOptions { seed: 7, late_fraction: 0.02, late_by: "10m".into(), ..gen_options(EVENTS_SMALL) },
    );
    let mut checked_late = false;
    for (name, files) in [("on-time", &on_time), ("late", &late)] {
        let job = JobDef::new("jsonl", files).metric(page_uv()).metric(platform_version().late("drop"));
        let jobs: Vec<JobFile> = (1..=3).map(|w| job.write(dir.path(), &format!("{name}-w{w}"))).collect();
        let runs = run_all(&[(&jobs[0], 1), (&jobs[1], 2), (&jobs[2], 3)]);
        let summaries: Vec<&Value> = runs.iter().map(RunOutput::ok).collect();
        let outputs: Vec<Vec<u8>> = jobs.iter().map(|j| std::fs::read(&j.results).unwrap()).collect();
        assert!(!outputs[0].is_empty(), "{name}: no rows");
        for w in 2..=3 {
            assert!(
                outputs[w - 1] == outputs[0],
                "{name}: results with {w} workers differ from 1 worker ({} vs {} bytes; first difference at byte {:?})",
                outputs[w - 1].len(),
                outputs[0].len(),
                outputs[0].iter().zip(&outputs[w - 1]).position(|(a, b)| a != b)
            );
            // What the run reports about the input does not depend on workers either.
            for field in ["records", "events", "rejected", "late_folded", "late_dropped", "rows"] {
                assert_eq!(summaries[w - 1][field], summaries[0][field], "{name}: summary {field} with {w} workers");
            }
        }
        if name == "late" {
            let s = summaries[0];
            assert!(count(s, "late_folded") > 0 && count(s, "late_dropped") > 0, "late data must be late: {s}");
            checked_late = true;
        } else {
            assert_verifies(&jobs[0], &jobs[0].results, "on-time data");
        }
    }
    assert!(checked_late);
}

#[test]
fn duckdb_agrees_with_every_row() {
    let python = python_with_duckdb();
    let dir = tempdir();
    let files = generate(&dir.path().join("data"), gen_options(100_000));
    assert_eq!(files.len(), 1);
    let job = JobDef::new("jsonl", &files).metric(page_uv()).write(dir.path(), "job");
    let reference = dir.path().join("duckdb.jsonl");
    let (run, py) = std::thread::scope(|s| {
        let py = s.spawn(|| {
            Command::new(&python)
                .arg(duckdb_reference_script())
                .arg(&files[0])
                .arg(&reference)
                .args(["--tz", "+08:00", "--step", "60000"])
                .stdin(Stdio::null())
                .output()
                .expect("cannot start python")
        });
        (run(&job, 2), py.join().unwrap())
    });
    run.ok();
    assert!(
        py.status.success(),
        "scripts/duckdb_reference.py failed:\n{}{}",
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr)
    );

    // Rows as parsed JSON: same keys, same values, as sets.
    let canon = |v: &Value| serde_json::to_string(v).unwrap(); // serde_json maps are sorted
    let tally_rows: BTreeMap<String, Value> = read_values(&job.results).iter().map(|v| (canon(v), v.clone())).collect();
    let duck_rows: BTreeMap<String, Value> = read_values(&reference).iter().map(|v| (canon(v), v.clone())).collect();
    assert_eq!(tally_rows.len() as u64, count(run.ok(), "rows"), "tally wrote duplicate rows");
    let only_tally: Vec<&String> = tally_rows.keys().filter(|k| !duck_rows.contains_key(*k)).take(8).collect();
    let only_duck: Vec<&String> = duck_rows.keys().filter(|k| !tally_rows.contains_key(*k)).take(8).collect();
    assert!(
        only_tally.is_empty() && only_duck.is_empty(),
        "tally ({} rows) and DuckDB ({} rows) disagree\n only in tally:\n  {}\n only in DuckDB:\n  {}",
        tally_rows.len(),
        duck_rows.len(),
        only_tally.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  "),
        only_duck.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  ")
    );
    // Both days, hundreds of windows: the comparison is not vacuous.
    assert!(duck_rows.len() > 5_000, "{} rows", duck_rows.len());
    assert!(duck_rows.values().any(|v| v["window_start"] == MIDNIGHT_MS));
    assert!(duck_rows.values().any(|v| v["window_start"] == MIDNIGHT_MS - DAY_MS));
}

#[test]
fn csv_and_binary_inputs_of_the_same_events_verify_and_agree_with_jsonl() {
    let dir = tempdir();
    let opts = gen_options(EVENTS_SMALL);
    let gen = |format: GenFormat| -> Vec<PathBuf> {
        generate(&dir.path().join(format.extension()), GenOptions { format, ..opts.clone() })
    };
    let (jsonl, csv, bin) = (gen(GenFormat::Jsonl), gen(GenFormat::Csv), gen(GenFormat::Binary));
    let jobs = [
        JobDef::new("jsonl", &jsonl).metric(page_uv()).write(dir.path(), "jsonl"),
        JobDef::new("csv", &csv).metric(page_uv()).write(dir.path(), "csv"),
        JobDef::new("binary", &bin).metric(page_uv_binary()).write(dir.path(), "binary"),
    ];
    let runs = run_all(&[(&jobs[0], 2), (&jobs[1], 2), (&jobs[2], 2)]);
    let events: Vec<u64> = runs.iter().map(|r| count(r.ok(), "events")).collect();
    assert_eq!(events[0], events[1], "csv reads every generated event");
    assert_eq!(events[0], events[2], "binary reads every generated event");
    for r in &runs {
        assert_eq!(count(r.ok(), "rejected"), 0, "{}", r.ok());
    }
    std::thread::scope(|s| {
        s.spawn(|| assert_verifies(&jobs[1], &jobs[1].results, "csv input"));
        assert_verifies(&jobs[2], &jobs[2].results, "binary input");
    });

    // Same events, same numbers: csv rows equal jsonl rows; binary rows equal
    // them with page codes in place of page names (device ids compare by text,
    // whether written as JSON strings, integers, CSV cells or binary u64).
    let as_pairs = |rows: Vec<Row>, code_to_name: bool| -> Vec<(i64, i64, String, u64, u64)> {
        rows.into_iter()
            .map(|r| {
                let page = match &r.dims["page"] {
                    Value::Number(n) if code_to_name => format!("p{n}"),
                    Value::String(s) if !code_to_name => s.clone(),
                    other => panic!("unexpected page {other} ({r:?})"),
                };
                (r.window_start, r.window_end, page, r.pv, r.uv)
            })
            .collect()
    };
    let want = as_pairs(read_rows(&jobs[0].results), false);
    assert!(want.len() > 1_000);
    assert!(as_pairs(read_rows(&jobs[1].results), false) == want, "csv rows differ from jsonl rows");
    let mut got_bin = as_pairs(read_rows(&jobs[2].results), true);
    let mut want_sorted = want.clone();
    got_bin.sort();
    want_sorted.sort();
    assert!(got_bin == want_sorted, "binary rows differ from jsonl rows");
}

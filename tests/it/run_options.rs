//! Options that change how a run works but never what it computes: emit
//! modes, a state directory for the dedup tables, and plain reads instead
//! of io_uring.

use std::process::{Command, Stdio};

use crate::support::*;

const EVENTS: u64 = 60_000;

/// `emit = "changed"` writes a row only for keys whose pv or uv moved since
/// the previous window; `tally verify` checks both directions (every
/// changed key present, no unchanged key written).
#[test]
fn emit_changed_writes_exactly_the_keys_that_changed() {
    let dir = tempdir();
    let files = generate(&dir.path().join("data"), gen_options(EVENTS));
    let all = JobDef::new("jsonl", &files).metric(platform_version()).write(dir.path(), "all");
    let changed = JobDef::new("jsonl", &files).metric(platform_version().emit("changed")).write(dir.path(), "changed");
    let runs = run_all(&[(&all, 2), (&changed, 2)]);
    let (rows_all, rows_changed) = (count(runs[0].ok(), "rows"), count(runs[1].ok(), "rows"));
    assert!(rows_changed > 0 && rows_changed < rows_all, "changed {rows_changed} vs all {rows_all} rows");
    assert_verifies(&changed, &changed.results, "emit = changed");
    // The last value written per key is the day total either way.
    let (a, c) = (read_rows(&all.results), read_rows(&changed.results));
    assert_eq!(final_rows(&a, "platform_version").len(), final_rows(&c, "platform_version").len());
    for (k, row) in final_rows(&a, "platform_version") {
        let last = final_rows(&c, "platform_version")[&k];
        assert_eq!((row.pv, row.uv), (last.pv, last.uv), "day total of {k:?}");
    }
}

/// Dedup tables as memory-mapped files under `--state-dir`
/// (`state_tables = "mapped"`), and `pread`
/// instead of io_uring (`TALLY_IO_URING=0`), give byte-identical rows.
#[test]
fn state_dir_and_plain_reads_give_the_same_rows() {
    let dir = tempdir();
    let files = generate(&dir.path().join("data"), gen_options(EVENTS));
    let def = JobDef::new("jsonl", &files).metric(page_uv()).metric(platform_version());
    let plain = def.write(dir.path(), "plain");
    let mapped = def.clone().job_line("state_tables = \"mapped\"").write(dir.path(), "mapped");
    let pread = def.write(dir.path(), "pread");
    run(&plain, 2).ok();

    let state = dir.path().join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["run", "--workers", "2", "--job"])
        .arg(&mapped.path)
        .arg("--state-dir")
        .arg(&state)
        .stdin(Stdio::null())
        .output()
        .expect("run tally");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let live = state.join("live");
    assert!(live.join("shard-0").is_dir() && live.join("shard-1").is_dir(), "shard state directories");
    assert!(state.join("MANIFEST").is_file(), "a checkpoint at the end");
    let left: Vec<_> = walk(&state).into_iter().filter(|p| p.extension().is_some_and(|e| e == "dedup")).collect();
    assert!(left.is_empty(), "finished days free their tables: {left:?}");

    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["run", "--workers", "2", "--job"])
        .arg(&pread.path)
        .env("TALLY_IO_URING", "0")
        .stdin(Stdio::null())
        .output()
        .expect("run tally");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("reading files with pread").count(), 1, "said once: {stderr}");

    let want = std::fs::read(&plain.results).unwrap();
    assert!(!want.is_empty());
    assert!(std::fs::read(&mapped.results).unwrap() == want, "--state-dir changed the rows");
    assert!(std::fs::read(&pread.results).unwrap() == want, "pread changed the rows");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

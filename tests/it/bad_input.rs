//! Bad input never crashes a run and never loses good data (DESIGN §4): a
//! malformed line is skipped, counted per source and reason
//! (`sources[i].rejected_by_reason` in `--summary`), the first few are
//! reported with `file:line`, and the rows computed from the good lines are
//! exact (`tally verify`, which skips the same lines, passes). A bad job
//! file or a missing input is rejected before anything runs (exit 2), with
//! the key path and the reason.
//!
//! Each case hides its bad lines among ~30k generated events (~4.5 MB, so
//! they fall into different blocks and different workers' hands): one
//! near the start, one near the end, the rest spread between.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::*;

const GOOD_EVENTS: u64 = 30_000;
const WORKERS: usize = 2;
/// Examples kept per source and reason (the first ones, in input order).
const EXAMPLES_PER_REASON: usize = 3;

/// A time inside the generated span (2026-02-15T23:40:00+08:00).
const TS: i64 = 1_771_170_000_000;

/// An event line that would count (a view of page p1) if it were accepted;
/// `rest` replaces its `"ts":…,"did":…` part.
fn event_with(rest: &str) -> Vec<u8> {
    format!("{{{rest},\"page\":\"p1\",\"event\":\"view\",\"platform\":\"ios\",\"app_ver\":127}}").into_bytes()
}

fn good_lines(dir: &Path) -> Vec<Vec<u8>> {
    let files = generate(&dir.join("gen"), gen_options(GOOD_EVENTS));
    let lines = read_lines(&files[0]);
    std::fs::remove_dir_all(dir.join("gen")).unwrap();
    lines
}

/// Spreads `bad` over `good`: the first after good line 1, the last before
/// the last good line, the others evenly between. Returns all lines and
/// the 1-based line numbers of the bad ones.
fn interleave(good: &[Vec<u8>], bad: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<usize>) {
    let n = bad.len();
    let at: Vec<usize> =
        (0..n).map(|j| if n == 1 { good.len() / 2 } else { 1 + j * (good.len() - 2) / (n - 1) }).collect();
    let (mut lines, mut numbers) = (Vec::new(), Vec::new());
    let mut next = 0;
    for (i, g) in good.iter().enumerate() {
        while next < n && at[next] == i {
            lines.push(bad[next].clone());
            numbers.push(lines.len());
            next += 1;
        }
        lines.push(g.clone());
    }
    (lines, numbers)
}

/// A job over one JSON-lines file: page PV/UV of views, and PV/UV per
/// (platform, app_ver) of every event.
fn job_for(dir: &Path, input: &Path, max_line_bytes: Option<usize>) -> JobFile {
    let mut job = JobDef::new("jsonl", &[input.to_path_buf()]).metric(page_uv()).metric(platform_version());
    if let Some(n) = max_line_bytes {
        job = job.max_line_bytes(n);
    }
    job.write(dir, "job")
}

struct Checked {
    stderr: String,
}

/// Runs the job over `lines` and checks that exactly the lines numbered
/// `bad` (1-based) were skipped, all for `reason`; that the first examples
/// name them as `file:line`; and that `tally verify` passes.
fn assert_skipped(dir: &Path, input: &Path, lines: &[Vec<u8>], bad: &[usize], reason: &str, job: &JobFile) -> Checked {
    let out = run(job, WORKERS);
    let summary = out.ok().clone();
    let src = source_report(&summary, 0);
    let n = bad.len() as u64;
    let by_reason: BTreeMap<String, u64> = serde_json::from_value(src["rejected_by_reason"].clone()).unwrap();
    let want: BTreeMap<String, u64> = if n == 0 { BTreeMap::new() } else { [(reason.to_string(), n)].into() };
    assert_eq!(by_reason, want, "rejected_by_reason; stderr:\n{}", out.outcome.stderr);
    assert_eq!(count(src, "rejected"), n);
    assert_eq!(count(&summary, "rejected"), n);
    assert_eq!(count(src, "records"), lines.len() as u64, "every line is a record, good or bad");
    assert_eq!(count(src, "events"), lines.len() as u64 - n, "every other line is an event");

    // The first examples of the reason, in input order, at file:line.
    let examples: Vec<&Value> =
        src["examples"].as_array().expect("examples").iter().filter(|e| e["reason"] == reason).collect();
    let want_at: Vec<String> =
        bad.iter().take(EXAMPLES_PER_REASON).map(|l| format!("{}:{l}", input.display())).collect();
    let got_at: Vec<&str> = examples.iter().map(|e| e["at"].as_str().unwrap_or("?")).collect();
    assert_eq!(got_at, want_at, "examples of {reason}");
    for (e, &line) in examples.iter().zip(bad) {
        let snippet = e["snippet"].as_str().unwrap_or_default().trim_end_matches('\u{fffd}');
        let text = String::from_utf8_lossy(&lines[line - 1]);
        assert!(text.starts_with(snippet), "example snippet {snippet:?} is not the start of line {line}: {text:?}");
    }
    if let Some(first) = want_at.first() {
        assert!(out.outcome.stderr.contains(first.as_str()), "stderr names {first}:\n{}", out.outcome.stderr);
    }
    let what =
        if reason.is_empty() { "rows of the lines".to_string() } else { format!("{reason}: rows of the good lines") };
    assert_verifies(job, &job.results, &what);
    let _ = dir;
    Checked { stderr: out.outcome.stderr }
}

/// The whole case: generated good lines with `bad` spread among them.
fn check_case(reason: &str, bad: Vec<Vec<u8>>) -> Checked {
    check_case_with(reason, bad, None, |_| {})
}

fn check_case_with(
    reason: &str,
    bad: Vec<Vec<u8>>,
    max_line_bytes: Option<usize>,
    tweak_good: impl FnOnce(&mut Vec<Vec<u8>>),
) -> Checked {
    let dir = tempdir();
    let mut good = good_lines(dir.path());
    tweak_good(&mut good);
    let (lines, numbers) = interleave(&good, &bad);
    let input = dir.path().join("events.jsonl");
    write_lines(&input, &lines, b"\n");
    let job = job_for(dir.path(), &input, max_line_bytes);
    assert_skipped(dir.path(), &input, &lines, &numbers, reason, &job)
}

/// Replaces the first occurrence of `from` in a line.
fn replace(line: &[u8], from: &str, to: &[u8]) -> Vec<u8> {
    let from = from.as_bytes();
    let i = line
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{:?} not in {:?}", String::from_utf8_lossy(from), String::from_utf8_lossy(line)));
    [&line[..i], to, &line[i + from.len()..]].concat()
}

// ---------------------------------------------------------------------------
// Skipped lines, one reason each
// ---------------------------------------------------------------------------

#[test]
fn truncated_json_lines_are_skipped() {
    let full = event_with(&format!("\"did\":\"7\",\"ts\":{TS}"));
    check_case(
        "invalid_json",
        vec![
            full[..full.len() - 1].to_vec(), // no closing brace
            full[..full.len() / 2].to_vec(), // cut inside a string
            format!("{{\"did\":\"7\",\"ts\":{TS}").into_bytes(),
            format!("{{\"did\":\"7\",\"ts\":{TS},").into_bytes(),
            format!("{{\"did\":\"7\",\"ts\":{TS},\"page\":").into_bytes(),
            format!("{{\"did\":\"7\",\"ts\":{TS},\"x\":{{\"a\":[1,").into_bytes(),
            b"{".to_vec(),
            [&full[..], b"}"].concat(), // one brace too many
        ],
    );
}

#[test]
fn non_object_lines_are_skipped() {
    let obj = format!("{{\"did\":\"7\",\"ts\":{TS},\"page\":\"p1\",\"event\":\"view\"}}");
    check_case(
        "not_an_object",
        vec![
            format!("[{obj}]").into_bytes(),
            serde_json::to_string(&obj).unwrap().into_bytes(), // the object as a JSON string
            b"42".to_vec(),
            b"-1".to_vec(),
            b"null".to_vec(),
            b"true".to_vec(),
            b"[]".to_vec(),
        ],
    );
}

#[test]
fn lines_without_ts_are_skipped() {
    check_case(
        "missing_ts",
        vec![
            event_with("\"did\":\"7\""),
            event_with("\"did\":\"7\",\"ts\":null"),
            event_with(&format!("\"did\":\"7\",\"TS\":{TS}")),
            event_with(&format!("\"did\":\"7\",\"time\":{TS}")),
            b"{}".to_vec(),
        ],
    );
}

#[test]
fn lines_whose_ts_is_not_an_integer_are_skipped() {
    check_case(
        "ts_not_integer",
        vec![
            event_with(&format!("\"did\":\"7\",\"ts\":\"{TS}\"")),
            event_with(&format!("\"did\":\"7\",\"ts\":{TS}.0")),
            event_with(&format!("\"did\":\"7\",\"ts\":{TS}.5")),
            event_with("\"did\":\"7\",\"ts\":1.77117e12"),
            event_with("\"did\":\"7\",\"ts\":true"),
            event_with(&format!("\"did\":\"7\",\"ts\":[{TS}]")),
            event_with(&format!("\"did\":\"7\",\"ts\":{{\"ms\":{TS}}}")),
            event_with("\"did\":\"7\",\"ts\":17711700000000000000000"),
        ],
    );
}

/// Event times must lie in [2000-01-01, 2100-01-01) UTC. The first and last
/// good lines sit exactly on the accepted edges, so their (very early and
/// very late) days must be emitted and exact too.
#[test]
fn lines_whose_ts_is_outside_2000_to_2100_are_skipped() {
    const MIN: i64 = 946_684_800_000; // 2000-01-01T00:00:00Z
    const END: i64 = 4_102_444_800_000; // 2100-01-01T00:00:00Z
    let c = check_case_with(
        "ts_out_of_range",
        vec![
            event_with(&format!("\"did\":\"7\",\"ts\":{}", MIN - 1)),
            event_with(&format!("\"did\":\"7\",\"ts\":{END}")),
            event_with("\"did\":\"7\",\"ts\":0"),
            event_with("\"did\":\"7\",\"ts\":-1"),
            event_with(&format!("\"did\":\"7\",\"ts\":{}", TS / 1000)), // seconds, not milliseconds
            event_with("\"did\":\"7\",\"ts\":9223372036854775807"),
            event_with("\"did\":\"7\",\"ts\":-9223372036854775808"),
        ],
        None,
        |good| {
            good.insert(0, event_with(&format!("\"did\":\"edge\",\"ts\":{MIN}")));
            good.push(event_with(&format!("\"did\":\"edge\",\"ts\":{}", END - 1)));
        },
    );
    assert!(c.stderr.contains("ts_out_of_range"));
}

#[test]
fn lines_without_device_id_are_skipped() {
    check_case(
        "missing_device_id",
        vec![
            event_with(&format!("\"ts\":{TS}")),
            event_with(&format!("\"did\":null,\"ts\":{TS}")),
            event_with(&format!("\"did\":\"\",\"ts\":{TS}")),
            event_with(&format!("\"DID\":\"7\",\"ts\":{TS}")),
        ],
    );
}

#[test]
fn lines_whose_device_id_is_not_a_string_or_integer_are_skipped() {
    check_case(
        "bad_device_id",
        vec![
            event_with(&format!("\"did\":true,\"ts\":{TS}")),
            event_with(&format!("\"did\":7.5,\"ts\":{TS}")),
            event_with(&format!("\"did\":1e3,\"ts\":{TS}")),
            event_with(&format!("\"did\":[7],\"ts\":{TS}")),
            event_with(&format!("\"did\":{{\"id\":7}},\"ts\":{TS}")),
        ],
    );
}

/// Raw control characters (NUL and friends) are invalid in JSON strings
/// and between tokens; tabs between tokens are whitespace and accepted.
#[test]
fn lines_with_nul_bytes_are_skipped() {
    let base = format!("{{\"did\":\"7\",\"ts\":{TS},\"page\":\"p1\",\"event\":\"view\"}}").into_bytes();
    check_case_with(
        "control_character",
        vec![
            replace(&base, "\"7\"", b"\"7\0\""),
            [b"\0".as_slice(), &base].concat(),
            [&base[..], b"\0"].concat(),
            replace(&base, ",\"ts\"", b",\0\"ts\""),
            replace(&base, "view", b"vi\0ew"),
            replace(&base, "view", b"vi\x01ew"),
            replace(&base, "view", b"vi\tew"), // a raw tab inside a string
        ],
        None,
        |good| {
            // Whitespace between tokens (spaces, tabs) is valid JSON.
            for i in (100..good.len()).step_by(997) {
                let spaced = replace(&good[i], ",\"ts\":", b" ,\t\"ts\" :\t");
                good[i] = [b" \t".as_slice(), &spaced, b"\t "].concat();
            }
        },
    );
}

/// Invalid UTF-8 anywhere in a line skips it; valid multi-byte text (in a
/// group-by value, in a device id) is counted like any other.
#[test]
fn lines_with_invalid_utf8_are_skipped() {
    let base = format!("{{\"did\":\"7\",\"ts\":{TS},\"page\":\"p1\",\"event\":\"view\"}}").into_bytes();
    check_case_with(
        "invalid_utf8",
        vec![
            replace(&base, "\"7\"", b"\"\xff\""),
            replace(&base, "p1", b"p\xc3"),               // truncated sequence
            replace(&base, "p1", b"\xc0\xaf"),            // overlong encoding
            replace(&base, "p1", b"\xed\xa0\x80"),        // UTF-16 surrogate
            replace(&base, "p1", b"p\x80"),               // lone continuation byte
            [&base[..], b"\xff".as_slice()].concat(),     // outside any string
            replace(&base, "}", b",\"net\":\"w\xfei\"}"), // in a field nobody reads
        ],
        None,
        |good| {
            for (k, i) in (50..good.len()).step_by(1009).enumerate() {
                let (page, did): (&[u8], &[u8]) = match k % 3 {
                    0 => ("página".as_bytes(), "設備-1".as_bytes()),
                    1 => ("首页".as_bytes(), "😀".as_bytes()),
                    _ => (b"p\\u00e9", b"\\u8bbe"), // escaped forms
                };
                let line = replace(&good[i], "\"page\":\"", &[b"\"page\":\"".as_slice(), page].concat());
                good[i] = replace(&line, "\"did\":", &[b"\"did\":\"".as_slice(), did, b"\",\"x\":"].concat());
            }
        },
    );
}

#[test]
fn empty_lines_are_skipped() {
    check_case("empty_line", vec![Vec::new(), Vec::new(), b"\r".to_vec(), Vec::new(), Vec::new()]);
}

/// CRLF line endings are accepted: nothing is skipped and the rows are
/// byte-identical to those of the same lines with LF endings.
#[test]
fn crlf_line_endings_are_accepted() {
    let dir = tempdir();
    let good = good_lines(dir.path());
    let (lf, crlf, mixed) =
        (dir.path().join("lf.jsonl"), dir.path().join("crlf.jsonl"), dir.path().join("mixed.jsonl"));
    write_lines(&lf, &good, b"\n");
    write_lines(&crlf, &good, b"\r\n");
    let mixed_lines: Vec<Vec<u8>> =
        good.iter().enumerate().map(|(i, l)| if i % 2 == 0 { [&l[..], b"\r"].concat() } else { l.clone() }).collect();
    write_lines(&mixed, &mixed_lines, b"\n");
    let jobs: Vec<JobFile> = [&lf, &crlf, &mixed]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            JobDef::new("jsonl", &[p.to_path_buf()])
                .metric(page_uv())
                .metric(platform_version())
                .write(dir.path(), &format!("job{i}"))
        })
        .collect();
    let runs = run_all(&[(&jobs[0], WORKERS), (&jobs[1], WORKERS), (&jobs[2], WORKERS)]);
    for r in &runs {
        let s = r.ok();
        assert_eq!(count(s, "rejected"), 0, "{s}");
        assert_eq!(count(s, "events"), good.len() as u64, "{s}");
    }
    let want = std::fs::read(&jobs[0].results).unwrap();
    assert!(!want.is_empty());
    for j in &jobs[1..] {
        assert!(std::fs::read(&j.results).unwrap() == want, "{} differs from the LF rows", j.results.display());
    }
    assert_verifies(&jobs[1], &jobs[1].results, "CRLF input");
}

/// With `max_line_bytes = 1024`, longer lines are skipped (a line of
/// exactly 1024 bytes is not), and the lines after them are read normally.
#[test]
fn lines_longer_than_max_line_bytes_are_skipped() {
    let padded = |n: usize, page: &str| -> Vec<u8> {
        let head = format!("{{\"did\":\"7\",\"ts\":{TS},\"page\":\"{page}\",\"event\":\"view\",\"pad\":\"");
        let fill = n - head.len() - 2;
        format!("{head}{}\"}}", "x".repeat(fill)).into_bytes()
    };
    check_case_with(
        "line_too_long",
        vec![
            padded(5_000, "p1"),
            padded(1_025, "p1"),
            padded(5_000, "p1"),
            padded(64 << 10, "p1"),
            padded(5_000, "p1"),
        ],
        Some(1024),
        |good| {
            // Exactly at the limit: accepted (and counted under its own page).
            let i = good.len() / 3;
            good.insert(i, padded(1_024, "exactly-1024"));
        },
    );
}

/// A 100 MB line under the default 1 MiB limit is skipped without being
/// held, whatever blocks it spans; lines before and after it count, and
/// line numbers after it are right.
#[test]
fn a_100_mb_line_is_skipped_under_the_default_limit() {
    let dir = tempdir();
    let good = good_lines(dir.path());
    let huge_line = |mb: usize| -> Vec<u8> {
        let head = format!("{{\"did\":\"7\",\"ts\":{TS},\"page\":\"p1\",\"event\":\"view\",\"pad\":\"");
        let mut l = Vec::with_capacity(mb << 20);
        l.extend_from_slice(head.as_bytes());
        l.resize((mb << 20) - 2, b'x');
        l.extend_from_slice(b"\"}");
        l
    };
    let (lines, numbers) = interleave(&good, &[huge_line(100), huge_line(2)]);
    let input = dir.path().join("events.jsonl");
    write_lines(&input, &lines, b"\n");
    assert!(std::fs::metadata(&input).unwrap().len() > 100 << 20);
    let job = job_for(dir.path(), &input, None);
    assert_skipped(dir.path(), &input, &lines, &numbers, "line_too_long", &job);
}

// ---------------------------------------------------------------------------
// Empty and missing inputs
// ---------------------------------------------------------------------------

#[test]
fn an_empty_input_file_gives_no_rows() {
    let dir = tempdir();
    let input = dir.path().join("empty.jsonl");
    std::fs::write(&input, b"").unwrap();
    let job = job_for(dir.path(), &input, None);
    let out = run(&job, WORKERS);
    let s = out.ok();
    for field in ["records", "events", "rejected", "rows"] {
        assert_eq!(count(s, field), 0, "{field}: {s}");
    }
    assert_eq!(std::fs::read(&job.results).expect("the results file is written, empty"), b"");
    assert_verifies(&job, &job.results, "empty input");
}

#[test]
fn a_missing_input_file_is_rejected_before_anything_runs() {
    let dir = tempdir();
    let missing = dir.path().join("no-such-events.jsonl");
    let job = job_for(dir.path(), &missing, None);
    let out = run(&job, WORKERS);
    assert_eq!(out.outcome.code, Some(2), "stderr:\n{}", out.outcome.stderr);
    assert!(
        out.outcome.stderr.contains(&missing.display().to_string()),
        "stderr names the file:\n{}",
        out.outcome.stderr
    );
    assert!(out.outcome.stderr.contains("source[0].path"), "stderr names the key:\n{}", out.outcome.stderr);
    assert!(!job.results.exists(), "nothing ran: no results file");
    assert!(out.summary.is_none(), "nothing ran: no summary");

    // A glob that matches nothing is the same mistake.
    let glob = JobDef::new("jsonl", &[dir.path().join("nothing-*.jsonl")]).metric(page_uv()).write(dir.path(), "glob");
    let out = run(&glob, WORKERS);
    assert_eq!(out.outcome.code, Some(2), "stderr:\n{}", out.outcome.stderr);
    assert!(out.outcome.stderr.contains("nothing-*.jsonl"), "stderr:\n{}", out.outcome.stderr);
    assert!(!glob.results.exists());
}

// ---------------------------------------------------------------------------
// Bad job files
// ---------------------------------------------------------------------------

/// Writes a valid job over a small CSV and JSON-lines input, applies `edit`
/// to its text, and checks that `tally run` and `tally verify` reject it
/// with exit 2 and every `expect`ed text (the key path, the bad value) on
/// stderr, before reading input or creating outputs.
fn assert_bad_job(format: &str, edit: impl Fn(String) -> String, expect: &[&str]) {
    let dir = tempdir();
    let input: PathBuf = match format {
        "csv" => {
            let p = dir.path().join("events.csv");
            std::fs::write(&p, format!("ts,did,page,event\n{TS},7,p1,view\n")).unwrap();
            p
        }
        _ => {
            let p = dir.path().join("events.jsonl");
            std::fs::write(&p, event_with(&format!("\"did\":\"7\",\"ts\":{TS}"))).unwrap();
            p
        }
    };
    let good = JobDef::new(format, &[input]).metric(page_uv()).write(dir.path(), "job");
    // The unedited job is fine.
    run(&good, 1).ok();
    std::fs::remove_dir_all(good.results.parent().unwrap()).unwrap();

    let text = std::fs::read_to_string(&good.path).unwrap();
    let edited = edit(text.clone());
    assert_ne!(edited, text, "the edit changed nothing");
    std::fs::write(&good.path, &edited).unwrap();
    let out = run(&good, 1);
    assert_eq!(out.outcome.code, Some(2), "exit code for job:\n{edited}\nstderr:\n{}", out.outcome.stderr);
    for e in expect {
        assert!(out.outcome.stderr.contains(e), "stderr does not name {e:?}:\n{}", out.outcome.stderr);
    }
    assert!(!good.results.exists() && !good.results.parent().unwrap().exists(), "the sink was created");
    assert!(out.summary.is_none(), "a summary was written");
    let v = verify(&good, &good.results);
    assert_eq!(v.code, Some(2), "tally verify with a bad job: {}{}", v.stdout, v.stderr);
}

#[test]
fn a_job_file_with_an_unknown_key_is_rejected() {
    assert_bad_job("jsonl", |t| t.replace("measures =", "colour = \"blue\"\nmeasures ="), &["metric[0].colour"]);
}

#[test]
fn a_job_file_with_a_bad_duration_is_rejected() {
    assert_bad_job(
        "jsonl",
        |t| t.replace("max_out_of_orderness = \"5m\"", "max_out_of_orderness = \"5 minutes\""),
        &["source[0].max_out_of_orderness", "5 minutes"],
    );
}

#[test]
fn a_job_file_with_an_unknown_metric_kind_is_rejected() {
    assert_bad_job("jsonl", |t| t.replace("kind = \"cumulate\"", "kind = \"median\""), &["metric[0].kind", "median"]);
}

#[test]
fn a_job_file_grouping_by_a_field_the_csv_source_lacks_is_rejected() {
    assert_bad_job(
        "csv",
        |t| t.replace("group_by = [\"page\"]", "group_by = [\"country\"]"),
        &["metric[0].group_by", "country"],
    );
}

// ---------------------------------------------------------------------------
// JSON that `tally run` and `tally verify` must read alike
//
// The engine's scanner promises to accept exactly what a strict JSON parser
// accepts (src/event/jsonl.rs); the referee reads lines with serde_json.
// Where they differ, a valid file fails `tally verify`, or a malformed line
// is counted.
// ---------------------------------------------------------------------------

/// Sets the value of `"page"` in every `step`-th good line from `from` on.
fn set_page(good: &mut [Vec<u8>], from: usize, step: usize, value: &[u8]) {
    for i in (from..good.len()).step_by(step) {
        let start = b"\"page\":\"";
        let at = good[i].windows(start.len()).position(|w| w == start).expect("a page");
        let end = at + start.len() + good[i][at + start.len()..].iter().position(|&b| b == b'"').unwrap() + 1;
        good[i] = [&good[i][..at], b"\"page\":", value, &good[i][end..]].concat();
    }
}

/// Malformed JSON inside an object or array value is still malformed: the
/// line is skipped, not counted.
#[test]
fn malformed_json_inside_nested_values_is_skipped() {
    let base = format!("{{\"did\":\"7\",\"ts\":{TS},\"page\":\"p1\",\"event\":\"view\"}}").into_bytes();
    check_case(
        "invalid_json",
        vec![
            replace(&base, "}", b",\"x\":[1,,2]}"),
            replace(&base, "}", b",\"x\":{]}"),
            replace(&base, "}", b",\"x\":{\"a\" 1}}"),
            replace(&base, "}", b",\"x\":[tru]}"),
            replace(&base, "}", b",\"x\":{\"a\":1,}}"),
            replace(&base, "}", b",\"x\":[1 2]}"),
        ],
    );
}

/// `\r` is JSON whitespace like space and tab: between tokens, and after
/// the object in a CRLF line.
#[test]
fn carriage_returns_between_tokens_are_json_whitespace() {
    check_case_with("", Vec::new(), None, |good| {
        for i in (10..good.len()).step_by(499) {
            good[i] = replace(&good[i], ",\"ts\":", b",\r\"ts\"\r:");
        }
        for i in (20..good.len()).step_by(503) {
            good[i] = [&good[i][..], b"\r\r"].concat(); // CRLF terminator plus trailing whitespace
        }
    });
}

/// `1e400` is a valid JSON number token that no double holds; serde_json
/// (and so `tally verify`) refuses such a line, and so must the engine,
/// which otherwise reads it as infinity and renders the key as `null`, the
/// same `dims` as a real null key: two rows with one (metric, window, dims).
#[test]
fn numbers_too_large_for_a_double_are_invalid_json() {
    let base = format!("{{\"did\":\"7\",\"ts\":{TS},\"page\":\"p1\",\"event\":\"view\"}}").into_bytes();
    check_case_with(
        "invalid_json",
        vec![
            replace(&base, "}", b",\"x\":1e400}"),
            replace(&base, "\"p1\"", b"1e400"),
            replace(&base, "\"p1\"", b"-1e400"),
        ],
        None,
        |good| set_page(good, 7, 1201, b"null"),
    );
}

/// `-0.0` and `0.0` are equal JSON numbers, so one group key (as SQL
/// groups them), which is how `tally verify` keys them.
#[test]
fn negative_zero_and_zero_are_one_group_key() {
    check_case_with("", Vec::new(), None, |good| {
        set_page(good, 3, 601, b"0.0");
        set_page(good, 5, 601, b"-0.0");
    });
}

/// `-0` (an integer token) as a device id or a group-by value must be read
/// the same way by the engine and by `tally verify` (today the engine keys
/// it as the integer 0 / device "-0", the referee as the float -0.0 and
/// skips it as a device id).
#[test]
fn minus_zero_integer_is_read_alike_by_run_and_verify() {
    // JSON parsers read `-0` as the float -0.0 (serde_json does): as a page it
    // is the key 0.0 (one key with `0.0`), as a device id it is not an integer
    // or a string, so the line is skipped as a bad device id.
    check_case_with(
        "bad_device_id",
        vec![event_with(&format!("\"did\":-0,\"ts\":{TS}")), event_with(&format!("\"ts\":{TS},\"did\":-0"))],
        None,
        |good| set_page(good, 3, 701, b"-0"),
    );
}

/// `max_line_bytes` bounds the line, not its terminator: a CRLF line whose
/// content is exactly the limit is read (as `tally verify` reads it).
#[test]
fn max_line_bytes_does_not_count_the_crlf_terminator() {
    let dir = tempdir();
    let mut good = good_lines(dir.path());
    let limit = good.iter().map(Vec::len).max().unwrap() + 10;
    for i in (4..good.len()).step_by(997) {
        let pad = limit - good[i].len() - ",\"pad\":\"\"".len();
        let tail = format!(",\"pad\":\"{}\"}}", "x".repeat(pad));
        good[i] = replace(&good[i], "}", tail.as_bytes());
        assert_eq!(good[i].len(), limit);
    }
    let input = dir.path().join("events.jsonl");
    write_lines(&input, &good, b"\r\n");
    let job = job_for(dir.path(), &input, Some(limit));
    assert_skipped(dir.path(), &input, &good, &[], "", &job);
}

//! `tally serve`: the job runs as `tally run` would, and an HTTP API on
//! 127.0.0.1 answers from its rows: the latest row of every key equals the
//! last row the file sink wrote for it (which `tally verify` checks against
//! the offline recomputation), `/metrics` counts what was written, bad
//! requests get 400/401/404 with a reason, SIGTERM ends it with exit 0.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::http::{enc, get, spawn_serve, wait_ready};
use crate::support::kafka::free_port;
use crate::support::*;

const TOKEN: &str = "t0ken";

/// The last row of each (metric, dims) in a results file.
fn last_rows(path: &std::path::Path) -> BTreeMap<(String, String), String> {
    let mut last = BTreeMap::new();
    for line in read_lines(path) {
        let line = String::from_utf8(line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        last.insert((v["metric"].as_str().unwrap().into(), v["dims"].to_string()), line);
    }
    last
}

fn serve_job(dir: &std::path::Path, port: u16) -> JobFile {
    let files = generate(&dir.join("data"), gen_options(60_000));
    let job = JobDef::new("jsonl", &files).metric(page_uv()).metric(platform_version()).write(dir, "job");
    let serve = format!("\n[serve]\nhttp = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n");
    fs::write(&job.path, fs::read_to_string(&job.path).unwrap() + &serve).unwrap();
    job
}

#[test]
fn serve_answers_the_latest_row_of_every_key_and_counts_what_it_wrote() {
    let tmp = tempdir();
    let dir = tmp.path();
    let port = free_port();
    let job = serve_job(dir, port);
    let child = spawn_serve(&job, &["--workers".as_ref(), "2".as_ref()]);
    // Ready once the input was read to its end.
    wait_ready(port);
    assert_eq!(get(port, "/healthz", None), (200, "ok\n".into()));
    assert_verifies(&job, &job.results, "the rows beside the API");

    // The last row the file got for each (metric, dims), as the API has it.
    let last = last_rows(&job.results);
    assert!(last.len() > 20, "keys to ask for: {}", last.len());
    for ((metric, dims), line) in &last {
        let path = format!("/api/v1/latest?metric={}&dims={}", enc(metric), enc(dims));
        assert_eq!(get(port, &path, Some(TOKEN)), (200, format!("{line}\n")), "{metric} {dims}");
    }

    // Status: the job's sources and metrics, as the API has them.
    let (status, body) = get(port, "/api/v1/status", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let st: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["ready"], Value::Bool(true), "{st}");
    assert_eq!(st["rows"].as_u64(), Some(read_lines(&job.results).len() as u64), "{st}");
    assert_eq!(st["sources"][0]["kind"], "file", "{st}");
    let page_keys = last.keys().filter(|(m, _)| m == "page_uv").count() as u64;
    assert_eq!(st["metrics"].as_array().unwrap().len(), 2, "{st}");
    assert!(st["metrics"].as_array().unwrap().iter().any(|m| m["name"] == "page_uv" && m["keys"] == page_keys), "{st}");
    assert_eq!(get(port, "/api/v1/status", None).0, 401);

    // Prometheus text: every sample line is `name{labels} value`.
    let (status, text) = get(port, "/metrics", Some(TOKEN));
    assert_eq!(status, 200);
    let mut samples: BTreeMap<String, f64> = BTreeMap::new();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample line: {l:?}"));
        samples.insert(name.to_string(), value.parse().unwrap_or_else(|_| panic!("not a number: {l:?}")));
    }
    assert_eq!(samples["tally_ready"], 1.0);
    // Every latest request above was timed (status ones and these too).
    let timed = samples["tally_api_request_duration_seconds_count{path=\"/api/v1/latest\"}"];
    assert_eq!(timed, last.len() as f64, "{text}");
    let under_1s = samples["tally_api_request_duration_seconds_bucket{path=\"/api/v1/latest\",le=\"+Inf\"}"];
    assert_eq!(under_1s, timed);
    assert_eq!(samples["tally_rows_total"], read_lines(&job.results).len() as f64);
    for metric in ["page_uv", "platform_version"] {
        let keys = last.keys().filter(|(m, _)| m == metric).count();
        assert_eq!(samples[&format!("tally_keys{{metric=\"{metric}\"}}")], keys as f64, "{metric}");
    }

    // Bad requests: the reason, never a crash.
    let (metric, dims) = last.keys().next().unwrap();
    let good = format!("/api/v1/latest?metric={}&dims={}", enc(metric), enc(dims));
    assert_eq!(get(port, &good, None).0, 401, "no token");
    assert_eq!(get(port, &good, Some("wrong")).0, 401, "wrong token");
    assert_eq!(get(port, "/metrics", None).0, 401, "metrics want the token too");
    for (path, status, says) in [
        ("/api/v1/latest".to_string(), 400, "`metric` is required"),
        (format!("/api/v1/latest?metric={}&dims=%7Bnot", enc(metric)), 400, "JSON object"),
        (format!("/api/v1/latest?metric={}&limit=3", enc(metric)), 400, "unknown parameter"),
        ("/api/v1/latest?metric=nope".to_string(), 404, "no metric"),
        (format!("/api/v1/latest?metric={}&dims=%7B%22x%22%3A1%7D", enc(metric)), 400, "no grouping"),
        (format!("/api/v1/latest?metric=page_uv&dims={}", enc(r#"{"page":"no-such-page"}"#)), 404, "no row"),
        (format!("/api/v1/latest?metric=page_uv&dims={}", enc(r#"{"page":[1]}"#)), 400, "a string, a number or null"),
        (format!("/api/v1/latest?metric=page_uv&dims={}", "x".repeat(9000)), 414, "longer than 8192 bytes"),
    ] {
        let (got, body) = get(port, &path, Some(TOKEN));
        assert!(got == status && body.contains(says), "{path}: {got} {body:?}");
    }
    // A request with a body (no endpoint reads one): refused unread.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = "x".repeat(1 << 20);
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body.as_bytes()); // the server may close before reading it all
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("at most 4096 bytes"), "{answer:?}");

    // SIGTERM: exit 0.
    child.stop();
}

#[test]
fn serve_refuses_an_address_it_cannot_listen_on_before_it_starts() {
    let tmp = tempdir();
    let dir = tmp.path();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let job = serve_job(dir, port);
    let out = tally([OsStr::new("serve"), OsStr::new("--job"), job.path.as_os_str()]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains(&format!("127.0.0.1:{port}")), "{}", out.stderr);
    assert!(!job.results.exists(), "nothing ran");

    let text = fs::read_to_string(&job.path).unwrap().replace(&format!("127.0.0.1:{port}"), "localhost");
    fs::write(&job.path, text).unwrap();
    let out = tally([OsStr::new("serve"), OsStr::new("--job"), job.path.as_os_str()]);
    assert!(out.code == Some(2) && out.stderr.contains("serve.http"), "{}", out.stderr);
}

/// With a Kafka source the run never ends: ready once every partition was
/// read to its end; the API then has, for every key, the last row the file
/// sink got (read after SIGTERM flushed it).
#[test]
fn serve_over_a_topic_is_ready_once_caught_up() {
    let tmp = tempdir();
    let dir = tmp.path();
    let port = free_port();
    let job = serve_job(dir, port);
    // Every key the job can have: the same job over the files.
    let out = tally([OsStr::new("run"), OsStr::new("--job"), job.path.as_os_str()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let keys: std::collections::BTreeSet<(String, String)> = read_values(&job.results)
        .iter()
        .map(|v| (v["metric"].as_str().unwrap().to_string(), v["dims"].to_string()))
        .collect();
    fs::remove_file(&job.results).unwrap();

    let broker = crate::support::kafka::Broker::start();
    let mut files: Vec<_> = fs::read_dir(dir.join("data")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let lines: Vec<Vec<u8>> = files.iter().flat_map(|f| read_lines(f)).collect();
    broker.produce_lines("events", 2, &lines, |_| None, |i, _| (i % 2) as i32);
    let text = fs::read_to_string(&job.path).unwrap();
    let start = text.find("kind = \"file\"").unwrap();
    let end = start + text[start..].find("\nformat").unwrap();
    let source = format!(
        "kind = \"kafka\"\nbrokers = \"{}\"\ntopic = \"events\"\ngroup_id = \"serve\"\nstart = \"earliest\"\n\
         properties = {{ \"session.timeout.ms\" = \"3000\", \"heartbeat.interval.ms\" = \"500\" }}\n",
        broker.addr
    );
    fs::write(&job.path, format!("{}{source}{}", &text[..start], &text[end + 1..])).unwrap();
    // A state directory: SIGTERM checkpoints and exits 0.
    let state = dir.join("state");
    let child = spawn_serve(&job, &["--state-dir".as_ref(), state.as_os_str()]);
    let started = Instant::now();
    wait_ready(port);
    // Read is not yet counted: wait until the rows stop coming.
    let rows_now = || {
        let (_, text) = get(port, "/metrics", Some(TOKEN));
        text.lines().find_map(|l| l.strip_prefix("tally_rows_total ")).and_then(|v| v.parse::<u64>().ok())
    };
    let (mut rows, mut same) = (u64::MAX, 0);
    while same < 3 {
        assert!(started.elapsed() < Duration::from_secs(90), "rows kept coming");
        std::thread::sleep(Duration::from_millis(300));
        let now = rows_now().unwrap_or(0);
        same = if now == rows && now > 0 { same + 1 } else { 0 };
        rows = now;
    }
    let answers: BTreeMap<(String, String), (u16, String)> = keys
        .iter()
        .map(|(metric, dims)| {
            let path = format!("/api/v1/latest?metric={}&dims={}", enc(metric), enc(dims));
            ((metric.clone(), dims.clone()), get(port, &path, Some(TOKEN)))
        })
        .collect();
    child.stop();

    assert_eq!(read_lines(&job.results).len() as u64, rows, "the rows the API counted");
    let last = last_rows(&job.results);
    assert!(last.len() > 20, "rows while the topic stays open: {}", last.len());
    for (key, answer) in &answers {
        match last.get(key) {
            Some(line) => assert_eq!(answer, &(200, format!("{line}\n")), "{key:?}"),
            None => assert_eq!(answer.0, 404, "{key:?}: no row written, yet {answer:?}"),
        }
    }
}

/// Day curves and top-N over a run killed right after its 2nd checkpoint
/// (as `kill -9`) and restarted: the API answers every minute of both days
/// with exactly the rows the file sink holds, no dip, no gap, no jump.
#[test]
fn curves_and_top_answer_every_minute_across_a_crash_and_restart() {
    curves_and_top_across_a_crash(true);
}

/// The same with rows to stdout only (as a daemon feeding Kafka or Redis):
/// nothing to read the rows back from but the checkpoint's own copy of the
/// API's store. The rows to compare with come from a `tally run` of the
/// same job.
#[test]
fn curves_survive_a_crash_without_a_file_sink() {
    curves_and_top_across_a_crash(false);
}

fn curves_and_top_across_a_crash(file_sink: bool) {
    let tmp = tempdir();
    let dir = tmp.path();
    let port = free_port();
    let files = generate(&dir.join("data"), gen_options(600_000));
    let job = JobDef::new("jsonl", &files)
        .metric(page_uv())
        .metric(platform_version())
        .job_line("checkpoint_interval = \"10ms\"")
        .write(dir, "job");
    let mut text = fs::read_to_string(&job.path).unwrap() + &format!("\n[serve]\nhttp = \"127.0.0.1:{port}\"\n");
    if !file_sink {
        run(&job, 2).ok(); // the reference rows, in job.results
        let path = format!("path = {}", toml_str(&job.results.to_string_lossy()));
        assert!(text.contains(&path), "{text}");
        text = text.replace(&path, "path = \"-\"");
    }
    fs::write(&job.path, text).unwrap();
    let state = dir.join("state");
    // `timeout`: a daemon that did not crash would serve forever.
    let crashed = std::process::Command::new("timeout")
        .args([OsStr::new("60"), OsStr::new(TALLY), OsStr::new("serve"), OsStr::new("--workers"), OsStr::new("2")])
        .args([OsStr::new("--job"), job.path.as_os_str(), OsStr::new("--state-dir"), state.as_os_str()])
        .env("TALLY_CRASH_AT", "renamed:2")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&crashed.stderr);
    assert!(!crashed.status.success() && log.contains("TALLY_CRASH_AT"), "no crash at checkpoint 2: {log}");
    let child = spawn_serve(&job, &["--workers".as_ref(), "2".as_ref(), "--state-dir".as_ref(), state.as_os_str()]);
    wait_ready(port);
    assert_verifies(&job, &job.results, "the rows");

    // Every key's rows in the file, by local day of their window.
    let mut by_key: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for v in read_values(&job.results) {
        by_key.entry((v["metric"].as_str().unwrap().into(), v["dims"].to_string())).or_default().push(v);
    }
    let day = |end: i64| (end - 1 + TZ_OFFSET_MS).div_euclid(DAY_MS);
    let newest = by_key.values().flatten().map(|v| day(v["window_end"].as_i64().unwrap())).max().unwrap();
    let mut checked = 0;
    for ((metric, dims), rows) in &by_key {
        for (which, d) in [("latest", newest), ("previous", newest - 1)] {
            let want: Vec<(i64, u64, u64)> = rows
                .iter()
                .filter(|v| day(v["window_end"].as_i64().unwrap()) == d)
                .map(|v| (v["window_end"].as_i64().unwrap(), count(v, "pv"), count(v, "uv")))
                .collect();
            let path = format!("/api/v1/curve?metric={}&dims={}&day={which}", enc(metric), enc(dims));
            let (status, body) = get(port, &path, None);
            assert_eq!(status, 200, "{path}: {body}");
            let c: Value = serde_json::from_str(&body).unwrap();
            let got: Vec<(i64, u64, u64)> = c["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p["window_end"].as_i64().unwrap(), count(p, "pv"), count(p, "uv")))
                .collect();
            assert_eq!(got, want, "{metric} {dims} {which}");
            checked += got.len();
        }
    }
    assert!(checked > 10_000, "points checked: {checked}");

    // Top 5 pages by uv at the newest window end, ties by dims text.
    let end = by_key.values().flatten().map(|v| v["window_end"].as_i64().unwrap()).max().unwrap();
    let mut at_end: Vec<(u64, String)> = by_key
        .iter()
        .filter(|((m, _), _)| m == "page_uv")
        .filter_map(|((_, dims), rows)| {
            let last = rows.last().unwrap();
            (last["window_end"].as_i64() == Some(end)).then(|| (count(last, "uv"), dims.clone()))
        })
        .collect();
    at_end.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let (status, body) = get(port, "/api/v1/top?metric=page_uv&by=uv&n=5", None);
    assert_eq!(status, 200, "{body}");
    let top: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(top["window_end"].as_i64(), Some(end));
    let got: Vec<(u64, String)> =
        top["rows"].as_array().unwrap().iter().map(|r| (count(r, "uv"), r["dims"].to_string())).collect();
    assert_eq!(got, at_end[..5].to_vec());
    for (path, status) in [
        ("/api/v1/top?metric=page_uv&by=nope", 400),
        ("/api/v1/top?metric=page_uv", 400),
        ("/api/v1/top?metric=page_uv&by=uv&n=0", 400),
        ("/api/v1/top?metric=page_uv&by=uv&group_by=platform", 400),
        ("/api/v1/curve?metric=page_uv&dims=%7B%22page%22%3A%22p1%22%7D&day=2001-01-01", 404),
        ("/api/v1/curve?metric=page_uv&dims=%7B%22page%22%3A%22p1%22%7D&day=yesterday", 400),
        ("/api/v1/curve?metric=page_uv&dims=%7B%7D", 400),
    ] {
        assert_eq!(get(port, path, None).0, status, "{path}");
    }
    child.stop();
}

/// Hot standby: two daemons with the same job over the same topic (each
/// its own consumer group, state and outputs) write the same rows, and
/// their APIs answer alike, so readers can switch from one to the other.
#[test]
fn two_daemons_over_one_topic_write_the_same_rows() {
    let tmp = tempdir();
    let dir = tmp.path();
    let broker = crate::support::kafka::Broker::start();
    let files = generate(&dir.join("data"), gen_options(60_000));
    let lines: Vec<Vec<u8>> = files.iter().flat_map(|f| read_lines(f)).collect();
    broker.produce_lines("events", 2, &lines, |_| None, |i, _| (i % 2) as i32);
    let reference = JobDef::new("jsonl", &files).metric(page_uv()).metric(platform_version()).write(dir, "files");
    let mut daemons = Vec::new();
    for i in 0..2 {
        let port = free_port();
        let job =
            JobDef::new("jsonl", &files).metric(page_uv()).metric(platform_version()).write(dir, &format!("d{i}"));
        let text = fs::read_to_string(&job.path).unwrap();
        let start = text.find("kind = \"file\"").unwrap();
        let end = start + text[start..].find("\nformat").unwrap();
        let source = format!(
            "kind = \"kafka\"\nbrokers = \"{}\"\ntopic = \"events\"\ngroup_id = \"standby-{i}\"\nstart = \"earliest\"\n\
             stop = \"caught_up\"\nproperties = {{ \"session.timeout.ms\" = \"3000\", \"heartbeat.interval.ms\" = \"500\" }}\n",
            broker.addr
        );
        let serve = format!("\n[serve]\nhttp = \"127.0.0.1:{port}\"\n");
        fs::write(&job.path, format!("{}{source}{}{serve}", &text[..start], &text[end + 1..])).unwrap();
        let state = dir.join(format!("state{i}"));
        daemons.push((port, job.clone(), spawn_serve(&job, &["--state-dir".as_ref(), state.as_os_str()])));
    }
    // A job's rows so far, sorted.
    let rows_of = |job: &JobFile| {
        let mut rows: Vec<Vec<u8>> = if job.results.exists() { read_lines(&job.results) } else { Vec::new() };
        rows.sort();
        rows
    };
    // Both read the topic to its end and flushed every window: as many
    // rows as the same job over the files.
    let out = tally([OsStr::new("run"), OsStr::new("--job"), reference.path.as_os_str()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let want = read_lines(&reference.results).len();
    let started = Instant::now();
    for (port, job, _) in &daemons {
        wait_ready(*port);
        while rows_of(job).len() < want {
            assert!(started.elapsed() < Duration::from_secs(90), "{} of {want} rows", rows_of(job).len());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The same latest row from either API.
    let last = last_rows(&daemons[0].1.results);
    for (metric, dims) in last.keys().take(20) {
        let path = format!("/api/v1/latest?metric={}&dims={}", enc(metric), enc(dims));
        assert_eq!(get(daemons[0].0, &path, None), get(daemons[1].0, &path, None), "{path}");
    }
    let (a, b) = (daemons[0].1.clone(), daemons[1].1.clone());
    for (_, _, d) in daemons {
        d.stop();
    }
    assert!(!rows_of(&a).is_empty());
    assert_eq!(rows_of(&a), rows_of(&b), "the standby's rows");
    assert_eq!(rows_of(&a), rows_of(&reference), "the rows of the job over the files (verified offline elsewhere)");
    assert_verifies(&reference, &a.results, "the daemons' rows");
}

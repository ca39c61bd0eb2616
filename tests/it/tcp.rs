//! TCP sources under `tally serve`: clients stream JSON lines, each
//! connection a partition with its own watermark. What the daemon writes
//! equals the rows of the same job over the same events as a file (which
//! `tally verify` checks offline), SIGTERM hands over everything received
//! before the last checkpoint, bad clients are closed with the reason
//! logged while the others lose nothing, and idle connections stop holding
//! the watermark back after `idle_timeout`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tally::gen::GenScenario;

use crate::support::http::{get, spawn_serve, wait_ready};
use crate::support::kafka::free_port;
use crate::support::*;

/// The file job's rows (checked by `tally verify`) and its input.
struct Reference {
    files: Vec<PathBuf>,
    opts: GenOptions,
    def: JobDef,
    rows: BTreeMap<(String, i64, String), String>,
    events: u64,
    bytes: u64,
}

fn reference(dir: &Path, events: u64) -> Reference {
    reference_in(dir, events, GenFormat::Jsonl, "jsonl")
}

fn reference_in(dir: &Path, events: u64, format: GenFormat, name: &str) -> Reference {
    let opts = GenOptions { format, ..gen_options(events) };
    let files = generate(&dir.join("data"), opts.clone());
    let views = if format == GenFormat::Binary { page_uv_binary() } else { page_uv() };
    let def = JobDef::new(name, &files).metric(views).metric(platform_version());
    let job = def.write(dir, "files");
    let out = run(&job, 2);
    assert_verifies(&job, &job.results, "the file run");
    Reference {
        bytes: files.iter().map(|f| fs::metadata(f).unwrap().len()).sum(),
        events: count(&out.ok()["sources"][0], "events"),
        rows: keyed_rows(&job.results),
        files,
        opts,
        def,
    }
}

/// Rows by (metric, window end, dims).
fn keyed_rows(path: &Path) -> BTreeMap<(String, i64, String), String> {
    let mut rows = BTreeMap::new();
    for line in read_lines(path) {
        let line = String::from_utf8(line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        let key = (v["metric"].as_str().unwrap().to_string(), v["window_end"].as_i64().unwrap(), v["dims"].to_string());
        assert!(rows.insert(key, line.clone()).is_none(), "one row per key: {line}");
    }
    rows
}

/// The reference job with its source read from TCP `port` (more source
/// lines in `extra`) and the API on `http`.
fn tcp_job(dir: &Path, def: &JobDef, port: u16, http: u16, extra: &str) -> JobFile {
    let job = def.write(dir, "tcp");
    let text = fs::read_to_string(&job.path).unwrap();
    let start = text.find("kind = \"file\"").unwrap();
    let end = start + text[start..].find("\nformat").unwrap();
    let source = format!("kind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\n{extra}");
    let serve = format!("\n[serve]\nhttp = \"127.0.0.1:{http}\"\n");
    fs::write(&job.path, format!("{}{source}{}{serve}", &text[..start], &text[end + 1..])).unwrap();
    job
}

/// Prometheus samples by `name{labels}`.
fn samples(http: u16) -> BTreeMap<String, f64> {
    let (status, text) = get(http, "/metrics", None);
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample line: {l:?}"));
            (name.to_string(), value.parse().unwrap_or_else(|_| panic!("not a number: {l:?}")))
        })
        .collect()
}

fn tcp_sample(http: u16, family: &str) -> f64 {
    samples(http)[&format!("{family}{{source=\"client\"}}")]
}

/// Waits until the source has accepted `n` connections that are open.
fn wait_connections(http: u16, n: u64) {
    let started = Instant::now();
    while (tcp_sample(http, "tally_tcp_connections") as u64) < n {
        assert!(started.elapsed() < Duration::from_secs(30), "{:?}", samples(http));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the source received `bytes`, has `open` connections and
/// the rows stopped coming.
fn wait_settled(http: u16, bytes: u64, open: u64) {
    let started = Instant::now();
    let (mut rows, mut same) = (u64::MAX, 0);
    while same < 3 {
        assert!(started.elapsed() < Duration::from_secs(90), "never settled: {:?}", samples(http));
        std::thread::sleep(Duration::from_millis(300));
        let s = samples(http);
        let received = s["tally_tcp_received_bytes_total{source=\"client\"}"] as u64;
        let connections = s["tally_tcp_connections{source=\"client\"}"] as u64;
        let now = s["tally_rows_total"] as u64;
        same = if received == bytes && connections == open && now == rows && now > 0 { same + 1 } else { 0 };
        rows = now;
    }
}

/// Every row the daemon wrote is the file run's row of that key, and it
/// wrote every file row up to its last window end (no gap).
fn assert_rows_within(results: &Path, r: &Reference) {
    let got = keyed_rows(results);
    assert!(got.len() * 2 > r.rows.len(), "rows: {} of {}", got.len(), r.rows.len());
    for (key, line) in &got {
        assert_eq!(Some(line), r.rows.get(key), "{key:?}");
    }
    let last = got.keys().map(|k| k.1).max().unwrap();
    let gaps: Vec<_> = r.rows.keys().filter(|k| k.1 <= last && !got.contains_key(*k)).take(5).collect();
    assert!(gaps.is_empty(), "rows up to {last} not written: {gaps:?}");
}

#[test]
fn a_tcp_source_fed_by_the_generator_writes_the_file_rows_and_closes_only_bad_clients() {
    let tmp = tempdir();
    let dir = tmp.path();
    let r = reference(dir, 120_000);
    let (port, http) = (free_port(), free_port());
    let job = tcp_job(dir, &r.def, port, http, "");
    let state = dir.join("state");
    let child = spawn_serve(
        &job,
        &[
            "--workers".as_ref(),
            "2".as_ref(),
            "--state-dir".as_ref(),
            state.as_os_str(),
            "--summary".as_ref(),
            job.summary.as_os_str(),
        ],
    );
    wait_ready(http);

    // A client sending garbage, a line without its device id and no
    // newline at the end: its lines are counted and skipped.
    let garbage = b"not json\n{\"ts\":\n\x00\xff\xfe\n\n{\"ts\":1771171200000,\"page\":\"p1\"}";
    let mut bad = TcpStream::connect(("127.0.0.1", port)).unwrap();
    bad.write_all(garbage).unwrap();
    drop(bad);
    // A client sending a 100 MB line: closed after max_line_bytes (1 MiB).
    let long = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let chunk = vec![b'x'; 1 << 20];
        let mut sent = 0usize;
        for _ in 0..100 {
            match s.write_all(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(_) => break, // tally closed it
            }
        }
        sent
    });
    // The generator: the file's events on 4 connections at once.
    let sent = tally::gen::generate(&GenOptions {
        to: Some(format!("tcp://127.0.0.1:{port}")),
        connections: 4,
        out: dir.join("unused"),
        ..r.opts.clone()
    })
    .unwrap();
    assert_eq!(sent.bytes, r.bytes, "the generator sends the file's bytes");
    let long_sent = long.join().unwrap();
    assert!(long_sent < 100 << 20, "the long line was cut off, {long_sent} bytes sent");

    let garbage_received = garbage.len() as u64;
    let started = Instant::now();
    while tcp_sample(http, "tally_tcp_connections") > 0.0 {
        assert!(started.elapsed() < Duration::from_secs(60), "{:?}", samples(http));
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = samples(http);
    let received = s["tally_tcp_received_bytes_total{source=\"client\"}"] as u64;
    assert!(received > r.bytes + garbage_received, "{s:?}");
    let long_received = received - r.bytes - garbage_received;
    assert!((1 << 20..100 << 20).contains(&long_received), "{long_received} bytes of the long line read");
    wait_settled(http, received, 0);
    let s = samples(http);
    assert_eq!(s["tally_tcp_connections_accepted_total{source=\"client\"}"], 6.0, "{s:?}");
    assert_eq!(s["tally_tcp_connections_closed_bad_total{source=\"client\"}"], 1.0, "{s:?}");
    // The watermark: every connection closed, so the largest event time
    // seen less the bound; the data delay is now less that.
    let max_ts = r
        .files
        .iter()
        .flat_map(|f| read_lines(f))
        .map(|l| serde_json::from_slice::<Value>(&l).unwrap()["ts"].as_i64().unwrap())
        .max()
        .unwrap();
    let wm = (max_ts - 5 * MINUTE_MS) as f64 / 1e3;
    assert_eq!(s["tally_watermark_seconds"], wm, "{s:?}");
    assert_eq!(s["tally_source_watermark_seconds{source=\"client\"}"], wm, "{s:?}");
    assert!(s["tally_data_delay_seconds"] > 0.0 && s["tally_source_queued_blocks{source=\"client\"}"] == 0.0, "{s:?}");
    for shard in ["0", "1"] {
        let g = |name: &str| s[&format!("tally_shard_{name}{{shard=\"{shard}\"}}")];
        assert!(g("state_bytes") > 0.0 && g("dedup_entries") > 0.0 && g("queued_batches") == 0.0, "{s:?}");
    }
    // The live counters say what the summary will, as Prometheus's own
    // parser reads them.
    let s = prometheus_samples(http);
    assert_eq!(s["tally_events_total{source=\"client\"}"], r.events as f64, "{s:?}");
    assert_eq!(s["tally_records_total{source=\"client\"}"], (r.events + 6) as f64, "{s:?}");
    assert_eq!(s["tally_event_lateness_seconds_count{source=\"client\"}"], r.events as f64, "{s:?}");
    assert_eq!(s["tally_tcp_received_bytes_total{source=\"client\"}"], received as f64, "{s:?}");
    let reasons =
        ["empty_line", "line_too_long", "missing_device_id", "invalid_json", "not_an_object", "control_character"];
    for reason in reasons {
        let n = s[&format!("tally_records_rejected_total{{reason=\"{reason}\",source=\"client\"}}")];
        assert_eq!(n, 1.0, "{reason}: {s:?}");
    }
    let log = child.stop();
    assert!(
        log.contains("closed the connection from 127.0.0.1:") && log.contains("longer than max_line_bytes"),
        "{log}"
    );

    // Everything received was counted before the last checkpoint.
    let summary: Value = serde_json::from_str(&fs::read_to_string(&job.summary).unwrap()).unwrap();
    let src = source_report(&summary, 0);
    assert_eq!(count(src, "events"), r.events, "{src}");
    assert_eq!(count(src, "rejected"), 6, "5 bad lines and the long one: {src}");
    for reason in reasons {
        assert_eq!(src["rejected_by_reason"][reason], 1, "{reason}: {src}");
    }
    assert_rows_within(&job.results, &r);
}

#[test]
fn a_thousand_idle_connections_hold_the_watermark_only_until_idle_timeout() {
    let tmp = tempdir();
    let dir = tmp.path();
    let r = reference(dir, 60_000);
    let (port, http) = (free_port(), free_port());
    let job = tcp_job(dir, &r.def, port, http, "idle_timeout = \"1s\"\nmax_connections = 1001\n");
    let state = dir.join("state");
    let child =
        spawn_serve(&job, &["--state-dir".as_ref(), state.as_os_str(), "--summary".as_ref(), job.summary.as_os_str()]);
    wait_ready(http);
    let idle: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    wait_connections(http, 1000);
    // One connection more streams the events; one beyond that is refused.
    let mut sending = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut refused = TcpStream::connect(("127.0.0.1", port)).unwrap();
    refused.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(refused.read(&mut [0u8; 16]).ok(), Some(0), "closed at once");
    for f in &r.files {
        sending.write_all(&fs::read(f).unwrap()).unwrap();
    }
    drop(sending);
    wait_settled(http, r.bytes, 1000);
    let s = samples(http);
    assert_eq!(s["tally_tcp_connections_refused_total{source=\"client\"}"], 1.0, "{s:?}");
    let log = child.stop();
    assert!(log.contains("max_connections"), "{log}");
    drop(idle);
    let summary: Value = serde_json::from_str(&fs::read_to_string(&job.summary).unwrap()).unwrap();
    assert_eq!(count(source_report(&summary, 0), "events"), r.events);
    // Rows came while 1000 silent connections stayed open.
    assert_rows_within(&job.results, &r);
}

#[test]
fn tcp_source_settings_are_checked_at_load() {
    let tmp = tempdir();
    let dir = tmp.path();
    let def = JobDef::new("jsonl", &[dir.join("none.jsonl")]).metric(page_uv());
    for (extra, says) in [
        ("", ""),
        ("max_connections = 0\n", "source[0].max_connections"),
        ("idle_timeout = \"soon\"\n", "source[0].idle_timeout"),
        ("topic = \"t\"\n", "source[0].topic"),
    ] {
        let job = tcp_job(dir, &def, 1, 2, extra);
        let out = if says.is_empty() {
            let args = ["verify", "--job", &job.path.to_string_lossy(), "--results", &job.path.to_string_lossy()];
            tally(args.map(|a| a.to_string()))
        } else {
            tally([OsStr::new("run"), OsStr::new("--job"), job.path.as_os_str()])
        };
        if says.is_empty() {
            assert!(out.stderr.contains("TCP socket"), "verify explains it cannot re-read TCP: {}", out.stderr);
        } else {
            assert!(out.code == Some(2) && out.stderr.contains(says), "{extra}: {}", out.stderr);
        }
    }
    let job = tcp_job(dir, &def, 1, 2, "");
    let text = fs::read_to_string(&job.path).unwrap().replace("127.0.0.1:1\"", "nowhere\"");
    fs::write(&job.path, text).unwrap();
    let out = tally([OsStr::new("run"), OsStr::new("--job"), job.path.as_os_str()]);
    assert!(out.code == Some(2) && out.stderr.contains("source[0].listen"), "{}", out.stderr);
}

/// SIGTERM while a client streams: every complete line received is in the
/// last checkpoint; the client sends the rest to the restarted daemon and
/// the rows are the file run's, none twice.
#[test]
fn a_stop_mid_stream_keeps_every_line_received_and_a_restart_goes_on() {
    let tmp = tempdir();
    let dir = tmp.path();
    let r = reference(dir, 200_000);
    let input: Vec<u8> = r.files.iter().flat_map(|f| fs::read(f).unwrap()).collect();
    let (port, http) = (free_port(), free_port());
    let job = tcp_job(dir, &r.def, port, http, "");
    let state = dir.join("state");
    let args = ["--state-dir".as_ref(), state.as_os_str(), "--summary".as_ref(), job.summary.as_os_str()];
    let child = spawn_serve(&job, &args);
    wait_ready(http);
    let first = input.clone();
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        for piece in first.chunks(64 << 10) {
            if s.write_all(piece).is_err() {
                return; // the daemon stopped
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let started = Instant::now();
    while tcp_sample(http, "tally_tcp_received_bytes_total") < 4e6 {
        assert!(started.elapsed() < Duration::from_secs(60), "{:?}", samples(http));
        std::thread::sleep(Duration::from_millis(20));
    }
    child.stop();
    client.join().unwrap();
    let summary: Value = serde_json::from_str(&fs::read_to_string(&job.summary).unwrap()).unwrap();
    let src = source_report(&summary, 0);
    let received = src["tcp"]["received_bytes"].as_u64().unwrap() as usize;
    assert!(received < input.len(), "stopped mid-stream: {src}");
    let lines = input[..received].iter().filter(|&&b| b == b'\n').count();
    assert_eq!(count(src, "records") as usize, lines, "every complete line received was counted");

    // The rest, from the first line not counted, to the restarted daemon.
    let from = input.iter().enumerate().filter(|(_, &b)| b == b'\n').nth(lines - 1).unwrap().0 + 1;
    let child = spawn_serve(&job, &args);
    wait_ready(http);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&input[from..]).unwrap();
    drop(s);
    wait_settled(http, (input.len() - from) as u64, 0);
    child.stop();
    let summary: Value = serde_json::from_str(&fs::read_to_string(&job.summary).unwrap()).unwrap();
    assert_eq!(count(source_report(&summary, 0), "events"), r.events, "over both runs");
    assert_rows_within(&job.results, &r);
}

/// `max_events_per_second`: the reader never hands on more than the rate
/// allows (plus its 0.1 s burst and one read), however fast the client
/// sends; every event arrives in the end.
#[test]
fn max_events_per_second_holds_a_fast_client_back() {
    let tmp = tempdir();
    let dir = tmp.path();
    let r = reference(dir, 30_000);
    let (port, http) = (free_port(), free_port());
    let rate = 10_000.0;
    let job = tcp_job(dir, &r.def, port, http, "max_events_per_second = 10000\n");
    let state = dir.join("state");
    let child =
        spawn_serve(&job, &["--state-dir".as_ref(), state.as_os_str(), "--summary".as_ref(), job.summary.as_os_str()]);
    wait_ready(http);
    let input: Vec<u8> = r.files.iter().flat_map(|f| fs::read(f).unwrap()).collect();
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&input).unwrap();
    });
    loop {
        let s = samples(http);
        // Read before the clock: the bound below can only be generous.
        let records = s["tally_records_total{source=\"client\"}"];
        // The rate, its burst, and one read (256 KiB of lines) taken on debt.
        let read = (256 << 10) as f64 / (r.bytes as f64 / r.events as f64);
        let allowed = rate * (started.elapsed().as_secs_f64() + 0.1) + rate * 0.1 + read;
        assert!(records <= allowed, "{records} records handed on, {allowed} allowed");
        if records as u64 >= r.events {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    sender.join().unwrap();
    assert!(tcp_sample(http, "tally_throttled_seconds_total") > 1.0, "{:?}", samples(http));
    child.stop();
    let summary: Value = serde_json::from_str(&fs::read_to_string(&job.summary).unwrap()).unwrap();
    assert_eq!(count(source_report(&summary, 0), "events"), r.events);
}

/// The dashboard in headless Chromium (scripts/dashboard_probe.py, the
/// DevTools protocol): the page loads without console errors and its curve
/// gains points as events arrive.
#[test]
fn the_dashboard_curve_gains_points_as_events_arrive() {
    use std::io::BufRead;
    let tmp = tempdir();
    let dir = tmp.path();
    let r = reference(dir, 60_000);
    let (port, http) = (free_port(), free_port());
    let job = tcp_job(dir, &r.def, port, http, "");
    let state = dir.join("state");
    let child = spawn_serve(&job, &["--state-dir".as_ref(), state.as_os_str()]);
    wait_ready(http);
    let input: Vec<u8> = r.files.iter().flat_map(|f| fs::read(f).unwrap()).collect();
    let half = input[..input.len() / 2].iter().rposition(|&b| b == b'\n').unwrap() + 1;
    let send = |bytes: &[u8]| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(bytes).unwrap();
    };
    send(&input[..half]);
    let shot = dir.join("dashboard.png");
    let probe = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dashboard_probe.py"))
        .arg(format!("http://127.0.0.1:{http}/"))
        .arg("20")
        .arg("--screenshot")
        .arg(&shot)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut probe = crate::support::http::Reaped(probe);
    let lines = std::io::BufReader::new(probe.0.stdout.take().unwrap()).lines();
    let (mut first, mut grew) = (None, false);
    for line in lines {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        assert_eq!(v["errors"], Value::Array(vec![]), "console errors: {v}");
        let points: u64 = v["points"].as_array().map_or(0, |p| p.iter().map(|n| n.as_u64().unwrap()).sum());
        match first {
            None if points > 0 => {
                first = Some(points);
                send(&input[half..]); // the rest of the day
            }
            Some(f) if points > f => grew = true,
            _ => {}
        }
    }
    assert!(probe.0.wait().unwrap().success(), "the probe failed");
    assert!(first.is_some() && grew, "points: first {first:?}, grew {grew}");
    assert!(fs::metadata(&shot).unwrap().len() > 1000, "a screenshot");
    child.stop();
}

/// A followed file (`follow = true`, like `tail -F`): lines appended while
/// the daemon runs are read, a restart goes on from the checkpoint's
/// offset (nothing twice), a rotation (rename, new file) loses nothing, and
/// the rows are the file run's.
#[test]
fn a_followed_file_is_read_across_appends_a_restart_and_a_rotation() {
    let tmp = tempdir();
    let dir = tmp.path();
    let r = reference(dir, 60_000);
    let input: Vec<u8> = r.files.iter().flat_map(|f| fs::read(f).unwrap()).collect();
    let cut = |k: usize| input[..input.len() * k / 3].iter().rposition(|&b| b == b'\n').unwrap() + 1;
    let (a, b) = (cut(1), cut(2));
    let live = dir.join("live");
    fs::create_dir_all(&live).unwrap();
    let path = live.join("events.jsonl");
    fs::write(&path, &input[..a]).unwrap();
    let http = free_port();
    let mut def = r.def.clone();
    def.sources[0].paths = vec![path.clone()];
    let job = def.write(dir, "follow");
    let text = fs::read_to_string(&job.path)
        .unwrap()
        .replace("format = \"jsonl\"", "format = \"jsonl\"\nfollow = true\nidle_timeout = \"1s\"");
    fs::write(&job.path, format!("{text}\n[serve]\nhttp = \"127.0.0.1:{http}\"\n")).unwrap();
    let state = dir.join("state");
    let args = ["--state-dir".as_ref(), state.as_os_str(), "--summary".as_ref(), job.summary.as_os_str()];
    let lines = |bytes: &[u8]| bytes.iter().filter(|&&c| c == b'\n').count() as f64;
    let wait_records = |n: f64| {
        let started = Instant::now();
        while samples(http).get("tally_records_total{source=\"client\"}").copied().unwrap_or(0.0) < n {
            assert!(started.elapsed() < Duration::from_secs(60), "{:?}", samples(http));
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let child = spawn_serve(&job, &args);
    wait_ready(http);
    wait_records(lines(&input[..a]));
    // Appended while running.
    fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(&input[a..b]).unwrap();
    wait_records(lines(&input[..b]));
    child.stop();

    // Restarted: from the checkpoint's offset; then the file is rotated
    // (renamed, a new one created) with the last third in the new one.
    let child = spawn_serve(&job, &args);
    wait_ready(http);
    fs::rename(&path, live.join("events.jsonl.1")).unwrap();
    fs::write(&path, &input[b..]).unwrap();
    wait_records(lines(&input[b..]));
    std::thread::sleep(Duration::from_secs(2)); // past idle_timeout: the last windows close
    child.stop();
    let summary: Value = serde_json::from_str(&fs::read_to_string(&job.summary).unwrap()).unwrap();
    let src = source_report(&summary, 0);
    assert_eq!(count(src, "events"), r.events, "every line once, over both runs: {src}");
    assert_rows_within(&job.results, &r);
}

/// Binary records over TCP: records cut across reads and connections'
/// writes of any size are put back together; the rows are the file run's.
#[test]
fn binary_records_over_tcp_are_put_back_together_across_reads() {
    let tmp = tempdir();
    let dir = tmp.path();
    let r = reference_in(dir, 60_000, GenFormat::Binary, "binary");
    let (port, http) = (free_port(), free_port());
    let job = tcp_job(dir, &r.def, port, http, "");
    let state = dir.join("state");
    let child =
        spawn_serve(&job, &["--state-dir".as_ref(), state.as_os_str(), "--summary".as_ref(), job.summary.as_os_str()]);
    wait_ready(http);
    let input: Vec<u8> = r.files.iter().flat_map(|f| fs::read(f).unwrap()).collect();
    let half = input.len() / 64 * 32;
    // Both connected before either sends: a connection that closed while
    // none other was open lets the windows close (every event seen is
    // in), and the other's earlier events would then be late.
    let socks: Vec<_> = (0..2).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    wait_connections(http, 2);
    let senders: Vec<_> = [input[..half].to_vec(), input[half..].to_vec()]
        .into_iter()
        .zip(socks)
        .map(|(part, mut s)| {
            std::thread::spawn(move || {
                for piece in part.chunks(1000) {
                    s.write_all(piece).unwrap(); // 1000 = 31 records and a bit
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    wait_settled(http, r.bytes, 0);
    child.stop();
    let summary: Value = serde_json::from_str(&fs::read_to_string(&job.summary).unwrap()).unwrap();
    let src = source_report(&summary, 0);
    assert_eq!((count(src, "events"), count(src, "rejected")), (r.events, 0), "{src}");
    assert_rows_within(&job.results, &r);
}

/// `/metrics` as the Prometheus project's parser reads it
/// (scripts/prom_check.py: prometheus_client, plus the TYPE/HELP and
/// histogram consistency a scraper relies on), by `name{labels}` with
/// labels sorted.
fn prometheus_samples(http: u16) -> BTreeMap<String, f64> {
    let (status, text) = get(http, "/metrics", None);
    assert_eq!(status, 200, "{text}");
    let mut check = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/prom_check.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "/metrics does not pass the Prometheus parser: {said}\n{text}");
    serde_json::from_str(&said).unwrap()
}

/// Upper bounds (ms) of the lateness buckets as the README documents them.
const LATENESS_LE_MS: [i64; 10] = [0, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 300_000, 1_800_000, 3_600_000];

/// Events per lateness bucket (and the lag sum in ms) of times in the
/// order read: each against the largest time before it.
fn lateness_reference(times: impl IntoIterator<Item = i64>) -> (Vec<u64>, i64) {
    let (mut buckets, mut sum, mut max) = (vec![0u64; LATENESS_LE_MS.len() + 1], 0, i64::MIN);
    for t in times {
        let lag = if t >= max { 0 } else { max - t };
        max = max.max(t);
        buckets[LATENESS_LE_MS.iter().position(|&b| lag <= b).unwrap_or(LATENESS_LE_MS.len())] += 1;
        sum += lag;
    }
    (buckets, sum)
}

#[test]
fn lateness_counts_each_event_against_the_largest_time_before_it_in_its_file_or_connection() {
    let tmp = tempdir();
    let dir = tmp.path();
    // A file (2 min of disorder on 30% of the events, many blocks): the
    // run's summary against the file's lines in order.
    let files = generate(&dir.join("data"), gen_options(60_000));
    let def = JobDef::new("jsonl", &files).metric(page_uv());
    let out = run(&def.write(dir, "files"), 2);
    let times = files
        .iter()
        .flat_map(|f| read_lines(f))
        .map(|l| serde_json::from_slice::<Value>(&l).unwrap()["ts"].as_i64().unwrap());
    let (buckets, sum_ms) = lateness_reference(times);
    assert!(buckets[0] < buckets.iter().sum::<u64>() * 9 / 10 && buckets[7] > 0, "disordered input: {buckets:?}");
    let l = &out.ok()["sources"][0]["lateness"];
    let got: Vec<u64> = l["events"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(got, buckets, "{l}");
    assert_eq!(l["out_of_order"].as_u64().unwrap(), buckets[1..].iter().sum::<u64>(), "{l}");
    assert_eq!(l["lag_sum_seconds"].as_f64().unwrap(), sum_ms as f64 / 1e3, "{l}");

    // Two connections: each is its own order. B's first event is 150 s
    // behind A's latest and not late on its connection (then B: 1 s, 10 s
    // late); A's last event comes in a later block than A's largest time
    // and is 70 s late.
    let (port, http) = (free_port(), free_port());
    let job = tcp_job(dir, &def, port, http, "");
    let child = spawn_serve(&job, &[]);
    wait_ready(http);
    let t0 = 1_771_171_200_000i64;
    let line = |dt: i64| format!("{{\"ts\":{},\"did\":\"d{dt}\",\"page\":\"p1\"}}\n", t0 + dt);
    let wait_events = |n: f64| {
        let started = Instant::now();
        while tcp_sample(http, "tally_events_total") < n {
            assert!(started.elapsed() < Duration::from_secs(30), "{:?}", samples(http));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut a = TcpStream::connect(("127.0.0.1", port)).unwrap();
    a.write_all((line(100_000) + &line(200_000)).as_bytes()).unwrap();
    wait_events(2.0);
    let mut b = TcpStream::connect(("127.0.0.1", port)).unwrap();
    b.write_all((line(50_000) + &line(49_000) + &line(40_000)).as_bytes()).unwrap();
    wait_events(5.0);
    a.write_all(line(130_000).as_bytes()).unwrap();
    wait_events(6.0);
    let family = "tally_event_lateness_seconds";
    let s: BTreeMap<String, f64> = samples(http).into_iter().filter(|(k, _)| k.starts_with(family)).collect();
    let le = ["0", "1", "2", "5", "10", "30", "60", "300", "1800", "3600", "+Inf"];
    let cumulative: Vec<f64> =
        le.iter().map(|le| s[&format!("{family}_bucket{{source=\"client\",le=\"{le}\"}}")]).collect();
    assert_eq!(cumulative, [3.0, 4.0, 4.0, 4.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0, 6.0], "{s:?}");
    assert_eq!(s[&format!("{family}_sum{{source=\"client\"}}")], 81.0, "1 + 10 + 70 s: {s:?}");
    assert_eq!(s[&format!("{family}_count{{source=\"client\"}}")], 6.0, "{s:?}");
    drop((a, b));
    child.terminate();
}

/// A source joined with a dimension table larger than the caches is routed
/// one record behind its parsing (each record's row is prefetched as soon
/// as it is parsed). Over TCP a block is whatever a connection sent, cut
/// anywhere in the stream: the joined summaries still equal the file run's.
#[test]
fn a_join_with_a_large_dimension_over_tcp_writes_the_file_rows() {
    let tmp = tempdir();
    let dir = tmp.path();
    let opts =
        GenOptions { events: 60_000, devices: 20_000, scenario: GenScenario::Live, seed: 11, ..gen_options(60_000) };
    let files = generate(&dir.join("data"), opts.clone());
    let users = dir.join("data/users.jsonl");
    // Large: an index of 2 cells (16 B each) per slot, slots twice the rows
    // rounded up to a power of two, over the router's 256 KiB.
    assert!(read_lines(&users).len() > 8192, "the user table is too small to be prefetched");
    let (port, http) = (free_port(), free_port());
    let job_text = |source: &str, results: &str| -> String {
        format!(
            r#"[job]
timezone = "+08:00"
[[source]]
name = "client"
{source}
format = "jsonl"
max_out_of_orderness = "5m"
[[dimension]]
name = "user"
kind = "file"
path = "{}"
key = "user_id"
fields = ["tier"]
[[metric]]
name = "by_tier"
kind = "summary"
window = "tumble"
step = "1m"
grouping_sets = [[], ["user.tier"], ["user.tier", "platform"]]
measures = ["count", "uv", "sum(amount)"]
[[sink]]
kind = "jsonl"
path = "{results}"
"#,
            users.display()
        )
    };
    let file_job = JobFile {
        path: dir.join("files.toml"),
        results: dir.join("out/files.jsonl"),
        summary: dir.join("files-summary.json"),
    };
    let source = format!("kind = \"file\"\npath = \"{}\"", files[0].display());
    fs::write(&file_job.path, job_text(&source, "out/files.jsonl")).unwrap();
    let out = run(&file_job, 2);
    assert_verifies(&file_job, &file_job.results, "the file run");
    let user = &out.ok()["dimensions"][0];
    assert!(count(user, "lookups") > count(user, "missing") && count(user, "missing") > 0, "{user}");
    let reference = Reference {
        events: count(&out.ok()["sources"][0], "events"),
        rows: keyed_rows(&file_job.results),
        bytes: fs::metadata(&files[0]).unwrap().len(),
        files,
        opts,
        def: JobDef::new("unused", &[]),
    };

    let job = JobFile {
        path: dir.join("tcp.toml"),
        results: dir.join("out/tcp.jsonl"),
        summary: dir.join("tcp-summary.json"),
    };
    let source = format!("kind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"");
    let serve = format!("[serve]\nhttp = \"127.0.0.1:{http}\"\n");
    fs::write(&job.path, job_text(&source, "out/tcp.jsonl") + &serve).unwrap();
    let state = dir.join("state");
    let child = spawn_serve(&job, &["--workers".as_ref(), "2".as_ref(), "--state-dir".as_ref(), state.as_os_str()]);
    wait_ready(http);
    tally::gen::generate(&GenOptions {
        to: Some(format!("tcp://127.0.0.1:{port}")),
        connections: 3,
        out: dir.join("unused"),
        ..reference.opts.clone()
    })
    .unwrap();
    wait_settled(http, reference.bytes, 0);
    assert_eq!(tcp_sample(http, "tally_events_total"), reference.events as f64);
    child.stop();
    assert_rows_within(&job.results, &reference);
}

//! Kafka sources against a real broker (Tansu on loopback, started and
//! killed by `support::kafka`): generated events produced into a
//! multi-partition topic keyed by device, read by `tally run` with
//! `stop = "caught_up"`, and checked against `tally verify`'s offline
//! recomputation from a file holding the same messages, and against the
//! same job over that file (byte for byte: a partition's order is all
//! that decides lateness).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::support::kafka::Broker;
use crate::support::*;

const PARTITIONS: i32 = 4;
const TOPIC: &str = "client_log";

/// Partition of an event line: by its device id's text, as a producer
/// keyed by device id would (lines without one go by their index).
fn by_device(index: usize, line: &[u8]) -> i32 {
    let did = serde_json::from_slice::<serde_json::Value>(line).ok().and_then(|v| match &v["did"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    });
    match did {
        Some(d) => (xxhash_rust::xxh3::xxh3_64(d.as_bytes()) % PARTITIONS as u64) as i32,
        None => index as i32 % PARTITIONS,
    }
}

/// The Kafka twin of a file job: its source reads `topic` from `brokers`
/// instead, with `keys` added to the source (`group_settle = "3s"\n`) and
/// `props` to its librdkafka settings (`, "key" = "value"`).
fn kafka_job(file_job: &JobFile, brokers: &str, group: &str, keys: &str, props: &str, name: &str) -> JobFile {
    let text = fs::read_to_string(&file_job.path).expect("read the file job");
    let start = text.find("kind = \"file\"").expect("a file source");
    let end = start + text[start..].find("\nformat").expect("a format line");
    let source = format!(
        "kind = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{TOPIC}\"\ngroup_id = \"{group}\"\nstart = \"earliest\"\nstop = \"caught_up\"\n{keys}properties = {{ \"session.timeout.ms\" = \"3000\", \"heartbeat.interval.ms\" = \"500\"{props} }}\n"
    );
    let dir = file_job.path.parent().expect("a job directory");
    let results = dir.join(format!("{name}-out")).join("results.jsonl");
    let old_results = file_job.results.to_string_lossy().into_owned();
    let text =
        format!("{}{source}{}", &text[..start], &text[end + 1..]).replace(&old_results, &results.to_string_lossy());
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, text).expect("write the kafka job");
    JobFile { path, results, summary: dir.join(format!("{name}-summary.json")) }
}

/// Two result files hold the same rows, byte for byte (the first
/// difference shown, not the whole files).
fn assert_same_rows(got: &Path, want: &Path, what: &str) {
    let (g, w) = (read_lines(got), read_lines(want));
    if let Some(i) = (0..g.len().min(w.len())).find(|&i| g[i] != w[i]) {
        panic!(
            "{what}: line {} differs:\n got  {}\n want {}",
            i + 1,
            String::from_utf8_lossy(&g[i]),
            String::from_utf8_lossy(&w[i])
        );
    }
    assert_eq!(g.len(), w.len(), "{what}: {} rows, want {}", g.len(), w.len());
}

/// `tally verify` of a Kafka job, reading source `client` from `dump`.
fn assert_verifies_from(job: &JobFile, dump: &Path, what: &str) {
    let input = format!("client={}", dump.display());
    let v = tally([
        OsStr::new("verify"),
        OsStr::new("--job"),
        job.path.as_os_str(),
        OsStr::new("--results"),
        job.results.as_os_str(),
        OsStr::new("--input"),
        OsStr::new(&input),
    ]);
    assert_eq!(v.code, Some(0), "{what}: tally verify failed:\n{}{}", v.stdout, v.stderr);
    assert!(v.stdout.contains("verify: OK"), "{what}: no OK line:\n{}", v.stdout);
}

/// Generated events (crossing local midnight, disorder below the bound)
/// as lines, written to `dir/dump.jsonl` too.
fn events(dir: &Path, n: u64) -> (Vec<Vec<u8>>, PathBuf) {
    let files = generate(&dir.join("data"), gen_options(n));
    let lines: Vec<Vec<u8>> = files.iter().flat_map(|f| read_lines(f)).collect();
    let dump = dir.join("dump.jsonl");
    write_lines(&dump, &lines, b"\n");
    (lines, dump)
}

/// Every message of a topic counted exactly: rows equal the offline
/// recomputation and the same job over a file of the same messages, and
/// malformed messages are skipped, counted per partition with their offsets.
#[test]
fn kafka_source_rows_equal_offline_and_bad_messages_are_located() {
    let dir = tempdir();
    let (mut lines, _) = events(dir.path(), 120_000);
    // Bad messages between good ones: each lands in partition index % 4.
    let bad: [&[u8]; 4] = [b"{\"ts\":17711", b"not json at all", b"", b"{\"ts\":1771171200000,\"page\":\"p1\"}"];
    for (k, b) in bad.iter().enumerate() {
        lines.insert(1000 + 7 * k, b.to_vec());
    }
    let dump = dir.path().join("dump.jsonl");
    write_lines(&dump, &lines, b"\n");
    let broker = Broker::start();
    broker.produce_lines(TOPIC, PARTITIONS, &lines, |_| None, by_device);

    let file = JobDef::new("jsonl", std::slice::from_ref(&dump))
        .metric(page_uv())
        .metric(platform_version())
        .write(dir.path(), "file");
    let kafka = kafka_job(&file, &broker.addr, "rows", "", "", "kafka");
    let runs = run_all(&[(&file, 2), (&kafka, 2)]);
    let summary = runs[1].ok();
    runs[0].ok();
    assert_verifies_from(&kafka, &dump, "kafka source");
    assert_same_rows(&kafka.results, &file.results, "the topic and a file of its messages give the same rows");

    // Where each bad message went: partition and offset, as produced.
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut want: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (i, l) in lines.iter().enumerate() {
        let p = by_device(i, l);
        let offset = *next.entry(p).and_modify(|o| *o += 1).or_insert(0);
        if bad.contains(&l.as_slice()) {
            want.entry(format!("{TOPIC}[{p}]")).or_default().push(offset);
        }
    }
    let src = source_report(summary, 0);
    let joined = src["assigned_after_seconds"].as_f64().expect("the summary says when the group assigned partitions");
    assert!(joined > 0.0 && joined < summary["seconds"].as_f64().unwrap(), "{src}");
    assert_eq!(count(src, "rejected"), bad.len() as u64, "{src}");
    assert_eq!(count(src, "records"), lines.len() as u64);
    let parts = src["partitions"].as_array().expect("a partition report");
    assert_eq!(parts.len(), PARTITIONS as usize);
    for p in parts {
        let name = p["partition"].as_str().unwrap().to_string();
        let got: Vec<i64> = p["rejected_offsets"].as_array().unwrap().iter().map(|o| o.as_i64().unwrap()).collect();
        assert_eq!(got, want.get(&name).cloned().unwrap_or_default(), "{name}");
        assert_eq!(
            p["next_offset"].as_i64().unwrap(),
            next[&(name[TOPIC.len() + 1..name.len() - 1].parse::<i32>().unwrap())] + 1
        );
    }
    let examples = src["examples"].as_array().unwrap();
    assert!(
        examples
            .iter()
            .all(|e| e["at"].as_str().is_some_and(|a| a.starts_with(&format!("{TOPIC}[")) && a.contains('@'))),
        "examples located by topic[partition]@offset: {examples:?}"
    );
}

/// Binary records (several per message) from a topic give the rows the
/// same records give from a file.
#[test]
fn kafka_binary_messages_equal_the_file_run() {
    let dir = tempdir();
    let files = generate(&dir.path().join("data"), GenOptions { format: GenFormat::Binary, ..gen_options(60_000) });
    let bytes: Vec<u8> = files.iter().flat_map(|f| fs::read(f).unwrap()).collect();
    // 1 to 9 records per message, runs of 50 messages per partition (a
    // partition's records keep the file's order, so its disorder too).
    let mut messages = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let end = (at + (1 + messages.len() % 9) * 32).min(bytes.len());
        messages.push(bytes[at..end].to_vec());
        at = end;
    }
    let broker = Broker::start();
    broker.produce_lines(TOPIC, PARTITIONS, &messages, |_| None, |i, _| (i / 50) as i32 % PARTITIONS);
    let file = JobDef::new("binary", &files).metric(platform_version()).write(dir.path(), "file");
    let kafka = kafka_job(&file, &broker.addr, "binary", "", "", "kafka");
    let runs = run_all(&[(&file, 2), (&kafka, 2)]);
    let (f, k) = (runs[0].ok(), runs[1].ok());
    assert_eq!(count(k, "events"), count(f, "events"));
    assert_eq!(count(k, "rejected"), 0);
    assert_same_rows(&kafka.results, &file.results, "kafka vs file");
    assert_verifies(&file, &kafka.results, "binary messages");
}

/// A run without a state directory commits the group's offsets once its
/// rows are written: the group's next run with `start = "committed"` reads
/// only what was produced since.
#[test]
fn kafka_run_without_state_commits_offsets_at_its_end() {
    let dir = tempdir();
    let (lines, _) = events(dir.path(), 40_000);
    let (first, second) = lines.split_at(25_000);
    let broker = Broker::start();
    broker.produce_lines(TOPIC, PARTITIONS, first, |_| None, by_device);
    let dump = dir.path().join("second.jsonl");
    write_lines(&dump, second, b"\n");
    let file = JobDef::new("jsonl", std::slice::from_ref(&dump)).metric(page_uv()).write(dir.path(), "file");
    let kafka = kafka_job(&file, &broker.addr, "commits", "", "", "kafka");
    let text = fs::read_to_string(&kafka.path).unwrap().replace("start = \"earliest\"", "start = \"committed\"");
    fs::write(&kafka.path, text).unwrap();
    let events_read = |s: &serde_json::Value| count(source_report(s, 0), "records");
    assert_eq!(events_read(run(&kafka, 2).ok()), first.len() as u64, "the first run reads the topic");
    broker.produce_lines(TOPIC, PARTITIONS, second, |_| None, by_device);
    run(&file, 2).ok();
    let summary = run(&kafka, 2);
    assert_eq!(events_read(summary.ok()), second.len() as u64, "the second run reads only the new messages");
    assert_same_rows(&kafka.results, &file.results, "rows of the messages produced after the first run");
}

/// Starts `tally run` on a job with a state directory, in the background.
fn spawn_with_state(job: &JobFile, state: &Path) -> Child {
    spawn_run(job, &[OsStr::new("--state-dir"), state.as_os_str()])
}

/// Waits for a child to exit within the process timeout.
fn wait(mut child: Child, what: &str) -> String {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            assert!(status.success(), "{what} failed: {err}");
            return err;
        }
        assert!(started.elapsed() < PROCESS_TIMEOUT, "{what} did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `kill -9` twice mid-topic, at seeded random moments after a checkpoint;
/// each restart resumes from the checkpoint's offsets (not the group's
/// committed ones) and the final rows (page PV/UV and DAU) are
/// byte-identical to the same job over a file, and exact.
#[test]
fn kafka_restart_after_kill_rewrites_same_rows() {
    let dir = tempdir();
    let (lines, dump) = events(dir.path(), 600_000);
    let broker = Broker::start();
    broker.produce_lines(TOPIC, PARTITIONS, &lines, |_| None, by_device);
    let file = JobDef::new("jsonl", std::slice::from_ref(&dump)).metric(page_uv()).write(dir.path(), "file");
    // A DAU metric too: its minute-dedup rings and day roll-forward are
    // checkpointed state, and a partition's order decides what the ring drops.
    let dau = "\n[[metric]]\nname = \"dau_platform\"\nkind = \"dau\"\ngroup_by = [\"platform\"]\n";
    fs::write(&file.path, fs::read_to_string(&file.path).unwrap() + dau).unwrap();
    let kafka = kafka_job(&file, &broker.addr, "restart", "", "", "kafka");
    // Checkpoint often so kills land between and inside checkpoints.
    let text = fs::read_to_string(&kafka.path).unwrap().replace("[job]\n", "[job]\ncheckpoint_interval = \"150ms\"\n");
    fs::write(&kafka.path, text).unwrap();
    run(&file, 2).ok();

    let seed: u64 = std::env::var("TALLY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let state = dir.path().join("state");
    let mut kills = 0;
    let mut last = 0;
    for round in 0..2u64 {
        let mut child = spawn_with_state(&kafka, &state);
        // Wait for a checkpoint that counted more of the topic, then kill
        // after a pseudo-random delay: mid-topic, with state to resume.
        let started = Instant::now();
        while counted(&state) <= last && started.elapsed() < Duration::from_secs(60) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis((seed * 7919 + round * 104_729) % 150));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            let _ = child.wait();
            if counted(&state) < lines.len() as u64 {
                kills += 1;
            }
        }
        let _ = child.wait();
        last = counted(&state);
    }
    assert!(kills > 0, "no kill landed mid-topic after a checkpoint had counted part of it: use more events");
    let err = wait(spawn_with_state(&kafka, &state), "the last restart");
    assert!(err.contains("resumed from checkpoint"), "{err}");
    assert_same_rows(
        &kafka.results,
        &file.results,
        &format!("after {kills} kill(s) the rows are those of an uninterrupted run"),
    );
    assert_verifies_from(&kafka, &dump, "after kill -9");
}

/// The broker frozen mid-run (SIGSTOP: a network partition) and thawed:
/// the run waits, then finishes with exact rows.
#[test]
fn kafka_broker_frozen_mid_run_then_back() {
    let dir = tempdir();
    let (lines, dump) = events(dir.path(), 400_000);
    let broker = Broker::start();
    broker.produce_lines(TOPIC, PARTITIONS, &lines, |_| None, by_device);
    let file = JobDef::new("jsonl", std::slice::from_ref(&dump)).metric(page_uv()).write(dir.path(), "file");
    // A small prefetch queue, so the run needs the broker until its end.
    let props = r#", "queued.max.messages.kbytes" = "2048""#;
    let kafka = kafka_job(&file, &broker.addr, "frozen", "", props, "kafka");
    let state = dir.path().join("state");
    let mut child = spawn_with_state(&kafka, &state);
    // Freeze as soon as the group assigned the partitions: the run reads
    // the topic in well under a second, so waiting for its first rows
    // (as this test did) sometimes froze a broker it no longer needed.
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("assigned client_log partitions") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let assigned = rx.recv_timeout(Duration::from_secs(60)).is_ok();
    broker.pause();
    std::thread::sleep(Duration::from_secs(3));
    let rows_after_pause = fs::metadata(&kafka.results).map_or(0, |m| m.len());
    let waiting = child.try_wait().unwrap().is_none();
    broker.resume();
    let status = child.wait().expect("wait for tally");
    let err = log.join().expect("the stderr reader");
    assert!(status.success(), "the run across a frozen broker failed: {err}");
    assert!(assigned, "the group assigned partitions: {err}");
    assert!(waiting, "the run waited for the frozen broker: {err}");
    run(&file, 2).ok();
    let all = fs::metadata(&file.results).unwrap().len();
    assert!(rows_after_pause < all, "the run needed the broker to go on ({rows_after_pause} of {all} bytes)");
    assert_same_rows(&kafka.results, &file.results, "kafka vs file");
    assert_verifies_from(&kafka, &dump, "frozen broker");
}

/// Adds a sink writing the job's rows to topic `results` of `broker`.
fn add_kafka_sink(job: &JobFile, broker: &Broker) {
    let sink = format!("\n[[sink]]\nkind = \"kafka\"\nbrokers = \"{}\"\ntopic = \"results\"\n", broker.addr);
    fs::write(&job.path, fs::read_to_string(&job.path).unwrap() + &sink).unwrap();
}

/// Every row once, keyed by `{"metric":…,"dims":…}`, per key in the order
/// of the file sink's rows.
fn assert_topic_holds_rows(broker: &Broker, topic: &str, results: &Path) {
    let key_of = |line: &[u8]| -> Vec<u8> {
        let text = std::str::from_utf8(line).unwrap();
        let metric = &text[10..text.find(",\"window_start\"").unwrap()];
        let from = text.find(",\"dims\":").unwrap() + 8;
        let dims = &text[from..=from + text[from..].find('}').unwrap()];
        format!("{{\"metric\":{metric},\"dims\":{dims}}}").into_bytes()
    };
    let mut want: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
    let lines = read_lines(results);
    for l in &lines {
        want.entry(key_of(l)).or_default().push(l.clone());
    }
    let mut got: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
    let messages = broker.consume_all(topic);
    for (_, _, key, payload) in &messages {
        got.entry(key.clone().expect("every row has a key")).or_default().push(payload.clone());
    }
    assert_eq!(messages.len(), lines.len(), "one message per row written");
    assert_eq!(got.len(), want.len(), "the same keys");
    for (k, w) in &want {
        assert!(got.get(k) == Some(w), "rows of key {} differ", String::from_utf8_lossy(k));
    }
}

/// Result rows to a topic: one message per row, keyed by
/// `{"metric":…,"dims":…}` (so compaction keeps each key's latest row), per
/// key in the order the file sink writes them.
#[test]
fn kafka_sink_writes_every_row_keyed_by_metric_and_dims() {
    let dir = tempdir();
    let files = generate(&dir.path().join("data"), gen_options(60_000));
    let broker = Broker::start();
    let job = JobDef::new("jsonl", &files).metric(page_uv()).metric(platform_version()).write(dir.path(), "job");
    add_kafka_sink(&job, &broker);
    let summary = run(&job, 2);
    let rows = count(summary.ok(), "rows");
    assert_verifies(&job, &job.results, "file sink beside a kafka sink");
    assert_eq!(rows, 2 * read_lines(&job.results).len() as u64, "the summary counts both sinks' rows");
    assert_topic_holds_rows(&broker, "results", &job.results);
}

/// The DAU minute dedup's detail stream as a topic of its own: one message
/// per `minute_devices` row, keyed by device id (one device's rows share a
/// partition), per device in the order the file sink writes them.
#[test]
fn kafka_minute_devices_sink_keys_the_detail_stream_by_device() {
    let dir = tempdir();
    let files = generate(&dir.path().join("data"), gen_options(60_000));
    let broker = Broker::start();
    let job = JobDef::new("jsonl", &files).metric(page_uv()).write(dir.path(), "job");
    let details = dir.path().join("minute_devices.jsonl");
    let q = |p: &Path| serde_json::to_string(&p.to_string_lossy()).unwrap();
    let extra = format!(
        "\n[[metric]]\nname = \"dau\"\nkind = \"dau\"\ngroup_by = [\"platform\"]\n\
         [[sink]]\nkind = \"minute_devices\"\npath = {}\n\
         [[sink]]\nkind = \"minute_devices\"\nbrokers = \"{}\"\ntopic = \"minute_devices\"\n\
         [[sink]]\nkind = \"detail\"\npath = {}\n\
         [[sink]]\nkind = \"detail\"\nbrokers = \"{}\"\ntopic = \"dwd\"\n",
        q(&details),
        broker.addr,
        q(&dir.path().join("dwd.jsonl")),
        broker.addr
    );
    fs::write(&job.path, fs::read_to_string(&job.path).unwrap() + &extra).unwrap();
    let summary = run(&job, 2);
    let lines = read_lines(&details);
    assert!(lines.len() > 1000, "a detail stream to compare: {} rows", lines.len());
    assert_eq!(count(summary.ok(), "minute_devices_rows"), 2 * lines.len() as u64, "both sinks count their rows");
    let mut want: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
    for l in &lines {
        let did = serde_json::from_slice::<serde_json::Value>(l).unwrap()["did"].as_str().unwrap().as_bytes().to_vec();
        want.entry(did).or_default().push(l.clone());
    }
    let messages = broker.consume_all("minute_devices");
    assert_eq!(messages.len(), lines.len(), "one message per detail row");
    let mut got: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
    for (_, _, key, payload) in messages {
        got.entry(key.expect("every detail row has a key")).or_default().push(payload);
    }
    assert!(got == want, "per device, the topic holds the file's detail rows in order");
    // The detail (DWD) sink: one message per event, keyed by its device.
    let events = read_lines(&dir.path().join("dwd.jsonl"));
    assert_eq!(events.len() as u64, count(summary.ok(), "events"));
    let mut want: Vec<(Vec<u8>, Vec<u8>)> = events
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_slice(l).unwrap();
            (v["did"].as_str().unwrap().as_bytes().to_vec(), l.clone())
        })
        .collect();
    let mut got: Vec<(Vec<u8>, Vec<u8>)> = broker
        .consume_all("dwd")
        .into_iter()
        .map(|(_, _, key, payload)| (key.expect("a device key"), payload))
        .collect();
    want.sort();
    got.sort();
    assert!(got == want, "the topic holds the detail file's events keyed by device");
}

/// The broker frozen while rows are being produced: the run waits for
/// delivery at its checkpoints and end, and every row arrives once, in
/// order per key.
#[test]
fn kafka_sink_waits_for_a_frozen_broker_and_loses_nothing() {
    let dir = tempdir();
    let files = generate(&dir.path().join("data"), gen_options(200_000));
    let broker = Broker::start();
    let job = JobDef::new("jsonl", &files)
        .metric(platform_version())
        .job_line("checkpoint_interval = \"100ms\"")
        .write(dir.path(), "job");
    add_kafka_sink(&job, &broker);
    broker.create_topic("results", PARTITIONS);
    broker.pause();
    let mut child = spawn_with_state(&job, &dir.path().join("state"));
    std::thread::sleep(Duration::from_secs(3));
    let waited = child.try_wait().unwrap().is_none();
    broker.resume();
    let _ = wait(child, "a run whose sink's broker was frozen");
    assert!(waited, "the run waited for its rows to be delivered");
    assert_verifies(&job, &job.results, "file sink beside a frozen kafka sink");
    assert_topic_holds_rows(&broker, "results", &job.results);
}

/// Scale-out: two instances in one consumer group over a topic partitioned
/// by device each read a disjoint set of partitions (waiting for the group
/// to settle first), and `tally merge` sums their rows into exactly the
/// rows of one instance over everything.
#[test]
fn two_instances_in_one_group_merge_to_the_single_instance_rows() {
    let dir = tempdir();
    let (lines, dump) = events(dir.path(), 200_000);
    let broker = Broker::start();
    broker.produce_lines(TOPIC, PARTITIONS, &lines, |_| None, by_device);
    let file = JobDef::new("jsonl", std::slice::from_ref(&dump))
        .metric(page_uv())
        .metric(platform_version().emit("changed"))
        .write(dir.path(), "file");
    let instances: Vec<JobFile> = ["a", "b"]
        .iter()
        .map(|name| kafka_job(&file, &broker.addr, "scale-out", "group_settle = \"6s\"\n", "", name))
        .collect();
    run(&file, 2).ok();
    let runs = run_all(&[(&instances[0], 1), (&instances[1], 1)]);
    let mut owned: Vec<Vec<String>> = Vec::new();
    for r in &runs {
        let parts = source_report(r.ok(), 0)["partitions"].as_array().cloned().unwrap_or_default();
        owned.push(
            parts.iter().filter(|p| p["messages"].as_u64() > Some(0)).map(|p| p["partition"].to_string()).collect(),
        );
    }
    let logs = format!("A:\n{}\nB:\n{}", runs[0].outcome.stderr, runs[1].outcome.stderr);
    // Each normally reads two. The broker may also hand one instance
    // nothing (seen on a loaded CI machine); it then ends, and its leaving
    // hands its partitions to the other, which reads them from the start.
    assert!(owned[0].iter().all(|p| !owned[1].contains(p)), "disjoint partitions: {owned:?}\n{logs}");
    assert_eq!(owned[0].len() + owned[1].len(), PARTITIONS as usize, "every partition read: {owned:?}\n{logs}");

    let merged = dir.path().join("merged.jsonl");
    let m = tally([
        OsStr::new("merge"),
        OsStr::new("--job"),
        file.path.as_os_str(),
        OsStr::new("--out"),
        merged.as_os_str(),
        instances[0].results.as_os_str(),
        instances[1].results.as_os_str(),
    ]);
    assert_eq!(m.code, Some(0), "tally merge: {}", m.stderr);
    assert_same_rows(&merged, &file.results, "two instances merged vs one over everything");
    assert_verifies(&file, &merged, "merged rows");
}

/// A broker that is not up when the run starts: the run says so, keeps
/// retrying, and once the broker is there reads the topic with exact rows.
#[test]
fn kafka_broker_down_at_start_is_waited_for() {
    let dir = tempdir();
    let (lines, dump) = events(dir.path(), 100_000);
    let file = JobDef::new("jsonl", std::slice::from_ref(&dump)).metric(page_uv()).write(dir.path(), "file");
    let port = crate::support::kafka::free_port();
    // A job for a broker on `port`, written before the broker exists; the
    // settle keeps it from reading the topic while the test still fills it.
    let brokers = format!("127.0.0.1:{port}");
    let job = kafka_job(&file, &brokers, "late-broker", "group_settle = \"3s\"\n", "", "kafka");
    let mut child = spawn_with_state(&job, &dir.path().join("state"));
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "the run waits for the broker");
    let broker = Broker::start_on(port);
    broker.create_topic(TOPIC, PARTITIONS);
    broker.produce_lines(TOPIC, PARTITIONS, &lines, |_| None, by_device);
    let err = wait(child, "the run with a late broker");
    assert!(err.contains("retrying"), "the run said it was retrying:\n{err}");
    run(&file, 2).ok();
    assert_same_rows(&job.results, &file.results, "late broker vs file");
    assert_verifies_from(&job, &dump, "late broker");
}

/// A job reading a file and a topic at once (the routers take file blocks
/// and stream blocks side by side): rows equal the offline recomputation
/// over both.
#[test]
fn file_and_kafka_sources_in_one_job() {
    let dir = tempdir();
    let (lines, dump) = events(dir.path(), 150_000);
    let server = generate(&dir.path().join("server"), GenOptions { seed: 99, ..gen_options(150_000) });
    let broker = Broker::start();
    broker.produce_lines(TOPIC, PARTITIONS, &lines, |_| None, by_device);
    let file = JobDef::new("jsonl", std::slice::from_ref(&dump)).metric(platform_version()).write(dir.path(), "file");
    let kafka = kafka_job(&file, &broker.addr, "mixed", "", "", "kafka");
    let paths: Vec<String> = server.iter().map(|p| format!("{:?}", p.to_string_lossy())).collect();
    let second = format!(
        "[[source]]\nname = \"server\"\nkind = \"file\"\npath = [{}]\nformat = \"jsonl\"\nmax_out_of_orderness = \"5m\"\n\n[[metric]]",
        paths.join(", ")
    );
    let text = fs::read_to_string(&kafka.path).unwrap().replacen("[[metric]]", &second, 1);
    fs::write(&kafka.path, text).unwrap();
    let summary = run(&kafka, 2);
    let s = summary.ok();
    assert!(count(source_report(s, 0), "events") > 0 && count(source_report(s, 1), "events") > 0, "{s}");
    assert_verifies_from(&kafka, &dump, "file and kafka sources");
}

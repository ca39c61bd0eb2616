//! Layers: an ADS job whose source is the DWS job's output topic
//! (`format = "rows"`). The DWS job is killed mid-run and resumed (its
//! Kafka sink writes again what it wrote after its last checkpoint), the
//! topic then gets a replay and an upstream correction on top, and the ADS
//! job is killed and resumed too: the ADS rows still equal DuckDB's
//! recomputation from the raw events.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use tally::gen::GenScenario;

use crate::support::kafka::Broker;
use crate::support::*;

const PARTITIONS: i32 = 3;

/// 60k live-scenario events over 4 h across midnight, 2 min of disorder,
/// in 24 files (blocks to cut checkpoints between), with the dimension
/// files beside them.
fn live_events(dir: &Path) -> PathBuf {
    let out = dir.join("events");
    generate(
        &out,
        GenOptions {
            files: 24,
            events: 60_000,
            devices: 6_000,
            format: GenFormat::Jsonl,
            seed: 11,
            out: out.clone(),
            disorder: "2m".into(),
            dup_rate: 0.02,
            scenario: GenScenario::Live,
            ..GenOptions::default()
        },
    );
    out
}

fn q(p: &Path) -> String {
    serde_json::to_string(&p.to_string_lossy()).unwrap()
}

const KAFKA_PROPERTIES: &str =
    "properties = { \"session.timeout.ms\" = \"3000\", \"heartbeat.interval.ms\" = \"500\" }";

/// DWS: per minute, the whole market and each live room (rooms the room
/// table lacks are dropped), to a topic.
fn dws_job(dir: &Path, events: &Path, broker: &Broker) -> JobFile {
    let text = format!(
        r#"[job]
timezone = "{TZ}"
state_dir = {state}
checkpoint_interval = "5ms"

[[source]]
name = "app"
kind = "file"
path = {events}
format = "jsonl"
max_out_of_orderness = "5m"

[[dimension]]
name = "room"
kind = "file"
path = {rooms}
key = "room_id"
fields = ["operator"]
on_missing = "drop"

[[metric]]
name = "live_minute"
kind = "summary"
window = "tumble"
step = "1m"
grouping_sets = [[], ["room_id"]]
measures = ["count", "uv", "sum(amount)"]

[[sink]]
kind = "kafka"
brokers = "{brokers}"
topic = "dws"
"#,
        state = q(&dir.join("dws-state")),
        events = q(&events.join("events*.jsonl")),
        rooms = q(&events.join("rooms.jsonl")),
        brokers = broker.addr,
    );
    let path = dir.join("dws.toml");
    fs::write(&path, text).unwrap();
    JobFile { path, results: dir.join("dws-none.jsonl"), summary: dir.join("dws-summary.json") }
}

/// ADS: the room rows of the DWS topic, expanded with the room's operator
/// and rolled up per operator and for the whole market.
fn ads_job(dir: &Path, events: &Path, broker: &Broker) -> JobFile {
    let results = dir.join("ads.jsonl");
    let text = format!(
        r#"[job]
timezone = "{TZ}"
state_dir = {state}
checkpoint_interval = "5ms"

[[source]]
name = "dws"
kind = "kafka"
brokers = "{brokers}"
topic = "dws"
group_id = "ads"
start = "earliest"
stop = "caught_up"
format = "rows"
max_out_of_orderness = "12h"
{KAFKA_PROPERTIES}

[[dimension]]
name = "room"
kind = "file"
path = {rooms}
key = "room_id"
fields = ["operator"]

[[metric]]
name = "ops_minute"
kind = "summary"
window = "tumble"
step = "1m"
filter = "metric = 'live_minute' AND grouping = 'room_id'"
grouping_sets = [[], ["room.operator"]]
measures = ["count", "sum(count)", "sum(sum_amount)"]

[[sink]]
kind = "jsonl"
path = {out}
"#,
        state = q(&dir.join("ads-state")),
        rooms = q(&events.join("rooms.jsonl")),
        brokers = broker.addr,
        out = q(&results),
    );
    let path = dir.join("ads.toml");
    fs::write(&path, text).unwrap();
    JobFile { path, results, summary: dir.join("ads-summary.json") }
}

/// DuckDB over the raw events: per minute and operator (and overall),
/// events and amounts; and per minute, operator and room, to count rooms.
fn duckdb_reference(dir: &Path, events: &Path) -> Vec<Value> {
    let spec = json!({
        "tz_ms": TZ_OFFSET_MS,
        "events": [{"path": events.join("events*.jsonl"), "format": "jsonl"}],
        "columns": {"did": "VARCHAR", "ts": "BIGINT", "user_id": "VARCHAR", "room_id": "VARCHAR",
                    "author_id": "VARCHAR", "platform": "VARCHAR", "event": "VARCHAR", "amount": "DOUBLE"},
        "dimensions": [{"name": "room", "path": events.join("rooms.jsonl"), "format": "jsonl", "key": "room_id",
                        "fields": ["operator"], "on_missing": "drop"}],
        "metrics": [
            {"name": "ops", "window": "tumble", "step_ms": 60_000, "size_ms": 60_000,
             "grouping_sets": [[], ["room.operator"]], "measures": ["count", "sum(amount)"]},
            {"name": "rooms", "window": "tumble", "step_ms": 60_000, "size_ms": 60_000,
             "grouping_sets": [["room.operator", "room_id"]], "measures": ["count"]},
        ],
    });
    let spec_path = dir.join("spec.json");
    fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let out = dir.join("duckdb.jsonl");
    let py = Command::new(python_with_duckdb())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/duckdb_summary_reference.py"))
        .arg(&spec_path)
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .expect("cannot start python");
    assert!(py.status.success(), "duckdb reference failed: {}", String::from_utf8_lossy(&py.stderr));
    read_values(&out)
}

/// A number as both sides write it.
fn num(v: &Value) -> String {
    v.as_f64().map_or("null".into(), |f| format!("{f}"))
}

/// (window_end, grouping, operator) -> "rooms events amount".
type Table = BTreeMap<(i64, String, String), String>;

fn expected(reference: &[Value]) -> Table {
    let mut rooms: BTreeMap<(i64, String, String), u64> = BTreeMap::new();
    let mut sums: BTreeMap<(i64, String, String), (String, String)> = BTreeMap::new();
    for r in reference {
        let end = r["window_end"].as_i64().unwrap();
        let op = r["dims"]["room.operator"].to_string();
        match r["metric"].as_str().unwrap() {
            "rooms" => {
                *rooms.entry((end, "[\"room.operator\"]".into(), op)).or_default() += 1;
                *rooms.entry((end, "[]".into(), "null".into())).or_default() += 1;
            }
            _ => {
                let (set, op) = match r["grouping"].as_array().unwrap().len() {
                    0 => ("[]".to_string(), "null".to_string()),
                    _ => ("[\"room.operator\"]".to_string(), op),
                };
                sums.insert((end, set, op), (num(&r["count"]), num(&r["sum_amount"])));
            }
        }
    }
    sums.into_iter().map(|(k, (events, amount))| (k.clone(), format!("{} {events} {amount}", rooms[&k]))).collect()
}

/// The last ADS row of each key.
fn got(path: &Path) -> Table {
    let mut t = Table::new();
    for r in read_values(path) {
        let set = r["grouping"].to_string();
        let op = r["dims"].get("room.operator").map_or("null".into(), Value::to_string);
        let v = format!("{} {} {}", r["count"], num(&r["sum_count"]), num(&r["sum_sum_amount"]));
        t.insert((r["window_end"].as_i64().unwrap(), set, op), v);
    }
    t
}

#[test]
fn an_ads_job_over_the_dws_topic_stays_exact_when_either_job_is_killed() {
    let tmp = tempdir();
    let dir = tmp.path();
    let events = live_events(dir);
    let broker = Broker::start();
    broker.create_topic("dws", PARTITIONS);

    // DWS: killed right after its second checkpoint, then resumed.
    let dws = dws_job(dir, &events, &broker);
    crash_after_checkpoint_2(&dws);
    let resumed = run(&dws, 2);
    assert_eq!(resumed.ok()["resumed_from"].as_u64(), Some(2), "the DWS run did not resume");

    // On top: 300 room rows written again, and 200 corrected upstream:
    // first with wrong values, then with their own. Each goes to its
    // original's partition, after it.
    let topic = broker.consume_all("dws");
    let room_rows: Vec<_> = topic.iter().filter(|r| r.3.windows(11).any(|w| w == b"\"room_id\":\"")).collect();
    assert!(room_rows.len() > 5_000, "a DWS topic to roll up: {} room rows", room_rows.len());
    let mut extra: Vec<(i32, Vec<u8>)> = Vec::new();
    for r in &room_rows[1_000..1_300] {
        extra.push((r.0, r.3.clone()));
    }
    for r in &room_rows[3_000..3_200] {
        let mut wrong: Value = serde_json::from_slice(&r.3).unwrap();
        wrong["count"] = json!(wrong["count"].as_i64().unwrap() + 7);
        wrong["sum_amount"] = json!(wrong["sum_amount"].as_f64().unwrap_or(0.0) + 1.25);
        extra.push((r.0, serde_json::to_vec(&wrong).unwrap()));
        extra.push((r.0, r.3.clone()));
    }
    let lines: Vec<Vec<u8>> = extra.iter().map(|(_, l)| l.clone()).collect();
    broker.produce_lines("dws", PARTITIONS, &lines, |_| None, |i, _| extra[i].0);

    // ADS: killed after its second checkpoint too, then resumed.
    let ads = ads_job(dir, &events, &broker);
    crash_after_checkpoint_2(&ads);
    let done = run(&ads, 2);
    let summary = done.ok();
    assert_eq!(summary["resumed_from"].as_u64(), Some(2), "the ADS run did not resume: {summary}");
    let upserts = &source_report(summary, 0)["upserts"];
    // Both grouping sets read each room row: two records per row.
    assert!(count(upserts, "replaced") >= 2 * 2 * 200, "corrections were replaced: {upserts}");
    assert!(count(upserts, "unchanged") >= 2 * 300, "replays changed nothing: {upserts}");
    assert_eq!(count(upserts, "late_updates"), 0, "{upserts}");

    let want = expected(&duckdb_reference(dir, &events));
    let have = got(&ads.results);
    assert!(want.len() > 1_000, "a reference to compare: {} rows", want.len());
    let wrong: Vec<_> = want.iter().filter(|(k, v)| have.get(*k) != Some(*v)).take(5).collect();
    let extra_rows: Vec<_> = have.keys().filter(|k| !want.contains_key(*k)).take(5).collect();
    assert!(
        wrong.is_empty() && extra_rows.is_empty(),
        "ADS rows differ from DuckDB ({} vs {} keys)\nwrong or missing (want): {wrong:?}\nextra: {extra_rows:?}",
        have.len(),
        want.len()
    );
}

#[test]
fn rows_sources_feed_only_summaries_of_count_and_sum() {
    let tmp = tempdir();
    let dir = tmp.path();
    let rows = dir.join("rows.jsonl");
    fs::write(&rows, "").unwrap();
    let base = format!(
        "[job]\ntimezone = \"{TZ}\"\n[[source]]\nname = \"dws\"\nkind = \"file\"\npath = {}\nformat = \"rows\"\n\
         [[source]]\nname = \"app\"\nkind = \"file\"\npath = {}\n",
        q(&rows),
        q(&rows)
    );
    let cases = [
        ("kind = \"cumulate\"\ngroup_by = [\"room_id\"]\nsources = [\"dws\"]", "metric[0].kind"),
        (
            "kind = \"summary\"\ngrouping_sets = [[]]\nmeasures = [\"count\", \"uv\"]\nsources = [\"dws\"]",
            "metric[0].measures",
        ),
        (
            "kind = \"summary\"\ngrouping_sets = [[]]\nmeasures = [\"max(count)\"]\nsources = [\"dws\"]",
            "metric[0].measures",
        ),
        ("kind = \"summary\"\ngrouping_sets = [[]]\nmeasures = [\"count\"]", "metric[0].sources"),
    ];
    for (metric, key) in cases {
        let path = dir.join("job.toml");
        fs::write(&path, format!("{base}[[metric]]\nname = \"m\"\n{metric}\n")).unwrap();
        let out = tally([OsStr::new("run"), OsStr::new("--job"), path.as_os_str()]);
        assert_eq!(out.code, Some(2), "{metric}: {}", out.stderr);
        assert!(out.stderr.contains(key), "{metric}: wants {key}: {}", out.stderr);
    }
}

/// The same roll-up from a DWS file, as a tumble and a day-cumulate metric:
/// `tally verify` (the latest row per key, offline) agrees, replays and
/// corrections inside the bound are taken, and a changed row past it
/// changes nothing and is counted.
#[test]
fn an_ads_job_over_a_rows_file_verifies_and_ignores_updates_past_its_bound() {
    let tmp = tempdir();
    let dir = tmp.path();
    let events = live_events(dir);
    let dws_out = dir.join("dws.jsonl");
    let dws = format!(
        "[job]\ntimezone = \"{TZ}\"\n[[source]]\nname = \"app\"\nkind = \"file\"\npath = {}\nmax_out_of_orderness = \"5m\"\n\
         [[metric]]\nname = \"live_minute\"\nkind = \"summary\"\nstep = \"1m\"\ngrouping_sets = [[], [\"room_id\"]]\n\
         measures = [\"count\", \"sum(amount)\"]\n[[sink]]\nkind = \"jsonl\"\npath = {}\n",
        q(&events.join("events*.jsonl")),
        q(&dws_out)
    );
    fs::write(dir.join("dws.toml"), dws).unwrap();
    let out = tally([OsStr::new("run"), OsStr::new("--job"), dir.join("dws.toml").as_os_str()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let rows = read_lines(&dws_out);
    let n = rows.len();
    let bump = |line: &[u8], by: i64| -> Vec<u8> {
        let mut v: Value = serde_json::from_slice(line).unwrap();
        v["count"] = json!(v["count"].as_i64().unwrap() + by);
        serde_json::to_vec(&v).unwrap()
    };
    // Near the end (inside the bound): 50 rows again, 50 corrected (wrong,
    // then right). At the very end: a changed copy of an early row.
    let mut input: Vec<Vec<u8>> = rows.clone();
    input.extend(rows[n - 100..n - 50].iter().cloned());
    for r in &rows[n - 50..] {
        input.push(bump(r, 3));
        input.push(r.clone());
    }
    let ads = |name: &str, lines: &[Vec<u8>]| -> (JobFile, Value) {
        let input_path = dir.join(format!("{name}-rows.jsonl"));
        write_lines(&input_path, lines, b"\n");
        let results = dir.join(format!("{name}.jsonl"));
        let text = format!(
            "[job]\ntimezone = \"{TZ}\"\n[[source]]\nname = \"dws\"\nkind = \"file\"\npath = {}\nformat = \"rows\"\n\
             max_out_of_orderness = \"10m\"\n\
             [[dimension]]\nname = \"room\"\nkind = \"file\"\npath = {}\nkey = \"room_id\"\nfields = [\"operator\"]\n\
             [[metric]]\nname = \"ops_minute\"\nkind = \"summary\"\nstep = \"1m\"\nfilter = \"grouping = 'room_id'\"\n\
             grouping_sets = [[\"room.operator\"]]\nmeasures = [\"count\", \"sum(count)\", \"sum(sum_amount)\"]\n\
             [[metric]]\nname = \"ops_day\"\nkind = \"summary\"\nwindow = \"cumulate\"\nstep = \"10m\"\n\
             filter = \"grouping = 'room_id'\"\ngrouping_sets = [[]]\nmeasures = [\"count\", \"sum(count)\"]\n\
             [[sink]]\nkind = \"jsonl\"\npath = {}\n",
            q(&input_path),
            q(&events.join("rooms.jsonl")),
            q(&results)
        );
        let path = dir.join(format!("{name}.toml"));
        fs::write(&path, text).unwrap();
        let job = JobFile { path, results, summary: dir.join(format!("{name}-summary.json")) };
        let summary = run(&job, 2).ok().clone();
        (job, summary)
    };
    let (job, summary) = ads("ads", &input);
    assert_verifies(&job, &job.results, "an ADS job over replayed and corrected rows");
    let upserts = &source_report(&summary, 0)["upserts"];
    // Room rows (not the whole market's) feed both metrics: two records per row.
    let room_rows = |r: &[Vec<u8>]| r.iter().filter(|l| l.windows(11).any(|w| w == b"\"room_id\":\"")).count() as u64;
    assert_eq!(count(upserts, "unchanged"), 2 * room_rows(&rows[n - 100..n - 50]), "{upserts}");
    assert_eq!(count(upserts, "replaced"), 2 * 2 * room_rows(&rows[n - 50..]), "{upserts}");
    let want = fs::read(&job.results).unwrap();

    // A changed row of the day's first minute, now 2 h behind the
    // watermark: the tumble metric's window is closed (late, dropped), the
    // day cumulate's slice is out (a late update); the rows stay as they
    // were.
    let early = rows
        .iter()
        .position(|r| {
            let v: Value = serde_json::from_slice(r).unwrap();
            v["grouping"] == json!(["room_id"]) && v["window_start"].as_i64().unwrap() >= MIDNIGHT_MS
        })
        .unwrap();
    input.push(bump(&rows[early], 5));
    let (late, summary) = ads("late", &input);
    let src = source_report(&summary, 0);
    assert_eq!(count(&src["upserts"], "late_updates"), 1, "{src}");
    assert_eq!(count(src, "late_dropped"), 1, "{src}");
    assert!(fs::read(&late.results).unwrap() == want, "a late update changed the rows");
}

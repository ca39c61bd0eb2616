//! Operation summaries (`kind = "summary"`) over the live scenario, joined
//! with file dimensions: every row equals DuckDB's recomputation
//! (`scripts/duckdb_summary_reference.py`), output is the same for any
//! number of workers and across a crash, and bad dimension input is
//! reported or refused.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use tally::gen::GenScenario;

use crate::support::*;

/// The live scenario's events: 60k of them over 4 h crossing midnight with
/// 2 min of disorder, as JSON lines in `dir/jsonl` and (another seed) CSV
/// in `dir/csv`, each cut into `files` files; the dimension files sit next
/// to the JSON lines.
fn live_data(dir: &Path, files: usize) -> (PathBuf, PathBuf) {
    let opts = |format, seed, out: PathBuf| GenOptions {
        files,
        events: 60_000,
        devices: 6_000,
        format,
        seed,
        out,
        disorder: "2m".into(),
        dup_rate: 0.02,
        scenario: GenScenario::Live,
        ..GenOptions::default()
    };
    let jsonl = generate(&dir.join("jsonl"), opts(GenFormat::Jsonl, 7, dir.join("jsonl")));
    let csv = generate(&dir.join("csv"), opts(GenFormat::Csv, 8, dir.join("csv")));
    (jsonl[0].clone(), csv[0].clone())
}

/// Dimensions: authors (CSV, left join), users (JSON lines, left join),
/// rooms (JSON lines, inner join: events of rooms it lacks are dropped).
const DIMENSIONS: &str = r#"
[[dimension]]
name = "author"
kind = "file"
path = "jsonl/authors.csv"
key = "author_id"
fields = ["category", "agency"]

[[dimension]]
name = "user"
kind = "file"
path = "jsonl/users.jsonl"
key = "user_id"
fields = ["tier"]

[[dimension]]
name = "room"
kind = "file"
path = "jsonl/rooms.jsonl"
key = "room_id"
fields = ["operator"]
on_missing = "drop"
"#;

/// Five grouping sets on tumbling minutes, gifts per hour, and a day
/// cumulate by enriched fields.
const METRICS: &str = r#"
[[metric]]
name = "live_minute"
kind = "summary"
window = "tumble"
step = "1m"
grouping_sets = [[], ["room_id"], ["author.category", "platform"], ["user.tier"], ["author_id", "event"]]
measures = ["count", "uv", "sum(amount)", "min(amount)", "max(amount)"]

[[metric]]
name = "gifts_hour"
kind = "summary"
window = "tumble"
step = "1h"
filter = "event = 'gift' AND author.agency IS NOT NULL"
grouping_sets = [["author.agency"], ["room.operator", "user.tier"]]
measures = ["count", "sum(amount)", "max(amount)"]

[[metric]]
name = "hot_rooms"
kind = "summary"
window = "tumble"
step = "1h"
grouping_sets = [["author.category", "room_id"], ["platform", "author.category", "room_id"]]
measures = ["count", "sum(amount)"]
top = { n = 3, by = "sum_amount", per = ["author.category"] }

[[metric]]
name = "live_day"
kind = "summary"
window = "cumulate"
step = "10m"
grouping_sets = [[], ["author.category"], ["room.operator"]]
measures = ["count", "uv", "sum(amount)"]
"#;

fn job_text(dir: &Path, state: Option<&str>) -> String {
    let state = state.map_or(String::new(), |s| format!("state_dir = \"{s}\"\ncheckpoint_interval = \"0s\"\n"));
    format!(
        r#"[job]
timezone = "+08:00"
{state}
[[source]]
name = "app"
kind = "file"
path = "{}"
format = "jsonl"
max_out_of_orderness = "5m"

[[source]]
name = "web"
kind = "file"
path = "{}"
format = "csv"
max_out_of_orderness = "5m"
{DIMENSIONS}{METRICS}
[[sink]]
kind = "jsonl"
path = "out/results.jsonl"
"#,
        dir.join("jsonl/events*.jsonl").display(),
        dir.join("csv/events*.csv").display()
    )
}

fn write_job(dir: &Path, name: &str, text: &str) -> JobFile {
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, text).unwrap();
    JobFile { path, results: dir.join("out/results.jsonl"), summary: dir.join(format!("{name}-summary.json")) }
}

/// The reference's spec for [`METRICS`] over both sources.
fn reference_spec(dir: &Path) -> Value {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    json!({
        "tz_ms": TZ_OFFSET_MS,
        "events": [
            {"path": dir.join("jsonl/events.jsonl"), "format": "jsonl"},
            {"path": dir.join("csv/events.csv"), "format": "csv"},
        ],
        "columns": {"did": "VARCHAR", "ts": "BIGINT", "user_id": "VARCHAR", "room_id": "VARCHAR",
                    "author_id": "VARCHAR", "platform": "VARCHAR", "event": "VARCHAR", "amount": "DOUBLE"},
        "dimensions": [
            {"name": "author", "path": dir.join("jsonl/authors.csv"), "format": "csv", "key": "author_id",
             "fields": ["category", "agency"], "on_missing": "null"},
            {"name": "user", "path": dir.join("jsonl/users.jsonl"), "format": "jsonl", "key": "user_id",
             "fields": ["tier"], "on_missing": "null"},
            {"name": "room", "path": dir.join("jsonl/rooms.jsonl"), "format": "jsonl", "key": "room_id",
             "fields": ["operator"], "on_missing": "drop"},
        ],
        "metrics": [
            {"name": "live_minute", "window": "tumble", "step_ms": 60_000, "size_ms": 60_000,
             "grouping_sets": [s(&[]), s(&["room_id"]), s(&["author.category", "platform"]), s(&["user.tier"]),
                               s(&["author_id", "event"])],
             "measures": ["count", "uv", "sum(amount)", "min(amount)", "max(amount)"]},
            {"name": "gifts_hour", "window": "tumble", "step_ms": 3_600_000, "size_ms": 3_600_000,
             "filter": "event = 'gift' AND author.agency IS NOT NULL",
             "grouping_sets": [s(&["author.agency"]), s(&["room.operator", "user.tier"])],
             "measures": ["count", "sum(amount)", "max(amount)"]},
            {"name": "hot_rooms", "window": "tumble", "step_ms": 3_600_000, "size_ms": 3_600_000,
             "grouping_sets": [s(&["author.category", "room_id"]), s(&["platform", "author.category", "room_id"])],
             "measures": ["count", "sum(amount)"],
             "top": {"n": 3, "by": "sum_amount", "per": ["author.category"]}},
            {"name": "live_day", "window": "cumulate", "step_ms": 600_000, "size_ms": DAY_MS,
             "grouping_sets": [s(&[]), s(&["author.category"]), s(&["room.operator"])],
             "measures": ["count", "uv", "sum(amount)"]},
        ],
    })
}

/// A row reduced to what both sides agree on: dims as text (the reference
/// reads every field as text), numbers as f64 text.
fn canonical(v: &Value) -> String {
    let mut v = v.clone();
    if let Some(dims) = v.get_mut("dims").and_then(Value::as_object_mut) {
        for d in dims.values_mut() {
            if let Some(n) = d.as_i64() {
                *d = Value::String(n.to_string());
            }
        }
    }
    if let Some(obj) = v.as_object_mut() {
        for (k, x) in obj.iter_mut() {
            if k != "window_start" && k != "window_end" && x.is_number() {
                *x = Value::String(format!("{}", x.as_f64().unwrap()));
            }
        }
    }
    serde_json::to_string(&v).unwrap()
}

#[test]
fn live_summaries_equal_duckdb_and_do_not_depend_on_workers() {
    let python = python_with_duckdb();
    let tmp = tempdir();
    let dir = tmp.path();
    live_data(dir, 1);
    let job = write_job(dir, "job", &job_text(dir, None));
    let spec = dir.join("spec.json");
    fs::write(&spec, serde_json::to_vec(&reference_spec(dir)).unwrap()).unwrap();
    let reference = dir.join("duckdb.jsonl");
    let py = std::thread::spawn({
        let (spec, reference) = (spec.clone(), reference.clone());
        move || {
            Command::new(python)
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/duckdb_summary_reference.py"))
                .arg(&spec)
                .arg(&reference)
                .stdin(Stdio::null())
                .output()
                .expect("cannot start python")
        }
    });
    let one = run(&job, 1);
    let summary = one.ok().clone();
    let bytes_one = fs::read(&job.results).unwrap();
    run(&job, 2).ok();
    let bytes_two = fs::read(&job.results).unwrap();
    assert!(bytes_one == bytes_two, "1 and 2 workers wrote different rows");
    let py = py.join().unwrap();
    assert!(
        py.status.success(),
        "duckdb_summary_reference.py failed:\n{}{}",
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr)
    );

    let tally_rows: BTreeMap<String, Value> =
        read_values(&job.results).iter().map(|v| (canonical(v), v.clone())).collect();
    let duck_rows: BTreeMap<String, Value> =
        read_values(&reference).iter().map(|v| (canonical(v), v.clone())).collect();
    assert_eq!(tally_rows.len() as u64, count(&summary, "rows"), "tally wrote duplicate rows");
    let only_tally: Vec<&String> = tally_rows.keys().filter(|k| !duck_rows.contains_key(*k)).take(6).collect();
    let only_duck: Vec<&String> = duck_rows.keys().filter(|k| !tally_rows.contains_key(*k)).take(6).collect();
    assert!(
        only_tally.is_empty() && only_duck.is_empty(),
        "rows differ from DuckDB ({} vs {} rows)\nonly in tally: {only_tally:#?}\nonly in DuckDB: {only_duck:#?}",
        tally_rows.len(),
        duck_rows.len()
    );
    // The data exercises what it should: every set of every metric has
    // rows, gifts have amounts, and joins miss and drop.
    for (metric, sets) in [("live_minute", 5), ("gifts_hour", 2), ("hot_rooms", 2), ("live_day", 3)] {
        let grouping: std::collections::BTreeSet<String> =
            tally_rows.values().filter(|r| r["metric"] == metric).map(|r| r["grouping"].to_string()).collect();
        assert_eq!(grouping.len(), sets, "{metric}: rows of {grouping:?}");
    }
    assert!(tally_rows.values().any(|r| r["sum_amount"].as_f64().is_some_and(|s| s.fract() != 0.0)));
    // Ranked lists: 3 per window and category, some categories with fewer rooms.
    assert!(tally_rows.values().any(|r| r["metric"] == "hot_rooms" && r["rank"] == 3));
    assert!(tally_rows.values().any(|r| r["metric"] == "live_minute" && r["sum_amount"].is_null()));
    let dims = summary["dimensions"].as_array().unwrap();
    let dim = |name: &str| dims.iter().find(|d| d["name"] == name).unwrap();
    assert!(count(dim("author"), "missing") > 0 && count(dim("author"), "dropped") == 0);
    assert!(count(dim("room"), "dropped") > 0);
    assert_eq!(count(dim("room"), "dropped"), count(dim("room"), "missing"));
    assert_eq!(count(dim("room"), "lookups"), count(&summary, "events"));
    // And tally's own offline check agrees.
    assert_verifies(&job, &job.results, "live summaries");
}

#[test]
fn summaries_resume_after_a_crash_onto_another_worker_count() {
    let tmp = tempdir();
    let dir = tmp.path();
    // Many small files: many blocks to cut checkpoints between.
    live_data(dir, 24);
    let plain = write_job(dir, "plain", &job_text(dir, None));
    run(&plain, 2).ok();
    let want = fs::read(&plain.results).unwrap();
    fs::remove_file(&plain.results).unwrap();

    // Crash right after checkpoint 2 commits (the engine's test hook, as
    // under kill -9), then resume re-sharded onto 3 workers.
    let text = job_text(dir, Some("state")).replace("checkpoint_interval = \"0s\"", "checkpoint_interval = \"5ms\"");
    let job = write_job(dir, "ckpt", &text);
    crash_after_checkpoint_2(&job);
    let resumed = run(&job, 3);
    let summary = resumed.ok();
    assert_eq!(summary["resumed_from"].as_u64(), Some(2), "the run did not resume: {summary}");
    assert!(fs::read(&job.results).unwrap() == want, "rows after the crash differ from an uninterrupted run");
}

#[test]
fn bad_dimension_input_is_counted_or_refused_before_start() {
    let tmp = tempdir();
    let dir = tmp.path();
    live_data(dir, 1);
    // Malformed rows and a repeated key: counted, reported, the run goes on.
    let authors = dir.join("jsonl/authors.csv");
    let mut text = fs::read_to_string(&authors).unwrap();
    text.push_str("not,enough\n,music,ag1\n1,dance,ag2\n");
    fs::write(&authors, text).unwrap();
    let job = write_job(dir, "job", &job_text(dir, None));
    let out = run(&job, 2);
    let summary = out.ok();
    let author = &summary["dimensions"][0];
    assert_eq!((count(author, "malformed"), count(author, "duplicate_keys")), (2, 1), "{author}");
    let examples = author["examples"].to_string();
    assert!(examples.contains("authors.csv:"), "{examples}");
    assert!(out.outcome.stderr.contains("dimension \"author\""), "{}", out.outcome.stderr);
    assert_verifies(&job, &job.results, "after malformed dimension rows");

    // A file without the key column: refused before any row is written.
    fs::write(&authors, "id,category,agency\n1,music,ag1\n").unwrap();
    fs::remove_file(&job.results).unwrap();
    let out = run(&job, 2);
    assert_eq!(out.outcome.code, Some(2), "{}", out.outcome.stderr);
    assert!(out.outcome.stderr.contains("author_id") && out.outcome.stderr.contains("authors.csv"));
    assert!(!job.results.exists() || fs::read(&job.results).unwrap().is_empty());

    // A missing file, and a dimension field that an input column already
    // has: refused at job load, naming the key.
    let text = job_text(dir, None).replace("jsonl/users.jsonl", "jsonl/nope.jsonl");
    let out = tally(["run", "--job", write_job(dir, "missing", &text).path.to_str().unwrap()]);
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("dimension[1].path") && out.stderr.contains("nope.jsonl"), "{}", out.stderr);
    let csv = dir.join("csv/events.csv");
    let body = fs::read_to_string(&csv).unwrap().replacen("amount", "author.category", 1);
    fs::write(&csv, body).unwrap();
    let out = tally(["run", "--job", write_job(dir, "collide", &job_text(dir, None)).path.to_str().unwrap()]);
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("dimension[0].fields") && out.stderr.contains("collides"), "{}", out.stderr);
}

/// The job with a Redis sink next to the JSON-lines one.
fn with_redis(text: &str, url: &str) -> String {
    format!(
        "{text}\n[[sink]]\nkind = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"t:\"\nttl = \"2d\"\ncurve = true\nmetrics = [\"live_minute\", \"live_day\"]\n"
    )
}

/// Every hash under `t:` as (key, field -> value).
fn redis_dump(conn: &mut redis::Connection) -> BTreeMap<String, BTreeMap<String, String>> {
    let keys: Vec<String> = redis::cmd("KEYS").arg("t:*").query(conn).unwrap();
    keys.into_iter().map(|k| (k.clone(), redis::cmd("HGETALL").arg(&k).query(conn).unwrap())).collect()
}

/// What the hashes must hold after a run that wrote `rows`: per (metric,
/// dims) the fields of its row with the latest window end, and per (metric,
/// dims, window start) its rows by window end.
fn expected_hashes(rows: &[Value]) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r["metric"] == "live_minute" || r["metric"] == "live_day") {
        let obj = r.as_object().unwrap();
        let dims = dims_text(r);
        let key = format!("t:{}:{dims}", r["metric"].as_str().unwrap());
        let end = r["window_end"].as_i64().unwrap();
        let latest = out.entry(key.clone()).or_default();
        if latest.get("window_end").is_none_or(|e| e.parse::<i64>().unwrap() <= end) {
            latest.clear();
            for (f, v) in obj.iter().filter(|(f, _)| *f != "metric" && *f != "dims") {
                latest.insert(f.clone(), v.to_string());
            }
        }
        let curve = format!("{key}:curve:{}", r["window_start"]);
        out.entry(curve).or_default().insert(end.to_string(), r.to_string());
    }
    out
}

/// A row's dims in the order its grouping set lists them, as tally renders
/// them.
fn dims_text(r: &Value) -> String {
    let fields: Vec<String> =
        r["grouping"].as_array().unwrap().iter().map(|g| g.as_str().unwrap().to_string()).collect();
    let parts: Vec<String> = fields.iter().map(|f| format!("{}:{}", Value::from(f.as_str()), r["dims"][f])).collect();
    format!("{{{}}}", parts.join(","))
}

#[test]
fn redis_sink_holds_the_latest_row_and_the_curve_and_replays_change_nothing() {
    let server = crate::support::redis_server::Redis::start();
    let tmp = tempdir();
    let dir = tmp.path();
    live_data(dir, 1);
    let job = write_job(dir, "job", &with_redis(&job_text(dir, None), &server.url()));
    let summary = run(&job, 2).ok().clone();
    assert_eq!(count(&summary, "sink_retries"), 0);
    let rows = read_values(&job.results);
    // Curve fields hold the rows as tally wrote them: compare parsed.
    let parse_curves = |m: BTreeMap<String, BTreeMap<String, String>>| {
        m.into_iter()
            .map(|(k, h)| {
                let h = h
                    .into_iter()
                    .map(|(f, v)| match serde_json::from_str::<Value>(&v) {
                        Ok(x @ Value::Object(_)) => (f, serde_json::to_string(&x).unwrap()),
                        _ => (f, v),
                    })
                    .collect::<BTreeMap<_, _>>();
                (k, h)
            })
            .collect::<BTreeMap<_, _>>()
    };
    let want = parse_curves(expected_hashes(&rows));
    let mut conn = server.conn();
    let got = parse_curves(redis_dump(&mut conn));
    assert_eq!(got.len(), want.len(), "number of hashes");
    if let Some((k, w)) = want.iter().find(|(k, w)| got.get(*k) != Some(w)) {
        panic!("hash {k}: expected {w:?}, Redis has {:?}", got.get(k));
    }
    let ttl: i64 = redis::cmd("TTL").arg(want.keys().next().unwrap()).query(&mut conn).unwrap();
    assert!(ttl > 86_400 && ttl <= 172_800, "ttl {ttl}");

    // Running the job again (a replay with the same rows) changes nothing.
    run(&job, 2).ok();
    assert!(parse_curves(redis_dump(&mut conn)) == got, "a replay changed Redis");
    // A row of an earlier window never replaces a later one (as when a
    // restart replays windows another instance already wrote past): mark
    // one hash as holding a far later window, run again, it stays.
    let key = want.keys().find(|k| !k.contains(":curve:")).unwrap().clone();
    redis::cmd("HSET").arg(&key).arg("window_end").arg("4102444800000").arg("count").arg("-1").exec(&mut conn).unwrap();
    run(&job, 2).ok();
    let after = redis_dump(&mut conn);
    assert_eq!(after[&key]["count"], "-1", "an earlier window replaced a later one");
    let others = |m: &BTreeMap<String, BTreeMap<String, String>>| {
        m.iter()
            .filter(|(k, _)| **k != key && !k.contains(":curve:"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    assert!(others(&after) == others(&got), "other hashes changed");
}

/// Runs `job` with 2 workers in the background, freezes Redis for
/// `seconds` once `started` holds, and checks that the run waited and then
/// succeeded; returns its log.
fn run_through_a_redis_outage(
    job: &JobFile,
    server: &crate::support::redis_server::Redis,
    seconds: u64,
    started: impl Fn(&mut redis::Connection) -> bool,
) -> String {
    let mut child = spawn_run(job, &[]);
    let mut conn = server.conn();
    let since = std::time::Instant::now();
    while !started(&mut conn) {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it used Redis");
        assert!(since.elapsed() < std::time::Duration::from_secs(60), "the run never used Redis");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    server.pause();
    std::thread::sleep(std::time::Duration::from_secs(seconds));
    let still_running = child.try_wait().unwrap().is_none();
    server.resume();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(still_running, "the run did not wait for Redis: {log}");
    assert!(out.status.success(), "{log}");
    log
}

#[test]
fn redis_away_mid_run_delays_the_rows_and_loses_none_and_redis_down_at_start_is_refused() {
    let server = crate::support::redis_server::Redis::start();
    let tmp = tempdir();
    let dir = tmp.path();
    let opts = GenOptions {
        events: 600_000,
        devices: 20_000,
        out: dir.join("jsonl"),
        disorder: "2m".into(),
        scenario: GenScenario::Live,
        ..GenOptions::default()
    };
    generate(&dir.join("jsonl"), opts);
    generate(
        &dir.join("csv"),
        GenOptions {
            events: 10,
            devices: 5,
            format: GenFormat::Csv,
            out: dir.join("csv"),
            scenario: GenScenario::Live,
            ..GenOptions::default()
        },
    );
    let job = write_job(dir, "job", &with_redis(&job_text(dir, None), &server.url()));
    // Freeze Redis once rows arrive: the run must wait, then finish.
    let dbsize = |conn: &mut redis::Connection| redis::cmd("DBSIZE").query::<u64>(conn).unwrap();
    let log = run_through_a_redis_outage(&job, &server, 5, |conn| dbsize(conn) > 0);
    assert!(log.contains("retrying"), "no retry was logged: {log}");
    let summary: Value = serde_json::from_slice(&fs::read(&job.summary).unwrap()).unwrap();
    assert!(count(&summary, "sink_retries") > 0);
    let mut conn = server.conn();
    let want = expected_hashes(&read_values(&job.results));
    let got = redis_dump(&mut conn);
    assert_eq!(got.len(), want.len(), "hashes after the outage");
    if let Some((k, w)) = want.iter().filter(|(k, _)| !k.contains(":curve:")).find(|(k, w)| got.get(*k) != Some(w)) {
        panic!("hash {k}: expected {w:?}, Redis has {:?}", got.get(k));
    }

    // Redis down before the run: refused before anything is written.
    let url = server.url();
    drop(server);
    fs::remove_file(&job.results).unwrap();
    let out = tally(["run", "--job", job.path.to_str().unwrap()]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains(&url) && out.stderr.contains("cannot connect"), "{}", out.stderr);
}

#[test]
fn a_changelog_topic_dimension_joins_like_the_file_of_its_latest_rows() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let broker = crate::support::kafka::Broker::start();
    broker.create_topic("authors", 2);
    let tmp = tempdir();
    let dir = tmp.path();
    live_data(dir, 1);
    // The changelog: every author with a value that is later replaced, the
    // latest values, a tombstone, a key only inside the value, bad messages.
    let authors = fs::read_to_string(dir.join("jsonl/authors.csv")).unwrap();
    let rows: Vec<Vec<String>> = authors.lines().skip(1).map(|l| l.split(',').map(str::to_string).collect()).collect();
    let value = |category: &str, agency: &str| {
        let agency = if agency.is_empty() { Value::Null } else { Value::from(agency) };
        json!({"category": category, "agency": agency}).to_string()
    };
    let producer: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &broker.addr).create().unwrap();
    let send = |key: Option<&str>, payload: Option<String>| {
        let mut rec: BaseRecord<str, String> = BaseRecord::to("authors");
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(p) = &payload {
            rec = rec.payload(p);
        }
        producer.send(rec).map_err(|(e, _)| e).unwrap();
    };
    for r in &rows {
        send(Some(&r[0]), Some(value("stale", "")));
    }
    for r in &rows {
        send(Some(&r[0]), Some(value(&r[1], &r[2])));
    }
    let (gone, moved) = (&rows[0], &rows[1]);
    send(Some(&gone[0]), None);
    send(Some(&moved[0]), Some(value("moved", "ag9")));
    send(None, Some(json!({"author_id": 99_999, "category": "keyless", "agency": null}).to_string()));
    send(Some("bad"), Some("not json".into()));
    producer.flush(std::time::Duration::from_secs(30)).unwrap();
    // The same table as a file.
    let mut latest = String::from("author_id,category,agency\n");
    for r in &rows[1..] {
        let (c, a) = if r[0] == moved[0] { ("moved", "ag9") } else { (r[1].as_str(), r[2].as_str()) };
        latest.push_str(&format!("{},{c},{a}\n", r[0]));
    }
    latest.push_str("99999,keyless,\n");
    fs::write(dir.join("authors-latest.csv"), latest).unwrap();

    let kafka_dim = format!(
        "[[dimension]]\nname = \"author\"\nkind = \"kafka\"\nbrokers = \"{}\"\ntopic = \"authors\"\nkey = \"author_id\"\nfields = [\"category\", \"agency\"]\n",
        broker.addr
    );
    let file_dim = "[[dimension]]\nname = \"author\"\nkind = \"file\"\npath = \"authors-latest.csv\"\nkey = \"author_id\"\nfields = [\"category\", \"agency\"]\n";
    let job_with = |dim: &str, out: &str| {
        let text = job_text(dir, None);
        let start = text.find("[[dimension]]").unwrap();
        let end = text.find("[[dimension]]\nname = \"user\"").unwrap();
        format!("{}{dim}\n{}", &text[..start], &text[end..]).replace("out/results.jsonl", out)
    };
    let from_topic = write_job(dir, "topic", &job_with(&kafka_dim, "out/topic.jsonl"));
    let from_file = write_job(dir, "file", &job_with(file_dim, "out/file.jsonl"));
    let summary = run(&from_topic, 2).ok().clone();
    run(&from_file, 2).ok();
    let author = &summary["dimensions"][0];
    assert_eq!((count(author, "rows"), count(author, "malformed")), (rows.len() as u64, 1), "{author}");
    let (a, b) = (fs::read(dir.join("out/topic.jsonl")).unwrap(), fs::read(dir.join("out/file.jsonl")).unwrap());
    assert!(!a.is_empty() && a == b, "rows joined with the topic differ from rows joined with its latest table");
    let text = String::from_utf8(a).unwrap();
    assert!(text.contains("\"author.category\":\"moved\"") && !text.contains("stale"));
    let v = tally([
        "verify",
        "--job",
        from_topic.path.to_str().unwrap(),
        "--results",
        dir.join("out/topic.jsonl").to_str().unwrap(),
        "--dimension",
        &format!("author={}", dir.join("authors-latest.csv").display()),
    ]);
    assert_eq!(v.code, Some(0), "{}{}", v.stdout, v.stderr);
}

/// Writes the rows of a JSON-lines dimension file to Redis as hashes
/// `{prefix}{key}` (fields as text, `null` fields left out).
fn load_hashes(conn: &mut redis::Connection, path: &Path, key: &str, prefix: &str) -> usize {
    let mut pipe = redis::pipe();
    let mut n = 0;
    for line in fs::read_to_string(path).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let id = match &v[key] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let cmd = pipe.cmd("HSET").arg(format!("{prefix}{id}"));
        for (f, x) in v.as_object().unwrap().iter().filter(|(f, x)| *f != key && !x.is_null()) {
            cmd.arg(f).arg(x.as_str().map_or_else(|| x.to_string(), str::to_string));
        }
        cmd.ignore();
        n += 1;
    }
    pipe.exec(conn).unwrap();
    n
}

/// The job with the user and room dimensions read from Redis instead of
/// their files (`settings`: cache keys for both).
fn with_redis_dims(text: &str, url: &str, settings: &str) -> String {
    let redis = |name: &str| format!("kind = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{name}:\"\n{settings}");
    text.replace("kind = \"file\"\npath = \"jsonl/users.jsonl\"", &redis("user"))
        .replace("kind = \"file\"\npath = \"jsonl/rooms.jsonl\"", &redis("room"))
}

#[test]
fn redis_dimensions_join_like_their_files_through_small_caches() {
    let server = crate::support::redis_server::Redis::start();
    let tmp = tempdir();
    let dir = tmp.path();
    live_data(dir, 1);
    let mut conn = server.conn();
    let users = load_hashes(&mut conn, &dir.join("jsonl/users.jsonl"), "user_id", "user:");
    load_hashes(&mut conn, &dir.join("jsonl/rooms.jsonl"), "room_id", "room:");
    // A user the table lacks, whose key holds a string: missing all the same.
    let known: std::collections::HashSet<String> =
        read_values(&dir.join("jsonl/users.jsonl")).iter().map(|u| u["user_id"].as_str().unwrap().into()).collect();
    let events = read_values(&dir.join("jsonl/events.jsonl"));
    let stranger = events.iter().filter_map(|e| e["user_id"].as_str()).find(|u| !known.contains(*u)).unwrap();
    redis::cmd("SET").arg(format!("user:{stranger}")).arg("not a hash").exec(&mut conn).unwrap();

    // Caches far smaller than the tables: rows are evicted and asked again.
    let small = "local_cache_entries = 64\ncache_entries = 512\ncache_bytes = \"64KiB\"\n";
    let text = job_text(dir, None).replace("out/results.jsonl", "out/redis.jsonl");
    let from_redis = write_job(dir, "redis", &with_redis_dims(&text, &server.url(), small));
    let from_files = write_job(dir, "files", &job_text(dir, None).replace("out/results.jsonl", "out/files.jsonl"));
    let summary = run(&from_redis, 2).ok().clone();
    run(&from_files, 2).ok();
    let (a, b) = (fs::read(dir.join("out/redis.jsonl")).unwrap(), fs::read(dir.join("out/files.jsonl")).unwrap());
    assert!(!a.is_empty() && a == b, "rows joined through Redis differ from rows joined with the files");
    let dims = summary["dimensions"].as_array().unwrap();
    let dim = |name: &str| dims.iter().find(|d| d["name"] == name).unwrap();
    let (user, room) = (dim("user"), dim("room"));
    let cache = &user["cache"];
    assert!(count(user, "missing") > 0 && count(room, "dropped") > 0, "{user}\n{room}");
    assert_eq!(count(room, "lookups"), count(&summary, "events"));
    assert!(count(cache, "fetched") > 64, "small caches refetch: {cache}");
    assert!(count(cache, "round_trips") * 20 < count(user, "lookups"), "fetches are batched: {cache}");
    assert!(count(cache, "not_hashes") >= 1 && count(cache, "retries") == 0, "{cache}");
    assert!(count(cache, "cached") <= 512 && users > 512);
    // tally verify, with the tables as files, agrees.
    let v = tally([
        "verify",
        "--job",
        from_redis.path.to_str().unwrap(),
        "--results",
        dir.join("out/redis.jsonl").to_str().unwrap(),
        "--dimension",
        &format!("user={}", dir.join("jsonl/users.jsonl").display()),
        "--dimension",
        &format!("room={}", dir.join("jsonl/rooms.jsonl").display()),
    ]);
    assert_eq!(v.code, Some(0), "{}{}", v.stdout, v.stderr);

    // Redis down before the run: refused before anything is written,
    // naming the dimension.
    drop(server);
    fs::remove_file(dir.join("out/redis.jsonl")).unwrap();
    let out = tally(["run", "--job", from_redis.path.to_str().unwrap()]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("dimension \"user\"") && out.stderr.contains("cannot connect"), "{}", out.stderr);
    assert!(!dir.join("out/redis.jsonl").exists() || fs::read(dir.join("out/redis.jsonl")).unwrap().is_empty());
}

#[test]
fn a_redis_dimension_away_mid_run_holds_the_events_back_and_loses_none() {
    let server = crate::support::redis_server::Redis::start();
    let tmp = tempdir();
    let dir = tmp.path();
    let opts = |events, format, out: PathBuf| GenOptions {
        events,
        devices: 20_000,
        format,
        out,
        disorder: "2m".into(),
        scenario: GenScenario::Live,
        ..GenOptions::default()
    };
    generate(&dir.join("jsonl"), opts(400_000, GenFormat::Jsonl, dir.join("jsonl")));
    generate(&dir.join("csv"), opts(10, GenFormat::Csv, dir.join("csv")));
    let mut conn = server.conn();
    load_hashes(&mut conn, &dir.join("jsonl/users.jsonl"), "user_id", "user:");
    load_hashes(&mut conn, &dir.join("jsonl/rooms.jsonl"), "room_id", "room:");
    // Rows expire at once: every block asks Redis again, all run long.
    let text = job_text(dir, None).replace("out/results.jsonl", "out/redis.jsonl");
    let job = write_job(dir, "redis", &with_redis_dims(&text, &server.url(), "cache_ttl = \"1ms\"\n"));
    let evals = |conn: &mut redis::Connection| -> u64 {
        let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_eval:calls="))
            .map_or(0, |l| l.split(',').next().unwrap().parse().unwrap())
    };
    let log = run_through_a_redis_outage(&job, &server, 4, |conn| evals(conn) > 0);
    assert!(log.contains("dimension \"") && log.contains("asking again"), "no retry was logged: {log}");
    let summary: Value = serde_json::from_slice(&fs::read(&job.summary).unwrap()).unwrap();
    let dims = summary["dimensions"].as_array().unwrap();
    let retries: u64 = dims.iter().filter(|d| d["cache"].is_object()).map(|d| count(&d["cache"], "retries")).sum();
    assert!(retries > 0, "{summary}");
    let files = write_job(dir, "files", &job_text(dir, None).replace("out/results.jsonl", "out/files.jsonl"));
    run(&files, 2).ok();
    let (a, b) = (fs::read(dir.join("out/redis.jsonl")).unwrap(), fs::read(dir.join("out/files.jsonl")).unwrap());
    assert!(!a.is_empty() && a == b, "rows after the outage differ from rows joined with the files");
}

/// A value as text: strings as they are, numbers in one form, `null`.
fn text_form(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => format!("{}", n.as_f64().unwrap()),
        other => other.to_string(),
    }
}

/// The detail sink's fields of [`detail_job`].
const DETAIL_FIELDS: [&str; 6] = ["room_id", "event", "amount", "author.category", "user.tier", "room.operator"];

fn detail_job(dir: &Path, state: Option<&str>) -> String {
    let fields: Vec<String> = DETAIL_FIELDS.iter().map(|f| format!("{f:?}")).collect();
    format!(
        "{}\n[[sink]]\nkind = \"detail\"\npath = \"out/dwd.jsonl\"\nfields = [{}]\n",
        job_text(dir, state),
        fields.join(", ")
    )
}

/// A detail sink's lines, each reduced to its fields in text form, sorted.
fn detail_lines(path: &Path) -> Vec<String> {
    let mut lines: Vec<String> = read_values(path)
        .iter()
        .map(|v| {
            let obj = v.as_object().unwrap();
            let fields: BTreeMap<&String, String> = obj.iter().map(|(k, x)| (k, text_form(x))).collect();
            serde_json::to_string(&fields).unwrap()
        })
        .collect();
    lines.sort();
    lines
}

/// The same, computed from the input files by hand: every event of both
/// sources joined with the three dimension files, events of rooms the
/// room table lacks dropped.
fn expected_detail(dir: &Path) -> Vec<String> {
    let by_key = |path: &Path, key: &str| -> BTreeMap<String, Value> {
        read_values(path).into_iter().map(|v| (text_form(&v[key]), v)).collect()
    };
    let users = by_key(&dir.join("jsonl/users.jsonl"), "user_id");
    let rooms = by_key(&dir.join("jsonl/rooms.jsonl"), "room_id");
    let mut authors = BTreeMap::new();
    let mut rdr = csv::Reader::from_path(dir.join("jsonl/authors.csv")).unwrap();
    let header = rdr.headers().unwrap().clone();
    for rec in rdr.records() {
        let rec = rec.unwrap();
        let row: BTreeMap<String, String> = header.iter().zip(rec.iter()).map(|(h, c)| (h.into(), c.into())).collect();
        authors.insert(row["author_id"].clone(), row);
    }
    let files = |sub: &str| {
        let mut f: Vec<PathBuf> = fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("events"))
            .collect();
        f.sort();
        f
    };
    let mut events: Vec<(&str, BTreeMap<String, Value>)> = Vec::new();
    for path in files("jsonl") {
        events.extend(
            read_values(&path).into_iter().map(|v| ("app", v.as_object().unwrap().clone().into_iter().collect())),
        );
    }
    for path in files("csv") {
        let mut rdr = csv::Reader::from_path(path).unwrap();
        let header = rdr.headers().unwrap().clone();
        for rec in rdr.records() {
            let rec = rec.unwrap();
            let row = header
                .iter()
                .zip(rec.iter())
                .filter(|(_, c)| !c.is_empty())
                .map(|(h, c)| (h.to_string(), Value::String(c.into())))
                .collect();
            events.push(("web", row));
        }
    }
    let mut lines = Vec::new();
    for (source, e) in events {
        let field = |f: &str| e.get(f).map_or(Value::Null, Value::clone);
        let Some(room) = rooms.get(&text_form(&field("room_id"))).filter(|_| !field("room_id").is_null()) else {
            continue;
        };
        let author = authors.get(&text_form(&field("author_id")));
        let mut out = BTreeMap::new();
        out.insert("source".to_string(), source.to_string());
        out.insert("ts".into(), text_form(&field("ts")));
        out.insert("did".into(), text_form(&field("did")));
        for f in DETAIL_FIELDS {
            let v = match f {
                "author.category" => {
                    author.map(|a| &a["category"]).filter(|c| !c.is_empty()).map_or(Value::Null, |c| c.as_str().into())
                }
                "user.tier" => users
                    .get(&text_form(&field("user_id")))
                    .filter(|_| !field("user_id").is_null())
                    .map_or(Value::Null, |u| u["tier"].clone()),
                "room.operator" => room["operator"].clone(),
                f => field(f),
            };
            out.insert(f.to_string(), text_form(&v));
        }
        lines.push(serde_json::to_string(&out).unwrap());
    }
    lines.sort();
    lines
}

#[test]
fn a_detail_sink_writes_every_joined_event_once_also_across_a_crash() {
    let tmp = tempdir();
    let dir = tmp.path();
    // Many small files: many blocks to cut checkpoints between.
    live_data(dir, 24);
    let plain = write_job(dir, "plain", &detail_job(dir, None));
    let summary = run(&plain, 2).ok().clone();
    let got = detail_lines(&dir.join("out/dwd.jsonl"));
    let want = expected_detail(dir);
    assert_eq!(got.len(), want.len(), "events in the detail sink");
    if let Some((g, w)) = got.iter().zip(&want).find(|(g, w)| g != w) {
        panic!("detail event differs from the hand join:\ntally: {g}\nwant:  {w}");
    }
    assert_eq!(count(&summary, "detail_events"), want.len() as u64);
    let room = &summary["dimensions"].as_array().unwrap()[2];
    assert_eq!(count(room, "dropped") + want.len() as u64, count(&summary, "events"), "dropped events are not written");

    // Crash right after checkpoint 2 commits, resume onto 3 workers: the
    // file holds every event once (its tail past the checkpoint cut off
    // and written again).
    fs::remove_file(dir.join("out/dwd.jsonl")).unwrap();
    let text = detail_job(dir, Some("state")).replace("checkpoint_interval = \"0s\"", "checkpoint_interval = \"5ms\"");
    let job = write_job(dir, "ckpt", &text);
    crash_after_checkpoint_2(&job);
    // What the crashed run wrote past its checkpoint (maybe all the rest:
    // the run goes on while the checkpoint is written) is cut off.
    assert!(!detail_lines(&dir.join("out/dwd.jsonl")).is_empty(), "the crashed run wrote no event");
    let resumed = run(&job, 3).ok().clone();
    assert_eq!(resumed["resumed_from"].as_u64(), Some(2), "the run did not resume: {resumed}");
    assert!(
        detail_lines(&dir.join("out/dwd.jsonl")) == want,
        "detail events after the crash differ from the hand join"
    );
}

#[test]
fn the_redis_sink_loads_its_script_again_after_redis_forgets_it() {
    use tally::job::{Job, SinkTarget};
    use tally::sink::redis::RedisSink;
    let server = crate::support::redis_server::Redis::start();
    let tmp = tempdir();
    fs::write(tmp.path().join("e.jsonl"), "").unwrap();
    let text = format!(
        "[job]\ntimezone = \"+08:00\"\n[[source]]\nname = \"s\"\nkind = \"file\"\npath = \"e.jsonl\"\nformat = \"jsonl\"\n\
         [[metric]]\nname = \"m\"\nkind = \"cumulate\"\ngroup_by = [\"page\"]\n[[sink]]\nkind = \"redis\"\nurl = \"{}\"\n",
        server.url()
    );
    let job = Job::parse(&text, Path::new("job.toml"), tmp.path()).unwrap();
    let SinkTarget::Redis(spec) = &job.sinks[0].target else { panic!("a Redis sink") };
    let mut sink = RedisSink::open(spec, &[0], &job.metrics).unwrap();
    let dims = r#"{"page":"home"}"#;
    let row = |end: i64, pv: u64| {
        format!(r#"{{"metric":"m","window_start":0,"window_end":{end},"dims":{dims},"pv":{pv},"uv":1}}"#) + "\n"
    };
    sink.write(0, &row(60_000, 1), dims).unwrap();
    sink.flush().unwrap();
    // Redis restarted without persistence, or an operator flushed scripts:
    // the next pipeline fails with NOSCRIPT, the sink loads it again.
    let mut conn = server.conn();
    redis::cmd("SCRIPT").arg("FLUSH").exec(&mut conn).unwrap();
    sink.write(0, &row(120_000, 2), dims).unwrap();
    sink.flush().unwrap();
    assert_eq!(sink.retries, 1, "one pipeline sent again");
    let pv: String = redis::cmd("HGET").arg(format!("tally:m:{dims}")).arg("pv").query(&mut conn).unwrap();
    assert_eq!(pv, "2");
}

/// A file dimension rewritten mid-run: the events routed before the change
/// join the old rows, those routed after it the new ones (the watcher
/// reloads the file, routers take the new table at their next block).
#[test]
fn a_changed_dimension_file_joins_the_events_routed_after_it() {
    changed_dimension_joins_the_events_routed_after_it(false);
}

/// The same with a changelog topic that gets every author's new row
/// mid-run.
#[test]
fn a_changelog_topic_updated_mid_run_joins_the_events_routed_after_it() {
    changed_dimension_joins_the_events_routed_after_it(true);
}

fn changed_dimension_joins_the_events_routed_after_it(from_topic: bool) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let broker = crate::support::kafka::Broker::start();
    broker.create_topic("live", 2);
    let tmp = tempdir();
    let dir = tmp.path();
    live_data(dir, 1);
    let lines: Vec<Vec<u8>> =
        fs::read_to_string(dir.join("jsonl/events.jsonl")).unwrap().lines().map(|l| l.as_bytes().to_vec()).collect();
    let ts = |l: &[u8]| serde_json::from_slice::<Value>(l).unwrap()["ts"].as_i64().unwrap();
    const HOUR: i64 = 3_600_000;
    let (lo, hi) = lines.iter().fold((i64::MAX, i64::MIN), |(a, b), l| (a.min(ts(l)), b.max(ts(l))));
    let cut = (lo + hi) / 2 / HOUR * HOUR;
    let (before, after): (Vec<Vec<u8>>, Vec<Vec<u8>>) = lines.iter().cloned().partition(|l| ts(l) < cut);
    // An event two hours after the last, in each partition, moves the
    // watermark past the last window.
    let mut sentinel: Value = serde_json::from_slice(&after[0]).unwrap();
    sentinel["ts"] = Value::from(hi + 2 * HOUR);
    let sentinel = serde_json::to_vec(&sentinel).unwrap();

    let old_rows = fs::read_to_string(dir.join("jsonl/authors.csv")).unwrap();
    let new_rows: String = old_rows
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut cells: Vec<String> = l.split(',').map(str::to_string).collect();
            if i > 0 && !cells[1].is_empty() {
                cells[1] = format!("v2-{}", cells[1]);
            }
            cells.join(",") + "\n"
        })
        .collect();
    fs::write(dir.join("authors.csv"), &old_rows).unwrap();
    // The same tables as a changelog: a JSON value per author, keyed by id.
    let publish = |rows: &str| {
        let producer: BaseProducer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", &broker.addr).create().unwrap();
        for l in rows.lines().skip(1) {
            let cells: Vec<&str> = l.split(',').collect();
            let category = if cells[1].is_empty() { Value::Null } else { Value::from(cells[1]) };
            let value = json!({ "category": category }).to_string();
            producer.send(BaseRecord::to("authors").key(cells[0]).payload(&value)).map_err(|(e, _)| e).unwrap();
        }
        producer.flush(std::time::Duration::from_secs(30)).unwrap();
    };
    let dimension = if from_topic {
        broker.create_topic("authors", 1);
        publish(&old_rows);
        format!("kind = \"kafka\"\nbrokers = \"{}\"\ntopic = \"authors\"", broker.addr)
    } else {
        "kind = \"file\"\npath = \"authors.csv\"".to_string()
    };
    let job = write_job(
        dir,
        "follow",
        &format!(
            r#"[job]
timezone = "+08:00"
state_dir = "state"
checkpoint_interval = "200ms"
[[source]]
name = "app"
kind = "kafka"
brokers = "{}"
topic = "live"
group_id = "follow"
start = "earliest"
format = "jsonl"
max_out_of_orderness = "5m"
properties = {{ "session.timeout.ms" = "3000", "heartbeat.interval.ms" = "500" }}
[[dimension]]
name = "author"
{}
key = "author_id"
fields = ["category"]
[[metric]]
name = "by_category"
kind = "summary"
window = "tumble"
step = "1h"
grouping_sets = [["author.category"]]
measures = ["count"]
[[sink]]
kind = "jsonl"
path = "out/results.jsonl"
"#,
            broker.addr, dimension
        ),
    );
    let until_counted = |n: usize| {
        let started = std::time::Instant::now();
        while counted(&dir.join("state")) < n as u64 {
            assert!(started.elapsed() < std::time::Duration::from_secs(60), "the run did not read {n} events");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    broker.produce_lines("live", 2, &before, |_| None, |i, _| (i % 2) as i32);
    let child = spawn_run(&job, &[]);
    until_counted(before.len());
    if from_topic {
        // The dimension's consumer publishes a new table within 200 ms
        // of the last change.
        publish(&new_rows);
    } else {
        // Replaced whole (a rename), as deployments do; the watcher looks
        // every 500 ms.
        fs::write(dir.join("authors.csv.new"), &new_rows).unwrap();
        fs::rename(dir.join("authors.csv.new"), dir.join("authors.csv")).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let mut rest = after.clone();
    rest.extend([sentinel.clone(), sentinel]);
    broker.produce_lines("live", 2, &rest, |_| None, |i, _| (i % 2) as i32);
    until_counted(before.len() + rest.len());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // By hand: each event's hour and its author's category, from the old
    // table before the cut and the new one after it.
    let table = |text: &str| -> BTreeMap<String, String> {
        text.lines().skip(1).map(|l| l.split(',').collect::<Vec<_>>()).map(|c| (c[0].into(), c[1].into())).collect()
    };
    let (old, new) = (table(&old_rows), table(&new_rows));
    let mut want: BTreeMap<(i64, Option<String>), u64> = BTreeMap::new();
    for l in &lines {
        let e: Value = serde_json::from_slice(l).unwrap();
        let t = e["ts"].as_i64().unwrap();
        let author = match &e["author_id"] {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let category = if t < cut { &old } else { &new }.get(&author).filter(|c| !c.is_empty()).cloned();
        *want.entry((t / HOUR * HOUR, category)).or_default() += 1;
    }
    let got: BTreeMap<(i64, Option<String>), u64> = read_values(&job.results)
        .iter()
        .filter(|r| r["window_start"].as_i64().unwrap() <= hi)
        .map(|r| {
            let category = r["dims"]["author.category"].as_str().map(str::to_string);
            ((r["window_start"].as_i64().unwrap(), category), count(r, "count"))
        })
        .collect();
    assert!(got.keys().any(|(_, c)| c.as_ref().is_some_and(|c| c.starts_with("v2-"))), "no row joined the new table");
    assert_eq!(got, want, "counts per hour and category");
    let summary: Value = serde_json::from_slice(&fs::read(&job.summary).unwrap()).unwrap();
    let reloads = count(&summary["dimensions"][0], "reloads");
    // A topic's table may come out in more than one step.
    assert!(reloads == 1 || from_topic && reloads >= 1, "{summary}");
}

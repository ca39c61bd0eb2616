//! Checkpoints and restart: a run killed at any instant and restarted with
//! the same state directory writes the same rows as a run never
//! interrupted; a damaged or mismatched state directory is refused with a
//! clear message, never used and never a panic.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::support::*;

/// Multi-million events: long enough that a kill lands mid-run.
const EVENTS: u64 = 2_000_000;
const WORKERS: &str = "2";

/// Data, a job checkpointing every `interval`, and the rows of an
/// uninterrupted run without a state directory.
struct Fixture {
    dir: tempfile::TempDir,
    files: Vec<PathBuf>,
    job: JobFile,
    want: Vec<u8>,
    /// Events the uninterrupted run counted.
    events: u64,
}

fn job_def(files: &[PathBuf], interval: &str) -> JobDef {
    JobDef::new("jsonl", files)
        .job_line(&format!("checkpoint_interval = {interval:?}"))
        .metric(page_uv())
        .metric(platform_version().emit("changed"))
}

fn fixture(interval: &str) -> Fixture {
    let dir = tempdir();
    let files = generate(&dir.path().join("data"), gen_options(EVENTS));
    let plain = job_def(&files, interval).write(dir.path(), "plain");
    let events = count(run(&plain, 2).ok(), "events");
    let want = fs::read(&plain.results).unwrap();
    assert!(!want.is_empty());
    let job = job_def(&files, interval).write(dir.path(), "ckpt");
    Fixture { dir, files, job, want, events }
}

impl Fixture {
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts `tally run` on the fixture's job with `state` (stderr to a file).
    fn spawn(&self, job: &JobFile, state: &Path, env: &[(&str, &str)], log: &str) -> Child {
        let stderr = fs::File::create(self.dir.path().join(log)).unwrap();
        let mut cmd = Command::new(TALLY);
        cmd.args(["run", "--workers", WORKERS, "--job"])
            .arg(&job.path)
            .arg("--state-dir")
            .arg(state)
            .arg("--summary")
            .arg(&job.summary)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("start tally")
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Runs to the end with `state`; returns (exit code, stderr).
    fn run_to_end(&self, job: &JobFile, state: &Path) -> (Option<i32>, String) {
        let mut child = self.spawn(job, state, &[], "last.log");
        let status = wait(&mut child, PROCESS_TIMEOUT).expect("tally did not finish");
        (status.code(), self.log("last.log"))
    }

    fn assert_same_rows(&self, what: &str) {
        let got = fs::read(&self.job.results).unwrap();
        assert!(
            got == self.want,
            "{what}: rows differ from the uninterrupted run ({} vs {} bytes)",
            got.len(),
            self.want.len()
        );
    }
}

fn wait(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait for tally") {
            return Some(s);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn seed() -> u64 {
    std::env::var("TALLY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random)
}

#[test]
fn restart_after_kill_rewrites_same_rows() {
    let f = fixture("100ms");
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let state = f.state();
    let mut kills = 0;
    let mut resumed = Vec::new();
    loop {
        let mut child = f.spawn(&f.job, &state, &[], "run.log");
        if kills < 6 {
            std::thread::sleep(Duration::from_millis(rng.random_range(40..450)));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                continue;
            }
        }
        let status = wait(&mut child, PROCESS_TIMEOUT).expect("tally did not finish");
        let log = f.log("run.log");
        assert!(status.success(), "seed {seed}: the last run failed:\n{log}");
        resumed.push(log);
        break;
    }
    assert!(kills > 0, "seed {seed}: no run was killed mid-way");
    f.assert_same_rows(&format!("seed {seed}, {kills} kills"));
    assert_verifies(&f.job, &f.job.results, "after kills");
    let summary: serde_json::Value = serde_json::from_slice(&fs::read(&f.job.summary).unwrap()).unwrap();
    assert_eq!(count(&summary, "events"), f.events, "seed {seed}: every event counted once over all runs");
}

/// Crashes at the instants a timed kill rarely hits: after a checkpoint's
/// files are written but before they are synced, after the new manifest is
/// written but before it replaces the old one, and right after it does.
#[test]
fn crash_inside_a_checkpoint_leaves_a_whole_one() {
    let f = fixture("50ms");
    let state = f.state();
    for (i, point) in ["files-written:2", "manifest-written:3", "renamed:4"].iter().enumerate() {
        let log = format!("crash-{i}.log");
        let mut child = f.spawn(&f.job, &state, &[("TALLY_CRASH_AT", point)], &log);
        let status = wait(&mut child, PROCESS_TIMEOUT).expect("tally did not finish");
        assert!(
            !status.success() && status.code().is_none(),
            "{point}: expected an abort, got {status:?}:\n{}",
            f.log(&log)
        );
        assert!(f.log(&log).contains("aborting"), "{point}: {}", f.log(&log));
    }
    assert!(!state.join("MANIFEST.tmp").exists() || state.join("MANIFEST").exists());
    let (code, log) = f.run_to_end(&f.job, &state);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("resumed from checkpoint 4"), "{log}");
    f.assert_same_rows("after crashes inside checkpoints");
}

#[test]
fn sigterm_checkpoints_exits_zero_and_resumes() {
    let f = fixture("10s");
    let state = f.state();
    let mut child = f.spawn(&f.job, &state, &[], "term.log");
    std::thread::sleep(Duration::from_millis(150));
    // SAFETY: signalling a child process we started and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait(&mut child, PROCESS_TIMEOUT).expect("tally did not stop");
    let log = f.log("term.log");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(state.join("MANIFEST").is_file(), "a checkpoint at the signal: {log}");
    let stopped = log.contains("stopped by a signal");
    let (code, log2) = f.run_to_end(&f.job, &state);
    assert_eq!(code, Some(0), "{log2}");
    assert!(log2.contains("resumed from checkpoint"), "{log2}");
    assert!(stopped || log.contains("checkpoint"), "{log}");
    f.assert_same_rows("after SIGTERM and restart");
}

#[test]
fn rerun_of_a_finished_job_changes_nothing() {
    let f = fixture("0");
    let state = f.state();
    let (code, log) = f.run_to_end(&f.job, &state);
    assert_eq!(code, Some(0), "{log}");
    f.assert_same_rows("first run");
    let (code, log) = f.run_to_end(&f.job, &state);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("resumed from checkpoint 1"), "{log}");
    f.assert_same_rows("rerun");
}

/// A state directory with a committed checkpoint holding table files (the
/// process aborted right after committing checkpoint 2).
fn committed_state(f: &Fixture) -> PathBuf {
    let state = f.state();
    let mut child = f.spawn(&f.job, &state, &[("TALLY_CRASH_AT", "renamed:2")], "seed.log");
    let status = wait(&mut child, PROCESS_TIMEOUT).unwrap();
    assert!(status.code().is_none(), "expected an abort: {}", f.log("seed.log"));
    let ckpt: Vec<String> = names(&state.join("ckpt"));
    assert!(ckpt.iter().any(|n| n.ends_with(".base")), "table files in {ckpt:?}");
    state
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

fn flip_byte(p: &Path, at: u64) {
    let mut b = fs::read(p).unwrap();
    let i = (at as usize).min(b.len() - 1);
    b[i] ^= 0x5a;
    fs::write(p, b).unwrap();
}

fn truncate_half(p: &Path) {
    let len = fs::metadata(p).unwrap().len();
    fs::OpenOptions::new().write(true).open(p).unwrap().set_len(len / 2).unwrap();
}

/// The first file of a kind the state's manifest names (`tables`,
/// `shards`, `meta`, `dicts`).
fn named_in_manifest(state: &Path, kind: &str) -> PathBuf {
    let text = fs::read_to_string(state.join("MANIFEST")).unwrap();
    let body = text.trim_end().rsplit_once('\n').unwrap().0;
    let m: serde_json::Value = serde_json::from_str(body).unwrap();
    let entry = if m[kind].is_array() { &m[kind][0] } else { &m[kind] };
    let file = entry["file"].as_str().unwrap_or_else(|| panic!("no {kind} in the manifest"));
    state.join("ckpt").join(file)
}

#[test]
fn damaged_state_is_refused_naming_the_file() {
    let f = fixture("50ms");
    let good = committed_state(&f);
    type Damage = fn(&Path) -> PathBuf;
    let cases: &[(&str, Damage)] = &[
        ("manifest byte flipped", |s| {
            flip_byte(&s.join("MANIFEST"), 40);
            s.join("MANIFEST")
        }),
        ("manifest truncated", |s| {
            truncate_half(&s.join("MANIFEST"));
            s.join("MANIFEST")
        }),
        ("table base byte flipped", |s| {
            let p = named_in_manifest(s, "tables");
            flip_byte(&p, 4096);
            p
        }),
        ("table base truncated", |s| {
            let p = named_in_manifest(s, "tables");
            truncate_half(&p);
            p
        }),
        ("shard state byte flipped", |s| {
            let p = named_in_manifest(s, "shards");
            flip_byte(&p, 3);
            p
        }),
        ("meta removed", |s| {
            let p = named_in_manifest(s, "meta");
            fs::remove_file(&p).unwrap();
            p
        }),
        ("key log truncated", |s| {
            let p = named_in_manifest(s, "dicts");
            fs::write(&p, b"").unwrap();
            p
        }),
    ];
    for (i, (what, damage)) in cases.iter().enumerate() {
        let copy = f.dir.path().join(format!("damaged-{i}"));
        copy_dir(&good, &copy);
        let file = damage(&copy);
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let (code, log) = f.run_to_end(&f.job, &copy);
        assert_eq!(code, Some(2), "{what}: expected a refusal:\n{log}");
        assert!(log.contains(&name) && log.contains("damaged"), "{what}: the message names {name}:\n{log}");
        assert!(!log.contains("panicked"), "{what}: {log}");
    }
    // The undamaged state still resumes, to the same rows.
    let (code, log) = f.run_to_end(&f.job, &good);
    assert_eq!(code, Some(0), "{log}");
    f.assert_same_rows("undamaged state after the refusals");
}

#[test]
fn changed_job_or_input_and_a_held_lock_are_refused() {
    let f = fixture("50ms");
    let good = committed_state(&f);
    let mut changed = job_def(&f.files, "50ms");
    changed.metrics[0] = MetricDef::new("page_uv", &["page", "platform"]).filter("event = 'view'");
    let changed = changed.write(f.dir.path(), "changed");
    let (code, log) = f.run_to_end(&changed, &good);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains(r#"metrics["page_uv"].group_by"#) && log.contains("job changed"), "{log}");

    {
        let _held = tally::checkpoint::StateDir::open(&good).expect("open the state directory");
        let (code, log) = f.run_to_end(&f.job, &good);
        assert_eq!(code, Some(2), "{log}");
        assert!(log.contains("in use by another tally process"), "{log}");
    }

    use std::io::Write;
    let mut input = fs::OpenOptions::new().append(true).open(&f.files[0]).unwrap();
    input.write_all(b"{\"ts\":1771171200000,\"did\":\"late\",\"page\":\"p1\",\"event\":\"view\"}\n").unwrap();
    drop(input);
    let (code, log) = f.run_to_end(&f.job, &good);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("input changed") && log.contains("changed size"), "{log}");
}

/// A checkpoint cut by 2 workers resumes with 1 or 3: shards only
/// partition devices, so re-sharding is exact.
#[test]
fn another_worker_count_resumes_by_resharding() {
    let f = fixture("50ms");
    let good = committed_state(&f);
    for workers in ["1", "3"] {
        let copy = f.dir.path().join(format!("reshard-{workers}"));
        copy_dir(&good, &copy);
        let out = tally([
            "run".as_ref(),
            "--workers".as_ref(),
            workers.as_ref(),
            "--job".as_ref(),
            f.job.path.as_os_str(),
            "--state-dir".as_ref(),
            copy.as_os_str(),
        ]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        assert!(out.stderr.contains("re-sharded into"), "{}", out.stderr);
        f.assert_same_rows(&format!("resumed with {workers} workers"));
    }
}

/// Two sources (JSON lines in 3 files, binary in 2) whose blocks interleave,
/// with late events folded by the watermark of the block before: the cut
/// must restore each source's position and watermark base exactly.
#[test]
fn restart_with_two_sources_and_late_events_rewrites_same_rows() {
    let dir = tempdir();
    let client = generate(
        &dir.path().join("client"),
        GenOptions { files: 3, late_fraction: 0.01, seed: 11, ..gen_options(600_000) },
    );
    let server = generate(
        &dir.path().join("server"),
        GenOptions { files: 2, format: GenFormat::Binary, late_fraction: 0.01, seed: 12, ..gen_options(900_000) },
    );
    let def = |interval: &str| {
        let mut d = job_def(&client, interval);
        d.sources.push(SourceDef {
            name: "server".into(),
            paths: server.clone(),
            format: "binary".into(),
            max_out_of_orderness: "2m".into(),
            max_line_bytes: None,
        });
        d
    };
    let plain = def("0").write(dir.path(), "plain");
    let summary = run(&plain, 2);
    let late = count(summary.ok(), "late_folded");
    assert!(late > 0, "the data has late events");
    let want = fs::read(&plain.results).unwrap();
    let job = def("50ms").write(dir.path(), "ckpt");
    let f = Fixture { dir, files: client.clone(), job, want, events: count(summary.ok(), "events") };
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let state = f.state();
    let mut kills = 0;
    while kills < 4 {
        let mut child = f.spawn(&f.job, &state, &[], "two.log");
        std::thread::sleep(Duration::from_millis(rng.random_range(20..150)));
        // Kill after a checkpoint at least, so runs make progress.
        let waited = Instant::now();
        while !state.join("MANIFEST").exists() && waited.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(2));
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    assert!(kills > 0, "seed {seed}: no run was killed mid-way");
    let (code, log) = f.run_to_end(&f.job, &state);
    assert_eq!(code, Some(0), "seed {seed}: {log}");
    assert!(log.contains("resumed from checkpoint"), "seed {seed}: {log}");
    eprintln!("seed {seed}: {kills} kills; last run: {log}");
    f.assert_same_rows(&format!("seed {seed}, {kills} kills, two sources"));
    let s: serde_json::Value = serde_json::from_slice(&fs::read(&f.job.summary).unwrap()).unwrap();
    assert_eq!(count(&s, "events"), f.events, "seed {seed}");
    assert_eq!(count(&s, "late_folded"), late, "seed {seed}: late events counted once");
}

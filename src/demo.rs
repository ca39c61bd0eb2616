//! `tally demo`: the first thing a newcomer runs. Generates a peak-shaped
//! day of events, runs the embedded job, checks every row against the
//! offline recomputation, and shows throughput, the day's top pages and the
//! UV curve.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::gen::{generate, GenOptions, GenShape};
use crate::job::Job;

/// The demo's job: page PV/UV of views, and all-events PV/UV, by day in +08:00.
pub const DEMO_JOB: &str = r#"
[job]
timezone = "+08:00"

[[source]]
name = "client"
kind = "file"
path = "events.jsonl"
format = "jsonl"
max_out_of_orderness = "5m"

[[metric]]
name = "page_uv"
kind = "cumulate"
group_by = ["page"]
filter = "event = 'view'"
measures = ["pv", "uv"]

[[metric]]
name = "total_uv"
kind = "cumulate"
measures = ["pv", "uv"]

[[sink]]
kind = "jsonl"
path = "out/results.jsonl"
"#;

/// 2026-02-16T00:00:00+08:00: the demo day.
const DEMO_DAY_START_MS: i64 = 1_771_171_200_000;

#[derive(clap::Args, Debug, Clone)]
pub struct DemoOptions {
    /// Events to generate.
    #[arg(long, default_value_t = 3_000_000)]
    pub events: u64,
    /// Distinct devices.
    #[arg(long, default_value_t = 300_000)]
    pub devices: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Keep data and results in this directory (default: a temporary one, removed).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Runs the demo; returns whether verification passed.
pub fn run(opts: &DemoOptions, out: &mut impl Write) -> Result<bool> {
    let (dir, temporary) = match &opts.dir {
        Some(d) => (d.clone(), false),
        None => (std::env::temp_dir().join(format!("tally-demo-{}", std::process::id())), true),
    };
    let result = run_in(opts, &dir, out);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn run_in(opts: &DemoOptions, dir: &Path, out: &mut impl Write) -> Result<bool> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let gen = GenOptions {
        events: opts.events,
        devices: opts.devices,
        out: dir.to_path_buf(),
        start_ms: DEMO_DAY_START_MS,
        duration: "1d".into(),
        shape: GenShape::Peak,
        disorder: "2m".into(),
        ..GenOptions::default()
    };
    writeln!(out, "tally demo: generating {} events over one day in {}", opts.events, dir.display())?;
    let g = generate(&gen)?;
    writeln!(out, "  {} MB of JSON lines in {:.1} s", g.bytes / 1_000_000, g.seconds)?;
    let job_path = dir.join("job.toml");
    std::fs::write(&job_path, DEMO_JOB)?;
    let mut job = Job::load(&job_path)?;
    if let Some(w) = opts.workers {
        job.workers = w.max(1);
    }
    let summary = crate::runtime::run(&job)?;
    writeln!(
        out,
        "tally run: {} events in {:.2} s = {:.2} M events/s on {} workers ({} MB/s), {} rows",
        summary.events,
        summary.seconds,
        summary.events_per_second / 1e6,
        summary.workers,
        (summary.input_bytes as f64 / summary.seconds.max(1e-9) / 1e6) as u64,
        summary.rows
    )?;
    let results = dir.join("out/results.jsonl");
    let report = crate::verify::verify(&job, &results)?;
    writeln!(out, "tally verify (offline recomputation, every row):")?;
    report.print(out)?;
    show(&results, out)?;
    Ok(report.ok())
}

/// Prints the top pages at the day's last window and the UV curve.
fn show(results: &Path, out: &mut impl Write) -> Result<()> {
    let text = std::fs::read_to_string(results)?;
    let rows: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let day_end = DEMO_DAY_START_MS + 86_400_000;
    let of = |metric: &str| -> Vec<&serde_json::Value> {
        rows.iter().filter(|r| r["metric"] == metric && r["window_start"] == DEMO_DAY_START_MS).collect()
    };
    let pages = of("page_uv");
    let last_end = pages.iter().filter_map(|r| r["window_end"].as_i64()).max().unwrap_or(day_end);
    let mut top: Vec<(&str, u64, u64)> = pages
        .iter()
        .filter(|r| r["window_end"] == last_end)
        .map(|r| {
            (r["dims"]["page"].as_str().unwrap_or("?"), r["pv"].as_u64().unwrap_or(0), r["uv"].as_u64().unwrap_or(0))
        })
        .collect();
    top.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)));
    writeln!(out, "\ntop pages of the day by UV (views):")?;
    for (page, pv, uv) in top.iter().take(8) {
        writeln!(out, "  {page:<6} uv {uv:>9}  pv {pv:>10}")?;
    }
    writeln!(out, "\ncumulative UV of the day (all events), hourly, +08:00:")?;
    let curve: Vec<(i64, u64)> = of("total_uv")
        .iter()
        .filter_map(|r| Some((r["window_end"].as_i64()?, r["uv"].as_u64()?)))
        .filter(|(end, _)| (end - DEMO_DAY_START_MS) % 3_600_000 == 0)
        .collect();
    let max = curve.iter().map(|c| c.1).max().unwrap_or(1).max(1);
    const WIDTH: u64 = 50;
    for (end, uv) in curve {
        let hour = (end - DEMO_DAY_START_MS) / 3_600_000;
        let bar = "█".repeat((uv * WIDTH / max) as usize);
        writeln!(out, "  {hour:02}:00 {bar:<50} {uv}")?;
    }
    Ok(())
}

//! The `tally` command: parse arguments, call the library, map errors to
//! exit codes (0 ok, 1 failed or verification mismatch, 2 bad job or usage).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tally::job::Job;

#[derive(Parser)]
#[command(name = "tally", version, about = "Exact real-time warehouse metrics (cumulative PV/UV) from event logs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job over its input files and write every window's rows.
    Run(RunArgs),
    /// Run a job as a daemon: as `run`, and its rows answer an HTTP API
    /// (`[serve]` in the job: `http`, `token`) until SIGTERM or SIGINT.
    Serve(RunArgs),
    /// Recompute a job's metrics offline and compare every emitted row.
    Verify {
        #[arg(long)]
        job: PathBuf,
        /// Result rows (JSON lines) written by `tally run`.
        #[arg(long)]
        results: PathBuf,
        /// Read source NAME from these files instead (repeatable; needed
        /// for a Kafka source: dump its topics to a file first, one message
        /// per line, in any order within a partition's order).
        #[arg(long, value_name = "NAME=PATH")]
        input: Vec<String>,
        /// Read dimension NAME from this CSV or JSON-lines file instead
        /// (repeatable; needed for a Kafka dimension: its table as a file).
        #[arg(long, value_name = "NAME=PATH")]
        dimension: Vec<String>,
    },
    /// Sum the rows of instances that each own a disjoint set of devices
    /// (one consumer group over a topic partitioned by device) into the
    /// rows one instance over everything writes.
    Merge {
        /// Result files (JSON lines) of the instances.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Where the merged rows go ("-": stdout).
        #[arg(long)]
        out: PathBuf,
        /// The instances' job: rows ordered by its metrics, its emit modes applied.
        #[arg(long)]
        job: Option<PathBuf>,
    },
    /// A DAU metric's device history, kept in a state directory.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Generate deterministic synthetic event logs.
    Gen(tally::gen::GenOptions),
    /// Generate a day of events, run the embedded job, verify, and show it.
    Demo(tally::demo::DemoOptions),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The job file (TOML).
    #[arg(long)]
    job: PathBuf,
    /// Worker threads (default: the job's `workers`, else all cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Keep state here (memory-mapped tables, checkpoints) and resume
    /// from its checkpoint if it has one.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Also write the run summary as JSON to this file when the run ends.
    #[arg(long)]
    summary: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Write the history as of the last checkpoint as `did,first_day,last_day`
    /// CSV (what `device_history` imports), sorted by device id.
    Export {
        /// The job that wrote the state directory.
        #[arg(long)]
        job: PathBuf,
        #[arg(long)]
        state_dir: PathBuf,
        /// The DAU metric (needed when the job has several).
        #[arg(long)]
        metric: Option<String>,
        /// Where the CSV goes ("-": stdout).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Lifts the soft limit on open files to the hard one, as servers do: a
/// TCP source holds a descriptor per client connection.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run(_) | Command::Serve(_)) {
        raise_open_files_limit();
    }
    match cli.command {
        Command::Run(a) => run(a),
        Command::Serve(a) => serve(a),
        Command::Verify { job, results, input, dimension } => verify(job, results, &input, &dimension),
        Command::Merge { inputs, out, job } => merge(&inputs, &out, job),
        Command::Devices { command: DevicesCommand::Export { job, state_dir, metric, out } } => {
            let job = match load(&job) {
                Ok(j) => j,
                Err(code) => return code,
            };
            match tally::devices::export(&job, &state_dir, metric.as_deref(), &out) {
                Ok(r) => {
                    eprintln!(
                        "tally devices export: {} devices of metric {:?} (checkpoint {}) -> {}",
                        r.devices,
                        r.metric,
                        r.generation,
                        out.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e @ tally::devices::ExportError::Usage(_)) => fail(2, e.to_string()),
                Err(e) => fail(1, e.to_string()),
            }
        }
        Command::Gen(opts) => match tally::gen::generate(&opts) {
            Ok(r) => {
                let whereto = match &opts.to {
                    Some(to) => format!("sent to {to} on {} connection(s)", opts.connections),
                    None => format!("in {} file(s)", r.files.len()),
                };
                eprintln!(
                    "tally gen: {} events, {} bytes {whereto}, {:.2} s ({:.1} M events/s)",
                    r.events,
                    r.bytes,
                    r.seconds,
                    r.events as f64 / r.seconds.max(1e-9) / 1e6
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(1, format!("{e:#}")),
        },
        Command::Demo(opts) => match tally::demo::run(&opts, &mut std::io::stdout()) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => fail(1, format!("{e:#}")),
        },
    }
}

fn fail(code: u8, msg: String) -> ExitCode {
    eprintln!("tally: error: {msg}");
    ExitCode::from(code)
}

fn load(path: &std::path::Path) -> Result<Job, ExitCode> {
    Job::load(path).map_err(|e| fail(2, e.to_string()))
}

/// The job with the command line's overrides, and the flag SIGTERM and
/// SIGINT set (finish the batch, checkpoint, exit 0; a second SIGINT exits
/// at once).
fn prepare(
    job: &std::path::Path,
    workers: Option<usize>,
    state_dir: Option<PathBuf>,
) -> Result<(Job, std::sync::Arc<std::sync::atomic::AtomicBool>), ExitCode> {
    let mut job = load(job)?;
    if let Some(w) = workers {
        if w == 0 {
            return Err(fail(2, "--workers must be at least 1".into()));
        }
        job.workers = w;
    }
    if state_dir.is_some() {
        job.state_dir = state_dir;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone());
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    Ok((job, stop))
}

fn run(RunArgs { job, workers, state_dir, summary }: RunArgs) -> ExitCode {
    let (job, stop) = match prepare(&job, workers, state_dir) {
        Ok(p) => p,
        Err(code) => return code,
    };
    ended(tally::runtime::run_until(&job, &stop), summary)
}

fn serve(RunArgs { job, workers, state_dir, summary }: RunArgs) -> ExitCode {
    let (job, stop) = match prepare(&job, workers, state_dir) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let live = tally::serve::Live::new(&job);
    let addr = job.serve.as_ref().map_or(tally::job::SERVE_HTTP_DEFAULT, |s| s.http.as_str());
    let server = match tally::serve::Server::start(addr, live.clone()) {
        Ok(s) => s,
        Err(e) => return fail(2, e),
    };
    eprintln!("tally serve: HTTP API on http://{}", server.addr);
    let result = tally::runtime::run_with(&job, &stop, Some(live));
    if result.as_ref().is_ok_and(|s| !s.stopped) {
        // The input ended (files only): the rows stay up until a signal.
        eprintln!("tally serve: input done; serving until SIGTERM or SIGINT");
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    drop(server);
    ended(result, summary)
}

/// Prints a run's summary and maps its outcome to an exit code.
fn ended(result: Result<tally::runtime::RunSummary, tally::runtime::RunError>, summary: Option<PathBuf>) -> ExitCode {
    match result {
        Ok(s) => {
            let _ = s.print(&mut std::io::stderr());
            if let Some(p) = summary {
                let text = serde_json::to_string_pretty(&s).unwrap_or_default();
                if let Err(e) = std::fs::write(&p, text) {
                    return fail(1, format!("cannot write summary {}: {e}", p.display()));
                }
            }
            if s.stopped && s.checkpoints.generation.is_none() {
                return fail(1, "stopped by a signal; without a state directory progress is not saved".into());
            }
            ExitCode::SUCCESS
        }
        Err(
            e @ (tally::runtime::RunError::Input(_)
            | tally::runtime::RunError::State(_)
            | tally::runtime::RunError::History(_)
            | tally::runtime::RunError::Kafka(_)
            | tally::runtime::RunError::Dimension { .. }
            | tally::runtime::RunError::SinkOpen(_)),
        ) => fail(2, e.to_string()),
        Err(e) => fail(1, e.to_string()),
    }
}

fn merge(inputs: &[PathBuf], out: &std::path::Path, job: Option<PathBuf>) -> ExitCode {
    let job = match job.as_deref().map(load).transpose() {
        Ok(j) => j,
        Err(code) => return code,
    };
    let inputs: Vec<&std::path::Path> = inputs.iter().map(PathBuf::as_path).collect();
    let result = if out.as_os_str() == "-" {
        tally::merge::merge(&inputs, job.as_ref(), &mut std::io::stdout().lock())
    } else {
        std::fs::File::create(out).map_err(anyhow::Error::from).map(std::io::BufWriter::new).and_then(|mut w| {
            tally::merge::merge(&inputs, job.as_ref(), &mut w).and_then(|r| {
                std::io::Write::flush(&mut w)?;
                Ok(r)
            })
        })
    };
    match result {
        Ok(r) => {
            eprintln!("tally merge: {} rows from {} inputs -> {} rows", r.rows_in, inputs.len(), r.rows_out);
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, format!("merge: {e:#}")),
    }
}

fn verify(job: PathBuf, results: PathBuf, inputs: &[String], dimensions: &[String]) -> ExitCode {
    let mut job = match load(&job) {
        Ok(j) => j,
        Err(code) => return code,
    };
    for arg in inputs {
        let Some((name, path)) = arg.split_once('=') else {
            return fail(2, format!("--input {arg:?}: expected NAME=PATH"));
        };
        if let Err(e) = job.read_source_from(name, PathBuf::from(path)) {
            return fail(2, format!("--input {arg:?}: {e}"));
        }
    }
    for arg in dimensions {
        let Some((name, path)) = arg.split_once('=') else {
            return fail(2, format!("--dimension {arg:?}: expected NAME=PATH"));
        };
        if let Err(e) = job.read_dimension_from(name, PathBuf::from(path)) {
            return fail(2, format!("--dimension {arg:?}: {e}"));
        }
    }
    match tally::verify::verify(&job, &results) {
        Ok(report) => {
            let _ = report.print(&mut std::io::stdout());
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => fail(1, format!("{e:#}")),
    }
}

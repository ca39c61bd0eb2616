//! A real `redis-server` (Debian package `redis-server`) for the tests.
//!
//! [`Redis::start`] starts one for the calling test on 127.0.0.1 and a free
//! port, without persistence (`--save '' --appendonly no`), its log in its
//! own temporary directory. It is always stopped: [`Drop`] kills and reaps
//! it, also when the test panics, and the kernel kills it if the thread
//! that started it dies (`PR_SET_PDEATHSIG`). [`Redis::pause`] and
//! [`Redis::resume`] freeze and thaw it (`SIGSTOP`/`SIGCONT`): connections
//! stall like a network partition and nothing is lost.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::kafka::free_port;

const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Redis {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::Builder::new().prefix("tally-redis-").tempdir().expect("temporary directory");
        let log = dir.path().join("redis.log");
        for _ in 0..5 {
            let port = free_port();
            let mut cmd = Command::new("redis-server");
            cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
                .args(["--daemonize", "no", "--logfile"])
                .arg(&log)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: prctl and getppid are async-signal-safe.
            unsafe {
                let parent = libc::getpid();
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::getppid() != parent {
                        libc::_exit(1);
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}); install it: apt-get install redis-server (.ci/run does)")
            });
            let mut r = Redis { child, port, _dir: tempfile::tempdir().unwrap(), log: log.clone() };
            let started = Instant::now();
            while started.elapsed() < READY_TIMEOUT {
                if let Ok(Some(_)) = r.child.try_wait() {
                    break; // exited: the port was taken meanwhile; try another
                }
                if r.client().get_connection().and_then(|mut c| redis::cmd("PING").query::<String>(&mut c)).is_ok() {
                    r._dir = dir;
                    return r;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis-server did not start; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("a Redis URL")
    }

    pub fn conn(&self) -> redis::Connection {
        self.client().get_connection().expect("cannot connect to the test redis-server")
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "cannot signal redis-server: {}", std::io::Error::last_os_error());
    }

    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    pub fn log_tail(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Talking to `tally serve`: its process and its HTTP API.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{JobFile, TALLY};

/// One request with `Connection: close`; (status, body).
pub fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to tally serve");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// `s` percent-encoded for a query string.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A running `tally serve`, killed if the test ends without stopping it
/// (a failed assertion must not leave a daemon behind).
pub struct Daemon(Option<Child>);

impl Daemon {
    /// SIGTERM, then waits for the exit: (status, log).
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let mut child = self.0.take().expect("running");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().expect("wait for tally serve");
        let mut log = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut log);
        }
        (status, log)
    }

    /// SIGTERM; the exit must be 0. Returns the log.
    pub fn stop(self) -> String {
        let (status, log) = self.terminate();
        assert!(status.success(), "exit {status}: {log}");
        log
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A child process killed if the test ends before it exits.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tally serve` on `job` with more arguments; its stderr is piped.
pub fn spawn_serve(job: &JobFile, extra: &[&OsStr]) -> Daemon {
    let child = std::process::Command::new(TALLY)
        .args([OsStr::new("serve"), OsStr::new("--job"), job.path.as_os_str()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tally serve");
    Daemon(Some(child))
}

/// Waits until `/readyz` answers 200 (503 until then), at most 60 s.
pub fn wait_ready(port: u16) {
    let started = Instant::now();
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            let (status, body) = get(port, "/readyz", None);
            if status == 200 {
                return;
            }
            assert_eq!(status, 503, "{body}");
        }
        assert!(started.elapsed() < Duration::from_secs(60), "tally serve never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

//! Talking to `tally serve`: its process and its HTTP API.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
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

/// `tally serve` on `job` with more arguments; its stderr is piped.
pub fn spawn_serve(job: &JobFile, extra: &[&OsStr]) -> std::process::Child {
    std::process::Command::new(TALLY)
        .args([OsStr::new("serve"), OsStr::new("--job"), job.path.as_os_str()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tally serve")
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

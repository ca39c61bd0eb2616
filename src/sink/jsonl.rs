//! JSON-lines sink: one row per line, to a file or stdout.

use std::fs::File;
use std::io::{self, BufWriter, Write};

use crate::job::{SinkSpec, SinkTarget};

/// Output buffer size: rows are small and many.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

pub struct JsonlSink {
    out: BufWriter<Box<dyn Write + Send>>,
    /// `wants[m]`: whether metric `m` goes here.
    wants: Vec<bool>,
    pub rows: u64,
    name: String,
}

/// A sink that could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("sink {name}: {source}")]
pub struct SinkError {
    pub name: String,
    pub source: io::Error,
}

impl JsonlSink {
    /// Opens the target (creating parent directories) before anything runs.
    pub fn open(spec: &SinkSpec, metrics: usize) -> Result<JsonlSink, SinkError> {
        let (out, name): (Box<dyn Write + Send>, String) = match &spec.target {
            SinkTarget::Stdout => (Box::new(io::stdout()), "stdout".into()),
            SinkTarget::File(p) => {
                let name = p.display().to_string();
                let err = |source| SinkError { name: name.clone(), source };
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(err)?;
                }
                (Box::new(File::create(p).map_err(err)?), name)
            }
        };
        let mut wants = vec![false; metrics];
        for &m in &spec.metrics {
            wants[m] = true;
        }
        Ok(JsonlSink { out: BufWriter::with_capacity(WRITE_BUFFER_BYTES, out), wants, rows: 0, name })
    }

    pub fn write(&mut self, metric: usize, line: &str) -> Result<(), SinkError> {
        if self.wants[metric] {
            self.rows += 1;
            self.out.write_all(line.as_bytes()).map_err(|source| SinkError { name: self.name.clone(), source })?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().map_err(|source| SinkError { name: self.name.clone(), source })
    }
}

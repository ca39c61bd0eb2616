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
    /// Bytes of output so far (including what a resumed run kept).
    pub bytes: u64,
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
    /// `resume_bytes`: a resumed run keeps that much of an existing output
    /// file (what its checkpoint had written) and appends after it; rows
    /// past it are written again, with the same values.
    pub fn open(spec: &SinkSpec, metrics: usize, resume_bytes: Option<u64>) -> Result<JsonlSink, SinkError> {
        let (out, name): (Box<dyn Write + Send>, String) = match &spec.target {
            SinkTarget::Stdout => (Box::new(io::stdout()), "stdout".into()),
            SinkTarget::Kafka(_) | SinkTarget::Redis(_) => {
                let source = io::Error::other("not a JSON-lines sink");
                return Err(SinkError { name: crate::checkpoint::identity::sink_target(&spec.target), source });
            }
            SinkTarget::File(p) => {
                let name = p.display().to_string();
                let err = |source| SinkError { name: name.clone(), source };
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(err)?;
                }
                let file = match resume_bytes {
                    None => File::create(p).map_err(err)?,
                    Some(keep) => reopen(p, keep).map_err(err)?,
                };
                (Box::new(file), name)
            }
        };
        let mut wants = vec![false; metrics];
        for &m in &spec.metrics {
            wants[m] = true;
        }
        let bytes = resume_bytes.unwrap_or(0);
        Ok(JsonlSink { out: BufWriter::with_capacity(WRITE_BUFFER_BYTES, out), wants, rows: 0, bytes, name })
    }

    pub fn write(&mut self, metric: usize, line: &str) -> Result<(), SinkError> {
        if self.wants[metric] {
            self.rows += 1;
            self.bytes += line.len() as u64;
            self.out.write_all(line.as_bytes()).map_err(|source| SinkError { name: self.name.clone(), source })?;
        }
        Ok(())
    }

    /// Lines rendered elsewhere (`rows` of them), written as they are.
    pub fn write_raw(&mut self, text: &[u8], rows: u64) -> Result<(), SinkError> {
        self.rows += rows;
        self.bytes += text.len() as u64;
        self.out.write_all(text).map_err(|source| SinkError { name: self.name.clone(), source })
    }

    pub fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().map_err(|source| SinkError { name: self.name.clone(), source })
    }
}

/// Opens an output file a checkpoint had written `keep` bytes of, cut back
/// to that length, for appending.
fn reopen(path: &std::path::Path, keep: u64) -> io::Result<File> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| {
        io::Error::new(e.kind(), format!("the checkpoint had written {keep} bytes to it, but it cannot be opened: {e}"))
    })?;
    let len = f.metadata()?.len();
    if len < keep {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes, but the checkpoint had written {keep}: the output was cut or replaced"),
        ));
    }
    f.set_len(keep)?;
    f.seek(SeekFrom::End(0))?;
    Ok(f)
}

//! What must not change between a checkpoint and the run that resumes it:
//! what the job computes, and the input files already read.
//!
//! A resumed run compares the job's identity (sources, metrics, time zone,
//! sinks: everything that changes a result row) with the one the manifest
//! recorded and refuses any difference, naming it. Settings that change
//! only how fast or where state lives (`checkpoint_interval`, `state_dir`)
//! are not part of it. Input files are compared by path, inode, size and
//! modification time.

use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::job::{Emit, Job, LatePolicy, SinkTarget};

/// An input file as it was when the checkpoint was taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: String,
    pub inode: u64,
    pub size: u64,
    pub mtime_ns: i64,
}

impl FileIdentity {
    pub fn of(path: &std::path::Path, md: &std::fs::Metadata) -> FileIdentity {
        FileIdentity {
            path: absolute(path),
            inode: md.ino(),
            size: md.len(),
            mtime_ns: md.mtime().saturating_mul(1_000_000_000).saturating_add(md.mtime_nsec()),
        }
    }

    /// How `now` differs from this file, if it does.
    pub fn change(&self, now: &FileIdentity) -> Option<String> {
        if self.path != now.path {
            Some(format!("file {} is now {}", self.path, now.path))
        } else if self.inode != now.inode {
            Some(format!("{} was replaced (another inode)", self.path))
        } else if self.size != now.size {
            Some(format!("{} changed size from {} to {} bytes", self.path, self.size, now.size))
        } else if self.mtime_ns != now.mtime_ns {
            Some(format!("{} was modified", self.path))
        } else {
            None
        }
    }
}

/// Everything in a job that changes its result rows, as JSON.
pub fn job_identity(job: &Job) -> Value {
    let sources: Vec<Value> = job
        .sources
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "paths": s.paths.iter().map(|p| absolute(p)).collect::<Vec<_>>(),
                "follow": s.follow.as_ref().map(|f| f.paths.iter().map(|p| absolute(p)).collect::<Vec<_>>()),
                "format": s.format.name(),
                "max_out_of_orderness_ms": s.max_out_of_orderness_ms,
                "max_line_bytes": s.max_line_bytes,
                "ts_field": s.ts_field,
                "did_field": s.did_field,
                "binary_dims": s.binary_dims,
                "kafka_topics": s.kafka.as_ref().map(|k| &k.topics),
                "csv_columns": s.is_stream().then_some(s.csv_header.as_ref()).flatten(),
            })
        })
        .collect();
    let metrics: Vec<Value> = job
        .metrics
        .iter()
        .map(|m| {
            json!({
                "name": m.name,
                "kind": m.kind(),
                "window": m.summary.as_ref().map(|s| format!("{:?}", s.window).to_lowercase()),
                "grouping_set": m.summary.as_ref().map(|s| s.set),
                "returning_after_days": m.dau.as_ref().map(|d| d.returning_after_days),
                "dedup_tolerance": m.dau.as_ref().map(|d| d.dedup_tolerance),
                "device_history": m.dau.as_ref().and_then(|d| d.device_history.as_ref()).map(|p| absolute(p)),
                "group_by": m.group_by,
                "filter": m.filter.as_ref().map(|f| f.text.clone()),
                "measures": m.measures.iter().map(|&x| m.measure_field(x)).collect::<Vec<_>>(),
                "step_ms": m.step_ms,
                "size_ms": m.size_ms,
                "emit": match m.emit { Emit::All => "all", Emit::Changed => "changed" },
                "late": match m.late { LatePolicy::Fold => "fold", LatePolicy::Drop => "drop" },
                "sources": m.sources.iter().map(|&s| job.sources[s].name.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let sinks: Vec<Value> = job
        .sinks
        .iter()
        .map(|s| {
            json!({
                "target": sink_target(&s.target),
                "metrics": s.metrics.iter().map(|&m| job.metrics[m].name.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    // What a table holds is read at processing time; which tables, joined
    // how, is part of the job.
    let dimensions: Vec<Value> = job
        .dimensions
        .iter()
        .map(|d| {
            json!({
                "name": d.name,
                "key": d.key,
                "fields": d.fields,
                "on_missing": format!("{:?}", d.on_missing).to_lowercase(),
            })
        })
        .collect();
    json!({
        "timezone_offset_ms": job.timezone_offset_ms,
        "sources": sources,
        "dimensions": dimensions,
        "metrics": metrics,
        "sinks": sinks,
    })
}

pub fn sink_target(t: &SinkTarget) -> String {
    match t {
        SinkTarget::Stdout => "-".into(),
        SinkTarget::File(p) => absolute(p),
        SinkTarget::Kafka(k) => format!("kafka:{}", k.topic),
        SinkTarget::Redis(r) => format!("redis:{}/{}", r.url, r.key_prefix),
    }
}

/// A path as the same file is named from any working directory.
pub fn absolute(p: &std::path::Path) -> String {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned()).display().to_string()
}

/// Where `now` differs from `was`, as `path: was X, now Y` lines (at most
/// `max` of them).
pub fn differences(was: &Value, now: &Value, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    diff(was, now, String::new(), &mut out, max);
    out
}

fn diff(was: &Value, now: &Value, path: String, out: &mut Vec<String>, max: usize) {
    if out.len() >= max || was == now {
        return;
    }
    let name = |was: &Value, key: &str| -> String {
        match was.get("name").and_then(Value::as_str) {
            Some(n) => format!("{key}[{n:?}]"),
            None => key.to_owned(),
        }
    };
    match (was, now) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match b.get(k) {
                    Some(vb) => diff(va, vb, p, out, max),
                    None => out.push(format!("{p}: no longer set")),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{k}: new"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.iter().chain(b).all(|v| v.get("name").is_some()) => {
            let before = out.len();
            for va in a {
                let n = va.get("name");
                match b.iter().find(|vb| vb.get("name") == n) {
                    Some(vb) => diff(va, vb, name(va, &path), out, max),
                    None => out.push(format!("{}: removed", name(va, &path))),
                }
            }
            for vb in b.iter().filter(|vb| !a.iter().any(|va| va.get("name") == vb.get("name"))) {
                out.push(format!("{}: added", name(vb, &path)));
            }
            if out.len() == before {
                out.push(format!("{path}: order changed"));
            }
        }
        _ => out.push(format!("{path}: was {was}, now {now}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_the_metric_and_field() {
        let was = json!({"metrics": [{"name": "page_uv", "group_by": ["page"]}]});
        let now = json!({"metrics": [{"name": "page_uv", "group_by": ["page", "platform"]}, {"name": "x"}]});
        let d = differences(&was, &now, 10);
        assert_eq!(
            d,
            [r#"metrics["page_uv"].group_by: was ["page"], now ["page","platform"]"#, r#"metrics["x"]: added"#]
        );
    }
}

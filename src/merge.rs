//! `tally merge`: the rows of several instances that each own a disjoint
//! set of devices (one consumer group over a topic partitioned by device),
//! summed into the rows one instance over all the input would write.
//!
//! Distinct counts add up because no device is counted by two instances.
//! Each input is read as upserts (the last row of a (metric, window, key)
//! wins). An instance writes a key only where it has data (and with
//! `emit = "changed"` only where it changed), so the value of an instance
//! at a window end is its latest row at or before it in the same period;
//! the merged row is the sum of those (`min_*` / `max_*` measures: the
//! least / greatest). Rows come out in the engine's order: window end,
//! metric (the job's order), key.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::job::{Emit, Job};

/// The identifying part of a row.
#[derive(Deserialize)]
struct Head<'a> {
    metric: String,
    window_start: i64,
    window_end: i64,
    #[serde(borrow)]
    grouping: Option<&'a RawValue>,
    #[serde(borrow)]
    dims: &'a RawValue,
}

/// A JSON object's fields in the order written (measures keep theirs).
struct Fields(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Fields, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Fields of a row that are not measures.
const HEAD_FIELDS: [&str; 5] = ["metric", "window_start", "window_end", "grouping", "dims"];

/// A key's rows in one period of one input: window end → measures.
type Series = BTreeMap<i64, Vec<(String, Value)>>;

/// (metric, period start, grouping + dims as written) → per input, its series.
type Keyed = BTreeMap<(String, i64, String), Vec<Series>>;

/// What a merge did.
#[derive(Debug, Default)]
pub struct MergeReport {
    pub rows_in: u64,
    pub rows_out: u64,
}

/// Merges `inputs` into `out`; with a job, metrics are ordered as in the
/// job and its `emit` modes apply.
pub fn merge(inputs: &[&Path], job: Option<&Job>, out: &mut impl Write) -> Result<MergeReport> {
    let mut keyed: Keyed = BTreeMap::new();
    let mut report = MergeReport::default();
    for (i, path) in inputs.iter().enumerate() {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("{}: cannot read", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{}:{}", path.display(), n + 1);
            let head: Head = serde_json::from_str(&line).with_context(|| format!("{}: not a result row", at()))?;
            let Fields(all) = serde_json::from_str(&line).with_context(at)?;
            let measures: Vec<(String, Value)> =
                all.into_iter().filter(|(k, _)| !HEAD_FIELDS.contains(&k.as_str())).collect();
            let key = match head.grouping {
                Some(g) => format!("\"grouping\":{},\"dims\":{}", g.get(), head.dims.get()),
                None => format!("\"dims\":{}", head.dims.get()),
            };
            let series = keyed.entry((head.metric, head.window_start, key)).or_default();
            series.resize_with(inputs.len(), Series::new);
            series[i].insert(head.window_end, measures);
            report.rows_in += 1;
        }
    }
    let order: Vec<String> = match job {
        Some(j) => j.metrics.iter().map(|m| m.name.clone()).collect(),
        None => keyed.keys().map(|k| k.0.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
    };
    let rank = |metric: &str| order.iter().position(|m| m == metric).unwrap_or(order.len());
    let changed_only = |metric: &str| {
        job.and_then(|j| j.metrics.iter().find(|m| m.name == metric)).is_some_and(|m| m.emit == Emit::Changed)
    };
    // Window ends per (metric, period): every end any input wrote, and
    // with the job every step between the first and the last (one
    // instance's data may end before another's begins).
    let mut ends: BTreeMap<(String, i64), BTreeSet<i64>> = BTreeMap::new();
    for ((metric, start, _), per_input) in &keyed {
        let e = ends.entry((metric.clone(), *start)).or_default();
        for s in per_input {
            e.extend(s.keys());
        }
    }
    for ((metric, _), e) in ends.iter_mut() {
        let step = job.and_then(|j| j.metrics.iter().find(|m| &m.name == metric)).map(|m| m.step_ms);
        if let (Some(step), Some(&first), Some(&last)) = (step, e.first(), e.last()) {
            e.extend((0..=(last - first) / step).map(|k| first + k * step));
        }
    }
    let mut rows: Vec<(i64, usize, String, String)> = Vec::new();
    for ((metric, start, key), per_input) in &keyed {
        let mut last: Option<Vec<(String, Value)>> = None;
        for &end in &ends[&(metric.clone(), *start)] {
            let values: Vec<&Vec<(String, Value)>> =
                per_input.iter().filter_map(|s| s.range(..=end).next_back().map(|(_, v)| v)).collect();
            if values.is_empty() {
                continue;
            }
            let merged = combine(&values);
            if changed_only(metric) && last.as_ref() == Some(&merged) {
                continue;
            }
            let name = serde_json::to_string(metric)?;
            let mut line = format!("{{\"metric\":{name},\"window_start\":{start},\"window_end\":{end},{key}");
            for (k, v) in &merged {
                line.push_str(&format!(",{}:{v}", serde_json::to_string(k)?));
            }
            line.push_str("}\n");
            rows.push((end, rank(metric), key.clone(), line));
            last = Some(merged);
        }
    }
    rows.sort();
    for (_, _, _, line) in &rows {
        out.write_all(line.as_bytes())?;
    }
    report.rows_out = rows.len() as u64;
    Ok(report)
}

/// Measures of several instances' rows combined, in the first row's order.
fn combine(rows: &[&Vec<(String, Value)>]) -> Vec<(String, Value)> {
    let mut names: Vec<&String> = Vec::new();
    for r in rows {
        for (k, _) in r.iter() {
            if !names.contains(&k) {
                names.push(k);
            }
        }
    }
    names
        .into_iter()
        .map(|name| {
            let vals = rows.iter().filter_map(|r| r.iter().find(|(k, _)| k == name)).map(|(_, v)| v);
            (name.clone(), fold(name, vals))
        })
        .collect()
}

/// Sum (or least / greatest for `min_*` / `max_*`) of a measure's non-null values.
fn fold<'a>(name: &str, vals: impl Iterator<Item = &'a Value>) -> Value {
    let nums: Vec<&serde_json::Number> = vals.filter_map(|v| v.as_number()).collect();
    if nums.is_empty() {
        return Value::Null;
    }
    let pick = |better: fn(f64, f64) -> bool| {
        let best = nums.iter().copied().reduce(|a, b| {
            if better(b.as_f64().unwrap_or(0.0), a.as_f64().unwrap_or(0.0)) {
                b
            } else {
                a
            }
        });
        best.map_or(Value::Null, |n| Value::Number(n.clone()))
    };
    if name.starts_with("min_") {
        return pick(|a, b| a < b);
    }
    if name.starts_with("max_") {
        return pick(|a, b| a > b);
    }
    if nums.iter().all(|n| n.is_u64()) {
        return Value::from(nums.iter().map(|n| n.as_u64().unwrap_or(0)).sum::<u64>());
    }
    if nums.iter().all(|n| n.is_i64() || n.is_u64()) {
        return Value::from(nums.iter().map(|n| n.as_i64().unwrap_or(0)).sum::<i64>());
    }
    Value::from(nums.iter().map(|n| n.as_f64().unwrap_or(0.0)).sum::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(inputs: &[&str]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<std::path::PathBuf> = inputs
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let p = dir.path().join(format!("{i}.jsonl"));
                std::fs::write(&p, text).unwrap();
                p
            })
            .collect();
        let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        let mut out = Vec::new();
        merge(&refs, None, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn row(end: i64, page: &str, pv: u64, uv: u64) -> String {
        format!("{{\"metric\":\"m\",\"window_start\":0,\"window_end\":{end},\"dims\":{{\"page\":\"{page}\"}},\"pv\":{pv},\"uv\":{uv}}}\n")
    }

    #[test]
    fn sums_instances_carrying_each_forward_and_taking_the_last_upsert() {
        let a = row(60, "x", 1, 1) + &row(120, "x", 3, 2) + &row(120, "x", 4, 2);
        let b = row(120, "y", 5, 5) + &row(180, "x", 2, 1);
        let got = run(&[&a, &b]);
        let want = row(60, "x", 1, 1)
            + &row(120, "x", 4, 2)
            + &row(120, "y", 5, 5)
            + &row(180, "x", 6, 3)
            + &row(180, "y", 5, 5);
        assert_eq!(got, want);
    }

    #[test]
    fn with_the_job_every_step_between_instances_is_written() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("e.jsonl"), "").unwrap();
        let text = "[[source]]\nname = \"s\"\nkind = \"file\"\npath = \"e.jsonl\"\n\
                    [[metric]]\nname = \"m\"\nkind = \"cumulate\"\ngroup_by = [\"page\"]\n\
                    [[sink]]\nkind = \"jsonl\"\npath = \"-\"\n";
        let job = Job::parse(text, Path::new("job.toml"), dir.path()).unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, row(60_000, "x", 1, 1) + &row(120_000, "x", 2, 1)).unwrap();
        std::fs::write(&b, row(240_000, "y", 3, 3)).unwrap();
        let mut out = Vec::new();
        merge(&[a.as_path(), b.as_path()], Some(&job), &mut out).unwrap();
        let want = row(60_000, "x", 1, 1)
            + &row(120_000, "x", 2, 1)
            + &row(180_000, "x", 2, 1)
            + &row(240_000, "x", 2, 1)
            + &row(240_000, "y", 3, 3);
        assert_eq!(String::from_utf8(out).unwrap(), want);
    }

    #[test]
    fn min_and_max_measures_take_the_extremes_and_nulls_are_skipped() {
        let r = |v: &str| {
            format!("{{\"metric\":\"s\",\"window_start\":0,\"window_end\":60,\"grouping\":[],\"dims\":{{}},{v}}}\n")
        };
        let got = run(&[
            &r("\"count\":2,\"min_a\":3,\"max_a\":9.5,\"sum_a\":null"),
            &r("\"count\":1,\"min_a\":1,\"max_a\":4,\"sum_a\":2.5"),
        ]);
        assert_eq!(got, r("\"count\":3,\"min_a\":1,\"max_a\":9.5,\"sum_a\":2.5"));
    }
}

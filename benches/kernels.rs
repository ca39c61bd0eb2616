//! Kernels of the hot path: the JSON-lines parser, the dedup table (hits and
//! misses, with and without prefetch) and the emitter's slice fold.
//!
//! `cargo bench --bench kernels`; numbers go to PERF.md with the machine.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;

use tally::event::jsonl::JsonlParser;
use tally::event::{EventBuf, FieldSet};
use tally::gen::{generate, GenFormat, GenOptions};
use tally::job::{Emit, LatePolicy, Measure, MetricSpec};
use tally::metric::cumulate::{CumulateEmitter, Geometry, SliceCols};
use tally::metric::keys::KeyDict;
use tally::state::dedup::DedupTable;

fn sample_lines(n: u64) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("tally-bench-{}", std::process::id()));
    let opts =
        GenOptions { events: n, devices: n / 10, format: GenFormat::Jsonl, out: dir.clone(), ..GenOptions::default() };
    let report = generate(&opts).expect("generate sample");
    let data = std::fs::read(&report.files[0]).expect("read sample");
    let _ = std::fs::remove_dir_all(dir);
    data
}

fn parser(c: &mut Criterion) {
    let data = sample_lines(100_000);
    let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
    let fields = FieldSet { ts: "ts".into(), did: "did".into(), slots: vec!["page".into(), "event".into()] };
    let mut g = c.benchmark_group("jsonl");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("parse_100k_lines", |b| {
        let mut p = JsonlParser::new(&fields);
        let mut ev = EventBuf::new(2);
        b.iter(|| {
            let mut ok = 0u64;
            for l in &lines {
                ok += p.parse(l, &mut ev).is_ok() as u64;
            }
            black_box(ok)
        })
    });
    g.bench_function("xxh3_device_ids_100k", |b| {
        let mut p = JsonlParser::new(&fields);
        let mut ev = EventBuf::new(2);
        let dids: Vec<Vec<u8>> =
            lines.iter().filter_map(|l| p.parse(l, &mut ev).ok().map(|_| ev.did_bytes(l).to_vec())).collect();
        b.iter(|| dids.iter().fold(0u64, |a, d| a ^ xxhash_rust::xxh3::xxh3_64(d)))
    });
    g.finish();
}

/// Fingerprints spread like xxh3 output.
fn fps(n: usize, salt: u64) -> Vec<u64> {
    (0..n as u64).map(|i| xxhash_rust::xxh3::xxh3_64(&(i ^ salt).to_le_bytes())).collect()
}

fn dedup(c: &mut Criterion) {
    const ENTRIES: usize = 4_000_000;
    const PROBES: usize = 1 << 20;
    let present = fps(ENTRIES, 0);
    let mut table = DedupTable::anonymous().expect("table");
    for &f in &present {
        table.observe(f, 1, 100).expect("insert");
    }
    let hits: Vec<u64> = present.iter().step_by(ENTRIES / PROBES).copied().collect();
    let mut g = c.benchmark_group("dedup_4M_entries");
    g.throughput(Throughput::Elements(hits.len() as u64));
    for prefetch in [false, true] {
        let name = if prefetch { "hit_prefetch" } else { "hit" };
        g.bench_function(name, |b| {
            b.iter(|| {
                for (i, &f) in hits.iter().enumerate() {
                    if prefetch {
                        if let Some(&a) = hits.get(i + 8) {
                            table.prefetch(a, 1);
                        }
                    }
                    black_box(table.observe(f, 1, 100).expect("probe"));
                }
            })
        });
    }
    for prefetch in [false, true] {
        let name = if prefetch { "miss_insert_prefetch" } else { "miss_insert" };
        g.bench_function(name, |b| {
            b.iter_batched(
                || (fps(PROBES, 0xdead_beef), DedupTable::anonymous().expect("table")),
                |(new, mut t)| {
                    for (i, &f) in new.iter().enumerate() {
                        if prefetch {
                            if let Some(&a) = new.get(i + 8) {
                                t.prefetch(a, 1);
                            }
                        }
                        black_box(t.observe(f, 1, 100).expect("insert"));
                    }
                    t
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn fold(c: &mut Criterion) {
    const KEYS: usize = 10_000;
    let spec = MetricSpec {
        name: "m".into(),
        group_by: vec![],
        filter: None,
        measures: vec![Measure::Pv, Measure::Uv],
        step_ms: 60_000,
        size_ms: 86_400_000,
        emit: Emit::All,
        late: LatePolicy::Fold,
        sources: vec![0],
        dau: None,
        summary: None,
    };
    // Tumble minutes (each window its own period): two shards ship the
    // same 10k keys of a slice, the window is merged and rendered.
    let geo = Geometry::of(60_000, 60_000, 0);
    let dict = std::sync::Arc::new(KeyDict::default());
    for k in 0..KEYS as u64 {
        dict.intern(k, || format!("{{\"k\":{k}}}")).unwrap();
    }
    let cols = |slice: u32| SliceCols {
        slice,
        keys: (0..KEYS as u32).collect(),
        pv: vec![3; KEYS],
        uv: vec![1; KEYS],
        ..SliceCols::default()
    };
    let mut g = c.benchmark_group("minute_fold");
    g.throughput(Throughput::Elements(2 * KEYS as u64));
    g.bench_function("merge_and_render_2x10k_keys", |b| {
        let mut e = CumulateEmitter::new(geo, &spec, dict.clone());
        let mut slice = 29_000_000;
        let mut rows = Vec::new();
        b.iter(|| {
            e.add(cols(slice));
            e.add(cols(slice));
            rows.clear();
            e.emit(0, geo.slice_end_ms(slice), false, &mut rows);
            slice += 1;
            black_box(rows.len())
        })
    });
    g.finish();
}

/// Device-history import: a CSV snapshot of 1M devices into 2 shards.
fn history_import(c: &mut Criterion) {
    const ROWS: u64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("devices.csv");
    let mut text = String::from("did,first_day,last_day\n");
    for i in 0..ROWS {
        let (a, b) = (1 + i % 28, 1 + (i * 7) % 28);
        text += &format!("d{:x},2025-{:02}-{a:02},2026-01-{b:02}\n", i.wrapping_mul(0x9E37_79B9_7F4A_7C15), 1 + i % 12);
    }
    std::fs::write(&path, text).unwrap();
    let mut g = c.benchmark_group("history");
    g.throughput(Throughput::Elements(ROWS));
    g.sample_size(10);
    g.bench_function("import_1m_rows", |b| b.iter(|| tally::state::history::import(&path, 2, None).unwrap().1.devices));
    g.finish();
}

criterion_group!(benches, parser, dedup, fold, history_import);
criterion_main!(benches);

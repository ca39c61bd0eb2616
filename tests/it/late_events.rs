//! Events behind the watermark (DESIGN §3): `late = "fold"` counts them in
//! the next window emitted for their day, so day totals stay exact;
//! `late = "drop"` discards them; either way they are counted; events for a
//! day whose last window is already out are dropped and counted.
//!
//! The watermark of a file source advances per block of `BLOCK_BYTES`: the
//! events of block k see the largest event time of blocks 0..k minus
//! `max_out_of_orderness` (see src/runtime/router.rs). The tests compute
//! with that model ([`support::place_events`]) which events are late and
//! what every row must then hold, and compare every row, not only totals.
//!
//! The generator's late events are `late_by` (10 min) + 1..60 s behind
//! their true time, beyond the jobs' 5 min bound; its ordinary disorder
//! (2 min) stays within it.

use std::path::PathBuf;

use crate::support::*;

const EVENTS: u64 = 100_000;
const BOUND_MS: i64 = 5 * MINUTE_MS;

fn late_options(events: u64, seed: u64) -> GenOptions {
    GenOptions { seed, late_fraction: 0.02, late_by: "10m".into(), ..gen_options(events) }
}

fn page_pv(late: &str) -> MetricDef {
    // No filter: every late event is one late record.
    MetricDef::new("page_pv", &["page"]).late(late)
}

/// Fates of the events of `files` for a metric without filter.
/// Runs the job on 2 workers while the lateness model places the same
/// events, in parallel.
fn run_beside_model(job: &JobFile, files: &[PathBuf], fold: bool) -> (RunOutput, (Vec<InputEvent>, Vec<Fate>)) {
    std::thread::scope(|s| {
        let model = s.spawn(|| fates(files, fold));
        (run(job, 2), model.join().unwrap())
    })
}

fn fates(files: &[PathBuf], fold: bool) -> (Vec<InputEvent>, Vec<Fate>) {
    let events = read_input_events(files, &["page"]);
    let fates = place_events(&events, BOUND_MS, fold, |_| true);
    (events, fates)
}

fn count_fates(fates: &[Fate]) -> (u64, u64) {
    let folded = fates.iter().filter(|f| matches!(f, Fate::Folded { .. })).count() as u64;
    let dropped = fates.iter().filter(|f| matches!(f, Fate::Dropped { .. })).count() as u64;
    (folded, dropped)
}

/// Two files of one source: a day-1 evening (20:30-23:30 local) and a day-2
/// night (01:15-04:15), both with 2% late events. No late event can land in
/// another day than its true time's, so nothing outlives its day.
#[test]
fn fold_keeps_every_day_total_exact() {
    let dir = tempdir();
    let evening = MIDNIGHT_MS - 3 * 3_600_000 - 30 * MINUTE_MS;
    let night = MIDNIGHT_MS + 75 * MINUTE_MS;
    let mut files = Vec::new();
    for (i, start_ms) in [evening, night].into_iter().enumerate() {
        let opts = GenOptions { start_ms, duration: "3h".into(), ..late_options(EVENTS / 2, 11 + i as u64) };
        files.extend(generate(&dir.path().join(format!("part{i}")), opts));
    }
    let job = JobDef::new("jsonl", &files).metric(page_pv("fold")).write(dir.path(), "fold");
    let (summary, (events, fates)) = run_beside_model(&job, &files, true);
    let summary = summary.ok();
    let (folded, dropped) = count_fates(&fates);
    assert!(folded > 100, "the data must hold late events (model: {folded} folded)");
    assert_eq!(dropped, 0, "no late event outlives its day in this data");
    assert_eq!(count(summary, "late_folded"), folded, "late events counted: {summary}");
    assert_eq!(count(summary, "late_dropped"), 0, "{summary}");
    assert_eq!(count(source_report(summary, 0), "late_folded"), folded);

    // Every period's final totals equal the offline day totals exactly.
    let rows = read_rows(&job.results);
    let want = offline_day_totals(&offline(&job), 0, &["page"]);
    assert_eq!(want.keys().map(|k| k.0).collect::<std::collections::BTreeSet<_>>().len(), 2, "two days of data");
    assert_totals_equal(&day_totals(&rows, "page_pv"), &want, "fold: day totals vs offline");

    // Each row holds its window's on-time events plus the late events folded
    // into it or an earlier window of the day.
    let model = model_series(&events, &fates, &["page"]);
    assert!(assert_rows_match_model(&rows, "page_pv", &model) > 1_000);
}

/// Late events of day 1 can only be dropped under `fold` if a block whose
/// watermark is past midnight holds events written before midnight: its
/// previous blocks must reach a little past 00:05 (the bound), and its
/// events must be true-timed before 00:11 (the largest late shift). So the
/// data is generated twice: once to find where the first block boundary
/// after midnight falls, then shifted in time (which moves every event
/// equally and keeps every line's length) to put that boundary at 00:07.
fn generate_with_a_block_starting_just_after_midnight(out: &std::path::Path) -> Vec<PathBuf> {
    let opts = late_options(EVENTS, 5);
    let probe = generate(&out.join("probe"), opts.clone());
    let events = read_input_events(&probe, &[]);
    let mut max_before = i64::MIN;
    let mut block_max = i64::MIN;
    let mut block = 0;
    let mut boundary = None;
    for e in &events {
        if e.block != block {
            max_before = max_before.max(block_max);
            block_max = i64::MIN;
            block = e.block;
            if max_before > MIDNIGHT_MS {
                boundary = Some(max_before);
                break;
            }
        }
        block_max = block_max.max(e.ts);
    }
    let boundary = boundary.expect("the probe data has a block boundary after midnight");
    let shift = MIDNIGHT_MS + 7 * MINUTE_MS - boundary;
    std::fs::remove_dir_all(out.join("probe")).unwrap();
    generate(&out.join("shifted"), GenOptions { start_ms: opts.start_ms + shift, ..opts })
}

/// The default span (22:00-02:00 local): late events true-timed just after
/// midnight are written before it; once day 1's last window is out, `fold`
/// has no window of their day left and drops them (and counts them).
#[test]
fn fold_drops_and_counts_late_events_of_a_day_already_closed() {
    let dir = tempdir();
    let files = generate_with_a_block_starting_just_after_midnight(&dir.path().join("data"));
    let job = JobDef::new("jsonl", &files).metric(page_pv("fold")).write(dir.path(), "fold");
    let (summary, (events, fates)) = run_beside_model(&job, &files, true);
    let summary = summary.ok();
    let (folded, dropped) = count_fates(&fates);
    eprintln!("model: {folded} late events folded, {dropped} dropped");
    assert!(folded > 100 && dropped > 0, "the data must hold both kinds (model: {folded} folded, {dropped} dropped)");
    for (e, f) in events.iter().zip(&fates) {
        if let Fate::Dropped { .. } = f {
            assert!(e.ts < MIDNIGHT_MS, "model: only day-1 events are dropped under fold");
        }
    }
    assert_eq!(count(summary, "late_folded"), folded, "{summary}");
    assert_eq!(count(summary, "late_dropped"), dropped, "{summary}");

    let rows = read_rows(&job.results);
    let model = model_series(&events, &fates, &["page"]);
    assert!(assert_rows_match_model(&rows, "page_pv", &model) > 1_000);

    // Day 2 lost nothing: its totals are the offline ones exactly. Day 1
    // lacks exactly the dropped events.
    let want = offline_day_totals(&offline(&job), 0, &["page"]);
    let got = day_totals(&rows, "page_pv");
    let day2 = |m: &std::collections::BTreeMap<(i64, String), (u64, u64)>| {
        m.iter().filter(|(k, _)| k.0 == MIDNIGHT_MS).map(|(k, v)| (k.clone(), *v)).collect()
    };
    assert_totals_equal(&day2(&got), &day2(&want), "fold: day-2 totals vs offline");
    let pv = |m: &std::collections::BTreeMap<(i64, String), (u64, u64)>, day: i64| -> u64 {
        m.iter().filter(|(k, _)| k.0 == day).map(|(_, v)| v.0).sum()
    };
    assert_eq!(pv(&want, MIDNIGHT_MS - DAY_MS) - pv(&got, MIDNIGHT_MS - DAY_MS), dropped, "day-1 pv deficit");
}

#[test]
fn drop_discards_late_events_counts_them_and_leaves_other_windows_exact() {
    let dir = tempdir();
    let files = generate(&dir.path().join("data"), late_options(EVENTS, 5));
    let job = JobDef::new("jsonl", &files).metric(page_pv("drop")).write(dir.path(), "drop");
    let (summary, (events, fates)) = run_beside_model(&job, &files, false);
    let summary = summary.ok();
    let (folded, dropped) = count_fates(&fates);
    assert_eq!(folded, 0);
    assert!(dropped > 100, "the data must hold late events (model: {dropped} dropped)");
    assert_eq!(count(summary, "late_dropped"), dropped, "late events counted: {summary}");
    assert_eq!(count(summary, "late_folded"), 0, "{summary}");

    let rows = read_rows(&job.results);
    let model = model_series(&events, &fates, &["page"]);
    assert!(assert_rows_match_model(&rows, "page_pv", &model) > 1_000);

    // Final pv totals are lower than offline by exactly the dropped events.
    let off = offline(&job);
    let want = offline_day_totals(&off, 0, &["page"]);
    let got = day_totals(&rows, "page_pv");
    let total = |m: &std::collections::BTreeMap<(i64, String), (u64, u64)>| -> u64 { m.values().map(|v| v.0).sum() };
    assert_eq!(total(&want) - total(&got), dropped, "pv deficit");
    for (k, g) in &got {
        let w = want.get(k).unwrap_or_else(|| panic!("key {k:?} has no offline data"));
        assert!(g.0 <= w.0 && g.1 <= w.1, "{k:?}: dropping can only lower totals: got {g:?}, offline {w:?}");
    }

    // Windows that end before the first dropped event of their key and day
    // are untouched by late data: exactly the offline values.
    let mut first_drop: std::collections::BTreeMap<(i64, String), i64> = Default::default();
    for (e, f) in events.iter().zip(&fates) {
        if let Fate::Dropped { slice } = f {
            let dims: serde_json::Map<String, serde_json::Value> =
                [("page".to_string(), e.fields["page"].clone())].into_iter().collect();
            let key = (day_start(e.ts), dims_key(&dims));
            let end = slice_end_ms(*slice);
            first_drop.entry(key).and_modify(|x| *x = (*x).min(end)).or_insert(end);
        }
    }
    let (mut unaffected, mut affected) = (0, 0);
    for r in &rows {
        let touched = first_drop.get(&(r.window_start, r.dims_key())).is_some_and(|&end| r.window_end >= end);
        if touched {
            affected += 1;
            continue;
        }
        unaffected += 1;
        let want = off.value(0, r.window_end, &r.dims_in(&["page"]));
        assert_eq!(want, Some((r.pv, r.uv)), "row untouched by late data differs from offline: {r:?}");
    }
    assert!(unaffected > 500 && affected > 500, "{unaffected} unaffected rows, {affected} affected rows");
}

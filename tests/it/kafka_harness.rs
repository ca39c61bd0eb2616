//! The Kafka test harness itself (`support::kafka`): a real Tansu broker on
//! loopback takes ~200k lines produced to chosen partitions and gives every
//! one of them back, once, with its key, in the order it was produced within
//! its partition.

use std::time::Instant;

use crate::support::kafka::Broker;

const LINES: usize = 200_000;
const PARTITIONS: i32 = 4;
/// Bytes of each line (about the size of a generated event).
const LINE_BYTES: usize = 150;

/// Line `seq`: `{"seq":NNNNNNNN,"pad":"xxx…"}`, `LINE_BYTES` long.
fn line(seq: usize) -> Vec<u8> {
    let head = format!("{{\"seq\":{seq:08},\"pad\":\"");
    let mut l = head.into_bytes();
    let fill = b'a' + (seq % 26) as u8;
    l.resize(LINE_BYTES - 2, fill);
    l.extend_from_slice(b"\"}");
    l
}

/// The sequence number of a line made by [`line`].
fn seq_of(line: &[u8]) -> usize {
    std::str::from_utf8(&line[7..15]).expect("ascii").parse().expect("a number")
}

/// Three lines of four have a key (`k` + seq mod 97), the fourth none.
fn key_of(line: &[u8]) -> Option<Vec<u8>> {
    let seq = seq_of(line);
    (seq % 4 != 3).then(|| format!("k{}", seq % 97).into_bytes())
}

/// A scrambled but deterministic partition, uneven across partitions
/// (partition 0 gets about twice the share of the others).
fn partition_of(index: usize, _line: &[u8]) -> i32 {
    let mut x = index as u64 ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 29;
    [0, 0, 1, 2, 3][(x % 5) as usize]
}

#[test]
fn broker_round_trip_keeps_partition_order() {
    let started = Instant::now();
    let broker = Broker::start();
    let up = started.elapsed();
    broker.create_topic("client_log", PARTITIONS);

    let lines: Vec<Vec<u8>> = (0..LINES).map(line).collect();
    let bytes: usize = lines.iter().map(Vec::len).sum();
    let t = Instant::now();
    broker.produce_lines("client_log", PARTITIONS, &lines, key_of, partition_of);
    let produced = t.elapsed();

    let t = Instant::now();
    let got = broker.consume_all("client_log");
    let consumed = t.elapsed();

    // What each partition must hold, in order.
    let mut want: Vec<Vec<usize>> = vec![Vec::new(); PARTITIONS as usize];
    for (i, l) in lines.iter().enumerate() {
        want[partition_of(i, l) as usize].push(i);
    }
    assert!(
        want.iter().all(|w| w.len() > LINES / 10),
        "every partition gets a share: {:?}",
        want.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_eq!(got.len(), LINES, "messages read back");
    let mut next = vec![0usize; PARTITIONS as usize];
    for (partition, offset, key, payload) in &got {
        let p = *partition as usize;
        assert!(p < PARTITIONS as usize, "message from partition {partition}");
        let k = next[p];
        assert!(k < want[p].len(), "partition {partition} holds more than the {} lines sent to it", want[p].len());
        let i = want[p][k];
        assert_eq!(*offset, k as i64, "partition {partition}: offsets go 0, 1, 2, …");
        assert!(
            *payload == lines[i],
            "partition {partition} offset {offset}: got line {:?}, want line {i} (order within the partition not kept)",
            String::from_utf8_lossy(payload)
        );
        assert_eq!(*key, key_of(&lines[i]), "partition {partition} offset {offset}: key of line {i}");
        next[p] += 1;
    }
    for p in 0..PARTITIONS as usize {
        assert_eq!(next[p], want[p].len(), "partition {p}: messages read back");
    }

    let mb = bytes as f64 / 1e6;
    eprintln!(
        "kafka harness: broker up in {up:.2?}; produced {LINES} lines ({mb:.1} MB) in {produced:.2?} \
         ({:.0} msg/s); consumed them in {consumed:.2?} ({:.0} msg/s); test total {:.2?}",
        LINES as f64 / produced.as_secs_f64(),
        LINES as f64 / consumed.as_secs_f64(),
        started.elapsed()
    );
}

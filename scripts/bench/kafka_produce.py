#!/usr/bin/env python3
"""Kafka helpers for scripts/kafka_bench.sh (needs confluent-kafka).

  produce  --brokers B --topic T --partitions P --file F [--rate R --duration S --progress LOG]
      Sends every line of F (without its newline) as one message to partition
      crc32(did text) % P ("123" and 123 hash alike, as tally compares them),
      in file order, so each partition holds its devices' events in file order.
      Without --rate: as fast as possible, then flush; prints a JSON summary.
      With --rate: R messages/s, paced in 10 ms steps, for S seconds (or
      until the file ends, or SIGTERM); every 100 ms appends
      "epoch_seconds produced delivered" to LOG. Delivery reports come only for
      errors (delivery.report.only.error): "delivered" = produced - still queued.
  consume  --brokers B --topic T --partitions P [--set key=value ...]
      Reads the topic from the beginning to partition EOF without tally
      (assigned, no group): what librdkafka + the broker deliver alone.
  lag      --brokers B --topic T --partitions P --group G --out CSV [--interval 0.25]
      Until SIGTERM: once per interval, the group's committed offsets (summed
      over partitions; OffsetFetch, no group join) -> "epoch_seconds committed
      per-partition..." lines in CSV.
  threads  --pid PID --out JSON [--broker BPID] [--log STAMPED_LOG]
      Polls /proc/PID/task/*/stat every 100 ms until PID is gone and writes
      the CPU seconds (user+sys) per thread group (librdkafka's rdk:*, the
      kafka reader, tally's own threads; the last < 100 ms of each thread is
      missed). With --log: also split at the time of its "assigned" line
      (before = the group join), for tally and for BPID.
  report   --progress LOG --lag CSV --rate R [--t0 EPOCH]
      Joins the two: per sample (table: the first sample of each second;
      the median and maximum use all of them), produced, committed, lag in messages,
      lag / R in seconds of data, and the time lag (how long ago the producer
      had sent as many messages as are committed now). Prints markdown rows
      and a JSON line with the maxima (last line, prefixed "JSON ").
"""
import argparse
import itertools
import json
import os
import signal
import sys
import time
import zlib

stop = False


def on_term(*_):
    global stop
    stop = True


def did_text(line):
    i = line.find(b'"did":')
    if i < 0:
        return b""
    i += 6
    if line[i : i + 1] == b'"':
        j = line.find(b'"', i + 1)
        return line[i + 1 : j]
    j = i
    n = len(line)
    while j < n and line[j : j + 1] not in (b",", b"}"):
        j += 1
    return line[i:j].strip()


def records(path, nparts):
    """(line without newline, partition) for every line of the file, in order."""
    import re

    did_re = re.compile(rb'"did":"?([^",}]*)')
    crc = zlib.crc32
    rest = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(4 << 20)
            if not chunk:
                break
            chunk = rest + chunk
            cut = chunk.rfind(b"\n")
            if cut < 0:
                rest = chunk
                continue
            rest = chunk[cut + 1 :]
            body = chunk[:cut]
            lines = body.split(b"\n")
            dids = did_re.findall(body)
            if len(dids) != len(lines):  # a line without (or with two) "did": fields
                dids = [did_text(l) for l in lines]
            for line, did in zip(lines, dids):
                yield line, crc(did) % nparts
    if rest:
        yield rest, crc(did_text(rest)) % nparts


def producer(brokers):
    from confluent_kafka import Producer

    errors = {"count": 0, "first": []}

    def on_delivery(err, msg):
        if err is not None:
            errors["count"] += 1
            if len(errors["first"]) < 5:
                errors["first"].append(str(err))

    p = Producer(
        {
            "bootstrap.servers": brokers,
            "client.id": "kafka-bench-producer",
            "linger.ms": 5,
            "batch.num.messages": 100000,
            "batch.size": 4 * 1048576,
            "queue.buffering.max.messages": 2000000,
            "queue.buffering.max.kbytes": 1048576,
            "message.timeout.ms": 120000,
            "compression.type": "none",
            "enable.idempotence": False,
            "acks": "all",
            "delivery.report.only.error": True,
            "on_delivery": on_delivery,
        }
    )
    return p, errors


def cmd_produce(a):
    signal.signal(signal.SIGTERM, on_term)
    p, errors = producer(a.brokers)
    produce = p.produce
    poll = p.poll
    topic, nparts = a.topic, a.partitions
    per_part = [0] * nparts
    sent = 0
    t0 = time.time()
    prog = open(a.progress, "a", buffering=1) if a.progress else None
    next_prog = t0
    deadline = t0 + a.duration if a.rate else None
    step = max(1, int(a.rate / 100)) if a.rate else 0  # lines per 10 ms
    it = records(a.file, nparts)
    while not stop:
        if a.rate:
            now = time.time()
            if now >= deadline:
                break
            if prog and now >= next_prog:
                prog.write(f"{now:.3f} {sent} {sent - len(p)}\n")
                next_prog = now + 0.1
            due = int((now - t0) * a.rate)
            if sent >= due:
                poll(0)
                time.sleep(min(0.01, (sent + step) / a.rate + t0 - now))
                continue
            n = min(due - sent, step * 10)
        else:
            n = 100000
        k = 0
        for line, part in itertools.islice(it, n):
            try:
                produce(topic, line, partition=part)
            except BufferError:
                while True:
                    poll(0.005)
                    try:
                        produce(topic, line, partition=part)
                        break
                    except BufferError:
                        pass
            per_part[part] += 1
            k += 1
        sent += k
        poll(0)
        if errors["count"] or k < n:
            break
    produced_s = time.time() - t0
    left = p.flush(120)
    total_s = time.time() - t0
    if prog:
        prog.write(f"{time.time():.3f} {sent} {sent - left}\n")
        prog.close()
    out = {
        "messages": sent,
        "undelivered": left,
        "errors": errors["count"],
        "first_errors": errors["first"],
        "per_partition": per_part,
        "produce_seconds": round(produced_s, 3),
        "seconds": round(total_s, 3),
        "messages_per_second": round(sent / total_s) if total_s > 0 else None,
        "rate_asked": a.rate or None,
    }
    print(json.dumps(out))
    return 0 if left == 0 and not out["errors"] else 1


def cmd_consume(a):
    """Reads every partition from the beginning to librdkafka's EOF (assign, no
    group join), counting messages: the consumer + broker alone, no tally."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    conf = {
        "bootstrap.servers": a.brokers,
        "group.id": "kafka-bench-consume",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "fetch.wait.max.ms": 10,
        "client.id": "kafka-bench-consume",
    }
    for kv in a.set or []:
        k, v = kv.split("=", 1)
        conf[k] = v
    c = Consumer(conf)
    c.assign([TopicPartition(a.topic, p, OFFSET_BEGINNING) for p in range(a.partitions)])
    eof = set()
    n = nbytes = 0
    t0 = time.time()
    first = None
    while len(eof) < a.partitions:
        # a short timeout: consume() waits for a full batch or the timeout
        for m in c.consume(num_messages=10000, timeout=0.02):
            e = m.error()
            if e is None:
                n += 1
                if first is None:
                    first = time.time()
            elif e.code() == KafkaError._PARTITION_EOF:
                eof.add(m.partition())
    t1 = time.time()
    c.close()
    first = first or t1
    print(json.dumps({"messages": n, "seconds": round(t1 - t0, 3), "messages_per_second": round(n / (t1 - t0)),
                      "first_message_after": round(first - t0, 3),
                      "messages_per_second_after_first": round(n / (t1 - first)) if t1 > first else None,
                      "settings": a.set or []}))
    return 0


def cmd_lag(a):
    from confluent_kafka import Consumer, TopicPartition

    signal.signal(signal.SIGTERM, on_term)
    c = Consumer(
        {
            "bootstrap.servers": a.brokers,
            "group.id": a.group,
            "enable.auto.commit": False,
            "client.id": "kafka-bench-lag",
        }
    )
    tps = [TopicPartition(a.topic, p) for p in range(a.partitions)]
    with open(a.out, "a", buffering=1) as out:
        nxt = time.time()
        while not stop:
            t = time.time()
            try:
                got = c.committed(tps, timeout=5)
                offs = [max(tp.offset, 0) for tp in got]
                out.write(f"{t:.3f} {sum(offs)} {' '.join(map(str, offs))}\n")
            except Exception as e:  # report, keep sampling
                out.write(f"{t:.3f} ERROR {str(e).replace(chr(10), ' ')}\n")
            nxt += a.interval
            while not stop and time.time() < nxt:
                time.sleep(0.05)
    c.close()
    return 0


def median(xs):
    xs = sorted(xs)
    if not xs:
        return None
    m = len(xs) // 2
    return round(xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2, 2)


def cmd_report(a):
    prog = []
    with open(a.progress) as f:
        for ln in f:
            t, s, d = ln.split()
            prog.append((float(t), int(s), int(d)))
    rows = []
    errs = 0
    with open(a.lag) as f:
        for ln in f:
            parts = ln.split()
            if parts[1] == "ERROR":
                errs += 1
                continue
            rows.append((float(parts[0]), int(parts[1])))
    t0 = a.t0 if a.t0 else (prog[0][0] if prog else rows[0][0])
    out = []
    max_lag = max_tlag = 0.0
    last = None
    for t, committed in rows:
        produced = max([s for (tp, s, _) in prog if tp <= t], default=0)
        delivered = max([d for (tp, _, d) in prog if tp <= t], default=0)
        lag = max(delivered - committed, 0)
        # time lag: now - first moment the producer had delivered >= committed
        when = next((tp for (tp, _, d) in prog if d >= committed), None)
        tlag = (t - when) if (when is not None and committed > 0) else None
        if committed == 0:
            tlag = t - t0 if delivered > 0 else 0.0
        elif committed >= delivered:
            tlag = 0.0
        out.append((t - t0, produced, delivered, committed, lag, lag / a.rate, tlag))
        max_lag = max(max_lag, lag)
        if tlag is not None:
            max_tlag = max(max_tlag, tlag)
        last = out[-1]
    print("| t (s) | produced | committed | lag (msgs) | lag / rate (s of data) | time lag (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    shown = set()
    for t, p, d, c, lag, lsec, tlag in out:
        # one row a second (the first sample of each second); the stats use every sample
        if int(t) in shown:
            continue
        shown.add(int(t))
        tl = f"{tlag:.2f}" if tlag is not None else "–"
        print(f"| {t:.1f} | {p:,} | {c:,} | {lag:,} | {lsec:.2f} | {tl} |")
    # steady state: samples after the first 5 s while the producer was running
    prod_end = prog[-1][0] if prog else t0
    steady = [r for r in out if r[0] >= 5 and r[0] + t0 <= prod_end]
    s = {
        "samples": len(out),
        "errors": errs,
        "max_lag_msgs": int(max_lag),
        "max_time_lag_s": round(max_tlag, 2),
        "steady_median_lag_msgs": int(median([r[4] for r in steady])) if steady else None,
        "steady_median_time_lag_s": median([r[6] for r in steady if r[6] is not None]),
        "last_committed": last[3] if last else 0,
        "produced": prog[-1][1] if prog else 0,
        "produce_seconds": round(prog[-1][0] - t0, 2) if prog else 0,
    }
    print("JSON " + json.dumps(s))
    return 0


def group_of(name):
    if name.startswith("rdk:"):
        return "librdkafka (rdk:*)"
    if name.startswith("tally-kafka"):
        return "kafka reader"
    if name == "tally":
        return "main, routers, workers"
    if name.startswith("iou-"):
        return "io_uring"
    return name


def proc_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = st[st.rindex(")") + 2 :].split()
    return int(rest[11]) + int(rest[12])


def cmd_threads(a):
    tick = os.sysconf("SC_CLK_TCK")
    seen = {}
    timeline = []  # (t, {tid: ticks}, broker ticks)
    while True:
        try:
            tids = os.listdir(f"/proc/{a.pid}/task")
        except FileNotFoundError:
            break
        now = time.time()
        for tid in tids:
            try:
                with open(f"/proc/{a.pid}/task/{tid}/stat") as f:
                    st = f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            name = st[st.index("(") + 1 : st.rindex(")")]
            rest = st[st.rindex(")") + 2 :].split()
            seen[tid] = (name, int(rest[11]) + int(rest[12]))
        timeline.append((now, {t: v[1] for t, v in seen.items()}, proc_ticks(a.broker) if a.broker else None))
        time.sleep(0.1)
    end_broker = proc_ticks(a.broker) if a.broker else None

    def grouped(ticks_by_tid):
        g = {}
        for tid, ticks in ticks_by_tid.items():
            k = group_of(seen[tid][0])
            g[k] = g.get(k, 0) + ticks / tick
        return g

    total = grouped({t: v[1] for t, v in seen.items()})
    out = {"threads": len(seen), "cpu_seconds": {k: round(v, 2) for k, v in sorted(total.items())}}
    split = None
    if a.log:
        with open(a.log) as f:
            for ln in f:
                if "assigned" in ln and "partitions" in ln:
                    split = float(ln.split()[0])
                    break
    if split is not None and timeline:
        before = [x for x in timeline if x[0] <= split]
        b = before[-1] if before else (split, {}, timeline[0][2])
        g = grouped(b[1])
        out["split_at"] = split
        out["sample_before_split"] = round(split - b[0], 3)
        out["cpu_before_assigned"] = {k: round(g.get(k, 0), 2) for k in sorted(total)}
        out["cpu_after_assigned"] = {k: round(total[k] - g.get(k, 0), 2) for k in sorted(total)}
        if a.broker and b[2] is not None and end_broker is not None:
            out["broker_cpu_after_assigned"] = round((end_broker - b[2]) / tick, 2)
            out["broker_cpu_before_assigned"] = round((b[2] - timeline[0][2]) / tick, 2)
    with open(a.out, "w") as f:
        json.dump(out, f)
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("produce")
    p.add_argument("--brokers", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--partitions", type=int, required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--rate", type=int, default=0)
    p.add_argument("--duration", type=float, default=0)
    p.add_argument("--progress")
    l = sub.add_parser("lag")
    l.add_argument("--brokers", required=True)
    l.add_argument("--topic", required=True)
    l.add_argument("--partitions", type=int, required=True)
    l.add_argument("--group", required=True)
    l.add_argument("--out", required=True)
    l.add_argument("--interval", type=float, default=0.25)
    c = sub.add_parser("consume")
    c.add_argument("--brokers", required=True)
    c.add_argument("--topic", required=True)
    c.add_argument("--partitions", type=int, required=True)
    c.add_argument("--set", action="append", help="librdkafka key=value")
    t = sub.add_parser("threads")
    t.add_argument("--pid", type=int, required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--broker", type=int, default=0, help="also sample this pid's CPU (the broker)")
    t.add_argument("--log", help="stamped stderr log: split the CPU at its 'assigned' line")
    r = sub.add_parser("report")
    r.add_argument("--progress", required=True)
    r.add_argument("--lag", required=True)
    r.add_argument("--rate", type=float, required=True)
    r.add_argument("--t0", type=float, default=0)
    a = ap.parse_args()
    return {"produce": cmd_produce, "consume": cmd_consume, "lag": cmd_lag, "threads": cmd_threads, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())

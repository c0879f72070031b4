"""make bench: every figure against its reference, measured in the same run, alternating rounds
(these machines are shared and noisy: only a ratio within one run means anything).

Writes target/bench/results.json: figure name -> {ours, reference, unit, ratio, rounds,
reference_rounds, spread}, where ratio > 1 always means ferrotune is better; for a figure whose
reference is a goal rather than a peer (rendezvous, heartbeat latency), reference is the goal and
ratio = goal / ours. A Markdown copy goes next to it. Later benchmarks add figures of the same
shape through `add_figure`.

usage: python bench/run.py [--quick] [--check] [--only GROUP ...]
  --quick  one round, few iterations, a tiny model, 256 simulated workers (make test runs this)
  --only   allreduce, train_step, ddp_overhead, zero, control_plane and/or elastic (default: all); the JSON
           then holds those
  --check  fail unless every figure is present, finite, and each peer reference came from a
           real torch process
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
OUT = os.path.join(ROOT, "target", "bench")
sys.path.insert(0, os.path.join(ROOT, "bench"))
from train_step import CONFIG as TRAIN_CONFIG  # noqa: E402  (the one bench model shape)
import elastic  # noqa: E402

# Goals from the benchmark issue, for figures whose reference is not a peer.
RENDEZVOUS_GOAL_S = 1.0
HEARTBEAT_P99_GOAL_MS = 10.0

figures = {}


def add_figure(name, ours_rounds, reference_rounds, unit, higher_is_better, goal=None,
               source=None, detail=None, kind=None):
    """ours/reference are medians over rounds; with a goal, reference is the goal itself.
    kind "baseline": the reference is ferrotune doing it the plain way (a cold restart, a
    synchronous save), measured in the same run."""
    ours = statistics.median(ours_rounds)
    reference = goal if goal is not None else statistics.median(reference_rounds)
    ratio = ours / reference if higher_is_better else reference / ours
    figures[name] = {
        "ours": ours,
        "reference": reference,
        "unit": unit,
        "ratio": ratio,
        "rounds": ours_rounds,
        "reference_rounds": reference_rounds,
        "spread": [min(ours_rounds), max(ours_rounds)],
        "reference_kind": "goal" if goal is not None else (kind or "peer"),
        "reference_source": source,
        **({"detail": detail} if detail else {}),
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(commands, timeout=600, env=None):
    """Starts one process per command, waits for all, returns rank 0's last stdout line as JSON."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for c in commands]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"{' '.join(p.args)} failed ({p.returncode}):\n{err}")
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return json.loads(outs[0].strip().splitlines()[-1])


def allreduce_seconds(impl, world, mib, warmup, iters):
    if impl == "ours":
        ports = ",".join(str(free_port()) for _ in range(world))
        cmds = [[os.path.join(BIN, "allreduce"), "--rank", str(r), "--ports", ports,
                 "--mib", str(mib), "--warmup", str(warmup), "--iters", str(iters)]
                for r in range(world)]
    else:
        port = str(free_port())
        cmds = [[sys.executable, os.path.join(ROOT, "bench", "torch_allreduce.py"), "--rank",
                 str(r), "--world", str(world), "--port", port, "--mib", str(mib),
                 "--warmup", str(warmup), "--iters", str(iters)] for r in range(world)]
    return run_ranks(cmds)


def _drain(conn, total):
    buf = bytearray(4 << 20)
    got = 0
    while got < total:
        n = conn.recv_into(buf)
        if n == 0:
            break
        got += n


def loopback_gbps(mib=64, repeats=8):
    """Loopback TCP limits, as fast as Python's socket calls go (they release the GIL).

    one stream: one sender, one receiver. ring pattern: what a 2-rank ring all-reduce of `mib`
    moves with no arithmetic at all, each side sending and receiving at once, as bus bandwidth
    (bytes per side / seconds): the ceiling for allreduce_*_2ranks on this machine, where both
    ranks' copies into and out of the kernel share the same cores.
    """
    payload = bytearray(int(mib * 1024 * 1024))
    total = len(payload) * repeats

    def pair():
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        server.close()
        return client, conn

    def timed(streams):
        threads = [threading.Thread(target=_drain, args=(rx, total)) for _, rx in streams]
        senders = [threading.Thread(target=lambda tx=tx: [tx.sendall(payload)
                                                          for _ in range(repeats)])
                   for tx, _ in streams]
        start = time.perf_counter()
        for t in threads + senders:
            t.start()
        for t in threads + senders:
            t.join()
        seconds = time.perf_counter() - start
        for tx, rx in streams:
            tx.close()
            rx.close()
        return total / seconds / 1e9

    one = timed([pair()])
    ring = timed([pair(), pair()])
    return one, ring


def bench_allreduce(args):
    rounds = 1 if args.quick else 3
    warmup, iters = (1, 2) if args.quick else (2, 5)
    cases = [(2, 1), (2, 16), (2, 64), (3, 64)]
    for world, mib in cases:
        ours, theirs, source = [], [], None
        for r in range(rounds):
            order = ["ours", "gloo"] if r % 2 == 0 else ["gloo", "ours"]
            for impl in order:
                result = allreduce_seconds(impl, world, mib, warmup, iters)
                seconds = statistics.median(result["seconds"])
                # Bus bandwidth: what each rank sends in a ring all-reduce, per second.
                busbw = 2 * (world - 1) / world * mib * 1024 * 1024 / seconds / 1e9
                if impl == "ours":
                    ours.append(busbw)
                else:
                    theirs.append(busbw)
                    source = f"torch {result['torch']} gloo"
        add_figure(f"allreduce_{mib}mib_{world}ranks", ours, theirs, "GB/s", True,
                   source=source)
    one, ring = loopback_gbps(16 if args.quick else 64, 4 if args.quick else 8)
    print(f"loopback TCP limit measured in this run: one stream {one:.2f} GB/s, "
          f"ring pattern (2 ranks, no arithmetic) {ring:.2f} GB/s")
    for name, f in figures.items():
        if name.startswith("allreduce_"):
            f["detail"] = {"loopback_one_stream_gbps": one, "loopback_ring_pattern_gbps": ring,
                           "ours_of_ring_pattern": f["ours"] / ring}
    return one, ring


def bench_train_step(args):
    rounds = 1 if args.quick else 3
    config = dict(TRAIN_CONFIG)
    shape = ["--batch", "4", "--seq", "256", "--steps", "5"]
    if args.quick:
        config.update(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
        shape = ["--batch", "2", "--seq", "64", "--steps", "2"]
    threads = str(os.cpu_count())
    with tempfile.TemporaryDirectory() as model:
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump(config, f)
        common = ["--model", model, "--threads", threads] + shape
        ours_cmd = [os.path.join(BIN, "train-step")] + common
        torch_cmd = [sys.executable, os.path.join(ROOT, "bench", "torch_train_step.py")] + common
        ours, theirs, source = [], [], None
        for r in range(rounds):
            order = [(ours_cmd, ours), (torch_cmd, theirs)]
            for cmd, sink in (order if r % 2 == 0 else order[::-1]):
                result = run_ranks([cmd])
                sink.append(result["tokens_per_s"])
                if "torch" in result:
                    source = f"torch {result['torch']} eager"
        detail = None
        if not args.quick:
            # What activation checkpointing trades: peak memory against recomputation.
            plain = run_ranks([ours_cmd])
            ckpt = run_ranks([ours_cmd + ["--activation-checkpointing"]])
            detail = {"peak_rss_mib": plain["peak_rss_mib"],
                      "checkpointed_peak_rss_mib": ckpt["peak_rss_mib"],
                      "checkpointed_tokens_per_s": ckpt["tokens_per_s"]}
    add_figure("train_step", ours, theirs, "tokens/s", True, source=source, detail=detail)


@contextlib.contextmanager
def per_worker_model(args, steps):
    """A directory with the bench model's config.json, and train-step's per-worker shape:
    2 × 256 tokens, 1 thread, `steps` timed steps (--quick: a tiny model and shape)."""
    config = dict(TRAIN_CONFIG)
    shape = ["--batch", "2", "--seq", "256", "--warmup", "1", "--steps", str(steps),
             "--threads", "1"]
    if args.quick:
        config.update(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
        shape = ["--batch", "2", "--seq", "64", "--warmup", "1", "--steps", "2", "--threads", "1"]
    with tempfile.TemporaryDirectory() as model:
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump(config, f)
        yield model, shape


def bench_ddp_overhead(args):
    """Step time of 2 data-parallel workers over 1 at the same per-worker batch, 1 thread each:
    what data parallelism costs (the all-reduce, and two processes sharing a machine). Ours over
    the TCP ring vs torch DistributedDataParallel over Gloo, on the same model."""
    rounds = 1 if args.quick else 3
    with per_worker_model(args, steps=4) as (model, shape):
        common = ["--model", model] + shape

        def step_s(impl, world):
            if impl == "ours":
                ports = ",".join(str(free_port()) for _ in range(world))
                extra = lambda r: ["--rank", str(r), "--ports", ports] if world > 1 else []
                cmds = [[os.path.join(BIN, "train-step")] + common + extra(r)
                        for r in range(world)]
            else:
                port = str(free_port())
                cmds = [[sys.executable, os.path.join(ROOT, "bench", "torch_train_step.py")]
                        + common + ["--rank", str(r), "--world", str(world), "--port", port]
                        for r in range(world)]
            return run_ranks(cmds)

        ours, theirs, source, detail = [], [], None, {}
        for r in range(rounds):
            order = ["ours", "torch"] if r % 2 == 0 else ["torch", "ours"]
            for impl in order:
                one, two = step_s(impl, 1), step_s(impl, 2)
                (ours if impl == "ours" else theirs).append(two["step_s"] / one["step_s"])
                detail.setdefault(f"{impl}_step_s_1_worker", []).append(one["step_s"])
                detail.setdefault(f"{impl}_step_s_2_workers", []).append(two["step_s"])
                if impl == "ours":
                    detail.setdefault("ours_allreduce_s_2_workers", []).append(two["allreduce_s"])
                if "torch" in two:
                    source = f"torch {two['torch']} DDP gloo"
    add_figure("ddp_overhead", ours, theirs, "x step time, 2 vs 1 worker", False,
               source=source, detail=detail)


def bench_zero(args):
    """ZeRO against plain data parallelism on 2 ranks of the ring, the same model and batches:
    rank 0's peak resident memory at zero_stage 1 (each rank keeps half the AdamW moments), and
    the gradient bytes a rank sends per step at zero_stage 2 (a reduce-scatter instead of an
    all-reduce), each over zero_stage 0's measured in the same run."""
    rounds = 1 if args.quick else 3
    with per_worker_model(args, steps=3) as (model, shape):
        # glibc's mmap threshold pinned, as tests/tests/plan.rs does: otherwise freed
        # activations stay resident in amounts that vary run to run, and the peak is not the
        # live one.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")

        def run(stage):
            ports = ",".join(str(free_port()) for _ in range(2))
            return run_ranks([[os.path.join(BIN, "train-step"), "--model", model] + shape
                              + ["--rank", str(r), "--ports", ports, "--zero-stage", str(stage)]
                              for r in range(2)], env=env)

        peak, sent, step_s = {0: [], 1: [], 2: []}, {0: [], 1: [], 2: []}, {0: [], 1: [], 2: []}
        for r in range(rounds):
            for stage in ([0, 1, 2] if r % 2 == 0 else [2, 1, 0]):
                result = run(stage)
                peak[stage].append(result["peak_rss_mib"])
                sent[stage].append(float(result["gradient_bytes_per_step"]))
                step_s[stage].append(result["step_s"])
        detail = {"parameters": result["parameters"],
                  "zero2_peak_rss_mib": peak[2], **{f"step_s_zero{k}": v for k, v in step_s.items()},
                  "zero1_gradient_bytes_per_step": sent[1]}
    add_figure("zero1_peak_rss_2ranks", peak[1], peak[0], "MiB peak RSS, rank 0", False,
               kind="baseline", source="ferrotune zero_stage 0", detail=detail)
    add_figure("zero2_gradient_bytes_2ranks", sent[2], sent[0], "bytes sent per step, rank 0",
               False, kind="baseline", source="ferrotune zero_stage 0")


def bench_control_plane(args):
    counts = [256] if args.quick else [256, 1024, 4096]
    seconds = 3 if args.quick else 10
    tiny = os.path.join(ROOT, "examples", "tiny")
    with tempfile.TemporaryDirectory() as job:
        for part in ["base", "data"]:
            shutil.copytree(os.path.join(tiny, part), os.path.join(job, part))
        with open(os.path.join(job, "job.token"), "w") as f:
            f.write("bench-token\n")
        for n in counts:
            port = free_port()
            config = os.path.join(job, f"swarm-{n}.yaml")
            with open(config, "w") as f:
                f.write(f"""job:
  name: swarm-{n}
cluster:
  launcher: external
  world_size: {n}
  listen: 127.0.0.1:{port}
  token_file: job.token
  heartbeat_interval_s: 1
  heartbeat_timeout_s: 60
  rendezvous_timeout_s: 300
model:
  path: base
data:
  train: data/train.jsonl
  seq_len: 160
training:
  steps: 10
  micro_batch_size: 1
  lr: 1.0e-3
checkpoint:
  dir: out-{n}
""")
            coordinator = subprocess.Popen(
                [os.path.join(BIN, "coordinator"), "launch", config],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            try:
                for line in coordinator.stdout:
                    if line.startswith("workers dial: "):
                        url = line.split(": ", 1)[1].strip()
                        break
                else:
                    raise RuntimeError("the coordinator exited before listening")
                # Keep its stdout drained (it prints a line per registration).
                threading.Thread(target=coordinator.stdout.read, daemon=True).start()
                result = run_ranks([[os.path.join(BIN, "swarm"), "--coordinator", url,
                                     "--token", "bench-token", "--workers", str(n),
                                     "--heartbeat-seconds", str(seconds),
                                     "--coordinator-pid", str(coordinator.pid)]])
            finally:
                coordinator.send_signal(signal.SIGTERM)
                try:
                    coordinator.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    coordinator.kill()
            detail = {"heartbeats": result["heartbeats"],
                      "heartbeat_p50_ms": result["heartbeat_p50_seconds"] * 1e3,
                      "coordinator_cpu_cores": result["coordinator_cpu_fraction"]}
            add_figure(f"rendezvous_{n}", [result["rendezvous_seconds"]], [], "s", False,
                       goal=RENDEZVOUS_GOAL_S)
            add_figure(f"heartbeat_p99_{n}", [result["heartbeat_p99_seconds"] * 1e3], [], "ms",
                       False, goal=HEARTBEAT_P99_GOAL_MS, detail=detail)


def markdown(limit, quick):
    lines = [f"# ferrotune benchmarks ({time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} cores{', quick' if quick else ''})", "",
             "| figure | ferrotune | reference | unit | ratio (> 1: ferrotune better) | spread | reference is |",
             "|---|---|---|---|---|---|---|"]
    for name, f in figures.items():
        ref = f["reference_source"] or f["reference_kind"]
        lines.append(f"| `{name}` | {f['ours']:.4g} | {f['reference']:.4g} | {f['unit']} | "
                     f"{f['ratio']:.3f} | {f['spread'][0]:.4g}–{f['spread'][1]:.4g} | {ref} |")
    if limit is not None:
        one, ring = limit
        lines += ["", f"Loopback TCP limits measured in the same run: one stream {one:.2f} GB/s; "
                      f"the bytes of a 2-rank ring all-reduce with no arithmetic, both ways at "
                      f"once, {ring:.2f} GB/s bus bandwidth (the ceiling for the 2-rank "
                      f"all-reduce figures)."]
    return "\n".join(lines) + "\n"


def check():
    expected = ["allreduce_1mib_2ranks", "allreduce_16mib_2ranks", "allreduce_64mib_2ranks",
                "allreduce_64mib_3ranks", "train_step", "ddp_overhead", "zero1_peak_rss_2ranks",
                "zero2_gradient_bytes_2ranks", "rendezvous_256", "heartbeat_p99_256",
                "recovery", "checkpoint_stall", "resume_step_10000"]
    problems = [f"missing figure {n}" for n in expected if n not in figures]
    for name, f in figures.items():
        for key in ["ours", "reference", "ratio"]:
            if not (isinstance(f[key], float) and math.isfinite(f[key]) and f[key] > 0):
                problems.append(f"{name}.{key} is {f[key]!r}")
        if f["reference_kind"] == "peer" and not (f["reference_source"] or "").startswith("torch "):
            problems.append(f"{name}: the reference did not come from a torch process")
    if problems:
        raise SystemExit("bench check failed:\n  " + "\n  ".join(problems))
    print(f"bench check: {len(figures)} figures present, finite, peers measured by torch")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check", action="store_true")
    groups = ["allreduce", "train_step", "ddp_overhead", "zero", "control_plane", "elastic"]
    ap.add_argument("--only", nargs="+", choices=groups, default=groups)
    args = ap.parse_args()
    started = time.time()
    limit = bench_allreduce(args) if "allreduce" in args.only else None
    if "train_step" in args.only:
        bench_train_step(args)
    if "ddp_overhead" in args.only:
        bench_ddp_overhead(args)
    if "zero" in args.only:
        bench_zero(args)
    if "control_plane" in args.only:
        bench_control_plane(args)
    if "elastic" in args.only:
        elastic.run_all(args, add_figure)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(figures, f, indent=2)
    table = markdown(limit, args.quick)
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {os.path.join(OUT, 'results.json')} ({time.time() - started:.0f} s)")
    if args.check:
        check()


if __name__ == "__main__":
    main()

"""Elastic figures for bench/run.py: what a lost worker, a checkpoint and a late resume cost.

recovery            kill -> first step of the next generation, warm survivors (the job restarts
                    by itself) vs a cold full restart (the job fails, is relaunched with --resume)
checkpoint_stall    seconds the training thread is held up per checkpoint of a >= 100 M
                    parameter model, vs the seconds the save itself takes (what a synchronous
                    save holds training up for); goal: <= 5 %
resume_step_10000   launch -> first step when resuming a synthesised step-10,000 checkpoint vs
                    a step-10 one (the data cursor is restored in O(1)); goal: equal
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
TINY = os.path.join(ROOT, "examples", "tiny")


def model_dir(job, hidden, intermediate, layers):
    """A random-init Llama with the example tokenizer, and the example data, under `job`."""
    os.makedirs(os.path.join(job, "base"), exist_ok=True)
    shutil.copy(os.path.join(TINY, "base", "tokenizer.json"), os.path.join(job, "base"))
    shutil.copytree(os.path.join(TINY, "data"), os.path.join(job, "data"), dirs_exist_ok=True)
    config = dict(model_type="llama", vocab_size=259, hidden_size=hidden,
                  intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=256,
                  eos_token_id=257)
    with open(os.path.join(job, "base", "config.json"), "w") as f:
        json.dump(config, f)
    params = layers * (4 * hidden * hidden + 3 * hidden * intermediate) + 2 * 259 * hidden
    return params


def write_config(job, name, world, steps, every, extra_cluster="", micro=1, seq=32):
    path = os.path.join(job, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"""job:
  name: {name}
  seed: 7
cluster:
  launcher: local
  world_size: {world}
  threads_per_worker: {max(1, (os.cpu_count() or 2) // world)}
{extra_cluster}model:
  path: base
  init: random
data:
  train: data/train.jsonl
  seq_len: {seq}
training:
  steps: {steps}
  micro_batch_size: {micro}
  lr: 1.0e-3
  warmup_steps: 1
checkpoint:
  dir: {name}
  every_steps: {every}
""")
    return path


class Run:
    """`coordinator launch`, each stdout line stamped with the wall time it was read."""

    def __init__(self, args, env=None):
        self.started = time.time()
        self.proc = subprocess.Popen([os.path.join(BIN, "coordinator"), "launch"] + args,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, bufsize=1)
        self.lines = [(time.time(), line.rstrip("\n")) for line in self.proc.stdout]
        self.proc.wait()
        self.err = self.proc.stderr.read()

    def first(self, pattern, after=0.0):
        for t, line in self.lines:
            if t >= after and re.match(pattern, line):
                return t, line
        raise RuntimeError(f"no line matching {pattern!r}:\n" + "\n".join(
            l for _, l in self.lines) + "\n" + self.err)


def bench_recovery(args, add_figure):
    rounds = 1 if args.quick else 3
    warm, cold = [], []
    with tempfile.TemporaryDirectory() as job:
        shape = (64, 176, 2) if args.quick else (512, 1408, 4)
        model_dir(job, *shape)
        for r in range(rounds):
            for kind in (["warm", "cold"] if r % 2 == 0 else ["cold", "warm"]):
                name = f"{kind}{r}"
                marker = os.path.join(job, f"{name}.fault")
                extra = "  max_restarts: 0\n" if kind == "cold" else ""
                config = write_config(job, name, 2, 12, 3, extra)
                env = {"FERROTUNE_TEST_FAULT": f"allreduce:1:7:{marker}"}
                run = Run([config], env)
                with open(marker) as f:
                    killed = int(f.read().split("unix_ms ")[1].split()[0]) / 1000
                if kind == "warm":
                    if run.proc.returncode != 0:
                        raise RuntimeError(run.err)
                    back, _ = run.first(r"generation 2: ")
                    t, _ = run.first(r"step ", after=back)
                    warm.append(t - killed)
                else:
                    if run.proc.returncode == 0:
                        raise RuntimeError("the cold run was meant to fail")
                    again = Run([config, "--resume"])
                    if again.proc.returncode != 0:
                        raise RuntimeError(again.err)
                    t, _ = again.first(r"step ")
                    cold.append(t - killed)
    add_figure("recovery", warm, cold, "s, kill to first step", False,
               source="cold full restart (job fails, relaunched with --resume)",
               kind="baseline")


def bench_checkpoint_stall(args, add_figure):
    with tempfile.TemporaryDirectory() as job:
        shape = (64, 176, 2) if args.quick else (1024, 2816, 8)
        params = model_dir(job, *shape)
        # Checkpoints further apart than a save takes (as in real runs): the stall is then the
        # snapshot alone, not a wait for the previous write.
        config = write_config(job, "stall", 1, 15, 5, seq=16)
        run = Run([config])
        if run.proc.returncode != 0:
            raise RuntimeError(run.err)
        stalls, writes = [], []
        for _, line in run.lines:
            m = re.search(r"training held up ([0-9.]+) s; written in the background in ([0-9.]+) s",
                          line)
            if m and "step 15 " not in line:
                # The report's resolution is a millisecond.
                stalls.append(max(float(m.group(1)), 0.001))
                writes.append(float(m.group(2)))
    if not stalls:
        raise RuntimeError("no background checkpoint was reported:\n" + run.err)
    # Lower is better on both: the reference is what a synchronous save would hold training up.
    add_figure("checkpoint_stall", stalls, writes, "s per checkpoint", False,
               source="the same save done synchronously (its background write time)",
               kind="baseline",
               detail={"parameters": params,
                       "stall_fraction_of_save": [s / w for s, w in zip(stalls, writes)]})


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return os.path.getsize(path), h.hexdigest()


def synthesise(step10, late, step, global_batch, cache_root):
    """A copy of `step10` whose state says `step` steps were taken (cursor made by Mixture);
    its manifest entry updated so that the workers' verification accepts it."""
    shutil.copytree(step10, late)
    state_path = os.path.join(late, "training_state", "trainer_state.json")
    with open(state_path) as f:
        state = json.load(f)
    sizes = []
    for cache in state["datasets"]:
        with open(os.path.join(cache_root, cache, "meta.json")) as f:
            sizes.append(json.load(f)["sequences"])
    cursor = subprocess.run(
        [os.path.join(BIN, "mixture-cursor"), "--seed", str(state["seed"]),
         "--sizes", ",".join(map(str, sizes)), "--weights", ",".join("1" for _ in sizes),
         "--global-batch", str(global_batch), "--steps", str(step)],
        check=True, capture_output=True, text=True).stdout
    state.update(step=step, optimizer_steps=step, data_cursor=json.loads(cursor))
    with open(state_path, "w") as f:
        json.dump(state, f, indent=2)
    manifest_path = os.path.join(late, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    size, sha = file_digest(state_path)
    for entry in manifest["files"]:
        if entry["path"] == "training_state/trainer_state.json":
            entry["bytes"], entry["sha256"] = size, sha
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=2)


def bench_resume(args, add_figure):
    rounds = 1 if args.quick else 3
    late_step = 10_000
    early, late = [], []
    with tempfile.TemporaryDirectory() as job:
        shape = (64, 176, 2) if args.quick else (512, 1408, 4)
        model_dir(job, *shape)
        first = Run([write_config(job, "resume", 2, 10, 10)])
        if first.proc.returncode != 0:
            raise RuntimeError(first.err)
        root = os.path.join(job, "resume")
        step10 = os.path.join(root, "step-00000010")
        synthesised = os.path.join(job, "synthesised-step-10000")
        synthesise(step10, synthesised, late_step, 2, os.path.join(root, "data-cache"))
        for r in range(rounds):
            for kind in (["early", "late"] if r % 2 == 0 else ["late", "early"]):
                steps, source = (20, step10) if kind == "early" else (late_step + 10, synthesised)
                config = write_config(job, f"{kind}{r}", 2, steps, 0)
                run = Run([config, "--resume", source])
                if run.proc.returncode != 0:
                    raise RuntimeError(run.err)
                t, _ = run.first(r"step ")
                (early if kind == "early" else late).append(t - run.started)
    add_figure("resume_step_10000", late, early, "s, launch to first step", False,
               source="the same resume from step 10", kind="baseline")


def run_all(args, add_figure):
    bench_recovery(args, add_figure)
    bench_checkpoint_stall(args, add_figure)
    bench_resume(args, add_figure)

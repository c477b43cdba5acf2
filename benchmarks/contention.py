"""The demo's training speed with another process keeping one CPU core busy, as a ratio of its
idle speed, for the thread settings sagan-dist can take.

    python -m benchmarks.contention [--steps 12] [--warmup 3]

Each row runs the real Trainer on the demo config (digits shards, width 12, batch 64) in a fresh
process, first on an idle machine, then beside a busy-looping process, and reports images/s and
busy/idle. Rows: what `sagan-dist train` does now (threads from the usable CPUs, OpenMP waiting
passively), OpenMP's default active waiting with the same threads (the old behaviour), and one
thread. The goal (issue "Fast at scale"): under contention at least 40% of the idle speed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch
from sagan_dist import dist
from sagan_dist.config import load
from sagan_dist.dist import DistInfo
from sagan_dist.train import Trainer
steps, warmup = int(sys.argv[1]), int(sys.argv[2])
threads = dist.configure_threads()
cfg = load(["demo"], ["tracking.enabled=false", "train.run_dir=/tmp/sagan-contention", "train.resume=never"])
tr = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
tr.start_segment()
for _ in range(warmup):
    tr.train_step()
t0 = time.perf_counter()
for _ in range(steps):
    tr.train_step()
tr.stats.read()  # the step's work is done when its statistics can be read
seconds = time.perf_counter() - t0
print(json.dumps({"img_s": steps * cfg.train.batch_size / seconds, "threads": threads}))
"""

VARIANTS = {
    "default (usable CPUs, passive wait)": {"OMP_WAIT_POLICY": "PASSIVE"},
    "usable CPUs, OpenMP active wait (before)": {"OMP_WAIT_POLICY": "ACTIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
}


def run_child(env_extra: dict[str, str], steps: int, warmup: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(warmup)], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def busy_core() -> subprocess.Popen:
    """Another process keeping one core busy (a pure-Python loop, no threads of its own)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    print(f"CPUs usable: {len(os.sched_getaffinity(0))}; {time.strftime('%Y-%m-%d %H:%M')}")
    print("| variant | threads | idle img/s | busy core img/s | busy / idle |")
    print("|---|---:|---:|---:|---:|")
    for name, env in VARIANTS.items():
        idle = run_child(env, args.steps, args.warmup)
        hog = busy_core()
        try:
            busy = run_child(env, args.steps, args.warmup)
        finally:
            hog.kill()
            hog.wait()
        print(f"| {name} | {idle['threads']} | {idle['img_s']:.1f} | {busy['img_s']:.1f} | "
              f"{busy['img_s'] / idle['img_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Peak memory per training rank with 1 and with 2 torchrun ranks (gloo, CPU) on one cache.

    python -m pipeline.bench.synthetic_cache /tmp/coco       # COCO-sized, realistic captions
    python -m pipeline.bench.memory /tmp/coco [--steps 20] [--ranks 1 2] [--decoder showtell] [--json out.json]

Each rank does what `pipeline train` does before and during its first steps: `train.setup` (load_cache,
feature statistics, the DDP decoder, rank 0's validation references), then `--steps` training steps.
A thread samples the process's memory every 50 ms: RSS (what `top` shows; it counts a page mapped by
several processes in every one of them) and PSS (proportional set size, /proc/self/smaps_rollup: a page
shared by k processes counts 1/k in each, so the ranks' PSS add up to the machine's real use). The
PSS right after `import torch` is reported too: it is paid by every process whatever the cache.
Judged by PSS: target, the 2 ranks' total at most 1.3x the 1-rank total. Printed beside it: the same
above each process's `import torch`, and after setup only (what loading the cache costs a rank): torch's
own memory and the training state (decoder, gradients, Adam, DDP buckets) are per process whatever the
cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def memory_mb() -> dict:
    """This process's current RSS and PSS, and its peak RSS (VmHWM), in MB."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("Rss", "Pss"):
                out[key.lower()] = int(value.split()[0]) / 1024
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                out["hwm"] = int(line.split()[1]) / 1024
    return out


class Sampler(threading.Thread):
    """Keeps the largest RSS and PSS seen every `every` seconds until stopped."""

    def __init__(self, every: float = 0.05):
        super().__init__(daemon=True)
        self.every, self.peak, self.done = every, {"rss": 0.0, "pss": 0.0}, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            time.sleep(self.every)

    def sample(self) -> None:
        m = memory_mb()
        for k in ("rss", "pss"):
            self.peak[k] = max(self.peak[k], m[k])

    def stop(self) -> dict:
        self.done.set()
        self.join()
        self.sample()
        return self.peak


def rank_main(cache_dir: str, steps: int, out_json: str, decoder: str = "showtell") -> None:
    import torch

    torch.set_num_threads(1)
    baseline = memory_mb()
    sampler = Sampler()
    sampler.start()
    from pipeline.train.config import TrainConfig
    from pipeline.train.train import epoch_batches, run_epoch, setup

    cfg = TrainConfig(device="cpu", batch_size=128, val_images=0, decoder=decoder)  # attend: the grid read per batch
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        run = setup(cache_dir, Path(tmp), Path(tmp), cfg, log=lambda m: None)
        after_load = memory_mb()
        batches = epoch_batches(run.data, run.train_rows, cfg, 0, run.dist)[:steps]
        run_epoch(run.trainer, run.data, batches)
    peak = sampler.stop()
    end = memory_mb()
    row = {"rank": run.dist.rank, "world_size": run.dist.world_size, "steps": len(batches),
           "pss_after_import_torch_mb": baseline["pss"], "pss_after_setup_mb": after_load["pss"],
           "peak_pss_mb": peak["pss"], "peak_rss_mb": max(peak["rss"], end["hwm"]), "pss_end_mb": end["pss"]}
    rows = run.dist.all_gather(row)
    if run.dist.is_main:
        Path(out_json).write_text(json.dumps(rows))


def launch(cache_dir: str, ranks: int, steps: int, decoder: str = "showtell") -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        out = Path(tmp, "rows.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "pipeline.bench.memory", "--rank-main", cache_dir, "--steps", str(steps), "--out", str(out),
               "--decoder", decoder]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache_dir")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", default=None)
    ap.add_argument("--decoder", default="showtell", choices=("showtell", "attend"),
                    help="attend: the attention decoder, reading the cache's grid (synthetic_cache --grid)")
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_main:
        rank_main(a.cache_dir, a.steps, a.out, a.decoder)
        return
    runs = {}
    for n in a.ranks:
        rows = launch(a.cache_dir, n, a.steps, a.decoder)
        runs[n] = {"ranks": rows, "total_peak_pss_mb": sum(r["peak_pss_mb"] for r in rows),
                   "total_peak_rss_mb": sum(r["peak_rss_mb"] for r in rows),
                   "total_pss_after_import_torch_mb": sum(r["pss_after_import_torch_mb"] for r in rows)}
        print(f"{n} rank(s), {a.steps} steps each, {a.decoder} decoder:")
        for r in rows:
            print(f"  rank {r['rank']}: peak PSS {r['peak_pss_mb']:7.0f} MB, peak RSS {r['peak_rss_mb']:7.0f} MB, "
                  f"PSS after setup {r['pss_after_setup_mb']:7.0f} MB, after `import torch` {r['pss_after_import_torch_mb']:5.0f} MB")
        print(f"  total peak PSS {runs[n]['total_peak_pss_mb']:7.0f} MB, total peak RSS {runs[n]['total_peak_rss_mb']:7.0f} MB")
    if 1 in runs and 2 in runs:
        one, two = runs[1], runs[2]
        ratio = two["total_peak_pss_mb"] / one["total_peak_pss_mb"]
        above = ((two["total_peak_pss_mb"] - two["total_pss_after_import_torch_mb"])
                 / (one["total_peak_pss_mb"] - one["total_pss_after_import_torch_mb"]))
        loaded = (sum(r["pss_after_setup_mb"] - r["pss_after_import_torch_mb"] for r in two["ranks"])
                  / sum(r["pss_after_setup_mb"] - r["pss_after_import_torch_mb"] for r in one["ranks"]))
        runs["ratio_total_pss_2_over_1"] = ratio
        runs["ratio_above_torch_import_2_over_1"] = above
        runs["ratio_setup_above_torch_import_2_over_1"] = loaded
        print(f"total peak PSS, 2 ranks / 1 rank: {ratio:.2f}  (target <= 1.3)")
        print(f"the same above each process's `import torch` PSS: {above:.2f}")
        print(f"after setup (cache loaded, decoder built), above `import torch`: {loaded:.2f}  (the cache's share)")
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()

"""Cost of the MMD penalty against batch size: time and peak memory, local and global, in one run.

    .venv/bin/python bench/mmd.py              # about 3 minutes on 2 cores

For n = 256 ... 8192 codes and d_z = 8 and 64, forward and backward of the multi-scale IMQ MMD on n codes and n
prior samples: ``local`` in one process (``vegan_scale.penalties.mmd``), ``global`` over 2 processes with n/2 codes
each (``global_mmd``; each process computes its rows against all). Each measurement runs in a fresh process so
that its peak resident memory is its own; "peak MiB" is that peak less the process's resident memory just before
the call. For reference, one n x n float32 matrix is 4 n^2 bytes; the n x n x d broadcast that pythae's estimator
builds would be 4 n^2 d bytes (8192 codes, d 64: 16 GiB). The time should grow as n^2 (x4 per doubling) once n
is large enough for the pairwise work to dominate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from vegan_scale.process_exit import leave

SIZES = (256, 512, 1024, 2048, 4096, 8192)
DIMS = (8, 64)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(n: int, d: int, scope: str, out: Path) -> None:
    import torch

    from vegan_scale.penalties.kernel_mmd import global_mmd, mmd

    world = 1
    if scope == "global":
        torch.distributed.init_process_group("gloo")
        world = torch.distributed.get_world_size()
    rows = n // world
    torch.manual_seed(torch.distributed.get_rank() if world > 1 else 0)
    z = torch.randn(rows, d, requires_grad=True)
    p = torch.randn(rows, d)
    fn = global_mmd if scope == "global" else mmd
    before = _rss()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn(z, p, "imq", 1.0).backward()
        times.append(time.perf_counter() - start)
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_before) - before
    if world == 1 or torch.distributed.get_rank() == 0:
        out.write_text(json.dumps({"seconds": sorted(times)[1], "peak": peak}))


def measure(n: int, d: int, scope: str) -> dict:
    out = Path(f"/tmp/vegan_bench_mmd_{os.getpid()}.json")
    args = [__file__, "--worker", str(n), str(d), scope, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if scope == "global" else os.environ.get("OMP_NUM_THREADS", "2")}
    if scope == "global":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    else:
        cmd = [sys.executable, *args]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        n, d, scope, out = args.worker
        worker(int(n), int(d), scope, Path(out))
        leave(0)  # not through the interpreter's teardown while gloo's threads may still release tensors
    mib = 2**20
    print(
        f"{'scope':<7} {'d':>3} {'n':>5} {'ms':>9} {'x prev':>7} {'peak MiB':>9} {'n x n MiB':>10} "
        f"{'n x n x d MiB':>14}"
    )
    for scope in ("local", "global"):
        for d in DIMS:
            previous = None
            for n in SIZES:
                r = measure(n, d, scope)
                growth = f"{r['seconds'] / previous:7.1f}" if previous else f"{'':>7}"
                previous = r["seconds"]
                print(
                    f"{scope:<7} {d:>3} {n:>5} {1e3 * r['seconds']:>9.1f} {growth} {r['peak'] / mib:>9.0f} "
                    f"{4 * n * n / mib:>10.0f} {4 * n * n * d / mib:>14.0f}"
                )
    print("headline: the MMD never holds an n x n x d tensor; its peak is a few n x n matrices at most")


if __name__ == "__main__":
    main()

"""Benchmark ``sld batch encode`` against a shell loop of ``sld encode`` over the same adapters.

Each measurement is a fresh ``sld`` process, as a user runs it, so start-up is included:

* ``loop``  -- ``for a in ...; do sld encode $a -o ...; done`` in bash: one Python, one torch
  import, one adapter per process.
* ``local`` -- ``sld batch encode SRC DST --workers W``: a process pool on this machine.
* ``ray``   -- ``sld batch encode SRC DST --ray --workers W``: a local Ray cluster started for
  the run (needs the ray extra; skipped when it is missing).

For each engine and worker count: the wall time of the whole tree, the start-up overhead (the
wall time of the same command on a one-adapter listing), the steady rate
``(N - 1) / (wall_N - wall_1)`` in adapters per second, and its ratio to the shell loop's rate.
Peak memory: the largest VmHWM (peak resident set, /proc) of the driver and of any worker
process, sampled every 50 ms from /proc while the command runs (Linux only). Ray's worker
peak includes its runtime. ``--sizes`` repeats the local pool at other tree sizes: the worker
peak must not grow with the number of adapters.

``--index-items N`` measures the manifest index (what a rerun holds to decide what to skip):
Python memory per item from tracemalloc, for N synthetic records.

Usage: nice -n 10 python benchmarks/bench_batch.py [--items 120] [--loop-items 12]
       [--workers 1 2] [--engines loop local ray] [--dim 64] [--rank 4] [--sizes 60 240]
       [--repeat 2] [--index-items 200000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parents[1]


def make_tree(root: Path, n: int, dim: int, rank: int) -> list[str]:
    """``n`` PEFT adapter directories, two modules (dim x dim) each; returns their paths."""
    paths = []
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"]}
    for i in range(n):
        d = root / f"g{i % 10}" / f"a{i:05d}"
        d.mkdir(parents=True)
        rng = np.random.default_rng(i)
        t = {}
        for mod in ("q_proj", "v_proj"):
            key = f"base_model.model.layers.0.self_attn.{mod}"
            t[f"{key}.lora_A.weight"] = rng.uniform(-0.1, 0.1, (rank, dim)).astype(np.float32)
            t[f"{key}.lora_B.weight"] = (rng.standard_normal((dim, rank)) * 0.01).astype(np.float32)
        save_file(t, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        paths.append(str(d))
    return paths


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, ()):
            out.append(c)
            todo.append(c)
    return out


def _vmhwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd``; wall seconds, and the peak VmHWM (MB) of the driver and of its largest worker."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(REPO))
    peaks: dict[int, tuple[int, str]] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for p in [proc.pid, *_descendants(proc.pid)]:
                kb = _vmhwm_kb(p)
                if kb > peaks.get(p, (0, ""))[0]:
                    peaks[p] = (kb, peaks.get(p, (0, ""))[1] or _cmdline(p))
            stop.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode not in (0,):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    driver = peaks.get(proc.pid, (0, ""))[0]
    # Workers: pool workers (fork server children) or Ray's default_worker processes.
    workers = [kb for p, (kb, cmd) in peaks.items()
               if p != proc.pid and ("forkserver" in cmd or "default_worker" in cmd or "ray::" in cmd)]
    return {"wall_s": wall, "driver_mb": driver / 1024, "worker_mb": max(workers, default=0) / 1024}


def sld(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltacodec.cli", *args]


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    """The fastest of repeated runs (the machine is shared: the others measure its load), with
    the largest memory peaks seen."""
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    best["driver_mb"] = max(r["driver_mb"] for r in runs)
    best["worker_mb"] = max(r["worker_mb"] for r in runs)
    return best


def bench_engine(engine: str, workers: int, src: Path, one: Path, tmp: Path, env: dict[str, str], repeat: int) -> dict:
    flags = ["--workers", str(workers)] + (["--ray"] if engine == "ray" else [])
    fulls, starts, n = [], [], 0
    for _ in range(repeat):
        # Fresh output directories each time: a rerun into the same DST would skip everything.
        dst, dst1 = Path(tempfile.mkdtemp(dir=tmp)) / "out", Path(tempfile.mkdtemp(dir=tmp)) / "one"
        fulls.append(timed(sld("batch", "encode", str(src), str(dst), "-q", *flags), env))
        n = sum(1 for line in open(dst / "sld-batch-encode.jsonl") if '"status":"ok"' in line)
        starts.append(timed(sld("batch", "encode", str(one), str(dst1), "-q", *flags), env))
        shutil.rmtree(dst.parent)
        shutil.rmtree(dst1.parent)
    full, start = _best(fulls), _best(starts)
    rate = (n - 1) / max(1e-9, full["wall_s"] - start["wall_s"])
    return {"engine": engine, "workers": workers, "items": n, "wall_s": full["wall_s"], "startup_s": start["wall_s"],
            "rate": rate, "driver_mb": full["driver_mb"], "worker_mb": full["worker_mb"]}


def bench_loop(paths: list[str], tmp: Path, env: dict[str, str], repeat: int) -> dict:
    py = sys.executable
    runs = []
    for _ in range(repeat):
        out = Path(tempfile.mkdtemp(dir=tmp))
        script = "set -e\n" + "".join(
            f'"{py}" -m deltacodec.cli encode "{p}" -o "{out}/{i}.sld" -q\n' for i, p in enumerate(paths))
        runs.append(timed(["bash", "-c", script], env))
    r = _best(runs)
    return {"engine": "loop", "workers": 1, "items": len(paths), "wall_s": r["wall_s"], "startup_s": None,
            "rate": len(paths) / r["wall_s"], "driver_mb": None, "worker_mb": r["driver_mb"]}


def index_bytes_per_item(n: int) -> float:
    from deltacodec.batch.manifest import Index

    recs = ({"source": f"team{i % 1000}/user{i % 37}/adapter{i:07d}", "output": f"team{i % 1000}/user{i % 37}/adapter{i:07d}.sld",
             "status": "ok", "fingerprint": f"{i:016x}", "options_id": f"{i * 7:016x}",
             "source_sha256": f"{i * 13:064x}", "bytes": 1000 + i} for i in range(n))
    tracemalloc.start()
    idx = Index()
    for r in recs:
        idx.update(r)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(idx) == n
    return size / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=120, help="adapters in the tree (default 120)")
    ap.add_argument("--loop-items", type=int, default=12, help="adapters the shell loop encodes (default 12)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--engines", nargs="+", default=["loop", "local", "ray"], choices=["loop", "local", "ray"])
    ap.add_argument("--dim", type=int, default=64, help="in = out features of each of the two modules (default 64)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="*", default=[], help="extra tree sizes for the local pool's memory")
    ap.add_argument("--index-items", type=int, default=0, help="measure the manifest index with N records")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is kept (default 1)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows: list[dict] = []
    extra: dict = {"load_before": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as t:
        tmp = Path(t)
        paths = make_tree(tmp / "src", args.items, args.dim, args.rank)
        one = tmp / "one.txt"
        one.write_text(os.path.relpath(paths[0], tmp) + "\n")
        if "loop" in args.engines:
            rows.append(bench_loop(paths[: args.loop_items], tmp, env, args.repeat))
        for engine in ("local", "ray"):
            if engine not in args.engines:
                continue
            if engine == "ray":
                try:
                    import ray  # noqa: F401
                except ImportError:
                    print("ray is not installed: skipping the Ray engine", file=sys.stderr)
                    continue
            for w in args.workers:
                rows.append(bench_engine(engine, w, tmp / "src", one, tmp, env, args.repeat))
        for size in args.sizes:
            sub = tmp / f"src{size}"
            make_tree(sub, size, args.dim, args.rank)
            r = bench_engine("local", max(args.workers), sub, one, tmp, env, args.repeat)
            r["engine"] = f"local ({size} items)"
            rows.append(r)
    if args.index_items:
        extra["index_bytes_per_item"] = index_bytes_per_item(args.index_items)
    extra["load_after"] = os.getloadavg()
    loop = next((r["rate"] for r in rows if r["engine"] == "loop"), None)
    for r in rows:
        r["vs_loop"] = r["rate"] / loop if loop else None
    if args.json:
        print(json.dumps({"rows": rows, **extra}, indent=2))
        return
    print(f"{args.items} adapters, 2 modules {args.dim}x{args.dim} rank {args.rank}, bits 3; "
          f"{extra['cpus']} CPUs, load average {extra['load_before'][0]:.1f} before, {extra['load_after'][0]:.1f} after")
    print("| engine | workers | items | wall s | start-up s | adapters/s | vs shell loop | driver peak MB | worker peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        print(f"| {r['engine']} | {r['workers']} | {r['items']} | {r['wall_s']:.1f} | {f(r['startup_s'], '.1f')} | "
              f"{r['rate']:.1f} | {f(r['vs_loop'], '.1f')}x | {f(r['driver_mb'], '.0f')} | {f(r['worker_mb'], '.0f')} |")
    if "index_bytes_per_item" in extra:
        b = extra["index_bytes_per_item"]
        print(f"manifest index: {b:.0f} bytes per item ({b * 1e6 / 2**20:.0f} MiB per million adapters, "
              f"{args.index_items} records)")


if __name__ == "__main__":
    main()

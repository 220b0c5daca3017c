"""`noclone bench` wall time with the local executor and on a local Ray with 1 and 2 CPUs, same small grid.

    .venv/bin/python benchmarks/bench_scale.py [--out DIR] [--ray-cpus 1,2] [--local-threads 1,2] [--steps 20]
                                               [--json OUT]

The grid: the embedded sandbox model, one held-out person, clean vs a short APDM, no transform vs JPEG 75, a
DreamBooth of --steps steps, seeds 0 and 1 (8 cells; 1 protection, 2 transforms, 8 attacks, 8 generations, 8
metrics). Each run is a fresh `noclone bench` process on a fresh folder (Ray's start and stop included), with
OMP_NUM_THREADS set: the local executor with each of --local-threads torch threads, Ray with one thread per task
and --ray-cpus CPUs (as many tasks at once). Prints wall times, each run's speed-up against the first local run
(1 thread) and Ray 2 CPUs against Ray 1 CPU, and checks that the Ray runs' rows carry the local 1-thread run's
metric values. Needs Ray (pip install -e '.[ray]'). About 10-15 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

METRICS = ("ism", "identity_match_rate", "fdfr", "fid")


def grid(steps: int) -> dict:
    quick = {"num_class_images": 4}
    return {
        "name": "scale",
        "models": ["sandbox"],
        "subjects": [{"class": "person", "identity": "held_out:0"}],
        "defences": ["none", {"apdm": {"outer_steps": 2, "inner_steps": 2, **quick}}],
        "attacks": [{"dreambooth": {"steps": steps, **quick}}],
        "transforms": ["none", "jpeg:75"],
        "prompts": ["a photo of {token} {class_noun}"],
        "images_per_prompt": 4,
        "seeds": [0, 1],
        "metrics": list(METRICS),
        "device": "cpu",
    }


def run(label: str, config: Path, out: Path, threads: int, extra: list[str]) -> dict:
    """One `noclone bench` process; its wall time and rows."""
    noclone = Path(sys.executable).with_name("noclone")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [str(noclone), "-q", "bench", str(config), "--out", str(out), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{label}: exit {done.returncode}; see {out.parent / (out.name + '.log')}")
    rows = json.loads((out / "results.json").read_text())["rows"]
    return {"run": label, "seconds": round(seconds, 1), "rows": rows}


def difference(a: list[dict], b: list[dict]) -> float:
    """The largest absolute difference of a metric between two runs' rows (inf if the cells differ)."""
    if [r["cell_id"] for r in a] != [r["cell_id"] for r in b]:
        return float("inf")
    return max(abs((x[m] or 0) - (y[m] or 0)) for x, y in zip(a, b) for m in METRICS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="where the runs' folders go (default: a temporary folder)")
    p.add_argument("--ray-cpus", default="1,2", help="local Ray sizes to run (comma-separated)")
    p.add_argument("--local-threads", default="1,2", help="torch threads of the local executor's runs")
    p.add_argument("--steps", type=int, default=20, help="DreamBooth steps of each attack")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    config = root / "scale.yaml"
    config.write_text(yaml.safe_dump(grid(args.steps)))
    load = os.getloadavg()[0]
    print(f"grid: 8 cells (sandbox, clean/APDM x none/jpeg:75 x seeds 0,1, DreamBooth {args.steps} steps); "
          f"{os.cpu_count()} CPU(s), load average {load:.1f} before; folders in {root}", flush=True)
    results = []
    for threads in [int(t) for t in args.local_threads.split(",") if t]:
        results.append(run(f"local executor, {threads} thread(s)", config, root / f"local-{threads}t", threads, []))
        print(f"{results[-1]['run']}: {results[-1]['seconds']} s", flush=True)
    for cpus in [int(c) for c in args.ray_cpus.split(",") if c]:
        results.append(run(f"ray, {cpus} CPU(s) x 1 thread", config, root / f"ray-{cpus}cpu", 1,
                           ["--executor", "ray", "--ray-cpus", str(cpus), "--task-cpus", "1"]))
        print(f"{results[-1]['run']}: {results[-1]['seconds']} s", flush=True)
    base = results[0]
    print(f"\n{'run':<34} {'wall s':>8} {'speed-up vs ' + base['run']:>10}")
    for r in results:
        print(f"{r['run']:<34} {r['seconds']:>8.1f} {base['seconds'] / r['seconds']:>9.2f}x")
    ray_runs = [r for r in results if r["run"].startswith("ray")]
    if len(ray_runs) >= 2:
        print(f"ray {ray_runs[-1]['run'].split(', ')[1]} vs {ray_runs[0]['run'].split(', ')[1]}: "
              f"{ray_runs[0]['seconds'] / ray_runs[-1]['seconds']:.2f}x")
    for r in results[1:]:
        r["max_metric_difference"] = difference(base["rows"], r["rows"])
        print(f"largest metric difference, {r['run']} vs {base['run']}: {r['max_metric_difference']:.3g}")
    # one torch thread per process in both: the Ray runs must give the local run's numbers exactly
    identical = all(r["max_metric_difference"] <= 1e-9 for r in results[1:] if r["run"].startswith("ray"))
    print(f"Ray runs identical to {base['run']}: {identical}; load average {os.getloadavg()[0]:.1f} after")
    if args.json:
        args.json.write_text(json.dumps({"load_before": load, "identical": identical,
                                         "runs": [{k: r[k] for k in ("run", "seconds", "max_metric_difference")
                                                   if k in r} for r in results]}, indent=2))
    if not identical:
        raise SystemExit("the Ray runs' metric values differ from the local executor's")


if __name__ == "__main__":
    main()

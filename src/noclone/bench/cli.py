"""The `noclone bench` command line.

    noclone bench CONFIG.yaml --out DIR [--set models.0.path=/models/sd15] [--dry-run] [--keep-going]
    noclone bench CONFIG.yaml --out DIR --shard 1/2 & noclone bench CONFIG.yaml --out DIR --shard 2/2
    noclone bench --preset sandbox-quick --out DIR
    noclone bench CONFIG.yaml --out DIR --executor ray [--ray-cpus 8]      # every stage a task on a local Ray
    noclone bench CONFIG.yaml --out /shared/DIR --executor ray --address auto   # on a Ray cluster (docs/scale.md)
    noclone bench report DIR [--images-per-cell 4] [--image-format jpeg]
                                      # re-render report.html (and the CSV/JSON) from DIR/results.sqlite
    noclone bench --list-presets | --print-preset NAME
"""

from __future__ import annotations

import argparse
import logging

from noclone.errors import NocloneError

log = logging.getLogger("noclone")


def cmd_bench(args: argparse.Namespace) -> None:
    from noclone.bench.config import load_config, preset_names, preset_text
    from noclone.bench.runner import dry_run, parse_shard, render_report, run_bench

    if args.list_presets:
        print("\n".join(preset_names()))
        return
    if args.print_preset:
        print(preset_text(args.print_preset), end="")
        return
    positional = list(args.args)
    if positional and positional[0] == "report":
        if len(positional) != 2:
            raise NocloneError("usage: noclone bench report DIR [--images-per-cell N] [--image-format png|jpeg]")
        settings = {k: v for k, v in (("images_per_cell", args.images_per_cell),
                                      ("image_format", args.image_format)) if v is not None}
        if settings.get("images_per_cell", 1) < 1:
            raise NocloneError(f"--images-per-cell {args.images_per_cell} must be at least 1")
        print(f"bench report: {render_report(positional[1], settings)}")
        return
    if len(positional) > 1:
        raise NocloneError(f"expected one CONFIG.yaml, got {len(positional)} arguments: {' '.join(positional)}")
    config = load_config(positional[0] if positional else None, args.preset, args.set)
    shard = parse_shard(args.shard) if args.shard else None
    if args.dry_run:
        lines = dry_run(config, args.out, shard)
        print("\n".join(lines))
        print(f"{len(lines)} cell(s) x seed(s); config {config.name} is valid")
        return
    if not args.out:
        raise NocloneError("--out DIR is required (where the cache, results and report go)")
    ray_options = {k: v for k, v in (("address", args.address), ("num_cpus", args.ray_cpus),
                                     ("task_cpus", args.task_cpus), ("retries", args.retries)) if v is not None}
    result = run_bench(config, args.out, progress=not args.quiet, keep_going=args.keep_going,
                       shard=shard, executor=args.executor, ray_options=ray_options)
    print(f"bench report: {result['report']}")
    if result["failures"]:
        raise NocloneError(f"{len(result['failures'])} cell(s) failed (see the log and the report); rerun to retry them")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on the main parser's subparsers; returns the new parser."""
    p = subparsers.add_parser("bench", help="benchmark defences x attacks x photo transforms (cached, resumable, report)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml | report DIR",
                   help="a benchmark config, or 'report DIR' to re-render a finished folder's report")
    p.add_argument("--preset", help="a shipped config instead of CONFIG.yaml (see --list-presets)")
    p.add_argument("--out", help="output folder: cache/, results.sqlite, results.csv, results.json, report.html")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. models.0.path=/models/sd15 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the cells (done/todo), compute nothing")
    p.add_argument("--keep-going", action="store_true", help="record a failed cell and go on with the others")
    p.add_argument("--shard", metavar="I/N",
                   help="run only shard I of N (whole subject x defence groups); start all N side by side on the "
                        "same --out, one per core or GPU, to split the work")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: stages one after another in this process (default); ray: every stage a Ray task, "
                        "scheduled by its inputs on a local Ray or a cluster (pip install 'noclone[ray]')")
    p.add_argument("--address", metavar="auto|HOST:PORT",
                   help="--executor ray: connect to this Ray cluster (every node must mount --out at the same path); "
                        "without it a local Ray is started on this machine")
    p.add_argument("--ray-cpus", type=int, metavar="N", help="--executor ray: CPUs of the local Ray (default: all)")
    p.add_argument("--task-cpus", type=int, metavar="N",
                   help="--executor ray: CPUs (torch threads) of each stage task (default 1)")
    p.add_argument("--retries", type=int, metavar="N",
                   help="--executor ray: retries of a stage task after a lost worker or an OSError (default 2)")
    p.add_argument("--images-per-cell", type=int, help="bench report: generated images shown per cell")
    p.add_argument("--image-format", choices=("png", "jpeg"), help="bench report: picture encoding (jpeg: smaller file)")
    p.add_argument("--list-presets", action="store_true")
    p.add_argument("--print-preset", metavar="NAME", help="print a preset's YAML (to copy and edit)")
    p.set_defaults(func=cmd_bench)
    return p

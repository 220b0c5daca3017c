"""GPU readiness check: the costs that decide whether the paper-scale runs fit a machine, in one command and one JSON.

    .venv/bin/python benchmarks/gpu_check.py --out gpu_check.json                # sd15 on CUDA (at most ~8 min, H100)
    .venv/bin/python benchmarks/gpu_check.py --size tiny --out tiny.json        # tiny shapes, CPU, under a minute

Random weights, no download: `--size sd15` builds the SD1.5-shaped pipeline (`sd15-shapes`, 512 px), `--size tiny`
the `tiny` preset (32 px; APDM with N_per 2, RID's small 'dit' at 64 px). Each section runs the library's own
classes on a fresh copy of that pipeline, loaded the way the CLI loads a model (`--dtype auto`: bf16 on CUDA, fp32
on CPU); the precision policy the classes apply on top of it (noclone.training.precision) is measured as they
apply it, and the parameter dtypes seen during training are recorded:

- dreambooth      `DreamBooth` with the `sd15` preset (batch 1 + 1 prior image, lr 5e-6; 2 class images of 2 steps):
                  seconds per training step (median over steps after the first) and peak memory.
- rid             RID's generator, the paper's DiT (`dit-paper`, 8 heads, when rid_nets has it, else the 'dit'
                  with the paper's shape), latency per 512x512 image at batch 1 (and per image at batch 8); the
                  paper: 0.12 s on an A100.
- aspl            `ASPL` with the `paper` preset (4 photos, K = 3 surrogate steps, N = 6 PGD steps; 2 class images),
                  two rounds: the second round's time (= one outer iteration) and an estimate of the whole schedule
                  (R = 50 rounds); Anti-DreamBooth: 225 s per image for the whole schedule.
- apdm_attention, apdm_full
                  `APDM` with the `paper` preset (N_per 20, batch 1) and params attention / full for 3 outer steps,
                  on random subject and class latents (no class image generation, as benchmarks/apdm_memory.py):
                  seconds per outer step and peak memory against the memory plan of apdm.py's docstring
                  (`apdm_memory.plan`: weights, optimizer states and copies, without activations, VAE and text
                  encoder).

Peak memory is `torch.cuda.max_memory_allocated` on CUDA, the sampled resident set size on CPU. Every section is
guarded: a failure (an out-of-memory error, say) is recorded in the JSON with its error and the others still run;
sections that would start after `--max-seconds` are recorded as skipped. The JSON is rewritten after each section.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # not the "modules that should be kept in float32" notes
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apdm_memory import PeakSampler, plan, rss_bytes  # noqa: E402  (the APDM memory plan and the CPU peak sampler)

SECTIONS = ("dreambooth", "rid", "aspl", "apdm_attention", "apdm_full")
SIZES = {
    # tiny: N_per 2 instead of the paper's 20 (the paper's 20 inner steps of the attention path take ~5 s per outer
    # step on two CPU cores); RID's small 'dit' at 64 px
    "tiny": dict(preset="tiny", dreambooth_steps=3, apdm_outer_steps=3, inner_steps=2, aspl_rounds=2, rid_arch="dit",
                 rid_resolution=64, rid_repeats=5),
    "sd15": dict(preset="sd15-shapes", dreambooth_steps=10, apdm_outer_steps=3, inner_steps=None, aspl_rounds=2,
                 rid_arch="dit-paper", rid_resolution=512, rid_repeats=20),
}
GB = 1e9
PAPER = {"rid_seconds_per_image": 0.12, "rid_device": "A100", "aspl_seconds_per_image": 225.0}


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Clock:
    """Timestamps that wait for queued GPU work first."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated, or the sampled RSS on CPU (GB)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.result: dict = {}

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = rss_bytes()
            self.sampler = PeakSampler().__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.result = {"memory_kind": "cuda max_memory_allocated",
                           "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB}
        else:
            self.sampler.__exit__(*exc)
            peak = self.sampler.peak
            self.result = {"memory_kind": "cpu resident set size (sampled)"}
        self.result.update(baseline_gb=self.baseline / GB, peak_gb=peak / GB,
                           peak_above_baseline_gb=(peak - self.baseline) / GB)
        return False


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def module_dtypes(module: torch.nn.Module) -> dict[str, int]:
    """Parameter count per dtype (a precision policy shows up here)."""
    counts: dict[str, int] = {}
    for p in module.parameters():
        counts[dtype_name(p.dtype)] = counts.get(dtype_name(p.dtype), 0) + p.numel()
    return counts


def subject_images(n: int, resolution: int):
    from noclone.sandbox.render import render

    return [render("person", 2_000_000 + i, 0, 64).resize((resolution, resolution)) for i in range(n)]


def median_interval(stamps: list[float]) -> tuple[float, list[float]]:
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    return (statistics.median(intervals) if intervals else float("nan")), intervals


# ------------------------------------------------------------------------------------------------- sections


def check_dreambooth(ctx) -> dict:
    from noclone.attacks import DreamBooth
    from noclone.attacks.base import preset_config

    pipe = ctx.fresh_pipeline()
    clock, seen = ctx.clock, {}

    class TimedDreamBooth(DreamBooth):
        stamps: list[float] = []

        def after_step(self, pipe, step: int) -> None:
            self.stamps.append(clock.now())
            if step == 0:
                seen.update(unet=module_dtypes(pipe.unet), text_encoder=module_dtypes(pipe.text_encoder),
                            vae=module_dtypes(pipe.vae))

    config = preset_config("dreambooth", "sd15", steps=ctx.args.dreambooth_steps, num_class_images=2,
                           class_image_steps=2, progress=False, checkpoint_every=10**9)
    attack = TimedDreamBooth(config)
    attack.stamps = []
    images = subject_images(4, ctx.resolution)
    with PeakMemory(ctx.device) as memory:
        start = clock.now()
        history = attack.train(pipe, images)
        total = clock.now() - start
    step, intervals = median_interval(attack.stamps)
    trainable = sum(p.numel() for p in pipe.unet.parameters())
    return {"step_seconds": step, "step_seconds_all": intervals, "train_seconds_incl_class_images": total,
            "steps": config.steps, "batch": f"{config.batch_size} instance + {config.batch_size} prior",
            "trainable_parameters": trainable, "loss_first_last": [history[0]["loss"], history[-1]["loss"]],
            "param_dtypes_during_training": seen, **memory.result}


def check_rid(ctx) -> dict:
    from noclone.cloak import rid_nets

    arch, res = ctx.size["rid_arch"], ctx.size["rid_resolution"]
    note = None
    if arch == "dit-paper" and "dit-paper" not in getattr(rid_nets, "ARCHS", ()):
        note = "rid_nets has no 'dit-paper' arch: the 'dit' built with DIT_PAPER's shape instead"
    try:
        from noclone.cloak.rid import RIDConfig, RIDGenerator

        generator = RIDGenerator(RIDConfig(arch=arch, resolution=res))
        net, how = generator, "RIDGenerator"
    except Exception as exc:  # an arch the generator class does not know yet: its body, eta * tanh(net(x))
        shape = getattr(rid_nets, "DIT_PAPER", {}) if arch == "dit-paper" else {}
        body = rid_nets.build_net(arch if arch in rid_nets.ARCHS else "dit", **shape)
        net = lambda x, body=body: (2 * 8 / 255) * torch.tanh(body(x))  # noqa: E731
        how = f"build_net ({type(exc).__name__}: {exc})"
        generator = body
    generator.to(ctx.device, ctx.dtype).eval().requires_grad_(False)
    parameters = sum(p.numel() for p in generator.parameters())
    clock, out = ctx.clock, {}
    with PeakMemory(ctx.device) as memory, torch.inference_mode():
        for batch in (1, 8):
            x = torch.rand(batch, 3, res, res, device=ctx.device, dtype=ctx.dtype) * 2 - 1
            for _ in range(3):
                net(x)
            start = clock.now()
            for _ in range(ctx.size["rid_repeats"]):
                y = net(x)
            per_image = (clock.now() - start) / ctx.size["rid_repeats"] / batch
            assert y.shape == x.shape and bool(torch.isfinite(y).all())
            out[f"seconds_per_image_batch{batch}"] = per_image
    result = {"arch": arch, "resolution": res, "parameters": parameters, "built_with": how, **out,
              "paper_seconds_per_image": PAPER["rid_seconds_per_image"], "paper_device": PAPER["rid_device"],
              "dtype": dtype_name(ctx.dtype), **memory.result}
    if note:
        result["note"] = note
    return result


def check_aspl(ctx) -> dict:
    from noclone.cloak.aspl import ASPL

    pipe = ctx.fresh_pipeline()
    clock, rounds = ctx.clock, ctx.args.aspl_rounds

    class TimedASPL(ASPL):
        def pgd(self, *args, **kwargs):
            self.stamps.append(clock.now())  # each round's PGD starts here: consecutive stamps are one round apart
            return super().pgd(*args, **kwargs)

    cloak = TimedASPL(pipe, preset="paper", steps=rounds, num_class_images=2, class_image_steps=2)
    cloak.stamps = []
    schedule = ASPL.PRESETS["paper"]["steps"]
    images = subject_images(4, ctx.resolution)
    with PeakMemory(ctx.device) as memory:
        start = clock.now()
        protected = cloak.protect(images)
        total = clock.now() - start
    assert len(protected) == len(images)
    round_seconds, intervals = median_interval(cloak.stamps)
    schedule_seconds = round_seconds * schedule
    c = cloak.config
    return {"round_seconds": round_seconds, "rounds_run": rounds, "seconds_total_incl_setup": total,
            "images": len(images), "surrogate_steps": c.surrogate_steps, "pgd_steps": c.pgd_steps,
            "schedule_rounds": schedule, "schedule_seconds_estimate": schedule_seconds,
            "schedule_seconds_per_image_estimate": schedule_seconds / len(images),
            "paper_seconds_per_image": PAPER["aspl_seconds_per_image"], **memory.result}


def check_apdm(ctx, params: str) -> dict:
    from noclone.defenses.apdm import APDM, APDMConfig
    from noclone.defenses.base import select_parameters
    from noclone.training.data import LatentSet, SubjectData

    pipe = ctx.fresh_pipeline()
    clock = ctx.clock
    overrides = dict(outer_steps=ctx.args.apdm_outer_steps, params=params, progress=False)
    if ctx.args.inner_steps:
        overrides["inner_steps"] = ctx.args.inner_steps
    config = APDMConfig.preset("paper", **overrides)
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    trainable = sum(p.numel() for p in select_parameters(pipe.unet, params).values())
    pipe.unet.requires_grad_(False)
    ref_bytes = {"same": pipe.unet.dtype.itemsize, "fp32": 4, "bf16": 2, "fp16": 2}[config.reference_dtype]
    rows = plan(unet_params, trainable, params, ref_bytes)

    latent = ctx.resolution // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    channels = pipe.unet.config.in_channels

    def latents(prompt: str, n: int) -> LatentSet:
        return LatentSet(torch.randn(n, channels, latent, latent, generator=g),
                         torch.full((n, channels, latent, latent), 0.05), prompt)

    data = SubjectData(latents("a photo of sks person", 4), latents("a photo of a person", 4))
    seen = {}

    class TimedAPDM(APDM):
        stamps: list[float] = []

        def after_step(self, step: int) -> None:
            self.stamps.append(clock.now())
            if step == 0:
                seen.update(unet=module_dtypes(pipe.unet), text_encoder=module_dtypes(pipe.text_encoder))

    apdm = TimedAPDM(config)
    with PeakMemory(ctx.device) as memory:
        start = clock.now()
        apdm.stamps = [start]
        history = apdm.train(pipe, [data])
        total = clock.now() - start
    steady, intervals = median_interval(apdm.stamps[1:]) if len(apdm.stamps) > 2 else median_interval(apdm.stamps)
    plan_total = sum(size for _, size in rows)
    paper_steps = APDMConfig.PRESETS["paper"]["outer_steps"]
    if ctx.device.type == "cuda":
        memory.result["peak_minus_plan_gb"] = memory.result["peak_gb"] - plan_total
    return {"params": params, "outer_steps": config.outer_steps, "inner_steps": config.inner_steps,
            "batch_size": config.batch_size, "outer_step_seconds": steady, "outer_step_seconds_all": intervals,
            "first_outer_step_seconds": apdm.stamps[1] - apdm.stamps[0], "seconds_total": total,
            "schedule_hours_estimate": steady * paper_steps / 3600,
            "schedule_note": f"{paper_steps} outer steps (the paper's N_protect) at N_per {config.inner_steps}",
            "unet_parameters": unet_params, "trainable_parameters": trainable,
            "loss_first_last": [history[0]["loss"], history[-1]["loss"]],
            "plan_gb": {name: size for name, size in rows}, "plan_total_gb": plan_total,
            "plan_note": "apdm.py docstring plan (apdm_memory.plan): fp32 live weights, optimizer states and copies;"
                         " excludes activations, VAE and text encoder; peak_minus_plan_gb on CUDA only (the CPU"
                         " peak is the whole process)",
            "param_dtypes_during_training": seen, **memory.result}


# ------------------------------------------------------------------------------------------------- driver


class Context:
    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        from noclone.models.architectures import PRESETS, build_pipeline
        from noclone.models.pipeline import use_sdpa

        self.args, self.device, self.dtype, self.size = args, device, dtype, SIZES[args.size]
        self.clock = Clock(device)
        preset = self.size["preset"]
        self.resolution = args.resolution or PRESETS[preset]["resolution"]
        started = time.perf_counter()
        self.pristine = build_pipeline(preset, seed=0)  # CPU fp32; each section gets a copy on the device
        if args.resolution:
            self.pristine.unet.register_to_config(sample_size=args.resolution // self.pristine.vae_scale_factor)
        use_sdpa(self.pristine)
        self.pristine.set_progress_bar_config(disable=True)
        self.build_seconds = time.perf_counter() - started

    def fresh_pipeline(self):
        pipe = copy.deepcopy(self.pristine)
        pipe.to(self.device, self.dtype)
        return pipe


def run_section(name: str, ctx: Context) -> dict:
    if name == "dreambooth":
        return check_dreambooth(ctx)
    if name == "rid":
        return check_rid(ctx)
    if name == "aspl":
        return check_aspl(ctx)
    return check_apdm(ctx, name.removeprefix("apdm_"))


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON report")
    parser.add_argument("--size", choices=tuple(SIZES), help="sd15 (default on CUDA) or tiny (default elsewhere)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="as the CLI's --dtype (auto: bf16 on CUDA)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--resolution", type=int, help="override the preset's resolution (smoke tests)")
    parser.add_argument("--dreambooth-steps", type=int)
    parser.add_argument("--apdm-outer-steps", type=int)
    parser.add_argument("--inner-steps", type=int, help="override the APDM paper preset's N_per (20; tiny: 2)")
    parser.add_argument("--aspl-rounds", type=int, help="at least 2: the second round is the one timed")
    parser.add_argument("--max-seconds", type=float, default=480.0, help="sections not started by then are skipped")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 for tiny on CPU)")
    args = parser.parse_args(argv)

    from noclone.models.pipeline import resolve_device, resolve_dtype

    started = time.perf_counter()
    device = resolve_device(args.device)
    args.size = args.size or ("sd15" if device.type == "cuda" else "tiny")
    if args.threads is None and device.type == "cpu" and args.size == "tiny":
        # tiny shapes are overhead-bound: on shared cores 2 threads measured 7x slower than 1 (OpenMP contention)
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    for key in ("dreambooth_steps", "apdm_outer_steps", "inner_steps", "aspl_rounds"):
        if getattr(args, key) is None:
            setattr(args, key, SIZES[args.size][key])
    dtype = resolve_dtype(args.dtype, device)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out)
    report = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"),
        "device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
        "dtype": dtype_name(dtype), "size": args.size, "preset": SIZES[args.size]["preset"],
        "threads": torch.get_num_threads(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sections": {},
    }
    log(f"{report['device']}, torch {torch.__version__}, {report['dtype']}, size {args.size}; "
        f"sections {', '.join(sections)}")
    ctx = Context(args, device, dtype)
    report["resolution"] = ctx.resolution
    report["build_seconds"] = ctx.build_seconds
    log(f"pipeline {report['preset']} built on CPU in {ctx.build_seconds:.1f} s ({ctx.resolution} px)")
    write_json(out, report)
    for name in sections:
        elapsed = time.perf_counter() - started
        if elapsed > args.max_seconds:
            report["sections"][name] = {"ok": False,
                                        "skipped": f"time budget spent ({elapsed:.0f} s > {args.max_seconds:.0f} s)"}
            log(f"{name}: skipped (time budget)")
            write_json(out, report)
            continue
        log(f"{name}: running")
        t0 = time.perf_counter()
        try:
            result = {"ok": True, **run_section(name, ctx)}
        except Exception as exc:  # recorded; the other sections still run
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                      "traceback": traceback.format_exc().splitlines()[-12:]}
        result["section_seconds"] = time.perf_counter() - t0
        report["sections"][name] = result
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if result["ok"]:
            shown = {k: round(v, 4) for k, v in result.items()
                     if isinstance(v, float) and k.endswith(("seconds", "peak_gb", "batch1", "hours_estimate"))}
            log(f"{name}: ok in {result['section_seconds']:.1f} s {shown}")
        else:
            log(f"{name}: FAILED {result['error']}")
        write_json(out, report)
    report["total_seconds"] = time.perf_counter() - started
    report["failed"] = [n for n, r in report["sections"].items() if not r["ok"]]
    report["all_finite"] = all(_finite(v) for r in report["sections"].values() for v in r.values())
    write_json(out, report)
    log(f"done in {report['total_seconds']:.1f} s; failed: {report['failed'] or 'none'}; written to {out}")
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)

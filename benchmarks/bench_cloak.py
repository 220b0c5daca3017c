"""Image cloaking speed and visibility: RID (one forward pass) vs ASPL (per-image optimization), same run.

    .venv/bin/python benchmarks/bench_cloak.py [--threads 2] [--rid-batch 16] [--generator DIR] [--json OUT]

On 64 px sandbox renders (a held-out identity) against the shipped sandbox model: seconds per image for RID (light
conv generator, batched) and ASPL (`sandbox` preset, one 4-photo subject), their ratio; RID seconds for one
512 x 512 photo (resized to the generator's working resolution, perturbation upsampled; target <= 0.5 s on 2 CPU
threads); PSNR / SSIM of cloaked vs clean for both. Without trained RID weights it uses a randomly initialised
generator (its output layer randomised so that it perturbs) and says so: timings hold, protection does not.
A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5, size: int = 11) -> float:
    """Mean SSIM (Wang et al. 2004) of two uint8 HxWx3 images: Gaussian window 11/1.5, per channel, valid region."""
    x = torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].double()
    y = torch.from_numpy(np.array(b)).permute(2, 0, 1)[None].double()
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=3)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


def quality(clean, cloaked) -> dict:
    pairs = [(np.asarray(c), np.asarray(p)) for c, p in zip(clean, cloaked)]
    return {"psnr_db": statistics.mean(psnr(c, p) for c, p in pairs), "ssim": statistics.mean(ssim(c, p) for c, p in pairs),
            "linf_255": max(int(np.abs(c.astype(int) - p.astype(int)).max()) for c, p in pairs)}


def rid_cloak(generator_dir: str | None):
    """The shipped/given generator, else a random one (and a note saying so)."""
    from noclone.cloak.rid import SHIPPED_GENERATOR, WEIGHTS_NAME, RIDCloak, RIDConfig, RIDGenerator

    if generator_dir or (SHIPPED_GENERATOR / WEIGHTS_NAME).is_file():
        return RIDCloak(generator=generator_dir), f"trained generator ({generator_dir or SHIPPED_GENERATOR})"
    torch.manual_seed(0)
    generator = RIDGenerator(RIDConfig(resolution=64))
    with torch.no_grad():
        generator.net.head[2].weight.normal_(0, 0.05)
    return RIDCloak(generator=generator), "RANDOMLY INITIALISED generator (no trained weights found): timings only"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rid-batch", type=int, default=16, help="images per RID call")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of the RID figures (median)")
    parser.add_argument("--generator", help="RID generator directory (default: the shipped one)")
    parser.add_argument("--aspl-steps", type=int, help="ASPL outer rounds (default: the sandbox preset's)")
    parser.add_argument("--aspl-paper", action="store_true",
                        help="also time ASPL with the paper's schedule (50 rounds x 6 PGD + 3 surrogate steps, 200 "
                             "class images) on the sandbox model: the per-image cost RID replaces")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from noclone.cloak import get_cloak
    from noclone.cloak.base import resolve_model
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out

    subject = [render("person", held_out(3), p, 64) for p in range(4)]
    batch = [render("person", held_out(3 + i // 4), i % 4, 64) for i in range(args.rid_batch)]
    big = render("person", held_out(3), 0, 512)
    results: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}

    rid, note = rid_cloak(args.generator)
    results["rid_generator"] = note
    rid.protect(batch[:2])  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        rid_out = rid.protect(batch)
        times.append((time.perf_counter() - start) / len(batch))
    results["rid_s_per_image_64px"] = statistics.median(times)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        rid.protect([big])
        times.append(time.perf_counter() - start)
    results["rid_s_512px_one_image"] = statistics.median(times)
    results["rid_quality_64px"] = quality(batch, rid_out)

    pipe = resolve_model("sandbox")
    aspl = get_cloak("aspl", pipe, steps=args.aspl_steps)
    start = time.perf_counter()
    aspl_out = aspl.protect(subject)
    results["aspl_s_per_image_64px"] = (time.perf_counter() - start) / len(subject)
    results["aspl_settings"] = {k: getattr(aspl.config, k) for k in ("steps", "pgd_steps", "surrogate_steps", "budget")}
    results["aspl_quality_64px"] = quality(subject, aspl_out)
    results["aspl_over_rid_speed_ratio"] = results["aspl_s_per_image_64px"] / results["rid_s_per_image_64px"]
    if args.aspl_paper:
        paper = get_cloak("aspl", pipe, preset="paper", progress=False)
        start = time.perf_counter()
        paper.protect(subject)
        results["aspl_paper_s_per_image_64px"] = (time.perf_counter() - start) / len(subject)
        results["aspl_paper_settings"] = {k: getattr(paper.config, k) for k in
                                          ("steps", "pgd_steps", "surrogate_steps", "budget", "num_class_images")}
        results["aspl_paper_over_rid_speed_ratio"] = results["aspl_paper_s_per_image_64px"] / results["rid_s_per_image_64px"]

    print(f"# torch {results['torch']}, {results['threads']} threads; RID: {note}")
    print(f"RID  (batch {args.rid_batch}, 64 px):  {results['rid_s_per_image_64px'] * 1e3:9.2f} ms/image")
    print(f"ASPL (sandbox preset, 4 photos): {results['aspl_s_per_image_64px'] * 1e3:9.1f} ms/image")
    print(f"ASPL / RID time ratio:           {results['aspl_over_rid_speed_ratio']:9.0f}x")
    if args.aspl_paper:
        print(f"ASPL (paper schedule, 4 photos): {results['aspl_paper_s_per_image_64px'] * 1e3:9.1f} ms/image "
              f"(class images included)")
        print(f"ASPL paper / RID time ratio:     {results['aspl_paper_over_rid_speed_ratio']:9.0f}x (target >= 1000x)")
    print(f"RID one 512x512 photo:           {results['rid_s_512px_one_image']:9.3f} s (target <= 0.5 s on 2 threads)")
    for name in ("rid", "aspl"):
        q = results[f"{name}_quality_64px"]
        print(f"{name.upper():<4} cloaked vs clean: PSNR {q['psnr_db']:.2f} dB, SSIM {q['ssim']:.4f}, L_inf {q['linf_255']}/255")
    if args.json:
        from noclone.data.atomic import atomic_write_json

        atomic_write_json(args.json, results)


if __name__ == "__main__":
    main()

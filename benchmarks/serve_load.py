"""Load on `noclone serve` (RID) over loopback: throughput and latency, batching on and off, against the CLI.

    .venv/bin/python benchmarks/serve_load.py [--size 512] [--requests 48] [--cell-seconds 15] [--rounds 3]
                                              [--memory-requests 1000]
                                              [--threads 1] [--generator DIR] [--device cpu] [--json OUT]

Starts `noclone serve` twice as subprocesses on free 127.0.0.1 ports (batching on, batching off), each with a
private empty TMPDIR. For 1, 4 and 16 concurrent clients (one photo per request, --size px PNG sandbox renders) it
prints images/s, p50 / p95 latency and the mean RID batch; each cell is bounded by --requests and --cell-seconds and
runs --rounds times, alternating between the two servers (a row pools its rounds: the machine's other load moves).
Then, on the batching server: its RSS at the start and after each quarter of --memory-requests requests (16 clients,
bounded by --memory-seconds); the limits under load (an oversized photo and a bomb header answer 413, a burst past
--max-inflight 200 or 429 with Retry-After, nothing else); and that no file appeared in either server's TMPDIR. The
baseline is `noclone protect-images --method rid` on the same photos in the same run. Loopback only; every loop is
bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx

HOST = "127.0.0.1"  # loopback only, by design


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def noclone_command() -> list[str]:
    script = Path(sys.executable).parent / "noclone"
    return [str(script)] if script.exists() else [sys.executable, "-m", "noclone.cli"]


def make_photos(n: int, size: int) -> list[bytes]:
    from noclone.sandbox.render import render

    out = []
    for i in range(n):
        buffer = io.BytesIO()
        render("person", 100 + i, 0, size=size).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def bomb_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class Server:
    """`noclone serve` in a subprocess with its own empty TMPDIR; stopped (SIGTERM, then kill) on exit."""

    def __init__(self, threads: int, *extra: str, serve_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="noclone-serve-tmp-"))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TMPDIR": str(self.tmp)}
        self.proc = subprocess.Popen(noclone_command() + ["-q", "serve", "--host", HOST, "--port", str(self.port),
                                                          "--log-level", "warning", *serve_args, *extra],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://{HOST}:{self.port}"

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"noclone serve exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise SystemExit("noclone serve did not start within 90 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def rss_mb(self) -> tuple[float, float]:
        """(current RSS, peak RSS) of the server process in MB."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        value = {k: int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}
        return value["VmRSS"], value["VmHWM"]

    def tmp_empty(self) -> bool:
        """No file under the server's TMPDIR (torch leaves an empty torchinductor_<user> folder at import)."""
        return not any(p.is_file() or p.is_symlink() for p in self.tmp.rglob("*"))

    def batch_counts(self) -> tuple[float, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = float(re.search(r"^noclone_rid_batch_size_sum (\S+)$", text, re.M).group(1))
        count = float(re.search(r"^noclone_rid_batch_size_count (\S+)$", text, re.M).group(1))
        return total, count


async def load(url: str, photos: list[bytes], clients: int, requests: int, seconds: float) -> dict:
    """`clients` concurrent loops of one-photo requests until `requests` are answered or `seconds` pass."""
    latencies: list[float] = []
    codes: dict[int, int] = {}
    sent = 0
    deadline = time.perf_counter() + seconds

    async def client(k: int, http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            photo = photos[sent % len(photos)]
            sent += 1
            started = time.perf_counter()
            r = await http.post(url + "/v1/cloak", files={"files": (f"p{k}.png", photo, "image/png")})
            await r.aread()
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(k, http) for k in range(clients)))
        wall = time.perf_counter() - started
    return summarize(clients, latencies, codes, wall)


def summarize(clients: int, latencies: list[float], codes: dict[int, int], wall: float) -> dict:
    """images/s, p50 and p95 (ms) of answered requests."""
    latencies = sorted(latencies)
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")
    return {"clients": clients, "requests": sum(codes.values()), "ok": len(latencies), "codes": codes,
            "images_per_s": len(latencies) / wall, "p50_ms": pick(0.50), "p95_ms": pick(0.95), "wall_s": wall,
            "latencies": latencies}


async def limits_under_load(url: str, photos: list[bytes], burst: int) -> dict:
    """While 4 clients load the server: an oversized photo and a bomb header (413 expected), then a burst of
    `burst` requests at once, past --max-inflight (only 200 and 429 with Retry-After expected)."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=burst + 8)) as http:
        async def one(name: str, data: bytes):
            r = await http.post(url + "/v1/cloak", files={"files": (name, data, "image/png")})
            return r.status_code, r.headers.get("retry-after"), r.headers.get("content-type", "")

        background = asyncio.ensure_future(load(url, photos, 4, 40, 30))
        await asyncio.sleep(0.5)
        oversized = await one("huge.png", os.urandom(3 * 1024 * 1024))
        bomb = await one("bomb.png", bomb_header(40_000, 40_000))
        loaded = await background
        answers = await asyncio.gather(*(one(f"p{i}.png", photos[i % len(photos)]) for i in range(burst)))
    burst_codes: dict[int, int] = {}
    for code, _, _ in answers:
        burst_codes[code] = burst_codes.get(code, 0) + 1
    return {"background_codes": loaded["codes"], "oversized": oversized[0], "bomb": bomb[0], "burst": burst,
            "burst_codes": burst_codes, "retry_after_on_429": all(ra for code, ra, _ in answers if code == 429),
            "errors_json": all(ctype.startswith("application/json") for code, _, ctype in answers + [oversized, bomb]
                               if code >= 400)}


def cli_baseline(photos: list[bytes], threads: int, generator: str | None = None) -> dict:
    """`noclone protect-images --method rid` on the same photos: wall time (with start-up) and the cloak step."""
    work = Path(tempfile.mkdtemp(prefix="noclone-serve-cli-"))
    try:
        images = work / "in"
        images.mkdir()
        for i, photo in enumerate(photos):
            (images / f"p{i:03d}.png").write_bytes(photo)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        started = time.perf_counter()
        extra = ["--generator", generator] if generator else []
        subprocess.run(noclone_command() + ["-q", "protect-images", "--method", "rid", "--images", str(images),
                                            "--out", str(work / "out"), *extra], check=True, env=env)
        wall = time.perf_counter() - started
        timings = json.loads((work / "out" / "cloak.json").read_text())["timings"]
        return {"photos": len(photos), "wall_s": wall, "images_per_s_wall": len(photos) / wall,
                "protect_s": timings["protect_s"], "images_per_s_protect": len(photos) / max(timings["protect_s"], 1e-9)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="photo side in px (sandbox renders)")
    parser.add_argument("--photos", type=int, default=16, help="distinct photos, sent round-robin")
    parser.add_argument("--requests", type=int, default=48, help="requests per cell at most")
    parser.add_argument("--cell-seconds", type=float, default=15.0, help="seconds per cell at most")
    parser.add_argument("--rounds", type=int, default=3, help="times each cell runs, alternating (pooled)")
    parser.add_argument("--memory-requests", type=int, default=1000)
    parser.add_argument("--memory-seconds", type=float, default=240.0)
    parser.add_argument("--threads", type=int, default=1, help="the server's OMP_NUM_THREADS")
    parser.add_argument("--generator", help="RID generator directory (default: the shipped one)")
    parser.add_argument("--device", default="cpu", help="the server's --device (cuda: batching's real use)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    photos = make_photos(args.photos, args.size)
    print(f"noclone serve load: {args.size} px PNG photos ({len(photos[0]) // 1024} kB), RID with "
          f"{args.generator or 'the shipped generator'} on {args.device}, server OMP_NUM_THREADS={args.threads}, "
          f"loopback; cells bounded by {args.requests} requests or {args.cell_seconds:g} s", flush=True)
    rows, result = [], {}
    # both servers run side by side and the cells alternate, so that a change in the machine's other load falls
    # on both columns alike
    serve_args = ("--device", args.device) + (("--generator", args.generator) if args.generator else ())
    with Server(args.threads, serve_args=serve_args) as on, \
            Server(args.threads, "--no-batching", serve_args=serve_args) as off:
        for server in (on, off):
            asyncio.run(load(server.url, photos, 4, 16, 60))  # warm-up
        # each cell runs `rounds` times, alternating with the other column; a row pools its rounds
        pooled: dict[tuple[int, bool], dict] = {}
        for _ in range(args.rounds):
            for clients in (1, 4, 16):
                for batching, server in ((True, on), (False, off)):
                    before = server.batch_counts()
                    cell = asyncio.run(load(server.url, photos, clients, args.requests, args.cell_seconds))
                    after = server.batch_counts()
                    acc = pooled.setdefault((clients, batching), {"latencies": [], "codes": {}, "wall": 0.0,
                                                                  "batch": [0.0, 0.0]})
                    acc["latencies"] += cell["latencies"]
                    acc["wall"] += cell["wall_s"]
                    for code, n in cell["codes"].items():
                        acc["codes"][code] = acc["codes"].get(code, 0) + n
                    acc["batch"][0] += after[0] - before[0]
                    acc["batch"][1] += after[1] - before[1]
        for (clients, batching), acc in pooled.items():
            row = summarize(clients, acc["latencies"], acc["codes"], acc["wall"])
            row.pop("latencies")
            row["batching"] = batching
            row["mean_batch"] = acc["batch"][0] / max(acc["batch"][1], 1)
            rows.append(row)
            print(f"  clients {clients:2d}  batching {'on ' if batching else 'off'}  {row['ok']:4d} ok  "
                  f"{row['images_per_s']:6.1f} img/s  p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms  "
                  f"mean batch {row['mean_batch']:.2f}  codes {row['codes']}", flush=True)
        # RSS after each quarter: a leak grows with the count, allocator warm-up levels off
        rss = [on.rss_mb()[0]]
        done, ok, codes, deadline = 0, 0, {}, time.monotonic() + args.memory_seconds
        quarter = max(1, args.memory_requests // 4)
        while done < args.memory_requests and time.monotonic() < deadline:
            step = min(quarter, args.memory_requests - done)
            mem = asyncio.run(load(on.url, photos, 16, step, max(1.0, deadline - time.monotonic())))
            done, ok = done + mem["requests"], ok + mem["ok"]
            for code, n in mem["codes"].items():
                codes[code] = codes.get(code, 0) + n
            rss.append(on.rss_mb()[0])
        peak = on.rss_mb()[1]
        result["memory"] = {"requests": done, "ok": ok, "codes": codes, "rss_mb": rss, "rss_peak_mb": peak}
        print(f"  memory: RSS {' -> '.join(f'{v:.0f}' for v in rss)} MB (start, then after each quarter of "
              f"{done} requests; {ok} ok), peak {peak:.0f} MB", flush=True)
        result["tmp_empty_after_load"] = on.tmp_empty() and off.tmp_empty()
        print(f"  servers' TMPDIR without a file after the load: {result['tmp_empty_after_load']}", flush=True)
    with Server(args.threads, "--max-inflight", "8", "--max-file-mb", "2", serve_args=serve_args) as server:
        limits = asyncio.run(limits_under_load(server.url, photos, 32))
        limits["tmp_empty"] = server.tmp_empty()
    result["limits"] = limits
    print(f"  limits under load (--max-inflight 8, --max-file-mb 2): with 4 clients running "
          f"({limits['background_codes']}), a 3 MB photo -> {limits['oversized']}, a 40000x40000 header -> "
          f"{limits['bomb']}; a burst of {limits['burst']} at once -> {limits['burst_codes']} (Retry-After on every "
          f"429: {limits['retry_after_on_429']}); every error JSON: {limits['errors_json']}; TMPDIR without a file: "
          f"{limits['tmp_empty']}", flush=True)
    n_cli = max(args.requests, len(photos))
    cli = cli_baseline([photos[i % len(photos)] for i in range(n_cli)], args.threads, args.generator)
    result["cli"] = cli
    print(f"  CLI baseline (protect-images --method rid, {cli['photos']} photos, same threads): "
          f"{cli['wall_s']:.1f} s wall with start-up = {cli['images_per_s_wall']:.1f} img/s; the cloak step alone "
          f"{cli['protect_s']:.2f} s = {cli['images_per_s_protect']:.1f} img/s", flush=True)
    result["rows"] = rows
    result["settings"] = vars(args)
    print("\n| clients | batching | images/s | p50 ms | p95 ms | mean batch |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['clients']} | {'on' if row['batching'] else 'off'} | {row['images_per_s']:.1f} | "
              f"{row['p50_ms']:.0f} | {row['p95_ms']:.0f} | {row['mean_batch']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

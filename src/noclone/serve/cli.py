"""`noclone serve`: the cloaking service and its web page on one port.

    noclone serve [--host 127.0.0.1] [--port 8000] [--method rid[,aspl,...]|all] [--model M] [--generator DIR]
                  [--token T] [--no-batching] [--max-file-mb 20] [--max-files 16] [--max-pixels 25000000] ...

Wire into the main parser with `add_serve_parser(sub)`.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket

from noclone.errors import NocloneError

log = logging.getLogger("noclone")
TOKEN_ENV = "NOCLONE_SERVE_TOKEN"


def _port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise NocloneError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def build_config(args: argparse.Namespace):
    """The service's settings from the command line (every bad value one NocloneError)."""
    from noclone.serve.limits import MB, Limits
    from noclone.serve.server import ALL_METHODS, ServeConfig

    names = ALL_METHODS if args.method.strip() == "all" else tuple(
        m.strip() for m in args.method.split(",") if m.strip())
    checks = [(args.max_file_mb > 0, "--max-file-mb must be positive"),
              (args.max_request_mb >= args.max_file_mb, "--max-request-mb must be at least --max-file-mb"),
              (args.max_files >= 1, "--max-files must be at least 1"),
              (args.max_pixels >= 64 * 64, "--max-pixels must be at least 4096"),
              (args.job_queue >= 1, "--job-queue must be at least 1"),
              (args.job_ttl > 0 and args.timeout > 0, "--job-ttl and --timeout must be positive"),
              (1 <= args.port <= 65535, f"--port {args.port} must be between 1 and 65535")]
    for ok, message in checks:
        if not ok:
            raise NocloneError(message)
    limits = Limits(max_file_bytes=int(args.max_file_mb * MB), max_request_bytes=int(args.max_request_mb * MB),
                    max_files=args.max_files, max_pixels=args.max_pixels, request_timeout_s=args.timeout,
                    job_queue=args.job_queue, job_ttl_s=args.job_ttl)
    if args.generator is not None and "rid" not in names:
        raise NocloneError("--generator only applies when rid is served (--method rid,...)")
    config = ServeConfig(methods=tuple(names), model=args.model, generator=args.generator,
                         token=args.token or os.environ.get(TOKEN_ENV) or None, device=args.device, limits=limits,
                         batching=not args.no_batching, batch_window_ms=args.batch_window_ms,
                         max_batch=args.max_batch, max_inflight=args.max_inflight)
    config.validate()
    return config


def cmd_serve(args: argparse.Namespace) -> None:
    from PIL import Image

    from noclone.serve.server import app, check_bind

    config = build_config(args)
    check_bind(args.host, config.token)
    _port_free(args.host, args.port)
    # Pillow's own decompression-bomb guard then stops at the service's cap too (the header check comes first)
    Image.MAX_IMAGE_PIXELS = config.limits.max_pixels
    application = app(config=config)
    import uvicorn

    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"noclone serve: http://{shown}:{args.port}/ (API docs: /docs; methods: {', '.join(config.methods)}"
          f"{'; token required' if config.token else ''}); Ctrl-C stops", flush=True)
    uvicorn.run(application, host=args.host.strip("[]"), port=args.port, log_level=args.log_level,
                timeout_keep_alive=5, server_header=False)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on the main parser's subparsers."""
    p = subparsers.add_parser("serve", help="the real-time cloaking service and its web page (FastAPI + uvicorn)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (not loopback: needs --token)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--method", default="rid",
                   help="methods served, comma-separated: rid (synchronous), aspl, fsmg, advdm, photoguard (jobs), "
                        "or all (default: rid)")
    p.add_argument("--model", help="the optimization methods' model: diffusers directory, .safetensors file or "
                                   "sandbox (default; 'sandbox-v1' pins v1)")
    p.add_argument("--generator", help="RID generator directory (default: the shipped sandbox generator)")
    p.add_argument("--token", help=f"require 'Authorization: Bearer T' on /v1 and /metrics (or set {TOKEN_ENV})")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--no-batching", action="store_true", help="run every RID photo in its own forward pass")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a RID batch waits for more photos")
    p.add_argument("--max-batch", type=int, default=16, help="photos per RID forward pass at most")
    p.add_argument("--max-inflight", type=int, default=32, help="cloak requests read or processed at once (429 above)")
    p.add_argument("--max-file-mb", type=float, default=20.0, help="per photo")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="per request")
    p.add_argument("--max-files", type=int, default=16, help="photos per request")
    p.add_argument("--max-pixels", type=int, default=25_000_000, help="per photo (decompression-bomb guard)")
    p.add_argument("--job-queue", type=int, default=8, help="optimization jobs waiting or running (429 above)")
    p.add_argument("--job-ttl", type=float, default=600.0, help="seconds a finished job's results are kept")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a synchronous cloak may take (504 after)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve, parser=p)
    return p

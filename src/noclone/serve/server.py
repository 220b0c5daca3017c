"""The cloaking service: a FastAPI app that cloaks photos as they are shared (`noclone.serve.app(...)`).

    POST /v1/cloak              multipart: files (one or more), method, budget. RID answers at once (PNG, or a ZIP
                                for several); the optimization methods answer 202 with a job.
    GET  /v1/jobs/{id}          a job's state and progress;  GET /v1/jobs/{id}/result  its PNG or ZIP
    DELETE /v1/jobs/{id}        cancel a job, or drop its results
    GET  /v1/methods            what is loaded, for which model, at which budgets, and the limits
    GET  /healthz, GET /metrics (Prometheus text), GET / (the web page), GET /docs (OpenAPI)

Photos never touch the disk: bodies are parsed into memory (`limits.read_form`), decoded from memory, cloaked with
the cloak package's own functions (`to_working`, `apply_delta`: sizes kept) and answered as PNGs written from
fresh pixel arrays (no EXIF, ICC or text chunks). Every error is JSON `{"error": "..."}` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import ipaddress
import logging
import threading
import time
import zipfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from noclone.errors import NocloneError
from noclone.sandbox.assets import is_shipped, model_path
from noclone.serve.batching import Expectation, QueueFull, RIDBatcher
from noclone.serve.jobs import Job, JobQueue, JobsFull
from noclone.serve.limits import ApiError, Limits, Upload, decode_photo, peek_size, read_form
from noclone.serve.metrics import Metrics

log = logging.getLogger(__name__)

ALL_METHODS = ("rid", "aspl", "fsmg", "advdm", "photoguard")
OPTIMIZATION_METHODS = ("aspl", "fsmg", "advdm", "photoguard")
# the strengths the page offers; any budget from 1/255 to MAX_BUDGET is accepted by the API
STRENGTHS = {"light": 4 / 255, "standard": 8 / 255, "strong": 16 / 255}
MAX_BUDGET = 32 / 255
# zlib level 3 writes a 512 px PNG in about half the time of Pillow's default 6, for a file a few % larger
PNG_LEVEL = 3
SANDBOX_RESOLUTION = 64
WRONG_MODEL = ("the {what} was made against noclone's sandbox model, which is trained on {res} px renders of a "
               "made-up world, not against Stable Diffusion or any model a real photo would be fine-tuned on: "
               "this cloak is not expected to protect real photos. {fix}")
RID_FIX = "Serve a generator trained for your model (noclone rid train, then noclone serve --generator DIR)."
MODEL_FIX = "Serve with --model set to the model you want to protect against."


@dataclass
class ServeConfig:
    """Everything `app(...)` needs; the command line maps its flags onto these."""

    methods: tuple[str, ...] = ("rid",)
    model: str | None = None                 # the optimization methods' model ('sandbox' when None)
    generator: str | None = None             # RID generator directory (None: the shipped sandbox generator)
    token: str | None = None                 # Bearer token for /v1 and /metrics (None: open, loopback only)
    device: str = "cpu"
    limits: Limits = field(default_factory=Limits)
    batching: bool = True
    batch_window_ms: float = 10.0
    max_batch: int = 16
    max_inflight: int = 32                   # /v1/cloak requests being read or processed at once
    max_request_pixels: int = 64_000_000     # all photos of one request together
    cloak_settings: dict[str, dict] = field(default_factory=dict)  # per-method overrides, e.g. {"advdm": {"steps": 5}}

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown or not self.methods:
            raise NocloneError(f"--method {','.join(self.methods) or '(none)'}: choose from {', '.join(ALL_METHODS)} "
                               "(comma-separated, or all)")
        if self.token is not None and not self.token.strip():
            raise NocloneError("--token must not be empty")
        if self.max_batch < 1 or self.batch_window_ms < 0 or self.max_inflight < 1:
            raise NocloneError("--max-batch and --max-inflight must be at least 1, --batch-window-ms at least 0")


def is_loopback(host: str) -> bool:
    """True for localhost and the loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token (one line, for the command line's exit 2)."""
    if not is_loopback(host) and not token:
        raise NocloneError(f"--host {host} is reachable from other machines: give --token T (clients then send "
                           "'Authorization: Bearer T'), or bind 127.0.0.1")


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes with no metadata (the cloak's outputs are fresh arrays; the info dict is emptied anyway)."""
    image.info.clear()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


def output_names(names: list[str]) -> list[str]:
    """One PNG name per upload (the cloak's own naming), made unique within a request."""
    from noclone.cloak.base import _output_names

    out, seen = [], set()
    for name in _output_names([Path(n) for n in names]):
        stem, k, candidate = name[:-4], 2, name
        while candidate in seen:
            candidate, k = f"{stem}-{k}.png", k + 1
        seen.add(candidate)
        out.append(candidate)
    return out


def zip_bytes(files: list[tuple[str, bytes]]) -> bytes:
    """A ZIP of (name, bytes), in memory (stored: PNGs do not compress further)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in files:
            archive.writestr(name, data)
    return buffer.getvalue()


def parse_request_budget(value: str | None, default: float) -> float:
    """A form `budget`: a strength name, '8/255' or a number; 422 when outside [1/255, MAX_BUDGET]."""
    from noclone.cloak.base import parse_budget

    if value is None or value == "":
        return default
    if value.lower() in STRENGTHS:
        return STRENGTHS[value.lower()]
    try:
        budget = parse_budget(value)
    except NocloneError as exc:
        raise ApiError(422, str(exc).replace("--budget", "budget")) from None
    if budget > MAX_BUDGET + 1e-9:
        raise ApiError(422, f"budget {value!r} is above the service's maximum of {round(MAX_BUDGET * 255)}/255")
    return budget


class Service:
    """The loaded generator, the batcher, the job queue and the counters of one app."""

    def __init__(self, config: ServeConfig):
        from noclone.cloak.rid import SHIPPED_GENERATOR, load_generator
        from noclone.models.pipeline import resolve_device

        config.validate()
        self.config = config
        self.limits = config.limits
        self.metrics = Metrics()
        self.device = resolve_device(config.device)
        self.generator = None
        self.rid_sandbox = False
        if "rid" in config.methods:
            self.generator = load_generator(config.generator).to(self.device)
            shipped = config.generator is None or Path(config.generator).resolve() == SHIPPED_GENERATOR.resolve()
            self.rid_sandbox = shipped
        self.model_name = config.model or "sandbox"
        self.model_sandbox = is_shipped(self.model_name)
        if any(m in OPTIMIZATION_METHODS for m in config.methods) and not self.model_sandbox \
                and not Path(self.model_name).exists():
            raise NocloneError(f"--model {self.model_name}: no such model file or directory")
        self._pipe = None
        self._pipe_lock = threading.Lock()
        self.batcher: RIDBatcher | None = None
        self.jobs: JobQueue | None = None
        self.inflight = 0
        self.started = time.time()
        self._started = False

    # --- lifecycle ---
    async def start(self) -> None:
        """Start the batcher and the job worker (at the app's startup, or at the first request without one)."""
        if self._started:
            return
        self._started = True
        if self.generator is not None:
            c = self.config
            self.batcher = RIDBatcher(self.generator, window_s=c.batch_window_ms / 1000 if c.batching else 0.0,
                                      max_batch=c.max_batch if c.batching else 1,
                                      max_waiting=max(c.max_inflight * self.limits.max_files, 1),
                                      on_batch=self.metrics.batch)
            self.batcher.start()
        if any(m in OPTIMIZATION_METHODS for m in self.config.methods):
            self.jobs = JobQueue(self._run_job, max_jobs=self.limits.job_queue, ttl_s=self.limits.job_ttl_s,
                                 timeout_s=self.limits.job_timeout_s, on_done=self._job_done)
            self.jobs.start()
            # the model loads beside the service (seconds for the sandbox, longer for SD) so it starts at once
            threading.Thread(target=self._preload, name="noclone-model-load", daemon=True).start()
        self.metrics.gauge("noclone_queue_depth", "Work waiting: photos for the RID pass, jobs for the worker",
                           lambda: {(("queue", "rid"),): self.batcher.depth if self.batcher else 0,
                                    (("queue", "jobs"),): self.jobs.queued() if self.jobs else 0})
        self.metrics.gauge("noclone_inflight_requests", "Cloak requests being read or processed",
                           lambda: {(): self.inflight})
        self.metrics.gauge("noclone_jobs_held", "Jobs held in memory (any state)",
                           lambda: {(): self.jobs.held() if self.jobs else 0})

    async def stop(self) -> None:
        """Stop both; waiting photos are cancelled, jobs and their results dropped."""
        self._started = False
        if self.batcher is not None:
            await self.batcher.stop()
        if self.jobs is not None:
            await asyncio.to_thread(self.jobs.stop)

    def _preload(self) -> None:
        try:
            self.pipe()
        except Exception as exc:  # the first job reports it to its client
            log.warning("the model did not load: %s", exc)

    # --- what /v1/methods says ---
    def describe(self) -> dict:
        """What /v1/methods answers: the methods served, their model, budgets, warnings, and the limits."""
        methods: dict[str, Any] = {}
        if self.generator is not None:
            gc = self.generator.config
            info = {"kind": "single forward pass (synchronous)", "loaded": True,
                    "generator": "shipped sandbox generator" if self.rid_sandbox else str(self.config.generator),
                    "trained_for": {"models": (["sandbox"] if self.rid_sandbox else gc.info.get("models", [])),
                                    "resolution": gc.resolution, "budget": gc.budget,
                                    "budget_255": round(gc.budget * 255, 2)},
                    "default_budget": gc.budget, "batching": self.config.batching}
            if self.rid_sandbox:
                info["warning"] = WRONG_MODEL.format(what="RID generator", res=gc.resolution, fix=RID_FIX)
            methods["rid"] = info
        for name in self.config.methods:
            if name not in OPTIMIZATION_METHODS:
                continue
            from noclone.cloak.registry import cloak_methods

            config = cloak_methods()[name].preset_config(**self._settings(name))
            info = {"kind": "per-photo optimization (job: 202, then poll)", "model": self.model_name,
                    "loaded": self._pipe is not None, "default_budget": config.budget, "steps": config.steps}
            if self.model_sandbox:
                info["warning"] = WRONG_MODEL.format(what=f"{name} cloak", res=SANDBOX_RESOLUTION, fix=MODEL_FIX)
            methods[name] = info
        return {"methods": methods,
                "strengths": {k: {"budget": v, "budget_255": round(v * 255)} for k, v in STRENGTHS.items()},
                "max_budget_255": round(MAX_BUDGET * 255), "limits": {**self.limits.describe(),
                                                                    "max_request_pixels": self.config.max_request_pixels},
                "auth": self.config.token is not None}

    def photo_warning(self, method: str, size: tuple[int, int]) -> str | None:
        """The plain 'wrong model' line for a photo that is not a sandbox render (None when it may be one)."""
        if method == "rid":
            if not self.rid_sandbox:
                return None
            res, what, fix = self.generator.config.resolution, "RID generator", RID_FIX
        else:
            if not self.model_sandbox:
                return None
            res, what, fix = SANDBOX_RESOLUTION, f"{method} cloak", MODEL_FIX
        if size == (res, res):
            return None  # a sandbox-sized render: the one case the shipped weights were made for
        return WRONG_MODEL.format(what=what, res=res, fix=fix)

    def _settings(self, method: str) -> dict:
        """The server's fixed settings for a method (e.g. fewer steps in tests and benchmarks)."""
        return dict(self.config.cloak_settings.get(method, {}))

    # --- RID, synchronous ---
    async def cloak_rid(self, uploads: list[Upload], budget: float,
                        expectation: Expectation | None = None) -> tuple[list[tuple[str, bytes]], str | None]:
        """(PNG name, bytes) per photo and the first 'wrong model' warning; photos share batched forward passes."""
        from noclone.cloak.base import apply_delta, to_working

        if self.batcher is None:
            await self.start()
        resolution = self.generator.config.resolution
        warnings: list[str] = []

        async def one(upload: Upload) -> bytes:
            def prepare():
                image = decode_photo(upload, self.limits)
                upload.data = bytearray()  # the encoded bytes are no longer needed
                return image, to_working(image, resolution)

            image, x = await asyncio.to_thread(prepare)
            warning = self.photo_warning("rid", image.size)
            if warning:
                warnings.append(warning)
            try:
                delta = await self.batcher.submit(x, budget, expectation)
            except QueueFull:
                self.metrics.reject("queue_full")
                raise ApiError(429, "too many photos waiting for the RID generator: retry shortly",
                               {"Retry-After": "1"}) from None
            return await asyncio.to_thread(lambda: encode_png(apply_delta(image, delta, budget)))

        names = output_names([u.filename for u in uploads])
        tasks = [asyncio.ensure_future(one(u)) for u in uploads]
        try:
            pngs = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        self.metrics.cloaked("rid", len(pngs))
        return list(zip(names, pngs)), (warnings[0] if warnings else None)

    # --- the optimization methods, as jobs ---
    def pipe(self):
        """The optimization methods' model, loaded once (in the job worker, so the service starts at once)."""
        with self._pipe_lock:
            if self._pipe is None:
                from noclone.models.pipeline import load_pipeline

                self._pipe = load_pipeline(model_path(self.model_name), device=self.device)
            return self._pipe

    def _run_job(self, job: Job, report) -> list[tuple[str, bytes]]:
        """A job's cloak on its photos, in the worker thread; `report` takes the progress and stops a cancelled job."""
        from noclone.cloak.registry import get_cloak

        report(0.0)
        cloak = get_cloak(job.method, self.pipe(), **{**self._settings(job.method), "budget": job.budget})
        c = cloak.config
        chunks = -(-len(job.images) // c.batch_size)
        total = max(1, c.steps * getattr(c, "pgd_steps", 1) * chunks)
        calls = 0
        objective = cloak.objective

        def counted(views, generator):
            # every PGD step goes through the objective: the count is the progress, and the place to stop
            nonlocal calls
            report(calls / total)
            calls += 1
            return objective(views, generator)

        cloak.objective = counted
        protected = cloak.protect(job.images)
        report(0.99)
        return [(name, encode_png(image)) for name, image in zip(job.names, protected)]

    def _job_done(self, job: Job) -> None:
        if job.state == "done":
            self.metrics.cloaked(job.method, len(job.names))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _route_label(scope: dict) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if path else "unmatched"


class _Timing:
    """ASGI middleware: counts every answered request and its latency (status from the response start)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request(_route_label(scope), scope.get("method", ""), status["code"],
                                 time.perf_counter() - started)


def app(methods: str | tuple[str, ...] = "rid", *, model: str | None = None, generator: str | None = None,
        token: str | None = None, limits: Limits | None = None, config: ServeConfig | None = None, **settings):
    """The FastAPI application. `methods`: 'rid', 'rid,aspl,...' or 'all'; other settings as in `ServeConfig`."""
    if config is None:
        names = tuple(ALL_METHODS) if methods == "all" else tuple(
            m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip())
        config = ServeConfig(methods=names, model=model, generator=generator, token=token,
                             limits=limits or Limits(), **settings)
    service = Service(config)

    @asynccontextmanager
    async def lifespan(_app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    api = FastAPI(title="noclone", version=_version(), lifespan=lifespan,
                  description="Cloak photos against diffusion-model personalization as they are shared. "
                              "RID answers at once; ASPL, AdvDM, PhotoGuard and FSMG run as jobs.")
    api.state.service = service

    @api.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return _error(exc.status, exc.message, exc.headers)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404:
            message = "no such endpoint (see /docs)"
        elif exc.status_code == 405:
            message = "method not allowed on this endpoint (see /docs)"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return _error(422, f"{where}: {first.get('msg', 'invalid value')}" if where else "invalid request")

    @api.exception_handler(Exception)
    async def _internal(_request, exc: Exception):
        log.exception("internal error")
        return _error(500, "internal error")

    def authorize(request: Request) -> None:
        if service.config.token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                                  service.config.token.encode()):
            raise ApiError(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": 'Bearer realm="noclone"'})

    auth = [Depends(authorize)]
    static = resources.files("noclone.serve") / "static"

    @api.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    api.mount("/static", StaticFiles(directory=str(static)), name="static")

    @api.get("/healthz", summary="Liveness: the service answers")
    async def healthz() -> dict:
        return {"status": "ok", "methods": list(service.config.methods),
                "uptime_s": round(time.time() - service.started, 1)}

    @api.get("/metrics", summary="Prometheus metrics (text format)", dependencies=auth,
             response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/methods", summary="What is loaded, for which model, at which budgets, and the limits",
             dependencies=auth)
    async def methods_info() -> dict:
        return service.describe()

    cloak_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "PNG, JPEG or WebP photos"},
            "method": {"type": "string", "enum": list(ALL_METHODS), "default": "rid"},
            "budget": {"type": "string", "description": "light, standard, strong, '8/255' or 0.03 (default: the "
                                                        "method's)"}}}}}},
        "responses": {"200": {"description": "RID: the cloaked PNG (one photo) or a ZIP of PNGs",
                              "content": {"image/png": {}, "application/zip": {}}},
                      "202": {"description": "optimization methods: the job (poll /v1/jobs/{id})"}}}

    @api.post("/v1/cloak", summary="Cloak photos", dependencies=auth, openapi_extra=cloak_body,
              response_class=Response)
    async def cloak(request: Request):
        if service.inflight >= service.config.max_inflight:
            service.metrics.reject("busy")
            raise ApiError(429, "the service is busy: retry shortly", {"Retry-After": "1"})
        service.inflight += 1
        expectation = service.batcher.expect() if service.batcher is not None else None
        try:
            return await _cloak(request, expectation)
        finally:
            service.inflight -= 1
            if expectation is not None:
                expectation.close()

    async def _cloak(request: Request, expectation: Expectation | None):
        stream = request.stream()

        async def receive() -> bytes | None:
            try:
                return await stream.__anext__()
            except StopAsyncIteration:
                return None

        try:
            form = await read_form(dict(request.headers), receive, service.limits)
        except ClientDisconnect:
            raise ApiError(400, "the upload was cut off") from None
        except ApiError as exc:
            service.metrics.reject({413: "too_large", 415: "format", 408: "timeout"}.get(exc.status, "invalid"))
            raise
        unknown = sorted(set(form.fields) - {"method", "budget"})
        if unknown:
            raise ApiError(422, f"unknown form field(s): {', '.join(unknown)} (expected files, method, budget)")
        method = (form.fields.get("method") or "rid").lower()
        if method not in ALL_METHODS:
            raise ApiError(422, f"method {method!r}: choose from {', '.join(service.config.methods)}")
        if method not in service.config.methods:
            raise ApiError(422, f"method {method!r} is not served here (serving: {', '.join(service.config.methods)}; "
                                "start with noclone serve --method ...)")
        pixels = 0
        for upload in form.files:
            try:
                _, (w, h) = peek_size(upload, service.limits)
            except ApiError as exc:
                service.metrics.reject({413: "too_large", 415: "format"}.get(exc.status, "invalid"))
                raise
            pixels += w * h
        if pixels > service.config.max_request_pixels:
            service.metrics.reject("too_large")
            raise ApiError(413, f"{pixels:,} pixels in one request is over the {service.config.max_request_pixels:,} "
                                "limit: send fewer photos per request")
        if expectation is not None:
            expectation.set(len(form.files) if method == "rid" else 0)
        if method == "rid":
            budget = parse_request_budget(form.fields.get("budget"), service.generator.config.budget)
            try:
                files, warning = await asyncio.wait_for(service.cloak_rid(form.files, budget, expectation),
                                                        service.limits.request_timeout_s)
            except asyncio.TimeoutError:
                service.metrics.reject("timeout")
                raise ApiError(504, f"cloaking did not finish within {service.limits.request_timeout_s:g} s") from None
            headers = {"X-Noclone-Method": "rid", "X-Noclone-Budget": f"{budget * 255:.2f}/255",
                       "Cache-Control": "no-store"}
            if warning:
                headers["X-Noclone-Warning"] = warning
            if len(files) == 1:
                name, data = files[0]
                headers["Content-Disposition"] = f'attachment; filename="{name}"'
                return Response(data, media_type="image/png", headers=headers)
            headers["Content-Disposition"] = 'attachment; filename="cloaked.zip"'
            return Response(zip_bytes(files), media_type="application/zip", headers=headers)
        return await _submit_job(method, form)

    async def _submit_job(method: str, form):
        from noclone.cloak.registry import cloak_methods

        default = cloak_methods()[method].preset_config(**service._settings(method)).budget
        budget = parse_request_budget(form.fields.get("budget"), default)
        if service.jobs is None:
            await service.start()
        if service.jobs.active() >= service.jobs.max_jobs:  # before decoding anything
            service.metrics.reject("queue_full")
            raise ApiError(429, f"the job queue is full ({service.jobs.max_jobs} jobs): retry later",
                           {"Retry-After": str(service.jobs.retry_after())})
        images = await asyncio.to_thread(lambda: [decode_photo(u, service.limits) for u in form.files])
        warning = next((w for w in (service.photo_warning(method, im.size) for im in images) if w), None)
        try:
            job = service.jobs.submit(method, budget, output_names([u.filename for u in form.files]), images, warning)
        except JobsFull:
            service.metrics.reject("queue_full")
            raise ApiError(429, f"the job queue is full ({service.jobs.max_jobs} jobs): retry later",
                           {"Retry-After": str(service.jobs.retry_after())}) from None
        headers = {"Location": f"/v1/jobs/{job.id}", "Cache-Control": "no-store"}
        if warning:
            headers["X-Noclone-Warning"] = warning
        return JSONResponse(job.describe(), status_code=202, headers=headers)

    def find_job(job_id: str) -> Job:
        job = service.jobs.get(job_id) if service.jobs is not None else None
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (unknown, cancelled or expired)")
        return job

    @api.get("/v1/jobs/{job_id}", summary="A job's state and progress", dependencies=auth)
    async def job_status(job_id: str) -> dict:
        return find_job(job_id).describe()

    @api.get("/v1/jobs/{job_id}/result", summary="A finished job's PNG, or a ZIP for several (?file=NAME: one PNG)",
             dependencies=auth, response_class=Response,
             responses={200: {"content": {"image/png": {}, "application/zip": {}}}})
    async def job_result(job_id: str, file: str | None = None):
        job = find_job(job_id)
        if job.state == "failed":
            raise ApiError(409, f"the job failed: {job.error}")
        if job.state != "done" or job.results is None:
            raise ApiError(409, f"the job is {job.state} ({round(job.progress * 100)} %): poll /v1/jobs/{job_id}")
        results = job.results
        headers = {"X-Noclone-Method": job.method, "Cache-Control": "no-store"}
        if job.warning:
            headers["X-Noclone-Warning"] = job.warning
        if file is not None:
            results = [(n, d) for n, d in results if n == file]
            if not results:
                raise ApiError(404, f"job {job_id} has no file {file!r}")
        if len(results) == 1:
            headers["Content-Disposition"] = f'attachment; filename="{results[0][0]}"'
            return Response(results[0][1], media_type="image/png", headers=headers)
        headers["Content-Disposition"] = f'attachment; filename="cloaked-{job_id}.zip"'
        return Response(zip_bytes(results), media_type="application/zip", headers=headers)

    @api.delete("/v1/jobs/{job_id}", summary="Cancel a job, or drop a finished job's results", dependencies=auth)
    async def job_cancel(job_id: str) -> dict:
        job = service.jobs.cancel(job_id) if service.jobs is not None else None
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (unknown, cancelled or expired)")
        return {"id": job_id, "state": job.state if job.state == "cancelled" else "deleted"}

    api.add_middleware(_Timing, metrics=service.metrics)
    return api


def _version() -> str:
    from noclone import __version__

    return __version__

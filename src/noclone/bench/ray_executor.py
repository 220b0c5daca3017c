"""`noclone bench --executor ray`: every stage of the benchmark as a Ray task, on this machine or on a cluster.

The driver (the `noclone bench` process) plans every cell with the same stage functions the local executor runs
(noclone.bench.runner.cell_stages), through a planning cache that computes no stage: a stage whose result is
already in DIR/cache is taken from there and never submitted; any other becomes one Ray task (one per cache key,
however many cells share it) whose arguments include the ObjectRefs of the upstream stages it waits for, so Ray
runs each stage once its inputs exist, and independent stages side by side. A task runs the stage function itself
on the worker: it computes the same cache key from the same inputs and writes its result into the shared cache
(DIR/cache, which every node must see at the same path); it returns the stage's Ref (key, cache path, meta). Cache
keys do not depend on the executor, so local and Ray runs share a folder and give the same results.

Only the driver writes DIR/results.sqlite: when all stages of a cell are done it reads them back from the cache,
builds the cell's row as the local executor does and stores it. Tasks declare their resources (one GPU for the
stages that load a model when the run is on CUDA, CPUs otherwise), set torch's threads to their CPUs, and are
retried on a worker or node failure and on OSError (shared-storage hiccups); the stages' own training checkpoints
make a retried attack or defence resume where it stopped.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from noclone.bench import stages
from noclone.errors import NocloneError

log = logging.getLogger(__name__)

DRIVER_STAGES = ("subject_photos",)  # rendering or copying the subject's photos: cheap, done while planning
INSTALL_HINT = "pip install 'noclone[ray]' (or: pip install ray)"
ADDRESS = re.compile(r"^(auto|(ray://)?\[?[A-Za-z0-9_.:-]+?\]?:\d{1,5})$")
PROBE = ".ray-probe"


def _ray():
    try:
        import ray
    except ImportError:
        raise NocloneError(f"--executor ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


def check_address(address: str) -> None:
    """'auto', HOST:PORT or ray://HOST:PORT; a HOST:PORT must accept a connection (one clear line otherwise)."""
    if not ADDRESS.match(address):
        raise NocloneError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT (e.g. 10.0.0.5:6379)")
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise NocloneError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                           "start one with `ray start --head` or `ray up CLUSTER.yaml`") from None


@dataclass
class ClusterRuntime(stages.Runtime):
    """The run's device settings as the cluster's workers resolve them: `resolved` is what Runtime.key() gives on
    a worker (a driver without a GPU plans GPU work with the workers' key, so keys match the local executor's)."""

    resolved: dict = field(default_factory=dict)

    def key(self) -> dict:
        return dict(self.resolved)


class _PlanCache(stages.Cache):
    """The driver's cache while planning: a stored result is found as usual, the subject's photos are made here,
    and any other missing stage is returned as a pending Ref (its key and final path) without being computed."""

    def run(self, stage, inputs, build, output=""):
        key = stages.stage_key(stage, inputs)
        final = self.path(stage, key)
        if stage in DRIVER_STAGES or (final / stages.META).is_file():
            return super().run(stage, inputs, build, output)
        return stages.Ref(key, final / output if output else final, stage,
                          {"pending": True, "model": inputs.get("runtime") is not None})


class _FinishedCache(stages.Cache):
    """The driver's cache when a cell's tasks are done: every stage must be found (a worker wrote it)."""

    def run(self, stage, inputs, build, output=""):
        final = self.path(stage, stages.stage_key(stage, inputs))
        if not (final / stages.META).is_file():
            raise NocloneError(f"{final}: a Ray task finished stage {stage} but the driver does not see its result; "
                               f"every node must mount {self.root.parent} at the same path")
        return super().run(stage, inputs, build, output)


def _pending(value) -> bool:
    return isinstance(value, stages.Ref) and bool(value.meta.get("pending"))


def run_stage(root: str, threads: int, fn, args: tuple, kwargs: dict, *upstream: stages.Ref):
    """A Ray task: the stage function on this worker, with the upstream stages' Refs in place of pending ones.
    Returns (the stage's Ref, {'computed': {stage: n}, 'found': {stage: n}})."""
    import torch

    torch.set_num_threads(max(1, threads))
    from noclone.quiet import quiet_third_party

    quiet_third_party()
    done = {(ref.stage, ref.key): ref for ref in upstream}

    def resolve(value):
        if _pending(value):
            if (value.stage, value.key) not in done:
                raise RuntimeError(f"stage {value.stage} {value.key[:12]} was not passed to this task")
            return done[(value.stage, value.key)]
        return value

    cache = stages.Cache(Path(root))
    ref = fn(cache, *[resolve(a) for a in args], **{k: resolve(v) for k, v in kwargs.items()})
    return ref, {"computed": dict(cache.computed), "found": dict(cache.found)}


def probe(out: str, token: str) -> dict:
    """A Ray task pinned to one node: does it see the output folder, and which versions does it run?"""
    import platform

    import torch

    import noclone

    marker = Path(out) / PROBE
    seen = marker.read_text().strip() if marker.is_file() else None
    return {"node": platform.node(), "sees_out": seen == token, "noclone": noclone.__version__,
            "cache": stages.BENCH_CACHE_VERSION, "torch": torch.__version__.split("+")[0]}


def resolve_runtime(device: str, dtype: str) -> dict:
    """Runtime(device, dtype).key() where it runs (on a GPU worker for CUDA: bf16 support depends on the GPU)."""
    return stages.Runtime(device, dtype).key()


@dataclass(eq=False)
class _Node:
    """One submitted stage task."""

    stage: str
    key: str
    ref: object      # ObjectRef of the stage's Ref
    counts: object   # ObjectRef of its counts (resolves when the task is done)
    error: BaseException | None = None
    finished: bool = False


class RayRun:
    """Options and state of one `--executor ray` run (see run_bench)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None, task_cpus: int = 1,
                 retries: int = 2):
        self.ray = _ray()
        if address is not None:
            if num_cpus is not None:
                raise NocloneError("--ray-cpus sizes a local Ray; a cluster (--address) has its own resources")
            check_address(address)
        if num_cpus is not None and num_cpus < 1:
            raise NocloneError(f"--ray-cpus {num_cpus}: must be at least 1")
        if task_cpus < 1:
            raise NocloneError(f"--task-cpus {task_cpus}: must be at least 1")
        if retries < 0:
            raise NocloneError(f"--retries {retries}: must be 0 or more")
        self.address, self.num_cpus, self.task_cpus, self.retries = address, num_cpus, task_cpus, retries
        self.started = False
        self.computed: Counter = Counter()
        self.found: Counter = Counter()
        self.submitted = 0

    def where(self) -> str:
        if self.address is not None:
            return f"cluster at {self.address}"
        if self.started:
            return f"local Ray, {self.num_cpus or os.cpu_count()} CPU(s)"
        return "Ray already running in this process"

    @contextmanager
    def session(self) -> Iterator[None]:
        """Connect to the cluster (--address) or start a local Ray; a Ray this process started is shut down after."""
        ray = self.ray
        if ray.is_initialized():
            if self.address is not None or self.num_cpus is not None:
                raise NocloneError("Ray is already initialised in this process: --address / --ray-cpus cannot apply")
        elif self.address is not None:
            try:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=True)
            except Exception as exc:  # noqa: BLE001 - ConnectionError, AuthenticationError, version mismatch ...
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise NocloneError(f"--address {self.address}: cannot connect to a Ray cluster: {first}") from None
            self.started = True
        else:
            ray.init(num_cpus=self.num_cpus or os.cpu_count() or 1, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=True, object_store_memory=200 * 2**20)
            self.started = True
        try:
            yield
        finally:
            if self.started:
                ray.shutdown()

    # ------------------------------------------------------------------------------------------- checks

    def _check_nodes(self, out: Path) -> None:
        """Every alive node must see `out` at the same path and run the driver's noclone (else keys would differ)."""
        import noclone

        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = secrets.token_hex(8)
        (out / PROBE).write_text(token + "\n")
        task = ray.remote(probe)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [task.options(num_cpus=0, max_retries=1, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(out), token) for n in nodes]
        try:
            answers = ray.get(refs, timeout=300)
        except ray.exceptions.GetTimeoutError:
            raise NocloneError("Ray: some nodes did not answer a 1-second check within 300 s") from None
        finally:
            (out / PROBE).unlink(missing_ok=True)
        for node, answer in zip(nodes, answers):
            name = f"{answer['node']} ({node.get('NodeManagerAddress')})"
            if not answer["sees_out"]:
                raise NocloneError(f"Ray node {name} does not see {out} at the same path: mount the shared storage "
                                   "holding --out at the same path on every node")
            if (answer["noclone"], answer["cache"]) != (noclone.__version__, stages.BENCH_CACHE_VERSION):
                raise NocloneError(f"Ray node {name} runs noclone {answer['noclone']}, this driver "
                                   f"{noclone.__version__}: install the same noclone on every node")
        log.debug("ray: %d node(s) see %s", len(nodes), out)

    def _runtime(self, runtime: stages.Runtime) -> tuple[ClusterRuntime, bool]:
        """The runtime the tasks use (no progress bars) and whether model stages take a GPU."""
        ray = self.ray
        gpus = int(ray.cluster_resources().get("GPU", 0))
        device = runtime.device or "auto"
        if device == "auto":
            device = "cuda" if gpus else "cpu"
        use_gpu = device.startswith("cuda")
        if use_gpu:
            if not gpus:
                raise NocloneError(f"device {runtime.device}: the Ray cluster has no GPU (use device cpu or add GPU "
                                   "workers)")
            device = "cuda"  # each task sees its one GPU as cuda:0
            task = ray.remote(resolve_runtime).options(num_gpus=1, num_cpus=0, max_retries=self.retries)
            resolved = ray.get(task.remote(device, runtime.dtype))
        else:
            resolved = resolve_runtime(device, runtime.dtype)
        return ClusterRuntime(device, runtime.dtype, False, resolved), use_gpu

    # -------------------------------------------------------------------------------------------- run

    def run_cells(self, todo: list, config, runtime: stages.Runtime, out: Path, cell_stages: Callable,
                  cell_row: Callable) -> Iterator[tuple]:
        """Plan every cell, submit the missing stages, and yield (cell, row or exception, computed anything) as
        cells finish (cells whose stages are all cached first). `cell_stages` and `cell_row` are the runner's
        (noclone.bench.runner): the stage graph of a cell and its results row."""
        ray = self.ray
        out = Path(out).resolve()
        root = str(out / "cache")
        self._check_nodes(out)
        cluster_runtime, use_gpu = self._runtime(runtime)
        task = ray.remote(num_returns=2)(run_stage)
        plan = _PlanCache(Path(root))
        nodes: dict[tuple[str, str], _Node] = {}

        def submit(fn, args, kwargs, ref, after):
            deps = [nodes[(a.stage, a.key)] for a in (*args, *kwargs.values(), after) if _pending(a)]
            gpu = use_gpu and ref.meta.get("model")
            options = {"num_cpus": self.task_cpus, "num_gpus": 1 if gpu else 0, "max_retries": self.retries,
                       "retry_exceptions": [OSError], "name": f"{ref.stage}-{ref.key[:10]}"}
            result, counts = task.options(**options).remote(root, self.task_cpus, fn, args, kwargs,
                                                             *[d.ref for d in deps])
            self.submitted += 1
            return _Node(ref.stage, ref.key, result, counts)

        waiting_for: dict[int, list[_Node]] = {}
        failed_plans: dict[int, Exception] = {}
        models: dict = {}
        for cell in todo:
            mine: list[_Node] = []

            def call(fn, *args, after=None, **kwargs):
                ref = fn(plan, *args, **kwargs)
                if _pending(ref):
                    node = nodes.get((ref.stage, ref.key))
                    if node is None:
                        node = nodes[(ref.stage, ref.key)] = submit(fn, args, kwargs, ref, after)
                    if node not in mine:
                        mine.append(node)
                return ref

            try:
                cell_stages(cell, config, plan, cluster_runtime, models, call)
            except Exception as exc:  # noqa: BLE001 - the cell fails (as it would locally); the others go on
                failed_plans[cell.position] = exc
            waiting_for[cell.position] = mine
        self.computed.update(plan.computed)
        self.found.update(plan.found)
        log.info("ray: %d stage task(s) submitted, %d stage(s) found in the cache", len(nodes),
                 sum(plan.found.values()))

        finished_cache = _FinishedCache(Path(root))
        by_counts = {node.counts: node for node in nodes.values()}
        remaining = {cell.position: cell for cell in todo}
        try:
            while remaining:
                for position in [p for p in remaining
                                 if p in failed_plans or all(n.finished for n in waiting_for[p])]:
                    cell = remaining.pop(position)
                    mine = waiting_for[position]
                    failed = failed_plans.get(position) or next((n.error for n in mine if n.error is not None), None)
                    if failed is not None:
                        yield cell, failed, True
                        continue
                    try:
                        row = cell_row(cell, config, out,
                                       cell_stages(cell, config, finished_cache, cluster_runtime, models))
                    except Exception as exc:  # noqa: BLE001 - reported as the cell's failure
                        yield cell, exc, bool(mine)
                    else:
                        yield cell, row, bool(mine)
                if not remaining:
                    break
                ready, _ = ray.wait(list(by_counts), num_returns=1)
                for object_ref in ready:
                    node = by_counts.pop(object_ref)
                    node.finished = True
                    try:
                        counts = ray.get(object_ref)
                    except ray.exceptions.RayError as exc:
                        node.error = _cause(exc, node)
                        try:
                            ray.get(node.ref)  # read the error of the other return too (else Ray logs it unhandled)
                        except ray.exceptions.RayError:
                            pass
                    else:
                        self.computed.update(counts["computed"])
                        self.found.update(counts["found"])
        finally:
            for object_ref in by_counts:  # stopped early (a failure without --keep-going, Ctrl-C)
                try:
                    ray.cancel(object_ref)
                except Exception:  # noqa: BLE001 - best effort; a local Ray is shut down anyway
                    pass


def _cause(exc: BaseException, node: _Node) -> BaseException:
    """The stage's own exception from a task's failure (as the local executor would raise it); a lost worker or
    node after its retries as one NocloneError line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return NocloneError(f"Ray task {node.stage} {node.key[:12]} failed: {type(exc).__name__}: {first}")

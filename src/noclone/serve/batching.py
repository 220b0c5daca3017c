"""Dynamic batching of RID: photos from concurrent requests share one generator forward pass.

A request submits each photo's working tensor (`noclone.cloak.base.to_working`: short side at the generator's
resolution) with its budget; the batcher waits up to `window_s` after the first arrival for more (or until
`max_batch`), then runs the generator once per working shape (only equal shapes can be stacked; photos of one
aspect ratio share a shape) in its own worker thread, as `RIDCloak.compute_deltas` does for a folder, and resolves
each photo's future with its perturbation. With `max_batch=1` every photo runs alone (batching off).

It waits only while more photos are known to be coming: each request holds an `Expectation` from the moment it
arrives (one photo, until its form is read, then as many as it carries) until its photos are submitted, so a lone
client never pays the window and concurrent ones share passes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More photos are waiting than the batcher accepts."""


@dataclass
class _Item:
    x: torch.Tensor          # [1, 3, h, w] working image in [-1, 1]
    budget: float
    future: asyncio.Future


class Expectation:
    """Photos a request will submit but has not yet (counted by the batcher while it collects a batch)."""

    def __init__(self, batcher: "RIDBatcher"):
        self.batcher = batcher
        self.n = 1  # a request whose form is still arriving will bring at least one photo
        batcher.coming += 1

    def set(self, n: int) -> None:
        """The request carries `n` photos for the batcher (0: it turned out to need none)."""
        self.batcher.coming += n - self.n
        self.n = n

    def submitted(self) -> None:
        if self.n > 0:
            self.n -= 1
            self.batcher.coming -= 1

    def close(self) -> None:
        """The request is over: whatever it did not submit is no longer coming."""
        self.batcher.coming -= self.n
        self.n = 0

    def __enter__(self) -> "Expectation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RIDBatcher:
    """Collects RID forward requests and runs them in batches on one worker thread."""

    def __init__(self, generator: torch.nn.Module, *, window_s: float = 0.01, max_batch: int = 16,
                 max_waiting: int = 64, on_batch: Callable[[int], None] | None = None):
        self.generator = generator.eval()
        self.window_s = max(0.0, window_s)
        self.max_batch = max(1, max_batch)
        self.max_waiting = max(1, max_waiting)
        self.on_batch = on_batch
        self.forward_passes = 0
        self.coming = 0  # photos announced by requests (`expect`) and not yet submitted
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        """Photos waiting for a forward pass."""
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        """Start the collecting task on the running event loop."""
        self._queue = asyncio.Queue()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="noclone-rid")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="noclone-rid-batcher")

    async def stop(self) -> None:
        """Stop collecting; photos still waiting get a cancelled future."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            item.future.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def expect(self) -> Expectation:
        """Announce a request whose photos will come (use as a context manager around the request)."""
        return Expectation(self)

    async def submit(self, x: torch.Tensor, budget: float, expectation: Expectation | None = None) -> torch.Tensor:
        """The perturbation ([1, 3, h, w], [-1, 1] units) of one working image at `budget`."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        if self._queue.qsize() >= self.max_waiting:
            raise QueueFull
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(x, budget, future))
        if expectation is not None:
            expectation.submitted()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.window_s
            while len(items) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0 or self.coming <= 0:
                    # whatever already arrived still joins this pass
                    while len(items) < self.max_batch and not self._queue.empty():
                        items.append(self._queue.get_nowait())
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            items = [item for item in items if not item.future.done()]  # requests cut or timed out meanwhile
            if not items:
                continue
            try:
                deltas = await loop.run_in_executor(self._pool, self._forward, items)
            except asyncio.CancelledError:
                for item in items:
                    item.future.cancel()
                raise
            except Exception as exc:  # a failed pass fails its requests, not the service
                log.exception("RID forward pass failed")
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item, delta in zip(items, deltas):
                if not item.future.done():
                    item.future.set_result(delta)

    @torch.no_grad()
    def _forward(self, items: list[_Item]) -> list[torch.Tensor]:
        """One generator pass per working shape; per-photo budgets scale the same tanh output."""
        out: list[torch.Tensor | None] = [None] * len(items)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(tuple(item.x.shape[-2:]), []).append(i)
        device = next(self.generator.parameters()).device
        for idx in groups.values():
            batch = torch.cat([items[i].x for i in idx]).to(device)
            # delta = eta * tanh(net(x)) with eta = 2 * budget: the network's output does not depend on the budget,
            # so photos at different budgets share the pass and are scaled one by one
            raw = self.generator(batch, 0.5).float().cpu()  # eta = 1: tanh(net(x))
            self.forward_passes += 1
            if self.on_batch is not None:
                self.on_batch(len(idx))
            for i, r in zip(idx, raw):
                out[i] = (2.0 * items[i].budget) * r.unsqueeze(0)
        return out  # type: ignore[return-value]

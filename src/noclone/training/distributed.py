"""Data parallelism over processes started by `accelerate launch` (or `torchrun`): one global batch, split by rank.

Not launched (no WORLD_SIZE > 1 in the environment) everything here is a no-op on `SINGLE` and accelerate is never
imported: a single process runs exactly the code it ran before this module existed.

Launched with N processes, `current()` initialises the process group once through accelerate's `PartialState`
(NCCL with one GPU per process where CUDA is available; gloo on CPU) and the training code follows four rules:

- every process draws the *global* batch (per-process batch x N) from the same step generator
  (`noclone.training.diffusion.step_generator`), then computes only its own slice (`Distributed.shard`): the data
  split is a pure function of (seed, step, rank), and N processes at batch B/N see exactly the samples, noise and
  timesteps one process at batch B sees;
- `run_training` averages the gradients over the processes after each backward (a bucketed all-reduce of the
  trainable parameters' `.grad`, the mean over equal shards = the gradient of the global batch mean), then clips
  and steps identically everywhere, so the replicas stay equal (they also start equal: rank 0's weights are
  broadcast once);
- the recorded losses are the mean over processes, and the decisions that end a loop (a non-finite loss, the
  deadline) are taken collectively, so no process waits for another that has stopped;
- only the main process (rank 0) writes outputs, checkpoints and progress bars; the others read checkpoints when
  resuming.

The gradients are reduced by hand, not by wrapping the model in DistributedDataParallel: `run_training`'s callers
call the UNet and text encoder directly (diffusers and peft attributes, several forwards per step) and some set
`.grad` themselves (`LoopConfig.manual_backward`, APDM's learning-to-protect), which DDP's backward hooks do not
see. The cost is that communication does not overlap the backward pass.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# what `accelerate launch` (torchrun) and MPI launchers set to the number of processes
WORLD_SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
BUCKET_BYTES = 64 * 2**20


def launched() -> bool:
    """True when this process is one of several started by a launcher (environment only; nothing is imported)."""
    for name in WORLD_SIZE_ENV:
        try:
            if int(os.environ.get(name, "1") or 1) > 1:
                return True
        except ValueError:
            continue
    return False


@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes (`SINGLE`: the only one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: "torch.device | None" = None  # the process's own GPU; None on CPU

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def global_batch(self, per_process: int) -> int:
        return per_process * self.world_size

    def shard(self, batch: "torch.Tensor") -> "torch.Tensor":
        """This process's contiguous slice of a global batch (the whole batch on one process)."""
        if not self.enabled:
            return batch
        n, rest = divmod(len(batch), self.world_size)
        if rest:
            raise ValueError(f"a global batch of {len(batch)} does not split over {self.world_size} processes")
        return batch[self.rank * n : (self.rank + 1) * n]

    def owned(self, n: int) -> range:
        """The items 0..n-1 this process owns when whole items (subjects) are spread round-robin: k % world_size."""
        return range(self.rank, n, self.world_size)

    def owner(self, k: int) -> int:
        return k % self.world_size

    # --- collectives (no-ops on one process) ---
    def broadcast_object(self, obj, src: int = 0):
        """`src`'s picklable `obj` on every process (e.g. a state dict gathered before a checkpoint is written)."""
        if not self.enabled:
            return obj
        import torch

        box = [obj]
        torch.distributed.broadcast_object_list(box, src, device=self.device)
        return box[0]

    def _comm_device(self) -> "torch.device":
        import torch

        return self.device if self.device is not None else torch.device("cpu")

    def _to_comm(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """`tensor`, or a copy on this process's GPU where the backend is NCCL and it lives on the CPU (e.g. RID's
        benchmark trains CPU-loaded models on a machine with GPUs)."""
        if self.device is not None and tensor.device != self.device:
            return tensor.to(self.device)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, values: "torch.Tensor") -> "torch.Tensor":
        """The elementwise sum over processes of a small tensor (returned as a new float64 tensor)."""
        import torch

        out = values.detach().to(self._comm_device(), torch.float64).clone()
        if self.enabled:
            torch.distributed.all_reduce(out)
        return out

    def all_reduce_mean_(self, tensors: Iterable["torch.Tensor"], bucket_bytes: int = BUCKET_BYTES) -> None:
        """Average `tensors` over processes in place, in buckets of one device and dtype (fewer, larger messages)."""
        if not self.enabled:
            return
        import torch
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)

        def flush(bucket: list[torch.Tensor]) -> None:
            flat = self._to_comm(_flatten_dense_tensors(bucket))
            torch.distributed.all_reduce(flat)
            flat.div_(self.world_size)
            for t, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(synced)

        for _, members in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
            bucket, size = [], 0
            for t in members:
                bucket.append(t)
                size += t.numel() * t.element_size()
                if size >= bucket_bytes:
                    flush(bucket)
                    bucket, size = [], 0
            if bucket:
                flush(bucket)

    def broadcast_(self, tensors: Iterable["torch.Tensor"], src: int = 0) -> None:
        """Overwrite `tensors` in place with process `src`'s values."""
        if not self.enabled:
            return
        import torch

        with torch.no_grad():
            for t in tensors:
                on_comm = self._to_comm(t.data)
                torch.distributed.broadcast(on_comm, src)
                if on_comm is not t.data:
                    t.data.copy_(on_comm)

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. fills a cache), then the others do (and read it)."""
        if self.enabled and not self.is_main:
            self.barrier()
        yield
        if self.enabled and self.is_main:
            self.barrier()


SINGLE = Distributed()
_current: Distributed | None = None


def current() -> Distributed:
    """This process's `Distributed`; initialises the process group on the first call under a launcher."""
    global _current
    if _current is None:
        _current = _initialise() if launched() else SINGLE
    return _current


def init_if_launched() -> Distributed:
    """Call before models are placed (`python -m noclone.cli` does): under a launcher each process then owns its GPU,
    so 'cuda' / 'auto' devices mean that GPU."""
    return current()


def _initialise() -> Distributed:
    import torch
    from accelerate import PartialState
    from accelerate.utils import str_to_bool

    # accelerate only picks gloo when told the run is on CPU; a CPU-only torch under `accelerate launch
    # --multi_gpu` (torchrun) would otherwise come up as a single process
    cpu = not torch.cuda.is_available() or bool(str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false")))
    state = PartialState(cpu=cpu)
    if state.num_processes <= 1:
        log.warning("launched as several processes but accelerate found no distributed setup; running as one")
        return SINGLE
    device = None
    if state.device is not None and state.device.type == "cuda":
        device = torch.device("cuda", state.local_process_index if state.device.index is None else state.device.index)
        torch.cuda.set_device(device)
    if state.process_index != 0:
        logging.getLogger("noclone").setLevel(logging.WARNING)  # one process tells the story
    log.info("data-parallel training: process %d of %d (%s, %s)", state.process_index, state.num_processes,
             state.backend, device or "cpu")
    return Distributed(state.process_index, state.num_processes, state.local_process_index, device)


def place_pipeline(pipe) -> None:
    """Move a pipeline loaded before the process group existed (all ranks on one GPU) to this process's GPU."""
    dist = current()
    where = pipe.unet.device
    if dist.device is None or where.type != "cuda" or where == dist.device:
        return
    log.info("moving the pipeline from %s to %s (this process's GPU)", where, dist.device)
    pipe.to(dist.device)

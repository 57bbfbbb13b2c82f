"""Where code runs: one process, or several in data parallel. The only module that knows.

Data parallelism is plain torch.distributed: every process holds the whole strategy, takes its slice
of each global batch, and gradients are averaged with one all-reduce before the optimizer step.
We average gradients by hand instead of wrapping in DistributedDataParallel because strategies grow
modules between tasks and call the backend in several ways per step (teachers, replay, text passes);
an explicit all-reduce after ``backward`` is correct for all of them and is exactly equivalent to
one process on the whole batch when every process gets the same number of examples.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from clipcl.config import ConfigError


def pick_device(accelerator: str) -> torch.device:
    """The device for ``train.accelerator`` (already one of auto, cpu, cuda: TrainConfig checks that).
    Whether a CUDA device is there is known only on the machine, so that check is made here."""
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.accelerator=cuda but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Runtime:
    """One process. Subclassed by :class:`DistributedRuntime`."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device, precision: str = "fp32") -> None:
        # ``precision`` is one of fp32, bf16, fp16 (TrainConfig checks that); fp16 also needs the device.
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 on CPU")
        self.device = device
        self.precision = precision
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def start_task(self) -> None:
        """Fresh per-task state. The fp16 loss scaler starts over at every task, like the optimizer:
        it is not checkpointed, so carrying its scale across tasks would make a resumed run differ
        from an uninterrupted one (seen on an H100, benchmarks/cuda_check.py)."""
        if self.precision == "fp16":
            self.scaler = torch.amp.GradScaler("cuda")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def sync_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Average gradients over processes (nothing to do in one process)."""

    def step(self, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter],
             max_grad_norm: float | None) -> None:
        """Unscale, clip, step. Gradients must already be synchronised."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if max_grad_norm is not None and parameters:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def fit(self, module: torch.nn.Module, loss_of_step: Callable[[int], torch.Tensor], steps: int,
            lr: float, weight_decay: float = 0.0,
            lr_of_step: Callable[[int], float] | None = None) -> list[float]:
        """An inner fit (e.g. DDAS's autoencoders): ``steps`` Adam steps on ``loss_of_step(step)``.

        Adam's own (L2) ``weight_decay``; ``lr_of_step(step)``, if given, sets the lr before each step
        (``lr`` otherwise).

        The runtime owns the optimizer, ``backward`` and the gradient average over processes, so a
        method never does; in full precision, outside autocast. Every process must pass the same
        data: the averaged gradient then equals each process's own exactly (``(g + g) / 2 == g``),
        so a 2-process fit equals a 1-process one. Returns the loss of every step.
        """
        parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
        # Not fused: see Trainer (the fused kernel does not bump version counters).
        optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, fused=False)
        losses = []
        with torch.enable_grad():
            for step in range(steps):
                if lr_of_step is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = lr_of_step(step)
                loss = loss_of_step(step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.sync_gradients(parameters)
                optimizer.step()
                losses.append(float(loss.detach()))
        return losses

    def unsharded(self) -> Runtime:
        """This process's device as a single full-precision process: for work every process does in
        full and identically (DDAS features), so no process needs another's results."""
        return Runtime(self.device)

    def shard(self, items: list[int]) -> list[int]:
        """This process's share of a list of indices (all of it in one process)."""
        return items

    def close(self, synchronise: bool = True) -> None:
        pass


class DistributedRuntime(Runtime):
    """One of ``world_size`` processes joined by torch.distributed (gloo on CPU, nccl on GPU)."""

    def __init__(self, rank: int, world_size: int, device: torch.device, precision: str = "fp32",
                 local_rank: int | None = None) -> None:
        """Joins the group through ``env://`` (MASTER_ADDR, MASTER_PORT: set by torchrun, or by
        :func:`rendezvous_environment` for spawned workers). ``local_rank`` (torchrun's) picks the
        GPU on a machine of several; default ``rank``."""
        if device.type == "cuda":
            device = torch.device("cuda", (rank if local_rank is None else local_rank) % torch.cuda.device_count())
            torch.cuda.set_device(device)
        super().__init__(device, precision)
        self.rank = rank
        self.world_size = world_size
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)

    def sync_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Average gradients over processes, every process taking part with the same parameters in the
        same order. A parameter may have a gradient on one process only (an expert that only its images
        chose): first agree which parameters have one anywhere, give those a zero gradient where they have
        none, then average them in one flat buffer. Parameters without a gradient anywhere keep none, as
        in one process (AdamW then leaves them alone)."""
        parameters = list(parameters)
        if not parameters:
            return
        device = parameters[0].device
        has_grad = torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32, device=device)
        dist.all_reduce(has_grad, op=dist.ReduceOp.SUM)
        chosen = [p for p, count in zip(parameters, has_grad.tolist()) if count > 0]
        if not chosen:
            return
        for parameter in chosen:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        # One flat buffer, one all-reduce: fewer messages than one per parameter.
        flat = torch.cat([p.grad.reshape(-1) for p in chosen])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for parameter in chosen:
            count = parameter.grad.numel()
            parameter.grad.copy_(flat[offset: offset + count].view_as(parameter.grad))
            offset += count

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        dist.barrier()

    def shard(self, items: list[int]) -> list[int]:
        return items[self.rank:: self.world_size]

    def close(self, synchronise: bool = True) -> None:
        """Leave the process group. ``synchronise`` (a normal end): wait for every process first, so
        no collective is still in flight when the group goes; gloo aborts a process (SIGABRT) whose
        peer tears the connection down in the middle of one. False after an error: the other
        processes may never arrive."""
        if dist.is_initialized():
            if synchronise:
                dist.barrier()
            dist.destroy_process_group()


def launched_processes() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when a launcher started this process as one of several (torchrun
    on one or many machines: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else None."""
    world = os.environ.get("WORLD_SIZE")
    if world is None or "RANK" not in os.environ or int(world) <= 1:
        return None
    return int(os.environ["RANK"]), int(world), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def rendezvous_environment(port: int) -> Iterator[None]:
    """Set MASTER_ADDR/MASTER_PORT for spawned workers, restoring the environment afterwards."""
    saved = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

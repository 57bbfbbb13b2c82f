"""Task-boundary checkpoints (safetensors) and atomic file writes.

Every file carries a sha256 of its tensors in its metadata and is verified on load, so a truncated
or overwritten file is named (:class:`DamagedCheckpoint`), never half-applied.

A checkpoint stores only the tensors that differ from the freshly built strategy (plus any the
method added): a zero-shot or text-only run does not write the whole image tower after every task.
Loading builds the same strategy from the same config and applies the difference. The config's
fingerprint is stored in the file's metadata, so a checkpoint from another config is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clipcl.atomic_files import atomic_path
from clipcl.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used here. One line says why."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint file that cannot be read or whose checksum does not match (truncated, overwritten)."""


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    """Save tensors with safetensors through a temporary file, so a crash never leaves half a file.
    The metadata gets a ``sha256`` of the tensors, which :func:`read_verified` checks."""
    metadata = {**(metadata or {}), "sha256": tensors_digest(tensors)}
    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # Raw bytes through a uint8 view: works for every dtype, bf16 included (numpy has none).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_verified(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and tensors, after checking its checksum (files written before
    clipcl stored one are read unchecked). Raises :class:`DamagedCheckpoint` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:  # noqa: BLE001 (safetensors raises several types for damaged files)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DamagedCheckpoint(f"checkpoint {path} is damaged (cannot be read: {reason})") from None
    if "sha256" in metadata and metadata["sha256"] != tensors_digest(tensors):
        raise DamagedCheckpoint(f"checkpoint {path} is damaged (its checksum does not match its content)")
    return metadata, tensors


def fingerprint_digest(fingerprint: str) -> str:
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def snapshot_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module``'s state, the reference that checkpoints are taken against."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in module.state_dict().items()}


def changed_state(module: torch.nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of ``module`` that are new or differ from ``reference``, as contiguous CPU copies."""
    changed = {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu")
        base = reference.get(name)
        if base is None or base.shape != tensor.shape or base.dtype != tensor.dtype or not torch.equal(base, tensor):
            changed[name] = tensor.clone().contiguous()
    return changed


def save_checkpoint(path: str | Path, module: torch.nn.Module, reference: dict[str, torch.Tensor],
                    fingerprint: str, task_index: int) -> int:
    """Write the changed state of ``module`` after ``task_index``; returns the bytes written."""
    metadata = {"config": fingerprint_digest(fingerprint), "task_index": str(task_index), "format": "clipcl-delta-1"}
    atomic_save_safetensors(changed_state(module, reference), path, metadata)
    return Path(path).stat().st_size


def load_checkpoint(path: str | Path, module: torch.nn.Module, fingerprint: str) -> int:
    """Apply a checkpoint to a freshly built ``module``; returns the task index it was taken after."""
    path = Path(path)
    metadata, tensors = read_verified(path)
    if metadata.get("format") != "clipcl-delta-1":
        raise CheckpointError(f"{path} is not a clipcl checkpoint")
    if metadata.get("config") != fingerprint_digest(fingerprint):
        raise CheckpointError(f"{path} was written by a run with another config; use a new output_dir")
    state = module.state_dict()
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise CheckpointError(f"{path} holds {unknown[0]!r}, which this model does not have")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if state[name].shape != tensor.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, model expects "
                                      f"{tuple(state[name].shape)}")
            state[name].copy_(tensor)
    return int(metadata["task_index"])

"""Model backends behind one interface (:class:`~clipcl.models.base.Backend`).

``build_backend(config.model)`` picks the backend named by ``model.backend``:

- ``starter``: the offline ConSE dual encoder (``clipcl.models.starter``);
- ``open_clip``: any open_clip architecture, by name or JSON config file (``clipcl.models.open_clip_backend``);
- ``hf``: a transformers ``CLIPModel`` / ``SiglipModel`` directory or hub id (``clipcl.models.hf_backend``).

Importing this package imports neither open_clip nor transformers (each costs seconds); the backend
modules import them when a backend of that kind is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from clipcl.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from clipcl.models.base import Backend

BACKENDS = ("starter", "open_clip", "hf")
"""Valid values of ``model.backend``."""


def build_backend(config: ModelConfig) -> Backend:
    """The backend a model config asks for, with its weights loaded (then ``model.weights``, if set)."""
    backend = _built_backend(config)
    if config.weights is not None:
        load_backend_weights(backend, config.weights)
    return backend


def load_backend_weights(backend: Backend, path: str) -> None:
    """Load a safetensors file of ``backend.state_dict()`` into ``backend``: every key, same shapes,
    or one line naming the first mismatch."""
    from pathlib import Path

    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"model.weights: {path} does not exist")
    try:
        tensors = load_file(path)
    except Exception as error:  # noqa: BLE001 (safetensors raises several types for a damaged file)
        raise ConfigError(f"model.weights: {path} is not a readable safetensors file ({error})") from None
    own = backend.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ConfigError(f"model.weights: {path} does not match {config_name(backend)}: "
                          + (f"missing {missing[0]}" if missing else f"unexpected key {unexpected[0]}")
                          + f" ({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ConfigError(f"model.weights: {path}: {key} has shape {tuple(tensor.shape)}, the model's is "
                              f"{tuple(own[key].shape)}")
    backend.load_state_dict(tensors)


def config_name(backend: Backend) -> str:
    return getattr(backend, "model_id", type(backend).__name__)


def _built_backend(config: ModelConfig) -> Backend:
    """The backend a model config asks for, with its weights loaded.

    Raises :class:`~clipcl.config.ConfigError` (a ``ValueError``) for an unknown backend or a bad
    name/tag, and ``FileNotFoundError`` for a local config, checkpoint or directory that is missing;
    either way the message is one line that names the key or path.
    """
    if config.backend == "starter":
        from clipcl.models.starter import build_starter

        return build_starter(config)
    if config.backend == "open_clip":
        from clipcl.models.open_clip_backend import OpenClipBackend

        return OpenClipBackend(config.name, config.pretrained, image_size=config.image_size)
    if config.backend == "hf":
        if config.pretrained is not None:
            raise ConfigError("model.pretrained is not used by the hf backend: its weights are the ones in "
                              "the directory or hub repository named by model.name")
        if config.image_size is not None:
            raise ConfigError("model.image_size is not supported by the hf backend; set the image processor's "
                              "size in the model directory instead")
        from clipcl.models.hf_backend import HFClipBackend

        return HFClipBackend(config.name)
    raise ConfigError(f"model.backend: unknown backend {config.backend!r}; valid backends: {', '.join(BACKENDS)}")


def available_models(open_clip_names: bool = True) -> list[str]:
    """Short descriptions of what ``model.backend`` / ``model.name`` accept, for ``clipcl list``.

    With ``open_clip_names`` the list ends with every architecture open_clip knows, as
    ``open_clip:<name>`` (this imports open_clip, which takes a few seconds).
    """
    models = [
        "starter: offline ConSE dual encoder (EfficientNet-Lite0 + all-MiniLM-L6-v2), the default",
        "open_clip:<architecture name or JSON config file> with pretrained: <tag or local checkpoint file>",
        "hf:<local directory or hub id of a transformers CLIPModel / SiglipModel>",
    ]
    if open_clip_names:
        import open_clip

        models += [f"open_clip:{name}" for name in open_clip.list_models()]
    return models


class TowerView(nn.Module):
    """A module that *refers to* sub-modules and parameters owned by another module.

    Backends use it for a tower whose parameters are not under one sub-module (open_clip's CLIP
    keeps the text tower's parts on the top-level model; transformers keeps each projection
    next to its encoder). ``view.parameters()`` then yields exactly that tower's parameters,
    sharing storage with the model. Build it on the fly (a property) and never assign it to an
    attribute of the owning module: registering the same parameters twice would duplicate
    ``state_dict`` keys. Its parameter names are the owner's names for them (``ln_final.weight``).
    """

    def __init__(self, members: dict[str, nn.Module | nn.Parameter | None]) -> None:
        super().__init__()
        for name, member in members.items():
            if member is None:
                continue
            if isinstance(member, nn.Parameter):
                self.register_parameter(name, member)
            elif isinstance(member, nn.Module):
                self.add_module(name, member)
            else:
                raise TypeError(f"TowerView member {name!r} is a {type(member).__name__}, not a module or parameter")

    def forward(self, *args, **kwargs):  # pragma: no cover - a view is never called
        raise RuntimeError("a TowerView only groups parameters; call the backend's encode_* methods instead")


def find_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a tower: the children of its longest ``ModuleList``/``Sequential``
    whose children all share one type (a fallback for architectures without a known layout)."""
    best: list[nn.Module] = []
    for child in module.modules():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            members = list(child.children())
            if len(members) > len(best) and len({type(member) for member in members}) == 1:
                best = members
    return best


__all__ = ["BACKENDS", "TowerView", "available_models", "build_backend", "find_blocks"]

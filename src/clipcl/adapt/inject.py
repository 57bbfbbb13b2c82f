"""The one injection mechanism every adaptation kind uses.

A *site* is a place in a model where an adaptation module goes: ``parent.<attribute>`` is replaced by
a wrapper that keeps the original module as ``.base``. Sites come from one of two sources:

- :func:`find_sites`: every sub-module whose dotted name matches an ``fnmatch`` pattern (LoRA and
  parallel adapters; each backend keeps its own default patterns, ``Backend.adaptation_targets``);
- :meth:`~clipcl.models.base.Backend.adaptation_sites`: places a backend declares itself, with what a
  name cannot say (the width a mixture works at, its token layout, the module whose input it reads).

:func:`attach` puts a wrapper at a site, :func:`inject_by_name` validates every match before wrapping
any (so a bad target leaves the model untouched), and :func:`added_parameters` lists what all the
wrappers in a model added. Names are always the *original* module names: once a module is wrapped its
parameters live under ``<name>.base``, but patterns and returned names keep referring to ``<name>``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import fields, is_dataclass
from typing import Any, Protocol

import torch
from torch import nn

from clipcl.config.schema import ConfigError
from clipcl.models import TowerView
from clipcl.models.base import Site


class AdaptationWrapper(nn.Module):
    """Base class of the wrappers: holds ``base`` and forwards unknown attribute reads to it.

    Forwarding keeps code that inspects the wrapped layer working (open_clip reads
    ``mlp.c_fc.weight.dtype``; transformers reads attributes of its attention modules).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            base = modules.get("base") if modules is not None else None
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)

    def added_parameters(self) -> list[nn.Parameter]:
        """The parameters this wrapper added (not those of ``base``)."""
        raise NotImplementedError


def added_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters added by adaptation wrappers anywhere in ``model`` (each once, model order)."""
    seen: set[int] = set()
    parameters = []
    for module in model.modules():
        if isinstance(module, AdaptationWrapper):
            for parameter in module.added_parameters():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    parameters.append(parameter)
    return parameters


def freeze_base(module: nn.Module) -> None:
    """Freeze a module's own parameters, leaving those of wrappers nested inside it trainable."""
    keep = {id(parameter) for parameter in added_parameters(module)}
    for parameter in module.parameters():
        if id(parameter) not in keep:
            parameter.requires_grad_(False)


def first_parameter(module: nn.Module) -> torch.Tensor | None:
    """A parameter of ``module`` whose dtype and device new parameters take (None if it has none)."""
    return next(module.parameters(), None)


def first_input(args: tuple, kwargs: dict[str, Any], who: str = "the adapter") -> torch.Tensor:
    """The input a parallel branch reads: the first positional argument, or the usual keywords."""
    if args:
        return args[0]
    for name in ("hidden_states", "x", "input", "query"):
        if name in kwargs:
            return kwargs[name]
    raise TypeError(f"{who}: the wrapped module was called without a positional input or "
                    "a hidden_states/x/input/query keyword")


def add_to_output(output: Any, update: torch.Tensor, who: str, base: nn.Module) -> Any:
    """``output + update``; for a tuple output (attention layers) the update joins its first element."""
    if isinstance(output, torch.Tensor):
        return output + update
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0] + update, *output[1:])
    raise TypeError(f"{who}: the wrapped {type(base).__name__} returned a {type(output).__name__}, "
                    "not a tensor or a tuple starting with one")


# --- finding sites -----------------------------------------------------------------------------------


def walk(module: nn.Module, prefix: str = "", seen: set[int] | None = None) -> Iterator[Site]:
    """A :class:`Site` for every sub-module, in ``named_modules`` order.

    Names are the original ones: a wrapper is listed under the name of the module it wraps (the
    outermost wrapper when there are several), the modules inside it under that module's names,
    and the wrapper's own layers are skipped.
    """
    seen = {id(module)} if seen is None else seen
    for attribute, child in module._modules.items():
        if child is None or id(child) in seen:
            continue
        seen.add(id(child))
        name = f"{prefix}.{attribute}" if prefix else attribute
        yield Site(tower="", name=name, parent=module, attribute=attribute)
        inner = child
        while isinstance(inner, AdaptationWrapper):
            inner = inner.base
        yield from walk(inner, name, seen)


def find_sites(model: nn.Module, patterns: Sequence[str]) -> list[Site]:
    """The sites of ``model`` whose dotted names match one of the ``fnmatch`` patterns
    (``*`` also crosses dots: ``"*.attn"``, ``"*.[qkv]_proj"``)."""
    return [site for site in walk(model) if any(fnmatch.fnmatchcase(site.name, pattern) for pattern in patterns)]


def attach(site: Site, wrapper: nn.Module) -> nn.Module:
    """Put ``wrapper`` in place of the module at ``site`` (a ``ModuleList`` item too: its attribute
    is its index) and return it."""
    setattr(site.parent, site.attribute, wrapper)
    return wrapper


# --- injecting a kind by name ------------------------------------------------------------------------


class WrapperKind(Protocol):
    """What :func:`inject_by_name` needs to know about one kind of wrapper (see ``lora.LORA``)."""

    name: str
    config: type

    def problem(self, site: Site, settings: Any) -> str | None:
        """Why the module at ``site`` cannot be wrapped (None when it can)."""

    def is_candidate(self, site: Site) -> bool:
        """Whether the module at ``site`` is worth suggesting in an error message."""

    def wrap(self, module: nn.Module, settings: Any) -> AdaptationWrapper:
        """A fresh wrapper around ``module``."""

    # Optional: ``wrap_sites(sites, settings) -> list[AdaptationWrapper]``, one wrapper per site, for
    # kinds whose wrappers share parameters across sites (LoRA's shared q/k/v down factor, an adapter
    # shared by the attention and the MLP of one block). Without it every site is wrapped on its own.


def settings_from_options(kind: WrapperKind, options: Mapping[str, Any]) -> Any:
    """The kind's config dataclass from keyword options; unknown names fail in one line."""
    assert is_dataclass(kind.config)
    known = [field.name for field in fields(kind.config)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"inject: unknown option(s) {', '.join(unknown)} for kind {kind.name!r}; "
                         f"known: {', '.join(known)}")
    return kind.config(**options)  # the config checks its values, before any module is touched


def _candidates(sites: Sequence[Site], is_candidate: Callable[[Site], bool], limit: int = 8) -> str:
    """Candidate names with layer indices replaced by ``*``, deduplicated."""
    patterns: dict[str, None] = {}
    for site in sites:
        # A projection inside nn.MultiheadAttention is never a target: the attention uses its weight directly.
        if not isinstance(site.parent, nn.MultiheadAttention) and is_candidate(site):
            patterns[re.sub(r"(?<=\.)\d+(?=\.|$)", "*", site.name)] = None
    names = list(patterns)
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def inject_by_name(model: nn.Module, kind: WrapperKind, targets: str | Sequence[str], settings: Any) -> list[str]:
    """Wrap every sub-module of ``model`` whose name matches ``targets`` with ``kind``; return the names.

    Raises ``ValueError`` (one line, naming candidate modules) when nothing matches, when a matched
    module cannot be wrapped, or when one match contains another; the model is then left unchanged.
    """
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns or not all(isinstance(pattern, str) and pattern for pattern in patterns):
        raise ConfigError(f"inject: targets must be non-empty name patterns, got {targets!r}")
    every = list(walk(model))
    matched = [site for site in every if any(fnmatch.fnmatchcase(site.name, p) for p in patterns)]
    if not matched:
        raise ConfigError(f"inject: no module of {type(model).__name__} matches {patterns}; "
                         f"candidates for {kind.name}: {_candidates(every, kind.is_candidate)}")
    for site in matched:
        problem = _common_problem(site) or kind.problem(site, settings)
        if problem is not None:
            raise ConfigError(f"inject: {problem} (candidates for {kind.name}: "
                             f"{_candidates(every, kind.is_candidate)})")
    names = [site.name for site in matched]
    for name in names:
        inner = [other for other in names if other.startswith(name + ".")]
        if inner:
            raise ConfigError(f"inject: targets match both {name} and {inner[0]} inside it; make the patterns "
                             "select one of them")
    # Build every wrapper first (this draws the new parameters, in model order), then put them in.
    wrap_sites = getattr(kind, "wrap_sites", None)
    built = wrap_sites(matched, settings) if wrap_sites is not None else [kind.wrap(site.module, settings)
                                                                           for site in matched]
    wrappers = list(zip(matched, built))
    for site, wrapper in wrappers:
        attach(site, wrapper)
    return names


def _common_problem(site: Site) -> str | None:
    if isinstance(site.parent, TowerView):
        return (f"{site.name} is a direct member of a TowerView, which only refers to modules; "
                "inject into the backend (or its model) instead")
    if isinstance(site.parent, nn.MultiheadAttention):
        return (f"{site.name} is a projection inside an nn.MultiheadAttention, which uses its weight directly; "
                "target the attention module itself")
    return None


__all__ = [
    "AdaptationWrapper",
    "WrapperKind",
    "add_to_output",
    "added_parameters",
    "attach",
    "find_sites",
    "first_input",
    "first_parameter",
    "freeze_base",
    "inject_by_name",
    "settings_from_options",
    "walk",
]

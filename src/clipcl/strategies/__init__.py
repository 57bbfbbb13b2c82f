"""Continual-learning methods. Adding one: a file here, one line in ``STRATEGIES``, one line in the
contract test matrix (tests/test_strategies.py).

A method that is another method with other defaults is a preset instead of a class: a small YAML file
in ``presets/`` naming its ``base`` method, a one-line ``description`` and its ``defaults`` (SIT is
``finetune`` with ``peft: lora`` and ``label_space: batch``). ``strategy: {name: sit}`` builds the base
method's class with the preset's defaults under the keys the user sets; the run keeps the preset's name.
"""

from __future__ import annotations

import sys
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from clipcl.strategies.base import Strategy, StrategyConfig
from clipcl.strategies.cll_clip import CLLCLIP
from clipcl.strategies.coleclip import CoLeCLIP
from clipcl.strategies.er import ExperienceReplay
from clipcl.strategies.finetune import Finetune
from clipcl.strategies.lwf import LwF
from clipcl.strategies.mod_x import ModX
from clipcl.strategies.moe_adapters import MoEAdapters
from clipcl.strategies.vr_lwf import VRLwF
from clipcl.strategies.wise_ft import WiseFT
from clipcl.strategies.zero_shot import ZeroShot
from clipcl.strategies.zscl import ZSCL

METHODS: dict[str, type[Strategy]] = {
    "zero_shot": ZeroShot,
    "finetune": Finetune,
    "wise_ft": WiseFT,
    "lwf": LwF,
    "vr_lwf": VRLwF,
    "zscl": ZSCL,
    "er": ExperienceReplay,
    "moe_adapters": MoEAdapters,
    "mod_x": ModX,
    "coleclip": CoLeCLIP,
    "cll_clip": CLLCLIP,
}
"""The strategies that are classes, by name."""


@cache
def presets() -> dict[str, dict[str, Any]]:
    """The presets shipped in ``clipcl/strategies/presets/*.yaml``, by name: ``base``, ``description``,
    ``defaults``."""
    from clipcl.config import ConfigError

    found = {}
    for path in sorted(Path(str(resources.files("clipcl.strategies") / "presets")).glob("*.yaml")):
        preset = yaml.safe_load(path.read_text())
        if preset.get("base") not in METHODS or path.stem in METHODS or not isinstance(preset.get("defaults"), dict):
            raise ConfigError(f"{path}: a preset needs a base method ({', '.join(METHODS)}) and a defaults mapping")
        found[path.stem] = preset
    return found


STRATEGIES: dict[str, type[Strategy]] = {**METHODS, **{name: METHODS[preset["base"]]
                                                       for name, preset in presets().items()}}
"""Every strategy name a config accepts (the classes and the presets), with the class it builds."""


def describe(name: str) -> str:
    """A one-line description of strategy ``name`` (for ``clipcl list``)."""
    if name in presets():
        return str(presets()[name].get("description", ""))
    doc = (sys.modules[STRATEGIES[name].__module__].__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def strategy_config(section: dict[str, Any]) -> StrategyConfig:
    """Validate a config's ``strategy`` section against the chosen strategy's Config dataclass (a
    preset's defaults first, then the section's keys)."""
    from clipcl.config import ConfigError, from_dict

    name = section.get("name")
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    values = {**presets()[name]["defaults"], **section} if name in presets() else section
    return from_dict(STRATEGIES[name].Config, values, prefix="strategy.")


def build_strategy(backend, section: dict[str, Any]) -> Strategy:
    config = strategy_config(section)
    return STRATEGIES[config.name](backend, config)


__all__ = ["METHODS", "STRATEGIES", "Strategy", "StrategyConfig", "build_strategy", "describe", "presets",
           "strategy_config"]

"""Continual-learning methods. Adding one: a file here, one line in ``STRATEGIES``, one line in the
contract test matrix (tests/test_strategies.py)."""

from __future__ import annotations

from typing import Any

from clipcl.strategies.base import Strategy, StrategyConfig
from clipcl.strategies.er import ExperienceReplay
from clipcl.strategies.finetune import Finetune
from clipcl.strategies.lwf import LwF
from clipcl.strategies.moe_adapters import MoEAdapters
from clipcl.strategies.sit import SIT
from clipcl.strategies.vr_lwf import VRLwF
from clipcl.strategies.wise_ft import WiseFT
from clipcl.strategies.zero_shot import ZeroShot
from clipcl.strategies.zscl import ZSCL

STRATEGIES: dict[str, type[Strategy]] = {
    "zero_shot": ZeroShot,
    "finetune": Finetune,
    "wise_ft": WiseFT,
    "lwf": LwF,
    "vr_lwf": VRLwF,
    "zscl": ZSCL,
    "er": ExperienceReplay,
    "sit": SIT,
    "moe_adapters": MoEAdapters,
}


def strategy_config(section: dict[str, Any]) -> StrategyConfig:
    """Validate a config's ``strategy`` section against the chosen strategy's Config dataclass."""
    from clipcl.config import ConfigError, from_dict

    name = section.get("name")
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return from_dict(STRATEGIES[name].Config, section, prefix="strategy.")


def build_strategy(backend, section: dict[str, Any]) -> Strategy:
    config = strategy_config(section)
    return STRATEGIES[config.name](backend, config)


__all__ = ["STRATEGIES", "Strategy", "StrategyConfig", "build_strategy", "strategy_config"]

"""Run configuration: frozen-ish dataclasses, YAML files and dotted overrides.

A run config mirrors the object tree: ``model``, ``stream``, ``strategy``, ``train``, ``eval``.
Unknown keys are rejected with the list of valid ones, so a typo never silently does nothing.
The ``strategy`` section is validated against the chosen strategy's own ``Config`` dataclass.

Every config dataclass checks its values' ranges and consistency in ``validate()``, which its
``__post_init__`` calls, so a config object that exists is valid and a bad value fails with one
line (a :class:`ConfigError` naming the dotted key) before any dataset or model is built. Call
``validate()`` again after changing a field in place. Checks that need the machine (a CUDA device
for ``train.accelerator=cuda`` or ``train.precision=fp16``) are made where the device is picked,
:mod:`clipcl.engine.runtime`, which also runs before any model is built.
"""

from clipcl.config.loading import (
    apply_overrides,
    config_fingerprint,
    from_dict,
    load_config,
    parse_override,
    shipped_configs,
    to_dict,
)
from clipcl.config.schema import (
    ACCELERATORS,
    BACKENDS,
    LR_SCHEDULES,
    PRECISIONS,
    PROTOCOLS,
    ConfigError,
    EvalConfig,
    ModelConfig,
    ObserveConfig,
    RunConfig,
    StreamConfig,
    TrainConfig,
    check_choice,
    check_integer,
    check_number,
)

__all__ = ["ACCELERATORS", "BACKENDS", "LR_SCHEDULES", "PRECISIONS", "PROTOCOLS", "ConfigError", "EvalConfig",
           "ModelConfig", "ObserveConfig", "RunConfig", "StreamConfig", "TrainConfig", "apply_overrides",
           "check_choice", "check_integer", "check_number", "config_fingerprint", "from_dict", "load_config",
           "parse_override", "shipped_configs", "to_dict"]

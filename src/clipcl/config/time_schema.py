"""The ``time`` section: time-continual training (``stream.protocol: time``, TiC-CLIP's protocol)."""

from __future__ import annotations

from dataclasses import dataclass

from clipcl.config.checks import ConfigError, check_choice, check_integer

TIME_MODES = ("sequential", "cumulative_all", "cumulative_exp", "cumulative_equal", "restart", "oracle")
"""Valid values of ``time.mode`` (clipcl.engine.time_steps says what each trains on)."""


@dataclass
class TimeConfig:
    """What each time step trains on, from which weights, with how much compute. Read only by
    ``stream.protocol: time``; other protocols leave it out of their fingerprint."""

    mode: str = "cumulative_all"
    """``sequential`` (this step's data only), ``cumulative_all`` (every step so far, each sample
    equally likely), ``cumulative_exp`` / ``cumulative_equal`` (this step's data and a replay buffer
    of ``buffer_size`` samples: halved per step of age, or split equally over the old steps),
    ``restart`` (from the initial weights, every step so far, the same budget) or ``oracle`` (from
    the initial weights, every step so far, ``oracle_factor`` times the budget). Every mode draws its
    samples with replacement (TiC-CLIP's code resamples shards); the first four warm-start from the
    last step's weights with a fresh optimizer and schedule."""
    steps: list | None = None
    """Time steps as inclusive ``[first, last]`` timestamp ranges in increasing order (e.g. years:
    ``[[2010, 2010], [2014, 2016]]``); None: one step per distinct timestamp. With several caption
    sets in ``stream.datasets`` each set is a step and this stays None."""
    budget_samples: int | None = None
    """Training samples per step, the same for every mode (oracle: times ``oracle_factor``): the step
    takes ``budget_samples // (train.batch_size * train.grad_accumulation)`` optimizer steps. None:
    ``train.epochs`` passes over the step's own new data."""
    first_warmup_steps: int | None = None
    """Warm-up of the first step (later steps: ``train.warmup_steps``), as TiC-CLIP's params give the
    first step a longer warm-up. None: ``train.warmup_steps`` for every step."""
    buffer_size: int | None = None
    """cumulative_exp / cumulative_equal: the replay buffer's size in samples; None: the size of the
    current step's own data (the paper's D)."""
    oracle_factor: int | None = None
    """oracle: budget multiple; None: the number of steps so far (step t gets t budgets: what every
    other mode has spent by then)."""
    streaming: bool = False
    """Stream each step's training pairs from its webdataset shards instead of indexing them (steps
    larger than memory; shards split across processes and loader workers; clipcl.data.shard_stream).
    Needs one set of shards per step in ``stream.datasets`` and ``budget_samples``; a replay buffer
    then keeps whole shards of an old step."""
    timestamp_key: str = "year"
    """Caption files and webdataset shards: the field holding each sample's timestamp (a number, or
    an ISO date ``YYYY-MM-DD``, read as a decimal year)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError, with a one-line message, on a value out of range."""
        check_choice("time.mode", self.mode, TIME_MODES)
        for name in ("budget_samples", "buffer_size", "oracle_factor"):
            check_integer(f"time.{name}", getattr(self, name), 1, optional=True)
        check_integer("time.first_warmup_steps", self.first_warmup_steps, 0, optional=True)
        if not isinstance(self.streaming, bool):
            raise ConfigError(f"time.streaming must be true or false, got {self.streaming!r}")
        if self.streaming and self.budget_samples is None:
            raise ConfigError("time.streaming needs time.budget_samples: a streamed step's size is not a pass")
        if self.streaming and self.buffer_size is not None:
            raise ConfigError("time.buffer_size counts samples; a streamed step's buffer keeps whole shards "
                              "(the current step's shard count), so leave it null with time.streaming")
        if not isinstance(self.timestamp_key, str) or not self.timestamp_key:
            raise ConfigError(f"time.timestamp_key must be a non-empty string, got {self.timestamp_key!r}")
        if self.steps is None:
            return
        if isinstance(self.steps, str) or not isinstance(self.steps, list) or not self.steps:
            raise ConfigError("time.steps must be a non-empty list of [first, last] timestamp ranges (or null)")
        previous = None
        for number, step in enumerate(self.steps, start=1):
            if (not isinstance(step, (list, tuple)) or len(step) != 2
                    or any(isinstance(value, bool) or not isinstance(value, (int, float)) for value in step)):
                raise ConfigError(f"time.steps: step {number} must be [first, last] (two numbers), got {step!r}")
            first, last = step
            if first > last:
                raise ConfigError(f"time.steps: step {number} {list(step)} ends before it begins")
            if previous is not None and first <= previous:
                raise ConfigError(f"time.steps: step {number} {list(step)} begins at or before the end of "
                                  f"step {number - 1} ({previous}); steps must be in time order and must not overlap")
            previous = last

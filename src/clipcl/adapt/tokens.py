"""An expandable token-embedding table (new words or a new language's sub-words, as CLL-CLIP grows).

:class:`ExpandableEmbedding` wraps the text tower's ``nn.Embedding``: ids below the original size read
the original table, unchanged (the same lookup, so the same values bit for bit, and the same
trainability); later ids read ``added``, a separate parameter, so a method can train the new rows
alone. :func:`grow_token_embedding` adds rows by an initialisation rule through the backend
(``backend.extend_token_embedding``, which knows where its table is).

Growing replaces the ``added`` parameter with a longer one: build the optimizer after growing (the
loop builds one per task).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipcl.adapt.inject import AdaptationWrapper, attach
from clipcl.config.schema import ConfigError
from clipcl.models.base import Site

INIT_RULES = ("mean", "normal", "copy")


@dataclass(frozen=True)
class TokenGrowthConfig:
    """How new rows start; values are checked on construction."""

    count: int
    """Rows to add."""
    init: str = "mean"
    """``mean``: every new row is the mean of the existing rows; ``normal``: per-dimension Gaussian
    draws with the existing rows' mean and standard deviation; ``copy``: row ``i`` copies the row of
    ``source_ids[i]`` (say, an existing word the new one translates)."""
    source_ids: tuple[int, ...] | None = None
    """For ``copy``: one existing id per new row."""

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 1:
            raise ConfigError(f"tokens: count must be a positive integer, got {self.count!r}")
        if self.init not in INIT_RULES:
            raise ConfigError(f"tokens: init must be one of {', '.join(INIT_RULES)}, got {self.init!r}")
        if (self.init == "copy") != (self.source_ids is not None):
            raise ConfigError("tokens: source_ids go with init='copy', and only with it")
        if self.source_ids is not None and len(self.source_ids) != self.count:
            raise ConfigError(f"tokens: {len(self.source_ids)} source_ids for {self.count} new rows")


class ExpandableEmbedding(AdaptationWrapper):
    """An ``nn.Embedding`` (``base``) followed by added rows: id ``base.num_embeddings + i`` reads ``added[i]``."""

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"ExpandableEmbedding wraps an nn.Embedding, not a {type(base).__name__}")
        self.base = base  # not frozen: the original rows train exactly when they did before
        self.added = nn.Parameter(base.weight.new_empty(0, base.embedding_dim))

    @property
    def original_rows(self) -> int:
        return self.base.num_embeddings

    @property
    def rows(self) -> int:
        """Every row: the original ones and the added ones."""
        return self.original_rows + self.added.shape[0]

    def table(self) -> torch.Tensor:
        """The whole table ``[rows, width]``."""
        return torch.cat([self.base.weight, self.added])

    def extend(self, rows: torch.Tensor) -> range:
        """Append ``rows`` ``[count, width]``; returns their ids."""
        if rows.dim() != 2 or rows.shape[1] != self.base.embedding_dim:
            raise ValueError(f"tokens: new rows must be [count, {self.base.embedding_dim}], got {tuple(rows.shape)}")
        start = self.rows
        grown = torch.cat([self.added.detach(), rows.detach().to(self.added)])
        self.added = nn.Parameter(grown, requires_grad=self.added.requires_grad)
        return range(start, self.rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.added.shape[0] == 0:
            return self.base(ids)
        original = self.original_rows
        is_added = (ids >= original).unsqueeze(-1)
        old = self.base(ids.clamp(max=original - 1))  # the added ids' lookups are discarded below
        new = F.embedding((ids - original).clamp(min=0), self.added)
        return torch.where(is_added, new, old)

    def added_parameters(self) -> list[nn.Parameter]:
        return [self.added]

    def extra_repr(self) -> str:
        return f"original={self.original_rows}, added={self.added.shape[0]}"


def extend_embedding_at(site: Site, rows: torch.Tensor) -> range:
    """Append ``rows`` to the table at ``site``, wrapping it in an :class:`ExpandableEmbedding` first."""
    module = site.module
    if not isinstance(module, ExpandableEmbedding):
        module = attach(site, ExpandableEmbedding(module))
    return module.extend(rows)


def initial_rows(table: torch.Tensor, config: TokenGrowthConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """New rows ``[count, width]`` from the existing ``table`` by ``config.init``."""
    table = table.detach()
    if config.init == "mean":
        return table.mean(dim=0, keepdim=True).expand(config.count, -1).clone()
    if config.init == "normal":
        draws = torch.randn(config.count, table.shape[1], generator=generator, dtype=table.dtype)
        return table.mean(dim=0) + draws.to(table.device) * table.std(dim=0)
    ids = torch.tensor(config.source_ids, dtype=torch.long, device=table.device)
    if int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]:
        raise ConfigError(f"tokens: source_ids must be existing ids (below {table.shape[0]})")
    return table[ids].clone()


def grow_token_embedding(backend, config: TokenGrowthConfig, generator: torch.Generator | None = None) -> range:
    """Add ``config.count`` rows to ``backend``'s token-embedding table; returns the new ids."""
    rows = initial_rows(backend.token_embedding_table(), config, generator)
    return backend.extend_token_embedding(rows)


__all__ = ["INIT_RULES", "ExpandableEmbedding", "TokenGrowthConfig", "extend_embedding_at",
           "grow_token_embedding", "initial_rows"]

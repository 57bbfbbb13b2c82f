"""Per-task prompt tokens for a frozen image tower, with CoLeCLIP's attention mask (Li et al., 2024).

:class:`TaskPrompts` holds one group of ``per_task`` learnable vectors per learned task. Adding a task
appends a trainable group and freezes every earlier one (the official code detaches the earlier
tasks' prompts, model/backbone/clip.py:328). The vectors start as uniform(0, ``init_high``) draws
(CoLeCLIP.py:25-26: ``nn.init.uniform_(..., 0, 0.01)``; one prompt per task, configs/CoLeCLIP.yaml's
``NUM_PROMPTS_PER_TASK: 1``). It knows nothing about losses: a strategy passes
:attr:`TaskPrompts.prompts` to ``backend.encode_image_with_task_prompts(images, prompts, per_task)``,
which runs them through the tower (see :mod:`clipcl.models.task_prompt_towers`).

:func:`task_prompt_mask` is the mask those prompts see in every block (clip.py:225-231): the tower's
own tokens (class and patches) never attend to prompts, and a prompt of task ``j`` attends to every
prompt of tasks ``0..j`` (its own group included) and to all of the tower's tokens, class token included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clipcl.config.schema import ConfigError


@dataclass(frozen=True)
class TaskPromptConfig:
    """The options of per-task prompts; values are checked on construction."""

    per_task: int = 1
    """Prompt tokens per task (CoLeCLIP's ``NUM_PROMPTS_PER_TASK``, 1 in its shipped config)."""
    init_high: float = 0.01
    """A new group starts as uniform(0, init_high) draws from torch's global generator (0: zeros)."""

    def __post_init__(self) -> None:
        if not isinstance(self.per_task, int) or isinstance(self.per_task, bool) or self.per_task < 1:
            raise ConfigError(f"task prompts: per_task must be a positive integer, got {self.per_task!r}")
        if isinstance(self.init_high, bool) or not isinstance(self.init_high, (int, float)) \
                or not 0 <= self.init_high < float("inf"):
            raise ConfigError(f"task prompts: init_high must be a finite number >= 0, got {self.init_high!r}")


class TaskPrompts(nn.Module):
    """One group of ``config.per_task`` prompt vectors of ``width`` per learned task.

    Only the newest group is trainable. ``prompts`` is every group in task order, ``[count * per_task,
    width]``; frozen groups enter it detached, so no gradient reaches them whatever the caller does.
    The state dict holds ``groups.<task>`` tensors; :meth:`restore` rebuilds the structure first.
    """

    def __init__(self, width: int, config: TaskPromptConfig | None = None, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ConfigError(f"task prompts: width must be a positive integer, got {width!r}")
        self.width = width
        self.config = config or TaskPromptConfig()
        self.groups = nn.ParameterList()
        # Follows .to() / .cuda(), so groups added later land on the module's dtype and device.
        self.register_buffer("_like", torch.empty(0, dtype=dtype or torch.float32, device=device), persistent=False)

    @property
    def per_task(self) -> int:
        return self.config.per_task

    @property
    def count(self) -> int:
        """The number of tasks with a group."""
        return len(self.groups)

    def _new_group(self, draw: bool) -> nn.Parameter:
        values = torch.zeros(self.per_task, self.width, dtype=self._like.dtype, device=self._like.device)
        if draw and self.config.init_high > 0:
            values.uniform_(0.0, float(self.config.init_high))
        return nn.Parameter(values)

    def _freeze_all_but_last(self) -> None:
        for index, group in enumerate(self.groups):
            group.requires_grad_(index == len(self.groups) - 1)

    def add_task(self) -> int:
        """Append a trainable group for a new task, freeze every earlier one; returns the new task's index."""
        self.groups.append(self._new_group(draw=True))
        self._freeze_all_but_last()
        return self.count - 1

    def restore(self, num_tasks: int) -> None:
        """Rebuild ``num_tasks`` groups (zeros, the last trainable, as ``add_task`` would leave them) so
        that a checkpoint of that many tasks loads with ``load_state_dict``; draws no random numbers."""
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 0:
            raise ConfigError(f"task prompts: restore needs a non-negative task count, got {num_tasks!r}")
        self.groups = nn.ParameterList([self._new_group(draw=False) for _ in range(num_tasks)])
        self._freeze_all_but_last()

    def group(self, task: int) -> nn.Parameter:
        """Task ``task``'s ``[per_task, width]`` vectors."""
        if not 0 <= task < self.count:
            raise IndexError(f"task prompts: task {task} has no group ({self.count} tasks)")
        return self.groups[task]

    @property
    def prompts(self) -> torch.Tensor:
        """All groups in task order, ``[count * per_task, width]`` (frozen groups detached)."""
        if not self.count:
            return self._like.new_zeros(0, self.width)
        return torch.cat([group if group.requires_grad else group.detach() for group in self.groups])

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should see (the newest group, when it is trainable)."""
        return [group for group in self.groups if group.requires_grad]

    def extra_repr(self) -> str:
        return f"width={self.width}, per_task={self.per_task}, tasks={self.count}"


def task_prompt_mask(num_tasks: int, per_task: int, others: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """The additive attention mask of the prompt queries, ``[T * per_task, T * per_task + others]``.

    Rows are the prompts in task order. Columns are the same prompts, then ``others`` tower tokens
    (class token and patches). An entry is 0 where attention is allowed and -inf where it is not: a
    prompt of task ``j`` sees the prompts of tasks ``0..j`` and every tower token. (The tower's own
    tokens see no prompt at all; a backend keeps them out of the prompts' computation altogether.)
    """
    prompts = num_tasks * per_task
    task = torch.arange(prompts, device=device) // per_task
    allowed = torch.cat([task.unsqueeze(0) <= task.unsqueeze(1),
                         torch.ones(prompts, others, dtype=torch.bool, device=device)], dim=1)
    mask = torch.zeros(prompts, prompts + others, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, float("-inf"))


__all__ = ["TaskPromptConfig", "TaskPrompts", "task_prompt_mask"]

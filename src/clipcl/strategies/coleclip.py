"""CoLeCLIP (Li et al. 2024): task prompts, a class vocabulary, and negative labels, on a frozen CLIP.

The pretrained model stays frozen. Each task adds one learnable prompt token (per ``prompts_per_task``)
to the image tower (``clipcl.adapt.task_prompts``): the class and patch tokens never attend to prompts,
so the class token's output is exactly the zero-shot feature, and task ``t``'s image view is the mean
of its prompt's and the class token's outputs. The text side keeps one stored embedding per class
name, the *class vocabulary*, started from the template-ensemble zero-shot embedding. While a task
trains, a fresh rank-5 LoRA on the text tower's attention projections gives a text feature per
class; the step's text embedding is the normalised mean of the stored one and the LoRA one, the
stored one follows it by momentum (without gradient), and a regulariser keeps the step's embedding
near the class's stored embedding at the start of the task. After the task the LoRA is discarded:
text knowledge survives only in the vocabulary.

Training loss: stage 1 (the first task, and the first ``stage_step`` share of each later task's
steps) is the mean of the class-token and task-prompt cross-entropies over the task's classes.
Stage 2 adds the earlier tasks' classes the current task lacks as negative labels, kept per sample
and per earlier task only where the energy gap is above the batch's ``negative_quantile``; samples
already right train on the current classes only (:mod:`clipcl.strategies.coleclip_parts`).

Inference: a class's score is the best, over the learned tasks whose classes include its name, of
that task's image view against its vocabulary embedding; a class of no learned task scores with the
class token and its zero-shot text, i.e. exactly zero-shot. The task id is not used (the official
TIL numbers are the same scores restricted to the task's classes). Defaults: the official code's
(``YukunLi99/CoLeCLIP`` @ c6f8d34, configs/CoLeCLIP.yaml and script/; docs/fidelity.md, Part D).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipcl.config import ConfigError
from clipcl.losses import best_view_scores, normalize
from clipcl.strategies.base import (
    Strategy,
    StrategyConfig,
    class_text_features,
    hash_module,
    require_batch_kind,
)
from clipcl.strategies.coleclip_parts import TextLoRA, momentum_update, negative_label_mask, stage_two_loss

LORA_PROJECTIONS = ("kv", "qkv")


@dataclass
class CoLeCLIPConfig(StrategyConfig):
    prompts_per_task: int = 1
    """Prompt tokens each task adds to the image tower (1, the official scripts' NUM_PROMPTS_PER_TASK)."""
    prompt_init_high: float = 0.01
    """Prompts start uniform in [0, prompt_init_high) (official: method/CoLeCLIP.py:25-26)."""
    lora_rank: int = 5
    """Rank of the per-task text LoRA (configs/CoLeCLIP.yaml:9)."""
    lora_projections: str = "kv"
    """Which attention projections of every text block get LoRA: ``kv`` (the official ``KVLoRA``,
    which leaves the query projection unchanged: model/pet/lora.py:79-85) or ``qkv`` (query too)."""
    momentum: float = 0.1
    """Weight of the step's text embedding in the vocabulary's update (MOM_COEF, script line 27);
    the stored embedding keeps 1 - momentum."""
    regularizer_weight: float = 1.0
    """Weight of the mean L2 distance between each class's step embedding and its stored embedding at
    the start of the task (1: the official code adds it unweighted, method/CoLeCLIP.py:211,237-238)."""
    stage_step: float | None = 0.5
    """Stage 2 starts after this share of a task's optimizer steps (STAGE_STEP); None: stage 1 only."""
    negative_quantile: float = 0.7
    """Stage 2 keeps an earlier task's classes as negatives of a sample when its energy gap exceeds
    this quantile of the batch's gaps (PERCENTAGE)."""

    def validate(self) -> None:
        if not isinstance(self.prompts_per_task, int) or isinstance(self.prompts_per_task, bool) or self.prompts_per_task < 1:
            raise ConfigError(f"strategy.prompts_per_task must be an integer >= 1, got {self.prompts_per_task!r}")
        if not self.prompt_init_high > 0:
            raise ConfigError(f"strategy.prompt_init_high must be > 0, got {self.prompt_init_high!r}")
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 1:
            raise ConfigError(f"strategy.lora_rank must be an integer >= 1, got {self.lora_rank!r}")
        if self.lora_projections not in LORA_PROJECTIONS:
            raise ConfigError(f"strategy.lora_projections must be one of {', '.join(LORA_PROJECTIONS)}, "
                              f"got {self.lora_projections!r}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"strategy.momentum must be in [0, 1], got {self.momentum!r}")
        if not self.regularizer_weight >= 0:
            raise ConfigError(f"strategy.regularizer_weight must be >= 0, got {self.regularizer_weight!r}")
        if self.stage_step is not None and not 0.0 <= self.stage_step <= 1.0:
            raise ConfigError(f"strategy.stage_step must be in [0, 1] or null, got {self.stage_step!r}")
        if not 0.0 <= self.negative_quantile <= 1.0:
            raise ConfigError(f"strategy.negative_quantile must be in [0, 1], got {self.negative_quantile!r}")
        super().validate()


def _task_prompts(backend, config: CoLeCLIPConfig):
    """The image tower's task prompts (``clipcl.adapt.task_prompts``), imported when first built."""
    from clipcl.adapt.task_prompts import TaskPromptConfig, TaskPrompts

    return TaskPrompts(backend.image_token_width, TaskPromptConfig(per_task=config.prompts_per_task,
                                                                   init_high=config.prompt_init_high),
                       device=backend.device)


class CoLeCLIP(Strategy):
    Config = CoLeCLIPConfig
    needs_task_boundaries = True
    scores_image_views = True

    def __init__(self, backend, config: CoLeCLIPConfig) -> None:
        super().__init__(backend, config)
        backend.requires_grad_(False)
        self.prompts = _task_prompts(backend, config)
        self.text_lora = TextLoRA(backend, config.lora_rank, config.lora_projections)
        #: The stored embedding of every class name of the learned tasks (rows in ``vocabulary_names`` order).
        self.register_buffer("vocabulary", torch.zeros(0, backend.embed_dim, device=backend.device))
        self.vocabulary_names: list[str] = []
        #: The class names of each learned task, in task order.
        self.task_names: list[list[str]] = []
        self._training: dict | None = None  # the current task's rows, initial embeddings, negatives, steps

    # --- structure -------------------------------------------------------------------------------
    @property
    def learned_tasks(self) -> int:
        return len(self.task_names)

    def _row(self, name: str) -> int:
        return self.vocabulary_names.index(name)

    def restore_structure(self, completed) -> None:
        """The learned tasks' names, a vocabulary of the right shape and their prompts; the checkpoint
        then fills in the values."""
        self.task_names = [[class_text.name for class_text in task.classes] for task in completed]
        self.vocabulary_names = list(dict.fromkeys(name for names in self.task_names for name in names))
        self.vocabulary = torch.zeros(len(self.vocabulary_names), self.backend.embed_dim, device=self.backend.device)
        self.prompts.restore(len(completed))

    # --- training --------------------------------------------------------------------------------
    def before_task(self, task) -> None:
        names = [class_text.name for class_text in task.classes]
        if len(set(names)) != len(names):
            raise ConfigError(f"coleclip keeps one vocabulary entry per class name; task {task.name} names a "
                              "class twice")
        new = [class_text for class_text in task.classes if class_text.name not in self.vocabulary_names]
        if new:
            # The zero-shot start of a new name: the template ensemble through the frozen text tower.
            with torch.no_grad():
                started = class_text_features(self.backend, new, ensemble=True).float()
            self.vocabulary = torch.cat([self.vocabulary, started.to(self.vocabulary.device)])
            self.vocabulary_names.extend(class_text.name for class_text in new)
        rows = [self._row(name) for name in names]
        earlier = list(dict.fromkeys(name for task_names in self.task_names for name in task_names))
        negatives = [name for name in earlier if name not in names]
        column = {name: len(names) + position for position, name in enumerate(negatives)}
        label_names = names + negatives
        self._training = {
            "rows": rows,
            "initial": normalize(self.vocabulary[rows].clone()),
            "negative_rows": [self._row(name) for name in negatives],
            "task_columns": [[column[name] for name in task_names if name in column] for task_names in self.task_names],
            # Which task views may score each label (current + negatives) in stage 2: the tasks naming it.
            "allowed": torch.tensor([[name in task_names for task_names in [*self.task_names, names]]
                                     for name in label_names], dtype=torch.bool),
            "step": 0, "total_steps": None, "staged": None,
        }
        self.prompts.add_task()
        self.backend.requires_grad_(False)
        self.text_lora.attach()

    def begin_training(self, total_steps: int) -> None:
        if self._training is not None:
            self._training["total_steps"] = total_steps

    def stage(self, task) -> int:
        """1 or 2 at the current step (official: engine/trainer.py:491-495): stage 2 on a later task once
        the step index passes ``int(stage_step * total_steps)``; stage 1 when the total is unknown."""
        state = self._training
        if not self.task_names or self.config.stage_step is None or state is None:
            return 1
        total = state["total_steps"]
        return 2 if total is not None and state["step"] > int(self.config.stage_step * total) else 1

    def forward(self, batch, task):
        require_batch_kind(self, batch)
        if self._training is None:
            raise RuntimeError("coleclip: forward before before_task")
        state, config = self._training, self.config
        images, targets = batch["images"], batch["targets"]
        current = len(task.classes)
        outputs = self.backend.encode_image_with_task_prompts(images, self.prompts.prompts, config.prompts_per_task)
        class_token = normalize(outputs[:, 0])
        views = normalize((outputs[:, 1:] + outputs[:, :1]) / 2)  # [N, learned + 1, D]; the last is this task's
        lora_text = class_text_features(self.backend, task.classes, ensemble=False)
        stored = normalize(self.vocabulary[state["rows"]])
        text = normalize((stored + lora_text) / 2)
        regularizer = (text - state["initial"]).norm(dim=-1).mean()
        if self.training:
            state["staged"] = text.detach()  # the vocabulary follows it in after_step
        scale = self.backend.logit_scale.exp()
        stage = self.stage(task)
        if stage == 1:
            class_logits = scale * class_token @ text.t()
            view_logits = scale * views[:, -1] @ text.t()
            classification = (F.cross_entropy(class_logits, targets) + F.cross_entropy(view_logits, targets)) / 2
        else:
            labels = torch.cat([text, normalize(self.vocabulary[state["negative_rows"]])])
            class_logits = scale * class_token @ labels.t()
            view_logits = scale * best_view_scores(views, labels, state["allowed"].to(views.device))[0]
            mask = negative_label_mask(view_logits, current, state["task_columns"], config.negative_quantile, scale)
            classification = stage_two_loss(view_logits, class_logits, targets, current, mask)
        loss = classification + config.regularizer_weight * regularizer
        accuracy = (view_logits[:, :current].argmax(dim=-1) == targets).float().mean()
        return {"loss": loss, "classification": classification.detach(), "regularizer": regularizer.detach(),
                "stage": torch.tensor(float(stage)), "accuracy": accuracy.detach()}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        state = self._training
        if state is None:
            return
        if state["staged"] is not None:
            rows = state["rows"]
            self.vocabulary[rows] = momentum_update(self.vocabulary[rows], state["staged"], self.config.momentum)
            state["staged"] = None
        state["step"] += 1

    def after_task(self, task) -> None:
        self.text_lora.detach()
        self.task_names.append([class_text.name for class_text in task.classes])
        self._training = None

    # --- evaluation ----------------------------------------------------------------------------------
    def encode_image_views(self, images: torch.Tensor, task_index: int | None) -> torch.Tensor:
        """``[N, 1 + learned tasks, D]``: the class token (the zero-shot feature), then each learned
        task's view (the mean of its prompt's and the class token's outputs), normalised."""
        learned = self.learned_tasks
        if learned == 0:
            return normalize(self.backend.encode_image(images)).unsqueeze(1)
        prompts = self.prompts.prompts[: learned * self.config.prompts_per_task]
        outputs = self.backend.encode_image_with_task_prompts(images, prompts, self.config.prompts_per_task)
        return normalize(torch.cat([outputs[:, :1], (outputs[:, 1:] + outputs[:, :1]) / 2], dim=1))

    def class_views(self, classes, task_index: int | None) -> torch.Tensor:
        """View ``1 + t`` for the learned tasks ``t`` that name the class; the class token (view 0)
        for a class no learned task names."""
        allowed = torch.zeros(len(classes), 1 + self.learned_tasks, dtype=torch.bool)
        for row, class_text in enumerate(classes):
            for task, names in enumerate(self.task_names):
                allowed[row, 1 + task] = class_text.name in names
            allowed[row, 0] = not bool(allowed[row].any())
        return allowed

    def encode_classes(self, classes, task_index: int | None) -> torch.Tensor:
        """The vocabulary's embedding for a learned class name; the zero-shot template ensemble for any
        other class (the text tower is the frozen zero-shot one between tasks)."""
        if not classes:
            return torch.zeros(0, self.backend.embed_dim, device=self.backend.device)
        features = torch.zeros(len(classes), self.backend.embed_dim, device=self.backend.device)
        unseen = [row for row, class_text in enumerate(classes) if class_text.name not in self.vocabulary_names]
        if unseen:
            features[unseen] = class_text_features(self.backend, [classes[row] for row in unseen], ensemble=True).float()
        seen = [row for row in range(len(classes)) if row not in set(unseen)]
        if seen:
            features[seen] = normalize(self.vocabulary[[self._row(classes[row].name) for row in seen]])
        return features

    def _vocabulary_digest(self) -> str:
        digest = hashlib.sha256(repr((self.vocabulary_names, self.task_names)).encode())
        digest.update(self.vocabulary.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:24]

    def image_cache_key(self, task_index: int | None) -> str | None:
        # The views are the frozen image tower with the learned tasks' prompts: those identify them.
        key = super().image_cache_key(task_index)
        return f"{key}|coleclip-views|tasks={self.learned_tasks}|prompts={hash_module(self.prompts)}"

    def text_cache_key(self, task_index: int | None) -> str | None:
        backend = self.backend
        return (f"{backend.model_id}|coleclip|{hash_module(backend.text_tower, backend, 'text_tower')}"
                f"|vocabulary={self._vocabulary_digest()}")

    def final_report(self, stream, runtime) -> dict:
        """Parameter accounting: the prompts kept, the vocabulary, the LoRA size one task trained."""
        width = self.prompts.prompts.shape[-1] if self.prompts.prompts.numel() else 0
        return {"parameters": {"task_prompts": int(self.prompts.prompts.numel()),
                               "prompt_width": int(width),
                               "vocabulary_entries": len(self.vocabulary_names),
                               "vocabulary_values": int(self.vocabulary.numel())}}

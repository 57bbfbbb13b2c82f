"""The strategy contract.

A strategy is an ``nn.Module`` that owns the backend and whatever else the method needs (teachers,
adapters). The engine calls, per experience (a task, or an online stream): ``before_task`` ->
(optimizer over ``trainable_parameters()``) -> ``forward(batch, experience)`` for each micro-batch,
which returns losses -> ``after_step`` -> ``after_task``; then the evaluator calls ``encode_images`` /
``encode_classes``. A batch is a dict: ``images``, ``targets`` (indices into ``experience.classes``),
``labels`` (dataset labels), plus one entry per source the method declares in :meth:`sources`
(``replay``: replayed ``images`` with their ``classes``; a reference set: its ``images``). Methods
never call ``backward``, ``optimizer.step`` or ``torch.distributed``, and never open a dataset: the
engine does, so mixed precision, accumulation, data parallelism and data loading live in one place.
What a method needs from the engine (the runtime, the feature cache, its built sources) it finds on
``self.runtime``, ``self.feature_cache`` and ``self.source_data`` once :meth:`attach` has run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from clipcl.losses import normalize

if TYPE_CHECKING:
    from clipcl.data.streams import ClassText, Task
    from clipcl.models.base import Backend


@dataclass
class StrategyConfig:
    """Fields every strategy accepts."""

    name: str = ""
    """The strategy's name in ``STRATEGIES``."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError, with a one-line ``strategy.x must be ...`` message, on a bad value.
        Subclasses add their checks and call ``super().validate()``."""


def class_text_features(backend: Backend, classes: list[ClassText], ensemble: bool = True,
                        template: str | None = None) -> torch.Tensor:
    """One normalised text embedding per class.

    With ``ensemble`` (evaluation), each class is the normalised mean of its normalised prompt
    embeddings over all templates, as in the CLIP paper; without it (training), the first template.
    ``template`` (with ``ensemble=False``) replaces each class's first template by this one.
    """
    if not classes:  # an online stream before its first batch
        return torch.zeros(0, backend.embed_dim, device=backend.device)
    if not ensemble:
        return normalize(backend.encode_texts([(template or c.templates[0]).format(c.name) for c in classes]))
    prompts = [class_text.prompts() for class_text in classes]
    flat = [prompt for class_prompts in prompts for prompt in class_prompts]
    # Encode every prompt of every class in a few large batches, then average per class.
    encoded = normalize(torch.cat([backend.encode_texts(flat[start: start + 512])
                                   for start in range(0, len(flat), 512)]))
    features, start = [], 0
    for class_prompts in prompts:
        features.append(normalize(encoded[start: start + len(class_prompts)].mean(dim=0)))
        start += len(class_prompts)
    return torch.stack(features)


BATCH_KINDS = ("labels", "captions")
"""What a training batch holds: ``labels`` (``images``, ``targets``, ``labels``: a class stream) or
``captions`` (``images``, ``captions``, ``image_ids``: an image-caption stream, ``stream.protocol:
captions``)."""


def batch_kind(batch: dict) -> str:
    """``captions`` for an image-caption batch (its ``captions`` a list of strings), else ``labels``. A
    labelled batch may hold a *source* named ``captions`` (a dict of pairs, :class:`CaptionSpec`), which
    does not make it a caption batch."""
    return "captions" if isinstance(batch.get("captions"), (list, tuple)) else "labels"


def require_batch_kind(strategy: Strategy, batch: dict) -> str:
    """The batch's kind; raise ConfigError, one line, when ``strategy`` cannot train on it."""
    kind = batch_kind(batch)
    if kind not in strategy.batch_kinds:
        from clipcl.config import ConfigError

        name = strategy.config.name or type(strategy).__name__
        if kind == "captions":
            raise ConfigError(f"{name} trains on labelled (class) streams, not image-caption batches "
                              "(stream.protocol: captions); on captions use finetune, lwf, zscl or mod_x")
        raise ConfigError(f"{name} trains on image-caption streams (stream.protocol: captions); "
                          "this stream's batches have class labels")
    return kind


def hash_module(module: nn.Module, memo_on: nn.Module | None = None, memo_name: str = "") -> str:
    """A digest of every parameter and buffer of ``module``: equal digests mean equal weights.

    Hashing a large tower costs time, and the evaluator asks once per task per row, so the digest
    is memoised against each tensor's identity, storage, version counter, shape and dtype. Optimizer
    steps (for-loop or foreach), ``load_state_dict``, weight averaging and other in-place ops bump the
    version; ``param.data = x`` changes the storage, and the memo keeps the tensors it saw, so a freed
    storage's address cannot come back for a new one (tests/test_hash_memo.py). Not seen, so never
    done by clipcl between evaluations: in-place ops on ``param.data``, writes through a numpy or
    DLPack alias, the fused optimizer kernels (the trainer asks for ``fused=False``). The memo lives
    on ``module``, or on ``memo_on`` under ``memo_name`` for a view built anew at each call (an
    open_clip text tower).
    """
    state = sorted(module.state_dict(keep_vars=True).items())
    signature = tuple((name, id(tensor), tensor.data_ptr(), tensor._version, tensor.shape, tensor.dtype)
                      for name, tensor in state)
    holder, slot = (memo_on, f"_clipcl_digest_memo_{memo_name}") if memo_on is not None else (module, "_clipcl_digest_memo")
    memo = holder.__dict__.get(slot)
    if memo is not None and memo[0] == signature:
        return memo[1]
    digest = hashlib.sha256()
    for name, tensor in state:
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        # The buffer itself, not a bytes copy of it (the copy was 40% of the time on CPU).
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    result = digest.hexdigest()[:24]
    holder.__dict__[slot] = (signature, result, [tensor.detach() for _, tensor in state])
    return result


class Strategy(nn.Module):
    """Base strategy: zero-shot behaviour, no training. Subclasses override what they change."""

    Config = StrategyConfig
    #: Whether the method needs to be told where tasks start and end.
    needs_task_boundaries: bool = True
    #: The batch kinds :meth:`forward` trains on (:data:`BATCH_KINDS`); others raise one ConfigError line.
    batch_kinds: tuple[str, ...] = ("labels",)
    #: The run's image-feature cache (set by :meth:`attach`), for methods that encode datasets themselves.
    feature_cache = None
    #: The run's runtime (set by :meth:`attach`): cross-process sums and inner fits go through it.
    runtime = None
    #: Whether the evaluator scores each class with the best of several image views
    #: (:meth:`encode_image_views`, :meth:`class_views`) instead of one feature per image.
    scores_image_views: bool = False
    #: Whether :meth:`forward` reads a caption batch's ``images``; False (a method that trains on
    #: precomputed image features) lets the loader skip reading and transforming them.
    uses_training_images: bool = True

    def __init__(self, backend: Backend, config: StrategyConfig) -> None:
        super().__init__()
        self.backend = backend
        self.config = config
        self.source_data: dict = {}

    def sources(self) -> dict:
        """The batch sources this method needs, by name: ``clipcl.data.sources.ReferenceSpec`` or
        ``CaptionSpec``, or ``clipcl.data.memory.ReplaySpec`` (at most one replay memory, named ``replay``)."""
        return {}

    def attach(self, runtime, feature_cache, source_data: dict) -> None:
        """Called by the engine once, before the first experience: the runtime, the feature cache and
        the built sources (``ReferenceSource`` objects by name; the replay memory is the engine's)."""
        self.runtime = runtime
        self.feature_cache = feature_cache
        self.source_data = dict(source_data)

    # --- the loop's hooks ----------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        """Grow, freeze or snapshot before training on ``task``."""

    def forward(self, batch: dict, task: Task) -> dict[str, torch.Tensor]:
        """Return ``{"loss": scalar, ...}`` for a micro-batch of ``task`` (see the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} does not train")

    def begin_training(self, total_steps: int) -> None:
        """Called by the trainer once an experience's optimizer exists: the optimizer steps it plans
        (for methods whose loss changes partway through a task)."""

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (e.g. for weight averaging)."""

    def after_task(self, task: Task) -> None:
        """Consolidate, merge or calibrate after training on ``task``."""

    # --- online streams, for strategies with needs_task_boundaries = False -------------------------
    def on_new_classes(self, task: Task) -> None:
        """Online: ``task.classes`` (all classes seen so far) just grew."""

    def online_state(self) -> dict[str, torch.Tensor]:
        """Tensors outside the state dict that a mid-stream resume needs (e.g. a refreshed teacher)."""
        return {}

    def load_online_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`online_state` saved."""

    def restore_structure(self, completed: list[Task]) -> None:
        """Rebuild modules that earlier tasks added, before a checkpoint is loaded on resume."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def parameter_groups(self, parameters: list[nn.Parameter], weight_decay: float) -> list[dict] | None:
        """AdamW parameter groups for an experience's ``parameters`` (the trainer builds the optimizer:
        :class:`clipcl.engine.optimizers.RowScaledAdamW`, whose groups may scale rows); None: one
        group with ``train.weight_decay``."""

    def encode_captions(self, captions: list[str], language: str | None = None) -> torch.Tensor:
        """Unnormalised text features of captions in ``language`` (None: unknown) for retrieval; methods
        that tokenize some languages their own way (CLL-CLIP) override it."""
        return self.backend.encode_texts(captions)

    # --- evaluation ---------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor, task_index: int | None) -> torch.Tensor:
        """Normalised image features. ``task_index`` is None when the protocol gives no task id."""
        return normalize(self.backend.encode_image(images))

    def encode_classes(self, classes: list[ClassText], task_index: int | None) -> torch.Tensor:
        """Normalised class text features (prompt ensemble)."""
        return class_text_features(self.backend, classes, ensemble=True)

    def encode_images_routed(self, images: torch.Tensor, task_index: int | None
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image features and, for methods that route each image to one of several models, the route
        of each image (None: one model for all). The evaluator then scores each image against the
        class features of its own route (:meth:`encode_classes_routed`)."""
        return self.encode_images(images, task_index), None

    def encode_classes_routed(self, classes: list[ClassText], task_index: int | None, route: int) -> torch.Tensor:
        """Class text features as seen by the images routed to ``route``."""
        return self.encode_classes(classes, task_index)

    def encode_image_views(self, images: torch.Tensor, task_index: int | None) -> torch.Tensor:
        """For ``scores_image_views`` methods: ``[N, V, D]`` normalised features, ``V`` views of each
        image (``V`` fixed for a model state). The evaluator calls it instead of the routed path."""
        raise NotImplementedError(f"{type(self).__name__} has one image feature per image")

    def class_views(self, classes: list[ClassText], task_index: int | None) -> torch.Tensor:
        """For ``scores_image_views`` methods: a ``[C, V]`` bool tensor, which views may score each of
        ``classes`` (at least one per class); a class's score is the best of its allowed views."""
        raise NotImplementedError(f"{type(self).__name__} has one image feature per image")

    def final_report(self, stream, runtime) -> dict:
        """Method-specific facts for results.json (``strategy_report``), computed after the last task."""
        return {}

    def image_cache_key(self, task_index: int | None) -> str | None:
        """A key for cached image features, or None when they cannot be cached.

        The default image path is the backend's image tower alone, so its weights and the
        preprocessing identify the features.
        """
        backend = self.backend
        return f"{backend.model_id}|{backend.preprocess_id}|{hash_module(backend.image_tower, backend, 'image_tower')}"

    def text_cache_key(self, task_index: int | None) -> str | None:
        """A key for cached class text features (``encode_classes``), or None when they cannot be
        cached. The default: the model id and a digest of the text tower's weights (the tokenizer
        belongs to the model id); the evaluator adds the prompts and the numerics
        (:mod:`clipcl.eval.text_cache`). A subclass that overrides ``encode_classes`` must override
        this too, or its text features are not cached across rows."""
        backend = self.backend
        return f"{backend.model_id}|ensemble|{hash_module(backend.text_tower, backend, 'text_tower')}"

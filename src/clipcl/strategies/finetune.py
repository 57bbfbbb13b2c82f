"""Sequential fine-tuning: train on each task in turn with the CLIP classification loss.

The loss is cross-entropy over ``exp(logit_scale) * cos(image, class prompt)`` for the current task's
classes (one prompt per class, the dataset's first template, or ``template`` when set), as in the
fine-tuning baselines of ZSCL (Zheng et al. 2023). ``cross_entropy_on_probabilities`` applies it to
the softmax probabilities instead (LifeLong-CLIP's code, a double softmax; see the field). Which parameters train is a choice: the whole model, one tower, or named
parameters (any parameter whose name starts with one of the given prefixes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipcl.config import ConfigError
from clipcl.losses import (
    classification_loss,
    clip_logits,
    contrastive_loss,
    normalize,
    positive_pairs,
    retrieval_hits,
)
from clipcl.strategies.base import Strategy, StrategyConfig, class_text_features, require_batch_kind

PARTS = ("all", "image", "text")
LABEL_SPACES = ("task", "batch")
PEFT_KINDS = ("lora", "adapter")
"""Valid values of ``strategy.peft`` (the kinds of :func:`clipcl.adapt.inject`)."""
ADAPTER_PLACEMENTS = ("parallel", "sequential")
"""Valid values of ``strategy.adapter_placement``."""
LORA_QKV_INITS = ("zero_b", "xavier")
"""Valid values of ``strategy.lora_qkv_init``."""


@dataclass
class FinetuneConfig(StrategyConfig):
    train: str = "all"
    """``all``, ``image``, ``text``, or comma-separated parameter-name prefixes of the backend
    (e.g. ``image_projection,text_projection``); ``clipcl list --parameters`` shows the names."""
    train_logit_scale: bool = False
    """Also train the temperature (CLIP fine-tuning usually keeps it fixed)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy."""
    peft: str | None = None
    """Parameter-efficient tuning instead of training the weights themselves: ``lora`` or ``adapter``
    (clipcl's own modules, :mod:`clipcl.adapt`), injected into the towers ``train`` names (``all``:
    both). Only the added parameters train; the original weights stay frozen."""
    peft_targets: list[str] | None = None
    """Module-name patterns to inject into (None: the backend's own defaults for the chosen towers,
    its ``ADAPTATION_TARGETS`` table, ``backend.adaptation_targets(kind, towers)``)."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha (the update is multiplied by alpha / r)."""
    lora_shared_qkv_down: bool = False
    """LoRA: one down factor A shared by each attention's query, key and value projections
    (LifeLong-CLIP); false: separate factors per projection (Hu et al.)."""
    lora_qkv_init: str = "zero_b"
    """LoRA init of the query/key/value factors: ``zero_b`` (Kaiming A, zero B: the update starts at
    zero) or ``xavier`` (LifeLong-CLIP: both Xavier-uniform, so the model at step 0 is *not* the
    pretrained one). The output projection and other layers always start at zero."""
    adapter_bottleneck: int = 64
    """Adapters: width of the bottleneck."""
    adapter_scale: float = 0.1
    """Adapters: the adapter's output is multiplied by this."""
    adapter_dropout: float = 0.0
    """Adapters: dropout after the bottleneck's ReLU, while training."""
    adapter_placement: str = "parallel"
    """``parallel``: a :class:`~clipcl.adapt.adapter.ParallelAdapter` beside each block's MLP (He et al.
    2022). ``sequential``: LifeLong-CLIP's adapter, one per block applied to the attention output and
    to the MLP output, each time with its own residual, with a zero down bias (the backend's
    ``adapter_sequential`` targets; :class:`~clipcl.adapt.adapter.SequentialAdapter`)."""
    template: str | None = None
    """One prompt template (``"a bad photo of a {}."``) for every class, in training *and* evaluation
    (no template ensemble), as LifeLong-CLIP does. None: the dataset's first template in training and
    the ensemble of its templates in evaluation."""
    cross_entropy_on_probabilities: bool = False
    """Apply the cross-entropy to ``softmax(logits)`` instead of the logits: LifeLong-CLIP's code
    (``AdapterCLIP.forward`` returns probabilities, the trainer's ``CrossEntropyLoss`` softmaxes them
    again). Its gradient is much smaller and saturates. False: the paper's loss, CE on the logits."""
    label_space: str = "task"
    """The classes on the text side of the cross-entropy: ``task`` (the task's classes; in an online
    stream, every class seen so far) or ``batch`` (only the classes present in the batch, as SIT does,
    Wang et al. 2024)."""

    def validate(self) -> None:
        if self.adapter_placement not in ADAPTER_PLACEMENTS:
            raise ConfigError(f"strategy.adapter_placement must be one of {', '.join(ADAPTER_PLACEMENTS)}, "
                              f"got {self.adapter_placement!r}")
        if self.lora_qkv_init not in LORA_QKV_INITS:
            raise ConfigError(f"strategy.lora_qkv_init must be one of {', '.join(LORA_QKV_INITS)}, "
                              f"got {self.lora_qkv_init!r}")
        if not isinstance(self.adapter_dropout, (int, float)) or not 0.0 <= float(self.adapter_dropout) <= 1.0:
            raise ConfigError(f"strategy.adapter_dropout must be between 0 and 1, got {self.adapter_dropout!r}")
        if self.template is not None and (not isinstance(self.template, str) or self.template.count("{}") != 1):
            raise ConfigError(f"strategy.template must be a string with one '{{}}' for the class name, "
                              f"got {self.template!r}")
        if self.label_space not in LABEL_SPACES:
            raise ConfigError(f"strategy.label_space must be one of {', '.join(LABEL_SPACES)}, got {self.label_space!r}")
        if self.peft is not None:
            if self.peft not in PEFT_KINDS:
                raise ConfigError(f"strategy.peft must be one of {', '.join(PEFT_KINDS)} (or null), got {self.peft!r}")
            if self.train not in PARTS:
                raise ConfigError("strategy.train must be all, image or text when strategy.peft is set")
        super().validate()


def select_parameters(backend, train: str, train_logit_scale: bool) -> dict[str, torch.nn.Parameter]:
    """The backend parameters a fine-tuning choice trains, by name. Raises ValueError on a bad choice."""
    named = dict(backend.named_parameters())
    if train == "all":
        chosen = dict(named)
    elif train in ("image", "text"):
        tower = backend.image_tower if train == "image" else backend.text_tower
        tower_ids = {id(parameter) for parameter in tower.parameters()}
        chosen = {name: p for name, p in named.items() if id(p) in tower_ids}
    else:
        prefixes = [prefix.strip() for prefix in train.split(",") if prefix.strip()]
        chosen = {name: p for name, p in named.items() if any(name.startswith(prefix) for prefix in prefixes)}
        missing = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name in named)]
        if missing:
            examples = ", ".join(sorted({name.split(".")[0] for name in named}))
            raise ConfigError(f"strategy.train: no parameter starts with {missing[0]!r}; top-level names: {examples}")
    scale_id = id(backend.logit_scale)
    chosen = {name: p for name, p in chosen.items() if id(p) != scale_id}
    if train_logit_scale:
        chosen["logit_scale"] = backend.logit_scale
    return chosen


def inject_peft(backend, config: FinetuneConfig) -> dict[str, torch.nn.Parameter]:
    """Put LoRA or adapters into the towers ``config.train`` names; return the new parameters by name."""
    from clipcl.adapt import added_parameters, default_targets, inject

    towers = {"all": ("image", "text"), "image": ("image",), "text": ("text",)}[config.train]
    if config.peft == "lora":
        targets = config.peft_targets or default_targets(backend, "lora", towers)
        inject(backend, "lora", targets, rank=config.lora_rank, alpha=config.lora_alpha,
               shared_qkv_down=config.lora_shared_qkv_down, qkv_init=config.lora_qkv_init)
    elif config.adapter_placement == "parallel":
        targets = config.peft_targets or default_targets(backend, "adapter", towers)
        inject(backend, "adapter", targets, bottleneck=config.adapter_bottleneck, scale=config.adapter_scale,
               dropout=config.adapter_dropout)
    else:
        # LifeLong-CLIP (models/clip/model.py:257-281 @ bf20b82): one adapter per block, after the
        # attention and after the MLP, down bias zero (models/clip/adapter.py:42-47).
        targets = config.peft_targets or backend.adaptation_targets("adapter_sequential", towers)
        inject(backend, "adapter", targets, bottleneck=config.adapter_bottleneck, scale=config.adapter_scale,
               dropout=config.adapter_dropout, placement="sequential", shared_per_block=True, zero_down_bias=True)
    added = {id(parameter) for parameter in added_parameters(backend)}
    chosen = {name: parameter for name, parameter in backend.named_parameters() if id(parameter) in added}
    if config.train_logit_scale:
        chosen["logit_scale"] = backend.logit_scale
    return chosen


class Finetune(Strategy):
    Config = FinetuneConfig
    needs_task_boundaries = False  # usable on online streams (the whole stream is one "task")
    batch_kinds = ("labels", "captions")

    def __init__(self, backend, config: FinetuneConfig) -> None:
        super().__init__(backend, config)
        if config.peft is not None:
            chosen = inject_peft(backend, config)
        else:
            chosen = select_parameters(backend, config.train, config.train_logit_scale)
        chosen_ids = {id(parameter) for parameter in chosen.values()}
        for parameter in backend.parameters():
            parameter.requires_grad_(id(parameter) in chosen_ids)
        self.text_trains = any(
            parameter.requires_grad for parameter in backend.text_tower.parameters()
        )
        self._frozen_text_features: torch.Tensor | None = None

    def before_task(self, task) -> None:
        self._cache_frozen_text_features(task)

    def _cache_frozen_text_features(self, task) -> None:
        # A frozen text tower gives the same class features at every step: compute them once per
        # task (and again when an online stream's classes grow).
        self._frozen_text_features = None
        if not self.text_trains:
            with torch.no_grad():
                self._frozen_text_features = self.training_text_features(task.classes)

    def on_new_classes(self, task) -> None:
        self._cache_frozen_text_features(task)

    def task_text_features(self, task) -> torch.Tensor:
        if self._frozen_text_features is not None:
            return self._frozen_text_features
        return self.training_text_features(task.classes)

    def training_text_features(self, classes) -> torch.Tensor:
        """One normalised text embedding per class for the loss: ``template`` when set, else each
        class's first template."""
        return class_text_features(self.backend, classes, ensemble=False, template=self.config.template)

    def encode_classes(self, classes, task_index):
        """Evaluation: the template ensemble, or only ``template`` when set (LifeLong-CLIP evaluates
        with its one training prompt, ``models/adapter_clip.py:40,60,75-83`` @ bf20b82)."""
        if self.config.template is None:
            return super().encode_classes(classes, task_index)
        return class_text_features(self.backend, classes, ensemble=False, template=self.config.template)

    def text_cache_key(self, task_index):
        key = super().text_cache_key(task_index)
        return key if self.config.template is None else f"{key}|template={self.config.template!r}"

    def batch_label_space(self, task, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text features of the classes present in ``targets`` only, and the targets re-indexed into them."""
        present = torch.unique(targets)  # sorted
        if self._frozen_text_features is not None:
            features = self._frozen_text_features[present]
        else:
            features = self.training_text_features([task.classes[int(i)] for i in present])
        return features, torch.searchsorted(present, targets)

    # --- image-caption batches (stream.protocol: captions) -------------------------------------------
    def caption_features(self, captions) -> torch.Tensor:
        """Normalised student features of a batch's captions; under no_grad when the text tower is frozen."""
        if self.text_trains:
            return normalize(self.backend.encode_texts(list(captions)))
        with torch.no_grad():
            return normalize(self.backend.encode_texts(list(captions)))

    def caption_pass(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The student's normalised image and caption features of a caption batch, and the CLIP
        contrastive loss over them (every caption of the same image a positive)."""
        image_features = normalize(self.backend.encode_image(batch["images"]))
        text_features = self.caption_features(batch["captions"])
        loss = contrastive_loss(image_features, text_features, self.backend.logit_scale, batch.get("image_ids"))
        return image_features, text_features, loss

    @staticmethod
    def caption_accuracy(similarity: torch.Tensor, image_ids) -> torch.Tensor:
        """In-batch image -> caption retrieval accuracy (top-1 is a caption of the same image)."""
        positives = positive_pairs(image_ids, similarity.shape[0], similarity.device)
        return retrieval_hits(similarity.detach(), positives).float().mean()

    def forward(self, batch, task):
        if require_batch_kind(self, batch) == "captions":
            # Contrastive fine-tuning: CLIP's loss on the batch's pairs, as the "continual training"
            # baseline of Mod-X's code (Continual_Learning/continual_train_model.py:272-280 @ a6a2f6c).
            image_features, text_features, loss = self.caption_pass(batch)
            return {"loss": loss,
                    "accuracy": self.caption_accuracy(image_features @ text_features.t(), batch.get("image_ids"))}
        images, targets = batch["images"], batch["targets"]
        image_features = self.backend.encode_image(images)
        if self.config.label_space == "batch":
            text_features, targets = self.batch_label_space(task, targets)
        else:
            text_features = self.task_text_features(task)
        logits = clip_logits(image_features, text_features, self.backend.logit_scale)
        if self.config.cross_entropy_on_probabilities:
            # LifeLong-CLIP's loss (models/adapter_clip.py:90, methods/adapter_clip.py:96-97 @ bf20b82):
            # cross-entropy of the softmax probabilities, so the probabilities are softmaxed again.
            loss = classification_loss(logits.softmax(dim=-1), targets, self.config.label_smoothing)
        else:
            loss = classification_loss(logits, targets, self.config.label_smoothing)
        return {"loss": loss, "accuracy": (logits.argmax(dim=-1) == targets).float().mean().detach()}

    def after_task(self, task) -> None:
        self._frozen_text_features = None

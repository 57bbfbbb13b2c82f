"""ZSCL (Zheng et al., ICCV 2023, "Preventing Zero-Shot Transfer Degradation in Continual Learning of
Vision-Language Models"; code: Thunderbeee/ZSCL).

Two protections of the pretrained model's zero-shot ability, on top of the fine-tuning loss:

- **Feature space**: distillation from the frozen *zero-shot* model on a reference set that is
  neither the task's data nor labelled: reference images from another dataset and reference texts
  (here the class prompts of another dataset). The image-vs-text logits of the reference batch are
  distilled over the rows (image -> text) and over the columns (text -> image), T = 2.
- **Parameter space**: weight averaging during training. Every ``average_every`` optimizer steps
  the current weights are folded into a running average, which starts from the weights at the
  start of the task; the final weights are folded too (ZSCL folds at every multiple of 100 of its
  iterations 0..1000, the last at the final one); after the task the average replaces the weights (and the next task starts
  from it). ZSCL's script also adds an L2 penalty to the weights at the start of the task.

    loss = CE(current classes) + w * (KL_T(image -> text) + KL_T(text -> image)) + l2_weight * ||theta - theta_0||^2

On an image-caption stream (``stream.protocol: captions``) CLIP's contrastive loss over the batch's
pairs replaces the cross-entropy (clipcl's own form; ZSCL trains on classes); the reference
distillation and the weight averaging are unchanged.

Defaults follow the official MTIL script (``scripts/ZSCL.sh``: ``--image_loss --text_loss --we
--avg_freq 100 --l2 1``, ``--T`` 2); where the paper or the code differ, the field says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipcl.config import ConfigError
from clipcl.data.base import DataError
from clipcl.data.sources import PREPROCESSING, ReferenceSpec
from clipcl.losses import classification_loss, clip_logits, l2_drift, normalize, two_way_distillation_kl
from clipcl.strategies.base import require_batch_kind
from clipcl.strategies.finetune import Finetune, FinetuneConfig
from clipcl.strategies.teacher import Teacher


@dataclass
class ZSCLConfig(FinetuneConfig):
    label_smoothing: float = 0.2
    """Label smoothing of the cross-entropy: 0.2, as every run of ZSCL's MTIL scripts (``--ls 0.2``).
    ZSCL's optimiser settings (AdamW, weight decay 0, lr 1e-5 (5e-5 for Aircraft and MNIST), batch 64,
    1,000 iterations per task (its loop runs 1,001), cosine schedule after 100 warm-up steps, no
    gradient clipping) belong in the ``train`` section (``train.warmup_steps=100``,
    ``train.max_grad_norm`` off); configs/zscl.yaml's comments list them, its values are the offline
    benchmark's (docs/fidelity.md, A4)."""
    reference_dataset: str = "skimage_photos"
    """Registry name of the reference images (its train split). Must not be a task of the stream.
    ZSCL uses ImageNet, which clipcl cannot load offline; skimage_photos (17 everyday photos) is
    the offline stand-in. Any ``load_dataset`` name works (e.g. ``imagefolder:/path``)."""
    reference_samples: int | None = None
    """Keep at most this many reference images (a fixed, seeded subset); None keeps all."""
    reference_batch_size: int | None = None
    """Reference images per step; None uses the training batch's size, as ZSCL's code does."""
    reference_preprocess: str = "eval"
    """``eval`` (the backend's evaluation transform, as ZSCL's code uses for its reference images) or
    ``train`` (the training transform, with its random augmentation)."""
    reference_cache_mb: int = 1024
    """With ``eval`` preprocessing each reference image always gives the same tensor, so preprocessed
    images are kept in memory up to this many megabytes and reused at later steps (preprocessing on
    the training thread otherwise dominates the step on a GPU). 0 turns the cache off."""
    reference_texts_dataset: str = "cifar100"
    """Dataset whose class prompts (first template) are the reference texts: a name with class
    names in clipcl's resources, else any registry name. ZSCL's script uses Conceptual Captions
    sentences (not available offline); the paper also reports dataset class names as texts."""
    temperature: float = 2.0
    """Distillation temperature T (ZSCL's ``--T`` default 2); the KL is multiplied by T^2, as in ZSCL's
    ``distillation`` (a soft cross-entropy; the KL differs from it by the teacher's entropy only)."""
    distill_weight: float = 1.0
    """Weight of each distillation direction (1 in ZSCL's code unless ``--weight_adjust``: 0.5)."""
    text_to_image: bool = True
    """Also distil the text -> image direction (ZSCL's ``--text_loss``)."""
    distill_text_tower: bool = False
    """Encode the reference texts with the student's own text tower, so the distillation also trains
    the text tower. ZSCL's code encodes them with the frozen zero-shot model on both sides (False),
    so the distillation trains the image tower only."""
    l2_weight: float = 1.0
    """Weight of the squared distance (a sum over all trained weights) to the weights at the start
    of the task (ZSCL's script: ``--l2 1``). 0 turns it off."""
    weight_average: bool = True
    """Average the weights during training and keep the average after the task (ZSCL's ``--we``)."""
    average_every: int = 100
    """Fold the weights into the running average every this many steps, counting from step 0, and
    after the last step (ZSCL's ``--avg_freq 100``: 11 folds in a 1,000-iteration task)."""

    def validate(self) -> None:
        if self.reference_preprocess not in PREPROCESSING:
            raise ConfigError(f"strategy.reference_preprocess must be one of {', '.join(PREPROCESSING)}, "
                              f"got {self.reference_preprocess!r}")
        if self.temperature <= 0:
            raise ConfigError(f"strategy.temperature must be > 0, got {self.temperature}")
        for name in ("distill_weight", "l2_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"strategy.{name} must be >= 0, got {getattr(self, name)}")
        if self.average_every < 1:
            raise ConfigError(f"strategy.average_every must be >= 1, got {self.average_every}")
        if self.reference_cache_mb < 0:
            raise ConfigError(f"strategy.reference_cache_mb must be >= 0, got {self.reference_cache_mb}")
        for name in ("reference_samples", "reference_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"strategy.{name} must be >= 1 (or null), got {value}")
        if self.label_space != "task":
            raise ConfigError("strategy.label_space: zscl distils over the task's classes; only 'task' is supported")
        super().validate()


def dataset_of(task) -> str:
    """The registry name of a task's dataset (its training split's name)."""
    name = getattr(getattr(task, "train", None), "name", "") or task.name
    return name.split("[", 1)[0]


class ZSCL(Finetune):
    Config = ZSCLConfig
    needs_task_boundaries = True  # anchors and weight averaging restart at every task

    def __init__(self, backend, config: ZSCLConfig) -> None:
        super().__init__(backend, config)
        # The zero-shot teacher: copied now, before any training or checkpoint loading.
        self._zero_shot = Teacher(backend)
        self._reference_tokens: torch.Tensor | None = None
        self._teacher_text: torch.Tensor | None = None
        self._frozen_student_text: torch.Tensor | None = None
        self._started = False
        self._anchors: dict[str, torch.Tensor] = {}
        self._average: dict[str, torch.Tensor] = {}
        self._averaged = 0
        self._last_step: int | None = None
        self._last_fold: int | None = None

    # --- reference data (a source the engine builds, loads and draws per step) -----------------------
    def sources(self) -> dict:
        config = self.config
        return {"reference": ReferenceSpec(
            dataset=config.reference_dataset, samples=config.reference_samples,
            texts_dataset=config.reference_texts_dataset, batch_size=config.reference_batch_size,
            preprocess=config.reference_preprocess, cache_mb=config.reference_cache_mb)}

    def reference_text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) normalised features of the reference texts."""
        teacher = self._teacher_text
        if not self.config.distill_text_tower:
            return teacher, teacher
        if self._frozen_student_text is not None:
            return self._frozen_student_text, teacher
        return normalize(self.backend.encode_text(self._reference_tokens.to(self.backend.device))), teacher

    # --- task boundaries ------------------------------------------------------------------------
    def _trained(self) -> dict[str, torch.nn.Parameter]:
        return {name: parameter for name, parameter in self.backend.named_parameters() if parameter.requires_grad}

    def before_task(self, task) -> None:
        config = self.config
        if dataset_of(task) == config.reference_dataset:
            raise DataError(f"strategy.reference_dataset {config.reference_dataset!r} is also a task of the "
                            "stream; ZSCL's reference images must come from outside the stream")
        super().before_task(task)
        if self._reference_tokens is None:
            self._reference_tokens = self.backend.tokenize(self.source_data["reference"].texts)
        device = self.backend.device
        self._zero_shot.to(device)
        self._teacher_text = self._zero_shot.token_features(self._reference_tokens)
        self._frozen_student_text = None
        if config.distill_text_tower and not self.text_trains:
            with torch.no_grad():
                self._frozen_student_text = normalize(self.backend.encode_text(self._reference_tokens.to(device)))
        self._started = True
        trained = self._trained()
        self._anchors = ({name: parameter.detach().clone() for name, parameter in trained.items()}
                         if config.l2_weight > 0 else {})
        self._average = ({name: parameter.detach().clone() for name, parameter in trained.items()}
                         if config.weight_average else {})
        self._averaged = 1  # the running average starts as the weights at the start of the task
        self._last_step = self._last_fold = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self._last_step = step
        if not self._average or step % self.config.average_every:
            return
        self._fold()
        self._last_fold = step

    @torch.no_grad()
    def _fold(self) -> None:
        """Fold the current weights into the running mean of the weights."""
        count = self._averaged
        for name, parameter in self._trained().items():
            average = self._average[name]
            average.mul_(count / (count + 1)).add_(parameter.detach(), alpha=1.0 / (count + 1))
        self._averaged = count + 1

    @torch.no_grad()
    def after_task(self, task) -> None:
        super().after_task(task)
        if self._average and self._last_step is not None and self._last_fold != self._last_step:
            # The final weights join the mean too: ZSCL's loop runs iterations 0..1000 and folds at
            # every multiple of 100, the last at the final iteration (11 folds).
            self._fold()
        self._last_step = self._last_fold = None
        if self._average:
            for name, parameter in self._trained().items():
                parameter.copy_(self._average[name])
        self._average, self._anchors, self._averaged = {}, {}, 0
        self._teacher_text = self._frozen_student_text = None
        self._started = False

    # --- the loss -------------------------------------------------------------------------------
    def forward(self, batch, task):
        if not self._started:
            raise RuntimeError("ZSCL.forward called before before_task")
        captions = require_batch_kind(self, batch) == "captions"
        images, targets = batch["images"], batch.get("targets")
        config = self.config
        scale = self.backend.logit_scale
        if captions:  # an image-caption stream: CLIP's contrastive loss replaces the cross-entropy
            image_features, text_features, ce = self.caption_pass(batch)
            logits = clip_logits(image_features, text_features, scale)
        else:
            logits = clip_logits(self.backend.encode_image(images), self.task_text_features(task), scale)
            ce = classification_loss(logits, targets, config.label_smoothing)

        reference = batch["reference"]["images"]
        student_text, teacher_text = self.reference_text_features()
        student_logits = clip_logits(normalize(self.backend.encode_image(reference)), student_text, scale)
        teacher_logits = self._zero_shot.logits(self._zero_shot.image_features(reference), teacher_text)
        image_to_text, text_to_image = two_way_distillation_kl(student_logits, teacher_logits, config.temperature)
        distill = image_to_text + text_to_image if config.text_to_image else image_to_text
        loss = ce + config.distill_weight * distill
        # Logged as "distill": the KL, both directions summed. ZSCL prints the image-to-text soft
        # cross-entropy alone, which is larger by T^2 times the teacher's entropy (same gradient):
        # do not compare the two numbers.
        outputs = {"ce": ce.detach(), "distill": distill.detach()}
        if self._anchors:
            trained = self._trained()
            drift = l2_drift(list(trained.values()), [self._anchors[name] for name in trained])
            loss = loss + config.l2_weight * drift
            outputs["l2"] = drift.detach()
        outputs["accuracy"] = (self.caption_accuracy(logits, batch.get("image_ids")) if captions
                               else (logits.argmax(dim=-1) == targets).float().mean().detach())
        return {"loss": loss, **outputs}

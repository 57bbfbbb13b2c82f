"""VR-LwF: LwF with a replayed vocabulary of random texts (Ding et al. 2022, "Don't Stop Learning:
Towards Continual Learning for the CLIP Model", arXiv 2207.09248; code: yxding95/CL-CLIP).

Distilling only over the current task's class prompts (plain LwF) says nothing about the rest of
the text space. VR-LwF replays a *vocabulary* of pseudo-texts, random token sequences that need no
data, and distils the teacher's image-vs-pseudo-text logits on the current images::

    loss = CE(current classes) + alpha * (KL_T(teacher || student) over pseudo-texts
                                          + KL_T(teacher || student) over all seen classes' prompts)

The second KL (Ding et al.'s multi-step training, from the second task on) covers the prompts of
every class seen so far, the current task's included, as their code's ``lwf_mask`` does. The
teacher is the pretrained model during the first task and a frozen copy of the model after the
previous task later on, i.e. the model as it was when the task started.

Two variants:

- ``ding2022`` (default): a fresh vocabulary of P = 100 pseudo-texts for every batch, each
  ``[start, 8 random token ids, end, padding]``; alpha = 0.5, T = 1; the student encodes the
  pseudo-texts with its own text tower.
- ``zscl``: "LwF-VR" as ZSCL (Zheng et al. 2023) re-implemented it for its MTIL tables: 1,000
  random sequences of 10 tokens drawn once per task, T = 2 (KL scaled by T^2), distillation over
  the rows *and* the columns of the logit matrix, each with weight 1, no class-prompt term, and the
  pseudo-texts encoded by the frozen teacher only (so the term trains the image tower alone). The
  distillation sees its own batch of the current task's training images, drawn separately and
  taken with the evaluation transform (ZSCL's reference set is the current dataset), and the
  cross-entropy uses label smoothing 0.2 (``scripts/lwf_vr.sh``).

Every option can be overridden; ``None`` means "the variant's value".
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from clipcl.config import ConfigError
from clipcl.data.sources import CURRENT_TASK, ReferenceSpec
from clipcl.losses import classification_loss, clip_logits, distillation_kl, normalize
from clipcl.strategies.base import require_batch_kind
from clipcl.strategies.finetune import Finetune, FinetuneConfig
from clipcl.strategies.teacher import Teacher

VARIANTS: dict[str, dict[str, object]] = {
    # Ding et al.: pseudo_cls = 100, pseudo_length = 10 (start + 8 ids + end), --alpha 0.5,
    # LwF_KL(T=1), one direction, a new vocabulary per batch (get_PseudoCls in the training loop).
    "ding2022": {"alpha": 0.5, "temperature": 1.0, "pseudo_texts": 100, "pseudo_length": 8,
                 "resample_every_batch": True, "text_to_image": False, "seen_classes_kl": True,
                 "distill_text_tower": True, "distill_images": "batch", "label_smoothing": 0.0},
    # ZSCL's code: virtual_vocab(length=10, n_class=1000) once per run of a task, --T 2 (default),
    # --image_loss --text_loss (weight 1 each), reference texts encoded by the reference model,
    # --ref-dataset the current dataset (its own loader, test_preprocess), --ls 0.2.
    "zscl": {"alpha": 1.0, "temperature": 2.0, "pseudo_texts": 1000, "pseudo_length": 10,
             "resample_every_batch": False, "text_to_image": True, "seen_classes_kl": False,
             "distill_text_tower": False, "distill_images": "current_task", "label_smoothing": 0.2},
}
DISTILL_IMAGES = ("batch", "current_task")


@dataclass
class VRLwFConfig(FinetuneConfig):
    """Ding et al.'s optimiser settings (``main.py``): Adam, lr 1e-6, batch 100, 15 epochs, no label
    smoothing. They belong in the ``train`` section (AdamW with weight decay 0 is Adam). Their
    scheduler cuts the lr 10x after 10 epochs only in one-session runs (``vrd.py`` steps it in that
    branch only): ``train.lr_schedule=step train.lr_step_epochs=10``; multi-session runs keep the lr
    constant: ``train.lr_schedule=constant`` (docs/fidelity.md, A2). Ding also trains the logit scale
    (``train_logit_scale: true``, which configs/vr_lwf.yaml sets)."""

    variant: str = "ding2022"
    """``ding2022`` (the paper's method) or ``zscl`` (ZSCL's re-implementation, "LwF-VR")."""
    alpha: float | None = None
    """Weight of the distillation terms. ding2022: 0.5 (Ding et al.'s ``--alpha`` default, used for
    every method in their code); zscl: 1.0 (ZSCL adds each direction with weight 1)."""
    temperature: float | None = None
    """Softening temperature T; the KL is multiplied by T^2. ding2022: 1 (their ``LwF_KL`` has T = 1
    and no T^2); zscl: 2 (ZSCL's ``--T`` default, with T^2)."""
    pseudo_texts: int | None = None
    """Size P of the replayed vocabulary. ding2022: 100 (``pseudo_cls``); zscl: 1,000
    (``virtual_vocab(n_class=1000)``)."""
    pseudo_length: int | None = None
    """Random token ids per pseudo-text, between the start and end tokens. ding2022: 8 (their
    ``pseudo_length = 10`` counts the start and end tokens); zscl: 10."""
    resample_every_batch: bool | None = None
    """Draw a new vocabulary for every batch (ding2022) or once per task, in ``before_task`` (zscl)."""
    text_to_image: bool | None = None
    """Also distil the transposed pseudo-text logits (each pseudo-text over the batch's images).
    ding2022: no; zscl: yes."""
    seen_classes_kl: bool | None = None
    """From the second task on, add an LwF KL over the prompts of every class seen so far (current
    task included). ding2022: yes (multi-step training); zscl: no."""
    distill_text_tower: bool | None = None
    """Encode the pseudo-texts with the student's own text tower (ding2022) or take the teacher's
    pseudo-text features on both sides, so only the image tower gets the term's gradient (zscl, as
    ZSCL's code does)."""
    distill_images: str | None = None
    """The images the distillation sees: ``batch`` (the training batch itself, ding2022) or
    ``current_task`` (a separate batch of the current task's training images, drawn with its own
    seeded sampler and taken with the evaluation transform, zscl: ZSCL's ``--ref-dataset`` is the
    current dataset, read through ``test_preprocess``)."""
    distill_batch_size: int | None = None
    """``current_task``: images per distillation batch (None: the training batch's size, as ZSCL's
    reference loader uses ``--batch-size``)."""
    label_smoothing: float | None = None
    """Label smoothing of the cross-entropy. ding2022: 0 (Ding's code has none); zscl: 0.2
    (``--ls 0.2`` in ``scripts/lwf_vr.sh``)."""

    def validate(self) -> None:
        _resolved(self)  # checks the variant and the values it resolves to
        if self.label_space != "task":
            raise ConfigError("strategy.label_space: vr_lwf distils over the task's classes; only 'task' is supported")
        super().validate()


def random_token_texts(backend, count: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` random pseudo-texts as token ids ``LongTensor[count, context_length]``, built directly.

    Each row is ``[start token, length ids, end token, padding...]`` from the token facts the backend
    declares: ``sot_token_id``, ``eot_token_id``, ``pad_token_id``, ``context_length``, ``vocab_size``
    and ``special_token_ids`` (a missing start or end token is left out). The random ids are uniform
    over the vocabulary minus the special ids, so the text tower still finds the end where it is
    put: open_clip's CLIP pools at the largest id (CLIP's end token is the last id of its vocabulary), Hugging Face's CLIP at the first
    end token. Draws come from ``generator`` (CPU), so equal generator states give equal texts.
    """
    if count < 1 or length < 1:
        raise ValueError(f"need count >= 1 and length >= 1, got {count} and {length}")
    sot, eot, pad = backend.sot_token_id, backend.eot_token_id, backend.pad_token_id
    context = int(backend.context_length)
    needed = length + (sot is not None) + (eot is not None)
    if needed > context:
        raise ConfigError(f"{length} random tokens plus start/end need {needed} positions; the text tower "
                         f"takes {context}")
    vocabulary = int(backend.vocab_size)
    excluded = sorted(identifier for identifier in backend.special_token_ids if 0 <= identifier < vocabulary)
    allowed = vocabulary - len(excluded)
    if allowed < 1:
        raise ValueError("the vocabulary has no ordinary token ids")
    ids = torch.randint(0, allowed, (count, length), generator=generator)
    # Map [0, allowed) onto the vocabulary minus the excluded ids: step over each excluded id in
    # increasing order (a monotone bijection, so the draw stays uniform over the allowed ids).
    for identifier in excluded:
        ids += (ids >= identifier).long()
    tokens = torch.full((count, context), int(pad), dtype=torch.long)
    start = 0
    if sot is not None:
        tokens[:, 0] = int(sot)
        start = 1
    tokens[:, start: start + length] = ids
    if eot is not None:
        tokens[:, start + length] = int(eot)
    return tokens


def _resolved(config: VRLwFConfig) -> dict[str, object]:
    if config.variant not in VARIANTS:
        raise ConfigError(f"strategy.variant must be one of {', '.join(VARIANTS)}, got {config.variant!r}")
    values = dict(VARIANTS[config.variant])
    for field in fields(VRLwFConfig):
        if field.name in values and getattr(config, field.name) is not None:
            values[field.name] = getattr(config, field.name)
    for name in ("resample_every_batch", "text_to_image", "seen_classes_kl", "distill_text_tower"):
        if not isinstance(values[name], bool):
            raise ConfigError(f"strategy.{name}: expected true or false, got {values[name]!r}")
    if values["distill_images"] not in DISTILL_IMAGES:
        raise ConfigError(f"strategy.distill_images must be one of {', '.join(DISTILL_IMAGES)}, "
                          f"got {values['distill_images']!r}")
    if not 0.0 <= float(values["label_smoothing"]) < 1.0:
        raise ConfigError(f"strategy.label_smoothing must be in [0, 1), got {values['label_smoothing']}")
    if config.distill_batch_size is not None and config.distill_batch_size < 1:
        raise ConfigError(f"strategy.distill_batch_size must be >= 1 (or null), got {config.distill_batch_size}")
    if float(values["alpha"]) < 0:
        raise ConfigError(f"strategy.alpha must be >= 0, got {values['alpha']}")
    if float(values["temperature"]) <= 0:
        raise ConfigError(f"strategy.temperature must be > 0, got {values['temperature']}")
    if int(values["pseudo_texts"]) < 1 or int(values["pseudo_length"]) < 1:
        raise ConfigError("strategy.pseudo_texts and strategy.pseudo_length must be >= 1")
    return values


def _unique(classes) -> list:
    """Classes in first-seen order without repeats (two domains may share a class)."""
    return list(dict.fromkeys(classes))


class VRLwF(Finetune):
    batch_kinds = ("labels",)  # no caption path
    Config = VRLwFConfig
    needs_task_boundaries = True  # teacher, vocabulary and seen classes are rebuilt per task

    def __init__(self, backend, config: VRLwFConfig) -> None:
        settings = _resolved(config)
        super().__init__(backend, config)
        #: The variant's values with the config's overrides applied.
        self.settings = settings
        self._teacher: Teacher | None = None
        self._generator: torch.Generator | None = None
        self._seen: list = []  # classes of completed tasks, rebuilt by restore_structure on resume
        self._fixed_tokens: torch.Tensor | None = None
        self._fixed_teacher_text: torch.Tensor | None = None
        self._fixed_student_text: torch.Tensor | None = None
        self._old_classes: list = []
        self._teacher_class_text: torch.Tensor | None = None
        self._frozen_old_text: torch.Tensor | None = None

    def sources(self) -> dict:
        if self.settings["distill_images"] != "current_task":
            return {}
        # The evaluation transform is deterministic, so preprocessed images can be kept and reused.
        return {"current_images": ReferenceSpec(dataset=CURRENT_TASK, batch_size=self.config.distill_batch_size,
                                                preprocess="eval", cache_mb=1024)}

    # --- task boundaries ------------------------------------------------------------------------
    def restore_structure(self, completed) -> None:
        self._seen = _unique(class_text for task in completed for class_text in task.classes)

    def before_task(self, task) -> None:
        super().before_task(task)
        settings = self.settings
        self._teacher = None
        self._teacher = Teacher(self.backend)
        # Seeded from the global generator, which the run seeds per task: the same draws on resume
        # and on every process of a data-parallel run.
        self._generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self._fixed_tokens = self._fixed_teacher_text = self._fixed_student_text = None
        if not settings["resample_every_batch"]:
            self._fixed_tokens = self._draw_tokens()
            self._fixed_teacher_text = self._teacher.token_features(self._fixed_tokens)
            if settings["distill_text_tower"] and not self.text_trains:
                self._fixed_student_text = self._student_token_features(self._fixed_tokens)
        current = set(task.classes)
        self._old_classes = [c for c in self._seen if c not in current] if settings["seen_classes_kl"] else []
        self._teacher_class_text = self._frozen_old_text = None
        if self._old_classes:
            self._teacher_class_text = self._teacher.class_features(self._old_classes + list(task.classes), self.config.template)
            if not self.text_trains:
                with torch.no_grad():
                    self._frozen_old_text = self.training_text_features(self._old_classes)

    def after_task(self, task) -> None:
        super().after_task(task)
        self._seen = _unique([*self._seen, *task.classes])
        self._teacher = self._generator = None
        self._fixed_tokens = self._fixed_teacher_text = self._fixed_student_text = None
        self._teacher_class_text = self._frozen_old_text = None
        self._old_classes = []

    # --- pieces ---------------------------------------------------------------------------------
    def _draw_tokens(self) -> torch.Tensor:
        return random_token_texts(self.backend, int(self.settings["pseudo_texts"]),
                                  int(self.settings["pseudo_length"]), self._generator)

    def _student_token_features(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.text_trains:
            return normalize(self.backend.encode_text(tokens.to(self.backend.device)))
        with torch.no_grad():
            return normalize(self.backend.encode_text(tokens.to(self.backend.device)))

    def pseudo_text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) normalised features of this batch's pseudo-texts (draws when resampling)."""
        if self._fixed_tokens is not None:
            teacher = self._fixed_teacher_text
            if not self.settings["distill_text_tower"]:
                return teacher, teacher
            student = self._fixed_student_text
            return (student if student is not None else self._student_token_features(self._fixed_tokens)), teacher
        tokens = self._draw_tokens()
        teacher = self._teacher.token_features(tokens)
        if not self.settings["distill_text_tower"]:
            return teacher, teacher
        return self._student_token_features(tokens), teacher

    # --- the loss -------------------------------------------------------------------------------
    def forward(self, batch, task):
        require_batch_kind(self, batch)
        images, targets = batch["images"], batch["targets"]
        if self._teacher is None:
            raise RuntimeError("VRLwF.forward called before before_task")
        settings = self.settings
        temperature = float(settings["temperature"])
        scale = self.backend.logit_scale
        image_features = normalize(self.backend.encode_image(images))
        class_features = self.task_text_features(task)
        logits = clip_logits(image_features, class_features, scale)
        ce = classification_loss(logits, targets, float(settings["label_smoothing"]))

        if settings["distill_images"] == "current_task":
            # ZSCL's LwF-VR: the distillation terms see their own draw of the task's images.
            distilled = batch["current_images"]["images"]
            distilled_features = normalize(self.backend.encode_image(distilled))
        else:
            distilled, distilled_features = images, image_features
        teacher_images = self._teacher.image_features(distilled)
        student_pseudo, teacher_pseudo = self.pseudo_text_features()
        pseudo_logits = clip_logits(distilled_features, student_pseudo, scale)
        teacher_pseudo_logits = self._teacher.logits(teacher_images, teacher_pseudo)
        replay = distillation_kl(pseudo_logits, teacher_pseudo_logits, temperature)
        if settings["text_to_image"]:
            replay = replay + distillation_kl(pseudo_logits.t(), teacher_pseudo_logits.t(), temperature)

        seen = torch.zeros((), device=ce.device)
        if self._old_classes:
            old = self._frozen_old_text
            if old is None:
                old = self.training_text_features(self._old_classes)
            seen_logits = clip_logits(distilled_features, torch.cat([old, class_features]), scale)
            teacher_seen_logits = self._teacher.logits(teacher_images, self._teacher_class_text)
            seen = distillation_kl(seen_logits, teacher_seen_logits, temperature)

        loss = ce + float(settings["alpha"]) * (replay + seen)
        return {"loss": loss, "ce": ce.detach(), "replay": replay.detach(), "seen": seen.detach(),
                "accuracy": (logits.argmax(dim=-1) == targets).float().mean().detach()}

"""CLL-CLIP (Yang et al., AAAI 2024, "Embracing Language Inclusivity and Diversity in CLIP through
Continual Language Learning"; code: yangbang18/CLFM, ``projects/cll_clip`` @ 216e76c), with TEIR.

A stream of languages (``stream.protocol: languages``). For each new language a sub-word vocabulary
is trained on its training captions and merged into the text tower's (:mod:`clipcl.adapt.vocabulary`);
the token-embedding table grows by the new pieces. Everything is frozen except the token embeddings
(``trainable: embeddings``; ``text_tower`` and ``lora`` are the baselines that also train the whole
text tower or LoRA factors in it). The loss, for a caption ``c`` in the language, its English source
``e`` and its image ``x``, with ``T`` the frozen initial model::

    MSE(text(c), T.text(e))  +  0.01 * InfoNCE(text(c), T.image(x); learnable temperature from 0.07)

**TEIR** (``teir: true``, the default): new rows start from N(mean, std) of the current table (the
baseline: N(0, 0.02)), and AdamW scales each row's gradient and weight decay by ``used / frequency``:
``used`` whether the current language's captions contain the token, ``frequency`` 1 plus the earlier
languages that contained it (plus 1 for the original tokens); start and end tokens never move. The
baseline's plain AdamW decays every row, the ones the current language never uses included.

Teacher features are the frozen initial model's: images through its evaluation transform (no
augmentation; official: precomputed ``.npy`` features), English captions through its text tower,
computed once per language. Defaults are the official ones (docs/fidelity.md, CLL-CLIP); clipcl's own
choice is the tokenization routing described in :mod:`clipcl.adapt.vocabulary`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clipcl.adapt.vocabulary import LanguageVocabularies, backend_vocabulary
from clipcl.config import ConfigError
from clipcl.data.languages import BASE_LANGUAGE
from clipcl.strategies.base import Strategy, StrategyConfig, require_batch_kind
from clipcl.strategies.cll_clip_parts import (
    crosslingual_loss,
    crossmodal_loss,
    new_rows,
    parameter_groups,
    teir_scales,
    used_tokens,
)
from clipcl.strategies.teacher import Teacher

TRAINABLE = ("embeddings", "text_tower", "lora")


@dataclass
class CLLCLIPConfig(StrategyConfig):
    trainable: str = "embeddings"
    """``embeddings`` (CLL-CLIP: the token-embedding table only), ``text_tower`` (the whole text tower
    and the table) or ``lora`` (LoRA on the text tower's attention, and the table; CLFM's LoRA baseline
    inherits CLL-CLIP's trainable embeddings, methods.yaml:71-73)."""
    teir: bool = True
    """Token embedding initialisation and regularisation (methods.yaml:5-12); false: CLL-CLIP alone."""
    vocabulary_size: int = 10000
    """Pieces of each new language's tokenizer (prepare_new_tokenizers.py:23); a small corpus yields fewer."""
    new_row_std: float = 0.02
    """Without TEIR, new rows are drawn from N(0, new_row_std) (methods.yaml:25)."""
    crosslingual_weight: float = 1.0
    crossmodal_weight: float = 0.01
    temperature: float = 0.07
    """Start of the cross-modal temperature, learnable, reset every language (CLLoss.py:25,53-54)."""
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    adam_epsilon: float = 1e-6
    """AdamW's epsilon (train.py:131); it bounds how much TEIR's gradient scale survives Adam's normalisation."""
    lora_rank: int = 8
    lora_alpha: float = 16.0

    def validate(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"strategy.trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if not isinstance(self.vocabulary_size, int) or self.vocabulary_size < 1:
            raise ConfigError(f"strategy.vocabulary_size must be a positive integer, got {self.vocabulary_size!r}")
        if not 0 < self.temperature_min <= self.temperature <= self.temperature_max:
            raise ConfigError("strategy.temperature must lie in [temperature_min, temperature_max], both positive")
        for name in ("crosslingual_weight", "crossmodal_weight", "new_row_std", "adam_epsilon"):
            if getattr(self, name) < 0:
                raise ConfigError(f"strategy.{name} must be >= 0, got {getattr(self, name)}")
        super().validate()


class CLLCLIP(Strategy):
    Config = CLLCLIPConfig
    batch_kinds = ("captions",)
    uses_training_images = False  # the teacher's image features are computed once per image

    def __init__(self, backend, config: CLLCLIPConfig) -> None:
        super().__init__(backend, config)
        # The initial model, never saved (not a module of the strategy): rebuilt identically on resume.
        self.teacher = Teacher(backend)
        family, base = backend_vocabulary(backend)
        self.original_rows = int(backend.token_embedding_table().shape[0])
        self.vocabularies = LanguageVocabularies(family, base, self.original_rows)
        self.special = {int(identifier) for identifier in backend.special_token_ids}
        # Original tokens start at 2 (EmbeddingWrapper.py:81-90: +1 before the first language).
        self.register_buffer("token_frequency", torch.full((self.original_rows,), 2.0))
        self.temperature = nn.Parameter(torch.tensor(float(config.temperature)))
        if config.trainable == "lora":
            from clipcl.adapt import default_targets, inject

            inject(backend, "lora", default_targets(backend, "lora", ("text",)), rank=config.lora_rank,
                   alpha=config.lora_alpha)
        self.added_rows: dict[str, int] = {}
        """Rows each learned language added to the table."""
        self._training: dict | None = None
        self._image_features: dict[str, torch.Tensor] = {}

    # --- vocabulary ----------------------------------------------------------------------------
    def _grow(self, task) -> None:
        """Give ``task``'s language its vocabulary and the table its new rows (English keeps the original)."""
        language = task.language
        if language == BASE_LANGUAGE or language in self.vocabularies:
            return
        pieces = self.vocabularies.add_language(language, task.train.captions, self.config.vocabulary_size)
        self.added_rows[language] = len(pieces)
        if pieces:
            rows = new_rows(self.backend.token_embedding_table(), len(pieces), self.config.teir, self.config.new_row_std)
            self.backend.extend_token_embedding(rows.to(self.backend.device))
        self.token_frequency = torch.cat([self.token_frequency, torch.ones(len(pieces), device=self.token_frequency.device)])

    def restore_structure(self, completed) -> None:
        for task in completed:
            self._grow(task)

    def tokenize(self, captions, language: str | None) -> torch.Tensor:
        return self.vocabularies.tokenize(self.backend, captions, language).to(self.backend.device)

    def encode_captions(self, captions, language: str | None = None) -> torch.Tensor:
        return self.backend.encode_text(self.tokenize(captions, language))

    def _table_parameters(self) -> list[nn.Parameter]:
        module = self.backend.token_embedding_site().module
        return [module.base.weight, module.added] if hasattr(module, "added") else [module.weight]

    # --- the loop's hooks ------------------------------------------------------------------------
    def before_task(self, task) -> None:
        language = getattr(task, "language", None)
        if language is None:
            raise ConfigError("cll_clip trains on a language stream (stream.protocol: languages)")
        if any(english is None for english in task.train.english):
            raise ConfigError(f"cll_clip: {task.train.name} has captions without an English source; its "
                              "cross-lingual loss needs translated pairs (tuxpaint, COCO-36 triplets)")
        self._grow(task)
        self.backend.requires_grad_(False)
        table = self._table_parameters()
        if self.config.trainable == "text_tower":
            self.backend.text_tower.requires_grad_(True)
        elif self.config.trainable == "lora":
            from clipcl.adapt import added_parameters

            for parameter in added_parameters(self.backend.text_tower):
                parameter.requires_grad_(True)
        for parameter in table:
            parameter.requires_grad_(True)
        with torch.no_grad():
            self.temperature.fill_(self.config.temperature)
        self.temperature.requires_grad_(True)
        ids = self.tokenize(task.train.captions, language).tolist()
        used = used_tokens(ids, int(self.token_frequency.shape[0]), self.special)
        self._training = {"used": used, "english": self._teacher_texts(task.train.english),
                          "images": self._teacher_images(task.train)}

    @torch.no_grad()
    def _teacher_texts(self, captions) -> dict[str, torch.Tensor]:
        unique = sorted(set(captions))
        teacher = self.teacher.to(self.backend.device).backend
        features = torch.cat([teacher.encode_texts(unique[start: start + 256]).float()
                              for start in range(0, len(unique), 256)])
        return dict(zip(unique, features))

    @torch.no_grad()
    def _teacher_images(self, pairs) -> dict[int, torch.Tensor]:
        """Teacher image features by ``pairs``' image id, memoised by image key across languages."""
        teacher = self.teacher.to(self.backend.device).backend
        missing = [image for image, key in enumerate(pairs.image_keys) if key not in self._image_features]
        for start in range(0, len(missing), 64):
            chunk = missing[start: start + 64]
            pixels = torch.stack([teacher.preprocess(pairs.load_image(image)) for image in chunk])
            for image, feature in zip(chunk, teacher.encode_image(pixels.to(self.backend.device)).float()):
                self._image_features[pairs.image_keys[image]] = feature
        return {image: self._image_features[key] for image, key in enumerate(pairs.image_keys)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def parameter_groups(self, parameters, weight_decay: float) -> list[dict]:
        table = [parameter for parameter in self._table_parameters() if parameter.requires_grad]
        table_ids = {id(parameter) for parameter in table}
        others = [parameter for parameter in parameters if id(parameter) not in table_ids]
        scales = None
        if self.config.teir and self._training is not None:
            all_scales = teir_scales(self._training["used"], self.token_frequency.cpu(), self.special)
            scales = [all_scales[: self.original_rows], all_scales[self.original_rows:]][: len(table)]
        return parameter_groups(table, scales, others, weight_decay, self.config.adam_epsilon)

    def forward(self, batch, task):
        require_batch_kind(self, batch)
        state = self._training
        if state is None:
            raise RuntimeError("cll_clip: forward before before_task")
        device = self.backend.device
        students = self.encode_captions(batch["captions"], task.language).float()
        english = torch.stack([state["english"][caption] for caption in batch["english_captions"]]).to(device)
        images = torch.stack([state["images"][int(image)] for image in batch["image_ids"]]).to(device)
        with torch.no_grad():
            self.temperature.clamp_(self.config.temperature_min, self.config.temperature_max)
        crosslingual = crosslingual_loss(students, english)
        crossmodal = crossmodal_loss(students, images, self.temperature, batch["image_ids"].to(device))
        loss = self.config.crosslingual_weight * crosslingual + self.config.crossmodal_weight * crossmodal
        return {"loss": loss, "crosslingual": crosslingual.detach(), "crossmodal": crossmodal.detach(),
                "temperature": self.temperature.detach().clone()}

    def after_task(self, task) -> None:
        if self._training is not None:
            used = self._training["used"].to(self.token_frequency.device)
            self.token_frequency = self.token_frequency + used.float()  # one more language has these tokens
        self._training = None

    def final_report(self, stream, runtime) -> dict:
        return {"vocabulary": {"family": self.vocabularies.family, "original_rows": self.original_rows,
                               "rows": int(self.backend.token_embedding_table().shape[0]),
                               "added_rows": dict(self.added_rows)}}

"""The one small interface every model backend implements.

Strategies talk only to :class:`Backend`; they never import open_clip or transformers.
A backend is an ``nn.Module`` holding two towers and a temperature:

- ``tokenize(texts) -> LongTensor`` turns strings into the text tower's input ids.
- ``encode_image(images) -> Tensor[B, D]`` and ``encode_text(tokens) -> Tensor[N, D]`` return
  *unnormalised* embeddings in the shared space; callers normalise.
- ``logit_scale`` is the learnable log-temperature (CLIP's ``logit_scale``); use ``logit_scale.exp()``.
- ``preprocess`` maps a PIL image to the evaluation tensor; ``train_preprocess`` the training one.
- ``image_tower`` / ``text_tower`` are the sub-modules holding each tower's parameters, and
  ``image_blocks()`` / ``text_blocks()`` list their repeated blocks (for adapters and prompts).
- Token facts: ``context_length``, ``sot_token_id``, ``eot_token_id``, ``pad_token_id``,
  ``special_token_ids`` and ``vocab_size``, for methods that build token ids themselves (VR-LwF).
- The token-embedding table: ``token_embedding_site()`` (where it is), ``token_embedding_table()``
  (its rows), ``embed_tokens(tokens)``, ``extend_token_embedding(rows)`` (new ids after the old ones)
  and ``encode_text_embeddings(embeddings, tokens)`` (the text tower from given token embeddings).
- Adaptation: ``adaptation_targets(kind, towers)`` gives a backend's default module-name patterns for
  LoRA and adapters (from its own ``ADAPTATION_TARGETS`` table); ``adaptation_sites(kind, towers)``
  the places it declares for kinds that need more than a name (MoE mixtures, prompt tokens). The
  code in :mod:`clipcl.adapt` never names a backend's internals; only the backends do.
- Per-task prompts (CoLeCLIP): ``encode_image_with_task_prompts(images, prompts, per_task)`` and
  ``image_token_width``; towers without them raise one ConfigError line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from clipcl.config.schema import ConfigError
from clipcl.engine.compute import counted

TOWERS = ("image", "text")
COUNTED_ENCODERS = {"encode_image": "image", "encode_image_with_task_prompts": "image", "encode_text": "text",
                    "encode_text_embeddings": "text"}
"""The encoders whose calls count tower passes (:mod:`clipcl.engine.compute`), by tower."""


@dataclass
class Site:
    """One place for an adaptation module: ``parent.<attribute>`` gets wrapped.

    ``name`` is the module's dotted name under the backend (for messages and patterns). The other
    fields are what a backend declares for kinds that need them: ``width`` (the feature width the
    module works at), ``layout`` (``bld`` batch-first sequence, ``lbd`` sequence-first, ``bchw``
    feature map), ``input_from`` (a module whose *input* is the stream to read, when the wrapped
    module only sees a transformed copy: the pre-norm residual stream reaches an MLP through its
    norm) and ``keep_first`` (prompt tokens go after this many leading tokens, a class token).
    """

    tower: str
    name: str
    parent: nn.Module
    attribute: str
    width: int | None = None
    layout: str = "bld"
    input_from: nn.Module | None = None
    keep_first: int = 0

    @property
    def module(self) -> nn.Module:
        """The module at the site now (a wrapper once one is attached)."""
        return getattr(self.parent, self.attribute)


class Backend(nn.Module):
    """Base class for model backends. Subclasses fill in the towers and the methods below."""

    #: Short backend name, written to results.json.
    backend_name: str = "base"
    #: Default module-name patterns per adaptation kind (``lora``, ``adapter``) and tower, over the
    #: backend's own module names; each backend fills in its table.
    ADAPTATION_TARGETS: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every backend's encoders count the samples they encode, teachers' copies included, without
        # each backend remembering to (compute accounting, clipcl.engine.compute).
        super().__init_subclass__(**kwargs)
        for name, tower in COUNTED_ENCODERS.items():
            method = cls.__dict__.get(name)
            if method is not None and not hasattr(method, "counts_tower"):
                setattr(cls, name, counted(tower, method))

    def __init__(self) -> None:
        super().__init__()
        self.preprocess: Callable = lambda image: image
        self.train_preprocess: Callable = lambda image: image
        #: A string that identifies the preprocessing; part of the image-feature cache key.
        self.preprocess_id: str = ""
        #: A string naming the architecture and weights; part of checkpoint compatibility checks.
        self.model_id: str = ""

    # --- the towers -------------------------------------------------------------------------
    @property
    def image_tower(self) -> nn.Module:
        raise NotImplementedError

    @property
    def text_tower(self) -> nn.Module:
        raise NotImplementedError

    def image_blocks(self) -> list[nn.Module]:
        """The repeated blocks of the image tower, input side first."""
        raise NotImplementedError

    def text_blocks(self) -> list[nn.Module]:
        """The repeated blocks of the text tower, input side first."""
        raise NotImplementedError

    def block_token_layout(self, tower: str) -> str:
        """How a transformer block of ``tower`` lays out its input: ``bld`` (batch, length, width;
        the default) or ``lbd`` (length first). Adapters that route on the first token need it."""
        return "bld"

    # --- encoding ---------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def logit_scale(self) -> nn.Parameter:
        raise NotImplementedError

    # --- facts about the tokenizer, used by methods that invent texts (VR-LwF) ----------------
    @property
    def vocab_size(self) -> int:
        """Ids of the tokenizer's vocabulary: every id below this is a valid input."""
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def context_length(self) -> int:
        """Tokens per text: ``tokenize`` pads or truncates to this length."""
        raise NotImplementedError

    @property
    def sot_token_id(self) -> int | None:
        """The start-of-text token (None for tokenizers without one, such as SigLIP's)."""
        raise NotImplementedError

    @property
    def eot_token_id(self) -> int | None:
        """The end-of-text token."""
        raise NotImplementedError

    @property
    def pad_token_id(self) -> int:
        """The id filling a text after its end token."""
        raise NotImplementedError

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that are never ordinary text: start, end and pad, and the tokenizer's other special ids
        (BERT's unknown and mask tokens)."""
        ids = {self.sot_token_id, self.eot_token_id, self.pad_token_id}
        extra = getattr(getattr(self, "tokenizer", None), "all_special_ids", None) or []
        ids.update(identifier for identifier in extra if isinstance(identifier, int))
        return frozenset(identifier for identifier in ids if identifier is not None)

    # --- the token-embedding table ------------------------------------------------------------
    def token_embedding_site(self) -> Site:
        """Where the text tower's id -> vector table sits (an ``nn.Embedding``, or the
        :class:`~clipcl.adapt.tokens.ExpandableEmbedding` that replaced it)."""
        raise NotImplementedError(f"{type(self).__name__} does not declare its token-embedding table")

    def token_embedding_table(self) -> torch.Tensor:
        """The table's rows, ``[rows, width]``: the original ones, then any added ones."""
        module = self.token_embedding_site().module
        return module.table() if hasattr(module, "table") else module.weight

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The token embeddings of ``tokens`` ``[N, L] -> [N, L, width]``, before any position embedding."""
        return self.token_embedding_site().module(tokens)

    def extend_token_embedding(self, rows: torch.Tensor) -> range:
        """Add ``rows`` ``[count, width]`` to the token-embedding table; returns their new ids, which
        follow every existing id. The existing rows keep their values and their trainability."""
        from clipcl.adapt.tokens import extend_embedding_at

        return extend_embedding_at(self.token_embedding_site(), rows)

    def encode_text_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Encode texts from their token embeddings ``[N, L, width]`` (learnt prompt vectors, new
        words); ``tokens`` ``[N, L]`` still give the positions the tower reads from ids (where it
        pools, which positions are padding). With ``embeddings = embed_tokens(tokens)`` this is
        ``encode_text(tokens)`` bit for bit: the same code runs, with the table's output replaced."""
        return self._encode_text_replacing_embeddings(embeddings, tokens)

    def _encode_text_replacing_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor,
                                          encode: Callable[[torch.Tensor], torch.Tensor] | None = None
                                          ) -> torch.Tensor:
        """``encode(tokens)`` (default ``encode_text``) with the token table's output replaced by ``embeddings``."""
        module = self.token_embedding_site().module

        def replace(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            if output.shape != embeddings.shape:
                raise ValueError(f"encode_text_embeddings: embeddings have shape {tuple(embeddings.shape)}, "
                                 f"the tokens' embeddings {tuple(output.shape)}")
            return embeddings.to(output.dtype)

        handle = module.register_forward_hook(replace)
        try:
            return (encode or self.encode_text)(tokens)
        finally:
            handle.remove()

    # --- per-task prompt tokens (CoLeCLIP) ----------------------------------------------------------
    @property
    def image_token_width(self) -> int:
        """The width of the vectors :meth:`encode_image_with_task_prompts` takes as prompts (a ViT's
        token width; the starter's feature-map channels)."""
        raise ConfigError(f"task prompts: the {type(self).__name__} image tower takes no per-task prompts")

    def encode_image_with_task_prompts(self, images: torch.Tensor, prompts: torch.Tensor,
                                       per_task: int = 1) -> torch.Tensor:
        """The image tower with per-task prompt tokens, ``[N, 1 + T, D]``, projected and unnormalised.

        ``prompts`` is ``[T * per_task, image_token_width]``, task 0's group first
        (:attr:`clipcl.adapt.TaskPrompts.prompts`). Index 0 is the class-token feature, equal to
        ``encode_image(images)`` bit for bit, whatever the prompts hold; index ``1 + t`` is task ``t``'s
        output, the mean over its group's ``per_task`` tokens. In a ViT the prompts enter before the
        pre-norm without a position embedding; a prompt of task ``j`` attends to the prompts of tasks
        ``0..j`` and to the class and patch tokens, which attend to no prompt (CoLeCLIP's mask;
        :mod:`clipcl.models.task_prompt_towers`). Combining the class and prompt outputs is the
        strategy's business. Towers that cannot take prompts raise one ConfigError line.
        """
        raise ConfigError(f"task prompts: the {type(self).__name__} image tower takes no per-task prompts")

    # --- adaptation ------------------------------------------------------------------------------
    def adaptation_targets(self, kind: str, towers: Sequence[str] = TOWERS) -> list[str]:
        """This backend's default module-name patterns for ``kind`` (``lora``, ``adapter``) in ``towers``."""
        table = type(self).ADAPTATION_TARGETS
        if kind not in table:
            known = ", ".join(table) or "none"
            raise ConfigError(f"{type(self).__name__} has no default targets for {kind!r}; known: {known}")
        if isinstance(towers, str) or not towers or any(tower not in table[kind] for tower in towers):
            raise ConfigError(f"adaptation targets: towers must be a list of 'image'/'text', got {towers!r}")
        return [pattern for tower in towers for pattern in table[kind][tower]]

    def adaptation_sites(self, kind: str, towers: Sequence[str] = TOWERS) -> list[Site]:
        """The places this backend declares for ``kind`` (``moe``: beside each block; ``prompts``:
        where the image tower's token sequence can grow) in ``towers``, input side first."""
        raise ConfigError(f"{type(self).__name__} declares no sites for {kind!r}")

    def module_names(self) -> dict[int, str]:
        """``id(module) -> dotted name`` of every sub-module (the first name of a shared one)."""
        names: dict[int, str] = {}
        for name, module in self.named_modules():
            names.setdefault(id(module), name)
        return names

    # --- conveniences built on the above -------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenize and encode a list of strings on the model's device."""
        return self.encode_text(self.tokenize(texts).to(self.device))


# --- site helpers shared by backends (they name architectures, so they live on the backend side) -------


for _name, _tower in COUNTED_ENCODERS.items():  # the base class's own encoders (encode_text_embeddings)
    setattr(Backend, _name, counted(_tower, Backend.__dict__[_name]))


def is_bert_layer(block: nn.Module) -> bool:
    """A transformers BERT-like encoder layer (attention, intermediate and output parts)."""
    return all(hasattr(block, part) for part in ("attention", "intermediate", "output"))


def whole_layer_site(tower: str, layer: nn.Module, names: dict[int, str], root: nn.Module,
                     width: int | None = None, layout: str = "bld") -> Site:
    """A site beside a whole layer (its item in a ``ModuleList``), for layers without a pre-norm stream
    to read: BERT normalises after the residual sum inside its feed-forward module, so the mixture's
    input and output are the layer's. ``width`` defaults to a BERT layer's output width."""
    name = names[id(layer)]
    parent_name, _, attribute = name.rpartition(".")
    parent = root.get_submodule(parent_name)
    if width is None:
        width = int(layer.output.dense.out_features)
    return Site(tower, name, parent, attribute, width=width, layout=layout)

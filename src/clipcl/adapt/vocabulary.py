"""New-language vocabularies for a text tower (CLL-CLIP's growing tokenizer), one per language.

For each new language a sub-word tokenizer of the backend's own family is trained on that language's
training captions with Hugging Face ``tokenizers`` (CLL-CLIP trains 10,000 tokens a language:
official scripts/prepare_new_tokenizers.py:23), then merged into one id space: a piece that the
backend's vocabulary or an earlier language already has keeps that id (so languages share rows for
shared pieces), every other piece gets the next id after all existing ones, and the token-embedding
table grows by those rows (:meth:`clipcl.models.base.Backend.extend_token_embedding`).

**Routing (clipcl's choice, not the official one).** A caption is tokenized by its language's own
tokenizer, its pieces mapped into the shared ids; a language without a vocabulary of its own (English,
and any language not learned yet) uses the backend's tokenizer unchanged. So English tokenization is
the original one by construction. CLL-CLIP instead merges every vocabulary into one BPE tokenizer with
the old merges ranked first (official clfm/utils/op_tokenizer.py:148-165), which almost always leaves
English as it was but does not promise it; routing needs each caption's language, which every
multilingual set here carries. docs/fidelity.md (CLL-CLIP) records it.

**Families.** ``wordpiece`` (BERT-style: the starter's MiniLM): new vocabularies normalise by NFC and
lower-case **without** stripping accents or combining marks (the starter's own uncased tokenizer
strips them, which would merge e.g. Turkish ``ı``/``i`` or drop Devanagari vowel signs), split on
whitespace and punctuation, ``##`` marks a word's continuation, as the backend's. ``clip_bpe`` (open_clip's
SimpleTokenizer, Hugging Face's CLIPTokenizer): byte-level BPE with CLIP's ``</w>`` word ends and
CLIP's pre-tokenizing pattern, normalised NFC and lower-cased, as CLL-CLIP's tokenizers are (they are
trained from CLIP's fast tokenizer, whose normaliser is NFC + lowercase).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from clipcl.config.schema import ConfigError

FAMILIES = ("wordpiece", "clip_bpe")
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
"""CLIP's pre-tokenizing pattern (open_clip tokenizer.py; transformers' CLIPConverter)."""
WORDPIECE_UNKNOWN = "[UNK]"


def backend_vocabulary(backend) -> tuple[str, dict[str, int]]:
    """The family and the piece -> id map of ``backend``'s tokenizer; one ConfigError line for others."""
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "encoder") and hasattr(tokenizer, "bpe_ranks"):
        return "clip_bpe", dict(tokenizer.encoder)  # open_clip's SimpleTokenizer
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    kind = type(model).__name__
    if kind == "WordPiece":
        return "wordpiece", dict(tokenizer.get_vocab())
    if kind == "BPE" and getattr(model, "end_of_word_suffix", None) == "</w>":
        return "clip_bpe", dict(tokenizer.get_vocab())
    raise ConfigError(f"new-language vocabularies: the {type(backend).__name__} tokenizer "
                      f"({type(tokenizer).__name__}) is neither BERT WordPiece nor CLIP BPE")


def _pipeline(family: str):
    """The normaliser and pre-tokenizer of a new vocabulary of ``family``."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if family == "wordpiece":
        normalizer = normalizers.Sequence([
            normalizers.NFC(),
            normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True)])
        return normalizer, pre_tokenizers.BertPreTokenizer()
    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                       normalizers.Lowercase()])
    splitter = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return normalizer, splitter


def _join_wordpiece(left: str, right: str) -> str:
    return left + right[2:]


def train_tokenizer(texts: Sequence[str], family: str, size: int):
    """A ``tokenizers.Tokenizer`` of ``family`` with at most ``size`` pieces, trained on ``texts`` by
    :func:`clipcl.adapt.subword_training.learn_merges` (deterministic; the ``tokenizers`` trainers are not)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from clipcl.adapt.subword_training import learn_merges, word_counts

    if family not in FAMILIES:
        raise ConfigError(f"vocabulary family must be one of {', '.join(FAMILIES)}, got {family!r}")
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ConfigError("a new-language vocabulary needs at least one non-empty training caption")
    normalizer, splitter = _pipeline(family)
    words = [word for text in texts for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))]
    if family == "wordpiece":
        counts = word_counts(words, lambda word: [word[0], *(f"##{character}" for character in word[1:])])
        alphabet = sorted({symbol for symbols in counts for symbol in symbols})
        merges = learn_merges(counts, max(0, size - 1 - len(alphabet)), _join_wordpiece)
        pieces = [WORDPIECE_UNKNOWN, *alphabet, *dict.fromkeys(_join_wordpiece(*pair) for pair in merges)]
        tokenizer = Tokenizer(models.WordPiece({piece: index for index, piece in enumerate(pieces)},
                                               unk_token=WORDPIECE_UNKNOWN, continuing_subword_prefix="##"))
    else:
        counts = word_counts(words, lambda word: [*word[:-1], word[-1] + "</w>"])
        bytes_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        alphabet = [*bytes_alphabet, *(character + "</w>" for character in bytes_alphabet)]  # CLIP's 512 start symbols
        merges = learn_merges(counts, max(0, size - len(alphabet)))
        pieces = [*alphabet, *dict.fromkeys(left + right for left, right in merges)]
        tokenizer = Tokenizer(models.BPE({piece: index for index, piece in enumerate(pieces)}, merges,
                                         end_of_word_suffix="</w>"))
        tokenizer.decoder = decoders.ByteLevel()
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, splitter
    return tokenizer


class LanguageVocabularies:
    """Every language's tokenizer and its pieces' shared ids; state in :meth:`state` / :meth:`from_state`."""

    def __init__(self, family: str, base: dict[str, int], next_id: int) -> None:
        self.family, self.base, self.next_id = family, base, next_id
        """``next_id``: the first id after the token-embedding table's rows."""
        self.added: dict[str, int] = {}
        """Pieces added so far, by piece: their ids, in order."""
        self.tokenizers: dict[str, object] = {}
        self.local_to_shared: dict[str, torch.Tensor] = {}

    def __contains__(self, language: str) -> bool:
        return language in self.tokenizers

    def add_language(self, language: str, texts: Sequence[str], size: int) -> list[str]:
        """Train ``language``'s tokenizer on ``texts`` and merge it; returns the new pieces, whose ids are
        ``next_id`` onward in that order (the caller grows the table by as many rows)."""
        if language in self.tokenizers:
            raise ConfigError(f"language {language} already has a vocabulary")
        return self._merge(language, train_tokenizer(texts, self.family, size))

    def _merge(self, language: str, tokenizer) -> list[str]:
        vocabulary = tokenizer.get_vocab()
        unknown = self.base.get(WORDPIECE_UNKNOWN)
        new, shared = [], torch.empty(len(vocabulary), dtype=torch.long)
        for piece, local in sorted(vocabulary.items(), key=lambda item: item[1]):
            if piece == WORDPIECE_UNKNOWN and self.family == "wordpiece" and unknown is not None:
                shared[local] = unknown
            elif piece in self.base:
                shared[local] = self.base[piece]
            elif piece in self.added:
                shared[local] = self.added[piece]
            else:
                self.added[piece] = shared[local] = self.next_id
                self.next_id += 1
                new.append(piece)
        self.tokenizers[language] = tokenizer
        self.local_to_shared[language] = shared
        return new

    def pieces(self, text: str, language: str) -> list[str]:
        """The pieces ``language``'s tokenizer cuts ``text`` into (no special tokens)."""
        return self.tokenizers[language].encode(text, add_special_tokens=False).tokens

    def ids(self, texts: Sequence[str], language: str) -> list[list[int]]:
        """Shared ids of each text, without start/end tokens."""
        mapping = self.local_to_shared[language]
        encoded = self.tokenizers[language].encode_batch(list(texts), add_special_tokens=False)
        return [mapping[torch.tensor(item.ids, dtype=torch.long)].tolist() if item.ids else [] for item in encoded]

    def tokenize(self, backend, texts: Sequence[str], language: str | None) -> torch.Tensor:
        """``[N, context]`` input ids: ``language``'s tokenizer when it has one (start, pieces, end, then
        padding, cut to the context as the backend cuts), else ``backend.tokenize``."""
        if language is None or language not in self.tokenizers:
            return backend.tokenize(texts)
        context = backend.context_length
        tokens = torch.full((len(texts), context), backend.pad_token_id, dtype=torch.long)
        for row, ids in enumerate(self.ids(texts, language)):
            sequence = [backend.sot_token_id, *ids[: context - 2], backend.eot_token_id]
            tokens[row, : len(sequence)] = torch.tensor(sequence)
        return tokens

    # --- state (checkpoints): tokenizers as their JSON, ids as lists -----------------------------
    def state(self) -> dict:
        return {"family": self.family, "next_id": self.next_id, "added": self.added,
                "languages": {language: tokenizer.to_str() for language, tokenizer in self.tokenizers.items()},
                "order": list(self.tokenizers)}

    @classmethod
    def from_state(cls, state: dict, base: dict[str, int], first_id: int) -> LanguageVocabularies:
        from tokenizers import Tokenizer

        vocabularies = cls(state["family"], base, first_id)
        for language in state["order"]:
            vocabularies._merge(language, Tokenizer.from_str(state["languages"][language]))
        if vocabularies.added != {piece: int(identifier) for piece, identifier in state["added"].items()}:
            raise ConfigError("saved vocabularies do not rebuild the same ids (the checkpoint is not this model's)")
        return vocabularies

    def to_json(self) -> str:
        return json.dumps(self.state(), ensure_ascii=False)


__all__ = ["FAMILIES", "LanguageVocabularies", "backend_vocabulary", "train_tokenizer"]

"""The backend's token interface (facts, embedding table, encoding from embeddings) and the two
adaptation kinds built on it: prompt tokens in the image tower and an expandable token table."""

import copy

import pytest
import torch

from clipcl.adapt import PromptConfig, PromptTokens, TokenGrowthConfig, grow_token_embedding, inject_prompts
from clipcl.adapt.tokens import ExpandableEmbedding
from clipcl.config import ModelConfig
from clipcl.models import build_backend
from clipcl.models.base import Backend
from clipcl.models.tiny import (
    CLIP_VOCAB_SIZE,
    TINY_CONTEXT_LENGTH,
    tiny_open_clip_backend,
    write_tiny_hf_clip,
)

TEXTS = ["a photo of a cat.", "a blurry picture of a dog"]


@pytest.fixture(scope="module")
def open_clip_backend():
    return tiny_open_clip_backend(seed=0).eval()


@pytest.fixture(scope="module")
def hf_backend(tmp_path_factory):
    directory = write_tiny_hf_clip(tmp_path_factory.mktemp("tiny-hf-tokens"), seed=0)
    return build_backend(ModelConfig(backend="hf", name=str(directory))).eval()


@pytest.fixture(params=["open_clip", "hf"])
def backend(request, open_clip_backend, hf_backend):
    """A private copy: the tests below grow tables and add prompts."""
    return copy.deepcopy({"open_clip": open_clip_backend, "hf": hf_backend}[request.param])


def _images(count=3):
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# --- token facts and the embedding table ---------------------------------------------------------------


def test_token_facts_are_declared(backend):
    assert backend.context_length == TINY_CONTEXT_LENGTH and backend.vocab_size == CLIP_VOCAB_SIZE
    assert (backend.sot_token_id, backend.eot_token_id) == (49406, 49407)
    assert {backend.sot_token_id, backend.eot_token_id, backend.pad_token_id} <= backend.special_token_ids
    tokens = backend.tokenize(TEXTS)
    assert tokens.shape == (2, backend.context_length) and (tokens[:, 0] == backend.sot_token_id).all()


def test_embedding_table_and_encoding_from_embeddings(backend):
    tokens = backend.tokenize(TEXTS)
    table = backend.token_embedding_table()
    assert table.shape[0] == backend.vocab_size
    embeddings = backend.embed_tokens(tokens)
    assert torch.equal(embeddings, table[tokens])
    with torch.no_grad():
        # The same code runs with the table's output replaced: equal bit for bit, not approximately.
        assert torch.equal(backend.encode_text_embeddings(embeddings, tokens), backend.encode_text(tokens))
    # Other embeddings give other features, and gradients reach them (learnt soft tokens).
    soft = (embeddings.detach() + 0.5 * torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(1))
            ).requires_grad_(True)
    features = backend.encode_text_embeddings(soft, tokens)
    assert not torch.allclose(features, backend.encode_text(tokens))
    features.square().sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shape"):
        backend.encode_text_embeddings(embeddings[:, :-1], tokens)


# --- an expandable token table --------------------------------------------------------------------------


def test_grown_table_keeps_old_rows_and_encodes_new_ids(backend):
    tokens = backend.tokenize(TEXTS)
    with torch.no_grad():
        before_table = backend.token_embedding_table().clone()
        before = backend.encode_text(tokens)
    word = int(tokens[0, 4])  # "cat"
    new_ids = grow_token_embedding(backend, TokenGrowthConfig(count=2, init="copy", source_ids=(word, 320)))
    assert list(new_ids) == [CLIP_VOCAB_SIZE, CLIP_VOCAB_SIZE + 1]
    assert isinstance(backend.token_embedding_site().module, ExpandableEmbedding)
    table = backend.token_embedding_table()
    assert table.shape[0] == CLIP_VOCAB_SIZE + 2 and torch.equal(table[:CLIP_VOCAB_SIZE], before_table)
    with torch.no_grad():
        assert torch.equal(backend.encode_text(tokens), before)  # ordinary texts: unchanged, bit for bit
        # A new id whose row copies "cat" encodes exactly like "cat": the tower still pools at the end
        # token (open_clip's CLIP pools at the largest id, which the new ids would otherwise be).
        renamed = tokens.clone()
        renamed[0, 4] = new_ids[0]
        assert torch.equal(backend.encode_text(renamed), before)
    # A second growth appends after the first; "mean" rows are the mean of the existing ones.
    more = grow_token_embedding(backend, TokenGrowthConfig(count=1))
    assert list(more) == [CLIP_VOCAB_SIZE + 2]
    torch.testing.assert_close(backend.token_embedding_table()[-1], table.mean(dim=0))
    # Training only the new rows: gradients reach them and nothing else in the table.
    backend.requires_grad_(False)
    module = backend.token_embedding_site().module
    module.added.requires_grad_(True)
    renamed[1, 3] = more[0]
    backend.encode_text(renamed).square().sum().backward()
    assert module.added.grad is not None and (module.added.grad.abs().sum(dim=1) > 0).tolist() == [True, False, True]


def test_growth_rules_check_their_values():
    with pytest.raises(ValueError, match="count"):
        TokenGrowthConfig(count=0)
    with pytest.raises(ValueError, match="init"):
        TokenGrowthConfig(count=1, init="zeros")
    with pytest.raises(ValueError, match="source_ids"):
        TokenGrowthConfig(count=2, init="copy", source_ids=(1,))
    with pytest.raises(NotImplementedError, match="token-embedding table"):
        Backend().token_embedding_site()


# --- prompt tokens in the image tower -------------------------------------------------------------------


def test_prompt_tokens_off_or_empty_leave_the_tower_exact_and_on_train(backend):
    images = _images()
    with torch.no_grad():
        expected = backend.encode_image(images)
    empty = copy.deepcopy(backend)
    inject_prompts(empty, PromptConfig(count=0))
    with torch.no_grad():
        assert torch.equal(empty.encode_image(images), expected)

    torch.manual_seed(0)
    prompts = inject_prompts(backend, PromptConfig(count=3, init_std=0.5))
    assert isinstance(prompts, PromptTokens) and prompts.prompts.shape[0] == 3
    prompts.enabled = False
    with torch.no_grad():
        assert torch.equal(backend.encode_image(images), expected)
    prompts.enabled = True
    features = backend.encode_image(images)
    assert features.shape == expected.shape and not torch.allclose(features, expected)
    features.square().sum().backward()
    assert prompts.prompts.grad is not None and prompts.prompts.grad.abs().sum() > 0
    # Each image's features still depend on that image alone (a tolerance, not equality: another
    # batch size may take other matmul kernels, which round differently in the last bits).
    with torch.no_grad():
        torch.testing.assert_close(backend.encode_image(images[:1]), backend.encode_image(images)[:1],
                                   rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="already has prompt tokens"):
        inject_prompts(backend, PromptConfig())


def test_prompt_sequence_layout():
    layer = PromptTokens(torch.nn.Identity(), width=2, config=PromptConfig(count=2), keep_first=1)
    with torch.no_grad():
        layer.prompts.copy_(torch.tensor([[7.0, 7.0], [8.0, 8.0]]))
    sequence = torch.arange(12.0).view(2, 3, 2)  # batch 2, three tokens
    out = layer(sequence)
    assert out.shape == (2, 5, 2)
    assert torch.equal(out[:, 0], sequence[:, 0]) and torch.equal(out[:, 3:], sequence[:, 1:])
    assert (out[:, 1] == 7).all() and (out[:, 2] == 8).all()
    first = PromptTokens(torch.nn.Identity(), width=2, config=PromptConfig(count=2), layout="lbd")
    assert first(sequence.transpose(0, 1)).shape == (5, 2, 2)
    with pytest.raises(ValueError, match="count"):
        PromptConfig(count=-1)
    with pytest.raises(ValueError, match="declares no sites for 'prompts'"):
        inject_prompts(Backend(), PromptConfig())


@pytest.mark.starter
def test_starter_token_interface():
    backend = build_backend(ModelConfig(backend="starter")).eval()
    tokens = backend.tokenize(TEXTS)
    assert backend.context_length == tokens.shape[1] and backend.pad_token_id in backend.special_token_ids
    with torch.no_grad():
        expected = backend.encode_text(tokens)
        assert torch.equal(backend.encode_text_embeddings(backend.embed_tokens(tokens), tokens), expected)
    word = int(tokens[0, 4])
    (new_id,) = grow_token_embedding(backend, TokenGrowthConfig(count=1, init="copy", source_ids=(word,)))
    renamed = tokens.clone()
    renamed[0, 4] = new_id
    with torch.no_grad():
        assert torch.equal(backend.encode_text(renamed), expected)
    with pytest.raises(ValueError, match="declares no sites for 'prompts'"):
        inject_prompts(backend, PromptConfig())

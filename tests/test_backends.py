"""Model backends: weights round-trip through local files exactly as a user would load them, every
backend offers the same surface, and bad names or paths fail with one clear line."""

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipcl.config import ConfigError, ModelConfig
from clipcl.models import build_backend
from clipcl.models.tiny import (
    TINY_CONTEXT_LENGTH,
    TINY_IMAGE_SIZE,
    tiny_open_clip_backend,
    write_tiny_hf_clip,
)

TEXTS = ["a photo of a cat.", "a blurry picture of a dog", "an airplane"]


def _images(count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)


@torch.no_grad()
def _embeddings(backend):
    backend.eval()
    return backend.encode_image(_images()), backend.encode_texts(TEXTS)


@pytest.fixture(scope="module")
def open_clip_backend(tiny_config_path):
    torch.manual_seed(0)
    return build_backend(ModelConfig(backend="open_clip", name=tiny_config_path))


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory):
    return str(write_tiny_hf_clip(tmp_path_factory.mktemp("tiny-hf"), seed=0))


@pytest.fixture(scope="module")
def hf_backend(hf_directory):
    return build_backend(ModelConfig(backend="hf", name=hf_directory))


@pytest.fixture(params=["open_clip", "hf"])
def backend(request, open_clip_backend, hf_backend):
    return {"open_clip": open_clip_backend, "hf": hf_backend}[request.param]


# --- weights round-trip through files --------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_checkpoint_file_round_trip(open_clip_backend, tiny_config_path, tmp_path, suffix):
    path = tmp_path / f"tiny{suffix}"
    state = {name: tensor.contiguous() for name, tensor in open_clip_backend.model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    torch.manual_seed(123)  # the loaded weights must not depend on the random initialisation
    loaded = build_backend(ModelConfig(backend="open_clip", name=tiny_config_path, pretrained=str(path)))
    for expected, actual in zip(_embeddings(open_clip_backend), _embeddings(loaded)):
        assert torch.equal(expected, actual)
    assert loaded.model_id.endswith(f"@tiny{suffix}")


def test_tiny_open_clip_backend_is_seeded():
    state = torch.random.get_rng_state()
    first, second, other = tiny_open_clip_backend(seed=3), tiny_open_clip_backend(seed=3), tiny_open_clip_backend(4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    assert torch.equal(first.logit_scale, second.logit_scale)
    assert torch.equal(first.model.visual.conv1.weight, second.model.visual.conv1.weight)
    assert not torch.equal(first.model.visual.conv1.weight, other.model.visual.conv1.weight)


def test_hf_directory_round_trip(hf_backend, hf_directory, tmp_path):
    again = build_backend(ModelConfig(backend="hf", name=hf_directory))
    for expected, actual in zip(_embeddings(hf_backend), _embeddings(again)):
        assert torch.equal(expected, actual)
    # Fine-tuned weights saved with save_pretrained load back the same.
    with torch.no_grad():
        hf_backend.model.visual_projection.weight.mul_(2.0)
    try:
        hf_backend.model.save_pretrained(tmp_path)
        hf_backend.tokenizer.save_pretrained(tmp_path)
        shutil.copy(Path(hf_directory) / "preprocessor_config.json", tmp_path)
        reloaded = build_backend(ModelConfig(backend="hf", name=str(tmp_path)))
        for expected, actual in zip(_embeddings(hf_backend), _embeddings(reloaded)):
            assert torch.equal(expected, actual)
    finally:
        with torch.no_grad():
            hf_backend.model.visual_projection.weight.div_(2.0)


def test_hf_tokenizer_matches_open_clip_tokenizer(open_clip_backend, hf_backend):
    ours, theirs = open_clip_backend.tokenize(TEXTS), hf_backend.tokenize(TEXTS)
    for row_ours, row_theirs in zip(ours, theirs):
        length = int((row_ours == open_clip_backend.eot_token_id).nonzero()[0]) + 1
        assert row_ours[:length].tolist() == row_theirs[:length].tolist()
    assert open_clip_backend.sot_token_id == hf_backend.sot_token_id == 49406
    assert open_clip_backend.eot_token_id == hf_backend.eot_token_id == 49407


# --- the Backend surface -------------------------------------------------------------------------


def test_backend_surface(backend):
    tokens = backend.tokenize(TEXTS)
    assert tokens.dtype == torch.long and tokens.shape == (len(TEXTS), TINY_CONTEXT_LENGTH)
    assert backend.context_length == TINY_CONTEXT_LENGTH
    assert int(tokens.max()) < backend.vocab_size == 49408
    assert tokens[0, 0] == backend.sot_token_id and backend.eot_token_id in tokens[0].tolist()
    images, texts = _embeddings(backend)
    assert images.shape == (3, backend.embed_dim) and texts.shape == (len(TEXTS), backend.embed_dim)
    assert backend.embed_dim == 32
    assert not torch.allclose(images.norm(dim=-1), torch.ones(3))  # unnormalised
    assert isinstance(backend.logit_scale, torch.nn.Parameter) and backend.logit_scale.numel() == 1
    assert backend.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-3)
    assert len(backend.image_blocks()) == 2 and len(backend.text_blocks()) == 2
    assert backend.model_id and backend.preprocess_id and "0x" not in backend.preprocess_id


@pytest.mark.parametrize("mode, size", [("RGB", (50, 40)), ("L", (20, 64)), ("RGBA", (32, 32))])
def test_preprocess_pil_images(backend, mode, size):
    image = Image.new(mode, size, color=128 if mode == "L" else (10, 200, 30, 255)[: len(mode)])
    for transform in (backend.preprocess, backend.train_preprocess):
        tensor = transform(image)
        assert tensor.shape == (3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE) and tensor.dtype == torch.float32


def test_towers_partition_the_parameters(backend):
    image_ids = [id(p) for p in backend.image_tower.parameters()]
    text_ids = [id(p) for p in backend.text_tower.parameters()]
    assert image_ids and text_ids and not set(image_ids) & set(text_ids)
    all_ids = {id(p) for p in backend.parameters()}
    assert set(image_ids) | set(text_ids) | {id(backend.logit_scale)} == all_ids
    # The views share storage and never add state_dict keys.
    first = next(backend.text_tower.parameters())
    assert any(first is p for p in backend.parameters())
    assert len(backend.state_dict()) == len(set(backend.state_dict()))
    assert not any(key.startswith("text_tower") for key in backend.state_dict())
    # Blocks belong to their tower.
    assert {id(p) for block in backend.image_blocks() for p in block.parameters()} <= set(image_ids)
    assert {id(p) for block in backend.text_blocks() for p in block.parameters()} <= set(text_ids)


def test_deepcopy_gives_an_independent_backend(backend):
    clone = copy.deepcopy(backend)
    assert torch.equal(clone.tokenize(TEXTS), backend.tokenize(TEXTS))
    with torch.no_grad():
        next(clone.image_tower.parameters()).add_(1.0)
    assert not torch.equal(next(clone.image_tower.parameters()), next(backend.image_tower.parameters()))


def test_gradients_reach_both_towers(backend):
    backend.train()
    images = backend.encode_image(_images(2))
    texts = backend.encode_texts(TEXTS[:2])
    logits = backend.logit_scale.exp() * torch.nn.functional.normalize(images, dim=-1) @ \
        torch.nn.functional.normalize(texts, dim=-1).T
    torch.nn.functional.cross_entropy(logits, torch.arange(2)).backward()
    for tower in (backend.image_tower, backend.text_tower):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())
    backend.zero_grad(set_to_none=True)
    backend.eval()


# --- errors --------------------------------------------------------------------------------------


def _one_line(error):
    message = str(error.value)
    assert "\n" not in message and message
    return message


def test_unknown_backend():
    with pytest.raises(ValueError) as error:
        build_backend(ModelConfig(backend="tensorflow", name="x"))
    message = _one_line(error)
    assert "tensorflow" in message and all(name in message for name in ("starter", "open_clip", "hf"))


@pytest.mark.parametrize("name, pretrained, fragment", [
    ("{tmp}/missing.json", None, "missing.json"),
    ("{config}", "{tmp}/missing.safetensors", "missing.safetensors"),
    ("{config}", "not-a-tag", "not-a-tag"),
    ("ViT-B-61", None, "ViT-B-61"),
])
def test_open_clip_bad_names_and_paths(tiny_config_path, tmp_path, name, pretrained, fragment):
    fill = {"tmp": str(tmp_path), "config": tiny_config_path}
    config = ModelConfig(backend="open_clip", name=name.format(**fill),
                         pretrained=pretrained.format(**fill) if pretrained else None)
    with pytest.raises((FileNotFoundError, ConfigError)) as error:
        build_backend(config)
    assert fragment in _one_line(error)


def test_open_clip_refuses_pickled_objects(open_clip_backend, tiny_config_path, tmp_path):
    path = tmp_path / "whole-model.pt"
    torch.save({"state_dict": open_clip_backend.model.state_dict(), "extra": ConfigError("x")}, path)
    with pytest.raises(ConfigError) as error:
        build_backend(ModelConfig(backend="open_clip", name=tiny_config_path, pretrained=str(path)))
    assert "whole-model.pt" in _one_line(error)


def test_open_clip_checkpoint_of_another_architecture(tiny_config_path, tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file({"logit_scale": torch.zeros(())}, str(path))
    with pytest.raises(ConfigError) as error:
        build_backend(ModelConfig(backend="open_clip", name=tiny_config_path, pretrained=str(path)))
    assert "wrong.safetensors" in _one_line(error)


def test_hf_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        build_backend(ModelConfig(backend="hf", name=str(tmp_path / "no-such-model")))
    assert "no-such-model" in _one_line(error)
    with pytest.raises(FileNotFoundError) as error:
        build_backend(ModelConfig(backend="hf", name=str(tmp_path)))  # exists, but holds no model
    assert str(tmp_path) in _one_line(error)
    with pytest.raises(ConfigError) as error:
        build_backend(ModelConfig(backend="hf", name=str(tmp_path), pretrained="openai"))
    assert "model.pretrained" in _one_line(error)


def test_importing_models_loads_neither_library():
    code = ("import sys, clipcl.models, clipcl.models.base; "
            "print(sorted(m for m in ('open_clip', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_hf_siglip_model(tmp_path):
    """SiglipModel loads through the same backend (with a CLIP tokenizer: SigLIP's needs sentencepiece files)."""
    from transformers import CLIPTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

    from clipcl.models.tiny import clip_bpe_vocabulary

    vocab, merges = clip_bpe_vocabulary()
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(tmp_path)
    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "projection_size": 48}
    vision = {"image_size": 16, "patch_size": 8, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2}
    torch.manual_seed(0)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(tmp_path)
    SiglipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    backend = build_backend(ModelConfig(backend="hf", name=str(tmp_path)))
    assert backend.model_type == "siglip" and backend.embed_dim == 48
    with torch.no_grad():
        assert backend.encode_image(torch.randn(2, 3, 16, 16)).shape == (2, 48)
        assert backend.encode_texts(TEXTS).shape == (3, 48)
    assert backend.preprocess(Image.new("L", (30, 20))).shape == (3, 16, 16)
    image_ids = {id(p) for p in backend.image_tower.parameters()}
    text_ids = {id(p) for p in backend.text_tower.parameters()}
    assert not image_ids & text_ids
    rest = {id(p) for p in backend.parameters()} - image_ids - text_ids
    assert rest == {id(backend.logit_scale), id(backend.model.logit_bias)}


def test_open_clip_image_size_override(tiny_config_path):
    backend = build_backend(ModelConfig(backend="open_clip", name=tiny_config_path, image_size=16))
    assert backend.image_size == 16
    assert backend.preprocess(Image.new("RGB", (40, 40))).shape == (3, 16, 16)
    with torch.no_grad():
        assert backend.encode_image(torch.randn(1, 3, 16, 16)).shape == (1, 32)


def test_available_models_lists_each_backend():
    from clipcl.models import available_models

    short = available_models(open_clip_names=False)
    assert [entry.split(":")[0] for entry in short] == ["starter", "open_clip", "hf"]
    assert "open_clip:ViT-B-16" in available_models()

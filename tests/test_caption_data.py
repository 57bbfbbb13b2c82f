"""Caption sets: caption files, webdataset shards, Tux Paint stamps and Open Clip Art, in their real layouts."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcl.data import drawings
from clipcl.data.base import DataError
from clipcl.data.caption_shards import WebDatasetShards
from clipcl.data.captions import CaptionDataset, load_caption_set
from clipcl.data.clipart_captions import caption
from clipcl.data.drawings import OpenClipart, TuxPaintStamps, in_test_split


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 8), alpha: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA" if alpha else "RGB", size, colour + ((0,) if alpha else ())).save(path)


def _png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _stamps(root: Path) -> Path:
    stamps = root / "stamps"
    _png(stamps / "animals" / "birds" / "duck.png", (200, 200, 0))
    (stamps / "animals" / "birds" / "duck.txt").write_text("A duck.\nde.utf8=Eine Ente.\nfr.utf8=Un canard.\n")
    (stamps / "animals" / "birds" / "duck.dat").write_text("colorable\n")
    _png(stamps / "animals" / "birds" / "duck_mirror.png", (200, 200, 0))  # a variant, not a stamp
    _png(stamps / "food" / "apple.png", (255, 0, 0), alpha=True)            # fully transparent
    (stamps / "food" / "apple.txt").write_text("  An apple.  \nfr.utf8=Une pomme.\n")
    (stamps / "food" / "lost.txt").write_text("A stamp whose image is gone.\n")
    (stamps / "food" / "blank.txt").write_text("\n")
    _png(stamps / "food" / "blank.png", (0, 0, 0))
    (stamps / "symbols" / "star.svg").parent.mkdir(parents=True)
    (stamps / "symbols" / "star.svg").write_text(_svg("Star", "", []))
    (stamps / "symbols" / "star.txt").write_text("A yellow star.\n")
    return stamps


def _svg(title: str, description: str, keywords: list[str], fill: str = "#ff0000", width: str = "20mm") -> str:
    items = "".join(f"<rdf:li>{keyword}</rdf:li>" for keyword in keywords)
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<svg xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:cc="http://web.resource.org/cc/"
 xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" xmlns:svg="http://www.w3.org/2000/svg"
 xmlns="http://www.w3.org/2000/svg" width="{width}" height="10mm">
  <metadata>
    <rdf:RDF>
      <cc:Work rdf:about="">
        <dc:title>{title}</dc:title>
        <dc:description>{description}</dc:description>
        <dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>
        <dc:publisher><cc:Agent rdf:about="http://www.openclipart.org/"><dc:title>Open Clip Art Library</dc:title>
        </cc:Agent></dc:publisher>
        <dc:creator><cc:Agent><dc:title>Some Artist</dc:title></cc:Agent></dc:creator>
        <dc:format>image/svg+xml</dc:format>
      </cc:Work>
    </rdf:RDF>
  </metadata>
  <rect x="0" y="0" width="100%" height="100%" fill="{fill}"/>
</svg>
"""


def _clipart(root: Path) -> Path:
    tree = root / "openclipart" / "svg"
    (tree / "animals" / "birds").mkdir(parents=True)
    (tree / "food").mkdir()
    (tree / "animals" / "birds" / "owl_on_branch.svg").write_text(
        _svg("Owl on Branch", "Created with Inkscape", ["owl", "", "animal", "bird", "nature", "forest"]))
    (tree / "food" / "green_apple_01.svg").write_text(_svg("", "", ["unsorted"], fill="#00ff00"))
    (tree / "food" / "banana.svg").write_text(_svg("Banana", "A ripe yellow banana", ["fruit"], fill="#ffff00"))
    os.symlink("../food/banana.svg", tree / "animals" / "banana.svg")  # listed in a second category
    return tree


def test_tuxpaint_rows_captions_translations_and_skips(tmp_path):
    stamps = TuxPaintStamps(_stamps(tmp_path), "all", image_size=32, cache_dir=tmp_path / "cache")
    assert stamps.image_order() == ["animals/birds/duck.png", "food/apple.png", "symbols/star.svg"]
    assert stamps.captions == ["A duck.", "An apple.", "A yellow star."]
    assert stamps.image_ids == [0, 1, 2] and stamps.num_images == 3 and len(stamps) == 3
    assert stamps.categories == ["animals", "food", "symbols"]
    assert stamps.skipped == {"empty description": 1, "no image": 1}
    assert stamps.translations == {"de": ["Eine Ente.", None, None], "fr": ["Un canard.", "Une pomme.", None]}
    apple, text = stamps[1]
    assert apple.mode == "RGB" and apple.size == (32, 32) and text == "An apple."
    assert np.asarray(apple).min() == 255  # transparent pixels are white, not black
    star = np.asarray(stamps[2][0])
    assert star.shape == (32, 32, 3) and star[16, 16].tolist() == [255, 0, 0]  # the svg, rendered
    chosen = stamps.select_images([2, 0])
    assert chosen.captions == ["A yellow star.", "A duck."] and chosen.image_ids == [0, 1]
    assert chosen.categories == ["symbols", "animals"] and chosen.translations["fr"] == [None, "Un canard."]
    assert chosen.image_order() == ["symbols/star.svg", "animals/birds/duck.png"]
    assert chosen.fingerprint() != stamps.fingerprint() and chosen[1][1] == "A duck."


def test_splits_are_fixed_disjoint_and_cover_all(tmp_path):
    root = _stamps(tmp_path)
    keys = {"animals/birds/duck": "animals/birds/duck.png", "food/apple": "food/apple.png",
            "symbols/star": "symbols/star.svg"}
    for split in ("train", "test"):
        wanted = [key for stem, key in keys.items() if in_test_split(stem) == (split == "test")]
        if wanted:
            assert TuxPaintStamps(root, split, cache_dir=tmp_path / "c").image_order() == wanted
        else:
            with pytest.raises(DataError, match="no stamps"):
                TuxPaintStamps(root, split, cache_dir=tmp_path / "c")
    share = np.mean([in_test_split(f"category/drawing_{index}") for index in range(5000)])
    assert 0.18 < share < 0.22
    with pytest.raises(DataError, match="split must be one of"):
        TuxPaintStamps(root, "validation")


def test_tuxpaint_corrupt_image_names_the_file(tmp_path):
    root = _stamps(tmp_path)
    (root / "food" / "apple.png").write_bytes(b"not a png at all")
    stamps = TuxPaintStamps(root, "all", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"cannot read image .*apple\.png") as error:
        stamps[1]
    assert "\n" not in str(error.value)


def test_openclipart_captions_symlinks_and_render_cache(tmp_path, monkeypatch):
    tree = _clipart(tmp_path)
    calls = []
    real_render = drawings.render_svg
    monkeypatch.setattr(drawings, "render_svg", lambda path, size: calls.append(path) or real_render(path, size))
    clipart = OpenClipart(tree, "all", image_size=24, cache_dir=tmp_path / "cache")
    assert clipart.image_order() == ["animals/birds/owl_on_branch.svg", "food/banana.svg", "food/green_apple_01.svg"]
    assert clipart.captions == ["Owl on Branch, animal, bird, nature", "Banana, fruit. A ripe yellow banana",
                                "green apple"]
    assert clipart.untitled == 1 and clipart.categories == ["animals", "food", "food"]
    image, _ = clipart[1]
    assert image.size == (24, 24) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels[12, 12].tolist() == [255, 255, 0] and pixels[0, 12].tolist() == [255, 255, 255]  # fitted, white
    assert len(calls) == 1
    before = clipart.fingerprint()
    again = OpenClipart(tree, "all", image_size=24, cache_dir=tmp_path / "cache")
    assert np.array_equal(np.asarray(again[1][0]), pixels) and len(calls) == 1  # read from the cache
    assert again.fingerprint() == before
    assert not list((tmp_path / "cache").glob("*.tmp"))
    OpenClipart(tree, "all", image_size=16, cache_dir=tmp_path / "cache")[1]
    assert len(calls) == 2  # another size is another render
    (tree / "food" / "banana.svg").write_text(_svg("Banana", "A ripe yellow banana", ["fruit"], fill="#0000ff"))
    edited = OpenClipart(tree, "all", image_size=24, cache_dir=tmp_path / "cache")
    assert np.asarray(edited[1][0])[12, 12].tolist() == [0, 0, 255] and len(calls) == 3
    assert edited.fingerprint() != before and edited.local_stamp() != ""


def test_openclipart_malformed_svg_and_render_failure(tmp_path, monkeypatch):
    tree = _clipart(tmp_path)
    (tree / "food" / "broken.svg").write_text("<svg><metadata><rdf:RDF>")
    with pytest.raises(DataError, match=r"broken\.svg is not well-formed"):
        OpenClipart(tree, "all", cache_dir=tmp_path / "c")
    (tree / "food" / "broken.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="0" height="0"/>')
    clipart = OpenClipart(tree, "all", cache_dir=tmp_path / "c")
    monkeypatch.setitem(__import__("sys").modules, "cairosvg", None)  # no fallback on this machine
    with pytest.raises(DataError, match=r"cannot render drawing .*broken\.svg"):
        clipart.load_image(clipart.image_order().index("food/broken.svg"))


def test_caption_rule():
    assert caption("Owl_on  Branch", "Made with Sodipodi", ["owl", "t", "123", "bird", "Bird"]) == "Owl on Branch, bird"
    assert caption("Gull", "A Gull", []) == "Gull"
    assert caption("Frog", "frog@example.org", ["animal"]) == "Frog, animal"
    assert caption("Duck", "x" * 100, []) == "Duck"


def test_openclipart_collection_titles_take_the_file_name(tmp_path):
    tree = tmp_path / "svg"
    (tree / "computer").mkdir(parents=True)
    for name in ('ellipse', 'edit-copy', 'a', 'b', 'c', 'd', 'e'):
        (tree / "computer" / f"14_{name}.svg").write_text(_svg("Part of the Flat Icon Collection", "", ["hash"]))
    clipart = OpenClipart(tree, "all", cache_dir=tmp_path / "c")
    assert "edit copy, hash" in clipart.captions and clipart.captions[0] == "a, hash" and clipart.collection_titled == 7


def _write_shards(folder: Path) -> None:
    import webdataset

    folder.mkdir()
    with webdataset.TarWriter(str(folder / "shard-000000.tar")) as sink:
        sink.write({"__key__": "sample000", "jpg": _png_bytes((255, 0, 0)), "txt": "a red square"})
        sink.write({"__key__": "sample001", "png": _png_bytes((0, 255, 0)),
                    "json": json.dumps({"caption": ["a green square", "green"], "width": 6})})
    with webdataset.TarWriter(str(folder / "shard-000001.tar")) as sink:
        sink.write({"__key__": "sample002", "webp": _png_bytes((0, 0, 255)), "json": json.dumps({"text": "blue"})})


def test_webdataset_shards_random_access(tmp_path):
    _write_shards(tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    shards = WebDatasetShards(pattern)
    assert shards.captions == ["a red square", "a green square", "green", "blue"]
    assert shards.image_ids == [0, 1, 1, 2] and shards.num_images == 3
    assert shards.image_order() == ["shard-000000.tar:sample000", "shard-000000.tar:sample001",
                                    "shard-000001.tar:sample002"]
    assert np.asarray(shards[3][0])[0, 0].tolist() == [0, 0, 255] and shards[2][1] == "green"
    assert np.asarray(shards[0][0])[0, 0].tolist() == [255, 0, 0]
    folder = WebDatasetShards(tmp_path / "shards")
    assert folder.captions == shards.captions and folder.fingerprint() == shards.fingerprint()
    tail = shards.select_images([1, 2])
    assert tail.captions == ["a green square", "green", "blue"] and tail.image_ids == [0, 0, 1]
    single = load_caption_set(str(tmp_path / "shards" / "shard-000001.tar"), "all")
    assert single.captions == ["blue"] and single.fingerprint() != shards.fingerprint()


@pytest.mark.parametrize(("sample", "message"), [
    ({"__key__": "s7", "jpg": b"x"}, "sample s7 has no caption"),
    ({"__key__": "s7", "jpg": b"x", "txt": "  "}, "sample s7 has an empty caption"),
    ({"__key__": "s7", "jpg": b"x", "json": json.dumps({"label": 3})}, "sample s7: its .json has no caption"),
    ({"__key__": "s7", "txt": "a caption"}, "sample s7 has no image"),
])
def test_webdataset_bad_samples_name_shard_and_key(tmp_path, sample, message):
    import webdataset

    with webdataset.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write(sample)
    with pytest.raises(DataError, match=rf"bad\.tar: {message}") as error:
        WebDatasetShards(tmp_path / "bad.tar")
    assert "\n" not in str(error.value)


def test_webdataset_corrupt_image_and_missing_shard(tmp_path):
    import webdataset

    with webdataset.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write({"__key__": "s9", "jpg": b"not an image", "txt": "broken"})
    shards = WebDatasetShards(tmp_path / "bad.tar")
    with pytest.raises(DataError, match=r"bad\.tar: sample s9: cannot read its image"):
        shards[0]
    (tmp_path / "bad.tar").rename(tmp_path / "shard-000001.tar")
    with pytest.raises(DataError, match=r"shard-000002\.tar does not exist"):
        WebDatasetShards(str(tmp_path / "shard-{000001..000002}.tar"))


def test_caption_dataset_is_a_caption_set(tmp_path):
    _png(tmp_path / "a.png", (10, 20, 30))
    _png(tmp_path / "b.png", (40, 50, 60))
    (tmp_path / "k.json").write_text(json.dumps({"images": [
        {"filename": "a.png", "split": "test", "sentences": [{"raw": "first"}, {"raw": "again"}]},
        {"filename": "b.png", "split": "train", "sentences": [{"raw": "second"}]}]}))
    every = load_caption_set(str(tmp_path / "k.json"), "all")
    assert every.captions == ["first", "again", "second"] and every.image_ids == [0, 0, 1]
    assert load_caption_set("k.json", "test", root=str(tmp_path)).captions == ["first", "again"]
    tail = every.select_images([1])
    assert tail.captions == ["second"] and np.asarray(tail[0][0])[0, 0].tolist() == [40, 50, 60]
    before = CaptionDataset(tmp_path / "k.json").fingerprint()
    _png(tmp_path / "b.png", (41, 50, 60))
    assert CaptionDataset(tmp_path / "k.json").fingerprint() != before
    (tmp_path / "k.json").unlink()
    _png(tmp_path / "missing.png", (0, 0, 0))
    (tmp_path / "c.csv").write_text("image,caption\nmissing.png,there\nnot_here.png,gone\n")
    with pytest.raises(DataError, match=r"c\.csv: image .*not_here\.png does not exist"):
        load_caption_set(str(tmp_path / "c.csv"), "all")


def test_load_caption_set_names_and_roots(tmp_path):
    _stamps(tmp_path / "data" / "tuxpaint_tmp")
    (tmp_path / "data" / "tuxpaint_tmp" / "stamps").rename(tmp_path / "data" / "tuxpaint")
    _clipart(tmp_path / "data")
    assert load_caption_set("tuxpaint", "all", root=str(tmp_path / "data")).num_images == 3
    assert load_caption_set("openclipart", "all", root=str(tmp_path / "data")).num_images == 3
    with pytest.raises(DataError, match="unknown caption set 'coco'.*tuxpaint, openclipart"):
        load_caption_set("coco", "train")
    with pytest.raises(DataError, match="split must be one of"):
        load_caption_set("tuxpaint", "val")


def test_missing_debian_sets_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(drawings, "DEBIAN_ROOTS", {"tuxpaint": tmp_path / "no1", "openclipart": tmp_path / "no2" / "svg"})
    with pytest.raises(DataError, match="apt-get install tuxpaint-stamps-default"):
        load_caption_set("tuxpaint", "train")
    with pytest.raises(DataError, match="apt-get install openclipart-svg"):
        load_caption_set("openclipart", "train")


def test_openclipart_png_layout_reads_the_sibling_svg_metadata(tmp_path):
    tree = _clipart(tmp_path)
    pngs = tree.parent / "png"
    _png(pngs / "food" / "banana.png", (255, 255, 0))
    _png(pngs / "food" / "kiwi.png", (0, 128, 0))
    clipart = OpenClipart(pngs, "all", image_size=16, cache_dir=tmp_path / "c")
    assert clipart.captions == ["Banana, fruit. A ripe yellow banana", "kiwi"]
    assert clipart[0][0].size == (16, 16)


@pytest.mark.skipif(not Path("/usr/share/openclipart/svg").is_dir(), reason="Debian openclipart-svg not installed")
def test_real_openclipart_counts(tmp_path):
    everything = OpenClipart(split="all", cache_dir=tmp_path)
    assert everything.num_images > 7000 and all(text.strip() for text in everything.captions)
    assert len(set(everything.image_order())) == everything.num_images
    image, _ = everything[0]
    assert image.size == (224, 224) and image.mode == "RGB"


@pytest.mark.parametrize("filename, text, message", [
    ("c.csv", "image,caption\na.png,a cat\na.png,   \n", r"line 3 \(a.png\) has an empty caption"),
    ("c.jsonl", '{"image": "a.png", "caption": ""}\n', "line 1: image and caption must be non-empty"),
    ("k.json", json.dumps({"images": [{"filename": "a.png", "split": "test", "sentences": [{"raw": " "}]}]}),
     r"images\[0\] \(a.png\) sentences\[0\] is an empty caption"),
])
def test_caption_files_refuse_an_empty_caption_naming_the_record(tmp_path, filename, text, message):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / filename).write_text(text)
    with pytest.raises(DataError, match=message):
        CaptionDataset(tmp_path / filename)

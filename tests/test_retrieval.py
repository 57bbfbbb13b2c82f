"""Retrieval recall: hand-computed cases, caption files, batch independence."""

import pytest
import torch
from PIL import Image

from clipcl.data.captions import CaptionDataset
from clipcl.data.synthetic import load_synthetic
from clipcl.eval.retrieval import evaluate_retrieval, from_caption_dataset, recall_at_k, templated_captions
from clipcl.models.tiny import tiny_open_clip_backend
from clipcl.strategies.zero_shot import ZeroShot, ZeroShotConfig


def test_recall_on_a_hand_made_matrix():
    # 3 images, 4 captions; caption -> image: [0, 0, 1, 2]
    similarity = torch.tensor([
        [0.9, 0.1, 0.5, 0.0],   # image 0: best caption 0 (own) -> hit at 1
        [0.8, 0.2, 0.1, 0.3],   # image 1: ranking 0, 3, 1, 2 -> own caption 2 is 4th
        [0.1, 0.2, 0.3, 0.7],   # image 2: best caption 3 (own)
    ])
    recall = recall_at_k(similarity, [0, 0, 1, 2], ks=(1, 3))
    assert recall["image_to_text_R@1"] == pytest.approx(200 / 3)
    assert recall["image_to_text_R@3"] == pytest.approx(200 / 3)
    # captions: c0 -> images ranked 0,1,2 (own 0: hit@1); c1 -> 2,1,0 (own 0: 3rd);
    # c2 -> 0,2,1 (own 1: 3rd); c3 -> 2,1,0 (own 2: hit@1)
    assert recall["text_to_image_R@1"] == pytest.approx(50.0)
    assert recall["text_to_image_R@3"] == pytest.approx(100.0)


def test_caption_file_grouping(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (6, 6)).save(tmp_path / name)
    (tmp_path / "c.csv").write_text("image,caption\na.png,one\nb.png,two\na.png,three\n")
    grouped = from_caption_dataset(CaptionDataset(tmp_path / "c.csv"))
    assert len(grouped.images) == 2 and grouped.caption_image == [0, 1, 0]


def test_retrieval_does_not_depend_on_batch_size():
    strategy = ZeroShot(tiny_open_clip_backend(seed=0), ZeroShotConfig(name="zero_shot"))
    captioned = templated_captions(load_synthetic("synthetic-0", "test"), images=24)
    assert len(captioned.captions) == 24 * 2
    one = evaluate_retrieval(strategy, captioned, batch_size=1)
    many = evaluate_retrieval(strategy, captioned, batch_size=64)
    assert one == many
    assert all(0.0 <= value <= 100.0 for value in one.values())

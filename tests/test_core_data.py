"""Datasets (folder / JSONL), captions, buckets and the encode-once condition cache."""
import json
import random

import pytest
import torch
from PIL import Image

from dopsd_core import data
from dopsd_core.cond_cache import ConditionCache


def _img(path, size=(40, 20), color=(200, 10, 10)):
    Image.new("RGB", size, color).save(path)


def test_folder_pairs_and_errors(tmp_path):
    _img(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a [trigger] dog\n")
    _img(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("a cat")
    (tmp_path / "notes.md").write_text("ignored")
    ex = data.load_folder(str(tmp_path))
    assert [e.caption for e in ex] == ["a cat", "a [trigger] dog"]
    _img(tmp_path / "c.png")
    with pytest.raises(FileNotFoundError, match="c.png has no caption: add c.txt"):
        data.load_folder(str(tmp_path))
    assert data.load_folder(str(tmp_path), default_caption="x")[-1].caption == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        data.load_folder(str(empty))


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        data.open_image(str(bad))


def test_jsonl_rows(tmp_path):
    _img(tmp_path / "x.png")
    rows = [{"image": "x.png", "caption": "one"}, {"local_path_list": ["x.png", "x.png"], "text": "two"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ex = data.load_jsonl(str(tmp_path / "d.jsonl"))
    assert [e.caption for e in ex] == ["one", "two", "two"]
    assert ex[0].image_path == str(tmp_path / "x.png")
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1 needs"):
        data.load_jsonl(str(tmp_path / "bad.jsonl"))


def test_trigger_and_caption_dropout():
    assert data.apply_trigger("a [trigger] dog", "sks") == "a sks dog"
    assert data.apply_trigger("a dog", "sks") == "sks a dog"
    assert data.apply_trigger("a [trigger] dog", "") == "a  dog".strip()
    rng = random.Random(0)
    drops = sum(data.caption_dropout("c", 0.3, rng) == "" for _ in range(2000))
    assert 500 < drops < 700
    assert data.caption_dropout("c", 0.0, rng) == "c"


def test_buckets_keep_area_and_aspect():
    buckets = data.bucket_sizes(512, step=64)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and 0.75 < (w * h) / 512 ** 2 < 1.3
    assert data.nearest_bucket(1920, 1080, buckets)[0] > data.nearest_bucket(1920, 1080, buckets)[1]
    img = Image.new("RGB", (300, 100))
    assert data.resize_to_bucket(img, (128, 64)).size == (128, 64)


def test_condition_cache_encodes_each_pair_once():
    calls = []
    cache = ConditionCache(lambda p, im: calls.append(p) or (p, None if im is None else im.sum()))
    img_a, img_b = torch.ones(1, 4, 4, 3), torch.zeros(1, 4, 4, 3)
    for _ in range(5):
        cache.get("a dog")
        cache.get("a dog", img_a)
        cache.get("a dog", img_a.clone())
        cache.get("a dog", img_b)
    assert cache.encode_calls == 3 and len(calls) == 3

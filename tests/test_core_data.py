"""Datasets (folder / JSONL), captions, buckets and the encode-once condition cache."""
import json
import random

import pytest
import torch
from PIL import Image

from dopsd_core import data
from dopsd_core.cond_cache import ConditionCache
from core_models import single_thread  # noqa: F401 (autouse: one intra-op thread)


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


def test_official_jsonl_rows_with_alternative_captions(tmp_path):
    """The official recipe's rows: local_path_list relative to the recipe folder, eight caption fields."""
    recipe = tmp_path / "recipe"
    (recipe / "dataset" / "style" / "target_images").mkdir(parents=True)
    _img(recipe / "dataset" / "style" / "target_images" / "00.png")
    row = {"class_name": "s", "local_path_list": ["dataset/style/target_images/00.png"], "h*w": "20*40",
           "short_en": "a [V] dog", "detailed_en": "a detailed [V] dog", "short_zh": "狗"}
    (recipe / "dataset" / "style" / "data.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n")
    (ex,) = data.load_jsonl(str(recipe / "dataset" / "style" / "data.jsonl"))
    assert ex.image_path == str(recipe / "dataset" / "style" / "target_images" / "00.png")
    assert set(ex.all_captions()) == {"a [V] dog", "a detailed [V] dog", "狗"}
    drawn = {data.choose_caption(ex, seed=0, epoch=e, index=0) for e in range(40)}
    assert drawn == set(ex.all_captions())
    # deterministic in (seed, epoch, index), and the trigger can replace the official [V] token
    assert data.choose_caption(ex, 3, 7, 0) == data.choose_caption(ex, 3, 7, 0)
    for epoch in range(10):
        caption = data.choose_caption(ex, 0, epoch, 0, trigger="sks", placeholder="[V]")
        assert "sks" in caption and "[V]" not in caption


def test_dataset_buckets_images_and_captions(tmp_path):
    _img(tmp_path / "wide.png", size=(200, 100))
    (tmp_path / "wide.txt").write_text("[trigger] wide")
    _img(tmp_path / "tall.png", size=(100, 200))
    (tmp_path / "tall.txt").write_text("tall")
    ds = data.ImageCaptionDataset(data.load_dataset(str(tmp_path)), resolution=128, bucket_step=32,
                                  trigger="sks", caption_dropout=0.5, seed=1)
    assert ds.bucket(0)[1] > ds.bucket(0)[0] and ds.bucket(1)[0] > ds.bucket(1)[1]  # tall, wide (sorted names)
    img = ds.image(1)
    assert img.size == ds.bucket(1)
    t = data.image_to_tensor(img)
    assert t.shape == (img.height, img.width, 3) and 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    caps = [ds.caption(1, epoch) for epoch in range(200)]
    assert set(caps) == {"", "sks wide"} and 60 < caps.count("") < 140
    assert caps == [ds.caption(1, epoch) for epoch in range(200)]


def test_batch_order_buckets_epochs_and_resume():
    buckets = ["a", "b", "a", "a", "b", "c", "a"]
    order = data.BatchOrder(buckets, batch_size=2, seed=5)
    seen = []
    for _ in range(len(order.batches(0))):
        batch = order.next()
        assert len({buckets[i] for i in batch}) == 1  # one size per batch
        seen += batch
    assert sorted(seen) == list(range(7))             # an epoch visits every example once
    assert order.batches(1) != order.batches(0)        # reshuffled each epoch
    straight = [order.next() for _ in range(9)]
    again = data.BatchOrder(buckets, batch_size=2, seed=5)
    for _ in range(len(again.batches(0))):
        again.next()
    state = again.state_dict()
    resumed = data.BatchOrder(buckets, batch_size=2, seed=5)
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(9)] == straight
    with pytest.raises(ValueError, match="lower the batch size"):
        data.BatchOrder(["a", "b"], batch_size=2, drop_last=True)


def test_condition_cache_keys_by_content(tmp_path):
    path = tmp_path / "im.png"
    _img(path)
    cache = ConditionCache(lambda p, im: p)
    cache.get("p", str(path))
    cache.get("p", str(path))
    assert cache.encode_calls == 1 and cache.hits == 1
    _img(path, color=(0, 0, 255))                      # the file changed: encoded again
    cache.get("p", str(path))
    assert cache.encode_calls == 2
    a = Image.new("RGB", (4, 4), (1, 2, 3))
    assert cache.key("p", a) == cache.key("p", a.copy()) != cache.key("p", Image.new("RGB", (4, 4)))

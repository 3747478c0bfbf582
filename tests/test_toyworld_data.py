"""Toy world: the concept family, the renderer and the dataset (fast; no training)."""
import os
import sys

import pytest
import torch

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from toyworld import concepts, dataset  # noqa: E402
from toyworld.render import IMAGE_SIZE  # noqa: E402


def test_world_is_a_seeded_draw_from_the_family():
    a, b = concepts.make_world(0), concepts.make_world(0)
    assert a.to_dict() == b.to_dict()
    worlds = [concepts.make_world(s) for s in range(8)]
    assert len({w.fingerprint() for w in worlds}) > 1, "different seeds should give different worlds"
    family = {s.name for s in concepts.shape_family()}
    for w in worlds:
        assert set(w.names("shape")) <= family
        for axis in concepts.World.AXES:
            assert w.held_out[axis] in w.names(axis)
        assert w.held_out["style"] != "solid"


def test_held_out_members_never_reach_pretraining():
    w = concepts.make_world(0)
    g = torch.Generator().manual_seed(0)
    held = set(w.held_out.values())
    for _ in range(5):
        b = dataset.pretrain_batch(w, 128, g)
        for t in b.triples:
            assert not held & set(t)
        for cap in b.captions:
            assert not held & set(cap.split()), cap
            assert not set(concepts.TRIGGER_WORDS) & set(cap.split()), cap
    seen = concepts.all_combinations(w, seen_only=True)
    assert seen and all(w.is_seen(*t) for t in seen)
    assert len(concepts.all_combinations(w, seen_only=False)) > len(seen)


def test_batches_are_deterministic_and_context_is_a_variation():
    w = concepts.make_world(0)
    b1 = dataset.pretrain_batch(w, 32, torch.Generator().manual_seed(5))
    b2 = dataset.pretrain_batch(w, 32, torch.Generator().manual_seed(5))
    assert torch.equal(b1.x0, b2.x0) and b1.captions == b2.captions
    assert torch.equal(b1.context_images, b2.context_images)
    assert b1.x0.shape == (32, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert b1.x0.min() >= -1 and b1.x0.max() <= 1
    rows = b1.has_image.nonzero().flatten()
    assert len(rows) > 0
    # the context image is another render of the same concept, never the target itself
    assert all(not torch.equal(b1.x0[i], b1.context_images[i]) for i in rows)
    assert b1.context_images[~b1.has_image].abs().sum() == 0


def test_concept_set_uses_trigger_and_held_out_member():
    w = concepts.make_world(0)
    for axis in concepts.World.AXES:
        cs = dataset.concept_set(w, axis, n=6, trigger="sks", seed=1)
        assert len(cs.captions) == 6 and cs.images.shape[0] == 6
        col = {"shape": 0, "colour": 1, "style": 2}[axis]
        assert all(t[col] == w.held_out[axis] for t in cs.triples)
        assert all("sks" in c.split() and w.held_out[axis] not in c.split() for c in cs.captions)
        again = dataset.concept_set(w, axis, n=6, trigger="sks", seed=1)
        assert torch.equal(cs.images, again.images)


def test_tokenizer_reserves_untrained_triggers():
    from toyworld.encoder import Tokenizer
    w = concepts.make_world(0)
    tok = Tokenizer(w.vocabulary())
    ids = tok(["a sks striped circle", "a red solid square", ""])
    assert ids.shape == (3, tok.max_len)
    assert tok.decode(ids[1]) == "a red solid square"
    assert all(tok.ids[t] > 1 for t in concepts.TRIGGER_WORDS)
    assert int(ids[2].abs().sum()) == 0

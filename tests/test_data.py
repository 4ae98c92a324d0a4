"""Data loading, nested subsets, class-aware batches, and the errors bad data gets."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from finetune_budget.data.samplers import ClassChunkBatchSampler, ShuffledBatchSampler
from finetune_budget.data.subsets import nested_subset
from finetune_budget.data.text import (
    load_clinc150,
    load_flickr8k_captions,
    load_stsb,
    load_table,
    read_flickr8k_captions,
    split_images,
)
from finetune_budget.errors import DataError
from tests.conftest import DATA_DIR, requires_data


def test_subsets_are_nested_and_seeded():
    small, large = nested_subset(1000, 100, seed=3), nested_subset(1000, 500, seed=3)
    assert set(small) <= set(large)
    assert len(set(large)) == 500
    assert not np.array_equal(nested_subset(1000, 100, seed=4), small)
    assert np.array_equal(nested_subset(1000, 100, seed=3), small)


def test_n_larger_than_the_data_says_how_many_there_are():
    with pytest.raises(DataError, match=r"data.n=2000 is larger than the 1500 .*data.n<=1500"):
        nested_subset(1500, 2000, seed=0, name="toy")
    with pytest.raises(DataError, match="positive"):
        nested_subset(10, 0, seed=0)


def test_class_batches_hold_several_items_per_class_and_cover_each_item_once():
    labels = np.repeat(np.arange(20), 8)
    sampler = ClassChunkBatchSampler(labels, batch_size=16, per_class=4, seed=0)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(labels)))
    for batch in batches:
        counts = Counter(labels[batch])
        assert min(counts.values()) >= 4
    sampler.set_epoch(1)
    assert list(sampler) != batches  # a new order each epoch, from (seed, epoch) alone


def _steps(samplers) -> list[list[list[int]]]:
    """Per step, the batch of every rank."""
    ranks = [list(s) for s in samplers]
    assert len({len(r) for r in ranks}) == 1, "ranks run different numbers of steps"
    return [list(step) for step in zip(*ranks, strict=True)]


# n=1000, batch 32: 2 ranks: 15 rounds of 64 + 40 left (20 each): 16 steps, all 1000 used;
# 3 ranks: 10 rounds of 96 + 40 left (13 each, 1 left out): 11 steps, 999 used
@pytest.mark.parametrize(("world", "n_steps", "n_used"), [(2, 16, 1000), (3, 11, 999)])
def test_class_batches_split_across_ranks_with_equal_shapes_at_every_step(world, n_steps, n_used):
    # the case: n=1000, batch 32, 2 ranks used to give rank 1 a batch of 8 (rank 0: 32)
    labels = np.repeat(np.arange(250), 4)
    samplers = [
        ClassChunkBatchSampler(labels, 32, 4, seed=0, num_replicas=world, rank=r)
        for r in range(world)
    ]
    steps = _steps(samplers)
    assert all(len({len(b) for b in step}) == 1 for step in steps)  # equal shapes per step
    items = [i for step in steps for b in step for i in b]
    assert len(items) == len(set(items))  # no item twice in an epoch
    assert len(steps) == n_steps and len(items) == n_used
    one = [i for b in ClassChunkBatchSampler(labels, 32, 4, seed=0) for i in b]
    assert sorted(one) == list(range(1000))  # one process: every item


def test_shuffled_batches_drop_only_the_last_incomplete_round_and_reshuffle_each_epoch():
    samplers = [ShuffledBatchSampler(100, 8, seed=1, drop_last=True, num_replicas=2, rank=r)
                for r in (0, 1)]  # fmt: skip
    steps = _steps(samplers)
    assert len(steps) == 100 // 16 and all(len(b) == 8 for step in steps for b in step)
    epoch0 = [i for step in steps for b in step for i in b]
    assert len(set(epoch0)) == 96  # 100 - 100 % 16 items, each once
    for s in samplers:
        s.set_epoch(1)
    epoch1 = [i for step in _steps(samplers) for b in step for i in b]
    assert epoch1 != epoch0 and len(set(epoch1)) == 96
    # fewer items than one round: they are split, not all dropped
    few = _steps([ShuffledBatchSampler(5, 8, drop_last=True, num_replicas=2, rank=r)
                  for r in (0, 1)])  # fmt: skip
    assert [len(b) for b in few[0]] == [2, 2]


def test_lightning_sets_the_epoch_of_the_batch_samplers():
    """Lightning calls set_epoch on a loader's batch_sampler.sampler at every epoch start."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    for sampler in (ShuffledBatchSampler(20, 4), ClassChunkBatchSampler([0, 1] * 10, 4, 2)):
        _set_sampler_epoch(DataLoader(range(20), batch_sampler=sampler), 3)
        assert sampler.epoch == 3


@requires_data("clinc150")
def test_clinc150_excludes_out_of_scope_and_holds_out_the_val_split():
    data = load_clinc150(DATA_DIR / "clinc150" / "data_full.json", eval_split="val")
    assert len(data) == 15000 and data.kind == "labels"
    assert len(data.eval_texts) == 3000 and len(set(data.eval_groups)) == 150


@requires_data("stsb")
def test_stsb_pairs_are_high_scoring_and_each_held_out_pair_is_a_group():
    data = load_stsb(DATA_DIR / "stsb", min_score=4.0)
    assert data.kind == "pairs" and len(data.train_texts) == len(data.train_positives) > 1000
    assert Counter(data.eval_groups).most_common(1)[0][1] == 2


@requires_data("flickr8k")
def test_flickr8k_caption_groups_never_cross_the_split():
    frame = read_flickr8k_captions(DATA_DIR / "flickr8k")
    images = frame["image"].drop_duplicates().tolist()
    train_images, held_images = split_images(images, eval_images=1000)
    assert not set(train_images) & set(held_images)
    assert split_images(images, 1000) == (train_images, held_images)  # fixed, seed-independent
    data = load_flickr8k_captions(DATA_DIR / "flickr8k", eval_images=1000)
    assert len(set(data.eval_groups)) == 1000
    held_captions = frame[frame["image"].isin(held_images)]["caption"]
    assert sorted(data.eval_texts) == sorted(held_captions)
    train_captions = set(frame[frame["image"].isin(train_images)]["caption"])
    assert set(data.train_texts) <= train_captions


def test_a_users_csv_of_text_and_label_loads_with_a_held_out_fraction(tmp_path):
    path = tmp_path / "faq.csv"
    rows = [(f"question {i} about topic {i % 5}", f"topic{i % 5}") for i in range(50)]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    data = load_table(path, eval_fraction=0.2)
    assert len(data) == 40 and len(data.eval_texts) == 10
    assert set(data.eval_groups) <= set(data.train_labels)


def test_a_users_jsonl_of_pairs_loads(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"q{i}", "p": f"p{i}"}) for i in range(30)))
    data = load_table(path, query_column="q", positive_column="p", eval_fraction=0.3)
    assert data.kind == "pairs" and len(data) + len(data.eval_texts) // 2 == 30


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("text,label\n", "has no rows"),
        ("foo,bar\n1,2\n", "has no column 'text'.*set data.text_column"),
    ],
)
def test_bad_user_files_get_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_table(path)
    assert "\n" not in str(info.value)


def test_a_missing_file_names_the_setting_to_fix(tmp_path):
    with pytest.raises(DataError, match="paths.data_dir"):
        load_clinc150(tmp_path / "nope.json")
    with pytest.raises(DataError, match="unknown file type"):
        (tmp_path / "x.xlsx").write_text("a")
        load_table(tmp_path / "x.xlsx")

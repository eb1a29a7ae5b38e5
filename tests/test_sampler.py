"""CuratingBatchSampler: one index stream for every rank, curated epochs, resume without repeats."""

from __future__ import annotations

import pytest
import torch

from chexficient.curation.sampler import CuratingBatchSampler


def _sampler(rank=0, world_size=1, **kwargs) -> CuratingBatchSampler:
    values = dict(num_samples=103, batch_size=8, rank=rank, world_size=world_size, seed=5)
    values.update(kwargs)
    return CuratingBatchSampler(**values)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_partition_each_super_batch(world_size):
    samplers = [_sampler(rank, world_size) for rank in range(world_size)]
    streams = [list(s) for s in samplers]
    assert len({len(s) for s in streams}) == 1  # every rank takes the same number of steps
    steps = len(streams[0])
    assert steps == 103 // (8 * world_size) == len(samplers[0])
    seen = []
    for step in range(steps):
        super_batch = [i for rank in range(world_size) for i in streams[rank][step]]
        assert len(super_batch) == 8 * world_size and len(set(super_batch)) == len(super_batch)
        seen.extend(super_batch)
    assert len(set(seen)) == len(seen)  # no index twice in an epoch
    # the concatenated rank slices are exactly the single global order, cut into super-batches
    order = samplers[0].global_order().tolist()
    assert seen == order[: steps * 8 * world_size]


def test_every_rank_derives_the_same_order_and_epochs_differ():
    a, b = _sampler(0, 2, curation_epochs=3), _sampler(1, 2, curation_epochs=3)
    assert torch.equal(a.global_order(), b.global_order())
    first = a.global_order()
    a.set_epoch(1)
    assert not torch.equal(first, a.global_order())
    assert torch.equal(_sampler(0, 2, curation_epochs=3).global_order(), first)  # deterministic by seed


def test_post_curation_epochs_walk_the_subset_reshuffled():
    sampler = _sampler(curated_batch_size=4, curation_epochs=1)
    subset = torch.tensor([90, 3, 7, 11, 42, 55, 60, 70, 81, 99, 5, 17])
    sampler.set_curated_ids(subset)
    sampler.set_epoch(1)
    batches = list(sampler)
    assert all(len(b) == 4 for b in batches) and len(batches) == 3
    assert sorted(i for b in batches for i in b) == sorted(subset.tolist())
    sampler.set_epoch(2)
    assert [i for b in sampler for i in b] != [i for b in batches for i in b]


def test_resume_mid_epoch_continues_without_repeats():
    full = list(_sampler())
    resumed = _sampler()
    resumed.load_state_dict({"epoch": 0, "start_step": 5, "curated_ids": torch.tensor([1, 2])})
    assert list(resumed) == full[5:]
    assert len(resumed) == len(full) - 5
    state = resumed.state_dict()
    again = _sampler()
    again.load_state_dict(state)
    assert list(again) == full[5:] and torch.equal(again.curated_ids, torch.tensor([1, 2]))


def test_errors_are_clear():
    with pytest.raises(ValueError, match="curated subset, but it is empty"):
        sampler = _sampler()
        sampler.set_epoch(1)
        list(sampler)
    with pytest.raises(ValueError, match="rank"):
        _sampler(rank=2, world_size=2)
    with pytest.raises(ValueError, match="curated ids"):
        _sampler().set_curated_ids(torch.tensor([200]))


def test_post_curation_batch_shrinks_to_a_small_subset():
    sampler = _sampler(world_size=2, batch_size=8, curated_batch_size=16, curation_epochs=1)
    sampler.set_curated_ids(torch.arange(10))  # 10 pairs over 2 ranks: less than one 16 x 2 super-batch
    assert sampler.current_batch_size(1) == 5 and sampler.steps_per_epoch(1) == 1
    sampler.set_epoch(1)
    assert [len(batch) for batch in sampler] == [5]
    assert sampler.current_batch_size(0) == 8  # curation epochs keep their batch

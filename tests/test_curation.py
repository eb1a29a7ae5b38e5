"""Curation functions against plain brute-force loops, and the curator's state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chexficient.curation import CurationConfig, PrototypeCurator
from chexficient.curation.functions import (
    assign_to_prototypes,
    concat_normalized,
    ema_update_prototypes,
    farthest_point_sampling,
    kmeans_init,
    quantile_masks,
    select_samples,
    sinkhorn_knopp,
)


def _clustered(n_per: int, k: int, dim: int = 16, spread: float = 0.3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k, dim, generator=gen), dim=-1) * 3
    points = torch.cat([c + spread * torch.randn(n_per, dim, generator=gen) for c in centers])
    return points, centers


# ----- brute force references ---------------------------------------------------------------------------------------


def naive_masks(distances, cluster_ids, k, q_out, q_sup):
    outlier = torch.zeros_like(distances, dtype=torch.bool)
    support, central = outlier.clone(), outlier.clone()
    for c in range(k):
        m = cluster_ids == c
        if not m.any():
            continue
        hi, lo = torch.quantile(distances[m], q_out), torch.quantile(distances[m], q_sup)
        for i in torch.nonzero(m).flatten().tolist():
            d = distances[i].item()
            outlier[i] = d > hi
            support[i] = lo < d <= hi
            central[i] = d <= lo
    return outlier, support, central


def naive_fps(features, indices, count, start):
    picked = [start]
    while len(picked) < min(count, len(indices)):
        best, best_d = None, -1.0
        for i in indices:
            if i in picked:
                continue
            d = min(torch.dist(features[i], features[j]).item() for j in picked)
            if d > best_d:
                best, best_d = i, d
        picked.append(best)
    return set(picked)


def naive_sinkhorn(sim, eps, iters):
    n, k = sim.shape
    q = [[math.exp(sim[i, j].item() / eps) for i in range(n)] for j in range(k)]  # [K][N]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        for j in range(k):
            s = sum(q[j])
            q[j] = [v / s / k for v in q[j]]
        for i in range(n):
            s = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / s / n
    return [max(range(k), key=lambda j: q[j][i]) for i in range(n)]


# ----- tests --------------------------------------------------------------------------------------------------------


def test_assignment_matches_brute_force():
    points, centers = _clustered(20, 4)
    features = F.normalize(points, dim=-1)
    prototypes = F.normalize(centers + 0.1, dim=-1)
    distances, ids = assign_to_prototypes(features, prototypes)
    for i in range(len(features)):
        d = [torch.dist(features[i], p).item() for p in prototypes]
        assert ids[i].item() == min(range(4), key=lambda j: d[j])
        assert distances[i].item() == pytest.approx(min(d), abs=1e-5)


def test_quantile_masks_match_per_cluster_torch_quantile():
    gen = torch.Generator().manual_seed(3)
    distances = torch.rand(157, generator=gen)
    ids = torch.randint(0, 5, (157,), generator=gen)
    ids[ids == 4] = 3  # cluster 4 is empty
    got = quantile_masks(distances, ids, 5, 0.95, 0.85)
    want = naive_masks(distances, ids, 5, 0.95, 0.85)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_quantile_masks_put_a_distance_equal_to_a_quantile_below_it():
    """Ties with the quantiles: a distance equal to the support quantile is central (d <= q_sup), one equal to the
    outlier quantile is support (d <= q_out); the three masks partition the valid samples."""
    distances = torch.arange(21, dtype=torch.float)  # quantile positions 0.85 * 20 = 17 and 0.95 * 20 = 19: exact
    outlier, support, central = quantile_masks(distances, torch.zeros(21, dtype=torch.long), 1)
    assert torch.nonzero(outlier).flatten().tolist() == [20]
    assert torch.nonzero(support).flatten().tolist() == [18, 19]
    assert torch.nonzero(central).flatten().tolist() == list(range(18))
    gen = torch.Generator().manual_seed(5)
    distances = torch.randint(0, 6, (300,), generator=gen).float() / 5  # many ties with the quantiles
    ids = torch.randint(0, 4, (300,), generator=gen)
    ids[:20] = 4  # invalid (id == num_clusters)
    got = quantile_masks(distances, ids, 4, 0.95, 0.85)
    for g, w in zip(got, naive_masks(distances, ids, 4, 0.95, 0.85)):
        assert torch.equal(g, w)
    assert torch.equal(sum(m.long() for m in got), (ids < 4).long())  # each valid sample in exactly one mask


def test_quantile_mask_sizes():
    distances = torch.arange(100, dtype=torch.float)
    outlier, support, central = quantile_masks(distances, torch.zeros(100, dtype=torch.long), 1)
    assert (outlier.sum().item(), support.sum().item(), central.sum().item()) == (5, 10, 85)
    invalid = torch.full((100,), 1)  # id == num_clusters: excluded
    assert not any(m.any() for m in quantile_masks(distances, invalid, 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fps_picks_the_same_points_as_a_naive_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(90, 8, generator=gen)
    ids = torch.randint(0, 3, (90,), generator=gen)
    candidates = torch.rand(90, generator=gen) < 0.8
    starts = torch.stack([torch.nonzero(candidates & (ids == c)).flatten()[0] for c in range(3)])
    got = farthest_point_sampling(features, candidates, ids, 3, max_per_cluster=10, start_indices=starts)
    want = set()
    for c in range(3):
        members = torch.nonzero(candidates & (ids == c)).flatten().tolist()
        want |= naive_fps(features, members, 10, starts[c].item())
    assert set(torch.nonzero(got).flatten().tolist()) == want


def test_fps_keeps_small_clusters_whole_and_random_starts_are_seeded():
    features = torch.randn(30, 4)
    ids = torch.tensor([0] * 5 + [1] * 25)
    mask = farthest_point_sampling(features, torch.ones(30, dtype=torch.bool), ids, 2, 10)
    assert mask[:5].all() and mask[5:].sum() == 10
    a = farthest_point_sampling(
        features, torch.ones(30, dtype=torch.bool), ids, 2, 10, torch.Generator().manual_seed(4)
    )
    b = farthest_point_sampling(
        features, torch.ones(30, dtype=torch.bool), ids, 2, 10, torch.Generator().manual_seed(4)
    )
    assert torch.equal(a, b)


def test_sinkhorn_matches_naive_loop_and_balances():
    gen = torch.Generator().manual_seed(0)
    sim = torch.rand(12, 3, generator=gen) * 2 - 1
    got = sinkhorn_knopp(sim, 0.5, 3)
    assert torch.equal(got.argmax(1), torch.tensor(naive_sinkhorn(sim, 0.5, 3)))
    assert torch.equal(got.sum(1), torch.ones(12))
    # balanced data, prototypes biased towards cluster 0: argmax would flood one prototype, Sinkhorn spreads it
    angles = torch.cat([a + 0.05 * torch.randn(40, generator=gen) for a in (0.0, 2.1, -2.1)])
    features = torch.stack([angles.cos(), angles.sin()], dim=1)  # three balanced clusters on the circle
    bias = torch.tensor([0.0, 0.2, 0.4])  # all prototypes crowd the first cluster
    prototypes = torch.stack([bias.cos(), bias.sin()], dim=1)
    counts = sinkhorn_knopp(features @ prototypes.t(), 0.5, 3).sum(0)
    greedy = F.one_hot((features @ prototypes.t()).argmax(1), 3).sum(0)
    assert greedy.min() <= 5  # plain nearest-prototype assignment all but starves one prototype
    assert counts.max() - counts.min() < greedy.max() - greedy.min()
    assert counts.min() >= 4 * greedy.min() + 5  # three iterations at epsilon 0.5 rebalance, partly


def reference_sinkhorn(similarities: torch.Tensor, epsilon: float, iterations: int, rows_first: bool = True):
    """Sinkhorn-Knopp in float64 numpy, written from the algorithm: (argmax prototype [N], its relative margin over
    the runner-up [N]). `rows_first=False` normalises the samples (columns) before the prototypes (rows)."""
    plan = np.exp(similarities.double().numpy().T / epsilon)  # [K, N]
    plan /= plan.sum()
    k, n = plan.shape
    for _ in range(iterations):
        for axis in (1, 0) if rows_first else (0, 1):
            plan = plan / plan.sum(axis=axis, keepdims=True) / (k if axis == 1 else n)
    top = np.sort(plan, axis=0)
    return plan.argmax(axis=0), (top[-1] - top[-2]) / top[-1]


@pytest.mark.parametrize("epsilon, iterations", [(0.5, 3), (0.5, 1), (0.1, 3)])
def test_sinkhorn_normalises_prototypes_then_samples_on_a_480_super_batch(epsilon, iterations):
    """On the paper's 480 x 6 shape, with prototypes of unequal pull (where the order of the two normalisations
    changes assignments), the implementation gives the float64 reference's assignment of every sample that is not
    a near tie; the swapped order, on the same input, would not."""
    gen = torch.Generator().manual_seed(0)
    similarities = torch.rand(480, 6, generator=gen) * 2 - 1 + torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    expected, margin = reference_sinkhorn(similarities, epsilon, iterations)
    swapped, _ = reference_sinkhorn(similarities, epsilon, iterations, rows_first=False)
    clear = margin > 1e-4  # float32 cannot be asked to settle closer calls
    assert clear.sum() >= 470
    assert ((swapped != expected) & clear).sum() >= 1  # the input tells the two orders apart
    got = sinkhorn_knopp(similarities, epsilon, iterations).argmax(1).numpy()
    np.testing.assert_array_equal(got[clear], expected[clear])


def test_ema_update_by_hand():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    features = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    assignments = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # both to prototype 0, none to 1
    updated = ema_update_prototypes(prototypes, features, assignments, decay=0.9)
    expected0 = F.normalize(torch.tensor([0.9 + 0.1 * 0.3, 0.1 * 0.9]), dim=0)
    torch.testing.assert_close(updated[0], expected0)
    torch.testing.assert_close(updated[1], torch.tensor([0.0, 1.0]))  # empty cluster keeps its direction


def test_kmeans_recovers_clusters_deterministically():
    points, centers = _clustered(30, 4, spread=0.1)
    a = kmeans_init(points, 4, generator=torch.Generator().manual_seed(0))
    b = kmeans_init(points, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    similarity = a @ F.normalize(centers, dim=-1).t()
    assert (similarity.max(dim=0).values > 0.99).all()  # each true centre has a centroid on it
    with pytest.raises(ValueError, match="at least 4"):
        kmeans_init(points[:3], 4)


def test_select_keeps_about_the_papers_share_of_a_480_super_batch():
    points, centers = _clustered(80, 6, dim=32, spread=0.6)
    features = concat_normalized(points[:, :16], points[:, 16:])
    prototypes = F.normalize(torch.cat([centers[:, :16], centers[:, 16:]], dim=-1), dim=-1)
    result = select_samples(features, prototypes, generator=torch.Generator().manual_seed(0))
    kept = result.keep.sum().item()
    assert 90 <= kept <= 120  # the paper: 22.7% (~108 of 480)
    assert not (result.keep & result.outlier).any()
    assert torch.equal(result.keep, result.support | result.central_selected)
    again = select_samples(features, prototypes, generator=torch.Generator().manual_seed(0))
    assert torch.equal(result.keep, again.keep)
    invalid = torch.ones(480, dtype=torch.bool)
    invalid[:40] = False
    assert not select_samples(features, prototypes, valid=invalid).keep[:40].any()


def test_curator_accumulates_ids_and_round_trips(tmp_path):
    points, _ = _clustered(40, 3, dim=16)
    images, texts = points[:, :8], points[:, 8:]
    curator = PrototypeCurator(CurationConfig(num_prototypes=3), num_samples=200)
    curator.initialize(images, texts, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(120) + 50
    result = curator.select(images, texts, ids, generator=torch.Generator().manual_seed(1))
    assert torch.equal(curator.curated_ids(), ids[result.keep].sort().values)
    curator.select(images, texts, ids, generator=torch.Generator().manual_seed(2))  # same ids again: no duplicates
    assert curator.curated_ids().unique().numel() == curator.curated_ids().numel()
    curator.update_prototypes(concat_normalized(images, texts)[result.keep])
    torch.save(curator.state_dict(), tmp_path / "curator.pt")
    restored = PrototypeCurator(CurationConfig(num_prototypes=3), num_samples=200)
    restored.load_state_dict(torch.load(tmp_path / "curator.pt", weights_only=True))
    torch.testing.assert_close(restored.prototypes, curator.prototypes)
    a = curator.select(images, texts, ids, generator=torch.Generator().manual_seed(3))
    b = restored.select(images, texts, ids, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.keep, b.keep) and torch.equal(curator.curated_ids(), restored.curated_ids())
    assert 0 < curator.stats()["kept_fraction"] <= 1
    with pytest.raises(ValueError, match="200 samples"):
        PrototypeCurator(CurationConfig(num_prototypes=3), num_samples=10).load_state_dict(curator.state_dict())

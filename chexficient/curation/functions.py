"""Prototype-driven data curation as pure tensor functions (no I/O, no torch.distributed, no global RNG).

Each pair is the L2-normalised concatenation [image ; text] of its embeddings. Pairs are assigned to their nearest
prototype; within each cluster the farthest 5% (by distance quantile) are dropped as outliers, the next 10% are all
kept as support, and at most `max_per_cluster` of the central rest are kept by farthest point sampling. Prototypes
start from k-means and then follow an EMA of the kept pairs, assigned by Sinkhorn-Knopp. The defaults are the
released model's. Everything is vectorised over samples and clusters and never syncs with the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SelectionResult:
    """Masks over the N candidates of one selection, and their nearest prototype."""

    keep: torch.Tensor  # [N] bool: support | central_selected (all valid pairs if that would be empty)
    outlier: torch.Tensor  # [N] bool: beyond the outlier quantile of their cluster (dropped)
    support: torch.Tensor  # [N] bool: between the support and outlier quantiles (all kept)
    central_selected: torch.Tensor  # [N] bool: central pairs picked by farthest point sampling
    cluster_ids: torch.Tensor  # [N] long: nearest prototype
    distances: torch.Tensor  # [N] float: Euclidean distance to it


def concat_normalized(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """[N, D] and [N, D] -> L2-normalised [N, 2D] concatenation (float32)."""
    return F.normalize(torch.cat([image_embeds.float(), text_embeds.float()], dim=-1), dim=-1)


def assign_to_prototypes(features: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance [N] to the nearest of the prototypes [K, D], and its index [N]."""
    if features.shape[-1] != prototypes.shape[-1]:
        raise ValueError(f"features have {features.shape[-1]} dims but prototypes {prototypes.shape[-1]}.")
    distances = torch.cdist(features.float(), prototypes.float().to(features.device))  # [N, K]
    return distances.min(dim=1)


def per_cluster_quantiles(
    values: torch.Tensor, cluster_ids: torch.Tensor, num_clusters: int, quantiles: torch.Tensor
) -> torch.Tensor:
    """Quantiles [K, Q] of `values` within each cluster, linearly interpolated like `torch.quantile`.

    Samples whose cluster id is `num_clusters` or more are ignored; rows of empty clusters are undefined.
    """
    n = values.numel()
    by_value = torch.argsort(values)
    order = by_value[torch.argsort(cluster_ids[by_value], stable=True)]  # sorted by (cluster, value)
    sorted_values = values[order]
    counts = torch.bincount(cluster_ids.clamp(max=num_clusters), minlength=num_clusters + 1)[:num_clusters]
    starts = torch.cumsum(counts, 0) - counts  # [K]
    position = quantiles.to(values)[None, :] * (counts[:, None] - 1).clamp(min=0).to(values)  # [K, Q]
    low = position.floor()
    fraction = position - low
    low_index = (starts[:, None] + low.long()).clamp(0, max(n - 1, 0))
    high_index = (starts[:, None] + position.ceil().long()).clamp(0, max(n - 1, 0))
    return torch.lerp(sorted_values[low_index], sorted_values[high_index], fraction)


def quantile_masks(
    distances: torch.Tensor,
    cluster_ids: torch.Tensor,
    num_clusters: int,
    outlier_quantile: float = 0.95,
    support_quantile: float = 0.85,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(outlier, support, central) masks [N] from per-cluster distance quantiles.

    outlier: d > q_out; support: q_sup < d <= q_out; central: d <= q_sup, each against the sample's own cluster.
    Samples with cluster id >= `num_clusters` (invalid) are in no mask.
    """
    if not 0.0 <= support_quantile < outlier_quantile <= 1.0:
        raise ValueError(
            f"need 0 <= support_quantile < outlier_quantile <= 1, got {support_quantile}, {outlier_quantile}."
        )
    quantiles = torch.tensor([outlier_quantile, support_quantile], device=distances.device)
    table = per_cluster_quantiles(distances, cluster_ids, num_clusters, quantiles)  # [K, 2]
    valid = cluster_ids < num_clusters
    own = table[cluster_ids.clamp(max=num_clusters - 1)]  # [N, 2]
    q_out, q_sup = own[:, 0], own[:, 1]
    outlier = valid & (distances > q_out)
    support = valid & (distances > q_sup) & (distances <= q_out)
    central = valid & (distances <= q_sup)
    return outlier, support, central


def farthest_point_sampling(
    features: torch.Tensor,
    candidate_mask: torch.Tensor,
    cluster_ids: torch.Tensor,
    num_clusters: int,
    max_per_cluster: int = 10,
    generator: torch.Generator | None = None,
    start_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy farthest point sampling of at most `max_per_cluster` candidates per cluster, all clusters at once.

    Each cluster starts from a uniformly random candidate (or `start_indices` [K]) and repeatedly adds the candidate
    farthest (Euclidean) from those already picked; ties go to the lowest index. Clusters with at most
    `max_per_cluster` candidates keep all of them. Returns a bool mask [N].
    """
    n = features.shape[0]
    features = features.float()
    cluster_range = torch.arange(num_clusters, device=features.device)
    members = candidate_mask[None, :] & (cluster_ids[None, :] == cluster_range[:, None])  # [K, N]
    counts = members.sum(dim=1)  # [K]
    if start_indices is None:
        noise = torch.rand(num_clusters, n, generator=generator, device=features.device)
        start_indices = torch.where(members, noise, -1.0).argmax(dim=1)  # a uniform random member per cluster
    selected = torch.zeros_like(members)
    min_distance = torch.where(members, torch.inf, -torch.inf)  # non-members can never be picked
    rows = cluster_range
    for step in range(max_per_cluster):
        pick = start_indices if step == 0 else min_distance.argmax(dim=1)  # [K]
        active = step < counts  # clusters that still have unpicked members
        selected[rows, pick] |= active
        distance = torch.cdist(features[pick], features)  # [K, N]
        min_distance = torch.minimum(min_distance, distance)
        min_distance = torch.where(selected, -torch.inf, min_distance)
    return selected.any(dim=0)


def select_samples(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    outlier_quantile: float = 0.95,
    support_quantile: float = 0.85,
    max_per_cluster: int = 10,
    generator: torch.Generator | None = None,
) -> SelectionResult:
    """One curation decision over a super-batch of concatenated embeddings `features` [N, 2D].

    `valid` [N] excludes pairs (e.g. unreadable images) from clustering and selection. If nothing would be kept,
    every valid pair is kept, as the reference does.
    """
    num_clusters = prototypes.shape[0]
    distances, cluster_ids = assign_to_prototypes(features, prototypes)
    if valid is None:
        valid = torch.ones_like(cluster_ids, dtype=torch.bool)
    masked_ids = torch.where(valid, cluster_ids, num_clusters)
    outlier, support, central = quantile_masks(distances, masked_ids, num_clusters, outlier_quantile, support_quantile)
    central_selected = farthest_point_sampling(
        features, central, masked_ids, num_clusters, max_per_cluster, generator=generator
    )
    keep = support | central_selected
    keep = torch.where(keep.any(), keep, valid)
    return SelectionResult(keep, outlier, support, central_selected, cluster_ids, distances)


def sinkhorn_knopp(similarities: torch.Tensor, epsilon: float = 0.5, num_iterations: int = 3) -> torch.Tensor:
    """Balanced assignment of N samples to K prototypes from similarities [N, K], hardened to one-hot [N, K].

    The transport plan alternates prototype (row) and sample (column) normalisation as in the reference, then each
    sample takes its highest-mass prototype.
    """
    if similarities.ndim != 2:
        raise ValueError(f"similarities must be [N, K], got shape {tuple(similarities.shape)}.")
    n, k = similarities.shape
    if n == 0:
        return similarities.new_zeros(0, k)
    logits = similarities.float() / epsilon
    plan = torch.exp(logits - logits.max()).t()  # [K, N]; the shift cancels in the normalisations
    plan = plan / plan.sum()
    for _ in range(num_iterations):
        plan = plan / plan.sum(dim=1, keepdim=True) / k
        plan = plan / plan.sum(dim=0, keepdim=True) / n
    plan = plan * n
    return F.one_hot(plan.t().argmax(dim=1), num_classes=k).float()


def ema_update_prototypes(
    prototypes: torch.Tensor, features: torch.Tensor, assignments: torch.Tensor, decay: float = 0.9
) -> torch.Tensor:
    """p_k <- decay * p_k + (1 - decay) * mean of the features assigned to k (zero if none); rows L2-normalised."""
    weights = assignments.float()  # [N, K]
    sums = weights.t() @ features.float()  # [K, D]
    means = sums / (weights.sum(dim=0)[:, None] + 1e-8)
    return F.normalize(decay * prototypes.float() + (1.0 - decay) * means, dim=-1)


def kmeans_init(
    features: torch.Tensor,
    num_clusters: int = 6,
    *,
    num_iterations: int = 20,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on `features` [N, D]; returns L2-normalised centroids [K, D].

    An empty cluster is re-seeded with the sample farthest from its centroid.
    """
    n = features.shape[0]
    if n < num_clusters:
        raise ValueError(f"k-means needs at least {num_clusters} samples, got {n}.")
    points = features.float()
    first = torch.randint(n, (1,), generator=generator, device=points.device)
    centroids = points[first]  # [1, D]
    for _ in range(1, num_clusters):
        nearest = torch.cdist(points, centroids).min(dim=1).values.square()  # [N]
        weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
        chosen = torch.multinomial(weights, 1, generator=generator)
        centroids = torch.cat([centroids, points[chosen]])
    for _ in range(num_iterations):
        distances = torch.cdist(points, centroids)  # [N, K]
        nearest, labels = distances.min(dim=1)
        one_hot = F.one_hot(labels, num_clusters).float()  # [N, K]
        counts = one_hot.sum(dim=0)  # [K]
        means = (one_hot.t() @ points) / counts.clamp(min=1)[:, None]
        farthest = points[nearest.argmax()]
        centroids = torch.where(counts[:, None] > 0, means, farthest[None, :])
    return F.normalize(centroids, dim=-1)

"""Re-ID retrieval metrics: cosine distance, CMC (rank-k) and mAP over a query/gallery split.

The definitions are the standard ones (Market-1501's protocol), as torchreid's
``torchreid.metrics.evaluate_rank`` computes them (its ``eval_market1501``): for each query, the
gallery images of the same identity seen by the same camera are removed; a query with no
remaining match is left out; its CMC curve is 1 from the rank of its first true match on; its
average precision is the mean, over its true matches, of the precision at each match's rank; the
gallery is ordered by ``numpy.argsort`` of the distances (the same tie order as torchreid).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def cosine_distance(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """1 - cos(q, g) for every pair: (Q, D), (G, D) -> (Q, G); torchreid's ``metric="cosine"``."""
    return 1 - F.normalize(query, dim=1) @ F.normalize(gallery, dim=1).t()


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50):
    """(CMC curve of length ``max_rank`` as float32 numpy, mAP as a float); torchreid's Market-1501 protocol."""
    distmat, q_pids, g_pids, q_camids, g_camids = (
        np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
        for v in (distmat, q_pids, g_pids, q_camids, g_camids))
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    order = np.argsort(distmat, axis=1)
    matches = (g_pids[order] == q_pids[:, None]).astype(np.int32)
    cmcs, aps = [], []
    for q in range(num_q):
        keep = ~((g_pids[order[q]] == q_pids[q]) & (g_camids[order[q]] == q_camids[q]))
        hits = matches[q][keep]
        if not hits.any():
            continue
        cmc = hits.cumsum()
        cmc[cmc > 1] = 1
        cmcs.append(cmc[:max_rank])
        precision = hits.cumsum() / (np.arange(len(hits)) + 1.0)
        aps.append(float((precision * hits).sum() / hits.sum()))
    if not cmcs:
        raise ValueError("no query has a true match in the gallery")
    return np.asarray(cmcs).astype(np.float32).sum(0) / len(cmcs), float(np.mean(aps))


def rank1_map(query_features, gallery_features, q_pids, g_pids, q_camids, g_camids) -> tuple[float, float]:
    """(rank-1, mAP) of the features by cosine distance."""
    distmat = cosine_distance(query_features.double(), gallery_features.double())
    cmc, mean_ap = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids)
    return float(cmc[0]), mean_ap

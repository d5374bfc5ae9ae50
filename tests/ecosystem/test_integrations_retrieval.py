"""bench/lib/retrieval.py against torchreid's own metrics: the same rank-1/CMC and mAP as ``evaluate_rank``
(its Python and Cython code) and the same cosine distances as ``compute_distance_matrix``.

The convergence tests and study (issue 31) report re-ID metrics with ``bench.lib.retrieval`` so that the
main venv needs no torchreid; this file checks, where torchreid is installed (CI's toolbox venv), that
those are torchreid's numbers.
"""
import numpy as np
import pytest
import torch

torchreid = pytest.importorskip("torchreid")

from bench.lib.reid_data import SyntheticReID  # noqa: E402
from bench.lib.retrieval import cosine_distance, evaluate_rank, rank1_map  # noqa: E402

metrics = torchreid.metrics


def split(seed: int, num_q: int = 23, num_g: int = 97, ids: int = 12):
    """Random pids and camids (with same-camera matches to exclude, and queries left without a match)."""
    gen = torch.Generator().manual_seed(seed)
    q_pids = torch.randint(0, ids, (num_q,), generator=gen).numpy()
    g_pids = torch.randint(0, ids + 3, (num_g,), generator=gen).numpy()
    q_camids = torch.randint(0, 3, (num_q,), generator=gen).numpy()
    g_camids = torch.randint(0, 3, (num_g,), generator=gen).numpy()
    return q_pids, g_pids, q_camids, g_camids


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("use_cython", [False, True])
def test_evaluate_rank_matches_torchreid(seed, use_cython):
    q_pids, g_pids, q_camids, g_camids = split(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    distmat = torch.rand(len(q_pids), len(g_pids), generator=gen, dtype=torch.float64).numpy()
    theirs_cmc, theirs_map = metrics.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20,
                                                   use_cython=use_cython)
    ours_cmc, ours_map = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20)
    np.testing.assert_allclose(ours_cmc, theirs_cmc, rtol=0, atol=1e-6)
    assert ours_map == pytest.approx(float(theirs_map), abs=1e-6)


def test_cosine_distance_and_metrics_on_features_match_torchreid():
    """The convergence study's path end to end: features -> cosine distances -> (rank-1, mAP)."""
    data = SyntheticReID(32, 16, num_train_ids=4, num_test_ids=6, gallery_per_id=3, seed=0)
    qg = data.query_gallery()
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3 * 32 * 16, 24, generator=gen)
    qf, gf = qg.query.flatten(1) @ weight, qg.gallery.flatten(1) @ weight
    theirs = metrics.compute_distance_matrix(qf, gf, metric="cosine")
    torch.testing.assert_close(cosine_distance(qf, gf), theirs, rtol=0, atol=1e-5)
    cmc, mean_ap = metrics.evaluate_rank(theirs.double().numpy(), qg.query_pids.numpy(), qg.gallery_pids.numpy(),
                                         qg.query_camids.numpy(), qg.gallery_camids.numpy(), max_rank=10)
    rank1, ours_map = rank1_map(qf, gf, qg.query_pids, qg.gallery_pids, qg.query_camids, qg.gallery_camids)
    assert rank1 == pytest.approx(float(cmc[0]), abs=1e-6)
    assert ours_map == pytest.approx(float(mean_ap), abs=1e-6)

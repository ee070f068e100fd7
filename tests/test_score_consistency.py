"""One score per pair: exact search, range search, top-K pairs, the index re-rank and Tinsley's
consensus report the same (canonical) score for a pair, so a threshold set to a reported score
keeps that pair; exact copies of a row tie exactly and are ordered by ascending index in every
engine; search() refuses a keyword that contradicts its config."""

from __future__ import annotations

import numpy as np
import pytest

from raylead import exact
from raylead.attacks import EmbeddedSet, Threshold
from raylead.attacks.tinsley import consensus, flagged_pairs
from raylead.errors import ConfigError
from raylead.search import IndexSearcher, SearchConfig, build_memory_index, search


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module", params=[128, 512])
def vecs(request):
    rng = np.random.default_rng(request.param)
    base = _unit(rng.standard_normal((1500, request.param)))
    q = _unit(rng.standard_normal((60, request.param)))
    return q, base


# -- 1. a threshold set to a reported score keeps the pair ----------------------------------------
@pytest.mark.parametrize("device", ["cpu", "torch"])
def test_range_search_keeps_pair_at_its_reported_top1_score(vecs, device):
    q, base = vecs
    s, i = exact.exact_search(q, base, 1, device=device)
    missed = []
    for r in range(q.shape[0]):
        lims, rs, ri = exact.range_search(q[r : r + 1], base, float(s[r, 0]), device=device)
        hit = np.flatnonzero(ri == i[r, 0])
        if not hit.size:
            missed.append(r)
        else:  # and reports the very same score
            assert rs[hit[0]] == s[r, 0]
    assert not missed, f"θ = top-1 score dropped the top-1 pair of {len(missed)}/{q.shape[0]} queries"


def test_every_path_reports_the_same_score(vecs):
    q, base = vecs
    s, i = exact.exact_search(q, base, 5, device="cpu")
    st, it = exact.exact_search(q, base, 5, device="torch")
    np.testing.assert_array_equal(i, it)
    np.testing.assert_array_equal(s, st)
    rows = np.repeat(np.arange(q.shape[0]), 5)
    np.testing.assert_array_equal(exact.pair_scores(q[rows], base[i.ravel()]), s.ravel())
    theta = float(s.min())
    lims, rs, ri = exact.range_search(q, base, theta, block_size=400)
    got = {}
    for r in range(q.shape[0]):
        seg = slice(lims[r], lims[r + 1])
        got.update({(r, int(b)): v for b, v in zip(ri[seg], rs[seg], strict=True)})
    for r in range(q.shape[0]):
        for b, v in zip(i[r], s[r], strict=True):
            assert got[(r, int(b))] == v
    ps, pq_, pb = exact.topk_pairs(q, base, 40, block_size=300)
    np.testing.assert_array_equal(ps, exact.pair_scores(q[pq_], base[pb]))
    # every pair range search returns is ≥ θ by its reported score, and only those
    assert (rs >= np.float32(theta)).all()


def test_index_rerank_reports_the_canonical_score():
    rng = np.random.default_rng(3)
    base = _unit(rng.standard_normal((3000, 64)))
    q = _unit(base[:40] + 0.05 * rng.standard_normal((40, 64)).astype(np.float32))
    from raylead.index import IndexBuildConfig

    mem = build_memory_index(base, IndexBuildConfig(executor="local"))
    with IndexSearcher(mem) as searcher:
        s, i, _ = searcher.search(q, 5, 8, 8)
        rows = np.repeat(np.arange(40), 5)
        np.testing.assert_array_equal(s.ravel(), exact.pair_scores(q[rows], base[i.ravel()]))
        np.testing.assert_array_equal(searcher.pair_scores(q, i[:, 0]), s[:, 0])
        es, ei = searcher.exact_search(q, 5)
        np.testing.assert_array_equal(es, exact.exact_search(q, base, 5)[0])
        lims, rs, ri = searcher.range_search(q, float(s[0, 0]))
        assert i[0, 0] in ri[lims[0] : lims[1]]  # θ = the re-ranked top-1 score keeps its pair


def test_tinsley_consensus_flags_pair_at_its_reported_score(vecs):
    q, base = vecs
    gen = EmbeddedSet.from_arrays(q, [f"g{r}" for r in range(q.shape[0])])
    trn = EmbeddedSet.from_arrays(base, [f"t{r}" for r in range(base.shape[0])])
    s, i = exact.exact_search(q, base, 1)
    dropped = 0
    for r in range(0, q.shape[0], 3):
        theta = float(s[r, 0])
        qq, tt = flagged_pairs(gen, trn, theta)
        dropped += not ((qq == r) & (tt == i[r, 0])).any()
    assert dropped == 0
    theta = float(np.median(s[:, 0]))
    c = consensus({"a": gen}, {"a": trn}, {"a": Threshold(theta, "x")})
    # flagged exactly when the reported score reaches θ, and the best match's score is the same
    assert (c.scores["a"] >= np.float32(theta)).all() and c.flagged["a"].all()
    best = {(f"g{r}", f"t{i[r, 0]}"): s[r, 0] for r in range(q.shape[0]) if s[r, 0] >= np.float32(theta)}
    pairs = dict(zip(zip(c.synthetic_ids, c.train_ids, strict=True), c.scores["a"], strict=True))
    for key, v in best.items():
        assert pairs[key] == v


# -- 2. exact copies tie exactly and go by ascending index, in every engine -----------------------
@pytest.mark.parametrize("device,block", [("cpu", 16384), ("cpu", 250), ("torch", 16384), ("torch", 7)])
@pytest.mark.parametrize("dim", [37, 128])
def test_duplicate_rows_tie_by_ascending_index(device, block, dim):
    rng = np.random.default_rng(dim)
    base = _unit(rng.standard_normal((600, dim)))
    copies = [3, 11, 250, 499, 599]
    for p in copies:
        base[p] = base[11]
    q = _unit(base[11] + (0.5 / np.sqrt(dim)) * rng.standard_normal((80, dim)).astype(np.float32))
    s, i = exact.exact_search(q, base, 5, block_size=block, device=device)
    assert (s == s[:, :1]).all(), "exact copies of a row scored differently"
    assert (i == np.array(copies)).all(), "ties not ordered by ascending base index"
    lims, rs, ri = exact.range_search(q, base, float(s.min()), block_size=block, device=device)
    for r in range(q.shape[0]):
        assert ri[lims[r] : lims[r] + 5].tolist() == copies


def test_many_near_ties_past_k_are_deepened():
    """More exact copies than k + the spare candidates: the top k are still the lowest indices."""
    rng = np.random.default_rng(9)
    base = _unit(rng.standard_normal((400, 32)))
    copies = list(range(380, 340, -1))  # 40 copies, filled from the end
    for p in copies:
        base[p] = base[0]
    q = base[:1] * 1.0
    s, i = exact.exact_search(q, base, 3, device="cpu")
    assert i[0].tolist() == [0, 341, 342] and (s == s[0, 0]).all()


# -- 3. search(): a keyword that contradicts the config is refused --------------------------------
@pytest.mark.parametrize(
    "kwargs,config,needle",
    [
        ({"k": 5}, SearchConfig(k=3), "k=5 and config.k=3"),
        ({"engine": "approximate"}, SearchConfig(engine="exact"), "engine='approximate' and config.engine='exact'"),
        ({"target_recall": 0.9}, SearchConfig(), "target_recall=0.9 and config.target_recall=0.99"),
        ({"nprobe": 4, "k_factor": 2}, SearchConfig(nprobe=8, k_factor=2), "nprobe=4 and config.nprobe=8"),
        ({"nprobe": 8, "k_factor": 4}, SearchConfig(nprobe=8, k_factor=2), "k_factor=4 and config.k_factor=2"),
        ({"device": "torch"}, SearchConfig(device="cpu"), "device='torch' and config.device='cpu'"),
    ],
)
def test_search_refuses_keyword_conflicting_with_config(kwargs, config, needle):
    rng = np.random.default_rng(0)
    base, q = _unit(rng.standard_normal((50, 8))), _unit(rng.standard_normal((4, 8)))
    with pytest.raises(ConfigError) as err:
        search(q, base, config=config, **kwargs)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_search_keyword_agreeing_with_config_or_alone_works():
    rng = np.random.default_rng(0)
    base, q = _unit(rng.standard_normal((50, 8))), _unit(rng.standard_normal((4, 8)))
    assert search(q, base, 3, config=SearchConfig(k=3, engine="exact")).idx.shape == (4, 3)
    assert search(q, base, np.int64(3), "exact", config=SearchConfig(k=3, engine="exact")).idx.shape == (4, 3)
    assert search(q, base, config=SearchConfig(k=4, engine="exact")).idx.shape == (4, 4)
    assert search(q, base, 2, engine="exact").idx.shape == (4, 2)
    assert search(q, base, engine="exact").idx.shape == (4, 10)  # SearchConfig's default k


def test_torch_score_blocks_stay_on_their_device_and_select_like_numpy() -> None:
    """On a torch device (a GPU on a cluster; torch's CPU here) the blocked range search and
    top-K pairs keep each score block as a tensor where it was computed: only the coordinates of
    the selected scores (and a block's K-th largest) leave it, never the whole block to be
    scanned on the host. The selections equal numpy's on the same block."""
    import torch

    rng = np.random.default_rng(9)
    q, base = _unit(rng.standard_normal((70, 32))), _unit(rng.standard_normal((300, 32)))
    blocks = list(exact._score_blocks(q, base, 128, "torch"))
    assert len(blocks) == 3 and all(isinstance(s.s, torch.Tensor) for _, _, s, _ in blocks)
    for *_, s, _ in blocks:
        ref = exact._Scores(s.s.numpy())
        for floor in (-1.0, 0.1, 0.3, float(s.s.max()), 2.0):
            got, want = s.at_least(floor), ref.at_least(floor)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
        assert s.kth_largest(50) == ref.kth_largest(50) and s.size == ref.size
    # and the searches built on them agree with the numpy engine
    lims_t, s_t, i_t = exact.range_search(q, base, 0.3, block_size=128, device="torch")
    lims_c, s_c, i_c = exact.range_search(q, base, 0.3, block_size=128, device="cpu")
    np.testing.assert_array_equal(lims_t, lims_c)
    np.testing.assert_array_equal(i_t, i_c)
    np.testing.assert_array_equal(s_t, s_c)
    for a, b in zip(exact.topk_pairs(q, base, 40, block_size=128, device="torch"),
                    exact.topk_pairs(q, base, 40, block_size=128, device="cpu"), strict=True):
        np.testing.assert_array_equal(a, b)

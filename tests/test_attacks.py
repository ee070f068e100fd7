"""The attacks' pure layer against brute-force numpy, and their run layer / CLI on small collections."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raylead.attacks import (
    EmbeddedSet,
    MatcherSpec,
    SearchBase,
    Threshold,
    auc_mann_whitney,
    best_match,
    histogram,
    histogram_edges,
    nearest,
    parse_matchers,
    set_aside,
)
from raylead.attacks.idiap import IdiapConfig, idiap_attack, run_idiap, top_pairs, top_pairs_bruteforce
from raylead.attacks.tinsley import (
    TinsleyConfig,
    consensus,
    flagged_pairs,
    matcher_leakage,
    parse_threshold_pairs,
    run_tinsley,
    two_sample_tests,
)
from raylead.attacks.webster import (
    WebsterConfig,
    centroids,
    identify,
    pr_curve,
    run_webster,
    score_flags,
    tau_for,
    train_linear,
    webster_attack,
)
from raylead.errors import ConfigError


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n_ids: int, per_id: int, dim: int = 32, noise: float = 0.7, seed: int = 0, centres=None):
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = unit(rng.normal(size=(n_ids, dim)))
    labels = np.repeat(np.arange(len(centres)), per_id)
    x = unit(
        centres[labels]
        + noise * rng.normal(size=(labels.size, centres.shape[1])) / math.sqrt(centres.shape[1])
    )
    return x, labels, centres


def record_collection_reads(monkeypatch) -> list[tuple[str, bool]]:
    """From now on, every ``catalog.read_collection`` call is recorded as (uri, vectors)."""
    from raylead import catalog

    reads: list[tuple[str, bool]] = []
    real = catalog.read_collection

    def recording(uri, *, vectors=True):
        reads.append((str(uri), vectors))
        return real(uri, vectors=vectors)

    monkeypatch.setattr(catalog, "read_collection", recording)
    return reads


# ------------------------------------------------------------------------------------------
# shared statistics
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = np.round(rng.normal(0.3, 1, size=rng.integers(1, 60)), 1)
    b = np.round(rng.normal(0.0, 1, size=rng.integers(1, 60)), 1)
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert auc_mann_whitney(a, b) == pytest.approx(brute)
    assert auc_mann_whitney(a, np.array([])) is None


def test_histogram_covers_all_values() -> None:
    v = np.array([0.1, 0.2, 0.2, 0.9])
    edges = histogram_edges(v, np.array([0.95]), bins=4)
    h = histogram(v, edges)
    assert len(h.edges) == 5 and sum(h.counts) == 4 and h.edges[0] == 0.1 and h.edges[-1] == 0.95
    np.testing.assert_allclose(histogram_edges(bins=3), [-1.0, -1 / 3, 1 / 3, 1.0])


def test_matcher_spec_parse() -> None:
    s = MatcherSpec.parse("onnx:model=/m/mobilefacenet.onnx:detector=/d/det_500m.onnx")
    assert (s.name, s.model, s.detector, s.label) == (
        "onnx",
        "/m/mobilefacenet.onnx",
        "/d/det_500m.onnx",
        "onnx-mobilefacenet",
    )
    assert MatcherSpec.parse(s.text) == s
    assert MatcherSpec.parse("dlib").with_options(detector="x.onnx").detector == "x.onnx"
    assert [m.label for m in parse_matchers("dlib, onnx:model=a.onnx")] == ["dlib", "onnx-a"]
    with pytest.raises(ConfigError, match="twice"):
        parse_matchers("dlib,dlib")
    with pytest.raises(ConfigError, match="cannot read matcher spec"):
        MatcherSpec.parse("onnx:colour=red")


def test_matcher_spec_input_convention() -> None:
    """channels/mean/std in a spec (AdaFace: BGR) reach the matcher's options and the embed
    config, survive the text round trip and CLI flags; bad values are one-line errors."""
    s = MatcherSpec.parse("onnx:model=ada.onnx:channels=bgr:mean=127.5:std=128")
    assert MatcherSpec.parse(s.text) == s and s.text == "onnx:model=ada.onnx:channels=bgr:mean=127.5:std=128"
    assert s.matcher_options() == {"model": "ada.onnx", "bgr": True, "mean": 127.5, "std": 128.0}
    assert s.with_options(detector="d.onnx").matcher_options() == s.matcher_options()
    emb = s.embed_options()
    assert (emb["channels"], emb["input_mean"], emb["input_std"], emb["model"]) == ("bgr", 127.5, 128.0, "ada.onnx")
    assert MatcherSpec.parse("onnx:model=a.onnx").matcher_options() == {"model": "a.onnx"}
    assert s.label == "onnx-ada-bgr-mean127.5-std128" and MatcherSpec.parse("onnx:model=ada.onnx").label == "onnx-ada"
    assert [m.label for m in parse_matchers("onnx:model=ada.onnx,onnx:model=ada.onnx:channels=bgr")] == [
        "onnx-ada", "onnx-ada-bgr"]
    for bad, says in [
        ("onnx:model=a.onnx:channels=rbg", "channels='rbg' is not one of rgb, bgr"),
        ("onnx:model=a.onnx:std=0", "std=0.0 must be a finite number ≠ 0"),
        ("onnx:model=a.onnx:mean=nan", "mean=nan must be a finite number"),
        ("onnx:model=a.onnx:mean=grey", "matcher mean='grey' is not a number"),
        ("dlib:channels=bgr", "set the input of onnx models; matcher 'dlib' has its own"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            MatcherSpec.parse(bad)


def test_set_aside_failures_and_floor() -> None:
    x, _, _ = clustered(2, 3)
    es = EmbeddedSet.from_arrays(x, det_scores=np.array([0.9, 0.2, np.nan, 0.5, 0.49, 0.8]))
    es.failed_ids, es.failed_reasons = ["bad.jpg"], ["no_face"]
    kept, aside = set_aside(es, 0.5)
    assert kept.ids == ["img000000", "img000002", "img000003", "img000005"]
    assert aside.ids == ["bad.jpg", "img000001", "img000004"]
    assert aside.by_reason() == {"det_score_below_floor": 2, "no_face": 1}
    assert aside.unknown_det_score == 1 and kept.failed_ids == []
    assert np.array_equal(kept.embeddings, x[[0, 2, 3, 5]])


# ------------------------------------------------------------------------------------------
# idiap
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 7, 50, 400])
@pytest.mark.parametrize("twice", [False, True])
def test_top_pairs_equal_brute_force(seed: int, k: int, twice: bool) -> None:
    t, t_lab, centres = clustered(12, 5, seed=seed)
    s, s_lab, _ = clustered(12, 3, seed=seed + 100, centres=centres)
    s = np.concatenate([s, t[:3]])  # exact copies: ties and perfect matches
    s_groups = np.concatenate([s_lab, [99, 99, 98]])
    got = top_pairs(
        s,
        t,
        k,
        no_identity_twice=twice,
        synthetic_groups=s_groups,
        train_groups=t_lab,
        engine="exact",
        k_start=2,
    )
    sc, ti, si = top_pairs_bruteforce(
        s, t, k, no_identity_twice=twice, synthetic_groups=s_groups, train_groups=t_lab
    )
    np.testing.assert_allclose(got.scores, sc, atol=1e-5)
    assert got.scores.size == sc.size
    np.testing.assert_allclose(np.einsum("ij,ij->i", s[got.synthetic_idx], t[got.train_idx]), sc, atol=1e-5)
    assert len(set(zip(got.synthetic_idx.tolist(), got.train_idx.tolist(), strict=True))) == sc.size
    # identical pairs wherever a score is clear of its neighbours (the engines' rounding differs)
    every = (s @ t.T).ravel()
    unique = np.array([np.sum(np.abs(every - x) <= 1e-4) == 1 for x in sc], bool)
    clear = np.cumprod(unique).astype(bool)  # up to the first near-tie, the walk is unambiguous
    assert np.array_equal(got.train_idx[clear], ti[clear]) and np.array_equal(
        got.synthetic_idx[clear], si[clear]
    )
    if twice:
        assert len(set(t_lab[got.train_idx])) == got.scores.size == len(set(s_groups[got.synthetic_idx]))


@pytest.mark.parametrize("side", ["train", "synthetic"])
def test_no_identity_twice_stops_once_one_side_runs_out_of_identities(side: str) -> None:
    """K above the identities of one side: after its last identity is used nothing more can be
    kept, so the lists need not be deepened to all of T (they were: every list grew to |T|)."""
    rng = np.random.default_rng(11)
    s, t = unit(rng.normal(size=(300, 16))), unit(rng.normal(size=(400, 16)))
    s_groups, t_groups = np.arange(300), np.arange(400)
    if side == "train":
        t_groups = t_groups % 5
    else:
        s_groups = s_groups % 5
    got = top_pairs(
        s, t, 10, no_identity_twice=True, synthetic_groups=s_groups, train_groups=t_groups,
        engine="exact", k_start=4,
    )
    sc, ti, si = top_pairs_bruteforce(
        s, t, 10, no_identity_twice=True, synthetic_groups=s_groups, train_groups=t_groups
    )
    assert got.scores.size == 5 and np.array_equal(got.train_idx, ti) and np.array_equal(got.synthetic_idx, si)
    assert got.candidates_per_query < 400, got.candidates_per_query


def test_top_pairs_certificate_extends_lists() -> None:
    # one synthetic image close to every training image: its list must grow past k_start
    t, _, _ = clustered(1, 40, noise=0.2, seed=3)
    far_q, _, _ = clustered(5, 1, seed=4)
    far_b, _, _ = clustered(5, 1, seed=5)
    s = np.concatenate([unit(t.mean(axis=0, keepdims=True)), far_q])
    got = top_pairs(
        s, np.concatenate([t, far_b]), 30, k_start=4, search_fn=lambda q, b, k: nearest(q, b, k, "exact")
    )
    sc, ti, si = top_pairs_bruteforce(s, np.concatenate([t, far_b]), 30)
    assert got.rounds >= 2 and np.array_equal(got.train_idx, ti) and np.array_equal(got.synthetic_idx, si)


def test_best_match_equals_brute_force() -> None:
    t, _, _ = clustered(8, 4, seed=5)
    s, _, _ = clustered(8, 2, seed=6)
    bm = best_match(s, t, "exact")
    sims = s @ t.T
    assert np.array_equal(bm.idx[:, 0], sims.argmax(1))
    np.testing.assert_allclose(bm.scores[:, 0], sims.max(1), atol=1e-5)
    empty = best_match(s, np.zeros((0, 32), np.float32))
    assert (empty.idx == -1).all()


def test_idiap_attack_fraction_above_threshold() -> None:
    t, t_lab, centres = clustered(10, 4, seed=7)
    s, _, _ = clustered(10, 2, seed=8, centres=centres)
    train = EmbeddedSet.from_arrays(t, identities=[f"id{i}" for i in t_lab])
    syn = EmbeddedSet.from_arrays(s)
    res = idiap_attack(train, syn, 5, threshold=Threshold(0.8, "--threshold"))
    best = (s @ t.T).max(1)
    assert res.fraction_above == pytest.approx(float(np.mean(best >= np.float32(0.8))))
    assert res.pairs.scores.size == 5 and res.pairs.scores[0] == pytest.approx(best.max(), abs=1e-5)
    assert idiap_attack(train, syn, 5).fraction_above is None


# ------------------------------------------------------------------------------------------
# tinsley
# ------------------------------------------------------------------------------------------


def test_tinsley_statistics_on_planted_leak() -> None:
    t, _, centres = clustered(30, 3, seed=10)
    h, _, _ = clustered(30, 3, seed=11)
    leaked, _, _ = clustered(30, 1, seed=12, centres=centres)  # other "photos" of T's people
    novel, _, _ = clustered(30, 1, seed=13)
    T, H = EmbeddedSet.from_arrays(t), EmbeddedSet.from_arrays(h)
    leak = matcher_leakage(EmbeddedSet.from_arrays(leaked), T, H, Threshold(0.6, "--threshold"))
    none = matcher_leakage(EmbeddedSet.from_arrays(novel), T, H, Threshold(0.6, "--threshold"))
    assert leak.auc is not None and none.auc is not None
    assert leak.auc > 0.95 and abs(none.auc - 0.5) < 0.2
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in leak.train_scores for b in leak.holdout_scores])
    assert leak.auc == pytest.approx(brute)
    m = leak.metrics()
    assert m["fraction_above_threshold_train"] == pytest.approx(
        float(np.mean((leaked @ t.T).max(1) >= np.float32(0.6)))
    )
    assert m["ks_pvalue"] < 1e-6 and m["ks_pvalue_train_greater"] < 1e-6
    assert sum(m["histogram"]["train"]) == sum(m["histogram"]["holdout"]) == 30


def test_two_sample_tests_match_scipy() -> None:
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(1)
    a, b = rng.normal(0.2, 1, 50), rng.normal(0, 1, 70)
    ks, p, _ = two_sample_tests(a, b)
    ref = ks_2samp(a, b)
    assert ks == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)


def test_flagged_pairs_and_consensus() -> None:
    t, _, centres = clustered(10, 3, seed=20)
    g, _, _ = clustered(10, 1, seed=21, centres=centres)
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(32, 32)))[0].astype(np.float32)
    ids_t, ids_g = [f"t{i}" for i in range(30)], [f"g{i}" for i in range(10)]
    # matcher b = a rotated (same scores) but missing one generated image
    gen = {"a": EmbeddedSet.from_arrays(g, ids_g), "b": EmbeddedSet.from_arrays(unit(g @ rot)[1:], ids_g[1:])}
    trn = {"a": EmbeddedSet.from_arrays(t, ids_t), "b": EmbeddedSet.from_arrays(unit(t @ rot), ids_t)}
    q, j = flagged_pairs(gen["a"], trn["a"], 0.7)
    brute = {(a, b) for a in range(10) for b in range(30) if g[a] @ t[b] >= np.float32(0.7)}
    assert set(zip(q.tolist(), j.tolist(), strict=True)) == brute and brute
    c = consensus(gen, trn, {"a": Threshold(0.7, "x"), "b": Threshold(0.7, "x")})
    assert len(c.train_ids) == len(brute)
    missing = np.array([s == "g0" for s in c.synthetic_ids])
    assert (c.n_matchers[~missing] == 2).all() and (c.n_matchers[missing] == 1).all()
    assert np.isnan(c.scores["b"][missing]).all()
    np.testing.assert_allclose(c.scores["a"][~missing], c.scores["b"][~missing], atol=1e-5)
    # a matcher without a threshold does not vote
    c1 = consensus(gen, trn, {"a": Threshold(0.7, "x"), "b": None})
    assert c1.voters == ["a"] and (c1.n_matchers == 1).all() and not c1.flagged["b"].any()


def test_parse_threshold_pairs() -> None:
    assert parse_threshold_pairs("dlib=0.9, onnx-m=0.3") == {"dlib": 0.9, "onnx-m": 0.3}
    with pytest.raises(ConfigError, match="MATCHER=VALUE"):
        parse_threshold_pairs("0.9")


# ------------------------------------------------------------------------------------------
# webster
# ------------------------------------------------------------------------------------------


def test_identify_centroid_equals_brute_force() -> None:
    r, r_lab, centres = clustered(15, 3, seed=30)
    s, _, _ = clustered(15, 2, seed=31, centres=centres)
    ident = identify(s, r, r_lab, 15, "centroid")
    cents = centroids(r, r_lab, 15)
    for i in range(len(s)):
        sims = [float(s[i] @ cents[q]) for q in range(15)]
        assert ident.best[i] == int(np.argmax(sims))
        assert ident.similarity[i] == pytest.approx(max(sims), abs=1e-5)
        own = [j for j in range(len(r)) if r_lab[j] == ident.best[i]]
        assert ident.nearest_reference[i] == own[int(np.argmax([s[i] @ r[j] for j in own]))]
    rej = identify(s, r, r_lab, 15, "centroid", reject_below=0.9)
    assert np.array_equal(rej.predicted == -1, ident.similarity < np.float32(0.9))


def test_linear_classifier_is_deterministic_and_accurate() -> None:
    r, r_lab, centres = clustered(20, 3, seed=32)
    s, s_lab, _ = clustered(20, 5, seed=33, centres=centres)
    a = train_linear(r, r_lab, 20)
    b = train_linear(r, r_lab, 20)
    assert np.array_equal(a.weights, b.weights)
    ident = identify(s, r, r_lab, 20, "linear")
    assert np.mean(ident.best == s_lab) > 0.9


def test_score_flags_and_pr_curve_against_brute_force() -> None:
    s = score_flags(np.array([1, 1, 0, 0, 1], bool), np.array([1, 0, 1, 0, 1], bool))
    assert (s.tp, s.fp, s.fn, s.flagged) == (2, 1, 1, 3)
    assert (
        s.precision == pytest.approx(2 / 3)
        and s.recall == pytest.approx(2 / 3)
        and s.f1 == pytest.approx(2 / 3)
    )
    assert score_flags(np.zeros(3, bool), np.array([1, 0, 0], bool)).precision is None
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 8, 30)
    members = rng.random(30) < 0.3
    curve = pr_curve(counts, members, 90)
    for tau, p in zip(curve.taus, curve.points, strict=True):
        f = counts > tau
        assert p.tp == int((f & members).sum()) and p.flagged == int(f.sum())
    assert curve.points[-1].recall == 1.0 and curve.points[-1].precision == pytest.approx(members.mean())
    assert curve.alphas[1] == pytest.approx(curve.taus[1] * 30 / 90)
    assert tau_for(2, 90, 30) == 6.0


def test_webster_attack_flags_members() -> None:
    r, r_lab, centres = clustered(20, 3, seed=40, noise=0.5)
    members = [0, 3, 7, 11]
    s_m, _, _ = clustered(4, 6, seed=41, centres=centres[members], noise=0.5)
    novel, _, _ = clustered(30, 1, seed=42)
    names = [f"q{i:02d}" for i in r_lab]
    res = webster_attack(
        r,
        names,
        np.concatenate([s_m, novel]),
        (1.0, 2.0),
        "centroid",
        reject_below=0.6,
        members={f"q{i:02d}" for i in members} | {"someone_else"},
    )
    assert res.n_samples == 54 and res.alphas[1.0][0] == pytest.approx(54 / 20)
    assert res.scores[1.0].f1 == 1.0 and res.random_precision == pytest.approx(4 / 20)
    with pytest.raises(ConfigError, match="alpha"):
        webster_attack(r, names, s_m, (0.0,))
    with pytest.raises(ConfigError, match="two query identities"):
        webster_attack(r[:3], ["a"] * 3, s_m)


# ------------------------------------------------------------------------------------------
# run layer + CLI on small collections (no embedding)
# ------------------------------------------------------------------------------------------


@pytest.fixture
def small_sets(tmp_path: Path, write_collection):
    t, t_lab, centres = clustered(10, 3, seed=50, noise=0.5)
    h, h_lab, _ = clustered(10, 3, seed=51, noise=0.5)
    g, g_lab, _ = clustered(5, 2, seed=52, centres=centres[:5], noise=0.5)
    g = np.concatenate([g, unit(np.random.default_rng(5).normal(size=(2, 32)))])
    paths = {
        "train": write_collection(
            tmp_path / "T", [f"p{i}/{j}.jpg" for j, i in enumerate(t_lab)], [f"p{i}" for i in t_lab], t
        ),
        "holdout": write_collection(
            tmp_path / "H", [f"h{i}/{j}.jpg" for j, i in enumerate(h_lab)], [f"h{i}" for i in h_lab], h
        ),
        "synthetic": write_collection(
            tmp_path / "S",
            [f"s_{j:05d}.jpg" for j in range(13)],
            [None] * 13,
            np.concatenate([g, np.zeros((1, 32), np.float32)]),
            det=[0.9] * 11 + [0.1, None],
            statuses=["ok"] * 12 + ["no_face"],
        ),
        "queries": write_collection(
            tmp_path / "Q", [f"p{i}/{j}.jpg" for j, i in enumerate(t_lab)], [f"p{i}" for i in t_lab], t
        ),
    }
    return paths


def test_run_idiap_writes_tables_and_metrics(tmp_path: Path, small_sets) -> None:
    out = tmp_path / "idiap"
    m = run_idiap(
        IdiapConfig(
            train=small_sets["train"],
            synthetic=small_sets["synthetic"],
            out=str(out),
            top_k=8,
            threshold=0.8,
            det_score_floor=0.5,
            engine="exact",
        )
    )
    pairs = pq.read_table(out / "pairs.parquet", use_threads=False).to_pydict()
    assert pairs["rank"] == list(range(1, 9))
    assert list(pairs)[:4] == ["rank", "train_id", "synthetic_id", "score"]
    assert m["set_aside"]["count"] == 2 and m["set_aside"]["by_reason"] == {
        "det_score_below_floor": 1,
        "no_face": 1,
    }
    assert m["synthetic_scored"] == 11 and m["pairs_returned"] == 8
    best = pq.read_table(out / "best_matches.parquet", use_threads=False).to_pydict()
    assert len(best["synthetic_id"]) == 11 and "s_00012.jpg" not in best["synthetic_id"]
    assert m["best_match"]["fraction_above_threshold"] == pytest.approx(
        np.mean(np.array(best["score"]) >= np.float32(0.8))
    )
    assert sum(m["best_match"]["histogram"]["counts"]) == 11
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["files"].keys() == {"pairs.parquet", "best_matches.parquet", "set_aside.parquet"}
    # no identity twice: at most one pair per training identity
    m2 = run_idiap(
        IdiapConfig(
            train=small_sets["train"],
            synthetic=small_sets["synthetic"],
            out=str(out),
            top_k=8,
            no_identity_twice=True,
        )
    )
    ids = pq.read_table(out / "pairs.parquet", use_threads=False).column("train_identity").to_pylist()
    assert len(ids) == len(set(ids)) == m2["pairs_returned"]


def test_run_idiap_refuses_other_matcher(tmp_path: Path, small_sets, write_collection) -> None:
    other = write_collection(
        tmp_path / "O",
        ["a.jpg"],
        [None],
        np.ones((1, 32), np.float32) / math.sqrt(32),
        matcher="onnx",
        version="m.onnx@1",
    )
    with pytest.raises(ConfigError, match="embedded with matcher 'onnx"):
        run_idiap(
            IdiapConfig(train=small_sets["train"], synthetic=other, out=str(tmp_path / "o"), matcher="dlib")
        )
    with pytest.raises(ConfigError, match="--top-k"):
        run_idiap(IdiapConfig(train=small_sets["train"], synthetic=other, out=str(tmp_path / "o"), top_k=0))


def test_run_tinsley_two_matchers(tmp_path: Path, small_sets) -> None:
    out = tmp_path / "tinsley"
    cfg = TinsleyConfig(
        train=small_sets["train"],
        holdout=small_sets["holdout"],
        synthetic=small_sets["synthetic"],
        out=str(out),
        matchers="dlib",
        thresholds={"dlib": 0.8},
    )
    m = run_tinsley(cfg)
    r = m["matchers"]["dlib"]
    for key in (
        "auc_train_vs_holdout",
        "ks_statistic",
        "ks_pvalue",
        "fraction_above_threshold_train",
        "fraction_above_threshold_holdout",
        "threshold",
    ):
        assert key in r
    assert r["threshold"] == 0.8 and r["auc_train_vs_holdout"] > 0.7
    assert r["synthetic_scored"] == 12 and r["set_aside"]["count"] == 1
    cons = pq.read_table(out / "consensus.parquet", use_threads=False).to_pydict()
    assert set(cons) >= {"synthetic_id", "train_id", "n_matchers", "score_dlib", "flagged_dlib"}
    assert m["consensus"]["pairs_flagged"] == len(cons["train_id"])
    with pytest.raises(ConfigError, match="not in --matchers"):
        run_tinsley(
            TinsleyConfig(train="a", holdout="b", synthetic="c", out=str(out), thresholds={"onnx": 0.3})
        )


@pytest.mark.parametrize("role", ["train", "holdout"])
def test_tinsley_refuses_a_base_set_without_usable_faces(
    tmp_path: Path, small_sets, write_collection, role: str
) -> None:
    """Best matches in an empty T or H are −inf: compared, they read as AUC 1.0 / KS 1.0 (a
    certain leak) or 0.0. Such a set is refused before any work, naming it; so is the pure
    function given one."""
    dead = write_collection(
        tmp_path / "dead", [f"x{i}.jpg" for i in range(5)], [f"x{i}" for i in range(5)],
        np.zeros((5, 32)), det=[None] * 5, statuses=["no_face"] * 5,
    )
    sets = {**small_sets, role: dead}
    cfg = TinsleyConfig(
        train=sets["train"], holdout=sets["holdout"], synthetic=sets["synthetic"],
        out=str(tmp_path / "out"), matchers="dlib", thresholds={"dlib": 0.5}, engine="exact",
    )
    word = "training" if role == "train" else "holdout"
    with pytest.raises(ConfigError, match=f"the {word} set .*dead has no usable face embeddings"):
        run_tinsley(cfg)
    assert not (tmp_path / "out" / "metrics.json").exists()
    g, _, _ = clustered(3, 2, seed=7)
    full, empty = EmbeddedSet.from_arrays(g), EmbeddedSet.from_arrays(np.zeros((0, 32), np.float32))
    args = (full, empty, full) if role == "train" else (full, full, empty)
    with pytest.raises(ConfigError, match=f"the {word} set"):
        matcher_leakage(*args)


def test_run_tinsley_with_a_train_index_never_loads_train_vectors(
    tmp_path: Path, write_collection, ray_local, monkeypatch
) -> None:
    """--train-index MATCHER=URI: T's index serves its best matches, the flagged pairs (exact range
    search over the stored vectors) and the pair scores; the tables equal those of the run on
    T's vectors, and T's embedding column is never read."""
    from raylead.attacks.tinsley import parse_index_pairs
    from raylead.index import IndexBuildConfig, build_index, source_from_collection

    t, t_lab, centres = clustered(40, 5, seed=70, noise=0.5)
    h, h_lab, _ = clustered(40, 5, seed=71, noise=0.5)
    g, _, _ = clustered(12, 2, seed=72, centres=centres[:12], noise=0.6)
    train = write_collection(
        tmp_path / "T", [f"p{i}/{j}.jpg" for j, i in enumerate(t_lab)], [f"p{i}" for i in t_lab], t, shard_size=64
    )
    holdout = write_collection(tmp_path / "H", [f"h{i}/{j}.jpg" for j, i in enumerate(h_lab)], [None] * len(h), h)
    syn = write_collection(tmp_path / "S", [f"s{j:03d}.jpg" for j in range(len(g))], [None] * len(g), g)
    index = str(tmp_path / "idx")
    build_index(source_from_collection(train), index, IndexBuildConfig(shards=2, executor="local"))
    common = {"train": train, "holdout": holdout, "synthetic": syn, "thresholds": {"dlib": 0.8}, "engine": "exact"}
    plain = run_tinsley(TinsleyConfig(out=str(tmp_path / "plain"), **common))

    reads = record_collection_reads(monkeypatch)
    cfg = TinsleyConfig(out=str(tmp_path / "indexed"), train_index=parse_index_pairs(f"dlib={index}"), **common)
    indexed = run_tinsley(cfg)
    assert {v for u, v in reads if u.endswith("/T")} == {False}, reads
    assert {v for u, v in reads if u.endswith(("/H", "/S"))} == {True}
    p, i = plain["matchers"]["dlib"], indexed["matchers"]["dlib"]
    assert i["train_index"] == index and p["train_index"] is None
    for key in ("auc_train_vs_holdout", "ks_statistic", "fraction_above_threshold_train"):
        assert i[key] == pytest.approx(p[key], abs=1e-6)
    assert indexed["consensus"]["pairs_flagged"] == plain["consensus"]["pairs_flagged"] >= 12
    for name in ("best_matches.parquet", "consensus.parquet"):
        got = pq.read_table(tmp_path / "indexed" / name, use_threads=False).to_pydict()
        want = pq.read_table(tmp_path / "plain" / name, use_threads=False).to_pydict()
        scores = [c for c in want if "score" in c]
        assert {c: v for c, v in got.items() if c not in scores} == {c: v for c, v in want.items() if c not in scores}
        for c in scores:
            np.testing.assert_allclose(np.array(got[c], float), np.array(want[c], float), atol=1e-6)

    with pytest.raises(ConfigError, match="--train-index names matcher 'onnx', which is not in --matchers"):
        run_tinsley(TinsleyConfig(out=str(tmp_path / "o"), train_index={"onnx": index}, **common))
    with pytest.raises(ConfigError, match="cannot read --train-index 'dlib=': use MATCHER=VALUE"):
        parse_index_pairs("dlib=")
    other = write_collection(tmp_path / "T2", [f"x{j}.jpg" for j in range(200)], [None] * 200, t)
    build_index(source_from_collection(other), str(tmp_path / "idx2"), IndexBuildConfig(shards=1, executor="local"))
    with pytest.raises(ConfigError, match="was not built from the training collection"):
        run_tinsley(TinsleyConfig(out=str(tmp_path / "o2"), train_index={"dlib": str(tmp_path / "idx2")}, **common))


def test_train_index_on_s3_is_read_with_the_s3_flags(
    s3_server, ray_local, tmp_path: Path, write_collection, monkeypatch
) -> None:
    """An index on S3 given with --train-index is read with the attack's --s3-* flags (the
    environment holding no credentials), by the driver and by the shard searcher actors."""
    from s3server import ACCESS_KEY, SECRET_KEY

    from raylead.errors import RayleadError
    from raylead.index import IndexBuildConfig, build_index, source_from_collection
    from raylead.storage import S3Options

    t, t_lab, centres = clustered(20, 5, seed=80, noise=0.5)
    g, _, _ = clustered(6, 2, seed=81, centres=centres[:6], noise=0.6)
    ids = [f"p{i}/{j}.jpg" for j, i in enumerate(t_lab)]
    train = write_collection(tmp_path / "T", ids, [f"p{i}" for i in t_lab], t)
    syn = write_collection(tmp_path / "S", [f"s{j:02d}.jpg" for j in range(len(g))], [None] * len(g), g)
    uri = "s3://raylead/attack-train-index"
    build_index(source_from_collection(train), uri, IndexBuildConfig(shards=2, executor="local"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    flags = S3Options.from_env(access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    common = {"train": train, "synthetic": syn, "train_index": uri, "top_k": 5, "engine": "exact"}
    with pytest.raises(RayleadError, match="no S3 credentials were found"):  # without the flags
        run_idiap(IdiapConfig(out=str(tmp_path / "anon"), **common))
    m = run_idiap(IdiapConfig(out=str(tmp_path / "idiap"), s3=flags, **common))
    assert m["pairs_returned"] == 5 and m["engine"]["train_index"] == uri
    holdout = write_collection(tmp_path / "H", [f"h{j}.jpg" for j in range(len(t))], [None] * len(t), t[::-1])
    tm = run_tinsley(
        TinsleyConfig(
            train=train,
            holdout=holdout,
            synthetic=syn,
            out=str(tmp_path / "tinsley"),
            thresholds={"dlib": 0.8},
            train_index={"dlib": uri},
            s3=flags,
        )
    )
    assert tm["matchers"]["dlib"]["train_index"] == uri and tm["consensus"]["pairs_flagged"] >= 6


def test_run_webster_and_cli(tmp_path: Path, small_sets) -> None:
    from typer.testing import CliRunner

    from raylead.cli import app

    members = tmp_path / "members.txt"
    members.write_text("# truth\np0\np1\np2\np3\np4\n\n")
    out = tmp_path / "webster"
    m = run_webster(
        WebsterConfig(
            queries=small_sets["queries"],
            samples=small_sets["synthetic"],
            out=str(out),
            members=str(members),
            alphas=(0.5, 1.0),
        )
    )
    assert set(m["alphas"]) == {"0.5", "1"}
    a = m["alphas"]["1"]
    assert a["tau"] == pytest.approx(12 / 10) and isinstance(a["flagged"], list)
    assert {"precision", "recall", "f1"} <= set(a) and m["random_precision"] == 0.5
    counts = pq.read_table(out / "counts.parquet", use_threads=False).to_pydict()
    assert sum(counts["count"]) == 12 and counts["identity"] == sorted(counts["identity"])
    res = CliRunner().invoke(
        app,
        [
            "attack",
            "webster",
            "--queries",
            small_sets["queries"],
            "--samples",
            small_sets["synthetic"],
            "--members",
            str(members),
            "--classifier",
            "linear",
            "--alpha",
            "1,2",
            "--out",
            str(tmp_path / "w2"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "α=1" in res.output and "random baseline" in res.output
    res = CliRunner().invoke(
        app,
        [
            "attack",
            "idiap",
            "--train",
            small_sets["train"],
            "--synthetic",
            small_sets["synthetic"],
            "--top-k",
            "3",
            "--threshold",
            "0.9",
            "--out",
            str(tmp_path / "i2"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "idiap: top 3 pairs" in res.output
    res = CliRunner().invoke(
        app,
        [
            "attack",
            "tinsley",
            "--train",
            small_sets["train"],
            "--holdout",
            small_sets["holdout"],
            "--synthetic",
            small_sets["synthetic"],
            "--threshold",
            "dlib=0.8",
            "--out",
            str(tmp_path / "t2"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "AUC T-vs-H" in res.output
    bad = CliRunner().invoke(
        app,
        [
            "attack",
            "webster",
            "--queries",
            small_sets["queries"],
            "--samples",
            small_sets["synthetic"],
            "--classifier",
            "svm",
            "--out",
            str(tmp_path / "w3"),
        ],
    )
    assert bad.exit_code != 0


def test_configs_build_from_job_yaml_mappings() -> None:
    """The Ray job entrypoints build these configs from YAML with raylead.config.from_mapping."""
    from raylead.attacks.calibrate import CalibrateConfig
    from raylead.config import from_mapping

    t = from_mapping(
        TinsleyConfig,
        {
            "train": "a",
            "holdout": "h",
            "synthetic": "s",
            "out": "o",
            "thresholds": {"dlib": 0.93},
            "threshold_from": ["c.json"],
        },
    )
    assert t.thresholds == {"dlib": 0.93} and t.threshold_from == ("c.json",)
    assert from_mapping(
        WebsterConfig, {"queries": "q", "samples": "s", "out": "o", "alphas": [1, 2]}
    ).alphas == (1, 2)
    assert from_mapping(CalibrateConfig, {"labelled": "l", "out": "o", "fmr": 1e-3}).fmr == 1e-3
    with pytest.raises(ConfigError, match="--top-k"):
        from_mapping(IdiapConfig, {"train": "a", "synthetic": "b", "out": "o", "top_k": 0})
    with pytest.raises(ConfigError, match="unknown option"):
        from_mapping(IdiapConfig, {"train": "a", "synthetic": "b", "out": "o", "topk": 5})


def test_top_pairs_terminates_when_an_engine_returns_short_lists() -> None:
    """An approximate engine may pad lists with -1; the certificate must not loop forever."""
    from raylead.attacks import Neighbours

    t, _, _ = clustered(10, 4, seed=60)
    s, _, _ = clustered(10, 2, seed=61)
    calls = []

    def short(q: np.ndarray, b: np.ndarray, k: int) -> Neighbours:
        calls.append(k)
        sims = q @ b.T
        idx = np.argsort(-sims, axis=1)[:, :k]
        sc = np.take_along_axis(sims, idx, 1).astype(np.float32)
        idx[:, 3:], sc[:, 3:] = -1, -np.inf  # never more than 3 real neighbours
        return Neighbours(sc, idx.astype(np.int64), "approximate", "test")

    got = top_pairs(s, t, 200, search_fn=short, k_start=2)
    assert got.scores.size == 20 * 3 and calls[-1] == 40 and np.all(np.diff(got.scores) <= 0)


def test_idiap_with_the_approximate_engine() -> None:
    """IVF-PQ candidates + exact re-rank (raylead.search): scores exact, pairs found ≈ all."""
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(60, 16)))
    lab = rng.integers(0, 60, 600)
    x = unit(centres[lab] + 0.125 * rng.normal(size=(600, 16)))
    q = unit(x[:80] + 0.02 * rng.normal(size=(80, 16)))
    r = idiap_attack(EmbeddedSet.from_arrays(x), EmbeddedSet.from_arrays(q), 100, engine="approximate")
    assert r.pairs.engine == "approximate" and r.best_engine == "approximate"
    sc, ti, si = top_pairs_bruteforce(q, x, 100)
    found = set(zip(r.pairs.train_idx.tolist(), r.pairs.synthetic_idx.tolist(), strict=True))
    assert len(found & set(zip(ti.tolist(), si.tolist(), strict=True))) >= 90  # measured 98
    np.testing.assert_allclose(
        r.pairs.scores, np.einsum("ij,ij->i", q[r.pairs.synthetic_idx], x[r.pairs.train_idx]), atol=1e-5
    )
    assert np.mean(r.best_train_idx == (q @ x.T).argmax(1)) >= 0.9


def test_run_idiap_with_a_train_index_never_loads_train_vectors(
    tmp_path: Path, write_collection, ray_local, monkeypatch
) -> None:
    """--train-index: the index serves T's vectors (the driver reads T's ids and identities, never
    its embedding column), and the tables equal those of the exact engine on T's vectors."""
    from raylead import catalog
    from raylead.index import IndexBuildConfig, build_index, source_from_collection

    t, t_lab, centres = clustered(40, 5, seed=60, noise=0.5)
    g, _, _ = clustered(12, 2, seed=61, centres=centres[:12], noise=0.6)
    train = write_collection(
        tmp_path / "T", [f"p{i}/{j}.jpg" for j, i in enumerate(t_lab)], [f"p{i}" for i in t_lab], t, shard_size=64
    )
    syn = write_collection(tmp_path / "S", [f"s{j:03d}.jpg" for j in range(len(g))], [None] * len(g), g)
    index = str(tmp_path / "idx")
    build_index(source_from_collection(train), index, IndexBuildConfig(shards=2, executor="local"))
    common = {"train": train, "synthetic": syn, "top_k": 20, "threshold": 0.8, "no_identity_twice": True}
    run_idiap(IdiapConfig(out=str(tmp_path / "plain"), engine="exact", **common))

    real = catalog.read_collection
    reads = record_collection_reads(monkeypatch)

    def table(path: Path, above_only: bool = False) -> dict[str, list]:
        t = pq.read_table(path, use_threads=False)
        return (t.filter(t.column("above_threshold")) if above_only else t).to_pydict()

    for engine in ("exact", "approximate"):
        out = tmp_path / f"indexed-{engine}"
        m = run_idiap(IdiapConfig(out=str(out), engine=engine, train_index=index, **common))
        assert m["pairs_returned"] == 20
        # exact through the index: every row; approximate: the 12 planted pairs above θ
        for name in ("pairs.parquet", "best_matches.parquet"):
            got = table(out / name, above_only=engine == "approximate")
            want = table(tmp_path / "plain" / name, above_only=engine == "approximate")
            assert len(want["score"]) >= 12
            assert {c: v for c, v in got.items() if c != "score"} == {c: v for c, v in want.items() if c != "score"}
            np.testing.assert_allclose(got["score"], want["score"], atol=1e-6)
    assert {v for u, v in reads if u.endswith("/T")} == {False}, reads  # T: ids only, both runs
    assert {v for u, v in reads if u.endswith("/S")} == {True}

    # an index of another collection (same vectors, other image ids) is refused before any search
    other = write_collection(tmp_path / "T2", [f"x{j}.jpg" for j in range(200)], [None] * 200, t)
    build_index(source_from_collection(other), str(tmp_path / "idx2"), IndexBuildConfig(shards=1, executor="local"))
    with pytest.raises(ConfigError, match="was not built from the training collection"):
        run_idiap(IdiapConfig(out=str(tmp_path / "o2"), train_index=str(tmp_path / "idx2"), **common))

    # a set loaded without its vectors can only be searched through an index
    ids_only = EmbeddedSet.from_collection(real(train, vectors=False))
    assert ids_only.embeddings.shape == (200, 0) and ids_only.dim == 32 and ids_only.ids[:2] == ["p0/0.jpg", "p0/1.jpg"]
    with pytest.raises(ValueError, match="not loaded"):
        SearchBase.prepare(ids_only.embeddings, 5, "exact")


# ------------------------------------------------------------------------------------------
# bad arguments stop before any work (README: "Bad arguments stop before any work")
# ------------------------------------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch, tmp_path: Path) -> dict[str, str]:
    """Image folders T, H, S (photos never read) and a calibration for onnx; from now on any
    embedding or collection read fails the test: every refusal must come before them."""
    from raylead import catalog, embed
    from raylead.attacks.calibrate import CALIBRATION_KIND

    def work(*_a, **_k):
        raise AssertionError("inputs were loaded or embedded before the arguments were refused")

    monkeypatch.setattr(embed, "ensure_collection", work)
    monkeypatch.setattr(catalog, "read_collection", work)
    paths = {}
    for role in ("T", "H", "S"):
        for person in ("p0", "p1"):
            (tmp_path / role / person).mkdir(parents=True)
            (tmp_path / role / person / "a.jpg").write_bytes(b"\xff\xd8 never decoded")
        paths[role] = str(tmp_path / role)
    onnx_cal = tmp_path / "onnx-cal.json"
    onnx_cal.write_text(
        json.dumps(
            {"kind": CALIBRATION_KIND, "threshold": 0.4, "fmr_target": 1e-3, "impostor_pairs": 5000,
             "matcher": {"name": "onnx", "version": "m.onnx@1", "dim": 512}}
        )
    )
    paths["onnx_cal"] = str(onnx_cal)
    (tmp_path / "not-an-index").mkdir()
    paths["not_index"] = str(tmp_path / "not-an-index")
    paths["out"] = str(tmp_path / "out")
    paths["missing"] = str(tmp_path / "missing.json")
    return paths


def run_cli(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    """``raylead ARGV`` in this process (so the no_work guards hold): exit code and stderr."""
    import sys

    from raylead.cli import run

    monkeypatch.setattr(sys, "argv", ["raylead", *argv])
    rc = run()
    return rc, capsys.readouterr().err


REFUSED_BEFORE_WORK = [
    ("idiap", ["--threshold", "5"], "--threshold must be a cosine similarity in [-1, 1]"),
    ("idiap", ["--threshold", "nan"], "--threshold must be a cosine similarity in [-1, 1]"),
    ("idiap", ["--threshold-from", "{missing}"], "calibration file {missing} does not exist"),
    ("idiap", ["--threshold-from", "{T}"], "calibration file {T} cannot be read"),
    ("idiap", ["--threshold-from", "{onnx_cal}"], "calibration {onnx_cal} was made with matcher 'onnx m.onnx@1'"),
    ("idiap", ["--train-index", "/no/such"], "--train-index /no/such does not exist"),
    ("idiap", ["--train-index", "{not_index}"], "--train-index: {not_index} has no index.json"),
    ("idiap", ["--report", "evidence.pdf"], "--report must name an .html file"),
    ("tinsley", ["--det-score-floor", "nan"], "--det-score-floor must be a finite number"),
    ("tinsley", ["--threshold", "dlib=5"], "--threshold for dlib must be a cosine similarity"),
    ("tinsley", ["--threshold-from", "{missing}"], "calibration file {missing} does not exist"),
    ("tinsley", ["--threshold-from", "{onnx_cal}"], "--threshold-from {onnx_cal} was made with matcher 'onnx', "
     "which is not in --matchers (dlib)"),
    ("tinsley", ["--train-index", "dlib=/no/such"], "--train-index /no/such does not exist"),
    ("tinsley", ["--report", "evidence.pdf"], "--report must name an .html file"),
    ("webster", ["--det-score-floor", "inf"], "--det-score-floor must be a finite number"),
    ("webster", ["--report", "evidence"], "--report must name an .html file"),
]


@pytest.mark.parametrize(("attack", "flags", "says"), REFUSED_BEFORE_WORK)
def test_bad_attack_arguments_are_refused_before_any_work(
    monkeypatch, capsys, no_work: dict[str, str], attack: str, flags: list[str], says: str
) -> None:
    """Each refusal is one line naming the flag, with exit code 2, before any input is loaded or
    embedded (the guards fail the test otherwise) and before --out is created."""
    inputs = {
        "idiap": ["--train", no_work["T"], "--synthetic", no_work["S"]],
        "tinsley": ["--train", no_work["T"], "--holdout", no_work["H"], "--synthetic", no_work["S"]],
        "webster": ["--queries", no_work["T"], "--samples", no_work["S"]],
    }[attack]
    flags = [f.format(**no_work) for f in flags]
    rc, err = run_cli(monkeypatch, capsys, ["attack", attack, *inputs, "--out", no_work["out"], *flags])
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("raylead: error: "), err
    assert says.format(**no_work) in err, err
    assert not Path(no_work["out"]).exists()  # no results folder, no embeddings folder in it


def test_the_late_checks_still_hold_once_the_inputs_are_loaded(tmp_path: Path, small_sets) -> None:
    """What only the loaded inputs can tell stays checked after loading: a calibration of the
    attack's matcher name but another version, and (tinsley) one matching no matcher's version."""
    from raylead.attacks.calibrate import CALIBRATION_KIND

    cal = tmp_path / "dlib-v9.json"
    cal.write_text(
        json.dumps(
            {"kind": CALIBRATION_KIND, "threshold": 0.4, "fmr_target": 1e-3, "impostor_pairs": 5000,
             "matcher": {"name": "dlib", "version": "v9", "dim": 32}}
        )
    )
    with pytest.raises(ConfigError, match="made with matcher 'dlib v9' but this attack uses 'dlib test'"):
        run_idiap(IdiapConfig(train=small_sets["train"], synthetic=small_sets["synthetic"],
                              out=str(tmp_path / "i"), threshold_from=str(cal)))
    with pytest.raises(ConfigError, match="--threshold-from .*dlib-v9.json is for none of the matchers"):
        run_tinsley(TinsleyConfig(train=small_sets["train"], holdout=small_sets["holdout"],
                                  synthetic=small_sets["synthetic"], out=str(tmp_path / "t"),
                                  threshold_from=(str(cal),)))


def test_attack_configs_refuse_bad_values_in_validate() -> None:
    """The checks with no I/O run when a config is built (CLI or job YAML), so a job refuses them too."""
    from raylead.config import from_mapping

    base = {"train": "t", "synthetic": "s", "out": "o"}
    for bad, says in (
        ({"threshold": 1.5}, "--threshold must be a cosine similarity"),
        ({"threshold": -2}, "--threshold must be a cosine similarity"),
        ({"det_score_floor": math.inf}, "--det-score-floor must be a finite number"),
    ):
        with pytest.raises(ConfigError, match=re.escape(says)):
            from_mapping(IdiapConfig, {**base, **bad})
    with pytest.raises(ConfigError, match="--det-score-floor must be a finite number"):
        TinsleyConfig(train="t", holdout="h", synthetic="s", out="o", det_score_floor=math.nan).validate()
    with pytest.raises(ConfigError, match="--det-score-floor must be a finite number"):
        WebsterConfig(queries="q", samples="s", out="o", det_score_floor=-math.inf).validate()
    # files are read by check_files (before any work), not by validate: a job config names them freely
    assert from_mapping(IdiapConfig, {**base, "threshold_from": "c.json", "train_index": "s3://b/idx"})


def _attack_job_module():
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("raylead_job_attack_checks", repo / "jobs" / "attack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"report": "{tmp}/evidence.pdf"}, "attack idiap: report must name an .html file"),
        ({"threshold_from": "{tmp}/missing.json"}, "calibration file {tmp}/missing.json does not exist"),
        ({"train_index": "{tmp}/no-index"}, "--train-index {tmp}/no-index does not exist"),
        ({"threshold": 5}, "--threshold must be a cosine similarity"),
    ],
)
def test_attack_job_refuses_bad_options_before_any_work(
    monkeypatch, capsys, no_work: dict[str, str], tmp_path: Path, options: dict, says: str
) -> None:
    """jobs/attack.py: the same refusals, one line on stderr, exit code 2, nothing under out."""
    import yaml

    module = _attack_job_module()
    opts = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in options.items()}
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump({"attack": "idiap", "train": no_work["T"], "synthetic": no_work["S"], "out": no_work["out"],
                        **opts})
    )
    rc = module.run_job("attack", module.AttackJob, module.main, argv=["--config", str(config)],
                        transform=module.from_yaml)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("raylead attack: error: "), err
    assert says.format(tmp=tmp_path) in err, err
    assert not Path(no_work["out"]).exists()
    if "report" in opts:  # prepare() itself refuses it, as it promises
        with pytest.raises(ConfigError, match="attack idiap: report must name an .html file"):
            module.prepare(module.AttackJob(**module.from_yaml({"attack": "idiap", **{
                k: no_work[r] for k, r in (("train", "T"), ("synthetic", "S"), ("out", "out"))}, **opts})))


def test_an_index_of_another_matchers_embeddings_is_refused(tmp_path: Path, small_sets, write_collection) -> None:
    """The same training images embedded by another matcher of the same size: the ids matched,
    so idiap scored dlib synthetic vectors against onnx training vectors and reported "0.0 %"
    (and `raylead search` gave 2 of 80 self-matches). The index records its matcher now."""
    from raylead.index import IndexBuildConfig, build_index, source_from_collection
    from raylead.search import SearchConfig, SearchJob, run_search

    t, lab, _ = clustered(20, 4, seed=60, noise=0.5)  # an index needs >= 64 vectors
    ids, people = [f"p{i}/{j}.jpg" for j, i in enumerate(lab)], [f"p{i}" for i in lab]
    train = write_collection(tmp_path / "T", ids, people, t)
    other = write_collection(tmp_path / "T-onnx", ids, people, t, matcher="onnx", version="m.onnx@1")
    index = str(tmp_path / "idx")
    m = build_index(source_from_collection(other), index, IndexBuildConfig(executor="local"))
    assert m.embedded_with == ("onnx", "m.onnx@1")
    common = {"train": train, "synthetic": small_sets["synthetic"], "threshold": 0.8}
    with pytest.raises(ConfigError, match="holds onnx m.onnx@1 embeddings but the training set .* dlib test"):
        run_idiap(IdiapConfig(out=str(tmp_path / "o"), train_index=index, **common))
    with pytest.raises(ConfigError, match="holds onnx m.onnx@1 embeddings but the queries .* dlib test"):
        run_search(SearchJob(train, index, str(tmp_path / "s"), SearchConfig(k=3), use_ray=False))
    # an index built before the matcher was recorded: its source collection is asked instead; a rerun
    # of its build leaves it as it is (search results are keyed to its manifest's bytes)
    manifest = Path(index, "index.json")
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "embedded_with"}))
    with pytest.raises(ConfigError, match="holds onnx m.onnx@1 embeddings"):
        run_search(SearchJob(train, index, str(tmp_path / "s"), SearchConfig(k=3), use_ray=False))
    before = manifest.read_bytes()
    build_index(source_from_collection(other), index, IndexBuildConfig(executor="local"))  # nothing to do
    assert manifest.read_bytes() == before
    # the matching index passes
    build_index(source_from_collection(train), str(tmp_path / "idx2"), IndexBuildConfig(executor="local"))
    run_idiap(IdiapConfig(out=str(tmp_path / "ok"), train_index=str(tmp_path / "idx2"), **common))


def test_a_train_index_with_engine_auto_falls_back_to_exact_when_tuning_misses(
    tmp_path: Path, write_collection
) -> None:
    """--train-index with the default --engine auto was searched as `approximate`: on vectors an
    inverted file cannot rank (no clusters) the tuner said "recall NOT reached" and the attack
    still reported its approximate best matches and pairs. auto must fall back to exact, as
    `raylead search` does, and give exactly the exact engine's tables."""
    from raylead.index import IndexBuildConfig, build_index, source_from_collection

    rng = np.random.default_rng(70)
    # no structure, so IVF lists cannot rank it; large enough that the cost model picks approximate
    t = unit(rng.normal(size=(4000, 32))).astype(np.float32)
    g = unit(rng.normal(size=(1000, 32))).astype(np.float32)
    train = write_collection(tmp_path / "T", [f"t{j:05d}.jpg" for j in range(4000)], [None] * 4000, t,
                             shard_size=1000)
    syn = write_collection(tmp_path / "S", [f"s{j:04d}.jpg" for j in range(1000)], [None] * 1000, g)
    index = str(tmp_path / "idx")
    build_index(source_from_collection(train), index, IndexBuildConfig(shards=4, executor="local"))
    common = {"train": train, "synthetic": syn, "top_k": 50}
    run_idiap(IdiapConfig(out=str(tmp_path / "exact"), engine="exact", **common))
    m = run_idiap(IdiapConfig(out=str(tmp_path / "auto"), train_index=index, **common))
    assert m["engine"]["requested"] == "auto"
    assert (m["engine"]["best_match"], m["engine"]["pairs"]) == ("exact", "exact"), m["engine"]
    reason = m["engine"]["best_match_reason"]
    assert "NOT reached" in reason and "fell back to exact" in reason
    for name in ("pairs.parquet", "best_matches.parquet"):
        got = pq.read_table(tmp_path / "auto" / name).to_pydict()
        want = pq.read_table(tmp_path / "exact" / name).to_pydict()
        assert {c: v for c, v in got.items() if c != "score"} == {c: v for c, v in want.items() if c != "score"}
        np.testing.assert_allclose(got["score"], want["score"], atol=1e-6)


def test_an_attack_refuses_a_collection_whose_embeddings_are_not_normalised(
    tmp_path: Path, write_collection, monkeypatch, capsys
) -> None:
    """A synthetic collection with one ok row scaled by 2 (checksums valid): idiap printed "highest
    score 2.0000" (not a cosine) and exited 0. Refused in one line, exit 2, before any result is written."""
    t, t_lab, centres = clustered(10, 4, seed=95)
    g, _, _ = clustered(5, 1, seed=96, centres=centres[:5])
    g[2] *= 2
    people = [f"p{i}" for i in t_lab]
    train = write_collection(tmp_path / "T", [f"{p}/{j}.jpg" for j, p in enumerate(people)], people, t)
    syn = write_collection(tmp_path / "S", [f"s{j}.jpg" for j in range(5)], [None] * 5, g)
    out = tmp_path / "out"
    rc, err = run_cli(monkeypatch, capsys, ["attack", "idiap", "--train", train, "--synthetic", syn, "--top-k", "3",
                                            "--threshold", "0.9", "--out", str(out)])
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("raylead: error: "), err
    assert ("S/shards/part-00000.parquet has 1 ok row(s) whose embedding is not L2-normalised (first: image_id "
            "'s2.jpg', norm 2): scores would not be cosines; re-embed that collection with `raylead embed`") in err
    assert not out.exists() or not any(out.rglob("*.*")), sorted(out.rglob("*"))

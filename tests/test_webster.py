"""Webster attack: the --members file as editors write it, bounded memory, the --reject-below help."""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from raylead.attacks.webster import WebsterConfig, identify, read_members, run_webster


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _unblocked(s: np.ndarray, r: np.ndarray, labels: np.ndarray, best: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The N×R computation the blocks replace."""
    sims = np.where(labels[None, :] == best[:, None], s @ r.T, -np.inf)
    nearest = np.argmax(sims, axis=1)
    return nearest, sims[np.arange(len(s)), nearest].astype(np.float32)


def test_nearest_reference_in_blocks_equals_the_unblocked_computation() -> None:
    from raylead.attacks.webster import nearest_references

    rng = np.random.default_rng(7)
    r = _unit(rng.normal(size=(60, 16)))
    labels = rng.integers(0, 6, size=60)
    labels[labels == 5] = 4  # identity 5 has no references: -inf, index 0, as before
    s = _unit(rng.normal(size=(45, 16)))
    best = rng.integers(0, 6, size=45)
    want = _unblocked(s, r, labels, best)
    for block_bytes in (1, 4 * 13 * 3, 10**9):  # one sample per block, a few, all at once
        nearest, score = nearest_references(s, r, labels, best, block_bytes)
        np.testing.assert_array_equal(nearest, want[0])
        np.testing.assert_allclose(score, want[1], rtol=0, atol=1e-6)
        assert score.dtype == np.float32 and np.isneginf(score[best == 5]).all()
    ident = identify(s, r, labels, 6, block_bytes=1)
    np.testing.assert_array_equal(ident.nearest_reference, _unblocked(s, r, labels, ident.best)[0])


def test_identify_holds_no_samples_by_references_matrix() -> None:
    """2000 samples × 2000 references: the N×R similarities (16 MB, plus mask and copy) are
    never held at once; with 1 MiB blocks the peak stays a few MiB."""
    rng = np.random.default_rng(3)
    r = _unit(rng.normal(size=(2000, 16)))
    labels = np.arange(2000) % 4
    s = _unit(rng.normal(size=(2000, 16)))
    tracemalloc.start()
    try:
        identify(s, r, labels, 4, block_bytes=2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2**20, peak


@pytest.mark.parametrize("classifier", ["centroid", "linear"])
def test_identify_in_blocks_equals_the_unblocked_computation(classifier: str) -> None:
    """Samples are identified a block at a time: the same best identity and similarity as the
    whole N×Q matrix at once, for both classifiers."""
    from raylead.attacks.webster import centroids

    rng = np.random.default_rng(11)
    r = _unit(rng.normal(size=(90, 16)))
    labels = np.arange(90) % 9
    s = _unit(rng.normal(size=(70, 16)))
    cos = s @ centroids(r, labels, 9).T
    whole = identify(s, r, labels, 9, classifier=classifier, block_bytes=10**9)
    want = np.argmax(cos if whole.linear is None else whole.linear.logits(s), axis=1)
    np.testing.assert_array_equal(whole.best, want)
    np.testing.assert_allclose(whole.similarity, cos[np.arange(70), want], rtol=0, atol=1e-6)
    for block_bytes in (1, 8 * 9 * 4):  # one sample per block, four
        got = identify(s, r, labels, 9, classifier=classifier, block_bytes=block_bytes)
        np.testing.assert_array_equal(got.best, whole.best)
        np.testing.assert_array_equal(got.similarity, whole.similarity)


def test_identify_holds_no_samples_by_identities_matrix() -> None:
    """4000 samples × 1000 query identities: the N×Q scores (16 MB, 32 MB as the linear
    classifier's float64 logits) are never held at once; with 1 MiB blocks the peak is a few MiB
    above the centroids."""
    rng = np.random.default_rng(5)
    r = _unit(rng.normal(size=(1000, 16)))
    labels = np.arange(1000)
    s = _unit(rng.normal(size=(4000, 16)))
    tracemalloc.start()
    try:
        identify(s, r, labels, 1000, block_bytes=2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2**20, peak


def test_members_file_with_bom_and_crlf_reads_the_same(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"Abdullah_Gul\nAri_Fleischer\n# note\n")
    windows = tmp_path / "windows.txt"
    windows.write_bytes(b"\xef\xbb\xbfAbdullah_Gul\r\nAri_Fleischer\r\n# note\r\n")
    assert read_members(str(windows)) == read_members(str(plain)) == {"Abdullah_Gul", "Ari_Fleischer"}


def test_webster_scores_a_bom_members_file_like_a_plain_one_and_names_unmatched_members(
    tmp_path: Path, write_collection, caplog
) -> None:
    rng = np.random.default_rng(11)
    centres = _unit(rng.normal(size=(6, 32)))
    refs = _unit(np.repeat(centres, 3, axis=0) + 0.3 * rng.normal(size=(18, 32)))
    ref_ids = [f"p{i}" for i in np.repeat(np.arange(6), 3)]
    samples = _unit(np.repeat(centres[:2], 5, axis=0) + 0.3 * rng.normal(size=(10, 32)))
    queries = write_collection(tmp_path / "Q", [f"{p}/{j}.jpg" for j, p in enumerate(ref_ids)], ref_ids, refs)
    syn = write_collection(tmp_path / "S", [f"x_{j:05d}.jpg" for j in range(10)], [None] * 10, samples)
    (tmp_path / "plain.txt").write_bytes(b"p0\np1\np2\n")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfp0\r\np1\r\np2\r\nNobody_Here\r\n")
    got = {}
    for name in ("plain", "bom"):
        with caplog.at_level(logging.WARNING, logger="raylead.attacks.webster"):
            caplog.clear()
            members = str(tmp_path / f"{name}.txt")
            cfg = WebsterConfig(queries=queries, samples=syn, out=str(tmp_path / name), members=members)
            got[name] = run_webster(cfg)
    assert got["bom"]["alphas"] == got["plain"]["alphas"] and got["bom"]["n_members_in_queries"] == 3
    assert got["bom"]["random_precision"] == pytest.approx(0.5)
    warned = [r.getMessage() for r in caplog.records if "not query identities" in r.getMessage()]
    assert len(warned) == 1 and "'Nobody_Here'" in warned[0]


def test_reject_below_help_says_what_the_code_does() -> None:
    """Rejection compares the cosine to the *predicted* identity's centroid, not to every identity."""
    import typer

    from raylead.cli import app

    webster = typer.main.get_command(app).commands["attack"].commands["webster"]  # type: ignore[attr-defined]
    text = next(p.help for p in webster.params if p.name == "reject_below")
    assert "predicted identity's centroid" in text and "every identity" not in text


def test_library_inputs_that_are_not_embeddings_are_refused() -> None:
    """NaN samples were identified as the first identity (np.argmax of NaN is 0) and could flag
    it; a dimension or length mismatch was a numpy traceback."""
    from raylead.attacks.webster import webster_attack
    from raylead.bench.search import clustered_vectors
    from raylead.errors import ConfigError

    base, q, lab, _ = clustered_vectors(600, 300, 32, 20, seed=7)
    ids = [f"id{x:02d}" for x in lab]
    clean = webster_attack(base, ids, q, members={"id01"})
    assert clean.counts.sum() == 300
    bad = q.copy()
    bad[:40] = np.nan
    for args, says in [
        ((base, ids, bad), "samples contains NaN or infinite values"),
        ((base, ids, q[:, :16]), "queries have dimension 16 but the references has 32"),
        ((base, ids[:-5], q), "ref_identities names 595 references but there are 600"),
    ]:
        with pytest.raises(ConfigError) as err:
            webster_attack(*args, members={"id01"})
        assert says in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"ref_labels must be one class number in \[0, 20\)"):
        identify(q, base, lab[:10], 20)


def _dense_train_linear(x: np.ndarray, labels: np.ndarray, n_classes: int, l2: float = 1e-3):
    """The linear classifier as first written: one dense R×Q one-hot and softmax per step."""
    from scipy.optimize import minimize

    x = np.asarray(x, np.float64)
    n, d = x.shape
    y = np.zeros((n, n_classes))
    y[np.arange(n), labels] = 1.0

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: d * n_classes].reshape(d, n_classes)
        z = x @ w + theta[d * n_classes :]
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        g = (np.exp(logp) - y) / n
        loss = -(y * logp).sum() / n + 0.5 * l2 * float((w * w).sum())
        return loss, np.concatenate([(x.T @ g + l2 * w).ravel(), g.sum(axis=0)])

    res = minimize(loss_grad, np.zeros(d * n_classes + n_classes), jac=True, method="L-BFGS-B")
    return res.x[: d * n_classes].reshape(d, n_classes), res.x[d * n_classes :]


def test_linear_training_in_blocks_matches_the_dense_softmax() -> None:
    """The loss and gradient summed over blocks of references give the model the dense R×Q
    softmax gives (weights to 1e-6, the same identities), whatever the block size."""
    from raylead.attacks.webster import train_linear

    rng = np.random.default_rng(21)
    centres = _unit(rng.normal(size=(12, 16)))
    labels = np.repeat(np.arange(12), 4)
    r = _unit(centres[labels] + 0.4 * rng.normal(size=(48, 16)))
    s = _unit(centres[rng.integers(0, 12, 200)] + 0.4 * rng.normal(size=(200, 16)))
    w, b = _dense_train_linear(r, labels, 12)
    for block in (1, 12 * 5, 12 * 48, 1 << 22):  # one reference a block, five, all of them
        m = train_linear(r, labels, 12, block_elements=block)
        assert m.converged
        np.testing.assert_allclose(m.weights, w, rtol=0, atol=1e-6)
        np.testing.assert_allclose(m.bias, b, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(np.argmax(m.logits(s), axis=1), np.argmax(s @ w + b, axis=1))


def test_linear_training_holds_no_references_by_identities_matrix() -> None:
    """3000 references of 1000 identities: the dense one-hot and softmax terms were five
    R×Q float64 copies (24 MB each, a 117 MiB peak); in blocks of 2^16 elements it is ~4 MiB."""
    from raylead.attacks.webster import train_linear

    rng = np.random.default_rng(8)
    labels = np.arange(3000) % 1000
    r = _unit(rng.normal(size=(3000, 8)))
    train_linear(r[:4], labels[:4], 4, max_iter=1)  # scipy's import is not the training's memory
    tracemalloc.start()
    try:
        train_linear(r, labels, 1000, max_iter=2, block_elements=1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2**20, peak

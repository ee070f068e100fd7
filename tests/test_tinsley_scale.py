"""Tinsley consensus at scale: the vectorised join equals the plain one, in little memory."""

from __future__ import annotations

import tracemalloc
import zlib
from typing import Any

import numpy as np
import pytest

from raylead import exact
from raylead.attacks import EmbeddedSet, Threshold
from raylead.attacks import tinsley as tinsley_mod
from raylead.attacks.tinsley import Consensus, consensus, flagged_pairs

# ids whose Python order is easy to get wrong: non-ASCII, combining marks, astral code points,
# digits (no numeric order), case, a trailing NUL (numpy's fixed-width strings drop it), prefixes
TRICKY = [
    "a", "a\x00", "a\x00b", "ab", "A", "Z", "z", "é", "e\u0301", "ä", "ß", "ſ", "10", "9", "09",
    "\U0001f600", "\uffff", "\U0010fffd", "日本", "日", "Ω", "ω", "ﬁ", "a b", "a-b", "a_b", "img/1",
    "img/10", "img/2", " lead", "trail ", "😀x", "İ", "i̇",
]  # fmt: skip


def reference_consensus(
    generated: dict[str, EmbeddedSet],
    train: dict[str, EmbeddedSet],
    thresholds: dict[str, Threshold | None],
    searchers: dict[str, Any] | None = None,
) -> Consensus:
    """The join as first written (Python sets/dicts of id tuples): the answer to match."""
    from raylead.exact import pair_scores

    searchers = searchers or {}
    labels = list(generated)
    voters = [m for m in labels if thresholds.get(m) is not None]
    flagged_keys: dict[str, set[tuple[str, str]]] = {}
    for m in voters:
        th = thresholds[m]
        assert th is not None
        q, t = flagged_pairs(generated[m], train[m], th.value, searchers.get(m))
        flagged_keys[m] = {(generated[m].ids[a], train[m].ids[b]) for a, b in zip(q, t, strict=True)}
    keys = sorted(set().union(*flagged_keys.values())) if flagged_keys else []
    scores: dict[str, np.ndarray] = {}
    flags: dict[str, np.ndarray] = {}
    for m in labels:
        g_pos = {x: i for i, x in enumerate(generated[m].ids)}
        t_pos = {x: i for i, x in enumerate(train[m].ids)}
        sc = np.full(len(keys), np.nan, np.float32)
        have = [(k, g_pos.get(s), t_pos.get(t)) for k, (s, t) in enumerate(keys)]
        rows = [(k, a, b) for k, a, b in have if a is not None and b is not None]
        if rows:
            kk = np.array([r[0] for r in rows], np.int64)
            aa = np.array([r[1] for r in rows], np.int64)
            bb = np.array([r[2] for r in rows], np.int64)
            g = generated[m].embeddings[aa]
            sc[kk] = (
                searchers[m].pair_scores(g, bb) if m in searchers else pair_scores(g, train[m].embeddings[bb])
            )
        scores[m] = sc
        flags[m] = np.array([k in flagged_keys.get(m, set()) for k in keys], dtype=bool)
    n = np.zeros(len(keys), np.int64)
    for m in voters:
        n += flags[m]
    return Consensus([k[0] for k in keys], [k[1] for k in keys], n, scores, flags, voters)


class ExactSearcher:
    """Stands in for T's index searcher (raylead.search.IndexSearcher): exact, over T's vectors."""

    def __init__(self, base: np.ndarray) -> None:
        self.base = base
        self.calls = 0

    def range_search(self, q: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return exact.range_search(q, self.base, threshold)

    def pair_scores(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        self.calls += 1
        return exact.pair_scores(q, self.base[rows])


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def assert_same(got: Consensus, ref: Consensus) -> None:
    assert type(got.synthetic_ids) is list and type(got.train_ids) is list
    assert got.synthetic_ids == ref.synthetic_ids
    assert got.train_ids == ref.train_ids
    assert all(type(s) is str for s in got.synthetic_ids + got.train_ids)
    assert got.voters == ref.voters
    assert got.n_matchers.dtype == ref.n_matchers.dtype
    np.testing.assert_array_equal(got.n_matchers, ref.n_matchers)
    assert list(got.scores) == list(ref.scores) and list(got.flagged) == list(ref.flagged)
    for m in ref.scores:
        assert got.scores[m].dtype == ref.scores[m].dtype and got.flagged[m].dtype == ref.flagged[m].dtype
        np.testing.assert_array_equal(got.scores[m], ref.scores[m])  # NaN where the same
        np.testing.assert_array_equal(got.flagged[m], ref.flagged[m])
    assert got.counts() == ref.counts()
    assert got.images_flagged_by_all() == ref.images_flagged_by_all()


def random_case(seed: int, n_matchers: int, non_voter: bool):
    """Matchers with their own vectors and partly different id sets (failed embeddings), rows in
    their own order; ids from TRICKY plus plain ones."""
    rng = np.random.default_rng(seed)
    g_pool = TRICKY + [f"g{i}" for i in range(20)]
    t_pool = [f"t{s}" for s in TRICKY] + TRICKY[::2] + [f"t{i}" for i in range(30)]
    dim = 6
    n_c = 5
    gen: dict[str, EmbeddedSet] = {}
    trn: dict[str, EmbeddedSet] = {}
    thr: dict[str, Threshold | None] = {}
    for k in range(n_matchers):
        m = f"m{k}"
        centres = unit(rng.normal(size=(n_c, dim)))
        g_ids = [g_pool[i] for i in rng.permutation(len(g_pool)) if rng.random() > 0.15]
        t_ids = [t_pool[i] for i in rng.permutation(len(t_pool)) if rng.random() > 0.15]
        # an image's identity (cluster) follows its id, whichever matcher embeds it
        g = unit(centres[[zlib.crc32(s.encode()) % n_c for s in g_ids]] + 0.5 * rng.normal(size=(len(g_ids), dim)))
        t = unit(centres[[zlib.crc32(s.encode()) % n_c for s in t_ids]] + 0.5 * rng.normal(size=(len(t_ids), dim)))
        gen[m] = EmbeddedSet.from_arrays(g, g_ids)
        trn[m] = EmbeddedSet.from_arrays(t, t_ids)
        s = (g @ t.T).ravel()
        thr[m] = Threshold(float(np.quantile(s, 0.85)), "x")
    if non_voter:
        thr[f"m{n_matchers - 1}"] = None
    return gen, trn, thr


def test_tricky_ids_sort_as_python_strings() -> None:
    """Python's str order (code points) is the order the consensus lists its pairs in."""
    gen = EmbeddedSet.from_arrays(np.tile(unit(np.ones((1, 4))), (len(TRICKY), 1)), TRICKY)
    trn = EmbeddedSet.from_arrays(np.tile(unit(np.ones((1, 4))), (3, 1)), ["b", "a\x00", "a"])
    c = consensus({"a": gen}, {"a": trn}, {"a": Threshold(0.5, "x")})
    assert list(zip(c.synthetic_ids, c.train_ids, strict=True)) == sorted(
        (s, t) for s in TRICKY for t in ["b", "a\x00", "a"]
    )
    assert_same(c, reference_consensus({"a": gen}, {"a": trn}, {"a": Threshold(0.5, "x")}))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_matchers,non_voter", [(2, False), (3, False), (3, True), (2, True), (1, False)])
def test_consensus_equals_reference(seed: int, n_matchers: int, non_voter: bool) -> None:
    gen, trn, thr = random_case(seed, n_matchers, non_voter)
    ref = reference_consensus(gen, trn, thr)
    assert len(ref.train_ids) > 10  # enough pairs to say something
    assert_same(consensus(gen, trn, thr), ref)


def test_consensus_equals_reference_no_voter_and_empty_sets() -> None:
    gen, trn, thr = random_case(7, 2, False)
    none = {m: None for m in thr}
    assert_same(consensus(gen, trn, none), reference_consensus(gen, trn, none))
    empty = EmbeddedSet.from_arrays(np.zeros((0, 6), np.float32), [])
    gen["m1"] = empty
    assert_same(consensus(gen, trn, thr), reference_consensus(gen, trn, thr))
    gen2 = {m: empty for m in gen}
    assert_same(consensus(gen2, trn, thr), reference_consensus(gen2, trn, thr))


def test_consensus_equals_reference_through_searchers_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """T served by an index searcher for one matcher; scores gathered a few pairs at a time;
    the two-column join used when the packed int64 key could overflow."""
    gen, trn, thr = random_case(11, 3, True)
    searchers = {"m0": ExactSearcher(trn["m0"].embeddings)}
    ref = reference_consensus(gen, trn, thr, searchers)
    assert_same(consensus(gen, trn, thr, searchers), ref)
    monkeypatch.setattr(tinsley_mod, "_SCORE_BLOCK_ELEMENTS", 6 * 7)  # 7 pairs a block at dim 6
    monkeypatch.setattr(tinsley_mod, "_PACKED_KEYS_MAX", 0)
    searchers["m0"].calls = 0
    assert_same(consensus(gen, trn, thr, searchers), ref)
    assert searchers["m0"].calls > 1


def test_duplicate_ids_keep_the_last_row_as_before() -> None:
    """A set holding an id twice (not expected, but the old join kept the last row's score)."""
    rng = np.random.default_rng(3)
    g = unit(rng.normal(size=(6, 4)))
    t = unit(rng.normal(size=(5, 4)))
    gen = {"a": EmbeddedSet.from_arrays(g, ["x", "y", "x", "z", "y", "w"])}
    trn = {"a": EmbeddedSet.from_arrays(t, ["p", "q", "p", "r", "q"])}
    thr: dict[str, Threshold | None] = {"a": Threshold(-1.0, "x")}
    assert_same(consensus(gen, trn, thr), reference_consensus(gen, trn, thr))


def big_case(n_g: int = 500, n_t: int = 1000, dim: int = 4):
    """~40% of the n_g × n_t pairs flagged under each of two matchers (~200k each)."""
    rng = np.random.default_rng(5)
    gen: dict[str, EmbeddedSet] = {}
    trn: dict[str, EmbeddedSet] = {}
    g_ids = [f"synthetic/{i:07d}.png" for i in range(n_g)]
    t_ids = [f"train/person_{i % 97}/{i:07d}.jpg" for i in range(n_t)]
    for m in ("a", "b"):
        gen[m] = EmbeddedSet.from_arrays(unit(rng.normal(size=(n_g, dim))), g_ids)
        trn[m] = EmbeddedSet.from_arrays(unit(rng.normal(size=(n_t, dim))), t_ids)
    thr: dict[str, Threshold | None] = {m: Threshold(0.2, "x") for m in gen}
    return gen, trn, thr


def test_consensus_memory_per_flagged_pair() -> None:
    """The join holds a few int64 per pair, no Python tuple/set/dict entry per pair: the old
    join peaked at ~370 B per flagged pair (tracemalloc; ~10 µs each), this one at ~140 B."""
    gen, trn, thr = big_case()
    pairs = sum(flagged_pairs(gen[m], trn[m], thr[m].value)[0].size for m in gen)  # type: ignore[union-attr]
    assert pairs > 150_000
    tracemalloc.start()
    try:
        c = consensus(gen, trn, thr)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(c.train_ids) > 100_000
    per_pair = peak / pairs
    assert per_pair < 250, f"consensus peaked at {per_pair:.0f} B per flagged pair ({pairs} pairs)"

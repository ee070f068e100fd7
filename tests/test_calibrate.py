"""Threshold calibration: every number checked against a brute-force computation."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from raylead.attacks import EmbeddedSet, resolve_threshold
from raylead.attacks.calibrate import (
    CalibrateConfig,
    calibrate_set,
    count_pairs,
    equal_error_rate,
    pair_scores,
    read_calibration,
    run_calibrate,
    threshold_at_fmr,
)
from raylead.errors import ConfigError


def clustered(n_ids: int, per_id: int, dim: int = 32, noise: float = 0.6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_ids), per_id)
    x = centres[labels] + noise * rng.normal(size=(labels.size, dim)) / math.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def brute_threshold(impostor: np.ndarray, fmr: float) -> float:
    """Smallest float32 t with mean(impostor >= t) <= fmr, by trying every candidate."""
    u = np.unique(impostor.astype(np.float32))
    cands = np.unique(np.concatenate([u, np.nextafter(u, np.float32(np.inf), dtype=np.float32)]))
    for t in cands:  # ascending: the first that satisfies is the smallest
        if np.mean(impostor >= t) <= fmr:
            return float(t)
    raise AssertionError("no candidate satisfies")


def brute_eer(gen: np.ndarray, imp: np.ndarray) -> tuple[float, float]:
    cands = np.unique(np.concatenate([gen, imp]).astype(np.float32))
    cands = np.append(cands, np.nextafter(cands[-1], np.float32(np.inf), dtype=np.float32))
    best = None
    for t in cands:
        fmr = np.mean(imp >= t)
        fnmr = np.mean(gen < t)
        gap = abs(fmr - fnmr)
        if best is None or gap < best[0]:
            best = (gap, (fmr + fnmr) / 2, float(t))
    assert best is not None
    return best[1], best[2]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fmr", [0.5, 0.1, 0.013, 1e-3])
def test_threshold_at_fmr_equals_brute_force(seed: int, fmr: float) -> None:
    rng = np.random.default_rng(seed)
    imp = np.tanh(rng.normal(size=rng.integers(50, 400))).astype(np.float32)  # cosines: in (-1, 1)
    if seed % 2:  # many ties (below 1: impostors at 1 are the case below)
        imp = (np.floor(imp * 10) / 10).astype(np.float32)
    got = threshold_at_fmr(imp, fmr)
    assert got.threshold == brute_threshold(imp, fmr)
    assert got.impostor_matches == int(np.sum(imp >= np.float32(got.threshold)))
    assert got.fmr_achieved <= fmr
    assert got.impostor_pairs == imp.size


def test_threshold_below_resolution_is_above_every_impostor() -> None:
    imp = np.array([0.1, 0.5, 0.2], np.float32)
    got = threshold_at_fmr(imp, 1e-3)
    assert got.threshold > 0.5 and got.impostor_matches == 0 and not got.fmr_resolvable
    assert got.threshold == float(np.nextafter(np.float32(0.5), np.float32(1)))


def test_threshold_is_at_most_one() -> None:
    """One photo filed under two identities is an impostor pair at cosine 1 (float32: 1.0000001):
    θ was written as 1.0000002, which every reader then refused. No θ ≤ 1 rejects that pair, so θ
    stays 1 and the FMR achieved says it is above the target."""
    imp = np.concatenate([np.full(2, np.nextafter(np.float32(1), np.float32(2))), np.linspace(-0.5, 0.5, 98)])
    got = threshold_at_fmr(imp.astype(np.float32), 1e-2)
    assert got.threshold == 1.0 and got.impostor_matches == 2 and got.fmr_achieved == 0.02


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 2.0])
def test_threshold_rejects_bad_fmr(bad: float) -> None:
    with pytest.raises(ConfigError, match="--fmr"):
        threshold_at_fmr(np.zeros(10, np.float32), bad)


@pytest.mark.parametrize("seed", range(5))
def test_eer_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gen = (rng.normal(size=120) * 0.1 + 0.6).astype(np.float32)
    imp = (rng.normal(size=900) * 0.1 + 0.3).astype(np.float32)
    if seed % 2:
        gen, imp = np.round(gen, 2), np.round(imp, 2)
    e = equal_error_rate(gen, imp)
    eer, t = brute_eer(gen, imp)
    assert e.eer == pytest.approx(eer) and e.threshold == t


def test_pair_scores_all_pairs_equal_double_loop() -> None:
    x, labels = clustered(6, 4, seed=1)
    ps = pair_scores(x, labels, block=5)  # several blocks
    gen, imp = [], []
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            (gen if labels[i] == labels[j] else imp).append(float(x[i] @ x[j]))
    assert sorted(ps.genuine.tolist()) == pytest.approx(sorted(gen), abs=1e-6)
    assert sorted(ps.impostor.tolist()) == pytest.approx(sorted(imp), abs=1e-6)
    assert (ps.genuine_pairs_total, ps.impostor_pairs_total) == (len(gen), len(imp)) == count_pairs(labels)
    assert not ps.impostor_sampled


def test_pair_scores_sample_is_seeded_and_impostor_only() -> None:
    x, labels = clustered(10, 5, seed=2)
    a = pair_scores(x, labels, impostor_pairs=300, seed=7)
    b = pair_scores(x, labels, impostor_pairs=300, seed=7)
    c = pair_scores(x, labels, impostor_pairs=300, seed=8)
    assert a.impostor_sampled and a.impostor.size == 300 and a.seed == 7
    assert np.array_equal(a.impostor, b.impostor) and not np.array_equal(a.impostor, c.impostor)
    allowed = {round(float(x[i] @ x[j]), 5) for i in range(50) for j in range(50) if labels[i] != labels[j]}
    assert {round(float(v), 5) for v in a.impostor} <= allowed
    # asking for more than exist uses all of them
    assert not pair_scores(x, labels, impostor_pairs=10**9).impostor_sampled


def test_pair_scores_refuses_too_many_pairs() -> None:
    x, labels = clustered(10, 5)
    with pytest.raises(ConfigError, match="--impostor-pairs"):
        pair_scores(x, labels, max_pairs=100)
    with pytest.raises(ConfigError, match=r"--impostor-pairs 101 is more than the 100 scores held in memory"):
        pair_scores(x, labels, impostor_pairs=101, max_pairs=100)
    assert pair_scores(x, labels, impostor_pairs=100, max_pairs=100).impostor.size == 100


def test_sampled_impostor_pairs_are_gathered_a_chunk_at_a_time(monkeypatch) -> None:
    """A sample of N impostor pairs does not gather N × dim vectors at once (at 10⁷ pairs × 512-d
    that was ≈ 41 GB): peak memory stays near the scores plus one chunk, and the chunking does
    not change a seeded sample."""
    import tracemalloc

    from raylead.attacks import calibrate as cal

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.arange(2000) // 4
    monkeypatch.setattr(cal, "SAMPLE_CHUNK", 4096)
    tracemalloc.start()
    try:
        got = pair_scores(x, labels, impostor_pairs=400_000, seed=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    gathered = 400_000 * 1.2 * 64 * 4 * 2  # both sides of every drawn pair at once: ≈ 246 MB
    assert peak < gathered / 4, f"peak {peak / 2**20:.0f} MiB"
    monkeypatch.setattr(cal, "SAMPLE_CHUNK", 1 << 30)
    np.testing.assert_array_equal(got.impostor, pair_scores(x, labels, impostor_pairs=400_000, seed=3).impostor)


def test_calibrate_set_json_and_unlabelled_rows() -> None:
    x, labels = clustered(12, 5, seed=3)
    ids = [f"p{lab}/img{i}.jpg" for i, lab in enumerate(labels)]
    idents: list[str | None] = [f"p{lab}" for lab in labels]
    idents[0] = None
    es = EmbeddedSet.from_arrays(x, ids, idents, matcher="dlib")
    cal = calibrate_set(es, fmr=1e-2, bins=20)
    d = cal.to_json()
    assert d["images"]["unlabelled"] == 1 and d["images"]["used"] == 59
    assert d["impostor_pairs"] == d["impostor_pairs_total"] == count_pairs(labels[1:])[1]
    assert d["threshold"] == brute_threshold(cal.scores.impostor, 1e-2)
    assert len(d["histogram"]["edges"]) == 21 and sum(d["histogram"]["genuine"]) == d["genuine_pairs"]
    assert sum(d["histogram"]["impostor"]) == d["impostor_pairs"]
    assert d["fnmr_at_threshold"] == pytest.approx(
        float(np.mean(cal.scores.genuine < np.float32(d["threshold"])))
    )
    assert d["impostor_sampling"] == {"mode": "all"}
    assert [p["fmr_target"] for p in d["operating_points"]] == [0.1, 0.01, 0.001]
    json.dumps(d)


def test_calibrate_needs_two_identities() -> None:
    x, _ = clustered(1, 5)
    es = EmbeddedSet.from_arrays(x, identities=["a"] * 5)
    with pytest.raises(ConfigError, match="two identities"):
        calibrate_set(es, 1e-2)


def test_calibrate_refuses_non_finite_embeddings() -> None:
    """A NaN row's impostor scores sort above every real one and would fill the allowed matches
    (θ far too high, fmr_achieved 0): refused, naming the image."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"p{i // 4}" for i in range(200)]
    good = calibrate_set(EmbeddedSet.from_arrays(x, identities=ids), 1e-2)
    assert good.at_fmr.impostor_matches > 0
    bad = x.copy()
    bad[3] = np.nan  # from_arrays refuses it too: calibrate_set's own check is reached past it
    with pytest.raises(ConfigError, match=r"1 of the 200 labelled embeddings .* are not finite \(first: img000003\)"):
        calibrate_set(dataclasses.replace(EmbeddedSet.from_arrays(x, identities=ids), embeddings=bad), 1e-2)


def test_run_calibrate_on_collection_and_threshold_from(tmp_path, write_collection, caplog) -> None:
    x, labels = clustered(15, 4, seed=4)
    ids = [f"p{lab}/{i}.jpg" for i, lab in enumerate(labels)]
    coll = write_collection(
        tmp_path / "coll", ids, [f"p{lab}" for lab in labels], x, matcher="dlib", version="v1"
    )
    out = tmp_path / "cal" / "dlib.json"
    data = run_calibrate(CalibrateConfig(labelled=coll, out=str(out), matcher="dlib", fmr=1e-2))
    on_disk = read_calibration(str(out))
    assert on_disk["threshold"] == data["threshold"] and on_disk["matcher"] == {
        "name": "dlib",
        "version": "v1",
        "dim": 32,
    }
    with caplog.at_level("WARNING", logger="raylead.attacks"):
        th = resolve_threshold(None, str(out), "dlib", "v1")
    assert th is not None and th.value == data["threshold"] and th.fmr == 1e-2
    assert not [r for r in caplog.records if "too few" in r.getMessage()]
    # a θ calibrated at an FMR its impostor pairs cannot measure is said so where it is used too
    coarse = tmp_path / "cal" / "coarse.json"
    run_calibrate(CalibrateConfig(labelled=coll, out=str(coarse), matcher="dlib", fmr=1e-5))
    with caplog.at_level("WARNING", logger="raylead.attacks"):
        resolve_threshold(None, str(coarse), "dlib", "v1")
    assert [r for r in caplog.records if "1680 impostor pairs, too few to measure FMR 1e-05" in r.getMessage()]
    with pytest.raises(ConfigError, match="made with matcher 'dlib v1'"):
        resolve_threshold(None, str(out), "onnx", "m.onnx@123")
    with pytest.raises(ConfigError, match="made with matcher"):
        resolve_threshold(None, str(out), "dlib", "v2")
    with pytest.raises(ConfigError, match="not both"):
        resolve_threshold(0.5, str(out), "dlib")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_threshold(None, str(tmp_path / "nope.json"), "dlib")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a raylead calibration"):
        read_calibration(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="cosine"):
        resolve_threshold(1.5, None, "dlib")


def test_calibrate_cli(tmp_path, write_collection) -> None:
    from typer.testing import CliRunner

    from raylead.cli import app

    x, labels = clustered(10, 4, seed=5)
    coll = write_collection(tmp_path / "c", [f"{i}.jpg" for i in range(40)], [f"p{lab}" for lab in labels], x)
    out = tmp_path / "cal.json"
    res = CliRunner().invoke(
        app,
        [
            "calibrate",
            coll,
            "--matcher",
            "dlib",
            "--fmr",
            "1e-2",
            "--impostor-pairs",
            "500",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "threshold" in res.output and "EER" in res.output
    d = json.loads(out.read_text())
    assert d["impostor_sampling"]["mode"] == "sample" and d["impostor_pairs"] == 500
    bad = CliRunner().invoke(app, ["calibrate", coll, "--fmr", "2", "--out", str(out)])
    assert bad.exit_code != 0


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--impostor-pairs", "10", "--seed", "-1"], "--seed must be a whole number ≥ 0"),
        (["--seed", "-5"], "--seed must be a whole number ≥ 0"),
        (["--impostor-pairs", "inf"], "--impostor-pairs must be 'all' or a positive whole number"),
        (["--impostor-pairs", "-inf"], "--impostor-pairs must be 'all' or a positive whole number"),
        (["--impostor-pairs", "nan"], "--impostor-pairs must be 'all' or a"),
        (["--impostor-pairs", "1.5"], "--impostor-pairs must be 'all' or a positive whole number"),
        (["--impostor-pairs", "0"], "--impostor-pairs must be 'all' or a positive whole number"),
    ],
)
def test_calibrate_refuses_bad_seed_and_pairs_before_any_work(tmp_path, monkeypatch, capsys, flags, says) -> None:
    """One line, exit code 2, before the labelled folder is embedded (the guard fails the test
    otherwise) and before anything is written beside --out (was: a numpy traceback after the
    embedding for --seed -1, an OverflowError for inf)."""
    import sys

    from raylead import catalog, embed
    from raylead.cli import run

    def work(*_a, **_k):
        raise AssertionError("the labelled set was loaded or embedded before the arguments were refused")

    monkeypatch.setattr(embed, "ensure_collection", work)
    monkeypatch.setattr(catalog, "read_collection", work)
    for person in ("p0", "p1"):
        (tmp_path / "faces" / person).mkdir(parents=True)
        (tmp_path / "faces" / person / "a.jpg").write_bytes(b"\xff\xd8 never decoded")
    out = tmp_path / "cal" / "dlib.json"
    monkeypatch.setattr(sys, "argv", ["raylead", "calibrate", str(tmp_path / "faces"), "--out", str(out), *flags])
    rc = run()
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("raylead: error: "), err
    assert says in err, err
    assert not (tmp_path / "cal").exists()  # no embeddings folder beside --out


def test_calibrate_config_checks_seed_and_pairs() -> None:
    from raylead.attacks.calibrate import parse_impostor_pairs
    from raylead.config import from_mapping

    assert parse_impostor_pairs("1e3") == 1000 and parse_impostor_pairs("ALL") is None
    for bad in ({"seed": -1}, {"impostor_pairs": 0}):
        with pytest.raises(ConfigError, match="--seed|--impostor-pairs"):
            from_mapping(CalibrateConfig, {"labelled": "l", "out": "o", **bad})
    with pytest.raises(ConfigError, match="impostor.pairs .*whole number"):
        from_mapping(CalibrateConfig, {"labelled": "l", "out": "o", "impostor_pairs": math.inf})
    assert from_mapping(CalibrateConfig, {"labelled": "l", "out": "o", "seed": 2**70}).seed == 2**70


def test_read_calibration_of_a_folder_is_one_line(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot be read .*give the JSON file"):
        read_calibration(str(tmp_path))


@pytest.mark.parametrize("threshold", ["NaN", "7.5", "-3", "Infinity"])
def test_a_calibration_threshold_that_is_not_a_cosine_is_refused(tmp_path, threshold) -> None:
    """An edited or damaged file's NaN / 7.5 read as "0 % leak" and -3 as 100 %, exit 0."""
    from raylead.attacks.calibrate import CALIBRATION_KIND
    from raylead.errors import CorruptDataError

    good = {"kind": CALIBRATION_KIND, "threshold": 0.5, "fmr_target": 0.01, "impostor_pairs": 10,
            "matcher": {"name": "dlib"}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(good))
    assert read_calibration(str(path))["threshold"] == 0.5
    path.write_text(json.dumps(good).replace("0.5", threshold))
    with pytest.raises(CorruptDataError, match="not a cosine in \\[-1, 1\\]; rerun `raylead calibrate`"):
        read_calibration(str(path))


def test_calibrate_refuses_a_collection_whose_embeddings_are_not_normalised(
    tmp_path, write_collection, monkeypatch, capsys
) -> None:
    """One ok row scaled by 2 (checksums valid) wrote θ=1.0 with exit 0: refused in one line, exit 2,
    and no calibration written."""
    import sys

    from raylead.cli import run

    x, labels = clustered(10, 4, seed=6)
    x[7] *= 2
    coll = write_collection(tmp_path / "c", [f"{i}.jpg" for i in range(40)], [f"p{lab}" for lab in labels], x)
    out = tmp_path / "cal.json"
    monkeypatch.setattr(sys, "argv", ["raylead", "calibrate", coll, "--matcher", "dlib", "--fmr", "1e-2",
                                      "--out", str(out)])
    assert run() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("raylead: error: "), err
    assert ("c/shards/part-00000.parquet has 1 ok row(s) whose embedding is not L2-normalised (first: image_id "
            "'7.jpg', norm 2)") in err
    assert not out.exists()

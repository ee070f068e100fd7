"""Planted-leak scenario builder: deterministic, disjoint where it must be, never rigged."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from raylead.attacks.scenarios import (
    MembershipScenarioConfig,
    PairsScenarioConfig,
    ScenarioBuildConfig,
    build_scenario,
    photos_by_identity,
    plan_membership,
    plan_pairs,
    write_role_collections,
)
from raylead.errors import ConfigError
from raylead.storage import Location


def fake_photos(n_ids: int = 40, per_id: int = 10) -> dict[str, list[str]]:
    return {
        f"person_{i:03d}": [f"person_{i:03d}/person_{i:03d}_{j:04d}.jpg" for j in range(per_id)]
        for i in range(n_ids)
    }


def by_role(sc, role):
    return sc.role(role)


def test_pairs_plan_is_deterministic_disjoint_and_leaks_other_photos() -> None:
    photos = fake_photos()
    cfg = PairsScenarioConfig(
        seed=3, leak_fraction=0.25, n_train=12, n_holdout=10, train_photos=4, leak_photos=3, synthetic_size=30
    )
    a, b = plan_pairs(photos, cfg), plan_pairs(photos, cfg)
    assert a.entries == b.entries and a.members == b.members
    assert plan_pairs(photos, PairsScenarioConfig(**{**cfg.__dict__, "seed": 4})).entries != a.entries
    train, holdout, syn = by_role(a, "train"), by_role(a, "holdout"), by_role(a, "synthetic")
    t_ids, h_ids = {e.identity for e in train}, {e.identity for e in holdout}
    assert len(t_ids) == 12 and len(h_ids) == 10 and not t_ids & h_ids
    assert len(train) == 48 and len(syn) == 30 and len(a.leaked) == 3 and a.members == a.leaked
    train_sources = {e.source for e in train}
    for e in syn:
        assert e.source not in train_sources  # a leak is a different photo of the person
        assert e.identity in a.leaked or (e.identity not in t_ids and e.identity not in h_ids)
        assert e.folder_identity is None and e.image_id.startswith("s_")  # names say nothing
    assert sum(e.identity in a.leaked for e in syn) == 3 * 3
    assert len({e.dest for e in a.entries}) == len(a.entries)


def test_pairs_no_leak_control_keeps_t_and_h() -> None:
    photos = fake_photos()
    base = dict(seed=1, n_train=12, n_holdout=12, train_photos=4, leak_photos=2, synthetic_size=30)
    leak = plan_pairs(photos, PairsScenarioConfig(leak_fraction=1.0, **base))  # type: ignore[arg-type]
    none = plan_pairs(photos, PairsScenarioConfig(leak_fraction=0.0, **base))  # type: ignore[arg-type]
    assert by_role(leak, "train") == by_role(none, "train") and by_role(leak, "holdout") == by_role(
        none, "holdout"
    )
    assert len(by_role(leak, "synthetic")) == len(by_role(none, "synthetic")) == 30
    assert none.leaked == [] and all(
        e.identity not in {x.identity for x in by_role(none, "train")} for e in by_role(none, "synthetic")
    )


def test_pairs_config_errors() -> None:
    with pytest.raises(ConfigError, match="--leak-fraction"):
        plan_pairs(fake_photos(), PairsScenarioConfig(leak_fraction=1.5))
    with pytest.raises(ConfigError, match="identities have"):
        plan_pairs(fake_photos(5), PairsScenarioConfig(n_train=10))
    with pytest.raises(ConfigError, match="smaller than"):
        plan_pairs(
            fake_photos(), PairsScenarioConfig(n_train=10, n_holdout=5, leak_fraction=1.0, synthetic_size=5)
        )


def test_membership_plan() -> None:
    photos = fake_photos(60)
    cfg = MembershipScenarioConfig(seed=2, leak_fraction=0.2, n_train=20, n_nonmember=16, novel_samples=15)
    sc = plan_membership(photos, cfg)
    assert sc == plan_membership(photos, cfg)
    q, t, s = by_role(sc, "queries"), by_role(sc, "train"), by_role(sc, "samples")
    q_ids, t_ids = {e.identity for e in q}, {e.identity for e in t}
    assert len(sc.leaked) == 4 and set(sc.members) == q_ids & t_ids == set(sc.leaked)
    assert len(q_ids) == 20 and len(q) == 60 and len(t) == 60
    sources = [e.source for e in q] + [e.source for e in t] + [e.source for e in s]
    assert len(sources) == len(set(sources))  # references, training photos and samples never overlap
    leaked_samples = [e for e in s if e.identity in sc.leaked]
    assert len(leaked_samples) == 16 and len(s) == 31
    assert all(e.identity not in q_ids | t_ids for e in s if e.identity not in sc.leaked)
    wide = plan_membership(
        photos, MembershipScenarioConfig(**{**cfg.__dict__, "query_unleaked_members": True})
    )
    assert set(wide.members) == t_ids and set(wide.leaked) == set(sc.leaked)


def test_build_from_folder_symlinks_and_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from raylead.cli import app

    src = tmp_path / "faces"
    for ident, files in fake_photos(30, 10).items():
        (src / ident).mkdir(parents=True)
        for f in files:
            (src / f).write_bytes(f.encode())
    out = tmp_path / "scenario"
    sc, written = build_scenario(
        ScenarioBuildConfig(
            labelled=str(src),
            out=str(out),
            kind="pairs",
            pairs=PairsScenarioConfig(
                n_train=10, n_holdout=10, train_photos=4, leak_photos=2, leak_fraction=0.3
            ),
        )
    )
    assert set(written) == {"train", "holdout", "synthetic"}
    first = sc.role("synthetic")[0]
    link = out / first.dest
    assert link.is_symlink() and link.read_bytes() == first.source.encode()
    assert (out / "members.txt").read_text().split() == sc.members
    rows = list(csv.DictReader((out / "truth.csv").open()))
    assert len(rows) == len(sc.role("synthetic")) and {r["leaked"] for r in rows} == {"True", "False"}
    assert json.loads((out / "scenario.json").read_text())["counts"]["members"] == 3
    res = CliRunner().invoke(
        app,
        [
            "scenario",
            "build",
            str(src),
            "--out",
            str(tmp_path / "m"),
            "--kind",
            "membership",
            "--n-train",
            "10",
            "--n-nonmember",
            "8",
            "--novel-samples",
            "5",
            "--copy",
        ],
    )
    assert res.exit_code == 0, res.output
    samples = sorted(os.listdir(tmp_path / "m" / "samples"))
    assert len(samples) == 2 * 4 + 5 and not (tmp_path / "m" / "samples" / samples[0]).is_symlink()
    bad = CliRunner().invoke(app, ["scenario", "build", str(src), "--out", str(src / "x")])
    assert bad.exit_code != 0


def test_role_collections_match_what_embedding_the_folders_gives(tmp_path: Path, write_collection) -> None:
    from raylead.catalog import read_collection

    photos = fake_photos(30, 8)
    ids = [p for ps in photos.values() for p in ps]
    idents = [p.split("/")[0] for p in ids]
    emb = np.eye(len(ids), 256, dtype=np.float32)
    statuses = ["ok"] * len(ids)
    statuses[5] = "no_face"
    coll = read_collection(write_collection(tmp_path / "c", ids, idents, emb, statuses=statuses))
    assert photos_by_identity(coll.image_ids, coll.identities) == photos
    sc = plan_pairs(photos, PairsScenarioConfig(n_train=10, n_holdout=10, train_photos=4, leak_photos=2))
    written = write_role_collections(sc, coll, Location.parse(str(tmp_path / "s")))
    syn = read_collection(written["synthetic"])
    assert sorted(syn.image_ids) == sorted(e.image_id for e in sc.role("synthetic"))
    assert set(syn.identities) == {None}
    train = read_collection(written["train"])
    pos = {e.image_id: e.source for e in sc.role("train")}
    for img, ident in zip(train.image_ids, train.identities, strict=True):
        assert ident == img.split("/")[0] == pos[img].split("/")[0]
    src_row = {p: i for i, p in enumerate(ids)}
    for k, img in enumerate(train.ok_ids):
        assert np.array_equal(train.embeddings[k], emb[src_row[pos[img]]])


def test_alterations_change_pixels_but_keep_shape() -> None:
    from raylead.attacks.scenarios import ALTERATIONS, alter

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)
    for how in ALTERATIONS:
        out = alter(img, how, rng)
        assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img), how
    assert np.array_equal(alter(img, "flip", rng), img[:, ::-1])
    with pytest.raises(ConfigError, match="unknown alteration"):
        alter(img, "rotate", rng)


def test_write_altered_scenario(tmp_path: Path) -> None:
    from raylead.attacks.scenarios import AlteredScenarioConfig, write_altered_scenario

    rng = np.random.default_rng(1)
    photos = {f"p{i}": [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)] for i in range(8)}
    sc = write_altered_scenario(photos, Location.parse(str(tmp_path)), AlteredScenarioConfig(seed=3))
    assert len(sc.roles["train"]) == 4 and len(sc.leaked) == 2 and set(sc.leaked) <= set(sc.roles["train"])
    syn = sc.role("synthetic")
    assert len(syn) == (2 + 2) * 5 and all((tmp_path / e.dest).is_file() for e in sc.entries)
    rows = sc.truth_rows()
    assert sum(r["leaked"] for r in rows) == 10 and {r["identity"] for r in rows} == set(sc.leaked) | set(
        sc.roles["other"]
    )
    assert (tmp_path / "members.txt").read_text().split() == sc.leaked
    with pytest.raises(ConfigError, match="cannot make"):
        write_altered_scenario(
            photos, Location.parse(str(tmp_path / "x")), AlteredScenarioConfig(n_holdout=7)
        )


def test_scenario_build_on_s3_with_the_s3_flags(s3_server, tmp_path: Path, monkeypatch) -> None:
    """`raylead scenario build` reads and writes S3 with its --s3-* flags (the environment holding
    no credentials): the same scenario as from a local copy of the labelled folder, files copied."""
    from s3server import ACCESS_KEY, SECRET_KEY
    from typer.testing import CliRunner

    from raylead.cli import app

    src = "s3://raylead/scenario-flags/faces"
    for ident, files in fake_photos(16, 9).items():
        for f in files:
            Location.parse(f"{src}/{f}").write_bytes(f.encode())
            (tmp_path / "faces" / ident).mkdir(parents=True, exist_ok=True)
            (tmp_path / "faces" / f).write_bytes(f.encode())
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    args = ["scenario", "build", "--n-train", "6", "--n-holdout", "6"]
    res = CliRunner().invoke(app, [*args, src, "--out", "s3://raylead/scenario-flags/out"])
    assert res.exit_code != 0 and "no S3 credentials were found" in str(res.exception)
    res = CliRunner().invoke(app, [*args, src, "--out", "s3://raylead/scenario-flags/out", "--s3-endpoint",
                                   endpoint, "--s3-key", ACCESS_KEY, "--s3-secret", SECRET_KEY])
    assert res.exit_code == 0, res.output
    local = CliRunner().invoke(app, [*args, str(tmp_path / "faces"), "--out", str(tmp_path / "out")])
    assert local.exit_code == 0, local.output
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    out = Location.parse("s3://raylead/scenario-flags/out")
    assert out.child("members.txt").read_bytes() == (tmp_path / "out" / "members.txt").read_bytes()
    assert out.child("truth.csv").read_bytes() == (tmp_path / "out" / "truth.csv").read_bytes()
    first = sorted(out.child("synthetic").list_files())[0]
    assert out.child("synthetic").child(first).read_bytes() == (tmp_path / "out" / "synthetic" / first).read_bytes()

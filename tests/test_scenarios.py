"""Planted-leak scenario builder: deterministic, disjoint where it must be, never rigged."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
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
    umask = os.umask(0o022)
    try:
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
    finally:
        os.umask(umask)
    assert set(written) == {"train", "holdout", "synthetic"}
    # the folders name the people: owner-only, as every local output (they were 0755)
    assert {oct(p.stat().st_mode & 0o777) for p in [out / "train", *(out / "train").iterdir()]} == {"0o700"}
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
    # a flag of the other kind was silently ignored (the scenario built was not the one asked for)
    for kind, flag in (("membership", "--n-holdout"), ("pairs", "--novel-samples")):
        args = ["scenario", "build", str(src), "--out", str(tmp_path / "s"), "--kind", kind, flag, "3"]
        stray = CliRunner().invoke(app, args)
        assert isinstance(stray.exception, ConfigError), stray.output  # `raylead` makes it exit 2, one line
        assert f"{flag} does not apply to --kind {kind}" in str(stray.exception)
        assert not (tmp_path / "s").exists()


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


def _faces(root: Path, n_ids: int = 30, per_id: int = 10) -> Path:
    for ident, files in fake_photos(n_ids, per_id).items():
        (root / ident).mkdir(parents=True, exist_ok=True)
        for f in files:
            (root / f).write_bytes(f.encode())
    return root


def _on_disk_equals_truth(out: Path) -> None:
    """Every role folder holds exactly the files scenario.json / truth.csv say, nothing else."""
    meta = json.loads((out / "scenario.json").read_text())
    truth = list(csv.DictReader((out / "truth.csv").open()))
    generated = "samples" if meta["kind"] == "membership" else "synthetic"
    assert sorted(os.listdir(out / generated)) == sorted(r["image_id"] for r in truth)
    folders = {"train", "holdout"} if meta["kind"] == "pairs" else {"train", "queries"}
    for role in folders:
        assert sorted(os.listdir(out / role)) == sorted(meta["roles"][role])
        assert sum(len(os.listdir(out / role / i)) for i in meta["roles"][role]) == meta["counts"][role]["images"]
    roles = {"train", "holdout", "synthetic", "queries", "samples"}
    assert {p.name for p in out.iterdir()} & roles == set(meta["counts"]) & roles
    assert (out / "members.txt").read_text().split() == meta["members"]


def test_rebuild_into_the_same_folder_holds_exactly_the_new_build(tmp_path: Path) -> None:
    """A smaller rebuild into an existing --out used to keep the old build's files (100 synthetic
    files beside a 50-row truth.csv, 60 training folders for 30 training identities, stale training
    identities in holdout/): the folder now holds exactly what the new ground truth says."""
    src = _faces(tmp_path / "faces", 40)
    out = tmp_path / "scenario"

    def build(kind: str = "pairs", **pairs) -> None:
        build_scenario(
            ScenarioBuildConfig(
                labelled=str(src),
                out=str(out),
                kind=kind,
                pairs=PairsScenarioConfig(train_photos=4, leak_photos=2, **pairs),
                membership=MembershipScenarioConfig(n_train=8, n_nonmember=5, novel_samples=6),
            )
        )
        _on_disk_equals_truth(out)

    build(n_train=20, n_holdout=10, synthetic_size=40)
    (out / "notes.txt").write_text("mine")  # the user's file beside a build is left alone
    build(n_train=10, n_holdout=10, synthetic_size=15, seed=1)
    assert len(os.listdir(out / "synthetic")) == 15 and len(os.listdir(out / "train")) == 10
    meta = json.loads((out / "scenario.json").read_text())
    assert not set(meta["roles"]["train"]) & set(os.listdir(out / "holdout"))
    build("membership")  # another kind: the pairs folders go
    assert not (out / "holdout").exists() and not (out / "synthetic").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert all((src / p).read_bytes() == p.encode() for ps in fake_photos(40).values() for p in ps)


def test_an_interrupted_build_is_started_over(tmp_path: Path, monkeypatch) -> None:
    """scenario.json is a placeholder until the build ends: a rerun after a crash still
    recognises the folder as a scenario build (and never refuses it as someone else's)."""
    import raylead.attacks.scenarios as scenarios

    src = _faces(tmp_path / "faces")
    cfg = ScenarioBuildConfig(
        labelled=str(src), out=str(tmp_path / "s"), pairs=PairsScenarioConfig(n_train=10, n_holdout=5)
    )

    def crash(sc, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(scenarios, "write_ground_truth", crash)
    with pytest.raises(KeyboardInterrupt):
        build_scenario(cfg)
    monkeypatch.undo()
    build_scenario(cfg)
    _on_disk_equals_truth(tmp_path / "s")


@pytest.mark.parametrize("content", ["file", "folder", "scenario.json"])
def test_a_folder_that_is_not_a_scenario_build_is_refused_and_left_intact(tmp_path: Path, content) -> None:
    src = _faces(tmp_path / "faces")
    out = tmp_path / "mine"
    (out / "train" / "alice").mkdir(parents=True)
    (out / "train" / "alice" / "1.jpg").write_bytes(b"photo")
    if content == "file":
        (out / "thesis.tex").write_text("x")
    elif content == "scenario.json":
        (out / "scenario.json").write_text("not raylead's")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    small = PairsScenarioConfig(n_train=10, n_holdout=5)
    with pytest.raises(ConfigError) as err:
        build_scenario(ScenarioBuildConfig(labelled=str(src), out=str(out), pairs=small))
    msg = str(err.value)
    assert "\n" not in msg and f"--out {out}" in msg and "choose an empty or new folder" in msg
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "train" / "alice" / "1.jpg").read_bytes() == b"photo"


def test_rebuild_of_role_collections_holds_exactly_the_new_build(tmp_path: Path, write_collection) -> None:
    from raylead.catalog import read_collection

    photos = fake_photos(40, 10)
    ids = [p for ps in photos.values() for p in ps]
    emb = np.eye(len(ids), 512, dtype=np.float32)
    coll = write_collection(tmp_path / "c", ids, [p.split("/")[0] for p in ids], emb)
    out = tmp_path / "s"
    for kind in ("membership", "pairs"):
        sc, written = build_scenario(
            ScenarioBuildConfig(
                labelled=coll,
                out=str(out),
                kind=kind,
                pairs=PairsScenarioConfig(n_train=10, n_holdout=10, train_photos=4, leak_photos=2),
                membership=MembershipScenarioConfig(n_train=8, n_nonmember=5, novel_samples=6),
            )
        )
    truth_files = {"members.txt", "truth.csv", "scenario.json"}
    assert {p.name for p in out.iterdir()} == {"train", "holdout", "synthetic", *truth_files}
    assert sorted(read_collection(written["synthetic"]).image_ids) == sorted(r["image_id"] for r in sc.truth_rows())


@pytest.mark.parametrize("kind", ["pairs", "membership"])
def test_a_negative_seed_is_one_line_naming_the_flag(kind) -> None:
    cfg = PairsScenarioConfig(seed=-1) if kind == "pairs" else MembershipScenarioConfig(seed=-1)
    with pytest.raises(ConfigError, match=r"^--seed must be a whole number ≥ 0, got -1$"):
        (plan_pairs if kind == "pairs" else plan_membership)(fake_photos(), cfg)


def test_too_few_novel_photos_names_novel_samples_not_synthetic_size() -> None:
    with pytest.raises(ConfigError) as err:
        plan_membership(fake_photos(20), MembershipScenarioConfig(n_train=10, n_nonmember=5, novel_samples=1000))
    msg = str(err.value)
    assert "--novel-samples: need 1000" in msg and "--n-nonmember" in msg
    assert "synthetic-size" not in msg and "holdout" not in msg
    with pytest.raises(ConfigError, match=r"--synthetic-size: need \d+, have \d+; .*--n-holdout"):
        plan_pairs(fake_photos(40), PairsScenarioConfig(n_train=10, n_holdout=10, synthetic_size=500))


@pytest.mark.parametrize("kind", ["pairs", "membership"])
def test_photos_whose_identity_and_file_name_collide_are_all_written(tmp_path: Path, kind) -> None:
    """web/Ann/1.jpg and news/Ann/1.jpg both belong to Ann: each gets its own file in the role
    folder (a short hash of its source path added to the name), so the files match the ground truth."""
    src = tmp_path / "faces"
    for i in range(30):
        for site in ("web", "news"):
            (src / site / f"p{i:02d}").mkdir(parents=True)
            for j in range(5):
                (src / site / f"p{i:02d}" / f"{j}.jpg").write_bytes(f"{site}/p{i:02d}/{j}.jpg".encode())
    out = tmp_path / "scenario"
    cfg = ScenarioBuildConfig(
        labelled=str(src),
        out=str(out),
        kind=kind,
        pairs=PairsScenarioConfig(n_train=5, n_holdout=5, train_photos=8, leak_photos=2, leak_fraction=0.4),
        membership=MembershipScenarioConfig(n_train=5, n_nonmember=5, novel_samples=5),
    )
    sc, _ = build_scenario(cfg)
    counts = json.loads((out / "scenario.json").read_text())["counts"]
    for role in {e.role for e in sc.entries}:
        files = [p for p in (out / role).rglob("*") if not p.is_dir()]
        assert len(files) == counts[role]["images"] == len(sc.role(role)), role
    for e in sc.entries:  # every file holds its own photo
        assert (out / e.dest).read_bytes() == e.source.encode(), e.dest
    in_folders = [e for e in sc.entries if e.dest.count("/") == 2]  # role/identity/file
    renamed = [os.path.basename(e.dest) for e in in_folders if os.path.basename(e.dest) != os.path.basename(e.source)]
    assert renamed and all(re.fullmatch(r"\d-[0-9a-f]{8}\.jpg", name) for name in renamed)
    again, _ = build_scenario(dataclasses.replace(cfg, out=str(tmp_path / "again")))
    assert [e.dest for e in again.entries] == [e.dest for e in sc.entries]  # deterministic names

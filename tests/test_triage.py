"""Triage filter plug-ins (`--triage`): images they answer a reason for are set aside, never scored."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_attacks import clustered

from raylead.errors import ConfigError

PLUGIN = """
import numpy as np

CALLS = []

def make(above=128.0):
    def judge(images):
        CALLS.append(len(images))
        return ["bright" if float(np.mean(im)) > above else None for im in images]
    return judge

def miscount(**_):
    return lambda images: [None]

def not_a_reason(**_):
    return lambda images: [1.5 for _ in images]

def keep_all(**_):
    return lambda images: [None] * len(images)

def boom(**_):
    def judge(images):
        raise ValueError("age model\\nexploded")
    return judge

def no_answer(**_):
    return lambda images: None

def factory_boom(**_):
    raise RuntimeError("cannot load age model weights")

def first_n(n_aside=1):
    return lambda images: ["child" if k < int(n_aside) else None for k in range(len(images))]

def needs(min_age, unit="years"):
    return lambda images: [None] * len(images)
"""


@pytest.fixture
def plugin(tmp_path: Path) -> str:
    path = tmp_path / "age_model.py"
    path.write_text(PLUGIN)
    return str(path)


def _photos(lfw_dir: Path, dest: Path, n: int) -> list[str]:
    """``n`` LFW photos copied under ``dest``; their ids (paths relative to ``dest``)."""
    ids = []
    for img in sorted(lfw_dir.rglob("*.jpg"))[:n]:
        rel = f"{img.parent.name}/{img.name}"
        (dest / img.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(img, dest / rel)
        ids.append(rel)
    return ids


def _brightness(path: Path) -> float:
    from raylead.faces import decode_image

    return float(np.mean(decode_image(path.read_bytes())))


def test_triage_specs_and_options_are_checked_before_work(plugin: str) -> None:
    from raylead.attacks import check_triage
    from raylead.attacks.idiap import IdiapConfig

    check_triage(f"{plugin}:make", {"above": 3})  # imports fine
    for spec, says in [
        ("nope", "unknown triage filter 'nope': give package.module:callable or path/to/file.py:callable"),
        ("/nowhere/age.py:make", "triage filter '/nowhere/age.py:make': file /nowhere/age.py does not exist"),
        (f"{plugin}:absent", f"triage filter '{plugin}:absent': 'absent' not found"),
        ("", "--triage is empty"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            check_triage(spec, {})
    with pytest.raises(ConfigError, match="--triage-option needs --triage SPEC"):
        IdiapConfig(train="t", synthetic="s", out="o", triage_options={"above": 1}).validate()


def test_triage_actor_reads_judges_and_refuses_bad_answers(tmp_path: Path, lfw_dir: Path, plugin: str) -> None:
    """Each image is decoded whole and judged; one it cannot read is set aside as unreadable;
    a filter answering the wrong number of times, or not a reason, is a ConfigError."""
    from raylead.storage import Location
    from raylead.triage import TriageActor

    ids = _photos(lfw_dir, tmp_path / "g", 3)
    (tmp_path / "g" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    light = sorted(_brightness(tmp_path / "g" / i) for i in ids)
    root = Location.parse(str(tmp_path / "g"))
    actor = TriageActor(f"{plugin}:make", {"above": light[0]}, root, 40_000_000)
    out = actor({"image_id": np.array([*ids, "broken.jpg"], dtype=object)})
    want = ["bright" if _brightness(tmp_path / "g" / i) > light[0] else None for i in ids]
    assert list(out["reason"]) == [w or "" for w in [*want, "unreadable"]] and want.count("bright") == 2
    with pytest.raises(ConfigError, match="answered 1 times for 3 images"):
        TriageActor(f"{plugin}:miscount", {}, root, 40_000_000)({"image_id": np.array(ids, dtype=object)})
    with pytest.raises(ConfigError, match="answered 1.5 for an image"):
        TriageActor(f"{plugin}:not_a_reason", {}, root, 40_000_000)({"image_id": np.array(ids, dtype=object)})


def test_idiap_with_triage_equals_idiap_without_the_set_aside_images(
    tmp_path: Path, lfw_dir: Path, plugin: str, write_collection, ray_local, monkeypatch
) -> None:
    """The images the filter answers a reason for (and one it cannot read) are set aside with
    ``triage: <reason>``; every other output equals a run on the synthetic set without them; the
    filter judges each image once, in Ray actors, even when the set is triaged again."""
    from raylead import catalog, triage
    from raylead.attacks import Triage, load_set
    from raylead.attacks.idiap import IdiapConfig, run_idiap
    from raylead.storage import Location

    t, t_lab, centres = clustered(8, 4, seed=90, noise=0.4)
    g, _, _ = clustered(8, 1, seed=91, centres=centres, noise=0.5)  # one leak-like image per identity
    train = write_collection(tmp_path / "T", [f"t{j}.jpg" for j in range(len(t))], [f"p{i}" for i in t_lab], t)
    ids = _photos(lfw_dir, tmp_path / "G", 7) + ["broken.jpg"]
    (tmp_path / "G" / "broken.jpg").write_bytes(b"not an image")
    light = sorted(_brightness(tmp_path / "G" / i) for i in ids[:7])
    above = light[-3]  # the two brightest of the seven are "bright"
    flagged = {i for i in ids[:7] if _brightness(tmp_path / "G" / i) > above} | {"broken.jpg"}
    syn = write_collection(tmp_path / "S", ids, [None] * 8, g)
    m = catalog.read_manifest(Location.parse(syn))  # as embedded from the folder G
    catalog.write_manifest(Location.parse(syn), dataclasses.replace(m, source=str(tmp_path / "G")))
    keep = [j for j, i in enumerate(ids) if i not in flagged]
    syn_kept = write_collection(tmp_path / "S2", [ids[j] for j in keep], [None] * len(keep), g[keep])

    common = {"train": train, "top_k": 5, "engine": "exact", "threshold": 0.5}
    spec = f"{plugin}:make"
    m1 = run_idiap(IdiapConfig(synthetic=syn, out=str(tmp_path / "with"), triage=spec,
                               triage_options={"above": above}, **common))
    run_idiap(IdiapConfig(synthetic=syn_kept, out=str(tmp_path / "without"), **common))
    aside = pq.read_table(tmp_path / "with" / "set_aside.parquet").to_pylist()
    assert {(r["image_id"], r["reason"]) for r in aside} == {
        *((i, "triage: bright") for i in flagged - {"broken.jpg"}), ("broken.jpg", "triage: unreadable")}
    assert m1["set_aside"]["triage"] == spec and m1["set_aside"]["by_reason"] == {"triage": 3}
    for name in ("pairs.parquet", "best_matches.parquet"):
        assert pq.read_table(tmp_path / "with" / name).equals(pq.read_table(tmp_path / "without" / name)), name
    assert not flagged & set(pq.read_table(tmp_path / "with" / "pairs.parquet").column("synthetic_id").to_pylist())

    # judged once per image: a second set_aside over the same images asks the filter nothing new
    asked: list[int] = []
    real = triage.triage_reasons

    def counting(spec, options, root, image_ids, **kw):
        asked.append(len(image_ids))
        return real(spec, options, root, image_ids, **kw)

    monkeypatch.setattr(triage, "triage_reasons", counting)
    from raylead.attacks import MatcherSpec, set_aside

    s = load_set(syn, MatcherSpec.parse("dlib"), "synthetic", None)
    filt = Triage(spec, {"above": above})
    first, _ = set_aside(s, 0.0, filt)
    second, record = set_aside(s, 0.0, filt)
    assert asked == [8, 0] and first.ids == second.ids == [ids[j] for j in keep]
    assert record.by_reason() == {"triage": 3}


def test_cli_and_job_take_triage(tmp_path: Path, plugin: str) -> None:
    """`--triage` / `--triage-option` on the attack commands, `triage` / `triage_option(s)` in job
    YAML; a spec that does not import fails before any work with one line."""
    import subprocess
    import sys

    from test_jobs import _job_module
    from typer.testing import CliRunner

    from raylead.cli import app

    res = CliRunner().invoke(app, ["attack", "idiap", "--train", str(tmp_path / "t"), "--synthetic",
                                   str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--triage", "nope"])
    assert res.exit_code != 0 and "unknown triage filter 'nope'" in str(res.exception)
    proc = subprocess.run([sys.executable, "-m", "raylead.cli", "attack", "webster", "--queries", "q", "--samples",
                           "s", "--out", str(tmp_path / "o"), "--triage-option", "above=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "raylead: error: --triage-option needs --triage SPEC (the filter they are for); drop them or add it"]
    assert not (tmp_path / "o").exists()
    attack = _job_module("attack")
    job = attack.AttackJob(**attack.from_yaml({"attack": "tinsley", "train": "t", "holdout": "h", "synthetic": "s",
                                               "out": "o", "triage": f"{plugin}:keep_all",
                                               "triage_option": ["above=200", "unit=mean"]}))
    cfg = attack.prepare(job)[0]  # keep_all takes **options: any option is one it takes
    assert cfg.triage == f"{plugin}:keep_all" and cfg.triage_options == {"above": 200, "unit": "mean"}


def test_a_filter_keeping_every_image_of_a_batch_keeps_them_through_ray(
    tmp_path: Path, lfw_dir: Path, plugin: str, ray_local
) -> None:
    """A batch whose answers are all None came back from Ray Data as NaN and every image in it was
    set aside as "nan", hiding any leak among them; keep-all and mixed batches keep what they keep."""
    from raylead.storage import Location
    from raylead.triage import triage_reasons

    ids = _photos(lfw_dir, tmp_path / "g", 7)
    root = Location.parse(str(tmp_path / "g"))
    assert triage_reasons(f"{plugin}:keep_all", {}, root, ids, batch_size=2) == [None] * 7
    assert triage_reasons(f"{plugin}:keep_all", {}, root, ids, batch_size=32) == [None] * 7
    light = sorted(_brightness(tmp_path / "g" / i) for i in ids)
    above = light[-2]  # only the brightest is "bright": most batches keep everything
    want = ["bright" if _brightness(tmp_path / "g" / i) > above else None for i in ids]
    assert want.count("bright") == 1
    assert triage_reasons(f"{plugin}:make", {"above": above}, root, ids, batch_size=2) == want


def test_filter_code_that_fails_is_one_line_naming_the_spec(tmp_path: Path, lfw_dir: Path, plugin: str) -> None:
    """What the user's factory or filter raises, or a filter answering None, is a ConfigError of
    one line naming the spec and the exception, not a Ray traceback."""
    from raylead.storage import Location
    from raylead.triage import TriageActor

    ids = _photos(lfw_dir, tmp_path / "g", 2)
    root = Location.parse(str(tmp_path / "g"))
    batch = {"image_id": np.array(ids, dtype=object)}
    spec = f"{plugin}:factory_boom"
    with pytest.raises(ConfigError) as err:  # at the first batch: a failed actor start is a Ray traceback
        TriageActor(spec, {}, root, 40_000_000)(batch)
    assert f"triage filter {spec!r} could not be set up: its factory raised RuntimeError: cannot load age model " \
        "weights" in str(err.value)
    for name, says in [("boom", "raised ValueError: age model exploded on a batch of 2 images"),
                       ("no_answer", "answered NoneType for 2 images")]:
        with pytest.raises(ConfigError) as err:
            TriageActor(f"{plugin}:{name}", {}, root, 40_000_000)(batch)
        assert f"triage filter '{plugin}:{name}' {says}" in str(err.value) and "\n" not in str(err.value)


def test_filter_code_that_fails_under_ray_is_one_line(tmp_path: Path, lfw_dir: Path, plugin: str, ray_local) -> None:
    from raylead.storage import Location
    from raylead.triage import triage_reasons

    ids = _photos(lfw_dir, tmp_path / "g", 2)
    root = Location.parse(str(tmp_path / "g"))
    with pytest.raises(ConfigError, match=r"^triage filter .*:boom' raised ValueError: age model exploded"):
        triage_reasons(f"{plugin}:boom", {}, root, ids)
    with pytest.raises(ConfigError, match=r"^triage filter .*:factory_boom' could not be set up: its factory raised"):
        triage_reasons(f"{plugin}:factory_boom", {}, root, ids)


def test_triage_options_are_checked_against_the_factory_before_work(plugin: str) -> None:
    from raylead.attacks import check_triage

    check_triage(f"{plugin}:first_n", {"n_aside": 2})
    check_triage(f"{plugin}:keep_all", {"anything": 1})  # a factory taking **options takes any
    with pytest.raises(ConfigError, match=re.escape(
            f"triage option 'n_asid' is not one the filter '{plugin}:first_n' takes (n_aside); "
            "fix or drop that --triage-option")):
        check_triage(f"{plugin}:first_n", {"n_asid": 2})
    with pytest.raises(ConfigError, match=re.escape(f"triage option 'units' is not one the filter '{plugin}:needs' "
                                                    "takes (min_age, unit)")):
        check_triage(f"{plugin}:needs", {"min_age": 18, "units": "days"})

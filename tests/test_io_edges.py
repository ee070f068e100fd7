"""Inputs and outputs at their edges: in-memory attack inputs are checked as collections are; a
refused command leaves nothing behind; an output never shares a folder with an input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raylead.attacks import EmbeddedSet, MatcherSpec, check_outputs_outside_inputs
from raylead.audit import AuditConfig, check_apart
from raylead.errors import ConfigError

RAYLEAD = [sys.executable, "-m", "raylead.cli"]


def _one_line_error(args: list[str], expect: str, code: int = 2) -> None:
    proc = subprocess.run([*RAYLEAD, *args], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and expect in lines[0], proc.stdout + proc.stderr[-2000:]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---- 1. EmbeddedSet.from_arrays ----------------------------------------------------------------
def test_from_arrays_refuses_vectors_a_collection_reader_refuses() -> None:
    """In-memory attack inputs took any vectors: a row scaled by 2 scored 2.0 ("highest score
    2.0000"), a NaN row sorted first. Refused as every collection reader refuses them, naming the
    row; the shapes of ids, identities and detector scores are checked too."""
    x = _unit(6, 8)
    ok = EmbeddedSet.from_arrays(x, identities=["a", "a", "b", "b", None, "c"])
    assert len(ok) == 6 and ok.ids[0] == "img000000" and ok.det_scores.shape == (6,)
    EmbeddedSet.from_arrays(np.zeros((2, 8), np.float32))  # all-zero rows pass, as in a collection
    EmbeddedSet.from_arrays(np.zeros((0, 8), np.float32))

    scaled = x.copy()
    scaled[2] *= 2
    with pytest.raises(ConfigError, match=r"not L2-normalised \(first: image_id 'img000002', norm 2\)") as err:
        EmbeddedSet.from_arrays(scaled)
    # the advice fits arrays (there is no collection to re-embed)
    assert str(err.value).endswith("pass finite rows divided by their L2 norm (raylead's matchers output them so)")
    nan = x.copy()
    nan[4, 1] = np.nan
    with pytest.raises(ConfigError, match=r"NaN or infinite embeddings \(first: image_id 'p/4.jpg'\)"):
        EmbeddedSet.from_arrays(nan, ids=[f"p/{i}.jpg" for i in range(6)])
    inf = x.copy()
    inf[0, 0] = np.inf
    with pytest.raises(ConfigError, match="NaN or infinite"):
        EmbeddedSet.from_arrays(inf)

    with pytest.raises(ConfigError, match=r"2-D array .* got shape \(8,\)"):
        EmbeddedSet.from_arrays(x[0])
    with pytest.raises(ConfigError, match=r"ids must be 6 strings.*got 5"):
        EmbeddedSet.from_arrays(x, ids=[f"i{k}" for k in range(5)])
    with pytest.raises(ConfigError, match="ids must be 6 strings"):
        EmbeddedSet.from_arrays(x, ids=list(range(6)))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"identities must be 6 strings or None.*got 7"):
        EmbeddedSet.from_arrays(x, identities=["a"] * 7)
    with pytest.raises(ConfigError, match=r"det_scores must hold 6 numbers.*got shape \(3,\)"):
        EmbeddedSet.from_arrays(x, det_scores=np.ones(3))


# ---- 2. a refused embed leaves no --out folder -------------------------------------------------
def test_a_refused_embed_creates_no_out_folder(tmp_path: Path) -> None:
    """`raylead embed FILE --out OUT` (or an image-less folder) created OUT before it found the
    source unusable, and left it behind empty."""
    afile = tmp_path / "afile.jpg"
    afile.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(afile)], "is not a folder of images"),
        ([str(empty)], "no images under"),
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(empty), "--batch-size", "0"], "--batch-size must be a positive whole number"),
    ]
    for k, (args, expect) in enumerate(cases):
        out = tmp_path / "nested" / f"out{k}"
        _one_line_error(["embed", *args, "--out", str(out)], expect)
        assert not (tmp_path / "nested").exists(), expect


# ---- 3. audit pending: --out / --history and the checkpoints prefix ----------------------------
def _pending(tmp_path: Path, out: Path, history: Path | None = None, glob: str = "*") -> AuditConfig:
    return AuditConfig(
        generator="folder", train_index=str(tmp_path / "idx"), out=str(out), mode="pending",
        checkpoints=str(tmp_path / "ckpts"), checkpoint_glob=glob, threshold=0.9,
        history=str(history) if history else None,
    )  # fmt: skip


def test_audit_pending_refuses_an_out_that_hides_the_checkpoints(tmp_path: Path) -> None:
    """`audit pending --checkpoints CK --out CK` (or a folder above CK, or one inside a checkpoint)
    exited 0 with "audited 0 new checkpoint(s)": the listing skips every entry that holds --out or
    --history, so every checkpoint (or that one) was skipped, silently. Refused in one line before
    any work; an --out that is an entry of the prefix itself (CK/audits) is still allowed."""
    from raylead.index import IndexBuildConfig, build_index, source_from_arrays

    build_index(source_from_arrays(_unit(80, 128)), str(tmp_path / "idx"), IndexBuildConfig(executor="local"))
    ck = tmp_path / "ckpts"
    for name in ("step-1", "step-2"):
        (ck / name).mkdir(parents=True)
        (ck / name / "a.jpg").write_bytes(b"x")
    before = _tree(ck)
    common = ["audit", "pending", "--generator", "folder", "--checkpoints", str(ck),
              "--train-index", str(tmp_path / "idx"), "--threshold", "0.92", "--samples", "2"]  # fmt: skip
    _one_line_error([*common, "--out", str(ck)], f"--out {ck} holds the checkpoints prefix {ck}")
    inside = ck / "step-1" / "audit"
    _one_line_error([*common, "--out", str(inside)], f"--out {inside} is inside the checkpoint {ck / 'step-1'}")
    assert _tree(ck) == before

    for cfg, expect in [
        (_pending(tmp_path, tmp_path), "holds the checkpoints prefix"),
        (_pending(tmp_path, ck / "step-2" / "x" / "y"), "inside the checkpoint"),
        (_pending(tmp_path, tmp_path / "o", history=ck), "--history"),
        (_pending(tmp_path, tmp_path / "o", history=ck / "step-1" / "h.parquet"), "--history .* inside the checkpoint"),
    ]:
        with pytest.raises(ConfigError, match=expect):
            check_apart(cfg)
    # the layouts the listing's skip is for, and entries that are no checkpoint, are allowed
    check_apart(_pending(tmp_path, ck / "audits"))
    check_apart(_pending(tmp_path, ck / "audits", history=ck / "audits" / "h.parquet"))
    check_apart(_pending(tmp_path, ck / "results" / "nightly", glob="step-*"))
    check_apart(_pending(tmp_path, ck / ".audit" / "nightly"))
    check_apart(_pending(tmp_path, tmp_path / "o", history=tmp_path / "h.parquet"))
    assert not (tmp_path / "o").exists()


# ---- 4. an attack's outputs inside an input collection -----------------------------------------
def test_attack_outputs_inside_an_input_collection_are_refused(tmp_path: Path, write_collection) -> None:
    """`attack idiap --train C --out C/results` wrote the attack's tables (and the embeddings of any
    image-folder input) into the input collection: only image-folder inputs were checked. Refused
    the same way now; an input under the output (a collection an earlier run embedded into
    OUT/embeddings) is still read as is."""
    spec = [MatcherSpec.parse("dlib")]
    x = _unit(4, 128)
    ids, idents = [f"p{i}/a.jpg" for i in range(4)], [f"p{i}" for i in range(4)]
    coll = write_collection(tmp_path / "c", ids, idents, x)
    holder = tmp_path / "h"  # one collection per matcher label: h/dlib
    write_collection(holder / "dlib", ids, idents, x)
    syn = write_collection(tmp_path / "s", ids, idents, x)
    other = str(tmp_path / "o")

    for inputs, out, emb, expect in [
        ({"--train": coll}, f"{coll}/res", None, f"--out {coll}/res is inside the embedding collection --train {coll}"),
        ({"--train": coll}, coll, None, f"--out {coll} is inside the embedding collection"),
        ({"--train": coll}, other, f"{coll}/e", f"--embeddings-dir {coll}/e is inside the embedding collection"),
        ({"--train": str(holder)}, f"{holder}/r", None, f"--out {holder}/r is inside the embedding collection"),
    ]:
        with pytest.raises(ConfigError, match=expect):
            check_outputs_outside_inputs({**inputs, "--synthetic": syn}, spec, out, emb)
    with pytest.raises(ConfigError, match=f"--out {coll}/cal.json is inside the embedding collection LABELLED"):
        check_outputs_outside_inputs({"LABELLED": coll}, spec, f"{coll}/cal.json", None, default_embeddings=f"{coll}/e")

    # allowed: the output beside the inputs, or holding them
    check_outputs_outside_inputs({"--train": coll, "--synthetic": syn}, spec, other, None)
    earlier = write_collection(tmp_path / "o" / "embeddings" / "train-dlib-abc", ids, idents, x)
    check_outputs_outside_inputs({"--train": earlier, "--synthetic": syn}, spec, other, None)

    before = _tree(tmp_path / "c")
    _one_line_error(
        ["attack", "idiap", "--train", coll, "--synthetic", syn, "--threshold", "0.5", "--out", f"{coll}/res"],
        f"--out {coll}/res is inside the embedding collection --train {coll}",
    )
    assert _tree(tmp_path / "c") == before


def test_set_aside_shares_the_vectors_when_nothing_is_set_aside() -> None:
    """Nothing set aside (the usual case): the kept set shares the loaded vectors instead of
    holding a second copy beside them for the whole run; rows set aside still give a set of
    exactly the kept rows."""
    from raylead.attacks import set_aside

    x = _unit(6, 8, seed=3)
    images = EmbeddedSet.from_arrays(x, det_scores=np.array([0.9, 0.8, 0.9, 0.95, 0.7, 0.9], np.float32))
    kept, aside = set_aside(images, 0.5)
    assert not aside.ids and np.shares_memory(kept.embeddings, images.embeddings)
    kept, aside = set_aside(images, 0.85)
    assert aside.ids == [images.ids[1], images.ids[4]] and not np.shares_memory(kept.embeddings, images.embeddings)
    np.testing.assert_array_equal(kept.embeddings, x[[0, 2, 3, 5]])
    assert kept.ids == [images.ids[i] for i in (0, 2, 3, 5)]


def test_attack_outputs_inside_the_train_index_are_refused(tmp_path: Path, write_collection) -> None:
    """`--train-index I --out I/res` wrote the attack's files into the persisted index it reads:
    refused before any work, like an output inside an input collection."""
    from raylead.index import IndexBuildConfig, build_index, source_from_collection

    spec = [MatcherSpec.parse("dlib")]
    x = _unit(80, 128)  # an index needs at least 64 vectors
    ids, idents = [f"p{i}/a.jpg" for i in range(80)], [f"p{i}" for i in range(80)]
    coll = write_collection(tmp_path / "c", ids, idents, x)
    index = str(tmp_path / "idx")
    build_index(source_from_collection(coll), index, IndexBuildConfig(shards=1, executor="local"))
    for out, emb, expect in [
        (f"{index}/res", None, f"--out {index}/res is inside the index --train-index {index}"),
        (str(tmp_path / "o"), f"{index}/e", f"--embeddings-dir {index}/e is inside the index --train-index"),
    ]:
        with pytest.raises(ConfigError, match=expect):
            check_outputs_outside_inputs({"--train": coll}, spec, out, emb, indexes={"--train-index": index})
    check_outputs_outside_inputs({"--train": coll}, spec, str(tmp_path / "o"), None, indexes={"--train-index": index})
    before = _tree(tmp_path)
    args = ["attack", "idiap", "--train", coll, "--synthetic", coll, "--train-index", index]
    _one_line_error(
        [*args, "--threshold", "0.5", "--out", f"{index}/res"], f"--out {index}/res is inside the index --train-index"
    )
    assert _tree(tmp_path) == before
    tinsley = ["attack", "tinsley", "--train", coll, "--holdout", coll, "--synthetic", coll]
    _one_line_error(
        [*tinsley, "--train-index", f"dlib={index}", "--threshold", "dlib=0.5", "--out", f"{index}/res"],
        f"--out {index}/res is inside the index --train-index dlib {index}",
    )
    assert _tree(tmp_path) == before

"""Generator checkpoint audits (issue 6): plug-ins, history, verdict, `raylead audit` on a 3-node cluster."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raylead import generators
from raylead.audit import (
    HISTORY_SCHEMA,
    AuditConfig,
    append_history,
    checkpoint_name,
    leak_figures,
    list_checkpoints,
    natural_key,
    previous_row,
    read_history,
    step_of,
)
from raylead.config import from_mapping
from raylead.errors import ConfigError
from raylead.storage import Location

REPO = Path(__file__).resolve().parents[1]
LEAKY = REPO / "tests" / "leaky_generator.py"
LEAKS = {"ckpt-2": 0.10, "ckpt-5": 0.15, "ckpt-10": 0.60}  # leak fraction by construction
SAMPLES = 40
THETA = 0.93  # dlib: about the LFW-calibrated θ at FMR 1e-3 (README: 0.928)


def _cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raylead.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


# ---------------------------------------------------------------------------------------------
# pure parts
# ---------------------------------------------------------------------------------------------
def test_natural_order_and_steps() -> None:
    names = ["ckpt-10", "ckpt-2", "ckpt-1", "ckpt-10a", "final", "ckpt-100"]
    assert sorted(names, key=natural_key) == ["ckpt-1", "ckpt-2", "ckpt-10", "ckpt-10a", "ckpt-100", "final"]
    assert step_of("s3://b/run/step-0100000/") == 100000 and step_of("/x/ckpt-10.pt") == 10
    assert step_of("final") is None


@pytest.mark.parametrize(
    ("uri", "name", "step"),
    [
        ("s3://b/run/step-0100000/", "step-0100000", 100000),
        ("/x/ckpt-10.pt", "ckpt-10.pt", 10),
        ("/runs/a/checkpoint-1000/model.safetensors", "checkpoint-1000/model.safetensors", 1000),
        ("s3://b/run/step-2/samples", "step-2/samples", 2),
        ("/out/iter-30/ema/weights", "iter-30/ema/weights", 30),
        ("/out/final", "final", None),
        ("s3://bucket/gen/model.pt", "model.pt", None),
    ],
)
def test_checkpoint_names_tell_siblings_apart(uri: str, name: str, step: int | None) -> None:
    """A checkpoint named by a file or folder every checkpoint has (``samples``, ``model.safetensors``)
    is named from the nearest part above it that carries a number: ordered, and stepped, by it."""
    assert checkpoint_name(uri) == name and step_of(checkpoint_name(uri)) == step
    shared = [f"/r/step-{i}/samples" for i in (10, 2, 1)]
    assert sorted(map(checkpoint_name, shared), key=natural_key) == [f"step-{i}/samples" for i in (1, 2, 10)]


def test_leak_figures() -> None:
    best = np.array([0.99, 0.5, 0.95, 0.94, 0.2], np.float32)
    ident = ["A", "B", "A", None, "C"]
    fig = leak_figures(best, ident, 0.94, top_k=3)
    assert (fig.scored, fig.leaked) == (5, 3) and math.isclose(fig.leak_fraction, 0.6)
    assert fig.top_scores == pytest.approx([0.99, 0.95, 0.94])
    assert fig.hits_by_identity == {"A": 2}  # unlabelled hits count in the fraction, not per identity
    assert math.isnan(leak_figures(np.zeros(0, np.float32), [], 0.9, 3).leak_fraction)


def test_generator_registry_errors_are_config_errors(tmp_path: Path) -> None:
    assert generators.resolve("folder") is generators.folder
    for bad in ("nope", "", "no.such.module:make", "bad spec:make", "raylead.audit:no_such_callable"):
        with pytest.raises(ConfigError):
            generators.resolve(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        generators.resolve(f"{tmp_path}/missing.py:make")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="boom"):
        generators.resolve(f"{broken}:make")
    assert generators.resolve(f"{LEAKY}:make").__name__ == "make"


def test_folder_generator_samples_sorted_indices(tmp_path: Path, lfw_dir: Path) -> None:
    people = sorted(p for p in lfw_dir.iterdir() if p.is_dir())[:2]
    for person in people:
        (tmp_path / "syn" / person.name).mkdir(parents=True)
        for img in sorted(person.glob("*.jpg"))[:2]:
            os.symlink(img, tmp_path / "syn" / person.name / img.name)
    gen = generators.load("folder", str(tmp_path / "syn"))
    assert generators.available(generators.folder, str(tmp_path / "syn"), {}) == 4
    imgs = generators.as_images(gen.sample(np.array([3, 0])), 2, "folder")
    from PIL import Image

    files = sorted(str(p) for p in (tmp_path / "syn").rglob("*.jpg"))
    assert np.array_equal(imgs[0], np.asarray(Image.open(files[3]).convert("RGB")))
    assert np.array_equal(imgs[1], np.asarray(Image.open(files[0]).convert("RGB")))
    with pytest.raises(ConfigError):
        gen.sample(np.array([4]))
    with pytest.raises(ConfigError):
        generators.load("folder", str(tmp_path / "nothing-here"))


@pytest.mark.parametrize(
    ("generator", "options", "limit"),
    [("folder", {"max_pixels": 60_000_000}, 60_000_000), ("folder", {}, 40_000_000),
     (f"{REPO}/examples/torch_generator.py:load", {"max_pixels": 5}, 40_000_000)],
)  # fmt: skip
def test_the_folder_generators_pixel_limit_is_the_audits(generator: str, options: dict, limit: int) -> None:
    """The folder generator hands its files on as they are, so its max_pixels option must be the
    limit embedding and triage decode with (it was ignored: a 43.6 MP image allowed by the
    option was set aside as too_many_pixels)."""
    from raylead.attacks import Triage
    from raylead.audit import sample_max_pixels

    cfg = AuditConfig(generator=generator, train_index="i", out="o", generator_options=options, triage="t.py:f")
    assert sample_max_pixels(cfg) == limit
    assert Triage.of(cfg, max_pixels=sample_max_pixels(cfg)).max_pixels == limit


PLUGIN = """
class G:
    name, version = "plug", "1"

    def __init__(self, s3):
        self.s3 = s3

    def sample(self, seeds):
        import numpy as np
        return np.zeros((len(seeds), 8, 8, 3), np.uint8)

def plain(checkpoint_uri, size=8):  # declares no s3: called exactly as before
    return G(None)

def with_s3(checkpoint_uri, s3=None):
    return G(s3)
"""


def test_generators_open_s3_checkpoints_with_the_s3_flags(
    s3_server, lfw_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """The audit's --s3-* settings reach the generator (the environment holding no credentials):
    the folder generator counts and samples an S3 checkpoint with them, in the sampler actor too;
    a plug-in factory declaring ``s3`` gets them, one that does not is called as before; ``s3``
    is not a generator option a user may give."""
    from PIL import Image
    from s3server import ACCESS_KEY, SECRET_KEY

    from raylead.audit import SamplerActor, sample_file
    from raylead.errors import RayleadError
    from raylead.storage import S3Options

    photos = sorted(lfw_dir.rglob("*.jpg"))[:3]
    uri = "s3://raylead/generator-flags/step-1"
    for k, photo in enumerate(photos):
        Location.parse(f"{uri}/{k}.jpg").write_bytes(photo.read_bytes())
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    flags = S3Options.from_env(access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    folder = generators.resolve("folder")
    with pytest.raises(RayleadError, match="no S3 credentials were found"):  # without the flags
        generators.available(folder, uri, {})
    assert generators.available(folder, uri, {}, flags) == 3
    actor = SamplerActor("folder", uri, {}, Location.parse(str(tmp_path / "samples")), flags)
    actor({"seed": np.array([2, 0])})
    for seed in (2, 0):
        got = np.asarray(Image.open(tmp_path / "samples" / sample_file(seed)))
        assert np.array_equal(got, np.asarray(Image.open(photos[seed]).convert("RGB")))

    plugin = tmp_path / "plug.py"
    plugin.write_text(PLUGIN)
    assert generators.load(f"{plugin}:with_s3", uri, {}, flags).s3 is flags
    assert generators.load(f"{plugin}:plain", uri, {"size": 4}, flags).s3 is None
    with pytest.raises(ConfigError, match="generator option 's3' is reserved"):
        generators.load(f"{plugin}:with_s3", uri, {"s3": {"key": "k"}}, flags)
    with pytest.raises(ConfigError, match="generator option 's3' is reserved"):
        from_mapping(AuditConfig, {"generator": "folder", "train_index": "i", "out": "o", "checkpoint": "c",
                                   "threshold": 0.5, "generator_options": {"s3": {}}})


def test_torch_example_is_deterministic_and_refuses_pickles(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import torch_generator as tg
    finally:
        sys.path.remove(str(REPO / "examples"))
    net = tg.TinyGenerator(latent_dim=16, size=32)
    ckpt = tmp_path / "step-10.pt"
    torch.save(net.state_dict(), ckpt)
    gen = generators.load(f"{REPO}/examples/torch_generator.py:load", str(ckpt), {"latent_dim": 16, "size": 32})
    a = gen.sample(np.array([1, 2, 3]))
    b = gen.sample(np.array([3, 2, 1]))
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a[0], b[2]) and not np.array_equal(a[0], a[1])
    evil = tmp_path / "evil.pt"
    torch.save({"weights": tg.TinyGenerator}, evil)  # a pickled class, not tensors
    with pytest.raises(ConfigError, match="weights_only"):
        generators.load(f"{REPO}/examples/torch_generator.py:load", str(evil), {"latent_dim": 16, "size": 32})
    # a checkpoint of another shape: the error says what does not fit (it ended at torch's bare
    # "Error(s) in loading state_dict for TinyGenerator:")
    with pytest.raises(ConfigError, match="does not fit TinyGenerator.*: (size mismatch|Missing key|Unexpected key)"):
        generators.load(f"{REPO}/examples/torch_generator.py:load", str(ckpt), {"latent_dim": 8, "size": 32})


def test_history_append_and_previous(tmp_path: Path) -> None:
    loc = Location.parse(str(tmp_path / "h" / "history.parquet"))
    assert read_history(loc) == []

    def row(name: str, frac: float) -> dict:
        return {
            "checkpoint": f"/c/{name}",
            "checkpoint_name": name,
            "step": step_of(name),
            "audited_at": 0.0,
            "generator": "g",
            "generator_version": "1",
            "matcher": "dlib",
            "matcher_version": "v",
            "train_index": "/i",
            "threshold": 0.9,
            "threshold_source": "--threshold",
            "samples": 10,
            "scored": 10,
            "set_aside": 0,
            "leaked": int(frac * 10),
            "leak_fraction": frac,
            "best_max": 0.99,
            "best_mean": 0.5,
            "top_scores": [0.99],
            "identities_hit": 1,
            "hits_by_identity": "{}",
            "previous": None,
            "delta": None,
            "verdict": "first",
            "results": "/r",
        }

    append_history(loc, row("ckpt-10", 0.3))
    rows = append_history(loc, row("ckpt-2", 0.1))
    assert [r["checkpoint_name"] for r in read_history(loc)] == ["ckpt-10", "ckpt-2"]
    assert oct(os.stat(loc.path).st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="already"):
        append_history(loc, row("ckpt-2", 0.5))
    assert previous_row(rows, "ckpt-5")["checkpoint_name"] == "ckpt-2"
    assert previous_row(rows, "ckpt-11")["checkpoint_name"] == "ckpt-10"
    assert previous_row(rows, "ckpt-1") is None
    # only rows measured the same way are compared: another θ, matcher or training index is not
    other_theta = row("ckpt-4", 0.05) | {"threshold": 0.8}
    rows = append_history(loc, other_theta)
    assert previous_row(rows, "ckpt-5")["checkpoint_name"] == "ckpt-4"
    assert previous_row(rows, "ckpt-5", like=row("ckpt-5", 0.0))["checkpoint_name"] == "ckpt-2"
    assert previous_row(rows, "ckpt-5", like=other_theta)["checkpoint_name"] == "ckpt-4"
    changes = ({"threshold": 0.91}, {"matcher_version": "v2"}, {"train_index": "/j"}, {"generator": "h"},
               {"triage": "age.py:make"})  # samples set aside by a triage filter: another measure
    for change in changes:
        assert previous_row(rows, "ckpt-11", like=row("ckpt-11", 0.0) | change) is None
    same = row("ckpt-11", 0.0) | {"threshold": 0.9 + 1e-12}
    assert previous_row(rows, "ckpt-11", like=same)["checkpoint_name"] == "ckpt-10"
    # a history written before the triage column existed reads with triage null, and grows it
    import pyarrow as pa

    from raylead.audit import HISTORY_SCHEMA
    from raylead.catalog import table_to_parquet_bytes

    old_schema = pa.schema([f for f in HISTORY_SCHEMA if f.name != "triage"])
    old = Location.parse(str(tmp_path / "old" / "history.parquet"))
    old.write_bytes(table_to_parquet_bytes(pa.Table.from_pylist([row("ckpt-1", 0.2)], schema=old_schema)))
    assert [r["triage"] for r in read_history(old)] == [None]
    grown = append_history(old, row("ckpt-2", 0.1) | {"triage": "age.py:make"})
    assert [r["triage"] for r in read_history(old)] == [None, "age.py:make"] == [r.get("triage") for r in grown]
    # how faces were found and cropped, the detector-score floor and the generator's options are
    # part of the measurement too; a row written before they were recorded (null) is not held to them
    measured = {"alignment": "detect:dlib:dlib150", "det_score_floor": 0.0, "generator_options": "{}",
                "triage_options": "{}"}
    rows = [row("ckpt-1", 0.2), row("ckpt-2", 0.2) | measured]
    like = row("ckpt-3", 0.0) | measured
    assert previous_row(rows, "ckpt-3", like=like)["checkpoint_name"] == "ckpt-2"
    assert previous_row(rows[:1], "ckpt-3", like=like)["checkpoint_name"] == "ckpt-1"
    for change in ({"alignment": "aligned:dlib150"}, {"det_score_floor": 0.5}, {"generator_options": '{"psi": 0.7}'},
                   {"triage_options": '{"n_aside": 1}'}):  # a triage option changes what is set aside
        assert previous_row(rows[1:], "ckpt-3", like=like | change) is None, change
    # one plug-in file spelled two ways is one generator (the second spelling started a new series,
    # so a rise between them went unreported); another file is not
    rows = [row("ckpt-1", 0.2) | {"generator": "./plug/gen.py:make", "triage": "tools/../age.py:f"}]
    assert previous_row(rows, "ckpt-2", like=row("ckpt-2", 0.0) | {"generator": "plug/gen.py:make",
                                                                  "triage": "age.py:f"})["checkpoint_name"] == "ckpt-1"
    assert previous_row(rows, "ckpt-2", like=row("ckpt-2", 0.0) | {"generator": "plug/gen2.py:make"}) is None


def test_history_keeps_columns_it_does_not_know(tmp_path: Path) -> None:
    """A history a newer raylead wrote (an extra column) keeps that column through an append."""
    import pyarrow as pa

    from raylead.catalog import parquet_from_bytes, table_to_parquet_bytes

    loc = Location.parse(str(tmp_path / "history.parquet"))
    schema = pa.schema(list(HISTORY_SCHEMA) + [pa.field("future", pa.string())])
    first = {n: None for n in HISTORY_SCHEMA.names} | {
        "checkpoint": "/c/1", "checkpoint_name": "1", "threshold": 0.9, "future": "x"
    }
    loc.write_bytes(table_to_parquet_bytes(pa.Table.from_pylist([first], schema=schema)))
    rows = append_history(loc, first | {"checkpoint": "/c/2", "checkpoint_name": "2", "future": None})
    assert [r["checkpoint"] for r in rows] == ["/c/1", "/c/2"] and "future" not in rows[0]
    table = parquet_from_bytes(loc.read_bytes())
    assert table.column("future").to_pylist() == ["x", None]


def test_history_values_of_the_wrong_type_or_null_are_one_line_errors(tmp_path: Path) -> None:
    """A history edited by hand: a null threshold made `audit history` (and `audit run`, after all
    its sampling) raise TypeError; a leak fraction stored as text did too."""
    import pyarrow as pa

    from raylead.catalog import table_to_parquet_bytes
    from raylead.errors import CorruptDataError

    base = {n: None for n in HISTORY_SCHEMA.names} | {"threshold": 0.9, "leak_fraction": 0.5, "verdict": "first"}
    rows = [base | {"checkpoint": f"/c/{i}", "checkpoint_name": f"ckpt-{i}"} for i in (1, 2)]
    loc = Location.parse(str(tmp_path / "history.parquet"))

    def write(column: str, values: pa.Array) -> None:
        table = pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA)
        table = table.set_column(table.schema.get_field_index(column), column, values)
        loc.write_bytes(table_to_parquet_bytes(table))

    write("threshold", pa.array([None, 0.9], pa.float64()))
    with pytest.raises(CorruptDataError, match=r"history\.parquet: column 'threshold' is empty \(null\) in 1 row"):
        read_history(loc)
    with pytest.raises(CorruptDataError, match="'threshold' is empty"):
        append_history(loc, rows[0] | {"checkpoint": "/c/3", "checkpoint_name": "ckpt-3"})
    write("leak_fraction", pa.array(["0.25", "0.5"]))  # numbers as text: read as the numbers they are
    assert [r["leak_fraction"] for r in read_history(loc)] == [0.25, 0.5]
    write("leak_fraction", pa.array(["a quarter", "0.5"]))
    with pytest.raises(CorruptDataError, match="column 'leak_fraction' holds string values, not double; .*backup"):
        read_history(loc)
    # leak_fraction may be null (NaN read back through pandas): shown as n/a, as before
    write("leak_fraction", pa.array([None, 0.5], pa.float64()))
    assert [r["leak_fraction"] for r in read_history(loc)] == [None, 0.5]


def test_history_plot_draws_dollar_names_literally(tmp_path: Path) -> None:
    """Checkpoint names are text: '$x_$' in one made matplotlib's mathtext raise (no PNG)."""
    from raylead.audit import plot_history

    base = {n: None for n in HISTORY_SCHEMA.names} | {"threshold": 0.9, "verdict": "ok"}
    rows = [base | {"checkpoint_name": n, "leak_fraction": f} for n, f in (("a$x_$", 0.1), ("b$y_$", 0.2))]
    png = Location.parse(str(tmp_path / "trend.png"))
    plot_history(rows, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _append_one(path: str, i: int) -> None:
    row = {n: None for n in HISTORY_SCHEMA.names} | {"threshold": 0.9}
    append_history(Location.parse(path), row | {"checkpoint": f"/c/{i}", "checkpoint_name": f"ckpt-{i}"})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_appends_to_a_history_lose_no_row(tmp_path: Path, where: str, request) -> None:
    """An `audit run` from a training loop beside the nightly `audit pending`: each append reads,
    adds and rewrites the history, and all but one of these 6 rows were lost. Locally the appends
    take a lock file; on S3 each is a PUT conditional on the version it read (If-Match its ETag),
    the loser reading again (the spawned writers inherit the S3 server's AWS_* from its fixture)."""
    import multiprocessing

    if where == "s3":
        request.getfixturevalue("s3_server")
    path = str(tmp_path / "history.parquet") if where == "local" else "s3://raylead/audit-race/history.parquet"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_one, args=(path, i)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 6
    assert sorted(r["checkpoint"] for r in read_history(Location.parse(path))) == [f"/c/{i}" for i in range(6)]


def test_an_s3_append_that_loses_the_race_reads_again(s3_server) -> None:
    """Deterministic half of the race: a writer that read version A does not overwrite version B."""
    loc = Location.parse("s3://raylead/audit-race/one.parquet")
    assert loc.etag() is None
    assert loc.write_bytes_if(b"A", None)
    assert not loc.write_bytes_if(b"B", None)  # someone created it first
    tag_a = loc.etag()
    assert loc.write_bytes_if(b"B", tag_a)
    assert not loc.write_bytes_if(b"C", tag_a)  # B landed since A was read
    assert loc.read_bytes() == b"B"
    # above s3fs's multipart cut (100 MiB) the condition was dropped: a stale write landed
    big = Location.parse("s3://raylead/audit-race/big.bin")
    assert big.write_bytes_if(b"a" * (101 << 20), None)
    tag = big.etag()
    assert big.write_bytes_if(b"b" * (101 << 20), tag)
    assert not big.write_bytes_if(b"c" * (101 << 20), tag)
    assert big.read_bytes()[:1] == b"b"


def test_config_validation() -> None:
    base = {"generator": "folder", "train_index": "/i", "out": "/o", "checkpoint": "/c", "threshold": 0.9}
    assert from_mapping(AuditConfig, base).mode == "run"
    for bad, match in (
        ({"mode": "later"}, "mode"),
        ({"threshold": None}, "threshold"),
        ({"threshold_from": "c.json"}, "not both"),
        ({"samples": 0}, "samples"),
        ({"tolerance": 5}, "tolerance"),
        ({"generator": "nope"}, "unknown generator"),
        ({"mode": "pending"}, "checkpoints"),
        ({"sampels": 3}, "sampels"),
        # a mistyped generator option: before any work (it failed in the sampler actors, after Ray)
        ({"generator_options": {"max_pixel": 10}}, r"option 'max_pixel' is not one the generator takes \(max_pixels\)"),
    ):
        with pytest.raises(ConfigError, match=match):
            from_mapping(AuditConfig, base | bad)
    assert from_mapping(AuditConfig, base | {"generator_options": {"max_pixels": 10}}).generator_options
    # a factory taking **options takes any option (it says itself what it refuses)
    assert from_mapping(AuditConfig, base | {"generator": f"{LEAKY}:make", "generator_options": {"x": 1}})


def test_list_checkpoints_natural_order(tmp_path: Path) -> None:
    for name in ("ckpt-10.pt", "ckpt-2.pt", "ckpt-1.pt", ".hidden", "notes.txt"):
        (tmp_path / "c" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "c" / name).write_text("x")
    (tmp_path / "c" / "audit").mkdir()
    found = list_checkpoints(
        Location.parse(str(tmp_path / "c")), "ckpt-*", (Location.parse(str(tmp_path / "c/audit")),)
    )
    assert [c.name for c in found] == ["ckpt-1.pt", "ckpt-2.pt", "ckpt-10.pt"]
    everything = list_checkpoints(
        Location.parse(str(tmp_path / "c")), "*", (Location.parse(str(tmp_path / "c/audit")),)
    )
    assert "audit" not in [c.name for c in everything] and ".hidden" not in [c.name for c in everything]
    # a history kept under the prefix (--history there): neither it nor its append lock is a checkpoint
    history = Location.parse(str(tmp_path / "c" / "history.parquet"))
    append_history(history, {n: None for n in HISTORY_SCHEMA.names} | {"checkpoint": "/c/x", "checkpoint_name": "x"})
    names = [c.name for c in list_checkpoints(Location.parse(str(tmp_path / "c")), "*", (history,))]
    assert names == ["audit", "ckpt-1.pt", "ckpt-2.pt", "ckpt-10.pt", "notes.txt"], names


def test_cli_rejects_bad_generators_before_work(tmp_path: Path) -> None:
    common = ["--train-index", str(tmp_path / "idx"), "--out", str(tmp_path / "out"), "--threshold", "0.9"]
    for spec in ("stylegan9", "not a module:make", "no_such_module_xyz:make"):
        done = _cli("audit", "run", "--generator", spec, "--checkpoint", str(tmp_path), *common, timeout=120)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "generator" in done.stderr, done.stderr
        assert not (tmp_path / "out").exists()  # nothing was started


# ---------------------------------------------------------------------------------------------
# end to end on a 3-node cluster
# ---------------------------------------------------------------------------------------------
def _link_people(root: Path, people: list[Path], per_person: int) -> list[str]:
    files = []
    for person in people:
        (root / person.name).mkdir(parents=True, exist_ok=True)
        for img in sorted(person.glob("*.jpg"))[:per_person]:
            os.symlink(img, root / person.name / img.name)
            files.append(str(img))
    return files


@pytest.fixture
def audit_setup(tmp_path: Path, lfw_dir: Path, ray_cluster: object) -> dict[str, object]:
    """A training index of 20 LFW people × 4 photos (embedded on the cluster) and three leaky
    checkpoints whose other faces are 30 LFW people outside the training set."""
    from raylead.embed import EmbedConfig, embed_collection
    from raylead.index import IndexBuildConfig, build_index, source_from_collection

    people = sorted(p for p in lfw_dir.iterdir() if p.is_dir())
    train_files = _link_people(tmp_path / "train", people[:20], 4)
    other_files = [str(sorted(p.glob("*.jpg"))[0]) for p in people[20:50]]
    embed_collection(EmbedConfig(source=str(tmp_path / "train"), out=str(tmp_path / "emb"), actors=2))
    build_index(
        source_from_collection(str(tmp_path / "emb")), str(tmp_path / "idx"), IndexBuildConfig(executor="local")
    )
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for name, leak in LEAKS.items():
        spec = {"leak": leak, "period": 20, "train": train_files, "other": other_files}
        (ckpts / f"{name}.json").write_text(json.dumps(spec))
    return {"index": str(tmp_path / "idx"), "ckpts": str(ckpts), "out": str(tmp_path / "audit")}


@pytest.mark.slow
def test_audit_pending_tracks_rising_leakage(tmp_path: Path, audit_setup: dict, ray_cluster: object) -> None:
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}  # type: ignore[attr-defined]
    args = [
        "audit", "pending",
        "--generator", f"{LEAKY}:make",
        "--checkpoints", audit_setup["ckpts"],
        "--train-index", audit_setup["index"],
        "--out", audit_setup["out"],
        "--samples", str(SAMPLES),
        "--threshold", str(THETA),
        "--tolerance", "0.1",
        "--sample-actors", "2",
        "--sample-batch-size", "8",
        "--actors", "2",
    ]  # fmt: skip
    # a checkpoint that cannot be audited (not a checkpoint of this generator) between the others:
    # the rest are audited, and the rise after it still ends the run with exit 10
    broken = Path(audit_setup["ckpts"]) / "ckpt-7.json"
    broken.write_text("{not json")
    done = _cli(*args, env=env)
    assert done.returncode == 10, done.stdout + done.stderr[-3000:]
    verdicts = [line for line in done.stderr.splitlines() if "leakage rose" in line]
    assert len(verdicts) == 1 and "ckpt-10" in verdicts[0] and "ckpt-5" in verdicts[0], done.stderr[-3000:]
    assert "not audited (1): ckpt-7.json" in verdicts[0], verdicts[0]
    trend = [line for line in done.stdout.splitlines() if line.startswith("ckpt-")]
    assert [t.split(".json")[0] for t in trend] == ["ckpt-2", "ckpt-5", "ckpt-7", "ckpt-10"], done.stdout
    assert "NOT AUDITED" in trend[2] and "LEAKAGE ROSE" in trend[3], done.stdout
    broken.unlink()

    history = Location.parse(audit_setup["out"]).child("history.parquet")
    rows = read_history(history)
    assert [r["checkpoint_name"] for r in rows] == ["ckpt-2.json", "ckpt-5.json", "ckpt-10.json"]
    fractions = [r["leak_fraction"] for r in rows]
    assert fractions[0] < fractions[1] < fractions[2], fractions
    for r, leak in zip(rows, LEAKS.values(), strict=True):
        assert r["samples"] == SAMPLES and r["scored"] >= SAMPLES - 3, r
        assert abs(r["leak_fraction"] - leak) <= 0.08, (r["checkpoint_name"], r["leak_fraction"], leak)
        assert r["generator_version"] and r["step"] == int(r["checkpoint_name"].split("-")[1].split(".")[0])
    assert [r["verdict"] for r in rows] == ["first", "ok", "rose"]
    assert json.loads(rows[2]["hits_by_identity"]) and rows[2]["identities_hit"] >= 5
    # evidence on disk: owner-only PNG samples and per-checkpoint results
    folder = Path(rows[2]["results"])
    pngs = sorted((folder / "samples").glob("sample-*.png"))
    assert len(pngs) == SAMPLES and oct(pngs[0].stat().st_mode & 0o777) == "0o600"
    assert (folder / "best_matches.parquet").exists() and (folder / "metrics.json").exists()

    # a rerun audits nothing new and passes
    again = _cli(*args, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "audited 0 new checkpoint(s) of 3" in again.stdout
    assert len(read_history(history)) == 3

    # `audit run` of an audited checkpoint does nothing; `audit history` prints the trend + plot
    one = [a for a in args if a != "pending"]
    i = one.index("--checkpoints")
    one[i : i + 2] = ["--checkpoint", str(Path(audit_setup["ckpts"]) / "ckpt-5.json")]
    done = _cli("audit", "run", *one[1:], env=env)
    assert done.returncode == 0 and "already in the audit history" in done.stdout, done.stderr[-2000:]
    png = tmp_path / "trend.png"
    shown = _cli("audit", "history", "--history", history.uri, "--png", str(png), env=env)
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stdout.splitlines() if line.startswith("ckpt-")]
    assert [line.split(".json")[0] for line in lines] == ["ckpt-2", "ckpt-5", "ckpt-10"]
    assert "LEAKAGE ROSE" in lines[2] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --triage: a filter (here one that sets every sample aside) judges the samples before any
    # scoring; its spec is recorded in the history row (rows of other filters are not compared)
    plugin = tmp_path / "everyone_a_child.py"
    plugin.write_text("def make(**_):\n    return lambda images: ['child'] * len(images)\n")
    i = one.index("--out")
    one[i + 1] = str(tmp_path / "triaged")
    done = _cli("audit", "run", *one[1:], "--triage", f"{plugin}:make", env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = read_history(Location.parse(str(tmp_path / "triaged" / "history.parquet")))
    r = rows[-1]
    assert len(rows) == 1 and r["triage"] == f"{plugin}:make" and r["verdict"] == "first", r
    assert r["scored"] == 0 and r["set_aside"] == SAMPLES
    metrics = json.loads((Path(r["results"]) / "metrics.json").read_text())
    assert metrics["set_aside"]["triage"] == f"{plugin}:make"
    assert metrics["set_aside"]["by_reason"]["triage"] >= SAMPLES - 3


def test_audit_job_config_errors_are_one_line(tmp_path: Path) -> None:
    """jobs/audit.py validates its YAML with AuditConfig: bad keys or generators exit 2, one line."""
    import yaml

    base = {"mode": "pending", "generator": "folder", "checkpoints": str(tmp_path), "train_index": "/i",
            "out": str(tmp_path / "out"), "threshold": 0.9}  # fmt: skip
    for bad, needle in (({"generator": "stylegan9"}, "stylegan9"), ({"tolerence": 0.1}, "tolerence")):
        path = tmp_path / "audit.yaml"
        path.write_text(yaml.safe_dump(base | bad))
        done = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "audit.py"), "--config", str(path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().count("\n") == 0 and needle in done.stderr, done.stderr
        assert not (tmp_path / "out").exists()


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_audit_run_refuses_an_out_or_history_sharing_the_checkpoint(tmp_path: Path, lfw_dir: Path) -> None:
    """`audit run --generator folder --checkpoint CK --out CK` exited 0 after writing its samples into
    the checkpoint (the folder generator lists files recursively: the next audit saw more images and
    another generator_version). Now one line, before any work, and nothing is written; the same for
    a --history inside it, or a checkpoint inside --out."""
    from raylead.index import IndexBuildConfig, build_index, source_from_arrays

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(80, 128)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    build_index(source_from_arrays(vectors), str(tmp_path / "idx"), IndexBuildConfig(executor="local"))
    ck = tmp_path / "ckpts" / "step-1"
    ck.mkdir(parents=True)
    for photo in sorted(lfw_dir.rglob("*.jpg"))[:2]:
        (ck / photo.name).write_bytes(photo.read_bytes())
    before = _tree(tmp_path / "ckpts")
    common = ["audit", "run", "--generator", "folder", "--checkpoint", str(ck), "--train-index",
              str(tmp_path / "idx"), "--threshold", "0.92", "--samples", "2"]  # fmt: skip
    cases = [
        (["--out", str(ck)], f"--out {ck} and the checkpoint {ck} share a folder"),
        (["--out", str(ck / "audit")], f"--out {ck / 'audit'} and the checkpoint {ck} share a folder"),
        (["--out", str(tmp_path / "ckpts")], "and the checkpoint"),
        (["--out", str(tmp_path / "o"), "--history", str(ck / "h.parquet")], f"--history {ck / 'h.parquet'}"),
    ]
    for extra, expect in cases:
        done = _cli(*common, *extra, timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and expect in lines[0], done.stderr[-3000:]
        assert _tree(tmp_path / "ckpts") == before and not (tmp_path / "o").exists()

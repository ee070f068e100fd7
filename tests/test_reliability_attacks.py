"""Faults during an attack: the driver killed (SIGINT/SIGKILL) while it embeds its inputs, and
results written so that a folder without ``metrics.json`` is never read as finished.

The costly part of an attack is embedding its image folders; that is resumable (finished
embedding shards are kept), so a rerun of the same command ends with the same results as a
fault-free run: identical ``metrics.json`` (but its creation time) and identical tables.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from faults import signal_when

from raylead.attacks import METRICS_FILE, ResultWriter
from raylead.storage import Location

RAYLEAD = [sys.executable, "-m", "raylead.cli"]
TABLES = ("pairs.parquet", "best_matches.parquet", "set_aside.parquet")


@pytest.fixture(scope="module")
def attack_inputs(lfw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """T: 6 people × 6 photos; S: another photo of 4 of them + 2 photos each of 2 people not in T."""
    root = tmp_path_factory.mktemp("attack_inputs")
    people = sorted(p for p in lfw_dir.iterdir() if p.is_dir())
    picks = [("train", p, sorted(p.glob("*.jpg"))[:6]) for p in people[:6]]
    picks += [("synthetic", p, sorted(p.glob("*.jpg"))[6:7]) for p in people[:4]]
    picks += [("synthetic", p, sorted(p.glob("*.jpg"))[:2]) for p in people[6:8]]
    for role, person, files in picks:
        (root / role / person.name).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, root / role / person.name / f.name)
    return root / "train", root / "synthetic"


def _args(train: Path, synthetic: Path, out: Path) -> list[str]:
    return [*RAYLEAD, "attack", "idiap", "--train", str(train), "--synthetic", str(synthetic),
            "--out", str(out), "--top-k", "20", "--threshold", "0.6"]  # fmt: skip


def _metrics(out: Path) -> dict:
    m = json.loads((out / METRICS_FILE).read_text())
    m.pop("created")
    return m


_REFERENCE: dict[str, Path] = {}


def _reference(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, env: dict) -> Path:
    """The fault-free run (once per session), on the same Ray as the runs it is compared with."""
    if "out" not in _REFERENCE:
        out = tmp_path_factory.mktemp("attack_reference") / "out"
        r = subprocess.run(_args(*inputs, out), capture_output=True, text=True, env=env, timeout=400)
        assert r.returncode == 0, r.stderr[-2000:]
        _REFERENCE["out"] = out
    return _REFERENCE["out"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_driver_killed_mid_attack_then_rerun_resumes(attack_inputs, ray_local, tmp_path, tmp_path_factory, sig):
    import ray

    out = tmp_path / "out"
    args = _args(*attack_inputs, out)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    reference_attack = _reference(attack_inputs, tmp_path_factory, env)
    proc = signal_when(args, env, out, "embeddings/*/shards/*.done.json", sig)
    assert proc.returncode != 0, "the attack finished before it was killed"
    if sig == signal.SIGINT:
        assert "rerun the same command to resume" in proc.stderr
    assert not (out / METRICS_FILE).exists(), "a killed attack left a metrics.json"
    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "reusing embeddings" in rerun.stderr or "1 already complete" in rerun.stderr, rerun.stderr[-3000:]
    assert _metrics(out) == _metrics(reference_attack)
    for name in TABLES:
        got, want = (pq.read_table(root / name, use_threads=False) for root in (out, reference_attack))
        assert got.equals(want), name


def test_results_are_finished_only_with_metrics_json_last(tmp_path, monkeypatch):
    """metrics.json is written after every table; a rerun into a finished folder removes the old
    metrics.json before its first new table, so a run killed mid-write never looks finished."""
    out = Location.parse(str(tmp_path / "res"))
    w = ResultWriter(out)
    w.table("a.parquet", {"x": np.arange(3)})
    assert not out.child(METRICS_FILE).exists()
    w.table("b.parquet", {"y": ["p", "q"]})
    w.metrics({"attack": "test"})
    first = json.loads(out.child(METRICS_FILE).read_bytes())
    assert set(first["files"]) == {"a.parquet", "b.parquet"}

    written: list[str] = []
    original = Location.write_bytes

    def crash_on_second_table(self, data):
        written.append(self.uri)
        if self.uri.endswith("b.parquet"):
            raise KeyboardInterrupt  # the driver killed while writing the second table
        return original(self, data)

    monkeypatch.setattr(Location, "write_bytes", crash_on_second_table)
    w2 = ResultWriter(out)
    w2.table("a.parquet", {"x": np.arange(5)})
    with pytest.raises(KeyboardInterrupt):
        w2.table("b.parquet", {"y": ["r"]})
    assert not out.child(METRICS_FILE).exists(), "old metrics.json beside new tables"
    # writes are atomic: no partial file under a final name
    assert sorted(p.name for p in (tmp_path / "res").iterdir() if not p.name.startswith(".")) == [
        "a.parquet",
        "b.parquet",
    ]
    assert pq.read_table(tmp_path / "res" / "b.parquet", use_threads=False).num_rows == 2  # the previous, complete one

"""The Ray job entrypoints in jobs/: YAML → the same config objects as the CLI → the stage."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _run(kind: str, config: dict, tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, str(REPO / "jobs" / f"{kind}.py"), "--config", str(path)],
                          capture_output=True, text=True, timeout=300, env=env)


def test_embed_then_attack_jobs(tmp_path, lfw_dir, ray_local) -> None:
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    people = sorted(p for p in lfw_dir.iterdir() if p.is_dir())[:4]
    for role, photos in (("train", slice(0, 3)), ("synthetic", slice(3, 5))):
        for person in people:
            for img in sorted(person.glob("*.jpg"))[photos]:
                (tmp_path / role / person.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(img, tmp_path / role / person.name / img.name)
    done = _run("embed", {"source": str(tmp_path / "train"), "out": str(tmp_path / "emb"), "shard_size": 6},
                tmp_path, env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "12 images → 12 embedded" in done.stdout
    attack = {"attack": "idiap", "train": str(tmp_path / "emb"), "synthetic": str(tmp_path / "synthetic"),
              "out": str(tmp_path / "idiap"), "top_k": 8}
    done = _run("attack", attack, tmp_path, env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "idiap" / "metrics.json").exists() and "idiap" in done.stdout


def test_job_config_errors_are_one_line(tmp_path) -> None:
    done = _run("embed", {"source": "x", "out": "y", "batch_sise": 2}, tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "batch_sise" in done.stderr
    done = _run("attack", {"attack": "nope"}, tmp_path)
    assert done.returncode == 2 and "nope" in done.stderr
    done = _run("embed", {"source": "x", "out": "y", "s3": {"secret_key": "k"}}, tmp_path)
    assert done.returncode == 2 and "'s3'" in done.stderr  # credentials never come from config files

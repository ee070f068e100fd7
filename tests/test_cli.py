"""Commands whose output path is wrong stop before any work, with one line naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RAYLEAD = [sys.executable, "-m", "raylead.cli"]


def _one_line_error(args: list[str], expect: str, code: int = 2) -> None:
    proc = subprocess.run([*RAYLEAD, *args], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and expect in lines[0], proc.stderr[-2000:]


@pytest.mark.parametrize("bench", [["search", "--vectors", "1000", "--queries", "10", "--dim", "8"],
                                   ["embed", "--images", "."]])  # fmt: skip
def test_bench_json_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path, bench: list[str]) -> None:
    """`--json FOLDER` failed with IsADirectoryError after the whole benchmark had run."""
    _one_line_error(["bench", *bench, "--json", str(tmp_path)], f"--json {tmp_path} is a folder")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(["bench", *bench, "--json", str(blocker / "b.json")], "is not a writable folder")


def test_demo_out_that_is_a_file_is_refused_before_work(tmp_path: Path) -> None:
    """`raylead demo --out FILE` was a NotADirectoryError traceback; now the storage error of every
    other command's unwritable --out (exit 3)."""
    target = tmp_path / "afile"
    target.write_text("x")
    _one_line_error(["demo", "--out", str(target)], f"cannot write to {target}", code=3)
    assert target.read_text() == "x"


def test_output_files_that_are_folders_are_refused_before_work(tmp_path: Path) -> None:
    """`calibrate --out F.json`, `report --out F.html`, `audit history --png F.png` and an attack's
    `--report F.html` naming existing folders failed with an IsADirectoryError traceback after the
    work. (The inputs need not exist: the output is checked first.)"""
    for name in ("c.json", "r.html", "t.png"):
        (tmp_path / name).mkdir()
    cases = [
        (["calibrate", str(tmp_path / "none"), "--out", str(tmp_path / "c.json")], "--out"),
        (["report", str(tmp_path / "none"), "--out", str(tmp_path / "r.html")], "--out"),
        (["attack", "idiap", "--train", "a", "--synthetic", "b", "--out", str(tmp_path / "o"),
          "--threshold", "0.5", "--report", str(tmp_path / "r.html")], "--report"),
        (["audit", "history", "--history", str(tmp_path / "h.parquet"), "--png", str(tmp_path / "t.png")], "--png"),
    ]  # fmt: skip
    for args, flag in cases:
        target = args[args.index(flag) + 1]
        _one_line_error(args, f"{flag} {target} is a folder; give a file name")
    assert not (tmp_path / "o").exists()


def test_search_threshold_outside_the_cosine_range_is_refused(tmp_path: Path) -> None:
    """`search --threshold 93` (meant 0.93) wrote an empty range.parquet with exit 0; the attacks
    and audit refused the same value."""
    args = ["search", str(tmp_path / "q"), "--index", str(tmp_path / "i"), "--out", str(tmp_path / "o")]
    _one_line_error([*args, "--threshold", "93"], "--threshold must be a cosine similarity in [-1, 1]")

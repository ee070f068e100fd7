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


def _photos(lfw_dir: Path, folder: Path, start: int, n: int = 2) -> None:
    folder.mkdir(parents=True)
    for photo in sorted(lfw_dir.rglob("*.jpg"))[start : start + n]:
        (folder / photo.name).write_bytes(photo.read_bytes())


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("attack", ["idiap", "tinsley", "webster", "calibrate"])
def test_attack_out_inside_an_image_input_is_refused_before_any_embedding(
    tmp_path: Path, lfw_dir: Path, attack: str
) -> None:
    """`attack idiap --train H --synthetic S --out S` embedded H into S/embeddings/ (~20 s) and only
    then refused S's own embeddings as "inside the input folder", leaving files among S's images.
    Every image-folder input is now checked against --out and the embeddings folder first."""
    for k, name in enumerate(("a", "b", "c")):
        _photos(lfw_dir, tmp_path / name, 2 * k)
    a, b, c = (str(tmp_path / n) for n in "abc")
    before = _tree(tmp_path)
    theta = ["--threshold", "0.9"]
    last = {
        "idiap": (["attack", "idiap", "--train", a, "--synthetic", b, *theta], "--synthetic", b),
        "tinsley": (["attack", "tinsley", "--train", a, "--holdout", b, "--synthetic", c, "--matchers", "dlib"],
                    "--synthetic", c),
        "webster": (["attack", "webster", "--queries", a, "--samples", b], "--samples", b),
        "calibrate": (["calibrate", a], "LABELLED", a),
    }[attack]  # fmt: skip
    args, flag, folder = last
    out = str(Path(folder) / "cal.json") if attack == "calibrate" else folder
    _one_line_error([*args, "--out", out], f"--out {out} is inside the image folder {flag} {folder}")
    # an --embeddings-dir inside an input (its --out elsewhere) is refused the same way
    emb = str(Path(a) / "emb")
    target = str(tmp_path / "o" / "cal.json") if attack == "calibrate" else str(tmp_path / "o")
    _one_line_error([*args, "--out", target, "--embeddings-dir", emb], f"--embeddings-dir {emb} is inside the image")
    assert _tree(tmp_path) == before  # nothing embedded, nothing created


def test_index_build_of_a_small_set_points_at_a_route_that_exists(tmp_path: Path, write_collection) -> None:
    """`index build` of 29 vectors said "search smaller sets with the exact engine", but `raylead
    search` needs an index: the message now names a command that reads the collection as is."""
    import numpy as np

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(29, 128)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    coll = write_collection(tmp_path / "c", [f"p/{i}.jpg" for i in range(29)], ["p"] * 29, emb)
    _one_line_error(["index", "build", coll, "--out", str(tmp_path / "i")], "`raylead attack idiap --train COLLECTION`")
    assert subprocess.run([*RAYLEAD, "attack", "idiap", "--help"], capture_output=True, timeout=120).returncode == 0

"""The embed pipeline end to end on real faces, real weights, real Ray and a real S3 server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from corpus import write_mixed_folder

from raylead.catalog import Collection, read_collection
from raylead.embed import EmbedConfig, embed_collection, ensure_collection
from raylead.storage import Location

RAYLEAD = [sys.executable, "-m", "raylead.cli"]


def leave_one_out_rank1(col: Collection) -> float:
    """Fraction of images whose nearest other image (cosine) has the same identity."""
    e = col.embeddings
    ids = np.array(col.ok_identities)
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    return float((ids[sims.argmax(axis=1)] == ids).mean())


def _assert_every_input_once(col: Collection, n_inputs: int) -> None:
    assert len(col.image_ids) == n_inputs
    assert len(set(col.image_ids)) == n_inputs, "an image appears twice"
    assert col.manifest.ok + col.manifest.failed == n_inputs


def test_lfw_dlib_rows_and_identification(lfw_dlib: Collection) -> None:
    _assert_every_input_once(lfw_dlib, 1580)
    assert lfw_dlib.manifest.ok / 1580 >= 0.99
    assert lfw_dlib.manifest.dim == 128 and lfw_dlib.manifest.matcher == "dlib"
    np.testing.assert_allclose(np.linalg.norm(lfw_dlib.embeddings, axis=1), 1.0, atol=1e-5)
    assert leave_one_out_rank1(lfw_dlib) >= 0.95  # an independent script measured ≈ 0.98


def test_lfw_onnx_rows_and_identification(lfw_onnx: Collection) -> None:
    _assert_every_input_once(lfw_onnx, 1580)
    assert lfw_onnx.manifest.ok / 1580 >= 0.99
    assert lfw_onnx.manifest.dim == 128 and lfw_onnx.manifest.matcher == "onnx"
    assert leave_one_out_rank1(lfw_onnx) >= 0.94  # an independent script measured ≈ 0.96


def _subset(lfw_dir: Path, dest: Path, identities: int = 3, per: int = 5) -> list[Path]:
    files = []
    for person in sorted(p for p in lfw_dir.iterdir() if p.is_dir())[:identities]:
        for img in sorted(person.glob("*.jpg"))[:per]:
            (dest / person.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(img, dest / person.name / img.name)
            files.append(dest / person.name / img.name)
    return files


def test_s3_in_and_out_gives_identical_embeddings(tmp_path, lfw_dir, s3_server, ray_local) -> None:
    local_in = tmp_path / "in"
    files = _subset(lfw_dir, local_in)
    bucket = Location.parse("s3://raylead/embed-test/in")
    for f in files:
        bucket.child(str(f.relative_to(local_in))).write_bytes(f.read_bytes())
    local = embed_collection(EmbedConfig(source=str(local_in), out=str(tmp_path / "out"), shard_size=6))
    remote = embed_collection(EmbedConfig(source=bucket.uri, out="s3://raylead/embed-test/out", shard_size=6))
    assert remote.out.child("manifest.json").exists()
    a, b = read_collection(local.out), read_collection(remote.out)
    assert a.image_ids == b.image_ids and a.statuses == b.statuses
    np.testing.assert_array_equal(a.embeddings, b.embeddings)


def test_bad_files_become_rows_with_reasons(tmp_path, lfw_dir, ray_local, monkeypatch) -> None:
    n_inputs, good, bad = write_mixed_folder(tmp_path / "mixed", lfw_dir)
    cfg = EmbedConfig(source=str(tmp_path / "mixed"), out=str(tmp_path / "out"), shard_size=8)
    result = embed_collection(cfg)
    col = read_collection(result.out)
    _assert_every_input_once(col, n_inputs)
    status = dict(zip(col.image_ids, col.statuses, strict=True))
    assert {i for i in good if status[i] != "ok"} == set(), "a valid face failed"
    assert all(status[i] != "ok" for i in bad)
    reasons = {i: status[i].split(":")[0] for i in bad}
    assert reasons["bad/bomb.png"] == "too_many_pixels"
    assert reasons["bad/empty.jpg"] == "empty_file"
    assert reasons["bad/noface.png"] == "no_face"
    assert reasons["bad/page.png"] == "decode_error"
    assert reasons["bad/phone.heic"] == "decode_error"  # listed (it was left out without a word)
    assert sum(result.manifest.failures_by_reason.values()) == len(bad)
    # a rerun with nothing to do counts the reasons from the markers: it reads no shard (it read
    # every shard holding a failure, i.e. nearly the whole collection at scale)
    from raylead import catalog

    reads: list[str] = []
    real = catalog.read_parquet_checked
    monkeypatch.setattr(catalog, "read_parquet_checked", lambda loc, sha: reads.append(loc.uri) or real(loc, sha))
    again = embed_collection(cfg)
    assert again.shards_written == 0 and reads == []
    assert again.manifest.failures_by_reason == result.manifest.failures_by_reason


def _markers(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("*.done.json")) if (out / "shards").exists() else []


def test_killed_embed_resumes_with_every_image_once(tmp_path, lfw_dir, lfw_dlib, ray_local) -> None:
    """SIGKILL the CLI after its first finished shard; the rerun completes every image once,
    with the same embeddings as the uninterrupted session run over the same photos."""
    import ray

    src = tmp_path / "in"
    _subset(lfw_dir, src, identities=10, per=10)
    out = tmp_path / "out"
    args = [*RAYLEAD, "embed", str(src), "--out", str(out), "--shard-size", "4", "--batch-size", "4"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # the session's Ray
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
    )
    deadline = time.monotonic() + 240
    while not _markers(out) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(_markers(out))
    assert 0 < done_before < 25, "the kill should land midway"
    assert not (out / "manifest.json").exists()
    subprocess.run(args, check=True, capture_output=True, timeout=300, env=env)
    resumed = read_collection(str(out))
    _assert_every_input_once(resumed, 100)
    reference = dict(zip(lfw_dlib.ok_ids, lfw_dlib.embeddings, strict=True))
    expected = np.stack([reference[i] for i in resumed.ok_ids])
    np.testing.assert_array_equal(resumed.embeddings, expected)


def test_a_rerun_never_takes_shards_made_from_other_images_or_settings(tmp_path, lfw_dir, ray_local) -> None:
    """Finished shards are reused only for the same images *and* settings: the same file names
    from another folder (ckpt-1000/samples then ckpt-2000/samples into one --out), another
    --det-score-floor, or a collection whose images changed but kept their count were all taken
    as done (the vectors of the first run under the second's manifest)."""
    people = sorted(p for p in lfw_dir.iterdir() if p.is_dir())
    names = [f"s{i}.jpg" for i in range(4)]

    def folder(name: str, offset: int) -> Path:
        for i, n in enumerate(names):
            (tmp_path / name).mkdir(exist_ok=True)
            shutil.copyfile(sorted(people[offset + i].glob("*.jpg"))[0], tmp_path / name / n)
        return tmp_path / name

    a, b = folder("ckpt-1000", 0), folder("ckpt-2000", 4)
    out = str(tmp_path / "out")
    embed_collection(EmbedConfig(source=str(a), out=out, shard_size=2))
    again = embed_collection(EmbedConfig(source=str(b), out=out, shard_size=2))
    assert (again.shards_written, again.shards_skipped) == (2, 0)
    fresh = read_collection(embed_collection(EmbedConfig(source=str(b), out=str(tmp_path / "fresh"), shard_size=2)).out)
    np.testing.assert_array_equal(read_collection(out).embeddings, fresh.embeddings)
    same = embed_collection(EmbedConfig(source=str(b), out=out, shard_size=2))
    assert (same.shards_written, same.shards_skipped) == (0, 2)  # resuming still skips finished shards
    floor = embed_collection(EmbedConfig(source=str(b), out=out, shard_size=2, det_score_floor=0.5))
    assert floor.shards_written == 2
    # ensure_collection (what attacks and audits call): one photo swapped for another, same count
    (b / names[0]).unlink()
    shutil.copyfile(sorted(people[9].glob("*.jpg"))[0], b / "t.jpg")
    col = ensure_collection(EmbedConfig(source=str(b), out=out, shard_size=2, det_score_floor=0.5))
    assert sorted(col.image_ids) == sorted([*names[1:], "t.jpg"])


def test_unreadable_listed_files_become_rows(tmp_path, lfw_dir, ray_local) -> None:
    """A symlink loop, a FIFO named like an image, a file name that is not UTF-8: one failure row
    each, at once (the loop was retried for 60 s as a storage outage and failed the job; a FIFO
    blocked its read forever)."""
    _subset(lfw_dir, tmp_path / "in", identities=1, per=2)
    os.symlink("loop.jpg", tmp_path / "in" / "loop.jpg")
    os.mkfifo(tmp_path / "in" / "pipe.jpg")
    # a Latin-1 file name (not UTF-8): the shard could not be written, the job failed on every rerun
    shutil.copyfile(sorted(lfw_dir.rglob("*.jpg"))[0], tmp_path / "in" / os.fsdecode(b"caf\xe9.jpg"))
    t0 = time.monotonic()
    col = read_collection(embed_collection(EmbedConfig(source=str(tmp_path / "in"), out=str(tmp_path / "out"))).out)
    status = dict(zip(col.image_ids, col.statuses, strict=True))
    assert status["loop.jpg"].startswith("read_error") and status["pipe.jpg"].startswith("read_error"), status
    assert status["caf\\xe9.jpg"] == "read_error: file name is not UTF-8 (rename the file)", status
    assert sum(s == "ok" for s in status.values()) == 2 and len(status) == 5 and time.monotonic() - t0 < 50


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--det-score-floor", "nan"], "--det-score-floor must be a number, got nan"),
        (["--gpus-per-actor", "1"], "--gpus-per-actor=1 but this machine's Ray has 0 GPUs"),
        (["--matcher", "facenet"], "unknown matcher"),
        (["--matcher", "onnx", "--model", "/nonexistent/model.onnx"], "/nonexistent/model.onnx"),
        (["--detector", "/nonexistent/det.onnx"], "/nonexistent/det.onnx"),
        (["--batch-size", "0"], "--batch-size"),
        (["--det-size", "160"], "applies to SCRFD"),
        (["--fp16"], "does not accept option(s) fp16"),
        (["--matcher", "onnx", "--model", "m.onnx", "--providers", "gpu"], "unknown onnx provider"),
        (["--channels", "bgr"], "--channels/--input-mean/--input-std set the input of onnx models"),
        (["--matcher", "onnx", "--model", "m.onnx", "--channels", "BGR"], "--channels='BGR' is not one of rgb, bgr"),
        (["--matcher", "onnx", "--model", "m.onnx", "--input-std", "0"], "--input-std=0.0 must be a finite number"),
    ],
)
def test_bad_arguments_fail_before_work(tmp_path, lfw_dir, extra, expect) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [*RAYLEAD, "embed", str(lfw_dir), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert not (out / "shards").exists()


def test_channels_bgr_feeds_the_model_bgr_and_names_it(tmp_path, lfw_dir, mbf_model, scrfd_model, ray_local) -> None:
    """`--channels bgr` (AdaFace-style models): the pipeline's embeddings are the model's on the
    same aligned crops fed BGR, and the collection's matcher version says so (never mixed with RGB)."""
    from raylead.faces import Preprocessor
    from raylead.matchers import OnnxMatcher

    src = tmp_path / "in"
    _subset(lfw_dir, src, identities=2, per=2)
    cfg = EmbedConfig(source=str(src), out=str(tmp_path / "out"), matcher="onnx", model=str(mbf_model),
                      detector=str(scrfd_model), channels="bgr", actors=1)
    embed_collection(cfg)
    col = read_collection(str(tmp_path / "out"))
    assert col.manifest.ok == 4 and col.manifest.matcher_version == "mobilefacenet.onnx@f055d9c9a4d8+bgr/127.5/127.5"
    prep = Preprocessor(str(scrfd_model), "arcface112", aligned=False)
    crops = np.stack([prep.process((src / i).read_bytes())[0] for i in col.ok_ids])
    np.testing.assert_allclose(col.embeddings, OnnxMatcher(model=str(mbf_model), bgr=True).embed(crops), atol=1e-5)
    assert not np.allclose(col.embeddings, OnnxMatcher(model=str(mbf_model)).embed(crops), atol=1e-2)


def test_a_160_pixel_model_embeds_arcface160_crops(tmp_path, lfw_dir, scrfd_model, ray_local) -> None:
    """The pipeline aligns faces at the model's own input size and labels the collection with it
    (never mixed with a 112-pixel alignment of the same images)."""
    from test_matchers import _square_model

    from raylead.faces import Preprocessor
    from raylead.matchers import OnnxMatcher

    src = tmp_path / "in"
    _subset(lfw_dir, src, identities=2, per=2)
    model = _square_model(tmp_path / "m160.onnx", 160, 160)
    cfg = EmbedConfig(source=str(src), out=str(tmp_path / "out"), matcher="onnx", model=model,
                      detector=str(scrfd_model), actors=1)
    embed_collection(cfg)
    col = read_collection(str(tmp_path / "out"))
    assert col.manifest.ok == 4 and col.manifest.alignment == f"detect:{scrfd_model}:arcface160"
    prep = Preprocessor(str(scrfd_model), "arcface160", aligned=False)
    crops = np.stack([prep.process((src / i).read_bytes())[0] for i in col.ok_ids])
    np.testing.assert_allclose(col.embeddings, OnnxMatcher(model=model).embed(crops), atol=1e-5)


def test_fp16_without_gpu_workers_fails_before_work(tmp_path, lfw_dir, mbf_model, scrfd_model) -> None:
    src = tmp_path / "in"
    _subset(lfw_dir, src, identities=1, per=2)
    out = tmp_path / "out"
    args = ["--matcher", "onnx", "--model", str(mbf_model), "--detector", str(scrfd_model), "--fp16"]
    proc = subprocess.run(
        [*RAYLEAD, "embed", str(src), "--out", str(out), *args], capture_output=True, text=True, timeout=180
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("raylead: error")]
    assert proc.returncode == 2 and len(errors) == 1 and "--fp16 needs GPU workers" in errors[0], proc.stderr
    assert "embedding 2 images" not in proc.stderr  # refused before any work (Ray's own start-up logs aside)
    assert not list(out.glob("shards/*"))


def test_output_inside_input_is_refused(tmp_path, lfw_dir) -> None:
    src = tmp_path / "in"
    _subset(lfw_dir, src, identities=1, per=2)
    proc = subprocess.run(
        [*RAYLEAD, "embed", str(src), "--out", str(src / "emb")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "inside the input" in proc.stderr
    assert not (src / "emb").exists()


def test_unreachable_and_unauthorised_bucket(tmp_path, lfw_dir, s3_server) -> None:
    env_bad_key = {**os.environ, "AWS_SECRET_ACCESS_KEY": "not-the-secret-1234"}
    proc = subprocess.run(
        [*RAYLEAD, "embed", str(lfw_dir), "--out", "s3://raylead/x"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_bad_key,
    )
    assert proc.returncode == 3 and "refused" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "not-the-secret-1234" not in proc.stderr
    env_dead = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    proc = subprocess.run(
        [*RAYLEAD, "embed", str(lfw_dir), "--out", "s3://raylead/x"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_dead,
    )
    assert proc.returncode == 3 and "cannot reach" in proc.stderr


def test_failure_reasons_are_counted(lfw_dlib: Collection) -> None:
    assert Counter(s.split(":")[0] for s in lfw_dlib.statuses if s != "ok") == Counter(
        lfw_dlib.manifest.failures_by_reason
    )


@pytest.mark.parametrize(
    ("detector", "aligned", "det_size", "error", "alignment"),
    [
        ("m/det.onnx", False, None, None, "detect:m/det.onnx:arcface112"),
        ("m/det.onnx", False, 320, None, "detect:m/det.onnx:arcface112"),  # the default, same label
        ("m/det.onnx", False, 160, None, "detect:m/det.onnx@160:arcface112"),
        ("m/det.onnx", False, 64, None, "detect:m/det.onnx@64:arcface112"),
        ("m/det.onnx", False, 1280, None, "detect:m/det.onnx@1280:arcface112"),
        ("m/det.onnx", False, 100, "multiple of 32", None),
        ("m/det.onnx", False, 32, "multiple of 32", None),
        ("m/det.onnx", False, 1312, "multiple of 32", None),
        ("dlib", False, 160, "applies to SCRFD", None),
        ("m/det.onnx", True, 160, "applies to SCRFD", None),
        ("dlib", False, None, None, "detect:dlib:arcface112"),
        ("dlib", True, None, None, "aligned:arcface112"),
    ],
)
def test_det_size_is_checked_and_labels_the_collection(detector, aligned, det_size, error, alignment) -> None:
    """A collection embedded at another SCRFD input size is never reused as the default one."""
    from raylead.errors import ConfigError

    cfg = EmbedConfig(source="in", out="out", detector=detector, aligned=aligned, det_size=det_size)
    if error:
        with pytest.raises(ConfigError, match=error):
            cfg.validate()
        return
    cfg.validate()
    assert cfg.alignment("arcface112") == alignment


def test_a_rerun_embeds_again_a_shard_cut_short_after_its_marker(tmp_path, lfw_dir, ray_local) -> None:
    """A shard truncated after its completion marker was written (a full disk, a partial copy)
    was trusted by the rerun, and the collection then failed its checksum at every read."""
    src = tmp_path / "in"
    _subset(lfw_dir, src, identities=2, per=2)
    cfg = EmbedConfig(source=str(src), out=str(tmp_path / "out"), shard_size=2)
    before = read_collection(embed_collection(cfg).out).embeddings
    shard = tmp_path / "out" / "shards" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-7])
    again = embed_collection(cfg)
    assert (again.shards_written, again.shards_skipped) == (1, 1)
    col = read_collection(again.out)  # checksums verified
    np.testing.assert_array_equal(col.embeddings, before)


class _ReplacedOutput:
    """The real MobileFaceNet matcher with some of its output rows replaced: the model boundary,
    where a broken export or a numerically dead input yields NaN, zeros or a vector too small to
    normalise."""

    def __init__(self, matcher: object, replace: dict[int, np.ndarray] | None = None, fail: bool = False) -> None:
        self.matcher, self.replace, self.fail = matcher, replace or {}, fail
        self.name, self.dim, self.crop = matcher.name, matcher.dim, matcher.crop  # type: ignore[attr-defined]

    def embed(self, batch: np.ndarray) -> np.ndarray:
        if self.fail and len(batch) > 1:  # the actor's one-image warm-up still loads the weights
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        out = self.matcher.embed(batch)  # type: ignore[attr-defined]
        for row, make in self.replace.items():
            if row < len(out):
                out[row] = make(out[row])
        return out


def test_model_outputs_that_are_not_embeddings_fail_their_rows(lfw_dir: Path, mbf_model: Path) -> None:
    """NaN, all-zero and not-normalisable model outputs become ``embed_error`` rows (they used to
    pass as ``ok`` and make every reader refuse the collection); a model exception fails the
    batch's rows; rows that were not ok stay as they were; good rows keep the model's embedding."""
    from PIL import Image

    from raylead.catalog import STATUS_OK
    from raylead.embed import EmbedActor
    from raylead.index import check_embeddings
    from raylead.matchers import OnnxMatcher, l2_normalize

    files = sorted(lfw_dir.rglob("*.jpg"))[:6]
    crops = np.stack([np.asarray(Image.open(f).convert("RGB"))[69:181, 69:181] for f in files])  # centre 112×112
    batch = {
        "image_id": np.array([f.name for f in files], dtype=object),
        "identity": np.array([f.parent.name for f in files], dtype=object),
        "shard": np.zeros(6, np.int64),
        "det_score": np.full(6, 0.9, np.float32),
        "status": np.array([STATUS_OK] * 5 + ["no_face"], dtype=object),
        "crop": crops,
    }
    real = OnnxMatcher(model=str(mbf_model))
    want = real.embed(crops[:5])
    replace = {
        1: lambda v: np.full_like(v, np.nan),
        2: np.zeros_like,
        3: lambda v: l2_normalize(1e-13 * v[None])[0],  # below l2_normalize's floor: norm ≈ 1e-1, not 1
    }
    out = EmbedActor(_ReplacedOutput(real, replace))(batch)
    assert list(out["status"]) == [
        STATUS_OK,
        "embed_error: non-finite embedding",
        "embed_error: degenerate embedding (norm not 1)",
        "embed_error: degenerate embedding (norm not 1)",
        STATUS_OK,
        "no_face",
    ]
    ok = np.flatnonzero(out["status"] == STATUS_OK)
    np.testing.assert_allclose(out["embedding"][ok], want[ok], atol=1e-5)
    check_embeddings(out["embedding"][ok], list(out["image_id"][ok]), "the ok rows")  # what readers accept

    failed = EmbedActor(_ReplacedOutput(real, fail=True))(batch)
    assert list(failed["status"]) == ["embed_error: RuntimeError"] * 5 + ["no_face"]


def test_a_rerun_with_nothing_to_do_leaves_the_manifest_as_it_is(tmp_path, lfw_dir, ray_local) -> None:
    """The manifest's bytes are the collection's fingerprint (searches and indexes of it are keyed to
    them): a rerun that finds every shard complete rewrote it with a new ``created`` time, and the same
    search or index build then refused its own finished work. A changed input still rewrites it."""
    from raylead.catalog import read_manifest_and_sha256

    src = tmp_path / "in"
    _subset(lfw_dir, src, identities=2, per=2)
    cfg = EmbedConfig(source=str(src), out=str(tmp_path / "out"), shard_size=2)
    first = embed_collection(cfg)
    manifest = tmp_path / "out" / "manifest.json"
    data, stat = manifest.read_bytes(), manifest.stat()
    fingerprint = read_manifest_and_sha256(first.out)[1]
    again = embed_collection(cfg)
    assert (again.shards_written, again.shards_skipped) == (0, 2)
    assert manifest.read_bytes() == data and manifest.stat().st_mtime_ns == stat.st_mtime_ns
    assert read_manifest_and_sha256(again.out)[1] == fingerprint and again.manifest == first.manifest
    # a changed input (one more image): a new shard and a new manifest
    extra = sorted(p for p in lfw_dir.iterdir() if p.is_dir())[5]
    shutil.copyfile(sorted(extra.glob("*.jpg"))[0], src / "extra.jpg")
    grown = embed_collection(cfg)
    assert grown.shards_written >= 1 and grown.manifest.rows == 5
    assert manifest.read_bytes() != data and read_collection(grown.out).manifest.rows == 5

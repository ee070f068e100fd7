"""Generator plug-ins: what the user's code raises or returns is one line; one bad image of the
``folder`` generator is one failure row, never the end of the audit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from raylead import generators
from raylead.errors import ConfigError
from raylead.storage import Location

PLUGIN = """
import numpy as np

class G:
    name, version = "g", "1"

    def __init__(self, mode):
        self.mode = mode

    def sample(self, seeds):
        imgs = np.stack([np.full((24, 24, 3), int(s) % 256, np.uint8) for s in seeds])
        if self.mode == "none":
            return None
        if self.mode == "empty":
            return [np.zeros((0, 0, 3), np.uint8) for _ in seeds]
        if self.mode == "raise_mid" and max(seeds) >= 2:
            raise RuntimeError("CUDA out of memory\\nat seed %d" % max(seeds))
        return imgs

def make(checkpoint_uri, mode="ok"):
    return G(mode)

def make_raise(checkpoint_uri, **options):
    raise FileNotFoundError("checkpoint weights missing: " + checkpoint_uri)
"""


@pytest.fixture
def plugin(tmp_path: Path) -> str:
    path = tmp_path / "gen.py"
    path.write_text(PLUGIN)
    return str(path)


def _one_line(err: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_sample_output_that_is_not_images_is_one_line() -> None:
    for out, says in [
        (None, "sample() returned NoneType for 2 seeds"),
        (7, "sample() returned int for 2 seeds"),
        ([np.zeros((0, 0, 3), np.uint8)] * 2, "sample() returned an empty 0x0 image"),
        (np.zeros((2, 5, 0, 3), np.uint8), "sample() returned an empty 0x5 image"),
    ]:
        with pytest.raises(ConfigError) as err:
            generators.as_images(out, 2, "gen.py:make")
        assert f"generator gen.py:make: {says}" in _one_line(err)


def test_generator_code_that_raises_is_one_line_naming_the_spec(tmp_path: Path, plugin: str) -> None:
    """The factory raising, ``sample`` raising midway, returning None or empty images: a one-line
    ConfigError naming the spec, also from the audit's sampler actor as it is."""
    from raylead.audit import SamplerActor

    with pytest.raises(ConfigError) as err:
        generators.load(f"{plugin}:make_raise", "ck/step-1.pt")
    assert (f"generator '{plugin}:make_raise' could not load ck/step-1.pt: its factory raised FileNotFoundError: "
            "checkpoint weights missing: ck/step-1.pt") in _one_line(err)
    spec = f"{plugin}:make"
    gen = generators.load(spec, "ck", {"mode": "raise_mid"})
    assert gen.name == "g" and gen.version == "1" and len(gen.sample(np.array([0, 1]))) == 2
    raised = f"generator {spec!r}: sample() raised RuntimeError: CUDA out of memory at seed 3 for seeds 2..3"
    with pytest.raises(ConfigError) as err:
        gen.sample(np.array([2, 3]))
    assert raised in _one_line(err)
    with pytest.raises(ConfigError) as err:
        generators.sample_checked(gen.generator, np.array([2, 3]), spec)
    assert raised in _one_line(err)
    out = Location.parse(str(tmp_path / "samples"))
    for mode, says in [("raise_mid", raised), ("none", "sample() returned NoneType"), ("empty", "an empty 0x0 image")]:
        actor = SamplerActor(spec, "ck", {"mode": mode}, out)
        with pytest.raises(ConfigError) as err:
            actor({"seed": np.array([2, 3])})
        assert says in _one_line(err)
    # a factory that raises: the actor starts (Ray would print its retries of a failing start) and
    # the first batch raises the one line
    actor = SamplerActor(f"{plugin}:make_raise", "ck/step-1.pt", {}, out)
    with pytest.raises(ConfigError, match="could not load ck/step-1.pt: its factory raised FileNotFoundError"):
        actor({"seed": np.array([0])})


def _folder_with_bad_images(lfw_dir: Path, dest: Path) -> list[str]:
    """Two good LFW photos, a truncated one and one too small to use; their files in sorted order."""
    from PIL import Image

    good = sorted(lfw_dir.rglob("*.jpg"))[:3]
    dest.mkdir(parents=True)
    shutil.copyfile(good[0], dest / "a.jpg")
    shutil.copyfile(good[1], dest / "b.jpg")
    (dest / "c.jpg").write_bytes(good[2].read_bytes()[:3000])
    Image.new("RGB", (8, 8)).save(dest / "d.png")
    return ["a.jpg", "b.jpg", "c.jpg", "d.png"]


def test_folder_generator_hands_on_unreadable_images_as_failures(tmp_path: Path, lfw_dir: Path) -> None:
    """A truncated or too-small image of the folder does not stop sampling: it is written as a
    sample that embedding records as a failure; ``sample_blobs`` hands on the files as they are."""
    from raylead.audit import SamplerActor, sample_file
    from raylead.faces import ImageFailure, decode_image

    files = _folder_with_bad_images(lfw_dir, tmp_path / "syn")
    gen = generators.load("folder", str(tmp_path / "syn"))
    imgs = generators.sample_checked(gen, np.arange(4), "folder")
    for k in (0, 1):
        assert np.array_equal(imgs[k], decode_image((tmp_path / "syn" / files[k]).read_bytes()))
    out = tmp_path / "samples"
    SamplerActor("folder", str(tmp_path / "syn"), {}, Location.parse(str(out)))({"seed": np.arange(4)})
    # each sample file is the folder's own file: embedding records it as a failure row with its reason
    for k, reason in ((2, "decode_error"), (3, "too_small: 8x8")):
        with pytest.raises(ImageFailure, match=reason):
            decode_image((out / sample_file(k)).read_bytes())
    blobs = generators.sample_blobs(gen, np.arange(4), "folder", encode=lambda img: b"never")
    assert blobs == [(tmp_path / "syn" / f).read_bytes() for f in files]
    with pytest.raises(ImageFailure, match="decode_error"):
        decode_image(blobs[2])
    with pytest.raises(ImageFailure, match="too_small: 8x8"):
        decode_image(blobs[3])


def test_sampling_with_ray_survives_bad_images_and_stops_on_generator_errors_in_one_line(
    tmp_path: Path, lfw_dir: Path, plugin: str, ray_local
) -> None:
    from raylead.audit import AuditConfig, sample_checkpoint
    from raylead.faces import ImageFailure, decode_image

    _folder_with_bad_images(lfw_dir, tmp_path / "syn")
    cfg = AuditConfig(generator="folder", train_index="unused", out=str(tmp_path / "o"), sample_batch_size=2)
    done = sample_checkpoint(cfg, Location.parse(str(tmp_path / "syn")), Location.parse(str(tmp_path / "f")), 4)
    assert len(done["files"]) == 4
    decode_image((tmp_path / "f" / "samples" / done["files"][0]).read_bytes())
    with pytest.raises(ImageFailure):
        decode_image((tmp_path / "f" / "samples" / done["files"][2]).read_bytes())
    bad = AuditConfig(generator=f"{plugin}:make", train_index="unused", out=str(tmp_path / "o"),
                      sample_batch_size=2, generator_options={"mode": "raise_mid"})
    with pytest.raises(ConfigError, match=r"^generator '.*:make': sample\(\) raised RuntimeError: CUDA out of memory"):
        sample_checkpoint(bad, Location.parse(str(tmp_path / "ck")), Location.parse(str(tmp_path / "g")), 4)

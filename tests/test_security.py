"""Nothing read from storage is unpickled: a static scan of the sources, and planted pickles.

(a) ``raylead/`` never calls an unpickler (``pickle.load(s)``, ``cloudpickle``/``dill``/``joblib``
loads, ``pd.read_pickle``, ``np.load`` without ``allow_pickle=False``, ``torch.load`` without
``weights_only=True``, ``yaml.load`` without a safe loader, ...).
(b) Malicious pickles planted where raylead reads from storage (an index shard's vectors, its
FAISS file, its ids, the index and collection manifests, an embedding shard, a calibration file,
a search run file) give a clear ``RayleadError`` and never run: the file their ``__reduce__``
would create is never created.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from faults import stop_search_after

from raylead.catalog import sha256_bytes
from raylead.errors import CorruptDataError, RayleadError

SOURCES = Path(__file__).resolve().parents[1] / "raylead"

# module-level callables that unpickle whatever they are given
_ALWAYS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("_pickle", "load"),
    ("_pickle", "loads"),
    ("cPickle", "load"),
    ("cPickle", "loads"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
    ("joblib", "load"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
    ("shelve", "open"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
    ("ray.cloudpickle", "loads"),
}
_UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unpickling_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every call in ``source`` that may unpickle data: ``file:line: what``.

    ``import pickle`` alone is fine (``pickle.dumps`` serialises); importing an unpickler by
    name (``from pickle import loads``) or calling one (also through an alias) is not."""
    found = []
    tree = ast.parse(source, filename)
    alias: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if (node.module, a.name) in _ALWAYS or (
                    node.module.split(".")[-1] in _UNPICKLING_MODULES and a.name in ("load", "loads", "Unpickler")
                ):
                    found.append(f"{filename}:{node.lineno}: from {node.module} import {a.name}")
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        first, _, rest = name.partition(".")
        if first in alias:
            name = alias[first] + (f".{rest}" if rest else "")
        name = name.replace("numpy.", "np.", 1) if name.startswith("numpy.") else name
        name = name.replace("pandas.", "pd.", 1) if name.startswith("pandas.") else name
        parts = name.rsplit(".", 1)
        head, attr = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
        where = f"{filename}:{node.lineno}: {name}"
        if (head, attr) in _ALWAYS or attr == "read_pickle" or (
            head.split(".")[-1] in _UNPICKLING_MODULES and attr in ("load", "loads", "Unpickler")
        ):
            found.append(where)
        elif attr == "load" and head == "np":
            if not _is_const(_kw(node, "allow_pickle"), False):
                found.append(f"{where} without allow_pickle=False")
        elif attr == "load" and head == "torch":
            if not _is_const(_kw(node, "weights_only"), True):
                found.append(f"{where} without weights_only=True")
        elif attr == "load" and head == "yaml":
            loader = _kw(node, "Loader")
            if loader is None or "Safe" not in _dotted(loader):
                found.append(f"{where} without a SafeLoader")
        if _is_const(_kw(node, "allow_pickle"), True):
            found.append(f"{where} with allow_pickle=True")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\npickle.loads(b)",
        "from pickle import loads",
        "import cloudpickle as cp\ncp.loads(b)",
        "import pickle as p\np.load(f)",
        "from numpy import load\nload(f)",
        "np.load(f)",
        "np.load(f, mmap_mode='r')",
        "numpy.load(f, allow_pickle=True)",
        "torch.load(f)",
        "torch.load(f, weights_only=False)",
        "pd.read_pickle(f)",
        "joblib.load(f)",
        "yaml.load(f)",
        "yaml.unsafe_load(f)",
        "x = ray.cloudpickle.loads(b)",
    ],
)
def test_the_scanner_finds_unpickling(snippet):
    assert unpickling_calls(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "np.load(f, mmap_mode='r', allow_pickle=False)",
        "torch.load(f, weights_only=True)",
        "yaml.safe_load(f)",
        "yaml.load(f, Loader=yaml.SafeLoader)",
        "json.loads(b)",
        "faiss.deserialize_index(a)",
        "import pickle\nkey = pickle.dumps(x)",
    ],
)
def test_the_scanner_accepts_safe_loads(snippet):
    assert unpickling_calls(snippet) == []


def test_no_unpickling_in_the_sources():
    files = sorted(SOURCES.rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in unpickling_calls(f.read_text(), str(f.relative_to(SOURCES.parent)))]
    assert found == [], "raylead must never unpickle data:\n" + "\n".join(found)


# -- planted pickles ------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for running an attacker's code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled(marker: Path) -> bytes:
    return pickle.dumps({"vectors": _Payload(marker)})


def _npy_with_pickle(marker: Path) -> bytes:
    arr = np.empty(1, dtype=object)
    arr[0] = _Payload(marker)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _fix_entry(manifest: Path, rel: str, data: bytes) -> None:
    """Record ``data`` as the content of ``rel`` in an index manifest (the attacker controls both)."""
    d = json.loads(manifest.read_text())

    def patch(entry: dict) -> None:
        if entry.get("path") == rel:
            entry["sha256"], entry["bytes"] = sha256_bytes(data), len(data)

    patch(d["trained"])
    for s in d["shards"]:
        for key in ("index", "vectors", "ids"):
            patch(s[key])
    manifest.write_text(json.dumps(d))


@pytest.fixture
def index_copy(small_indexes, tmp_path) -> Path:
    dest = tmp_path / "idx"
    shutil.copytree(small_indexes[1], dest)
    return dest


@pytest.mark.parametrize("what", ["vectors", "index", "ids", "index.json"])
def test_planted_pickle_in_an_index_is_never_loaded(index_copy, tmp_path, what):
    from raylead.search import IndexSearcher, open_index

    marker = tmp_path / "PWNED"
    rel = {
        "vectors": "shards/shard-00000.vectors.npy",
        "index": "shards/shard-00000.faissindex",
        "ids": "shards/shard-00000.ids.parquet",
        "index.json": "index.json",
    }[what]
    data = _npy_with_pickle(marker) if what == "vectors" else _pickled(marker)
    (index_copy / rel).write_bytes(data)
    if what != "index.json":
        _fix_entry(index_copy / "index.json", rel, data)
    with pytest.raises(RayleadError) as err:
        idx = open_index(str(index_copy))
        if what == "ids":
            idx.target_ids()
        else:
            with IndexSearcher(idx, use_ray=False) as s:
                s.exact_search(np.ones((1, s.dim), np.float32), 1)
    assert isinstance(err.value, CorruptDataError)
    assert "\n" not in str(err.value)
    assert not marker.exists(), "a planted pickle was unpickled"


def test_planted_pickle_in_an_embedding_collection_is_never_loaded(write_collection, tmp_path):
    from raylead.catalog import read_collection

    marker = tmp_path / "PWNED"
    emb = np.eye(4, dtype=np.float32)
    root = Path(write_collection(tmp_path / "coll", list("abcd"), [None] * 4, emb))
    # the shard replaced, its checksum updated
    data = _pickled(marker)
    (root / "shards/part-00000.parquet").write_bytes(data)
    m = json.loads((root / "manifest.json").read_text())
    m["shards"][0]["sha256"] = sha256_bytes(data)
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptDataError):
        read_collection(str(root))
    # the manifest itself a pickle
    (root / "manifest.json").write_bytes(_pickled(marker))
    with pytest.raises(CorruptDataError):
        read_collection(str(root))
    assert not marker.exists()


def test_planted_pickle_as_a_calibration_file_is_never_loaded(tmp_path):
    from raylead.attacks import resolve_threshold

    marker = tmp_path / "PWNED"
    calib = tmp_path / "calib.json"
    calib.write_bytes(_pickled(marker))
    with pytest.raises(RayleadError):
        resolve_threshold(None, str(calib), "dlib", "test")
    assert not marker.exists()


def test_planted_pickle_in_search_state_is_never_loaded(write_collection, small_indexes, clustered_small, tmp_path):
    from raylead.search import SearchConfig, SearchJob, part_names, run_search

    marker = tmp_path / "PWNED"
    q = write_collection(tmp_path / "q", [f"q{i}" for i in range(40)], [None] * 40, clustered_small.queries[:40])
    cfg = SearchConfig(k=3, engine="exact", query_block=10)
    want = run_search(SearchJob(q, small_indexes[1], str(tmp_path / "ref"), cfg, use_ray=False))
    out = tmp_path / "res"
    job = SearchJob(q, small_indexes[1], str(out), cfg, use_ray=False)
    stop_search_after(job, 3)
    # a part marker that is a pickle: not trusted, the part is searched again
    (out / part_names(1)[1]).write_bytes(_pickled(marker))
    got = run_search(job)
    assert got["parts_reused"] == 2 and got["sha256"] == want["sha256"]
    # the run file a pickle: a clear error
    stop_search_after(SearchJob(q, small_indexes[1], str(tmp_path / "res2"), cfg, use_ray=False), 1)
    (tmp_path / "res2" / "run.json").write_bytes(_pickled(marker))
    with pytest.raises(CorruptDataError):
        run_search(SearchJob(q, small_indexes[1], str(tmp_path / "res2"), cfg, use_ray=False))
    assert not marker.exists()


# -- a planted secret, scanned across everything a full run writes --------------------------------
def secret_forms(secret: str) -> list[bytes]:
    """The secret as it could leak: raw, URL-encoded, base64 (standard/urlsafe, any alignment), hex."""
    import base64
    from urllib.parse import quote, quote_plus

    raw = secret.encode()
    forms = {raw, quote(secret, safe="").encode(), quote(secret, safe="").lower().encode(), quote_plus(secret).encode()}
    forms.add(json.dumps(secret).encode()[1:-1])
    forms.add(raw.hex().encode())
    for pad in range(3):  # every alignment: the middle of the encoding depends only on the secret
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            forms.add(enc(b"\0" * pad + raw)[4:-4])
    return sorted(forms)


def _leaks(blob: bytes, forms: list[bytes]) -> list[bytes]:
    return [f for f in forms if f in blob]


# -- user:password@ in URLs: the one scrubber behind storage errors and the report ----------------
@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        ("s3://AKIA:wJalrXUtnFEMI/K7MDENG@bucket/x", "s3://***@bucket/x"),  # '/' in the password
        ("https://user:p@ss@host/x", "https://***@host/x"),  # '@' in the password: up to the last '@'
        ("see https://user:secret@host/x and s3://b/k", "see https://***@host/x and s3://b/k"),
        ('Could not connect to "http://u:pw@127.0.0.1:9/b/k"', 'Could not connect to "http://***@127.0.0.1:9/b/k"'),
        ("s3://bucket/plain/key.jpg", "s3://bucket/plain/key.jpg"),
        ("looked at: https:/user:hunter2@host/m.onnx", "looked at: https:/***@host/m.onnx"),  # after abspath
        ("no url here", "no url here"),
    ],
)
def test_userinfo_is_scrubbed(text: str, scrubbed: str) -> None:
    from raylead.storage import scrub_userinfo

    assert scrub_userinfo(text) == scrubbed


def test_storage_error_text_is_one_scrubbed_line(monkeypatch) -> None:
    from raylead.storage import _clean

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "EnvSecretValue")
    exc = OSError('cannot open "http://admin:Pa/ss@wd@host:9/b"\nwith key EnvSecretValue')
    text = _clean(exc)
    assert "\n" not in text and "admin" not in text and "Pa/ss" not in text and "EnvSecretValue" not in text
    assert text == 'cannot open "http://***@host:9/b" with key ***'


def test_plugin_options_and_errors_keep_no_credentials(monkeypatch) -> None:
    """A generator option holding a URL with a password was written as is into the audit history,
    metrics.json and samples.json; a plug-in's exception text (its factory failing to open that URL)
    reached stderr and Ray's logs unscrubbed, control characters included."""
    from raylead.audit import recorded_options
    from raylead.plugins import exception_line
    from raylead.storage import S3Options

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "EnvSecretValue")
    s3 = S3Options(endpoint_url="http://127.0.0.1:9", access_key="FlagKeyId", secret_key="FlagSecret")
    options = {"weights": "https://alice:S3CR3T-T0KEN@models.example.com/w.pt", "psi": 0.7,
               "note": "FlagSecret and EnvSecretValue"}
    kept = recorded_options(options, s3)
    assert kept == {"weights": "https://***@models.example.com/w.pt", "psi": 0.7, "note": "*** and ***"}
    line = exception_line(FileNotFoundError("http://alice:S3CR3T-T0KEN@host/w.pt\nfake line\x1b[8m EnvSecretValue"))
    assert line == "FileNotFoundError: http://***@host/w.pt fake line\\x1b[8m ***"


def test_checkpoint_names_cannot_forge_lines_and_new_folders_are_private(tmp_path) -> None:
    """A checkpoint folder named "ckpt-3\nckpt-9 (step 9): leak 0.0% ..." printed a fake trend line;
    the history's folder and a scenario's identity folders were created world-readable (0755)."""
    from raylead.audit import _history_lock, checkpoint_name
    from raylead.storage import Location

    assert checkpoint_name("/runs/ckpt-3\nckpt-9 (step 9): leak 0.0%\x1b[8m") == (
        "ckpt-3\\x0ackpt-9 (step 9): leak 0.0%\\x1b[8m"
    )
    old = os.umask(0o022)
    try:
        with _history_lock(Location.parse(str(tmp_path / "audits" / "team-a" / "history.parquet"))):
            pass
    finally:
        os.umask(old)
    for folder in (tmp_path / "audits", tmp_path / "audits" / "team-a"):
        assert oct(folder.stat().st_mode & 0o777) == "0o700", folder


def test_secret_forms_are_found():
    import base64

    secret = "RLsecret/abc+def=ghij0123456789"
    forms = secret_forms(secret)
    for blob in (
        f"x{secret}y".encode(),
        b"Authorization: Basic " + base64.b64encode(b"user:" + secret.encode()),
        b"url?k=" + secret.replace("/", "%2F").replace("+", "%2B").replace("=", "%3D").encode(),
        b"u=" + base64.urlsafe_b64encode(b"ab" + secret.encode()),
    ):
        assert _leaks(blob, forms), blob
    assert not _leaks(b"nothing secret here", forms)


def _run(
    args: list[str], env: dict[str, str], log: list[tuple[str, bytes]], ok: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "raylead.cli", *args], capture_output=True, env=env, timeout=400)
    log.append((f"$ raylead {args[0]} stdout", proc.stdout))
    log.append((f"$ raylead {args[0]} stderr", proc.stderr))
    if ok:
        assert proc.returncode == 0, (args, proc.stderr[-3000:].decode(errors="replace"))
    return proc


def _local_files(*roots: Path) -> list[tuple[str, bytes]]:
    out = []
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                try:
                    out.append((str(p), p.read_bytes()))
                except OSError:  # a socket or a file removed meanwhile
                    continue
    return out


_RAY_HOLDER = """
import sys, ray
ray.init(address="local", num_cpus=2, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
"""


def _stop(holder: subprocess.Popen[bytes], log: list[tuple[str, bytes]]) -> None:
    """End the Ray holder (it shuts its Ray down), keeping what it printed."""
    if holder.poll() is None:
        try:
            out, err = holder.communicate(b"", timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(holder.pid, signal.SIGKILL)
            out, err = holder.communicate(timeout=30)
        log += [("ray holder stdout", out or b""), ("ray holder stderr", err or b"")]


@pytest.mark.slow
def test_planted_secret_never_leaks_from_a_full_run(lfw_dir, tmp_path_factory):
    """A SeaweedFS server accepting only planted, unique credentials (given through AWS_*, as a
    user would); a full run over s3:// — embed, index build, idiap attack (which embeds its
    synthetic folder), search with pairs and range, index info at DEBUG level, report — each a
    CLI process, on one Ray started with that environment.
    Neither the secret key nor the access key, in any encoding, appears in the stdout/stderr of a
    command, Ray's session logs, a local file written, or any object in the bucket. A refused
    secret is not shown in the error either."""
    import tempfile
    import uuid

    from s3server import SeaweedS3

    token = uuid.uuid4().hex
    access = f"AKRLPLANT{token[:12].upper()}"
    secret = f"RLplanted/{token[12:24]}+{token[24:]}Zq="
    bucket = "planted"
    server = SeaweedS3(tmp_path_factory.mktemp("weed_planted"), buckets=(bucket,), access_key=access, secret_key=secret)
    server.start()
    # short paths: Ray's unix sockets live under RAY_TMPDIR
    scratch = Path(tempfile.mkdtemp(prefix="rlsec-", dir="/tmp"))
    holder: subprocess.Popen[bytes] | None = None
    try:
        for d in ("ray", "tmp", "home", "local"):
            (scratch / d).mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
        env |= server.env() | {
            "RAY_TMPDIR": str(scratch / "ray"),
            "TMPDIR": str(scratch / "tmp"),
            "HOME": str(scratch / "home"),
            "MPLCONFIGDIR": str(scratch / "home" / "mpl"),
        }
        # one Ray for every command (started with the planted environment, as a user's cluster
        # would be); its session logs, and those of every driver, land under RAY_TMPDIR
        holder = subprocess.Popen(
            [sys.executable, "-c", _RAY_HOLDER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        address = holder.stdout.readline().decode().strip()  # type: ignore[union-attr]
        assert address, holder.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        # a local Ray enables token authentication; drivers find the token under HOME
        env |= {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}
        client = server.client()
        people = sorted(p for p in lfw_dir.iterdir() if p.is_dir())
        for person in people[:10]:
            for i, f in enumerate(sorted(person.glob("*.jpg"))[:8]):
                client.put_object(Bucket=bucket, Key=f"in/train/{person.name}/{f.name}", Body=f.read_bytes())
                if i == 7 and len(person.name) % 2:
                    client.put_object(Bucket=bucket, Key=f"in/synthetic/{person.name}/{f.name}", Body=f.read_bytes())
        for person in people[10:12]:
            f = sorted(person.glob("*.jpg"))[0]
            client.put_object(Bucket=bucket, Key=f"in/synthetic/{person.name}/{f.name}", Body=f.read_bytes())

        s3 = f"s3://{bucket}"
        log: list[tuple[str, bytes]] = []
        _run(["embed", f"{s3}/in/train", "--out", f"{s3}/emb/train", "--shard-size", "32"], env, log)
        _run(["index", "build", f"{s3}/emb/train", "--out", f"{s3}/idx", "--shards", "2"], env, log)
        _run(
            ["attack", "idiap", "--train", f"{s3}/emb/train", "--synthetic", f"{s3}/in/synthetic",
             "--embeddings-dir", f"{s3}/emb", "--train-index", f"{s3}/idx", "--out", f"{s3}/res/idiap",
             "--top-k", "20", "--threshold", "0.6"],
            env, log,
        )  # fmt: skip
        _run(
            ["search", f"{s3}/emb/train", "--index", f"{s3}/idx", "--out", f"{s3}/res/search", "--k", "5",
             "--pairs", "10", "--threshold", "0.6", "--query-block", "32"],
            env, log,
        )  # fmt: skip
        _run(["-v", "index", "info", f"{s3}/idx"], env, log)  # DEBUG logging: botocore's included
        if (SOURCES / "cli" / "report.py").exists():
            _run(["report", f"{s3}/res/idiap", "--out", str(scratch / "local" / "report.html")], env, log)
            assert (scratch / "local" / "report.html").exists()

        # the error paths: a refused secret (from the environment, and given as --s3-secret)
        wrong = f"RLwrong/{uuid.uuid4().hex}+x"
        bad_env = env | {"AWS_SECRET_ACCESS_KEY": wrong}
        for args, e in (
            (["embed", f"{s3}/in/train", "--out", f"{s3}/emb/refused"], bad_env),
            (["embed", f"{s3}/in/train", "--out", f"{s3}/emb/refused", "--s3-key", access, "--s3-secret", wrong], env),
        ):
            r = _run(args, e, log, ok=False)
            assert r.returncode == 3 and b"raylead: error:" in r.stderr and b"refused" in r.stderr, r.stderr[-2000:]
            assert not _leaks(r.stdout + r.stderr, secret_forms(wrong)), r.stderr[-2000:]

        _stop(holder, log)

        # everything that was written
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys += [o["Key"] for o in page.get("Contents", [])]
        objects = [(f"{s3}/{k}", client.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys]
        for must in ("emb/train/manifest.json", "idx/index.json", "res/idiap/metrics.json", "res/search/search.json"):
            assert must in keys, (must, keys[:50])
        assert any(k.startswith("emb/synthetic-") and k.endswith("manifest.json") for k in keys)
        local = _local_files(scratch)
        ray_logs = [name for name, _ in local if "/logs/" in name]
        assert len(ray_logs) > 10, "no Ray session logs were captured"
        everything = log + objects + local
        forms = secret_forms(secret) + secret_forms(access)
        leaks = [(name, [f.decode(errors="replace") for f in _leaks(blob, forms)]) for name, blob in everything]
        leaks = [(name, found) for name, found in leaks if found]
        assert leaks == [], f"the planted credentials leaked into {len(leaks)} of {len(everything)} files: {leaks[:10]}"
    finally:
        if holder is not None:
            _stop(holder, [])
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)

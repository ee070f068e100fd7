"""Storage: one place that turns a URI into a filesystem.

A :class:`Location` is a picklable (URI, S3 options) pair. Local paths and ``file://`` URIs
map to the local filesystem; ``s3://bucket/prefix`` maps to ``s3fs`` with the endpoint and
credentials taken from explicit options or the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``).

Writes are atomic: a local file is written under a temporary name and ``os.replace``d;
an object is one PUT. Completion markers are written last by the callers. Relative paths
coming from manifests are checked so they cannot escape their root. Credentials are never
part of a ``repr``, a log line or an error message.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import posixpath
import random
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import fsspec

from raylead.errors import ConfigError, CorruptDataError, PathEscapeError, StorageError

log = logging.getLogger(__name__)

# listed as inputs; a format the decoder lacks (HEIC without a plug-in) is a decode_error row, not left out
IMAGE_EXTENSIONS = (
    *(".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
    *(".avif", ".heic", ".heif"),
)
T = TypeVar("T")

# Local outputs may hold faces and biometric templates: owner-only.
FILE_MODE = 0o600
DIR_MODE = 0o700


@dataclass(frozen=True)
class S3Options:
    """Endpoint and credentials for s3:// URIs. Secrets never appear in repr()."""

    endpoint_url: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str | None = None
    env_credentials: bool = False

    @classmethod
    def from_env(cls, **overrides: Any) -> S3Options:
        env = os.environ
        base = cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            env_credentials=True,
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.keys() & {"access_key", "secret_key", "session_token"}:
            given["env_credentials"] = False
        return replace(base, **given)

    def __reduce__(self) -> tuple[Any, ...]:
        # Secrets that came from the environment are re-read from the worker's environment
        # instead of travelling inside pickles (which Ray may spill to disk).
        if self.env_credentials:
            return (_s3_options_from_env, (self.endpoint_url, self.region))
        return (
            S3Options,
            (self.endpoint_url, self.access_key, self.secret_key, self.session_token, self.region, False),
        )


def _s3_options_from_env(endpoint_url: str | None, region: str | None) -> S3Options:
    return S3Options.from_env(endpoint_url=endpoint_url, region=region)


@functools.lru_cache(maxsize=32)
def _s3_filesystem(opts: S3Options) -> Any:
    import s3fs

    client_kwargs: dict[str, Any] = {}
    if opts.endpoint_url:
        client_kwargs["endpoint_url"] = opts.endpoint_url
    if opts.region:
        client_kwargs["region_name"] = opts.region
    return s3fs.S3FileSystem(
        key=opts.access_key,
        secret=opts.secret_key,
        token=opts.session_token,
        client_kwargs=client_kwargs,
        config_kwargs={"retries": {"max_attempts": 3, "mode": "standard"}, "connect_timeout": 5},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def _makedirs_private(path: str) -> None:
    """``os.makedirs`` giving every folder it creates (not just the leaf) owner-only mode."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(p, DIR_MODE)


def check_file_target(path: str, flag: str, example: str) -> None:
    """An output file's name, before any work: a local path must not be a folder (the write at
    the end would fail after the work). On S3 a key and a prefix of the same name coexist. The
    URI itself is parsed too (scheme, credentials, host), as the write would."""
    Location.parse(path)
    if not str(path).startswith("s3://") and os.path.isdir(os.path.expanduser(str(path))):
        raise ConfigError(f"{flag} {path} is a folder; give a file name, e.g. {os.path.join(str(path), example)}")


def safe_relpath(rel: str) -> str:
    """Normalise a path relative to a root; refuse anything that escapes it."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise PathEscapeError(f"invalid relative path {rel!r}: must be a non-empty string")
    if "://" in rel or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise PathEscapeError(
            f"path {rel!r} is absolute or names another location; manifests may only hold "
            "paths relative to their own folder"
        )
    parts = rel.replace("\\", "/").split("/")
    if any(p == ".." for p in parts):
        raise PathEscapeError(f"path {rel!r} climbs out of its root with '..'; rebuild the manifest")
    norm = posixpath.normpath("/".join(p for p in parts if p not in ("", ".")))
    if norm in (".", ""):
        raise PathEscapeError(f"path {rel!r} names the root itself, not a file under it")
    return norm


_PERMANENT_ERRNOS = frozenset({errno.ELOOP, errno.ENXIO, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR})


_SINGLE_PUT_MAX = 5 * 2**30  # S3's limit for one PUT
# S3 error codes that name the request's URI as invalid: retrying the same URI cannot help
_INVALID_URI_CODES = frozenset({"InvalidBucketName", "InvalidURI", "KeyTooLongError"})


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception (s3fs raises OSError from botocore's ClientError)."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            return str(code) if code else None
    return None


def retry_io(
    fn: Callable[[], T], what: str, budget_s: float | None = None, passthrough: frozenset[str] = frozenset()
) -> T:
    """Call ``fn`` with exponential backoff on transient I/O errors; the S3 error codes in
    ``passthrough`` are raised at once, as they came.

    The total time spent retrying is bounded by ``budget_s`` (default
    ``RAYLEAD_IO_RETRY_SECONDS`` or 60 s); after that a :class:`StorageError` names what failed.
    """
    budget = float(os.environ.get("RAYLEAD_IO_RETRY_SECONDS", "60")) if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    delay = 0.25
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            raise  # permanent: retrying cannot help
        except (ValueError, TypeError, AttributeError, KeyError):
            raise  # programming errors
        except Exception as exc:  # botocore/aiohttp raise many types for a dead or flaky endpoint
            if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
                raise  # a symlink loop, a socket or FIFO, a name too long: it stays so
            kind = type(exc).__name__
            if kind == "NoCredentialsError":  # permanent: waiting cannot bring them
                raise StorageError(
                    f"{scrub_userinfo(what)} failed: no S3 credentials were found; set AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY or pass --s3-key / --s3-secret"
                ) from None
            if kind == "ParamValidationError":  # permanent: the request itself is invalid (bucket name...)
                raise ConfigError(
                    f"{scrub_userinfo(what)} failed: {_invalid_request(exc)}; fix the s3://BUCKET/PREFIX URI"
                ) from None
            code = _s3_error_code(exc)
            if code in passthrough:  # the caller handles these S3 answers
                raise
            if code in _INVALID_URI_CODES:  # the server refused the name itself: it stays refused
                raise ConfigError(
                    f"{scrub_userinfo(what)} failed: {code}: {_clean(exc)}; fix the s3://BUCKET/PREFIX URI"
                ) from None
            if time.monotonic() + delay > deadline:
                raise StorageError(
                    f"{scrub_userinfo(what)} failed after {attempt} attempts over {budget:.0f}s: "
                    f"{kind}: {_clean(exc)}; check that the storage endpoint is up, "
                    "then rerun (finished shards are kept)"
                ) from None
            log.warning("%s failed (%s); retrying in %.1fs", scrub_userinfo(what), kind, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 8.0)


# ``scheme://`` up to the LAST ``@`` of a whitespace-free token: a password may hold '/' or '@'.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*:/{1,2})\S*@")  # one '/': a URL passed through abspath


def scrub_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URL in it replaced by ``***@``.

    Everything between ``scheme://`` (or ``scheme:/``) and the last ``@`` of the whitespace-free token is removed,
    so passwords holding ``/`` or ``@`` go too (at worst a path holding ``@`` is shortened).
    """
    return _USERINFO.sub(r"\1***@", text)


def scrub_secrets(text: str, extra: Iterable[str | None] = ()) -> str:
    """``text`` without URL userinfo, the ``AWS_*`` credentials of the environment, or the
    ``extra`` secrets (an S3Options' key and secret given as flags)."""
    text = scrub_userinfo(text)
    names = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
    for val in (*(os.environ.get(n) for n in names), *extra):
        if val and len(val) >= 4:
            text = text.replace(val, "***")
    return text


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters (newlines, ANSI escapes) shown as ``\\xNN``: a name from
    storage or a plug-in's message cannot forge a line in the terminal or the logs."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def one_line(text: str) -> str:
    """A message (an exception's, a plug-in's) for a one-line error or log: its lines joined,
    credentials removed (:func:`scrub_secrets`), control characters shown (:func:`printable`)."""
    return printable(scrub_secrets(" ".join(line.strip() for line in text.splitlines() if line.strip())))


def _clean(exc: BaseException) -> str:
    return one_line(str(exc))[:300]


def _invalid_request(exc: BaseException) -> str:
    """botocore's ParamValidationError, shortened (its bucket-name message ends in long ARN regexes)."""
    return _clean(exc).replace("Parameter validation failed: ", "").split(" or be an ARN", 1)[0]


def _walk_files(root: str) -> list[str]:
    """Every file under the local folder ``root`` as POSIX paths, following symlinked folders
    (folders of links are common) but never one that leads back to a folder on its own path
    (``up -> ..``, ``self -> .``), so loops neither repeat files nor run forever.

    A folder linked from two places that do not contain each other is listed under both.
    Unreadable folders are skipped, as ``os.walk`` does.
    """

    def key(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    top = key(root)
    if top is None:
        return []
    # the (st_dev, st_ino) of each real folder on the way down to a folder still to be walked
    ancestors: dict[str, frozenset[tuple[int, int]]] = {root: frozenset([top])}
    out: list[str] = []
    for d, dirnames, files in os.walk(root, followlinks=True):
        above = ancestors.pop(d, frozenset())
        keep = []
        for name in dirnames:
            sub = os.path.join(d, name)
            k = key(sub)
            if k is None or k in above:
                continue  # vanished, or a link back to a folder on this path: a loop
            ancestors[sub] = above | {k}
            keep.append(name)
        dirnames[:] = keep
        out.extend(os.path.join(d, f).replace(os.sep, "/") for f in files)
    return out


class NotAFileError(CorruptDataError, OSError):
    """A file that raylead wrote (a manifest, a marker, metrics) is a folder now, or lies under a
    file: damaged output (exit 4). Also an OSError, as the IsADirectoryError it replaces was, for
    the callers that catch that when reading a path the user gave."""

    def __init__(self, message: str, strerror: str | None = None) -> None:
        super().__init__(message)
        self.strerror = strerror

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Location:
    """A folder or file in local storage or an S3-compatible object store."""

    uri: str
    s3: S3Options | None = None

    @classmethod
    def parse(cls, uri: str | os.PathLike[str], s3: S3Options | None = None) -> Location:
        text = os.fspath(uri)
        if not text:
            raise ConfigError("empty location: give a local folder, file:///PATH or s3://BUCKET/PREFIX")
        if text.startswith("s3://"):
            bucket = text[5:].split("/", 1)[0]
            # A bucket name never holds '@' or ':' (an access-point ARN aside): what looks like one
            # is user:password@ (a password with '/' leaves only "user:pass" before the first '/').
            if "@" in bucket or (":" in bucket and not bucket.startswith("arn:")):
                raise ConfigError(
                    "s3 URIs take no user:password@ part (credentials go in AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY or --s3-key / --s3-secret)"
                )
            if not bucket:
                raise ConfigError(f"URI {text!r} names no bucket: use s3://BUCKET/PREFIX")
            if any(seg in (".", "..") for seg in text[5:].split("/")[1:]):
                # no folders on S3: a server keeps "a/../b" as that key, or refuses it as a bad request
                raise ConfigError(f"URI {text!r} has a '.' or '..' segment: write the prefix out, e.g. s3://{bucket}/b")
            return cls(text.rstrip("/"), s3 or S3Options.from_env())
        if text.startswith("file://"):
            rest = text[7:]
            if rest.startswith("localhost/"):
                rest = rest[9:]
            if not rest.startswith("/"):  # file://host/x, or file://x meaning a relative x
                raise ConfigError(
                    f"URI {scrub_userinfo(text)!r} names a host or a relative path: use file:///ABSOLUTE/PATH "
                    "or a plain path"
                )
            text = rest
        elif "://" in text:
            raise ConfigError(f"unsupported URI scheme in {scrub_userinfo(text)!r}: use a local path, file:// or s3://")
        return cls(os.path.abspath(os.path.expanduser(text)))

    # -- basics ---------------------------------------------------------------------------
    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def fs(self) -> Any:
        if self.is_s3:
            return _s3_filesystem(self.s3 or S3Options.from_env())
        return fsspec.filesystem("file")

    @property
    def path(self) -> str:
        """The path inside :attr:`fs` (``bucket/key`` for S3)."""
        return self.uri[5:] if self.is_s3 else self.uri

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def child(self, *rel: str) -> Location:
        """A location under this one; each part is checked so it cannot escape."""
        joined = "/".join(safe_relpath(r) for r in rel)
        base = self.uri.rstrip("/")
        if self.is_s3:
            return replace(self, uri=f"{base}/{joined}")
        return replace(self, uri=os.path.join(base, *joined.split("/")))

    def parent(self) -> Location:
        if self.is_s3:
            head = self.uri.rstrip("/").rsplit("/", 1)[0]
            return replace(self, uri=head if head != "s3:/" else self.uri)
        return replace(self, uri=os.path.dirname(self.uri.rstrip("/")))

    def __str__(self) -> str:
        return self.uri

    def contains(self, other: Location) -> bool:
        """True when ``other`` is this location or under it."""
        if self.is_s3 != other.is_s3:
            return False
        a = self.uri.rstrip("/") + "/"
        b = other.uri.rstrip("/") + "/"
        return b.startswith(a)

    def arrow_fs(self) -> Any:
        """A pyarrow FileSystem for pyarrow.parquet and Ray Data."""
        import pyarrow.fs as pafs

        if self.is_s3:
            return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))
        return pafs.LocalFileSystem()

    # -- queries --------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(retry_io(lambda: self.fs.exists(self.path), f"checking {self.uri}"))

    def is_dir(self) -> bool:
        return bool(retry_io(lambda: self.fs.isdir(self.path), f"checking {self.uri}"))

    def size(self) -> int:
        return int(retry_io(lambda: self.fs.size(self.path), f"reading size of {self.uri}"))

    def list_files(self, extensions: Iterable[str] | None = None) -> list[str]:
        """Every file under this folder, as sorted POSIX paths relative to it.

        ``extensions`` (lower-case, with dot) filters by suffix, case-insensitively.
        """
        exts = tuple(e.lower() for e in extensions) if extensions is not None else None
        root = self.path.rstrip("/")

        def _find() -> list[str]:
            if self.is_s3:
                self.fs.invalidate_cache()
                return list(self.fs.find(root, withdirs=False))
            return _walk_files(root)

        found = retry_io(_find, f"listing {self.uri}")
        out = []
        for full in found:
            full = full[5:] if full.startswith("s3://") else full
            if not full.startswith(root + "/"):
                continue
            rel = full[len(root) + 1 :]
            if exts is None or rel.lower().endswith(exts):
                out.append(rel)
        return sorted(out)

    # -- reads ----------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        def _read() -> bytes:
            if not self.is_s3 and not stat.S_ISREG(os.stat(self.path).st_mode) and not os.path.isdir(self.path):
                # a FIFO would block the read forever, a socket or device is no file to read
                raise OSError(errno.ENXIO, "not a regular file", self.path)
            with self.fs.open(self.path, "rb") as fh:
                return bytes(fh.read())

        return retry_io(_read, f"reading {self.uri}")

    def read_ranges(self, starts: list[int], ends: list[int]) -> list[bytes]:
        """The byte ranges ``[start, end)`` of this file (concurrent range requests on S3)."""

        def _read() -> list[bytes]:
            if self.is_s3:
                got = self.fs.cat_ranges([self.path] * len(starts), starts, ends, on_error="raise")
                return [bytes(g) for g in got]
            out = []
            with open(self.path, "rb") as fh:
                for a, b in zip(starts, ends, strict=True):
                    fh.seek(a)
                    out.append(fh.read(b - a))
            return out

        return retry_io(_read, f"reading {self.uri}") if starts else []

    def sha256(self) -> str:
        """The SHA-256 of this file, read in 16 MiB pieces (never held whole in memory)."""

        def _hash() -> str:
            h = hashlib.sha256()
            with self.fs.open(self.path, "rb") as fh:
                for piece in iter(lambda: fh.read(16 << 20), b""):
                    h.update(piece)
            return h.hexdigest()

        return retry_io(_hash, f"reading {self.uri}")

    def download(self, local_path: str) -> None:
        """Copy this file to ``local_path`` without holding it in memory."""
        if not self.is_s3:
            shutil.copyfile(self.path, local_path)
            return
        retry_io(lambda: self.fs.get_file(self.path, local_path), f"reading {self.uri}")

    def read_json(self) -> Any:
        return self.read_json_and_sha256()[0]

    def read_json_and_sha256(self) -> tuple[Any, str]:
        """The JSON value and the SHA-256 (hex) of the bytes it was parsed from: one read, so the
        digest always describes the value (a manifest rewritten between two reads cannot split them).

        A folder where the file should be is a :class:`NotAFileError` (a CorruptDataError, and
        still the OSError that a caller reading a path it was given catches)."""
        try:
            data = self.read_bytes()
        except (IsADirectoryError, NotADirectoryError) as exc:
            what = "is a folder" if isinstance(exc, IsADirectoryError) else "lies under a file, not a folder"
            raise NotAFileError(
                f"{self.uri} {what}, not a JSON file: it is damaged; remove it and rerun the step that wrote it",
                exc.strerror,
            ) from None
        try:
            return json.loads(data.decode("utf-8")), hashlib.sha256(data).hexdigest()
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptDataError(
                f"{self.uri} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); it is damaged: "
                "rerun the step that wrote it"
            ) from None

    # -- writes ---------------------------------------------------------------------------
    def makedirs(self) -> None:
        if self.is_s3:
            return
        _makedirs_private(self.path)

    def write_bytes(self, data: bytes) -> None:
        """Write atomically: temp name + ``os.replace`` locally, one PUT on S3."""
        if self.is_s3:
            retry_io(lambda: self.fs.pipe_file(self.path, data), f"writing {self.uri}")
            return
        self._write_local(lambda fh: fh.write(data))

    def etag(self) -> str | None:
        """S3 only: the object's current ETag (None when it does not exist), for
        :meth:`write_bytes_if`."""
        if not self.is_s3:
            raise ValueError(f"etag() is for s3:// objects, not {self.uri}")

        def _head() -> str | None:
            try:
                return str(self.fs.info(self.path, refresh=True)["ETag"])
            except FileNotFoundError:
                return None

        return retry_io(_head, f"checking {self.uri}")

    def write_bytes_if(self, data: bytes, etag: str | None) -> bool:
        """S3 only: one PUT that lands only if the object is still the version ``etag`` names
        (None: only if there is none yet). False when another writer changed it first: read it
        again and retry. A server without conditional writes makes this a plain PUT."""
        if not self.is_s3:
            raise ValueError(f"write_bytes_if() is for s3:// objects, not {self.uri}")
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        if len(data) >= _SINGLE_PUT_MAX:
            raise StorageError(f"{scrub_userinfo(self.uri)}: {len(data)} bytes is too large for one conditional PUT")
        try:
            retry_io(  # one PUT: s3fs's multipart upload would drop the condition (from 100 MiB)
                lambda: self.fs.pipe_file(self.path, data, chunksize=_SINGLE_PUT_MAX, **condition),
                f"writing {self.uri}",
                passthrough=frozenset({"PreconditionFailed", "NotImplemented"}),
            )
        except OSError as exc:
            code = _s3_error_code(exc)
            if code == "PreconditionFailed":
                return False
            if code != "NotImplemented":
                raise
            log.warning("%s: the S3 server has no conditional writes; writing without", scrub_userinfo(self.uri))
            self.write_bytes(data)
        return True

    def write_file(self, local_path: str) -> None:
        """Publish the local file ``local_path`` here atomically, without holding it in memory:
        copied to a temp name + ``os.replace`` locally, one (multipart) upload on S3."""
        if self.is_s3:
            retry_io(lambda: self.fs.put_file(local_path, self.path), f"writing {self.uri}")
            return

        def copy(fh: Any) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, fh, 16 << 20)

        self._write_local(copy)

    def _write_local(self, write: Callable[[Any], Any]) -> None:
        directory = os.path.dirname(self.path)
        _makedirs_private(directory)
        tmp = os.path.join(directory, f".{os.path.basename(self.path)}.tmp-{uuid.uuid4().hex[:12]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def write_json(self, obj: Any) -> None:
        self.write_bytes((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def remove(self) -> None:
        def _rm() -> None:
            if self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=True)

        retry_io(_rm, f"removing {self.uri}")

    def check_reachable(self, *, write: bool) -> None:
        """Fail fast (before any work) when the bucket/folder cannot be used.

        For S3 this lists the bucket (and for ``write`` puts and deletes a probe object)
        and turns any failure into one line that names the URI and the fix.
        """
        if not self.is_s3:
            if write:
                try:
                    self.makedirs()
                    probe = self.child(f".raylead-probe-{uuid.uuid4().hex[:8]}")
                    probe.write_bytes(b"")
                    os.unlink(probe.path)
                except OSError as exc:
                    raise StorageError(
                        f"cannot write to {self.uri}: {exc.strerror}; choose a writable --out folder"
                    ) from None
            elif not os.path.exists(self.path):
                raise ConfigError(f"{self.uri} does not exist; give an existing folder or file")
            return
        bucket = self.path.split("/", 1)[0]
        endpoint = scrub_userinfo((self.s3.endpoint_url if self.s3 else None) or "the default AWS endpoint")
        try:
            self.fs.ls(bucket, refresh=True)
            if write:
                probe = self.child(f".raylead-probe-{uuid.uuid4().hex[:8]}")
                self.fs.pipe_file(probe.path, b"")
                self.fs.rm(probe.path)
        except PermissionError:
            raise StorageError(
                f"access to s3://{bucket} at {endpoint} was refused; check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or --s3-key/--s3-secret) and the bucket policy"
            ) from None
        except FileNotFoundError:
            raise StorageError(
                f"bucket s3://{bucket} does not exist at {endpoint}; create it or fix the URI"
            ) from None
        except Exception as exc:  # botocore raises many unrelated types for a dead endpoint
            if type(exc).__name__ == "ParamValidationError":  # e.g. an invalid bucket name
                raise ConfigError(
                    f"s3://{bucket} cannot be used: {_invalid_request(exc)}; fix the s3://BUCKET/PREFIX URI"
                ) from None
            raise StorageError(
                f"cannot reach s3://{bucket} at {endpoint} ({type(exc).__name__}: {_clean(exc)}); "
                "check AWS_ENDPOINT_URL / --s3-endpoint and the network"
            ) from None

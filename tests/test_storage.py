"""Storage: URI parsing, safe relative paths, atomic writes, listing, S3 against a real server."""

from __future__ import annotations

import hashlib
import os
import pickle
import stat

import pytest

from raylead.errors import ConfigError, CorruptDataError, PathEscapeError, StorageError
from raylead.storage import IMAGE_EXTENSIONS, Location, S3Options, safe_relpath

ESCAPES = [
    "../x.parquet",
    "a/../../x",
    "/etc/passwd",
    "s3://other-bucket/x",
    "file:///etc/passwd",
    "C:\\windows",
    "\\\\server\\share",
    "",
    ".",
    "a/..",
    "x\x00y",
]


@pytest.mark.parametrize("rel", ESCAPES)
def test_safe_relpath_rejects_escapes(rel: str) -> None:
    with pytest.raises(PathEscapeError):
        safe_relpath(rel)


@pytest.mark.parametrize(
    ("rel", "norm"), [("a/b.jpg", "a/b.jpg"), ("./a//b.jpg", "a/b.jpg"), ("a/./b", "a/b")]
)
def test_safe_relpath_normalises(rel: str, norm: str) -> None:
    assert safe_relpath(rel) == norm


def test_parse_rejects_unknown_scheme_and_empty() -> None:
    with pytest.raises(ConfigError, match="gs://"):
        Location.parse("gs://bucket/x")
    with pytest.raises(ConfigError):
        Location.parse("")
    with pytest.raises(ConfigError, match="no bucket"):
        Location.parse("s3:///x")


def test_parse_file_uris_and_s3_dot_segments(tmp_path, monkeypatch) -> None:
    """`file://localhost/ABS` was taken as the relative path `localhost/ABS` (a job's output landed
    under Ray's temporary working dir); `s3://b/a/../c` reached the server as a key with '..'."""
    monkeypatch.chdir(tmp_path)
    assert Location.parse("file:///data/x").uri == "/data/x"
    assert Location.parse("file://localhost/data/x").uri == "/data/x"
    for text in ("file://otherhost/data/x", "file://data/x", "file://"):
        with pytest.raises(ConfigError, match="names a host or a relative path: use file:///ABSOLUTE/PATH"):
            Location.parse(text)
    for text in ("s3://raylead/tenant-a/../tenant-b/sc", "s3://raylead/./x", "s3://raylead/.."):
        with pytest.raises(ConfigError, match="has a '.' or '..' segment: write the prefix out"):
            Location.parse(text)
    assert Location.parse("s3://raylead/a..b/.hidden/x").uri == "s3://raylead/a..b/.hidden/x"


def test_local_atomic_write_list_and_owner_only(tmp_path) -> None:
    root = Location.parse(f"file://{tmp_path}/out")
    root.child("a", "x.JPG").write_bytes(b"1")
    root.child("b.png").write_bytes(b"2")
    root.child("notes.txt").write_bytes(b"3")
    root.child("c.jfif").write_bytes(b"4")  # JPEG under its other names is an image too
    root.child("d.JPE").write_bytes(b"5")
    assert root.list_files(IMAGE_EXTENSIONS) == ["a/x.JPG", "b.png", "c.jfif", "d.JPE"]
    assert root.list_files() == ["a/x.JPG", "b.png", "c.jfif", "d.JPE", "notes.txt"]
    mode = stat.S_IMODE(os.stat(root.child("b.png").path).st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(root.path).st_mode) == 0o700
    # no temporary files are left behind
    assert not [n for n in os.listdir(root.path) if ".tmp-" in n]
    with pytest.raises(PathEscapeError):
        root.child("../escape")
    # a local file published here: the same bytes, owner-only, replacing what was there
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 << 20))  # larger than one copy chunk
    root.child("b.png").write_file(str(big))
    assert root.child("b.png").read_bytes() == big.read_bytes()
    assert stat.S_IMODE(os.stat(root.child("b.png").path).st_mode) == 0o600
    assert not [n for n in os.listdir(root.path) if ".tmp-" in n]
    with pytest.raises(FileNotFoundError):
        root.child("c.png").write_file(str(tmp_path / "missing.bin"))
    assert not root.child("c.png").exists() and not [n for n in os.listdir(root.path) if ".tmp-" in n]
    # hashed and copied in pieces: the same digest as hashing the bytes at once
    assert root.child("b.png").sha256() == hashlib.sha256(big.read_bytes()).hexdigest()
    root.child("b.png").download(str(tmp_path / "copy.bin"))
    assert (tmp_path / "copy.bin").read_bytes() == big.read_bytes()


def test_json_that_is_a_folder_empty_or_under_a_file_is_a_one_line_corrupt_data_error(tmp_path) -> None:
    """manifest.json, index.json or metrics.json as a folder raised IsADirectoryError (a traceback,
    exit 1); an empty one said only "not valid JSON (Expecting value)", with no fix."""
    root = Location.parse(str(tmp_path))
    os.mkdir(tmp_path / "manifest.json")
    for read in (root.child("manifest.json").read_json, root.child("manifest.json").read_json_and_sha256):
        with pytest.raises(CorruptDataError, match=r"manifest\.json is a folder, not a JSON file: .*rerun the step"):
            read()
    # still the OSError it replaces, for a caller reading a path the user gave (a --threshold-from folder)
    with pytest.raises(OSError) as caught:
        root.child("manifest.json").read_json()
    assert caught.value.strerror == "Is a directory" and "\n" not in str(caught.value)
    (tmp_path / "file").write_bytes(b"{}")
    with pytest.raises(CorruptDataError, match=r"file/index\.json lies under a file, not a folder, not a JSON file"):
        root.child("file", "index.json").read_json()
    (tmp_path / "metrics.json").write_bytes(b"")
    with pytest.raises(CorruptDataError, match=r"metrics\.json is not valid JSON \(Expecting value\); .*rerun"):
        root.child("metrics.json").read_json()
    with pytest.raises(FileNotFoundError):  # absent stays absent: callers test exists() or catch this
        root.child("absent.json").read_json()


def test_contains() -> None:
    assert Location.parse("/data/in").contains(Location.parse("/data/in/out"))
    assert not Location.parse("/data/in").contains(Location.parse("/data/input"))
    assert Location.parse("s3://b/in").contains(Location.parse("s3://b/in/x"))
    assert not Location.parse("s3://b/in").contains(Location.parse("/b/in/x"))


def test_secrets_hidden_from_repr_and_env_pickles() -> None:
    opts = S3Options(endpoint_url="http://x", access_key="AKIA-PLANTED", secret_key="SECRET-PLANTED")
    assert "PLANTED" not in repr(opts)
    env_opts = S3Options.from_env()
    assert b"PLANTED" not in pickle.dumps(env_opts)


def test_missing_s3_credentials_fail_at_once(s3_server, monkeypatch, caplog) -> None:
    """No credentials anywhere is permanent: one clear error, no retries with backoff."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")  # nor a profile on this machine
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    loc = Location.parse("s3://raylead/storage-test/a.jpg", S3Options(endpoint_url=s3_server.endpoint))
    with caplog.at_level("WARNING", logger="raylead.storage"), pytest.raises(StorageError) as info:
        loc.exists()
    assert "no S3 credentials were found; set AWS_ACCESS_KEY_ID" in str(info.value)
    assert "\n" not in str(info.value)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_s3_roundtrip_listing_and_errors(s3_server, tmp_path) -> None:
    root = Location.parse("s3://raylead/storage-test")
    root.check_reachable(write=True)
    root.child("faces", "a.jpg").write_bytes(b"abc")
    root.child("faces", "b.txt").write_bytes(b"no")
    assert root.list_files(IMAGE_EXTENSIONS) == ["faces/a.jpg"]
    assert root.child("faces", "a.jpg").read_bytes() == b"abc"
    local = tmp_path / "part.bin"
    local.write_bytes(os.urandom(12 << 20))  # above s3fs's multipart threshold
    root.child("big.bin").write_file(str(local))
    assert root.child("big.bin").read_bytes() == local.read_bytes()
    assert root.child("big.bin").sha256() == hashlib.sha256(local.read_bytes()).hexdigest()
    root.child("big.bin").download(str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
    with pytest.raises(StorageError, match="does not exist"):
        Location.parse("s3://no-such-bucket/x").check_reachable(write=False)
    wrong = S3Options(endpoint_url=s3_server.endpoint, access_key="wrong", secret_key="wrong-secret-value")
    with pytest.raises(StorageError) as info:
        Location.parse("s3://raylead/x", wrong).check_reachable(write=True)
    assert "wrong-secret-value" not in str(info.value)
    dead = S3Options(endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="b")
    with pytest.raises(StorageError, match="cannot reach"):
        Location.parse("s3://raylead/x", dead).check_reachable(write=False)


# -- credentials in URIs and endpoints are refused or scrubbed, never echoed ----------------------
@pytest.mark.parametrize(
    "uri",
    [
        "s3://AKIAPLANTED:TopSecretPw@bucket/ckpts/step-1.pt",
        "s3://AKIAPLANTED:Top/SecretPw@bucket/x",  # a '/' in the password: the "bucket" is AKIA...:Top
        "s3://AKIAPLANTED:Top@Secret@Pw@bucket",
        "s3://AKIAPLANTED@bucket/x",
    ],
)
def test_s3_uri_with_userinfo_is_refused_without_echo(uri: str) -> None:
    with pytest.raises(ConfigError) as info:
        Location.parse(uri)
    msg = str(info.value)
    assert "AKIAPLANTED" not in msg and "Secret" not in msg and "Top" not in msg
    assert "\n" not in msg and "--s3-key / --s3-secret" in msg and "AWS_SECRET_ACCESS_KEY" in msg


def test_s3_uris_that_only_look_like_userinfo_still_parse() -> None:
    assert Location.parse("s3://bucket/people/jo@example.com/x.jpg").uri == "s3://bucket/people/jo@example.com/x.jpg"
    assert Location.parse("s3://bucket/a:b/c").path == "bucket/a:b/c"


def test_unsupported_scheme_error_hides_userinfo() -> None:
    with pytest.raises(ConfigError, match="unsupported URI scheme") as info:
        Location.parse("https://someone:Pa/ss@w0rd@example.com/data")
    assert "someone" not in str(info.value) and "Pa/ss" not in str(info.value) and "w0rd" not in str(info.value)


def test_invalid_bucket_name_is_permanent(monkeypatch, caplog) -> None:
    """botocore's ParamValidationError cannot heal by waiting: one clear error, no retries."""
    monkeypatch.setenv("RAYLEAD_IO_RETRY_SECONDS", "3")
    dead = S3Options(endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="b")
    loc = Location.parse("s3://bad!bucket/x", dead)
    with caplog.at_level("WARNING", logger="raylead.storage"):
        for call in (loc.exists, loc.list_files, lambda: loc.check_reachable(write=False)):
            with pytest.raises(ConfigError) as info:
                call()
            msg = str(info.value)
            assert 'Invalid bucket name "bad!bucket"' in msg and "fix the s3://BUCKET/PREFIX URI" in msg, msg
            assert "\n" not in msg and "ARN" not in msg
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_a_bucket_name_the_server_refuses_is_permanent(s3_server, monkeypatch, caplog) -> None:
    """`s3://My_Bucket` passes botocore's own check; the server's InvalidBucketName was retried
    for the whole retry budget as if the endpoint were down."""
    monkeypatch.setenv("RAYLEAD_IO_RETRY_SECONDS", "30")
    opts = S3Options(endpoint_url=s3_server.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    loc = Location.parse("s3://My_Bucket/out/a.json", opts)
    with caplog.at_level("WARNING", logger="raylead.storage"), pytest.raises(ConfigError) as info:
        loc.write_json({})
    msg = str(info.value)
    assert "InvalidBucketName" in msg and "fix the s3://BUCKET/PREFIX URI" in msg and "\n" not in msg, msg
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_endpoint_userinfo_is_scrubbed_from_reachability_errors() -> None:
    opts = S3Options(endpoint_url="http://minioadmin:Endpoint/Pw@123@127.0.0.1:9", access_key="a", secret_key="b")
    with pytest.raises(StorageError) as info:
        Location.parse("s3://bucket/out", opts).check_reachable(write=True)
    msg = str(info.value)
    assert "minioadmin" not in msg and "Endpoint/Pw" not in msg and "Pw@123" not in msg, msg
    assert "http://***@127.0.0.1:9" in msg and "\n" not in msg


# -- symlinked folders: followed, but a link back up the tree is not a loop ----------------------
@pytest.mark.timeout(30)  # two self-links made the unguarded walk run (practically) forever
def test_list_files_survives_symlink_loops_and_keeps_linked_folders(tmp_path) -> None:
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_bytes(b"x")
    (root / "a" / "up").symlink_to("..")  # back to root
    (root / "self").symlink_to(".")
    (root / "again").symlink_to(".")
    (root / "a" / "deeper").symlink_to("../a")  # back to a itself
    (other / "sub").mkdir(parents=True)
    (other / "sub" / "y.png").write_bytes(b"y")
    (other / "sub" / "top").symlink_to("..")  # a loop inside the linked folder
    (root / "linked").symlink_to(other)  # links into other folders keep working...
    (root / "linked-too").symlink_to(other / "sub")  # ...also the same folder from two places
    assert Location.parse(str(root)).list_files(IMAGE_EXTENSIONS) == [
        "a/x.jpg",
        "linked-too/y.png",
        "linked/sub/y.png",
    ]
    # the root itself may be a link, and a missing root lists nothing
    (tmp_path / "via").symlink_to(root)
    assert Location.parse(str(tmp_path / "via")).list_files(IMAGE_EXTENSIONS)[0] == "a/x.jpg"
    assert Location.parse(str(tmp_path / "nowhere")).list_files() == []

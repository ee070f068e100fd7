"""The Ray job entrypoints in jobs/: YAML → the same config objects as the CLI → the stage."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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
              "out": str(tmp_path / "idiap"), "top_k": 8, "report": str(tmp_path / "report.html"), "redact": True}
    done = _run("attack", attack, tmp_path, env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "idiap" / "metrics.json").exists() and "idiap" in done.stdout
    # report: FILE.html (as --report): the evidence report of these results, redacted as asked
    assert f"report: {tmp_path / 'report.html'}" in done.stdout
    html = (tmp_path / "report.html").read_text()
    assert "idiap" in html and "Faces are redacted (pixelated and blurred)" in html
    # jobs/report.py: the same report from the results folder, as `raylead report` writes it
    done = _run("report", {"results": str(tmp_path / "idiap"), "out": str(tmp_path / "again.html")}, tmp_path, env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"report: {tmp_path / 'again.html'} (idiap; ") and "plots as PNG" in done.stdout
    assert "Faces are redacted" not in (tmp_path / "again.html").read_text()
    # a report that fails at the end (its folder is a file) keeps the attack's lines: the results stand
    (tmp_path / "afile").write_text("")
    done = _run("attack", {**attack, "report": str(tmp_path / "afile" / "r.html"), "redact": False}, tmp_path, env)
    assert done.returncode != 0 and "top 8 pairs" in done.stdout, (done.stdout, done.stderr[-2000:])


def test_job_config_errors_are_one_line(tmp_path) -> None:
    done = _run("embed", {"source": "x", "out": "y", "batch_sise": 2}, tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "batch_sise" in done.stderr
    done = _run("attack", {"attack": "nope"}, tmp_path)
    assert done.returncode == 2 and "nope" in done.stderr
    done = _run("embed", {"source": "x", "out": "y", "s3": {"secret_key": "k"}}, tmp_path)
    assert done.returncode == 2 and "'s3'" in done.stderr  # credentials never come from config files


EXIT_ABORT = """
import atexit, ctypes, runpy, sys
libc = ctypes.CDLL("libc.so.6")
libc.__cxa_atexit(libc.abort, None, None)  # a native teardown that aborts, as pyarrow's may
marker, entry, *argv = sys.argv[1:]
atexit.register(lambda: open(marker, "w").write("atexit ran"))
sys.argv = [entry, *argv]
if entry == "raylead":
    from raylead.cli import main
    main()
elif entry == "plain-exit":
    print("plain", flush=True)
    sys.exit(0)
elif entry == "buggy-job":  # a job entrypoint whose stage has a bug
    from dataclasses import make_dataclass
    from raylead.jobs import run_job
    from raylead.runtime import exit_process
    def stage(job):
        raise RuntimeError("a bug")
    exit_process(run_job("buggy", make_dataclass("Job", [("source", str), ("out", str)]), stage, argv))
else:
    runpy.run_path(entry, run_name="__main__")
"""


@pytest.mark.parametrize(
    ("entry", "argv", "code", "says"),
    [
        ("plain-exit", [], -6, "plain"),  # the stand-in aborts a normal interpreter exit
        ("raylead", ["index", "--help"], 0, "Usage: raylead index"),
        ("raylead", ["search", "{tmp}/nowhere", "--index", "{tmp}/nope", "--k", "3", "--out", "{tmp}/o"], 2,
         "has no manifest.json"),
        ("raylead", ["index", "build", "--no-such-option"], 2, "No such option"),
        ("jobs/embed.py", ["--config", "{tmp}/embed.yaml"], 2, "raylead embed: error:"),
        ("jobs/embed.py", [], 2, "the following arguments are required: --config"),
        ("buggy-job", ["--config", "{tmp}/embed.yaml"], 1, "raylead buggy: internal error: RuntimeError: a bug"),
    ],
)
def test_a_native_abort_at_exit_cannot_change_the_exit_code(tmp_path, entry, argv, code, says) -> None:
    """pyarrow may abort the interpreter after the work is done ("terminate called without an
    active exception", apache/arrow#34314; once in ~20 runs of `raylead audit run` in CI). A C exit
    handler that calls abort() stands in for it on every run: the console script and the Ray job
    entrypoints still exit with their command's own code, after Python's atexit functions ran and
    their output was flushed."""
    embed = {"source": str(tmp_path / "nowhere"), "out": str(tmp_path / "o")}
    (tmp_path / "embed.yaml").write_text(yaml.safe_dump(embed))
    marker = tmp_path / "atexit.txt"
    entry = str(REPO / entry) if entry.endswith(".py") else entry
    args = [a.format(tmp=tmp_path) for a in argv]
    done = subprocess.run([sys.executable, "-c", EXIT_ABORT, str(marker), entry, *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == code, done.stderr[-1000:]
    assert says in done.stdout + done.stderr
    assert marker.read_text() == "atexit ran"


def test_a_bug_in_a_job_stage_is_exit_1_with_its_traceback_and_one_last_line(tmp_path, capsys) -> None:
    """A job's unexpected exception is not a RayleadError: the traceback (for the bug report) and a
    last line saying what failed, exit code 1 returned to the entrypoint (which then ends through
    exit_process) instead of an exception escaping into the interpreter's teardown."""
    from dataclasses import dataclass

    from raylead.jobs import run_job

    @dataclass
    class Job:
        size: int

    def stage(job: Job) -> str:
        return str(1 // (job.size - 3))

    config = tmp_path / "job.yaml"
    config.write_text("size: 3\n")
    assert run_job("demo", Job, stage, ["--config", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    says = "ZeroDivisionError: integer division or modulo by zero"
    assert "Traceback (most recent call last):" in err and says in err
    assert err[-1] == f"raylead demo: internal error: {says} (traceback above)"
    config.write_text("size: 4\n")
    assert run_job("demo", Job, stage, ["--config", str(config)]) == 0
    assert capsys.readouterr().out == "1\n"
    assert run_job("demo", Job, stage, ["--help"]) == 0
    assert "--config CONFIG" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["embed", "./x"], "raylead embed: error: Missing option '--out' / '-o'. (see 'raylead embed --help')"),
        (["index", "build", "e", "--no-such-option"],
         "raylead index build: error: No such option: --no-such-option (see 'raylead index build --help')"),
        (["nosuch"], "raylead: error: No such command 'nosuch'. (see 'raylead --help')"),
        (["bench", "embed", "--matcher", "onnx"],
         "raylead bench embed: error: Missing option '--images'. (see 'raylead bench embed --help')"),
    ],
)
def test_cli_usage_errors_are_one_line_naming_the_help(monkeypatch, capsys, argv, line) -> None:
    """A bad option or argument is one line on stderr (the README's promise), exit code 2, naming
    the command whose --help explains it; nothing on stdout."""
    from raylead.cli import run

    monkeypatch.setattr(sys, "argv", ["raylead", *argv])
    assert run() == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [line] and out == ""


@pytest.mark.parametrize("argv", [[], ["attack"], ["index"]])
def test_a_group_without_its_command_shows_its_help_and_no_error_line(monkeypatch, capsys, argv) -> None:
    from raylead.cli import run

    monkeypatch.setattr(sys, "argv", ["raylead", *argv])
    assert run() == 2
    out, err = capsys.readouterr()
    assert f"Usage: {' '.join(['raylead', *argv])} [OPTIONS] COMMAND [ARGS]..." in out + err
    assert "error:" not in out + err


def _job_module(kind: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"raylead_job_{kind}", REPO / "jobs" / f"{kind}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


M = "../shared/data/models"


@pytest.mark.parametrize(
    ("kind", "flags", "fields"),
    [
        ("index",
         {"embeddings": "e", "out": "o", "memory_budget": "8GiB", "shard_max": "500MB", "local": True, "shards": 4},
         {"embeddings": "e", "out": "o", "memory_budget_bytes": 8 * 2**30, "shard_max_bytes": 500 * 10**6,
          "executor": "local", "shards": 4}),
        ("index", {"embeddings": "e", "out": "o", "memory_budget": 1000000, "local": False},
         {"embeddings": "e", "out": "o", "memory_budget_bytes": 1000000, "executor": "ray"}),
        ("attack",
         {"attack": "idiap", "train": "t", "synthetic": "s", "out": "o", "matcher": "onnx",
          "model": f"{M}/m.onnx", "detector": f"{M}/d.onnx", "top_k": 7},
         {"attack": "idiap", "train": "t", "synthetic": "s", "out": "o",
          "matcher": f"onnx:model={M}/m.onnx:detector={M}/d.onnx", "top_k": 7}),
        ("attack", {"attack": "webster", "queries": "q", "samples": "s", "out": "o", "alpha": "1,3",
                    "matcher": "onnx", "model_root": "/models", "pack": "buffalo_l"},
         {"attack": "webster", "queries": "q", "samples": "s", "out": "o", "alphas": [1, 3],
          "matcher": "onnx:model_root=/models:pack=buffalo_l"}),
        ("attack", {"attack": "webster", "queries": "q", "samples": "s", "out": "o", "alpha": [2, 4.5]},
         {"attack": "webster", "queries": "q", "samples": "s", "out": "o", "alphas": [2, 4.5]}),
        ("attack",
         {"attack": "tinsley", "train": "t", "holdout": "h", "synthetic": "s", "out": "o", "matchers": "dlib,onnx",
          "threshold": "dlib=0.6,onnx=0.4", "train_index": "dlib=s3://b/idx"},
         {"attack": "tinsley", "train": "t", "holdout": "h", "synthetic": "s", "out": "o", "matchers": "dlib,onnx",
          "thresholds": {"dlib": 0.6, "onnx": 0.4}, "train_index": {"dlib": "s3://b/idx"}}),
        ("audit", {"generator": "folder", "train_index": "i", "out": "o", "checkpoint": "c", "threshold": 0.5,
                   "option": ["max_pixels=1000000"], "triage": "json:loads", "triage_option": "min_age=18"},
         {"generator": "folder", "train_index": "i", "out": "o", "checkpoint": "c", "threshold": 0.5,
          "generator_options": {"max_pixels": 1000000}, "triage": "json:loads",
          "triage_options": {"min_age": 18}}),
    ],
)
def test_job_yaml_takes_the_flag_spellings_of_the_cli(kind, flags, fields) -> None:
    """The docs promise "keys are the options of the matching raylead command": a job YAML that
    spells an option as the CLI flag (memory_budget: 8GiB, model: F.onnx, alpha: 1,3,
    threshold: dlib=0.6) builds the same validated config as one spelled as the config's fields."""
    module = _job_module(kind)

    def config(data):
        if kind == "attack":
            return module.prepare(module.AttackJob(**module.from_yaml(data)))[0]
        if kind == "index":
            from raylead.config import from_mapping
            from raylead.index import IndexBuildConfig

            return from_mapping(IndexBuildConfig, module.from_yaml(data)["options"])
        from raylead.audit import AuditConfig
        from raylead.config import from_mapping

        return from_mapping(AuditConfig, module.from_yaml(data))

    assert config(flags) == config(fields)


@pytest.mark.parametrize(
    ("kind", "data", "says"),
    [
        ("index", {"embeddings": "e", "out": "o", "memory_budget": "8GiB", "memory_budget_bytes": 9},
         "give memory_budget or memory_budget_bytes, not both"),
        ("index", {"embeddings": "e", "out": "o", "memory_budget": "lots"}, "memory_budget='lots' is not a size"),
        ("index", {"embeddings": "e", "out": "o", "local": "yes"}, "local must be true or false"),
        ("attack", {"attack": "webster", "queries": "q", "samples": "s", "out": "o", "alpha": "x"},
         "cannot read --alpha 'x'"),
        ("attack", {"attack": "tinsley", "train": "t", "holdout": "h", "synthetic": "s", "out": "o",
                    "threshold": "dlib=0.6", "thresholds": {"dlib": 0.6}}, "give threshold or thresholds, not both"),
        ("attack", {"attack": "idiap", "train": "t", "synthetic": "s", "out": "o", "redact": True},
         "redact applies to the report"),
        ("attack", {"attack": "idiap", "train": "t", "synthetic": "s", "out": "o", "redact": "yes",
                    "report": "r.html"}, "redact must be true or false, got 'yes'"),
        # the flat key used to win silently over the spec's; the docs say giving both is refused
        ("attack", {"attack": "idiap", "train": "t", "synthetic": "s", "out": "o", "matcher": "onnx:model=/a.onnx",
                    "model": "/b.onnx"}, "give model: or model= inside matcher: 'onnx:model=/a.onnx', not both"),
        ("calibrate", {"labelled": "l", "out": "o.json", "matcher": "onnx:detector=/d.onnx", "detector": "/e.onnx"},
         "give detector: or detector= inside matcher:"),
        # a report URI the write would refuse, refused before the attack runs (train 't' does not exist)
        ("attack", {"attack": "idiap", "train": "t", "synthetic": "s", "out": "o",
                    "report": "s3://AKIAX:topsecret@bucket/r.html"}, "s3 URIs take no user:password@ part"),
        ("attack", {"attack": "idiap", "train": "t", "synthetic": "s", "out": "o", "report": "gs://b/r.html"},
         "unsupported URI scheme in 'gs://b/r.html'"),
        ("audit", {"generator": "folder", "train_index": "i", "out": "o", "option": ["steps"]},
         "--option 'steps' is not KEY=VALUE"),
    ],
)
def test_job_yaml_flag_spellings_are_checked(tmp_path, kind, data, says) -> None:
    done = _run(kind, data, tmp_path)
    assert done.returncode == 2, done.stderr[-1000:]
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and says in done.stderr
    assert "topsecret" not in done.stderr + done.stdout


def test_credentials_in_a_matcher_path_never_reach_the_error_line(tmp_path, monkeypatch, capsys) -> None:
    """A model path with user:password@ came back whole in the "not found" error, from the jobs
    and from the CLI (stderr, and on a cluster Ray's job logs)."""
    from raylead.cli import run

    (tmp_path / "faces").mkdir()
    for model in ("https://user:hunter2@host/m.onnx", "s3://AKIAXXXX:wJalrSECRET@bucket/w600k.onnx"):
        done = _run("attack", {"attack": "idiap", "train": str(tmp_path), "synthetic": str(tmp_path),
                               "out": str(tmp_path / "o"), "matcher": f"onnx:model={model}"}, tmp_path)
        assert done.returncode == 2 and "not found" in done.stderr, done.stderr[-1000:]
        assert "hunter2" not in done.stderr + done.stdout and "wJalrSECRET" not in done.stderr + done.stdout
        monkeypatch.setattr(sys, "argv", ["raylead", "embed", str(tmp_path / "faces"), "--matcher", "onnx",
                                          "--model", model, "--out", str(tmp_path / "emb")])
        assert run() == 2
        out, err = capsys.readouterr()
        assert "not found" in err and "***@" in err and len(err.strip().splitlines()) == 1
        assert "hunter2" not in out + err and "wJalrSECRET" not in out + err


def test_search_and_calibrate_jobs(tmp_path, write_collection, small_indexes, clustered_small) -> None:
    """jobs/search.py and jobs/calibrate.py run their commands from YAML (flag spellings accepted):
    the search's results equal exact brute force, the calibration equals the CLI's on the same set;
    a rerun of the search finds its results complete; credentials in the file are refused."""
    import json

    import numpy as np
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from raylead import exact
    from raylead.cli import app

    c = clustered_small
    q = c.queries[:60]
    coll = write_collection(tmp_path / "q", [f"q{i}" for i in range(60)], [None] * 60, q)
    search = {"queries": coll, "index": small_indexes[4], "out": str(tmp_path / "s"), "k": 5,
              "engine": "exact", "local": True, "query_block": 25, "pairs": 20}
    done = _run("search", search, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"results: {tmp_path / 's'} (results.parquet, pairs.parquet)" in done.stdout
    _, i = exact.exact_search(q, c.base, 5)
    t = pq.read_table(tmp_path / "s" / "results.parquet")
    assert t.column("target_id").to_pylist() == [f"img{j:05d}" for j in i.ravel().tolist()]
    done = _run("search", search, tmp_path)
    assert done.returncode == 0 and "already holds these results: nothing to do" in done.stdout
    done = _run("search", {**search, "s3": {"secret_key": "k"}}, tmp_path)
    assert done.returncode == 2 and "unknown option(s) 's3'" in done.stderr

    rows = np.flatnonzero(np.isin(c.labels, np.unique(c.labels)[:4]))[:40]  # 4 identities, several images each
    x, labels = c.base[rows], [f"p{lab}" for lab in c.labels[rows]]
    labelled = write_collection(tmp_path / "l", [f"{k}.jpg" for k in range(40)], labels, x)
    done = _run("calibrate", {"labelled": labelled, "out": str(tmp_path / "job.json"), "fmr": 0.01,
                              "impostor_pairs": "all", "detector": "dlib"}, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"calibration: {tmp_path / 'job.json'}" in done.stdout
    res = CliRunner().invoke(app, ["calibrate", labelled, "--fmr", "0.01", "--out", str(tmp_path / "cli.json")])
    assert res.exit_code == 0, res.output
    job_cal, cli_cal = (json.loads((tmp_path / f).read_text()) for f in ("job.json", "cli.json"))
    for d in (job_cal, cli_cal):
        d.pop("created", None)
    assert job_cal == cli_cal and job_cal["impostor_sampling"]["mode"] == "all"


def test_scenario_job_builds_what_the_cli_builds(tmp_path) -> None:
    """jobs/scenario.py takes `scenario build`'s flags (flat) and builds the same scenario."""
    from typer.testing import CliRunner

    from raylead.cli import app

    for i in range(24):
        (tmp_path / "faces" / f"p{i:02d}").mkdir(parents=True)
        for j in range(9):
            (tmp_path / "faces" / f"p{i:02d}" / f"{j}.jpg").write_bytes(f"{i}/{j}".encode())
    flags = {"kind": "pairs", "n_train": 8, "n_holdout": 8, "leak_fraction": 0.25, "seed": 3}
    done = _run("scenario", {"labelled": str(tmp_path / "faces"), "out": str(tmp_path / "job"), **flags}, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pairs scenario:" in done.stdout and f"train: {tmp_path / 'job' / 'train'}" in done.stdout
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    res = CliRunner().invoke(app, ["scenario", "build", str(tmp_path / "faces"), "--out", str(tmp_path / "cli"), *args])
    assert res.exit_code == 0, res.output
    for name in ("members.txt", "truth.csv"):
        assert (tmp_path / "job" / name).read_text() == (tmp_path / "cli" / name).read_text()
    done = _run("scenario", {"labelled": "x", "out": "y", "n_holdout": "many"}, tmp_path)
    assert done.returncode == 2 and "n_holdout must be a number" in done.stderr


def _scenario_config(data: dict):
    from raylead.attacks.scenarios import ScenarioBuildConfig
    from raylead.config import from_mapping

    return from_mapping(ScenarioBuildConfig, _job_module("scenario").from_yaml(data), "scenario.yaml")


@pytest.mark.parametrize(
    ("data", "says"),
    [
        # the docs: giving both spellings of one option is refused (the flat one used to win silently)
        ({"pairs": {"n_train": 5}, "n_train": 10},
         "scenario config: give n_train or pairs: {n_train: ...}, not both (they are one option)"),
        ({"kind": "membership", "membership": {"seed": 1}, "seed": 2},
         "scenario config: give seed or membership: {seed: ...}, not both (they are one option)"),
        # an option of the other kind used to be ignored
        ({"kind": "membership", "n_holdout": 5},
         "scenario config: n_holdout applies to kind pairs, not to kind membership: drop it or set kind: pairs"),
        ({"synthetic_size": 5, "novel_samples": 3},
         "scenario config: novel_samples applies to kind membership, not to kind pairs: "
         "drop it or set kind: membership"),
        ({"kind": "pairs", "membership": {"n_train": 3}},
         "scenario config: membership applies to kind membership, not to kind pairs: "
         "drop it or set kind: membership"),
        # a non-mapping for the settings was an AttributeError
        ({"pairs": 5}, "scenario.yaml: pairs must be a mapping of option names to values, got 5"),
        ({"seed": -1}, "--seed must be a whole number ≥ 0, got -1"),
    ],
)
def test_scenario_job_refuses_ambiguous_or_ignored_keys(data, says) -> None:
    from raylead.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _scenario_config({"labelled": "l", "out": "o", **data})
    assert str(err.value) == says


def test_scenario_job_typo_lists_the_flat_keys_too() -> None:
    from raylead.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _scenario_config({"labelled": "l", "out": "o", "n_trian": 3})
    msg = str(err.value)
    assert msg.startswith("unknown option(s) 'n_trian' in scenario config; allowed: ") and "\n" not in msg
    assert {"n_train", "seed", "n_holdout", "novel_samples", "pairs", "kind", "out"} <= set(
        msg.split("allowed: ", 1)[1].split(", ")
    )


def test_search_job_has_no_device_key() -> None:
    """`device: foo` was accepted and ignored: a persisted index's searchers choose their own."""
    from raylead.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown option"):
        _search_job({"queries": "q", "index": "i", "out": "o", "device": "cuda"})


def test_scenario_job_flat_and_nested_keys_combine() -> None:
    cfg = _scenario_config({"labelled": "l", "out": "o", "pairs": {"n_holdout": 7}, "n_train": 9, "seed": 4})
    assert (cfg.pairs.n_train, cfg.pairs.n_holdout, cfg.pairs.seed) == (9, 7, 4)
    cfg = _scenario_config({"labelled": "l", "out": "o", "kind": "membership", "novel_samples": 3, "n_train": 5})
    assert (cfg.membership.novel_samples, cfg.membership.n_train) == (3, 5)


def _search_job(data: dict):
    from raylead.config import from_mapping
    from raylead.search import SearchJob

    return from_mapping(SearchJob, _job_module("search").from_yaml(data), "search.yaml")


def test_search_job_takes_a_config_mapping_and_names_every_key() -> None:
    """`config: {k: 5, engine: exact}` used to be dropped silently (k 10, engine auto); a typo's
    message listed `config, index, out, ...` without k, engine, nprobe or local."""
    from raylead.errors import ConfigError

    base = {"queries": "q", "index": "i", "out": "o"}
    job = _search_job({**base, "config": {"k": 5, "engine": "exact"}, "local": True})
    assert (job.config.k, job.config.engine, job.use_ray) == (5, "exact", False)
    assert _search_job({**base, "k": 5, "engine": "exact", "local": True}) == job
    for data, says in [
        ({"config": {"k": 5}, "k": 0}, "search config: give k flat or under config:, not both"),
        ({"config": 5}, "search config: config must be a mapping of search settings"),
        ({"config": {"out": "x"}}, "unknown option(s) 'out' in search config: config; allowed: engine, k,"),
    ]:
        with pytest.raises(ConfigError) as err:
            _search_job({**base, **data})
        assert str(err.value).startswith(says) and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        _search_job({**base, "kk": 1})
    msg = str(err.value)
    assert msg.startswith("unknown option(s) 'kk' in search config; allowed: ")
    allowed = msg.split("allowed: ", 1)[1].split(", ")
    assert {"k", "engine", "nprobe", "k_factor", "query_block", "local", "use_ray", "pairs", "threshold",
            "rerank_vectors", "queries", "index", "out", "config"} <= set(allowed)


def test_index_job_names_its_flag_spellings_among_the_keys() -> None:
    from raylead.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _job_module("index").from_yaml({"embeddings": "e", "out": "o", "memory": "8GiB"})
    msg = str(err.value)
    assert msg.startswith("unknown option(s) 'memory' in index config; allowed: ") and "\n" not in msg
    allowed = msg.split("allowed: ", 1)[1].split(", ")
    assert {"memory_budget", "memory_budget_bytes", "shard_max", "shard_max_bytes", "local", "executor",
            "shards", "embeddings", "out"} <= set(allowed)


@pytest.mark.parametrize(
    ("attack", "spelled"),
    [("webster", {"alpha", "alphas", "model", "pack", "report", "redact", "triage_option", "queries"}),
     ("tinsley", {"threshold", "thresholds", "train_index", "report", "triage_option", "matchers"})],
)  # fmt: skip
def test_attack_job_names_its_flag_spellings_among_the_keys(attack: str, spelled: set[str]) -> None:
    """A typo's message lists every key the job takes, the flag spellings (alpha, report, model)
    included; it listed the config fields only."""
    from raylead.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _job_module("attack").prepare(_job_module("attack").AttackJob(attack, {"out": "o", "qeries": "q"}))
    msg = str(err.value)
    assert msg.startswith(f"unknown option(s) 'qeries' in attack {attack}; allowed: ") and "\n" not in msg
    assert spelled <= set(msg.split("allowed: ", 1)[1].split(", ")), msg


def test_attack_job_mapping_values_are_checked() -> None:
    """tinsley `thresholds: {dlib: high}` was a TypeError; `train_index: {dlib: 5}` was accepted."""
    from raylead.errors import ConfigError

    module = _job_module("attack")
    base = {"attack": "tinsley", "train": "t", "holdout": "h", "synthetic": "s", "out": "o"}
    for data, says in [
        ({"thresholds": {"dlib": "high"}}, "attack tinsley: thresholds: dlib must be a number, got 'high'"),
        ({"train_index": {"dlib": 5}}, "attack tinsley: train_index: dlib must be a string, got 5"),
    ]:
        with pytest.raises(ConfigError) as err:
            module.prepare(module.AttackJob(**module.from_yaml({**base, **data})))
        assert str(err.value) == says

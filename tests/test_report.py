"""Evidence report (issue 5): content, escaping, redaction, placeholders, and the page in a real
headless Chromium driven over the DevTools protocol (tests/browser.py)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import Browser, chromium_path, png_stats
from PIL import Image

from raylead.attacks import EmbeddedSet, Threshold, set_aside
from raylead.errors import ConfigError
from raylead.report import ReportConfig, build_report, script_json
from raylead.storage import Location

HOSTILE_FILE = "<img src=x onerror=alert(1)>.jpg"
HOSTILE_DIR = "<img src=x onerror=alert(1)>"
QUOTED_FILE = 'it\'s "quoted" <b>&amp;.jpg'
QUOTED_DIR = 'O\'Neil "Jo"'
SCRIPT_IDENTITY = "</script><script>alert(4)</script>"
MATCHER_LABEL = 'dlib<b onmouseover="alert(6)">'

needs_chromium = pytest.mark.skipif(
    chromium_path() is None,
    reason="chromium is not installed at /usr/bin/chromium (scripts/install.sh test installs it)",
)


def _faces(lfw_dir: Path, n: int) -> list[Path]:
    return sorted(lfw_dir.glob("*/*.jpg"))[:n]


def _unit(rng: np.random.Generator, n: int, d: int = 32) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _near(x: np.ndarray, rng: np.random.Generator, noise: float = 0.15) -> np.ndarray:
    y = x + noise * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(x.shape[1])
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


def _place(root: Path, rel: str, src: Path) -> str:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, root / rel)
    return rel


def build_hostile_results(root: Path, lfw_dir: Path) -> Path:
    """Idiap, Tinsley and Webster results (written by the attacks' own writers) whose image names,
    identities and matcher label hold HTML/script, plus a missing image and an escaping id."""
    from raylead.attacks.idiap import IdiapConfig, idiap_attack, write_idiap
    from raylead.attacks.tinsley import TinsleyConfig, TinsleyInputs, consensus, matcher_leakage, write_tinsley
    from raylead.attacks.webster import WebsterConfig, webster_attack, write_webster

    rng = np.random.default_rng(5)
    faces = _faces(lfw_dir, 40)
    results = root / "results"
    train_dir, syn_dir, hold_dir = root / "train", root / "synthetic", root / "holdout"
    train_ids = [
        _place(train_dir, f"{HOSTILE_DIR}/{HOSTILE_FILE}", faces[0]),
        _place(train_dir, f"{QUOTED_DIR}/{QUOTED_FILE}", faces[10]),
        _place(train_dir, "plain/ok.jpg", faces[20]),
        _place(train_dir, "plain/ok2.jpg", faces[21]),
    ]
    train_idents = [HOSTILE_DIR, QUOTED_DIR, "plain", "plain"]
    t_emb = _unit(rng, 4)
    syn_ids = [
        _place(syn_dir, f"s_{HOSTILE_FILE}", faces[1]),
        _place(syn_dir, f"s_{QUOTED_FILE}", faces[11]),
        "missing.jpg",  # never written: a placeholder says why
        "../outside.jpg",  # climbs out of its folder: refused
        _place(syn_dir, "other.jpg", faces[30]),
    ]
    s_emb = np.concatenate([_near(t_emb[:4], rng), _unit(rng, 1)])
    train = EmbeddedSet.from_arrays(t_emb, train_ids, train_idents, np.ones(4), "dlib", str(train_dir))
    syn_all = EmbeddedSet.from_arrays(
        s_emb, syn_ids, [SCRIPT_IDENTITY, None, None, None, None], np.ones(5), "dlib", str(syn_dir)
    )
    syn_all.failed_ids, syn_all.failed_reasons = [f"s_{HOSTILE_FILE}.broken"], ["no_face"]
    syn, aside = set_aside(syn_all, 0.0)
    threshold = Threshold(0.5, "--threshold", "dlib")

    res = idiap_attack(train, syn, 8, threshold=threshold, engine="exact")
    res.set_aside = aside
    icfg = IdiapConfig(train=str(train_dir), synthetic=str(syn_dir), out=str(results / "idiap"), top_k=8)
    write_idiap(Location.parse(results / "idiap"), icfg, train, syn_all, syn, res)

    hold_ids = [_place(hold_dir, f"h{i}/{QUOTED_FILE}", faces[32 + i]) for i in range(3)]
    holdout = EmbeddedSet.from_arrays(_unit(rng, 3), hold_ids, ["h0", "h1", "h2"], np.ones(3), "dlib", str(hold_dir))
    leak = matcher_leakage(syn, train, holdout, threshold, engine="exact")
    cons = consensus({MATCHER_LABEL: syn}, {MATCHER_LABEL: train}, {MATCHER_LABEL: threshold})
    tcfg = TinsleyConfig(
        train=str(train_dir), holdout=str(hold_dir), synthetic=str(syn_dir), out=str(results / "tinsley")
    )
    per = {MATCHER_LABEL: TinsleyInputs(train, holdout, syn_all, syn, aside, threshold)}
    write_tinsley(Location.parse(results / "tinsley"), tcfg, per, {MATCHER_LABEL: leak}, cons)

    q_dir, x_dir = root / "queries", root / "samples"
    q_names = [f"Q{SCRIPT_IDENTITY}", QUOTED_DIR, "nobody"]
    ref_ids = [_place(q_dir, f"q{i}/{HOSTILE_FILE}", faces[2 + i]) for i in range(3)]
    refs = EmbeddedSet.from_arrays(t_emb[:3], ref_ids, q_names, np.ones(3), "dlib", str(q_dir))
    sample_ids = [_place(x_dir, f"x{i}_{HOSTILE_FILE}", faces[5 + i]) for i in range(6)]
    x_emb = np.concatenate([_near(np.repeat(t_emb[:1], 4, axis=0), rng), _near(t_emb[1:3], rng)])
    samples_all = EmbeddedSet.from_arrays(x_emb, sample_ids, [None] * 6, np.ones(6), "dlib", str(x_dir))
    samples, x_aside = set_aside(samples_all, 0.0)
    members = {q_names[0], "someone else"}
    wres = webster_attack(refs.embeddings, q_names, samples.embeddings, (1.0, 2.0), members=members)
    wcfg = WebsterConfig(queries=str(q_dir), samples=str(x_dir), out=str(results / "webster"))
    write_webster(
        Location.parse(results / "webster"), wcfg, refs, refs, samples_all, samples, x_aside, wres, members, []
    )
    return results


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path) -> Path:
    return build_hostile_results(tmp_path_factory.mktemp("hostile"), lfw_dir)


@pytest.fixture(scope="module")
def hostile_report(hostile: Path) -> tuple[Path, Any]:
    out = hostile.parent / "report.html"
    res = build_report(ReportConfig(results=str(hostile), out=str(out), page_size=2))
    return out, res


def _thumbs(doc: str) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(m))).convert("L"), np.float64)
        for m in re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', doc)
    ]


def _hf_energy(grey: np.ndarray) -> float:
    """Mean absolute discrete Laplacian: high-frequency detail (edges, texture)."""
    lap = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float(np.abs(lap).mean())


def _json_blob(doc: str) -> Any:
    m = re.search(r'<script type="application/json" id="raylead-results">(.*?)</script>', doc, re.S)
    assert m is not None
    return json.loads(m.group(1))


# ------------------------------------------------------------------------------------------
# content and escaping (no browser)
# ------------------------------------------------------------------------------------------


def test_every_section_and_plot_is_written(hostile_report: tuple[Path, Any]) -> None:
    out, res = hostile_report
    doc = out.read_text("utf-8")
    assert res.attacks == ["idiap", "tinsley", "webster"]
    for heading in (
        "Run summary",
        "Idiap:",
        "Contact sheet",
        "Tinsley:",
        "Kolmogorov",
        "consensus",
        "Webster:",
        "Flagged identities",
        "Set aside",
    ):
        assert heading in doc, heading
    names = sorted(Path(p).name for p in res.plots)
    assert names == [
        "report.idiap.best_match.png",
        "report.tinsley.dlib_b_onmouseover_alert_6_train_vs_holdout.png",
        "report.webster.counts.png",
        "report.webster.pr_curve.png",
    ]
    for p in res.plots:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600  # faces inside: owner-only
    assert doc.count("data:image/png;base64,") == 4  # the plots, inline too
    assert "θ = 0.500000, given with --threshold" in doc
    assert "no_face: 1" in doc  # the set-aside failure and its reason
    # no external resource of any kind: every src/href is a data: URI or an in-page anchor
    for attr in re.findall(r'\b(?:src|href)="([^"]*)"', doc):
        assert attr.startswith(("data:", "#")), attr
    assert "<link" not in doc and "@import" not in doc and "url(" not in doc


def test_hostile_names_are_escaped(hostile_report: tuple[Path, Any]) -> None:
    out, _ = hostile_report
    doc = out.read_text("utf-8")
    assert HOSTILE_DIR not in doc and "onerror=alert(1)>" not in doc
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in doc
    assert "O&#x27;Neil &quot;Jo&quot;" in doc
    assert "it&#x27;s &quot;quoted&quot; &lt;b&gt;&amp;amp;.jpg" in doc
    assert SCRIPT_IDENTITY not in doc and "alert(4)</script>" not in doc
    assert "&lt;/script&gt;&lt;script&gt;alert(4)&lt;/script&gt;" in doc
    assert 'onmouseover="alert(6)"' not in doc and "dlib&lt;b onmouseover=&quot;alert(6)&quot;&gt;" in doc
    # only raylead's two script elements exist: the JSON data and the pager
    assert len(re.findall(r"<script\b", doc)) == 2
    # the embedded JSON cannot close its element, and still round-trips the raw strings
    blob = json.dumps(_json_blob(doc), ensure_ascii=False)
    assert SCRIPT_IDENTITY.replace("/", "\\/") in blob or SCRIPT_IDENTITY in blob
    assert "<" not in script_json({"x": "</script><!--"}) and ">" not in script_json({"x": "a>b"})
    assert json.loads(script_json({"x": "</script>&"})) == {"x": "</script>&"}


def test_unreadable_images_become_placeholders_with_reasons(hostile_report: tuple[Path, Any]) -> None:
    out, res = hostile_report
    doc = out.read_text("utf-8")
    assert "image unavailable: image file not found" in doc  # missing.jpg
    assert "image unavailable: refused: the image id points outside its folder" in doc  # ../outside.jpg
    assert res.unavailable_images >= 2 and res.thumbnails >= 10


def test_credentials_never_enter_the_report(hostile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "SECRETs3cr3tKEYvalue42"
    metrics = json.loads((hostile / "idiap" / "metrics.json").read_text())
    shutil.copytree(hostile / "idiap", tmp_path / "idiap")
    metrics["inputs"]["train"]["uri"] = f"https://user:{secret}@example.com/train"
    metrics["engine"]["pairs_reason"] = f"key {secret} in a message"
    (tmp_path / "idiap" / "metrics.json").write_text(json.dumps(metrics))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    out = tmp_path / "r.html"
    build_report(ReportConfig(results=str(tmp_path / "idiap"), out=str(out)))
    doc = out.read_text("utf-8")
    assert secret not in doc and "user:" not in doc
    assert "https://***@example.com/train" in doc


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("s3://AKIAPLANTED:wJalrXUtnFEMI/K7MDENG@bucket/x", "wJalrXUtnFEMI/K7MDENG"),  # '/' in the password
        ("https://user:p@ssPLANTED@host/x", "ssPLANTED"),  # '@' in the password
        ("(at http://admin:a/b@c@127.0.0.1:9)", "a/b@c"),
    ],
)
def test_scrubber_removes_passwords_holding_slash_or_at(text: str, secret: str) -> None:
    from raylead.report import Scrubber

    out = Scrubber(None)(text)
    assert secret not in out and "PLANTED" not in out and "admin" not in out and "***@" in out, out


def test_passwords_holding_slash_or_at_never_enter_the_report(hostile: Path, tmp_path: Path) -> None:
    secret = "wJalrXUtnFEMI/K7MD@ENGPLANTED"  # not in any environment variable: only the URL scrubber can catch it
    metrics = json.loads((hostile / "idiap" / "metrics.json").read_text())
    shutil.copytree(hostile / "idiap", tmp_path / "idiap")
    metrics["inputs"]["train"]["uri"] = f"s3://AKIAPLANTED:{secret}@bucket/train"
    metrics["engine"]["pairs_reason"] = f"endpoint https://admin:{secret}@example.com/x was slow"
    (tmp_path / "idiap" / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "r.html"
    build_report(ReportConfig(results=str(tmp_path / "idiap"), out=str(out)))
    doc = out.read_text("utf-8")
    for part in ("AKIAPLANTED", "wJalrXUtnFEMI", "K7MD", "ENGPLANTED", "admin"):
        assert part not in doc, part
    assert "https://***@example.com/x" in doc


def test_plots_draw_dollar_signs_literally() -> None:
    """'$' in names is text, not matplotlib mathtext (which raised ValueError for these)."""
    from raylead.report import plots

    names = ["A$AP_$Rocky", "cost_$5_$^", "x$\\frac$y", "Ke$ha"]
    pngs = [
        plots.counts_plot([*names, "other"], [5, 4, 3, 2, 1], [True, None, False, None, None], [("$1$", 2.0)]),
        plots.histogram_plot(
            "scores (onnx:model=$HOME/m_$.onnx)", "x$_$", [(n, [0, 1], [1]) for n in names], 0.5, "$θ_$"
        ),
        plots.rates_plot("FMR / FNMR (A$AP_$Rocky)", [0.1, 0.2], [0.1, 0.01], [0.2, 0.3], 0.15),
        plots.pr_plot([0.1, 0.5], [0.9, 0.6], 0.3, [("$a_$", 0.5, 0.6)]),
    ]
    assert all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    import matplotlib

    assert matplotlib.rcParams["text.parse_math"]  # the setting is restored afterwards


def test_report_with_dollar_names(tmp_path: Path, lfw_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An identity folder and a matcher label holding '$...$' (mathtext syntax) still give a report."""
    monkeypatch.setattr(sys.modules[__name__], "QUOTED_DIR", "A$AP_$Rocky")
    monkeypatch.setattr(sys.modules[__name__], "MATCHER_LABEL", "dlib$x_$")
    results = build_hostile_results(tmp_path, lfw_dir)
    out = tmp_path / "r.html"
    res = build_report(ReportConfig(results=str(results), out=str(out)))
    assert res.attacks == ["idiap", "tinsley", "webster"] and len(res.plots) == 4
    for p in res.plots:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = out.read_text("utf-8")
    assert "A$AP_$Rocky" in doc and "dlib$x_$" in doc


def test_results_images_and_report_on_s3(hostile: Path, hostile_report: tuple[Path, Any], s3_server: Any) -> None:
    """Results, images and the report itself in object storage (SeaweedFS), read via Location."""
    base = hostile.parent
    root = Location.parse("s3://raylead/report-test")
    for f in sorted(base.rglob("*")):
        if f.is_file() and f.suffix not in (".html", ".png"):
            data = f.read_bytes()
            if f.name == "metrics.json":  # the sets' URIs: the image folders, now in the bucket
                data = data.replace(str(base).encode(), root.uri.encode())
            root.child(f.relative_to(base).as_posix()).write_bytes(data)
    res = build_report(ReportConfig(results=root.child("results").uri, out=root.child("out", "report.html").uri))
    assert res.path == "s3://raylead/report-test/out/report.html"
    assert res.thumbnails == hostile_report[1].thumbnails and res.unavailable_images == 2
    assert all(Location.parse(p).exists() for p in res.plots) and len(res.plots) == 4
    doc = root.child("out", "report.html").read_bytes().decode("utf-8")
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in doc and HOSTILE_DIR not in doc
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in doc


def test_long_lists_are_capped_and_counted(hostile: Path, tmp_path: Path) -> None:
    out = tmp_path / "capped.html"
    build_report(ReportConfig(results=str(hostile), out=str(out), max_pairs=2, max_identities=1))
    doc = out.read_text("utf-8")
    assert "the top 2 pairs (of the 8 in pairs.parquet)" in doc  # idiap: best first
    assert "the first 2 of 4" in doc  # tinsley consensus: most matchers, then highest score first
    assert doc.count('class="card') == 2 + 2 + 4  # + webster's one flagged identity's 4 samples


def test_a_table_that_is_not_the_one_its_metrics_name_is_refused(hostile: Path, tmp_path: Path) -> None:
    """A pairs.parquet copied in from another run was shown under this run's headline figures,
    and a deleted one gave "the top 0 pairs" without a word: tables are checked against the
    checksums metrics.json records."""
    import shutil

    from raylead.errors import CorruptDataError

    idiap = tmp_path / "idiap"
    shutil.copytree(hostile / "idiap", idiap)
    assert json.loads((idiap / "metrics.json").read_text())["checksums"].keys() >= {"pairs.parquet"}
    build_report(ReportConfig(results=str(idiap), out=str(tmp_path / "ok.html")))
    (idiap / "pairs.parquet").write_bytes((hostile / "webster" / "counts.parquet").read_bytes())
    with pytest.raises(CorruptDataError, match="pairs.parquet is not the table its metrics.json was written with"):
        build_report(ReportConfig(results=str(idiap), out=str(tmp_path / "r.html")))
    (idiap / "pairs.parquet").unlink()
    with pytest.raises(CorruptDataError, match="pairs.parquet is missing .*rerun the attack"):
        build_report(ReportConfig(results=str(idiap), out=str(tmp_path / "r.html")))


def test_results_dir_without_metrics_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no metrics.json"):
        build_report(ReportConfig(results=str(tmp_path / "empty"), out=str(tmp_path / "r.html")))
    with pytest.raises(ConfigError, match="does not exist"):
        build_report(ReportConfig(results=str(tmp_path / "nope"), out=str(tmp_path / "r.html")))
    with pytest.raises(ConfigError, match=".html"):
        build_report(ReportConfig(results=str(tmp_path / "empty"), out=str(tmp_path / "r.txt")))


def test_redact_blurs_every_thumbnail_and_still_writes_plots(hostile: Path, hostile_report: tuple[Path, Any]) -> None:
    plain_doc = hostile_report[0].read_text("utf-8")
    out = hostile.parent / "redacted.html"
    res = build_report(ReportConfig(results=str(hostile), out=str(out), redact=True, page_size=2))
    doc = out.read_text("utf-8")
    assert "Faces are redacted" in doc
    plain, blurred = _thumbs(plain_doc), _thumbs(doc)
    assert len(plain) == len(blurred) >= 10
    e_plain = np.array([_hf_energy(x) for x in plain])
    e_blur = np.array([_hf_energy(x) for x in blurred])
    # every face loses nearly all its detail: at least 10x less high-frequency energy each
    assert (e_blur * 10 < e_plain).all(), (e_plain.round(2), e_blur.round(2))
    assert all(np.abs(a - b).mean() > 5 for a, b in zip(plain, blurred, strict=True))
    assert len(res.plots) == 4 and all(Path(p).is_file() for p in res.plots)


def _calibration_file(path: Path) -> Path:
    from raylead.attacks.calibrate import calibrate_set

    rng = np.random.default_rng(1)
    centres = _unit(rng, 20)
    emb = _near(np.repeat(centres, 5, axis=0), rng, 0.8)
    labelled = EmbeddedSet.from_arrays(
        emb, [f"p{i // 5}/{i}.jpg" for i in range(100)], [f"p{i // 5}" for i in range(100)], matcher="dlib"
    )
    path.write_text(json.dumps(calibrate_set(labelled, 0.01, bins=30).to_json()))
    return path


def _raylead(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raylead.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_report_with_calibration(hostile: Path, tmp_path: Path) -> None:
    cal = _calibration_file(tmp_path / "cal-dlib.json")
    out = tmp_path / "rep" / "idiap.html"
    run = _raylead("report", str(hostile / "idiap"), "--out", str(out), "--calibration", str(cal))
    assert run.returncode == 0, run.stderr
    assert f"report: {out}" in run.stdout
    doc = out.read_text("utf-8")
    assert "Calibration: dlib" in doc and "genuine" in doc
    pngs = sorted(p.name for p in out.parent.glob("*.png"))
    assert pngs == [
        "idiap.idiap.best_match.png",
        "idiap.idiap.calibration_dlib_rates.png",
        "idiap.idiap.calibration_dlib_scores.png",
    ]
    redacted = _raylead("report", str(hostile / "idiap"), "--out", str(tmp_path / "red.html"), "--redact")
    assert redacted.returncode == 0, redacted.stderr
    assert "Faces are redacted" in (tmp_path / "red.html").read_text("utf-8")
    bad = _raylead("report", str(tmp_path / "rep"), "--out", str(tmp_path / "x.html"))
    assert bad.returncode == 2 and "metrics.json" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("redact", [False, True], ids=["plain", "redact"])
def test_attack_command_writes_the_report(tmp_path: Path, write_collection: Any, redact: bool) -> None:
    rng = np.random.default_rng(2)
    t = _unit(rng, 6, 16)
    train = write_collection(tmp_path / "t", [f"a{i}/{i}.jpg" for i in range(6)], [f"a{i}" for i in range(6)], t)
    syn = write_collection(tmp_path / "s", [f"s{i}.jpg" for i in range(4)], [None] * 4, _near(t[:4], rng))
    out, rep = tmp_path / "idiap", tmp_path / "idiap-report.html"
    run = _raylead(
        "attack",
        "idiap",
        "--train",
        train,
        "--synthetic",
        syn,
        "--out",
        str(out),
        "--top-k",
        "5",
        "--threshold",
        "0.5",
        "--engine",
        "exact",
        "--report",
        str(rep),
        *(["--redact"] if redact else []),
    )
    assert run.returncode == 0, run.stderr
    assert f"report: {rep}" in run.stdout
    doc = rep.read_text("utf-8")
    assert "top 5 pairs" in doc or "the top 5 pairs" in doc
    assert doc.count("image unavailable:") == 10  # the collections hold no image files
    assert ("Faces are redacted" in doc) is redact


def test_attack_redact_without_report_is_refused_before_work(tmp_path: Path, write_collection: Any) -> None:
    t = _unit(np.random.default_rng(3), 2, 16)
    train = write_collection(tmp_path / "t", ["a/0.jpg", "b/1.jpg"], ["a", "b"], t)
    run = _raylead("attack", "idiap", "--train", train, "--synthetic", train, "--out", str(tmp_path / "o"), "--redact")
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "--redact applies to the report" in lines[0], run.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------
# in the browser
# ------------------------------------------------------------------------------------------


def _assert_clean(b: Browser, rec: Any) -> None:
    b.collect(rec)
    assert rec.errors == [], rec.errors
    assert rec.foreign_requests() == [], rec.foreign_requests()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    import ray

    from raylead.demo import run_demo

    # a Ray of this process's own (address="local"): a plain ray.init() would join whichever other
    # Ray instance on the machine was started last
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = tmp_path_factory.mktemp("demo")
    try:
        yield out, run_demo(str(out))
    finally:
        if started:
            ray.shutdown()


@needs_chromium
def test_demo_report_in_the_browser(demo_run: tuple[Path, list[str]]) -> None:
    out, lines = demo_run
    report = out / "report.html"
    assert f"report: {report}" in lines[-1]
    assert stat.S_IMODE(os.stat(report).st_mode) == 0o600
    assert sorted(p.name for p in out.glob("report.*.png")) == [
        "report.idiap.best_match.png",
        "report.tinsley.dlib_train_vs_holdout.png",
    ]
    with Browser(1280, 1400) as b:
        rec = b.open(report)
        _assert_clean(b, rec)
        assert rec.requests and all(u == rec.url or u.startswith("data:") for u in rec.requests)
        shot = b.screenshot()
        colours, non_white = png_stats(shot)
        assert colours > 2000 and non_white > 0.05, (colours, non_white)  # blank: 1 colour, 0.0
        shown = b.evaluate(
            "Array.from(document.querySelectorAll('.page-view img')).filter(i => i.naturalWidth > 0).length"
        )
        assert shown >= 10  # the top 10 pairs' faces (training + synthetic) decoded and shown
        assert b.evaluate("document.querySelectorAll('.ph').length") == 0


@needs_chromium
def test_hostile_report_in_the_browser(hostile_report: tuple[Path, Any]) -> None:
    out, _ = hostile_report
    with Browser() as b:
        rec = b.open(out)
        _assert_clean(b, rec)
        pagers = b.evaluate("document.querySelectorAll('.pager').length")
        assert pagers >= 3
        # walk every page of every pager: templates are instantiated, still nothing fires
        n_buttons = b.evaluate("document.querySelectorAll('button[data-goto]').length")
        assert n_buttons >= 4
        for i in range(n_buttons):
            b.evaluate(f"document.querySelectorAll('button[data-goto]')[{i}].click()")
        b.evaluate("document.querySelectorAll('button[data-goto=\"1\"]').forEach(x => x.click())")
        for el in ("img[src=x]", "img[src='x']", "b[onmouseover]", "img[onerror]"):
            assert b.evaluate(f'document.querySelectorAll("{el}").length') == 0, el
        assert b.evaluate("document.scripts.length") == 2
        hostile_text = b.evaluate("document.body.innerText.includes('<img src=x onerror=alert(1)>.jpg')")
        assert hostile_text is True  # shown as text
        _assert_clean(b, rec)
        assert rec.dialogs == []


def build_pairs_result(root: Path, lfw_dir: Path, n_pairs: int = 1500) -> Path:
    """An Idiap result with ``n_pairs`` pairs over real LFW photos (read in place), written by the
    Idiap run layer's writer from seeded embeddings (the report does not depend on the matcher)."""
    from raylead.attacks.idiap import IdiapConfig, idiap_attack, write_idiap

    rng = np.random.default_rng(0)
    ids = sorted(p.relative_to(lfw_dir).as_posix() for p in lfw_dir.glob("*/*.jpg"))
    train_ids, syn_ids = ids[0::2], ids[1::2]
    t = _unit(rng, len(train_ids), 64)
    s = np.concatenate([_near(t[: len(syn_ids) // 2], rng, 2.0), _unit(rng, len(syn_ids) - len(syn_ids) // 2, 64)])
    train = EmbeddedSet.from_arrays(
        t, train_ids, [i.split("/")[0] for i in train_ids], np.ones(len(t)), "dlib", str(lfw_dir)
    )
    syn = EmbeddedSet.from_arrays(s, syn_ids, [None] * len(syn_ids), np.ones(len(s)), "dlib", str(lfw_dir))
    res = idiap_attack(train, syn, n_pairs, threshold=Threshold(0.6, "--threshold", "dlib"), engine="exact")
    _, res.set_aside = set_aside(syn, 0.0)
    out = root / "idiap"
    cfg = IdiapConfig(train=str(lfw_dir), synthetic=str(lfw_dir), out=str(out), top_k=n_pairs)
    write_idiap(Location.parse(out), cfg, train, syn, syn, res)
    return out


@needs_chromium
def test_1500_pair_report_loads_in_under_5_seconds(
    tmp_path: Path, lfw_dir: Path, record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    results = build_pairs_result(tmp_path, lfw_dir, 1500)
    out = tmp_path / "pairs1500.html"
    t0 = time.perf_counter()
    res = build_report(ReportConfig(results=str(results), out=str(out)))
    build_s = time.perf_counter() - t0
    doc = out.read_text("utf-8")
    assert doc.count('class="card') == 1500 and res.unavailable_images == 0
    with Browser() as b:
        rec = b.open(out)
        _assert_clean(b, rec)
        b.evaluate("document.querySelector('button[data-goto=\"15\"]').click()")
        ranks = b.evaluate("document.querySelector('.page-view .card').innerText")
        assert "rank 1,401" in ranks
        _assert_clean(b, rec)
    size_mb = out.stat().st_size / 2**20
    record_property("report_build_s", round(build_s, 2))
    record_property("load_s", round(rec.load_seconds, 3))
    with capsys.disabled():
        print(
            f"\n1500-pair report: built in {build_s:.1f}s, {size_mb:.1f} MiB, {res.thumbnails} thumbnails; "
            f"browser load event {rec.load_seconds:.2f}s (navigate→load {rec.wall_seconds:.2f}s)"
        )
    assert rec.load_seconds < 5.0 and rec.wall_seconds < 5.0


def test_report_file_name_rule_names_the_callers_flag() -> None:
    """One rule for the report's file name, named as each caller spells it (raylead report --out,
    attack --report, a job's report:), so an attack can check it before it runs."""
    from raylead.report import check_report_file

    check_report_file("r.html")
    check_report_file("s3://b/R.HTM")
    for flag in ("--out", "--report", "attack idiap: report"):
        says = f"{flag} must name an .html file, e.g. report.html; got 'x.pdf'"
        with pytest.raises(ConfigError, match=f"^{re.escape(says)}$"):
            check_report_file("x.pdf", flag)
    with pytest.raises(ConfigError, match="^--out must name an .html file"):
        ReportConfig(results="r", out="evidence.pdf").validate()

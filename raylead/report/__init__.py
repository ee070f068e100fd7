"""The evidence report: one self-contained HTML file (+ a PNG per plot) from attack results.

``build_report(ReportConfig(results=DIR, out=FILE.html))`` reads every attack result under
``DIR`` (a folder with ``metrics.json``, or a folder of such folders, e.g. the demo's
``audit/``) and writes:

* ``FILE.html``: run summary (inputs, counts, set-aside failures, matchers, engines, thresholds
  and where they came from), then per attack its plots and its image evidence (Idiap contact
  sheet of the top-K pairs; Tinsley T-vs-H histograms, KS/AUC table and consensus pairs; Webster
  per-identity counts with the τ lines, PR curve, and each flagged identity's samples beside
  their nearest reference photos). Thumbnails are JPEG ``data:`` URIs; long lists are split into
  pages held in inert ``<template>`` blocks (their images are decoded only when a page is shown)
  and images load lazily. No external CSS, JS or fonts; a Content-Security-Policy with a hash
  of the one inline script forbids any other script and every network request.
* ``FILE.<attack>.<plot>.png`` beside it: the same plots as PNG files (matplotlib, Agg).

Every string from the results (ids, identities, file names, URIs, matcher names) is escaped with
``html.escape(quote=True)``; the JSON summary embedded in ``<script type="application/json">``
has ``<``, ``>`` and ``&`` escaped so nothing can close the element. Credentials (S3 keys, and
``user:password@`` in URIs) are removed from every string first. ``redact=True`` pixelates and
blurs every face thumbnail before it is embedded, for sharing.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import math
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from raylead.errors import ConfigError, CorruptDataError, RayleadError
from raylead.report import plots
from raylead.report.images import Thumb, Thumbnails
from raylead.storage import Location, S3Options, check_file_target, scrub_userinfo

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
ATTACKS = ("idiap", "tinsley", "webster")


def check_report_file(path: str, flag: str = "--out") -> None:
    """The report's file name must end in .html (or .htm); ``flag``: how the caller names it
    (``--out`` of ``raylead report``, ``--report`` of an attack, ``report:`` of a job)."""
    if not path.lower().endswith((".html", ".htm")):
        raise ConfigError(f"{flag} must name an .html file, e.g. report.html; got {path!r}")
    check_file_target(path, flag, "report.html")


@dataclass(frozen=True)
class ReportConfig:
    """``raylead report RESULTS_DIR --out FILE.html [--calibration FILE] [--redact]``."""

    results: str
    out: str
    calibrations: tuple[str, ...] = ()
    redact: bool = False
    page_size: int = 100
    max_identities: int = 200  # Webster: flagged identities shown
    max_pairs: int = 5000  # Idiap top pairs / Tinsley consensus pairs shown (best first)
    samples_per_identity: int = 8
    thumb_size: int = 112
    title: str = "raylead evidence report"
    s3: S3Options | None = field(default=None, compare=False, repr=False, metadata={"config": False})

    def validate(self) -> None:
        check_report_file(self.out)
        for name in ("page_size", "max_identities", "max_pairs", "samples_per_identity"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if not 16 <= self.thumb_size <= 512:
            raise ConfigError(f"thumbnail size must be between 16 and 512 pixels, got {self.thumb_size}")


@dataclass
class ReportResult:
    path: str
    plots: list[str]
    attacks: list[str]
    thumbnails: int
    unavailable_images: int
    seconds: float

    def line(self) -> str:
        """What `raylead report` (and `attack --report`, and their jobs) prints about it."""
        missing = f", {self.unavailable_images} images unavailable (placeholders)" if self.unavailable_images else ""
        return (
            f"report: {self.path} ({', '.join(self.attacks)}; {self.thumbnails} thumbnails{missing}; "
            f"{len(self.plots)} plots as PNG beside it)"
        )


@dataclass
class AttackResult:
    name: str  # folder name relative to RESULTS_DIR ("." for the folder itself)
    loc: Location
    metrics: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.metrics.get("attack", ""))


# ------------------------------------------------------------------------------------------
# reading results
# ------------------------------------------------------------------------------------------


def _loc(uri: str, s3: S3Options | None) -> Location:
    return Location.parse(uri, s3 if uri.startswith("s3://") else None)


def _read_metrics(loc: Location) -> dict[str, Any]:
    data = loc.child(METRICS_FILE).read_json()
    if not isinstance(data, dict) or data.get("attack") not in ATTACKS:
        raise CorruptDataError(
            f"{loc.child(METRICS_FILE).uri} is not the metrics of a raylead attack "
            f"(no 'attack' of {', '.join(ATTACKS)}); rerun the attack"
        )
    return data


def find_results(results: Location) -> list[AttackResult]:
    """The attack result under ``results`` itself, or those in its direct subfolders."""
    if not results.exists():
        raise ConfigError(f"results folder {results.uri} does not exist; give an attack's --out folder")
    if results.child(METRICS_FILE).exists():
        return [AttackResult(".", results, _read_metrics(results))]
    found = []
    try:
        names = sorted(posixpath.basename(str(p).rstrip("/")) for p in results.fs.ls(results.path, detail=False))
    except OSError:
        names = []
    for name in names:
        if name.startswith("."):
            continue
        try:
            sub = results.child(name)
        except RayleadError:
            continue
        if sub.child(METRICS_FILE).exists():
            found.append(AttackResult(name, sub, _read_metrics(sub)))
    if not found:
        raise ConfigError(
            f"{results.uri} has no {METRICS_FILE} and no subfolder with one: give the --out folder of "
            "`raylead attack ...` (or a folder of several)"
        )
    return found


def _arrow(loc: Location, name: str) -> Any:
    """A result table as a pyarrow Table (``None`` when the attack did not write it). Results that
    record their tables' checksums get exactly those tables: a missing one, or one from another
    run or damaged, is refused (the page would show other evidence than its figures)."""
    import pyarrow as pa

    from raylead.catalog import parquet_from_bytes, sha256_bytes

    f = loc.child(name)
    sums = _read_metrics(loc).get("checksums")
    want = sums.get(name) if isinstance(sums, dict) else None
    if want is None and isinstance(sums, dict):
        return None  # this run did not write it (a file by that name is another run's)
    if not f.exists():
        if want is None:
            return None
        raise CorruptDataError(f"{f.uri} is missing (its {METRICS_FILE} lists it); rerun the attack")
    try:
        data = f.read_bytes()
        if want is not None and sha256_bytes(data) != want:
            raise CorruptDataError(
                f"{f.uri} is not the table its {METRICS_FILE} was written with (another run's, or damaged); "
                "rerun the attack"
            )
        return parquet_from_bytes(data)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorruptDataError(
            f"{f.uri} is not a readable Parquet table ({str(exc)[:100]}); rerun the attack"
        ) from None


def _table(loc: Location, name: str) -> list[dict[str, Any]]:
    """Rows of a small result table (``[]`` when the attack did not write it)."""
    t = _arrow(loc, name)
    return [] if t is None else list(t.to_pylist())


def _aside_rows(loc: Location, matcher: str | None = None, limit: int = 50) -> tuple[list[dict[str, Any]], int]:
    """The first ``limit`` set-aside rows (of one matcher) and how many there are."""
    import pyarrow.compute as pc

    t = _arrow(loc, "set_aside.parquet")
    if t is None:
        return [], 0
    if matcher is not None and "matcher" in t.column_names:
        t = t.filter(pc.equal(t.column("matcher"), matcher))
    return list(t.slice(0, limit).to_pylist()), int(t.num_rows)


# ------------------------------------------------------------------------------------------
# HTML helpers
# ------------------------------------------------------------------------------------------


class Scrubber:
    """Removes credentials from text before it enters the report."""

    def __init__(self, s3: S3Options | None) -> None:
        secrets = [os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")]
        if s3 is not None:
            secrets += [s3.access_key, s3.secret_key, s3.session_token]
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = scrub_userinfo(text)
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def json(self, obj: Any) -> Any:
        if isinstance(obj, dict):
            return {self(str(k)): self.json(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self.json(v) for v in obj]
        if isinstance(obj, str):
            return self(obj)
        return obj


def script_json(obj: Any) -> str:
    """JSON safe inside ``<script type="application/json">`` (cannot close the element)."""
    text = json.dumps(obj, ensure_ascii=False, sort_keys=True, allow_nan=False, default=str)
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _num(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return format(x, spec) if math.isfinite(x) else "n/a"
    return str(x)


def _pct(x: Any) -> str:
    return "n/a" if not isinstance(x, int | float) or not math.isfinite(float(x)) else f"{float(x):.1%}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "_", text).strip("_") or "x"


_SCRIPT = """
(function () {
  "use strict";
  function show(pager, n) {
    var cur = pager.getAttribute("data-current");
    if (cur === n) { return; }
    var view = pager.querySelector(".page-view");
    var cache = pager.rayleadCache || (pager.rayleadCache = {});
    var old = document.createDocumentFragment();
    while (view.firstChild) { old.appendChild(view.firstChild); }
    cache[cur] = old;
    var next = cache[n];
    if (!next) {
      var t = pager.querySelector("template[data-page='" + n + "']");
      if (!t) { return; }
      next = document.importNode(t.content, true);
    }
    delete cache[n];
    view.appendChild(next);
    pager.setAttribute("data-current", n);
    var buttons = pager.querySelectorAll("button[data-goto]");
    for (var i = 0; i < buttons.length; i++) {
      buttons[i].setAttribute("aria-current", buttons[i].getAttribute("data-goto") === n ? "page" : "false");
    }
  }
  document.addEventListener("click", function (ev) {
    var b = ev.target && ev.target.closest ? ev.target.closest("button[data-goto]") : null;
    if (!b) { return; }
    var pager = b.closest(".pager");
    if (pager) { show(pager, b.getAttribute("data-goto")); }
  });
})();
"""

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:1em 1.5em;color:#222;background:#fff}
h1{font-size:1.6em;margin:.2em 0}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{margin:1.2em 0 .4em}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.banner{background:#fff3cd;border:1px solid #e0c060;padding:.5em 1em;margin:.5em 0}
.note{color:#555;font-size:.9em}.mono{font-family:ui-monospace,monospace;word-break:break-all}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots img{max-width:100%;border:1px solid #eee}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:.6em}
.card{border:1px solid #ddd;border-radius:6px;padding:.4em;font-size:.8em;background:#fafafa}
.card.hit{border-color:#d62728;background:#fff5f5}.faces{display:flex;gap:.3em}
figure{margin:0;flex:1;min-width:0}figure img,.ph{width:100%;aspect-ratio:1/1;object-fit:cover;display:block;
background:#eee}.ph{display:flex;align-items:center;justify-content:center;text-align:center;font-size:.8em;
color:#900;padding:.3em;box-sizing:border-box;word-break:break-word}
figcaption{word-break:break-all;color:#444;margin-top:.2em}.score{font-weight:bold;font-size:1.1em}
.pages{margin:.4em 0;display:flex;flex-wrap:wrap;gap:.2em}.pages button{padding:.15em .55em;cursor:pointer;
border:1px solid #bbb;background:#fff;border-radius:3px}.pages button[aria-current=page]{background:#1f77b4;
color:#fff;border-color:#1f77b4}.ident{border:1px solid #ddd;border-radius:6px;padding:.5em;margin:.6em 0}
.row{display:flex;flex-wrap:wrap;gap:.5em}.row .card{width:250px}
"""


class Page:
    """Accumulates the HTML of the report; every text goes through :meth:`e`."""

    def __init__(self, cfg: ReportConfig, thumbs: Thumbnails, scrub: Scrubber, out: Location) -> None:
        self.cfg = cfg
        self.thumbs = thumbs
        self.scrub = scrub
        self.out = out
        self.parts: list[str] = []
        self.plots: list[str] = []
        self._pagers = 0

    def e(self, x: Any) -> str:
        return html.escape(self.scrub(str(x)), quote=True)

    def add(self, *parts: str) -> None:
        self.parts.extend(parts)

    def kv_table(self, rows: Iterable[tuple[str, Any]]) -> str:
        body = "".join(f"<tr><th>{self.e(k)}</th><td>{self.e(v)}</td></tr>" for k, v in rows)
        return f"<table>{body}</table>"

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
        head = "".join(f"<th>{self.e(h)}</th>" for h in header)
        body = "".join(
            "<tr>"
            + "".join(
                f"<td class=n>{self.e(v)}</td>" if i in numeric else f"<td>{self.e(v)}</td>" for i, v in enumerate(r)
            )
            + "</tr>"
            for r in rows
        )
        return f"<table><tr>{head}</tr>{body}</table>"

    def figure(self, thumb: Thumb, caption: str, alt: str) -> str:
        if thumb.data_uri is None:
            img = f'<div class=ph title="{self.e(thumb.reason)}">image unavailable: {self.e(thumb.reason)}</div>'
        else:
            img = f'<img src="{thumb.data_uri}" alt="{self.e(alt)}" loading="lazy" decoding="async">'
        return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"

    def plot(self, attack: str, name: str, title: str, png: bytes) -> str:
        """Write the PNG beside the report and return its inline ``<img>``."""
        stem = posixpath.basename(self.out.path)
        stem = stem[: stem.rfind(".")] if "." in stem else stem
        target = self.out.parent().child(f"{stem}.{_slug(attack)}.{_slug(name)}.png")
        target.write_bytes(png)
        self.plots.append(target.uri)
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        return f'<img src="{src}" alt="{self.e(title)}" title="{self.e(title)}">'

    def pager(self, items: Sequence[str], wrap: str = "sheet") -> str:
        """Items split into pages of ``page_size``: page 1 shown, the rest in inert templates."""
        if not items:
            return '<p class="note">none</p>'
        size = self.cfg.page_size
        pages = [items[i : i + size] for i in range(0, len(items), size)]
        self._pagers += 1
        out = [f'<div class="pager" id="pager-{self._pagers}" data-current="1">']
        if len(pages) > 1:
            buttons = "".join(
                f'<button type="button" data-goto="{n}" aria-current="{"page" if n == 1 else "false"}">{n}</button>'
                for n in range(1, len(pages) + 1)
            )
            out.append(
                f'<nav class="pages"><span class="note">{len(items):,} items, {len(pages)} pages of {size}:'
                f"</span>{buttons}</nav>"
            )
        out.append(f'<div class="page-view"><div class="{wrap}">{"".join(pages[0])}</div></div>')
        for n, page in enumerate(pages[1:], start=2):
            out.append(f'<template data-page="{n}"><div class="{wrap}">{"".join(page)}</div></template>')
        out.append("</div>")
        return "".join(out)


# ------------------------------------------------------------------------------------------
# shared sections
# ------------------------------------------------------------------------------------------


def _inputs_table(p: Page, inputs: dict[str, Any]) -> str:
    rows = []
    for role, d in inputs.items():
        if not isinstance(d, dict):
            continue
        fails = ", ".join(f"{k}: {v}" for k, v in (d.get("failures_by_reason") or {}).items()) or "—"
        rows.append(
            [
                role,
                d.get("uri", ""),
                _num(d.get("rows")),
                _num(d.get("ok")),
                _num(d.get("failed")),
                fails,
                _num(d.get("identities")),
            ]
        )
    return p.table(
        ["set", "source", "images", "embedded", "failed", "failures by reason", "identities"],
        rows,
        numeric=(2, 3, 4, 6),
    )


def _threshold_text(th: Any) -> str:
    if not isinstance(th, dict) or th.get("value") is None:
        return "none given (no fraction above θ)"
    src = th.get("source") or "?"
    how = "given with --threshold" if src == "--threshold" else f"calibrated in {src}"
    fmr = f" at FMR {th['fmr']:g}" if isinstance(th.get("fmr"), int | float) else ""
    pairs = f" from {th['impostor_pairs']:,} impostor pairs" if isinstance(th.get("impostor_pairs"), int) else ""
    return f"θ = {float(th['value']):.6f}, {how}{fmr}{pairs}"


def _set_aside_section(p: Page, aside: Any, listed: tuple[list[dict[str, Any]], int]) -> str:
    if not isinstance(aside, dict):
        return ""
    by = ", ".join(f"{k}: {v}" for k, v in (aside.get("by_reason") or {}).items()) or "none"
    parts = [
        f"<p>{p.e(_num(aside.get('count')))} synthetic images set aside, never reported as leaks "
        f"(detector score floor {p.e(_num(aside.get('det_score_floor'), 'g'))}; "
        f"triage filter: {p.e(aside.get('triage') or 'none')}; by reason: {p.e(by)}; "
        f"kept without a detector score: {p.e(_num(aside.get('kept_without_det_score')))}).</p>"
    ]
    rows, total = listed
    if rows:
        cols = [c for c in ("matcher", "image_id", "reason", "det_score") if c in rows[0]]
        parts.append(p.table(cols, [[_num(r.get(c)) if c == "det_score" else r.get(c) for c in cols] for r in rows]))
        if total > len(rows):
            parts.append(f'<p class="note">first {len(rows)} of {total:,}; all in set_aside.parquet</p>')
    return "".join(parts)


def _calibration_plots(p: Page, attack: str, cal: dict[str, Any], where: str) -> str:
    h = cal.get("histogram") or {}
    name = (cal.get("matcher") or {}).get("name", "?")
    th = cal.get("threshold")
    out = [
        f"<h3>Calibration: {p.e(name)} ({p.e(where)})</h3>",
        p.kv_table(
            [
                (
                    "threshold",
                    f"{_num(th, '.6f')} at target FMR {_num(cal.get('fmr_target'), 'g')} "
                    f"(achieved {_num(cal.get('fmr_achieved'), '.3g')})",
                ),
                ("pairs", f"{_num(cal.get('genuine_pairs'))} genuine, {_num(cal.get('impostor_pairs'))} impostor"),
                ("EER", f"{_num(cal.get('eer'), '.4f')} at {_num(cal.get('eer_threshold'), '.4f')}"),
                ("FNMR at θ", _num(cal.get("fnmr_at_threshold"), ".4f")),
            ]
        ),
        '<div class="plots">',
    ]
    if h.get("edges"):
        png = plots.histogram_plot(
            f"genuine vs impostor scores ({name})",
            "cosine similarity",
            [("genuine", h["edges"], h.get("genuine", [])), ("impostor", h["edges"], h.get("impostor", []))],
            threshold=th,
            density=True,
        )
        out.append(p.plot(attack, f"calibration_{name}_scores", "genuine and impostor score histograms", png))
    det = cal.get("det_curve") or {}
    if det.get("thresholds"):
        png = plots.rates_plot(f"FMR / FNMR ({name})", det["thresholds"], det.get("fmr", []), det.get("fnmr", []), th)
        out.append(p.plot(attack, f"calibration_{name}_rates", "FMR and FNMR against the threshold", png))
    out.append("</div>")
    return "".join(out)


def _calibrations_for(
    matcher: str, thresholds: Iterable[Any], given: dict[str, dict[str, Any]], s3: S3Options | None
) -> list[tuple[str, dict[str, Any]]]:
    """Calibrations to show for a matcher: ``--calibration`` files made with it, and the files its
    thresholds came from (``--threshold-from``) when they can still be read."""
    from raylead.attacks.calibrate import read_calibration

    out: dict[str, dict[str, Any]] = {
        uri: cal for uri, cal in given.items() if (cal.get("matcher") or {}).get("name") == matcher
    }
    for th in thresholds:
        src = th.get("source") if isinstance(th, dict) else None
        if src and src != "--threshold" and src not in out:
            try:
                out[src] = read_calibration(src, s3)
            except RayleadError as exc:
                log.warning("calibration %s named by the results cannot be read (%s); not shown", src, exc)
    return sorted(out.items())


def _caption(p: Page, role: str, image_id: Any, identity: Any) -> str:
    ident = f"<br>identity: {p.e(identity)}" if identity is not None else ""
    return f"<b>{p.e(role)}</b> <span class=mono>{p.e(image_id)}</span>{ident}"


def _pair_card(
    p: Page, top: str, left: tuple[str, str | None, Any, Any], right: tuple[str, str | None, Any, Any], hit: bool
) -> str:
    figs = []
    for role, uri, image_id, identity in (left, right):
        thumb = p.thumbs.get(uri, None if image_id is None else str(image_id))
        figs.append(p.figure(thumb, _caption(p, role, image_id, identity), f"{role} {image_id}"))
    cls = "card hit" if hit else "card"
    return f'<div class="{cls}">{top}<div class="faces">{"".join(figs)}</div></div>'


def _uri(inputs: Any, role: str) -> str | None:
    d = inputs.get(role) if isinstance(inputs, dict) else None
    return str(d["uri"]) if isinstance(d, dict) and d.get("uri") else None


# ------------------------------------------------------------------------------------------
# attack sections
# ------------------------------------------------------------------------------------------


def _tag(r: AttackResult) -> str:
    """The section's anchor and the middle part of its PNG names."""
    return r.kind if r.name in (".", r.kind) else f"{r.kind}-{_slug(r.name)}"


def _idiap(p: Page, r: AttackResult, cals: dict[str, dict[str, Any]]) -> None:
    m = r.metrics
    tag = _tag(r)
    matcher = m.get("matcher") or {}
    th = m.get("threshold")
    theta = th.get("value") if isinstance(th, dict) else None
    bm = m.get("best_match") or {}
    eng = m.get("engine") or {}
    p.add(
        f'<h2 id="{p.e(tag)}">Idiap: most similar (training, synthetic) pairs — {p.e(r.name)}</h2>',
        f'<p class="note mono">{p.e(r.loc.uri)}</p>',
        p.kv_table(
            [
                ("matcher", f"{matcher.get('name')} {matcher.get('version', '')} ({matcher.get('dim')}-d)"),
                (
                    "pairs",
                    f"top {_num(m.get('pairs_returned'))} of T×S (asked {_num(m.get('top_k'))}); "
                    f"no identity twice: {_num(bool(m.get('no_identity_twice')))}",
                ),
                (
                    "engine",
                    f"pairs: {eng.get('pairs')} ({eng.get('pairs_reason')}); best match: "
                    f"{eng.get('best_match')} (requested {eng.get('requested')})",
                ),
                ("threshold", _threshold_text(th)),
                ("synthetic images scored", _num(m.get("synthetic_scored"))),
                (
                    "best match ≥ θ",
                    f"{_num(bm.get('count_above_threshold'))} "
                    f"({_pct(bm.get('fraction_above_threshold'))}) of the scored synthetic images; "
                    f"{_num(m.get('pairs_above_threshold'))} of the top pairs",
                ),
                (
                    "pair scores",
                    f"highest {_num((m.get('pairs_score') or {}).get('max'))}, "
                    f"K-th {_num((m.get('pairs_score') or {}).get('min'))}",
                ),
            ]
        ),
        _inputs_table(p, m.get("inputs") or {}),
    )
    aside = _set_aside_section(p, m.get("set_aside"), _aside_rows(r.loc))
    p.add("<h3>Set aside (no usable face, or triage)</h3>", aside)
    series = []
    h = bm.get("histogram") or {}
    if h.get("edges"):
        series.append(("best match of each synthetic image in T", h["edges"], h.get("counts", [])))
    ph = (m.get("pairs_score") or {}).get("histogram") or {}
    if ph.get("edges"):
        series.append(("top-K pair scores", ph["edges"], ph.get("counts", [])))
    p.add("<h3>Best-match scores</h3>", '<div class="plots">')
    if series:
        png = plots.histogram_plot("best-match scores (synthetic → training)", "cosine similarity", series, theta)
        p.add(p.plot(tag, "best_match", "histogram of best-match scores with the threshold", png))
    p.add("</div>")
    for uri, cal in _calibrations_for(str(matcher.get("name")), [th], cals, p.cfg.s3):
        p.add(_calibration_plots(p, tag, cal, uri))
    table = _arrow(r.loc, "pairs.parquet")
    n_pairs = 0 if table is None else int(table.num_rows)
    pairs = [] if table is None else list(table.slice(0, p.cfg.max_pairs).to_pylist())  # best first
    inputs = m.get("inputs") or {}
    t_uri, s_uri = _uri(inputs, "train"), _uri(inputs, "synthetic")
    cards = []
    for row in pairs:
        hit = bool(row.get("above_threshold"))
        top = (
            f'<div><span class="score">{p.e(_num(row.get("score")))}</span> rank {p.e(_num(row.get("rank")))}'
            f"{' · ≥ θ' if hit else ''}</div>"
        )
        cards.append(
            _pair_card(
                p,
                top,
                ("training", t_uri, row.get("train_id"), row.get("train_identity")),
                ("synthetic", s_uri, row.get("synthetic_id"), row.get("synthetic_identity")),
                hit,
            )
        )
    cut = f" (of the {n_pairs:,} in pairs.parquet)" if n_pairs > len(pairs) else ""
    p.add(f"<h3>Contact sheet: the top {len(pairs):,} pairs{cut} (training | synthetic)</h3>", p.pager(cards))


def _tinsley(p: Page, r: AttackResult, cals: dict[str, dict[str, Any]]) -> None:
    m = r.metrics
    tag = _tag(r)
    matchers: dict[str, Any] = m.get("matchers") or {}
    p.add(
        f'<h2 id="{p.e(tag)}">Tinsley: generated faces closer to training than to holdout? — {p.e(r.name)}</h2>',
        f'<p class="note mono">{p.e(r.loc.uri)}</p>',
        p.kv_table(
            [
                ("matchers", ", ".join(matchers)),
                ("engine requested", m.get("engine_requested")),
                ("detector score floor", _num(m.get("det_score_floor"), "g")),
            ]
        ),
        "<h3>Per matcher: AUC and Kolmogorov–Smirnov</h3>",
        p.table(
            [
                "matcher",
                "AUC T vs H",
                "KS",
                "KS p (two-sided)",
                "KS p (T larger)",
                "θ",
                "θ from",
                "≥ θ in T",
                "≥ θ in H",
                "closer to T",
                "scored",
                "set aside",
                "engine",
            ],
            [
                [
                    label,
                    _num(x.get("auc_train_vs_holdout")),
                    _num(x.get("ks_statistic")),
                    _num(x.get("ks_pvalue"), ".3g"),
                    _num(x.get("ks_pvalue_train_greater"), ".3g"),
                    _num(x.get("threshold")),
                    _threshold_text(x.get("threshold_source")),
                    _pct(x.get("fraction_above_threshold_train")),
                    _pct(x.get("fraction_above_threshold_holdout")),
                    _pct(x.get("closer_to_train_fraction")),
                    _num(x.get("synthetic_scored")),
                    _num((x.get("set_aside") or {}).get("count")),
                    x.get("engine"),
                ]
                for label, x in matchers.items()
            ],
            numeric=(1, 2, 3, 4, 5, 7, 8, 9, 10, 11),
        ),
    )
    for label, x in matchers.items():
        mm = x.get("matcher") or {}
        h = x.get("histogram") or {}
        p.add(
            f"<h3>{p.e(label)}: best matches in T and in H</h3>",
            p.kv_table(
                [
                    ("matcher", f"{mm.get('name')} {mm.get('version', '')} ({mm.get('dim')}-d)"),
                    ("threshold", _threshold_text(x.get("threshold_source"))),
                ]
            ),
            _inputs_table(p, x.get("inputs") or {}),
            '<div class="plots">',
        )
        if h.get("edges"):
            png = plots.histogram_plot(
                f"best-match scores of generated images ({label})",
                "cosine similarity",
                [
                    ("best match in T (training)", h["edges"], h.get("train", [])),
                    ("best match in H (holdout)", h["edges"], h.get("holdout", [])),
                ],
                x.get("threshold"),
            )
            p.add(p.plot(tag, f"{label}_train_vs_holdout", f"T and H best-match histograms ({label})", png))
        p.add("</div>")
        for uri, cal in _calibrations_for(str(mm.get("name")), [x.get("threshold_source")], cals, p.cfg.s3):
            p.add(_calibration_plots(p, tag, cal, uri))
    for label, x in matchers.items():
        p.add(
            f"<h3>Set aside ({p.e(label)})</h3>",
            _set_aside_section(p, x.get("set_aside"), _aside_rows(r.loc, label)),
        )
    c = m.get("consensus") or {}
    rows, total = _consensus_rows(r.loc, p.cfg.max_pairs)
    first: dict[str, Any] = next(iter(matchers.values()), {})
    inputs = first.get("inputs") or {}
    t_uri, s_uri = _uri(inputs, "train"), _uri(inputs, "synthetic")
    n_voters = len(c.get("voters") or [])
    cards = []
    for row in rows:
        scores = " · ".join(
            f"{label}: {_num(row.get(f'score_{label}'))}{' ✓' if row.get(f'flagged_{label}') else ''}"
            for label in matchers
        )
        n = int(row.get("n_matchers") or 0)
        top = f'<div><span class="score">{n} of {n_voters} matchers</span><br>{p.e(scores)}</div>'
        cards.append(
            _pair_card(
                p,
                top,
                ("generated", s_uri, row.get("synthetic_id"), None),
                ("training", t_uri, row.get("train_id"), None),
                n_voters > 0 and n == n_voters,
            )
        )
    by = ", ".join(f"{k} matcher(s): {v}" for k, v in (c.get("pairs_by_matcher_count") or {}).items()) or "—"
    cut = f"; the first {len(rows):,} of {total:,}" if total > len(rows) else ""
    p.add(
        "<h3>Pairs flagged by several matchers (consensus)</h3>",
        f"<p>Voting matchers (with a θ): {p.e(', '.join(c.get('voters') or []) or 'none')}. "
        f"{p.e(_num(c.get('pairs_flagged')))} flagged pairs ({p.e(by)}); "
        f"{p.e(_num(c.get('synthetic_images_flagged_by_all')))} generated images are in a pair every voter "
        f"flags. Most matchers first, then highest score{p.e(cut)}.</p>",
        p.pager(cards),
    )


def _consensus_rows(loc: Location, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Consensus pairs, most matchers first, then highest score under any matcher; at most ``limit``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = _arrow(loc, "consensus.parquet")
    if t is None or t.num_rows == 0:
        return [], 0
    scores = [pc.fill_null(pc.cast(t.column(c), pa.float64()), -2.0) for c in t.column_names if c.startswith("score_")]
    scores = [pc.if_else(pc.is_nan(s), -2.0, s) for s in scores]
    best = pc.max_element_wise(*scores) if scores else pa.array([-2.0] * t.num_rows)
    t = t.append_column("_best", best)
    order = pc.sort_indices(t, sort_keys=[("n_matchers", "descending"), ("_best", "descending")])
    top = t.take(order.slice(0, limit))
    return list(top.drop_columns(["_best"]).to_pylist()), int(t.num_rows)


def _webster(p: Page, r: AttackResult) -> None:
    m = r.metrics
    tag = _tag(r)
    matcher = m.get("matcher") or {}
    alphas: dict[str, Any] = m.get("alphas") or {}
    p.add(
        f'<h2 id="{p.e(tag)}">Webster: identity membership from sample counts — {p.e(r.name)}</h2>',
        f'<p class="note mono">{p.e(r.loc.uri)}</p>',
        p.kv_table(
            [
                ("matcher", f"{matcher.get('name')} {matcher.get('version', '')} ({matcher.get('dim')}-d)"),
                ("classifier", f"{m.get('classifier')}; open-set rejection below {_num(m.get('reject_below'))}"),
                (
                    "query identities",
                    f"{_num(m.get('n_queries'))} ({_num(m.get('n_references'))} reference photos; "
                    f"{len(m.get('queries_without_references') or [])} without a usable one)",
                ),
                (
                    "samples",
                    f"{_num(m.get('n_samples'))} scored, {_num(m.get('samples_rejected'))} rejected (open set)",
                ),
                ("ground truth", "given" if m.get("members_given") else "not given (no precision/recall)"),
                ("random-guess precision", _num(m.get("random_precision"))),
                ("average precision", _num((m.get("pr_curve") or {}).get("average_precision"))),
            ]
        ),
        _inputs_table(p, m.get("inputs") or {}),
        "<h3>Set aside (no usable face, or triage)</h3>",
        _set_aside_section(p, m.get("set_aside"), _aside_rows(r.loc)),
        "<h3>Thresholds τ = α·N/|Q|</h3>",
        p.table(
            ["α", "τ", "flagged", "precision", "recall", "F1", "TP", "FP", "FN"],
            [
                [
                    k,
                    _num(a.get("tau"), ".2f"),
                    _num(a.get("n_flagged")),
                    _num(a.get("precision")),
                    _num(a.get("recall")),
                    _num(a.get("f1")),
                    _num(a.get("tp")),
                    _num(a.get("fp")),
                    _num(a.get("fn")),
                ]
                for k, a in alphas.items()
            ],
            numeric=(1, 2, 3, 4, 5, 6, 7, 8),
        ),
        '<div class="plots">',
    )
    counts = _table(r.loc, "counts.parquet")
    if counts:
        png = plots.counts_plot(
            [str(c.get("identity")) for c in counts],
            [int(c.get("count") or 0) for c in counts],
            [c.get("member") for c in counts],
            [(k, float(a["tau"])) for k, a in alphas.items() if "tau" in a],
        )
        p.add(p.plot(tag, "counts", "samples identified per query identity with the τ lines", png))
    pr = m.get("pr_curve")
    if isinstance(pr, dict) and pr.get("recall"):
        png = plots.pr_plot(
            pr["recall"],
            pr.get("precision", []),
            m.get("random_precision"),
            [(k, a.get("recall"), a.get("precision")) for k, a in alphas.items()],
        )
        p.add(p.plot(tag, "pr_curve", "precision–recall curve over τ", png))
    p.add("</div>")
    inputs = m.get("inputs") or {}
    q_uri, s_uri = _uri(inputs, "queries"), _uri(inputs, "samples")
    by_id = {str(c.get("identity")): c for c in counts}
    flagged: list[str] = []
    for a in alphas.values():
        flagged += [str(x) for x in a.get("flagged") or [] if str(x) not in flagged]
    flagged.sort(key=lambda q: -int((by_id.get(q) or {}).get("count") or 0))
    shown = flagged[: p.cfg.max_identities]
    assignments: dict[str, list[dict[str, Any]]] = {}
    wanted = set(shown)
    table = _arrow(r.loc, "assignments.parquet")
    if table is not None and wanted:
        import pyarrow as pa
        import pyarrow.compute as pc

        table = table.filter(pc.is_in(table.column("identity"), value_set=pa.array(sorted(wanted), pa.string())))
        for row in table.to_pylist():
            assignments.setdefault(str(row.get("identity")), []).append(row)
    blocks = []
    for q in shown:
        c = by_id.get(q) or {}
        rows = sorted(assignments.get(q, []), key=lambda x: -float(x.get("similarity") or 0.0))
        cards = []
        for row in rows[: p.cfg.samples_per_identity]:
            top = (
                f"<div>similarity {p.e(_num(row.get('similarity')))} · nearest reference "
                f"{p.e(_num(row.get('nearest_reference_score')))}</div>"
            )
            cards.append(
                _pair_card(
                    p,
                    top,
                    ("sample", s_uri, row.get("sample_id"), None),
                    ("reference", q_uri, row.get("nearest_reference_id"), q),
                    False,
                )
            )
        member = c.get("member")
        mark = "" if member is None else (" · member (in training)" if member else " · not a member")
        alphas_hit = ", ".join(k for k, a in alphas.items() if q in (a.get("flagged") or []))
        more = f" (first {len(cards)} of {len(rows)})" if len(rows) > len(cards) else ""
        blocks.append(
            f'<div class="ident"><b>{p.e(q)}</b>: {p.e(_num(c.get("count")))} samples{p.e(mark)}; flagged at '
            f'α = {p.e(alphas_hit)}{p.e(more)}<div class="row">{"".join(cards)}</div></div>'
        )
    note = f" (the {len(shown)} most counted of {len(flagged)})" if len(flagged) > len(shown) else ""
    p.add(
        f"<h3>Flagged identities: samples beside their nearest reference photos{p.e(note)}</h3>",
        p.pager(blocks, wrap="idents"),
    )


# ------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------

_RENDER: dict[str, Callable[[Page, AttackResult, dict[str, dict[str, Any]]], None]] = {
    "idiap": _idiap,
    "tinsley": _tinsley,
    "webster": lambda p, r, _c: _webster(p, r),
}


def _summary(p: Page, results: list[AttackResult]) -> None:
    rows = []
    for r in results:
        m = r.metrics
        if r.kind == "tinsley":
            ms = m.get("matchers") or {}
            matcher = ", ".join(ms)
            first: dict[str, Any] = next(iter(ms.values()), {})
            inputs, aside = (
                first.get("inputs") or {},
                sum(int((x.get("set_aside") or {}).get("count") or 0) for x in ms.values()),
            )
            th = "; ".join(f"{k}: {_threshold_text(x.get('threshold_source'))}" for k, x in ms.items())
            engine = m.get("engine_requested")
        else:
            matcher = (m.get("matcher") or {}).get("name", "")
            inputs = m.get("inputs") or {}
            aside = int((m.get("set_aside") or {}).get("count") or 0)
            th = (
                _threshold_text(m.get("threshold"))
                if r.kind == "idiap"
                else ", ".join(f"α={k}: τ={_num(a.get('tau'), '.2f')}" for k, a in (m.get("alphas") or {}).items())
            )
            engine = (m.get("engine") or {}).get("pairs") if r.kind == "idiap" else m.get("classifier")
        sets = "; ".join(
            f"{k}: {_num(v.get('ok'))}/{_num(v.get('rows'))}" for k, v in inputs.items() if isinstance(v, dict)
        )
        created = m.get("created")
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(created)) if isinstance(created, int | float) else "?"
        rows.append([r.kind, r.name, when, sets, aside, matcher, engine, th])
    p.add(
        "<h2>Run summary</h2>",
        p.table(
            [
                "attack",
                "folder",
                "run",
                "embedded / images per set",
                "set aside",
                "matcher(s)",
                "engine / classifier",
                "thresholds and where they came from",
            ],
            rows,
            numeric=(4,),
        ),
    )


def build_report(cfg: ReportConfig) -> ReportResult:
    """Read the results under ``cfg.results``, write ``cfg.out`` and its PNGs; return what was written."""
    from raylead.attacks.calibrate import read_calibration

    cfg.validate()
    t0 = time.perf_counter()
    results_loc = _loc(cfg.results, cfg.s3)
    out = _loc(cfg.out, cfg.s3)
    results = find_results(results_loc)
    cals = {uri: read_calibration(uri, cfg.s3) for uri in cfg.calibrations}
    scrub = Scrubber(cfg.s3)
    thumbs = Thumbnails(cfg.s3, cfg.thumb_size, cfg.redact)
    p = Page(cfg, thumbs, scrub, out)
    toc = "".join(f'<li><a href="#{p.e(_tag(r))}">{p.e(r.kind)} — {p.e(r.name)}</a></li>' for r in results)
    p.add(
        f"<h1>{p.e(cfg.title)}</h1>",
        f'<p class="note">results: <span class="mono">{p.e(results_loc.uri)}</span> · written '
        f"{p.e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))}</p>",
    )
    if cfg.redact:
        p.add('<p class="banner">Faces are redacted (pixelated and blurred) for sharing.</p>')
    p.add(f"<ul>{toc}</ul>")
    _summary(p, results)
    for r in results:
        log.info("report: %s results in %s", r.kind, r.loc.uri)
        _RENDER[r.kind](p, r, cals)
    if thumbs.failed:
        p.add(f'<p class="note">{thumbs.failed:,} images could not be shown; each placeholder says why.</p>')
    data = scrub.json(
        {
            "results": [{"attack": r.kind, "folder": r.name, "uri": r.loc.uri, "metrics": r.metrics} for r in results],
            "redacted": cfg.redact,
        }
    )
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")
    csp = (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'"
    )
    doc = "".join(
        [
            "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>",
            f'<meta http-equiv="Content-Security-Policy" content="{html.escape(csp, quote=True)}">',
            '<meta name="referrer" content="no-referrer">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{p.e(cfg.title)}</title><style>{_CSS}</style></head><body>",
            *p.parts,
            f'<script type="application/json" id="raylead-results">{script_json(_finite(data))}</script>',
            f"<script>{_SCRIPT}</script></body></html>\n",
        ]
    )
    out.write_bytes(doc.encode("utf-8"))
    took = time.perf_counter() - t0
    log.info("report written to %s (%d plots, %d thumbnails, %.1fs)", out.uri, len(p.plots), thumbs.loaded, took)
    return ReportResult(out.uri, p.plots, [r.kind for r in results], thumbs.loaded, thumbs.failed, took)


def _finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


__all__ = ["ReportConfig", "ReportResult", "build_report", "find_results", "script_json"]

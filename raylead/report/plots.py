"""The report's plots: matplotlib (Agg) figures → PNG bytes.

Every function takes plain numbers (from ``metrics.json``, a calibration file or a result table)
and returns the PNG; :mod:`raylead.report` writes each beside the report and embeds it inline.
All text is drawn literally (:func:`literal_text`): names such as ``A$AP_$Rocky`` are not mathtext.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

_COLOURS = {"a": "#1f77b4", "b": "#d62728", "c": "#2ca02c", "grey": "#7f7f7f"}


@contextlib.contextmanager
def literal_text() -> Iterator[None]:
    """Within it, matplotlib draws every text literally: a ``$`` in a title, label, legend or tick
    label (identity folder names, matcher specs) is a dollar sign, never the start of mathtext
    (which would render it wrongly or raise ``ValueError``). Also usable as a decorator.

    Wrap the whole figure's life, creation to ``savefig``: tick labels are made at draw time.
    """
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):
        yield


def _figure(width: float = 6.4, height: float = 3.4) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    return fig, ax


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _bars(ax: Any, edges: Sequence[float], counts: Sequence[float] | np.ndarray, **kw: Any) -> None:
    e = np.asarray(edges, np.float64)
    c = np.asarray(counts, np.float64)
    if e.size < 2 or c.size != e.size - 1:
        return
    ax.stairs(c, e, **kw)


def _threshold_line(ax: Any, value: float | None, label: str = "θ") -> None:
    if value is None:
        return
    ax.axvline(float(value), color="black", linestyle="--", linewidth=1.2, label=f"{label} = {value:.4f}")


@literal_text()
def histogram_plot(
    title: str,
    xlabel: str,
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    threshold: float | None = None,
    threshold_label: str = "θ",
    density: bool = False,
) -> bytes:
    """Overlaid step histograms: ``series`` = [(label, edges, counts)]; an optional θ line."""
    fig, ax = _figure()
    colours = [_COLOURS["a"], _COLOURS["b"], _COLOURS["c"], _COLOURS["grey"]]
    for i, (label, edges, counts) in enumerate(series):
        c = np.asarray(counts, np.float64)
        if density and c.sum() > 0:
            widths = np.diff(np.asarray(edges, np.float64))
            c = c / (c.sum() * np.where(widths > 0, widths, 1.0))
        style: dict[str, Any] = (
            {"fill": True, "alpha": 0.35, "linewidth": 0} if i == 0 else {"fill": False, "linewidth": 1.6}
        )
        _bars(ax, edges, c, label=f"{label} (n={int(np.sum(counts))})", color=colours[i % 4], **style)
    _threshold_line(ax, threshold, threshold_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density" if density else "count")
    if series or threshold is not None:
        ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


@literal_text()
def rates_plot(
    title: str, thresholds: Sequence[float], fmr: Sequence[float], fnmr: Sequence[float], threshold: float | None = None
) -> bytes:
    """FMR and FNMR against the threshold (log scale), with the operating θ."""
    fig, ax = _figure()
    t = np.asarray(thresholds, np.float64)
    floor = 1e-7
    ax.plot(t, np.maximum(np.asarray(fmr, np.float64), floor), color=_COLOURS["b"], label="FMR (impostors ≥ t)")
    ax.plot(t, np.maximum(np.asarray(fnmr, np.float64), floor), color=_COLOURS["a"], label="FNMR (genuine < t)")
    ax.set_yscale("log")
    _threshold_line(ax, threshold)
    ax.set_title(title)
    ax.set_xlabel("threshold (cosine)")
    ax.set_ylabel("rate")
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


@literal_text()
def counts_plot(
    identities: Sequence[str],
    counts: Sequence[int],
    members: Sequence[bool | None],
    taus: Sequence[tuple[str, float]],
    max_bars: int = 200,
) -> bytes:
    """Webster: samples per query identity (sorted), members coloured, one line per τ."""
    order = np.argsort(-np.asarray(counts, np.int64), kind="stable")[:max_bars]
    c = np.asarray(counts, np.int64)[order]
    known = any(m is not None for m in members)
    colours = [(_COLOURS["b"] if members[i] else _COLOURS["a"]) if known else _COLOURS["grey"] for i in order]
    fig, ax = _figure(7.2, 3.6)
    x = np.arange(c.size)
    ax.bar(x, c, color=colours, width=0.85)
    styles = ["--", ":", "-.", "-"]
    for j, (label, tau) in enumerate(taus):
        ax.axhline(tau, color="black", linestyle=styles[j % 4], linewidth=1.1, label=f"τ (α={label}) = {tau:.2f}")
    if known:
        from matplotlib.patches import Patch

        handles, labels = ax.get_legend_handles_labels()
        handles += [Patch(color=_COLOURS["b"]), Patch(color=_COLOURS["a"])]
        labels += ["member (in training)", "non-member"]
        ax.legend(handles, labels, loc="upper right", fontsize=8)
    elif taus:
        ax.legend(loc="upper right", fontsize=8)
    if c.size <= 40:
        ax.set_xticks(x)
        ax.set_xticklabels([str(identities[i])[:18] for i in order], rotation=70, fontsize=6)
    else:
        ax.set_xticks([])
    shown = "" if len(counts) <= max_bars else f" (top {max_bars} of {len(counts)})"
    ax.set_title(f"samples identified per query identity{shown}")
    ax.set_ylabel("samples")
    return _png(fig)


@literal_text()
def pr_plot(
    recall: Sequence[float | None],
    precision: Sequence[float | None],
    random_precision: float | None,
    points: Sequence[tuple[str, float | None, float | None]] = (),
) -> bytes:
    """Webster: precision–recall over τ, the random baseline and the α operating points."""
    fig, ax = _figure(4.8, 3.6)
    pairs = [(r, p) for r, p in zip(recall, precision, strict=False) if r is not None and p is not None]
    if pairs:
        r, p = zip(*pairs, strict=True)
        ax.plot(r, p, marker="o", markersize=3, color=_COLOURS["a"], label="count > τ")
    if random_precision is not None:
        ax.axhline(random_precision, color=_COLOURS["grey"], linestyle="--", label=f"random {random_precision:.3f}")
    for label, rr, pp in points:
        if rr is not None and pp is not None:
            ax.plot([rr], [pp], marker="s", color=_COLOURS["b"], linestyle="none")
            ax.annotate(f"α={label}", (rr, pp), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("precision–recall over τ")
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)

"""PNG plots of a benchmark run: per (op, dtype), forward+backward time and peak extra memory against the
vocabulary size (at the largest token count) and against the token count (at the largest vocabulary), one
line per variant, log-log. An axis the run measured at one value only (e.g. a single vocabulary) gets no row.

Every variant stays visible where curves coincide (the compiled naive loss and the fused kernel add the same
memory, one [N, V] gradient): each has its own hollow marker, marker size and dash pattern, so coinciding points
show as nested markers and coinciding lines as two dash patterns. Ticks are plain numbers: the x axis at the
measured sizes, the y axis at 1-2-5 steps.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator  # noqa: E402

METRICS = (("fwd_bwd_ms", "forward+backward (ms)"), ("peak_extra_mb", "peak extra memory (MB)"))
AXES = (("vocab", "tokens"), ("tokens", "vocab"))  # (x axis, the dimension held at its largest value)
# (marker, dash pattern) per variant, in the run's order; markers shrink from one variant to the next
STYLES = (("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", (0, (6, 2))), ("P", (0, (1, 3))), ("X", (0, (4, 1, 1, 1))))
LARGEST_MARKER, MARKER_STEP, SMALLEST_MARKER = 11.0, 2.5, 4.0


def plain_number(value: float, _position: object = None) -> str:
    """A tick label without powers of ten: 262,144; 600; 0.5."""
    return f"{value:,.0f}" if value >= 1 else f"{value:.2g}"


def _style(index: int) -> dict:
    marker, linestyle = STYLES[index % len(STYLES)]
    size = max(SMALLEST_MARKER, LARGEST_MARKER - MARKER_STEP * index)
    return dict(marker=marker, linestyle=linestyle, markersize=size, markerfacecolor="none", markeredgewidth=1.5,
                linewidth=1.5)


def _plain_log_axes(ax, x_values: list[float]) -> None:
    """Log-log axes with plain-number ticks: the x axis at ``x_values``, the y axis at 1-2-5 steps."""
    ax.set(xscale="log", yscale="log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(x_values))))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(plain_number))
    ax.tick_params(axis="x", labelrotation=30)  # neighbours such as 128,256 and 151,936 stay apart
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(LogLocator(subs="all"))
    ax.yaxis.set_major_formatter(FuncFormatter(plain_number))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _plotted_op(row: dict) -> str:
    """What a plot is of: the op, for the divergence ops its divergence ("divergence-jsd"), for the sparse op its K
    ("sparse_divergence-forward_kl-k64")."""
    return row["op"] + (f"-{row['divergence']}" if row.get("divergence") else "") + (f"-k{row['k']}" if row.get("k")
                                                                                      else "")


def plot_results(rows: list[dict], title: str, out: Path) -> list[Path]:
    """Write ``plot-<op>-<dtype>.png`` files under ``out`` (``plot-divergence-<divergence>-<dtype>.png`` for the
    divergence op); return their paths."""
    ok = [r for r in rows if r["status"] == "ok"]
    paths = []
    for op, dtype in sorted({(_plotted_op(r), r["dtype"]) for r in ok}):
        group = [r for r in ok if _plotted_op(r) == op and r["dtype"] == dtype]
        variants = list(dict.fromkeys(r["variant"] for r in group))
        varied = [(x, fixed) for x, fixed in AXES if len({r[x] for r in group}) > 1] or list(AXES[:1])
        fig, axes = plt.subplots(len(varied), len(METRICS), figsize=(11, 4 * len(varied)), squeeze=False)
        for i, (x_key, fixed_key) in enumerate(varied):
            fixed = max(r[fixed_key] for r in group)
            for j, (metric, label) in enumerate(METRICS):
                ax = axes[i][j]
                for index, variant in enumerate(variants):
                    points = sorted((r[x_key], r[metric]) for r in group if r["variant"] == variant and r[fixed_key] == fixed)
                    if points:
                        ax.plot(*zip(*points), label=variant, **_style(index))
                _plain_log_axes(ax, [r[x_key] for r in group])
                ax.set(xlabel=x_key, ylabel=label, title=f"{label} vs {x_key} ({fixed_key} = {fixed:,})")
                ax.grid(True, which="major", alpha=0.4)
                ax.grid(True, which="minor", alpha=0.15)
                ax.legend(fontsize=8)
        fig.suptitle(f"{op}, {dtype}\n{title}", fontsize=9)
        fig.tight_layout()
        path = out / f"plot-{op}-{dtype}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths

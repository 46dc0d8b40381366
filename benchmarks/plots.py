"""PNG plots of a benchmark run: per (op, dtype), forward+backward time and peak extra memory against the
vocabulary size (at the largest token count) and against the token count (at the largest vocabulary), one
line per variant, log-log. An axis the run measured at one value only (e.g. a single vocabulary) gets no row."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

METRICS = (("fwd_bwd_ms", "forward+backward (ms)"), ("peak_extra_mb", "peak extra memory (MB)"))
AXES = (("vocab", "tokens"), ("tokens", "vocab"))  # (x axis, the dimension held at its largest value)


def plot_results(rows: list[dict], title: str, out: Path) -> list[Path]:
    """Write ``plot-<op>-<dtype>.png`` files under ``out``; return their paths."""
    ok = [r for r in rows if r["status"] == "ok"]
    paths = []
    for op, dtype in sorted({(r["op"], r["dtype"]) for r in ok}):
        group = [r for r in ok if r["op"] == op and r["dtype"] == dtype]
        variants = list(dict.fromkeys(r["variant"] for r in group))
        varied = [(x, fixed) for x, fixed in AXES if len({r[x] for r in group}) > 1] or list(AXES[:1])
        fig, axes = plt.subplots(len(varied), len(METRICS), figsize=(11, 4 * len(varied)), squeeze=False)
        for i, (x_key, fixed_key) in enumerate(varied):
            fixed = max(r[fixed_key] for r in group)
            for j, (metric, label) in enumerate(METRICS):
                ax = axes[i][j]
                for variant in variants:
                    points = sorted((r[x_key], r[metric]) for r in group if r["variant"] == variant and r[fixed_key] == fixed)
                    if points:
                        ax.plot(*zip(*points), marker="o", label=variant)
                ax.set(xscale="log", yscale="log", xlabel=x_key, ylabel=label, title=f"{label} vs {x_key} ({fixed_key} = {fixed})")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle(f"{op}, {dtype}\n{title}", fontsize=9)
        fig.tight_layout()
        path = out / f"plot-{op}-{dtype}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths

"""Plots and the README table from a `benchmarks/run.py` results file.

    python benchmarks/plot.py                       # newest results in benchmarks/results: both PNGs
    python benchmarks/plot.py RESULTS.json --markdown

Writes `<stem>-speedup.png` (throughput of every implementation relative to the config's peer, per n) and
`<stem>-memory.png` (peak training memory per n, log scale) next to the results file (or into `--out-dir`), titled
with the card. `--markdown` prints the README table and the target summary. Without matplotlib the PNGs are skipped
(and said so) and the table still prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules when run as a script

import bench_report as report  # noqa: E402


RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Configs whose records line up along n (masked and large have one or two points: the table covers them).
PLOTTED_CONFIGS = ("seed", "io")


def _series(records: list[dict], config: str, value) -> dict[str, list[tuple[int, float]]]:
    """impl -> [(n, value)] for the measured, unmasked records of `config` where `value(record)` is not None."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r["config"] != config or r.get("masked") or not report.measured(r):
            continue
        y = value(r)
        if y is not None:
            series.setdefault(r["impl"], []).append((r["n"], y))
    return {impl: sorted(points) for impl, points in series.items()}


def _panel_figure(plt, results: dict, stem: str, out_dir: Path, kind: str, title: str, value, decorate) -> Path:
    """One panel per plotted config: `value(record)` per n for every impl, `decorate(ax, config)` adds the rest."""
    records = results["records"]
    configs = [c for c in PLOTTED_CONFIGS if any(r["config"] == c for r in records)] or list(PLOTTED_CONFIGS)
    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4.5), squeeze=False)
    plotted = False
    for ax, config in zip(axes[0], configs):
        for impl, points in _series(records, config, value).items():
            plotted = True
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
        decorate(ax, config)
        ax.set_xscale("log", base=2)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    if not plotted:  # e.g. no peer measured, or a CPU run (no peak memory)
        fig.text(0.5, 0.5, f"no {kind} data in this run", ha="center", va="center")
    fig.suptitle(f"{title} on {results['card']} ({results['date']})")
    fig.tight_layout()
    path = out_dir / f"{stem}-{kind}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(results: dict, stem: str, out_dir: Path) -> list[Path]:
    """Write the two PNGs; returns their paths. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a GPU box or in CI
    import matplotlib.pyplot as plt

    records = results["records"]

    def speedup_axes(ax, config):
        peer = report.PEER_OF_CONFIG[config]
        ax.axhline(1.0, color="grey", linewidth=0.8)
        if config == "seed":
            ax.axhline(report.TARGET_SEED_SPEEDUP_DEFAULT, color="red", linestyle="--", linewidth=0.8,
                       label=f"target {report.TARGET_SEED_SPEEDUP_DEFAULT:g}x (default path)")
            ax.axhline(report.TARGET_SEED_SPEEDUP, color="red", linestyle=":", linewidth=0.8,
                       label=f"target {report.TARGET_SEED_SPEEDUP:g}x (fast path)")
        else:
            ax.axhline(report.TARGET_IO_SPEEDUP, color="red", linestyle="--", linewidth=0.8,
                       label=f"target {report.TARGET_IO_SPEEDUP:g}x")
        ax.set_xlabel("input length n")
        ax.set_ylabel(f"throughput / {peer}")
        ax.set_title(f"{config}: speedup vs {peer}")

    def memory_axes(ax, config):
        ax.set_yscale("log")
        ax.set_xlabel("input length n (batch per the protocol)")
        ax.set_ylabel("peak memory (GiB)")
        ax.set_title(f"{config}: peak training memory")

    return [
        _panel_figure(plt, results, stem, out_dir, "speedup", "Training-step speedup",
                      lambda r: report.speedup(records, r), speedup_axes),
        _panel_figure(plt, results, stem, out_dir, "memory", "Peak training memory",
                      lambda r: r.get("peak_gib"), memory_axes),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", default=None,
                        help=f"results JSON (default: the newest in {RESULTS_DIR}, smoke runs only if nothing else)")
    parser.add_argument("--out-dir", default=None, help="where the PNGs go (default: next to the results file)")
    parser.add_argument("--markdown", action="store_true", help="print the README table and the target summary")
    parser.add_argument("--no-png", action="store_true", help="only the table (with --markdown)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.results) if args.results else report.newest_results(RESULTS_DIR)
    results = report.load(path)
    stem = path.stem
    out_dir = Path(args.out_dir) if args.out_dir else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_png:
        try:
            for written in render(results, stem, out_dir):
                print(f"wrote {written}")
        except ImportError:
            print("matplotlib is not installed: PNGs skipped (pip install matplotlib, or the `bench` extra)")
    if args.markdown:
        print()
        print(report.markdown_table(results))
        print()
        for line in report.summary_lines(results):
            print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

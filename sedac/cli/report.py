"""Benchmark reports: a directory with report.json, report.md and PNG plots, stamped with the machine they ran on.

Every bench builds its results dict, its markdown tables and its figures; this module writes them and holds the
plot helpers they share, so all plots look alike (size, fonts, labelled axes, a legend when several series).
"""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")  # files only: bench hosts have no display, and pyplot must not pick a GUI backend
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from sedac.models.cpu_kernels import cpu_description  # noqa: E402

FIGSIZE = (7, 4.5)
DPI = 120
matplotlib.rcParams.update({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10})


def machine() -> dict:
    """Where the numbers come from: a report is only comparable with another from the same machine and commit."""
    from sedac import __version__

    return {
        "cpu": cpu_description()[0],
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "sedac": __version__,
        "commit": _git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _git_commit() -> str:
    """The checkout the package runs from, "-dirty" when it has uncommitted changes; "unknown" for an
    installed wheel (no repository around it)."""
    package_dir = Path(__file__).resolve().parents[2]
    try:
        head, status = (
            subprocess.run(["git", *args], cwd=package_dir, capture_output=True, text=True, timeout=10)
            for args in (["rev-parse", "--short", "HEAD"], ["status", "--porcelain", "-uno"])
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0 or not head.stdout.strip():
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def _machine_line(m: dict) -> str:
    gpu = f"GPU {m['gpu']}" if m["gpu"] else "no GPU"
    return (
        f"Machine: {m['cpu']}, {m['threads']} torch threads, {gpu}; torch {m['torch']}, sedac {m['sedac']}, "
        f"commit {m['commit']}, {m['date']}"
    )


def write_report(directory, title: str, results: dict, markdown_body: str, figures: dict) -> Path:
    """DIRECTORY/report.json (results and the machine), report.md (title, machine, tables, plots) and NAME.png
    per figure; echoes the title and tables to the terminal. Returns report.md's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = machine()
    (directory / "report.json").write_text(json.dumps({**results, "machine": info}, indent=2))
    links = []
    for name, fig in figures.items():
        fig.savefig(directory / f"{name}.png", dpi=DPI, bbox_inches="tight")
        links.append(f"![{figure_title(fig) or name}]({name}.png)")
        plt.close(fig)
    text = "\n\n".join([f"# {title}", _machine_line(info), markdown_body.rstrip("\n"), *links]) + "\n"
    (directory / "report.md").write_text(text)
    click.echo(f"# {title}\n\n{markdown_body.rstrip()}")
    click.echo(f"wrote {directory}/report.md, report.json and {len(figures)} plots", err=True)
    return directory / "report.md"


def figure_title(fig) -> str:
    """The figure's suptitle, else its first axes' title."""
    return fig.get_suptitle() or (fig.axes[0].get_title() if fig.axes else "")


def new_axes(title: str, xlabel: str, ylabel: str, figsize=FIGSIZE):
    fig, ax = plt.subplots(figsize=figsize)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return fig, ax


def grouped_bars(title: str, xlabel: str, ylabel: str, groups: list[str], series: dict[str, list]):
    """One cluster of bars per group, one bar (and colour) per series; missing values (None) leave a gap.
    Bars carry their value, so the plot reads without the table."""
    fig, ax = new_axes(title, xlabel, ylabel)
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(
            [x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None], width, label=name
        )
        ax.bar_label(bars, fmt="%.4g", fontsize=9, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.margins(y=0.12)  # room for the value labels above the tallest bar
    _rotate_long_ticks(ax, groups)
    if len(series) > 1:
        ax.legend()
    return fig


def labelled_scatter(title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple[str, float, float]]]):
    """Points (label, x, y) per series, each point annotated with its label."""
    fig, ax = new_axes(title, xlabel, ylabel)
    ax.grid(alpha=0.3)
    for name, points in series.items():
        ax.scatter([x for _, x, _ in points], [y for _, _, y in points], label=name, s=40, zorder=3)
    ax.margins(x=0.15, y=0.12)  # room for the annotations at the edges
    _annotate(ax, [point for points in series.values() for point in points])
    if len(series) > 1:
        ax.legend()
    return fig


def lines(title: str, xlabel: str, ylabel: str, xs: list, series: dict[str, list]):
    """One marked line per series over the same x values (a sweep: throughput against concurrency)."""
    fig, ax = new_axes(title, xlabel, ylabel)
    ax.grid(alpha=0.3)
    for name, values in series.items():
        ax.plot(xs, values, marker="o", label=name)
    ax.set_xticks(xs, [str(x) for x in xs])
    if len(series) > 1:
        ax.legend()
    return fig


def _annotate(ax, points: list[tuple[str, float, float]]) -> None:
    """Each label right of its point, except where a point lies close to one already labelled (fp16 beside
    bf16, off beside lossless): that label goes left, so the two do not run into each other."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    placed = []
    for label, x, y in sorted(points, key=lambda p: p[2]):
        u, v = (x - x0) / (x1 - x0), (y - y0) / (y1 - y0)  # axes fractions: closeness as it looks
        crowded = any(abs(u - pu) < 0.15 and abs(v - pv) < 0.06 for pu, pv in placed)
        ax.annotate(
            label,
            (x, y),
            textcoords="offset points",
            xytext=(-6 if crowded else 6, 4),
            fontsize=9,
            ha="right" if crowded else "left",
        )
        placed.append((u, v))


def histograms(title: str, panels: list[tuple[str, str, list[float]]], figsize=(10, 4)):
    """One histogram per panel (x label, y label, values), side by side, each on its own x scale (TTFT and
    ITL differ by orders of magnitude)."""
    fig, axes = plt.subplots(1, len(panels), figsize=figsize, squeeze=False)
    fig.suptitle(title)
    for ax, (xlabel, ylabel, values) in zip(axes[0], panels):
        ax.hist(values, bins=min(30, max(5, len(values) // 4)))
        ax.set_title(xlabel.split(" (")[0])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _rotate_long_ticks(ax, labels: list[str]) -> None:
    if len(labels) * max(map(len, labels), default=0) > 50:
        ax.tick_params(axis="x", labelrotation=30)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")

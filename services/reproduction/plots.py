"""The plots of `rpo reproduce` (PNG, matplotlib without a display): validation accuracy against training
time (cache initialisation counted), decoded tokens per step, and response length over steps (the paper's
stability claim). One line per arm, from its first seed's run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.reproduction.results import curve

PLOTS = {
    "accuracy_vs_time.png": "validation pass@1 against training time",
    "decoded_tokens_per_step.png": "tokens the replicas decoded per step",
    "response_length.png": "mean response length (reused prefix included) per step",
    "cut_at_budget.png": "share of responses cut at their budget (no answer) per step",
}
"""The plots by file name, with their titles; the last is drawn only for records whose steps kept it."""


def first_seed_rows(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each arm's run at its first seed: what the plots draw."""
    return {name: by_seed[min(by_seed, key=int)] for name, by_seed in results["runs"].items()}


def plot_names(results: dict[str, Any]) -> list[str]:
    """The plots `write_plots` draws for this record (the cut share only where every arm's steps kept it)."""
    rows = first_seed_rows(results).values()
    cut = all("truncated_ratio" in row["series"] for row in rows)
    return [name for name in PLOTS if name != "cut_at_budget.png" or cut]


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the plots of every arm into `out_dir` (the cut share only when every arm's steps recorded it);
    returns their paths."""
    # lazy: heavy import (matplotlib), paid only on this path
    import matplotlib

    matplotlib.use("Agg")
    # lazy: heavy import (matplotlib), paid only on this path
    import matplotlib.pyplot as plt

    arms = [
        {"label": results["arms"][name]["label"], "series": first["series"], "curve": curve(first)}
        for name, first in first_seed_rows(results).items()
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in arms:
        points = [(t, 100 * sum(p.values()) / max(1, len(p))) for t, p in row["curve"]]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=row["label"])
    ax.set_xlabel("training time, s (cache initialisation counted, evaluation excluded)")
    ax.set_ylabel("validation pass@1, %")
    ax.set_title(PLOTS["accuracy_vs_time.png"])
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "accuracy_vs_time.png")

    per_step = [
        ("decoded_tokens_per_step.png", "generated_tokens", "decoded tokens"),
        ("response_length.png", "response_len_mean", "mean response length, tokens"),
    ]
    if "cut_at_budget.png" in plot_names(results):
        per_step.append(("cut_at_budget.png", "truncated_ratio", "share of responses cut at their budget"))
    for name, key, label in per_step:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in arms:
            series = row["series"]
            ax.plot(series["step"], series[key], label=row["label"])
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(PLOTS[name])
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, name)
    return written

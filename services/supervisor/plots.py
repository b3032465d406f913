"""The plots of `rpo reproduce` (PNG, matplotlib without a display): held-out accuracy against training
time, decoded tokens per step, and response length over steps (the paper's stability claim)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS = {
    "accuracy_vs_time.png": "held-out pass@1 against training wall-clock time",
    "decoded_tokens_per_step.png": "tokens the replicas decoded per step",
    "response_length.png": "mean response length (reused prefix included) per step",
}


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the three plots of the main arms into `out_dir`; returns their paths."""
    # lazy: heavy import (matplotlib), paid only on this path
    import matplotlib

    matplotlib.use("Agg")
    # lazy: heavy import (matplotlib), paid only on this path
    import matplotlib.pyplot as plt

    arms = [row for row in results["arms"].values() if not row["settings"].get("sweep")]
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
        points = sorted((e["training_seconds"], 100 * e["pass_at_1"]) for e in row["evals"])
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=row["label"])
    ax.set_xlabel("training time, s (evaluation excluded)")
    ax.set_ylabel("held-out pass@1, %")
    ax.set_title(PLOTS["accuracy_vs_time.png"])
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "accuracy_vs_time.png")

    for name, key, label in (
        ("decoded_tokens_per_step.png", "generated_tokens", "decoded tokens"),
        ("response_length.png", "response_len_mean", "mean response length, tokens"),
    ):
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

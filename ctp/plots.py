"""Plots ctp writes next to its results (PNG, matplotlib's non-interactive backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curve(history: dict[str, list], path: Path) -> None:
    """Training loss and validation perplexity against step, as a PNG."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if history["step"]:
        ax.plot(history["step"], history["train_loss"], color="tab:blue", alpha=0.35, lw=0.8)
        window = max(1, len(history["train_loss"]) // 50)  # a moving average over ~2% of the run
        smooth = np.convolve(history["train_loss"], np.ones(window) / window, mode="valid")
        ax.plot(history["step"][window - 1:], smooth, color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats / token)", color="tab:blue")
    twin = ax.twinx()
    twin.plot(history["eval_step"], history["val_ppl"], "o-", color="tab:red", ms=3, label="validation ppl")
    if history.get("val_ppl_without_prompt"):
        twin.axhline(history["val_ppl_without_prompt"], color="tab:gray", ls="--", lw=1,
                     label="validation ppl, no prompt")
    twin.set_ylabel("validation perplexity", color="tab:red")
    twin.legend(loc="upper right", fontsize=8)
    ax.set_title("ctp tune-prompt")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_heatmap(result: dict[str, Any], path: Path) -> None:
    """A heatmap PNG of the share of the gap recovered (models x prompts), each cell also
    showing the prompted perplexity; colours saturate at +-100%."""
    import numpy as np

    plt = _pyplot()

    values = np.array([[c.get("recovered") if c.get("recovered") is not None else np.nan
                        for c in row] for row in result["cells"]], dtype=float) * 100
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(max(8.0, 5.0 + 1.8 * cols), 2.0 + 0.75 * rows), dpi=110)
    image = ax.imshow(np.clip(values, -100, 100), cmap="RdYlGn", vmin=-100, vmax=100, aspect="auto")
    for i in range(rows):
        for j in range(cols):
            cell = result["cells"][i][j]
            text = "incompatible" if "error" in cell else (
                f"{values[i, j]:.0f}%\nppl {cell['ppl']:.2f}" if not np.isnan(values[i, j])
                else f"ppl {cell['ppl']:.2f}")
            ax.text(j, i, text, ha="center", va="center", fontsize=9)
    ax.set_xticks(range(cols), [p["label"] for p in result["prompts"]], rotation=15, ha="right")
    ax.set_yticks(range(rows), [f"{m['label']} (ppl {m['ppl']:.2f})" for m in result["models"]])
    fig.suptitle(f"share of each model's compression gap recovered by each prompt\n"
                 f"{result['data']} {result['split']}, windows of {result['seqlen']}; "
                 f"dense ppl {result['dense']['ppl']:.2f}", fontsize=9)
    fig.colorbar(image, ax=ax, label="% of the gap recovered", fraction=0.05)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

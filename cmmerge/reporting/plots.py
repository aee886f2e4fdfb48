"""Plots written next to stage outputs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def plot_norm_by_layer(
    per_layer: dict[str, dict], path: str | Path, title: str = "Task vector L2 norm by layer"
) -> Path:
    """Bar chart of the ``l2`` of each layer group (``extract``'s ``per_layer`` stats)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_layer)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(names) + 2), 3.2))
    ax.bar(range(len(names)), [per_layer[n]["l2"] for n in names], color="#4477aa")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("L2 norm")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)

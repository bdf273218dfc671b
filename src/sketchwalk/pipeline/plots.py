"""Plots of the pipeline (matplotlib, imported only when a plot is drawn): compare's per-file
heatmaps and by-layer summary, validate's by-layer summary for the demo report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sketchwalk.blocks import causal_block_mask


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "--visualize needs matplotlib: pip install 'sketchwalk[plot]' (or matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_file(
    path: Path,
    block_attention: torch.Tensor,
    seer_mask: torch.Tensor,
    sw_mask: torch.Tensor,
    record: dict[str, Any],
    others: dict[str, torch.Tensor] | None = None,
) -> None:
    """Heatmaps of one file: the true block attention (log10, mean over heads), each side's
    selection (share of heads keeping a tile) over it, and where the two agree; then one
    panel per other selector (``compare --selectors``: name -> (B, Hq, nb, nb) mask), its
    selection over the same attention."""
    import numpy as np

    plt = _pyplot()
    nb = block_attention.shape[-1]
    causal = causal_block_mask(nb).numpy()
    att = block_attention.double().mean(dim=(0, 1)).cpu().numpy()
    log_att = np.where(causal, np.log10(np.maximum(att, 1e-8)), np.nan)
    seer = seer_mask.float().mean(dim=(0, 1)).cpu().numpy()
    sw = sw_mask.float().mean(dim=(0, 1)).cpu().numpy()
    method = record["seerattn_method"]

    others = others or {}
    extra = [(name, mask.float().mean(dim=(0, 1)).cpu().numpy()) for name, mask in others.items()]
    panels = 4 + len(extra)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 5), constrained_layout=True)
    im = axes[0].imshow(log_att, cmap="viridis", interpolation="nearest")
    axes[0].set_title("true block attention\nlog10 mass, mean over heads")
    fig.colorbar(im, ax=axes[0], shrink=0.8)
    for ax, share, name, cmap in (
        (axes[1], seer, method, "Reds"),
        (axes[2], sw, "SketchWalk", "Blues"),
    ):
        ax.imshow(log_att, cmap="gray", interpolation="nearest", alpha=0.6)
        overlay = np.ma.masked_where(share <= 0, share)
        im = ax.imshow(overlay, cmap=cmap, vmin=0, vmax=1, alpha=0.75, interpolation="nearest")
        density = record["seerattn_density" if name == method else "sketchwalk_density"]
        ax.set_title(f"{name} kept (share of heads)\ndensity {density:.3f}")
        fig.colorbar(im, ax=ax, shrink=0.8)
    rgb = np.ones((nb, nb, 3))
    rgb[causal] = 0.0
    rgb[..., 0] = np.where(causal, seer, rgb[..., 0])
    rgb[..., 2] = np.where(causal, sw, rgb[..., 2])
    rgb[..., 1] = np.where(causal, 0.0, rgb[..., 1])
    axes[3].imshow(rgb, interpolation="nearest")
    axes[3].set_title(
        f"agreement (share of heads): magenta both,\nred only {method}, blue only SketchWalk"
    )
    for ax, (name, share) in zip(axes[4:], extra, strict=True):
        ax.imshow(log_att, cmap="gray", interpolation="nearest", alpha=0.6)
        overlay = np.ma.masked_where(share <= 0, share)
        im = ax.imshow(overlay, cmap="Greens", vmin=0, vmax=1, alpha=0.75, interpolation="nearest")
        density = record.get(f"selector_{name}_density")
        recall = record.get(f"selector_{name}_recall")
        ax.set_title(
            f"{name} kept (share of heads)\ndensity "
            f"{'-' if density is None else f'{density:.3f}'}, recall "
            f"{'-' if recall is None else f'{recall:.3f}'}"
        )
        fig.colorbar(im, ax=ax, shrink=0.8)
    for ax in axes:
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")

    def fmt(key: str) -> str:
        v = record.get(key)
        return "-" if v is None else f"{v:.3f}"

    fig.suptitle(
        f"{record['sample_id']} (layer {record['layer_idx']}, {record['seq_len']} tokens)  "
        f"overlap {fmt('block_overlap')}  Jaccard {fmt('jaccard_similarity')}  "
        f"corr {fmt('attention_correlation')}  recall: {method} {fmt('seerattn_recall')}, "
        f"SketchWalk {fmt('sketchwalk_recall')}, oracle {fmt('oracle_recall')}"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend_below(ax: Any) -> None:
    """The legend under the axes, outside them, so that it covers no line."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)


def plot_summary(path: Path, summary: dict[str, Any], method: str) -> None:
    """Recall and selection agreement by layer (means over sequences)."""
    plt = _pyplot()
    by_layer = summary["by_layer_idx"]
    layers = sorted(int(k) for k in by_layer)

    def series(field: str) -> list[float]:
        return [by_layer[str(layer)].get(field, {}).get("mean", math.nan) for layer in layers]

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6.2), constrained_layout=True)
    for field, label, style in (
        ("sketchwalk_recall", "SketchWalk", "o-"),
        ("seerattn_recall", method, "s-"),
        ("oracle_recall", "oracle at SketchWalk's budget", "k--"),
        ("seerattn_recall_matched", f"{method} at SketchWalk's budget", "s:"),
        ("sketchwalk_recall_matched", f"SketchWalk at {method}'s density", "o:"),
    ):
        left.plot(layers, series(field), style, label=label, markersize=4)
    left.set_title("attention recall by layer")
    left.set_xlabel("layer")
    left.set_ylabel("share of softmax mass kept")
    _legend_below(left)
    left.grid(alpha=0.3)
    for field, label, style in (
        ("block_overlap", "block overlap", "o-"),
        ("jaccard_similarity", "Jaccard", "s-"),
        ("attention_correlation", "attention correlation (Pearson)", "^-"),
        ("attention_rank_correlation", "attention rank correlation (Spearman)", "v-"),
        ("seerattn_density", f"{method} density", "r:"),
        ("sketchwalk_density", "SketchWalk density", "b:"),
    ):
        right.plot(layers, series(field), style, label=label, markersize=4)
    right.set_title("selection agreement by layer")
    right.set_xlabel("layer")
    _legend_below(right)
    right.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_validation(summary: dict[str, Any], path: Path) -> None:
    """validate's summary by layer: recall, density and output cosine; relative L2 error."""
    plt = _pyplot()
    by_layer = summary["by_layer_idx"]
    layers = sorted(by_layer, key=int)
    x = [int(layer) for layer in layers]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
    for field, label in (
        ("attention_recall", "attention recall"),
        ("density", "density"),
        ("cosine_similarity", "output cosine"),
    ):
        ax[0].plot(x, [by_layer[la][field]["mean"] for la in layers], marker="o", ms=3, label=label)
    ax[0].set_xlabel("layer")
    ax[0].set_ylim(0, 1.02)
    _legend_below(ax[0])
    ax[0].set_title("SketchWalk vs dense, per layer")
    ax[1].plot(
        x,
        [by_layer[la]["relative_l2_error"]["mean"] for la in layers],
        marker="o",
        ms=3,
        color="tab:red",
    )
    ax[1].set_xlabel("layer")
    ax[1].set_title("relative L2 error of the attention output")
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["plot_file", "plot_summary", "plot_validation"]

"""What a finished result dict reads as: markdown tables (`ppl_markdown`, `niah_markdown`, with
the per-layer density and timing tables they share) and plots (matplotlib, imported lazily;
none when it is missing). The plot helpers take the result dict and the name of the field to
draw, so any task family can use them; this module imports no task module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ppl_markdown(data: dict[str, Any]) -> str:
    """The perplexity table (and the timing table when measured)."""
    s = data["settings"]
    lines = [
        f"# Perplexity: {s['model']}, second half of {s['num_samples']} x {s['seq_len']} "
        f"tokens of {s['text_source']} text",
        "",
        "| selector | decode | target density | realized density (all layers) | "
        "realized density (sparse layers) | perplexity | delta vs dense | delta % | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in data.get("results", {}).items():
        lines.append(
            f"| {name} | {r['decode']} | {_fmt(r['target_density'], '.2f')} | "
            f"{_fmt(r['density_all_layers'], '.4f')} | {_fmt(r['density_sparse_layers'], '.4f')}"
            f" | {r['perplexity']:.4f} | {_fmt(r['delta_vs_dense'], '+.4f')} | "
            f"{_fmt(r['delta_vs_dense_pct'], '+.2f')} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines + _layer_markdown(data) + _timing_markdown(data)) + "\n"


def niah_markdown(data: dict[str, Any]) -> str:
    """Accuracy tables: overall and per length, then depth x length per selector."""
    s = data["settings"]
    lengths = [str(x) for x in s["seq_lens"]]
    lines = [
        f"# Needle retrieval ({s['task']}, {s['num_needles']} needle(s)): {s['model']}, "
        f"{s['num_samples']} sample(s) per cell, {s['text_source']} filler",
        "",
        "| selector | decode | target density | realized density (sparse layers) | "
        "decode density | accuracy | " + " | ".join(f"acc @ {x}" for x in lengths) + " |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(lengths),
    ]
    res = data.get("results", {})
    for name, r in res.items():
        per = " | ".join(_fmt(r["accuracy_by_length"].get(x), ".3f") for x in lengths)
        lines.append(
            f"| {name} | {r['decode']} | {_fmt(r['target_density'], '.2f')} | "
            f"{_fmt(r['density_sparse_layers'], '.4f')} | {_fmt(r['decode_density'], '.4f')} | "
            f"{r['accuracy']:.3f} | {per} |"
        )
    depths = [f"{d:g}" for d in s["depths"]]
    lines += ["", "## Accuracy by length (rows) and depth % (columns)", ""]
    for name, r in res.items():
        lines += [f"### {name}", "", "| length | " + " | ".join(depths) + " |",
                  "|---:|" + "---:|" * len(depths)]  # fmt: skip
        for x in lengths:
            cells = " | ".join(
                _fmt(r["accuracy_by_length_depth"].get(f"{x}|{d}"), ".2f") for d in depths
            )
            lines.append(f"| {x} | {cells} |")
        lines.append("")
    return "\n".join(lines + _layer_markdown(data) + _timing_markdown(data)) + "\n"


def _layer_markdown(data: dict[str, Any]) -> list[str]:
    """Realized prefill density of every layer (mean over items), one row per sparse run."""
    rows = [(n, r) for n, r in data.get("results", {}).items() if r["kind"] != "dense"]
    if not rows:
        return []
    layers = len(rows[0][1]["layer_density"])
    lines = [
        "",
        "## Realized density per layer (prefill)",
        "",
        "| run | " + " | ".join(str(i) for i in range(layers)) + " |",
        "|---|" + "---:|" * layers,
    ]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(v, ".3f") for v in r["layer_density"]) + " |")
    return lines


def _timing_markdown(data: dict[str, Any]) -> list[str]:
    timing = data.get("timing")
    if not timing:
        return []
    lines = [
        "",
        f"## Timing at {timing['seq_len']} tokens ({timing['decode_tokens']} decode tokens, "
        f"median of {timing['repeats']} after a warm-up; {data['environment']['device_name']})",
        "",
        "| run | decode | TTFT s | TTFT speedup | decode tok/s | decode speedup |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in timing["runs"].items():
        lines.append(
            f"| {name} | {r['decode']} | {r['ttft_s']:.3f} | {r['ttft_speedup_vs_dense']:.2f}x | "
            f"{r['decode_tokens_per_s']:.1f} | {r['decode_speedup_vs_dense']:.2f}x |"
        )
    return lines


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_metric(data: dict[str, Any], path: Path, field: str, label: str) -> None:
    """Metric against realized density (sparse layers), one line per selector family."""
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    families: dict[str, list[tuple[float, float]]] = {}
    for r in data.get("results", {}).values():
        if r["kind"] == "dense":
            ax.axhline(r[field], color="black", linestyle="--", label="dense")
            continue
        x = r["density_sparse_layers"]
        if x is not None:
            families.setdefault(r["family"], []).append((x, r[field]))
    for family, points in families.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=family)
    ax.set_xlabel("realized density (sparse layers)")
    ax.set_ylabel(label)
    ax.set_title(f"{data['settings']['model']}: {label} vs density")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_figure(fig, path)
    plt.close(fig)


def _save_figure(fig: Any, path: Path) -> None:
    from sketchwalk.atomic import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:], dpi=120))


def _plot_heatmaps(data: dict[str, Any], path: Path) -> None:
    """Accuracy by depth (x) and length (y), one panel per run."""
    plt = _pyplot()
    if plt is None:
        return
    res = data.get("results", {})
    if not res:
        return
    s = data["settings"]
    depths = [f"{d:g}" for d in s["depths"]]
    lengths = [str(x) for x in s["seq_lens"]]
    n = len(res)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.5 * len(lengths) + 2 * rows),
                             squeeze=False, constrained_layout=True)  # fmt: skip
    for ax, (name, r) in zip(axes.flat, res.items(), strict=False):
        grid = [[r["accuracy_by_length_depth"].get(f"{x}|{d}", float("nan")) for d in depths]
                for x in lengths]  # fmt: skip
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), depths, fontsize=7)
        ax.set_yticks(range(len(lengths)), lengths, fontsize=7)
        ax.set_title(f"{name} ({r['accuracy']:.2f})", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="accuracy")
    _save_figure(fig, path)
    plt.close(fig)

"""The demo report's image links resolve from the report's own folder, and the summary plots'
legends cover no data. Made-up summaries only: no model runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from sketchwalk.pipeline.demo import write_report
from sketchwalk.pipeline.plots import plot_summary, plot_validation

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = range(6)
METHOD = "seerattention-gate"


def _agg(value: float) -> dict[str, float]:
    return {"mean": value, "min": value - 0.01, "max": value + 0.01}


def _validation_summary() -> dict:
    def layer(i: int) -> dict:
        dense = i < 2
        return {
            "attention_recall": _agg(1.0 if dense else 0.8 + 0.01 * i),
            "density": _agg(1.0 if dense else 0.26),
            "cosine_similarity": _agg(1.0 if dense else 0.97),
            "relative_l2_error": _agg(0.001 if dense else 0.2 + 0.01 * i),
        }

    by_layer = {str(i): layer(i) for i in LAYERS}
    overall = {
        field: _agg(0.5)
        for field in (
            "attention_recall",
            "density",
            "cosine_similarity",
            "relative_l2_error",
            "max_error",
            "num_blocks_selected",
            "speedup",
        )
    }
    config = {
        "density": 0.2,
        "block_size": 64,
        "sketch_dim": 128,
        "granularity": "layer",
        "causal_sketch": True,
        "walk": True,
        "degree": 3,
        "damping": 0.25,
        "dense_layers": 2,
        "dense_last_rows": 4,
    }
    return {
        "tensor_dir": "tensor_data",
        "device": "cpu",
        "backend": "reference",
        "timing": "reference-vs-reference",
        "config": config,
        "overall": overall,
        "by_layer_idx": by_layer,
    }


def _comparison_summary() -> dict:
    fields = (
        "sketchwalk_recall",
        "seerattn_recall",
        "oracle_recall",
        "seerattn_recall_matched",
        "sketchwalk_recall_matched",
        "block_overlap",
        "jaccard_similarity",
        "attention_correlation",
        "attention_rank_correlation",
        "seerattn_density",
        "sketchwalk_density",
    )
    by_layer = {
        str(i): {f: _agg(0.3 + 0.05 * j + 0.02 * i) for j, f in enumerate(fields)} for i in LAYERS
    }
    return {
        "seerattn_method": METHOD,
        "by_layer_idx": by_layer,
        "sparse_layers": {"overall": {f: _agg(0.5) for f in fields}},
    }


def _image_links(report: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", report.read_text())


def test_report_image_links_resolve_from_the_report_folder(tmp_path, monkeypatch):
    # compare records its plots as given its output folder, relative to the working directory of
    # its run (here: tmp_path); the report is then read from elsewhere
    monkeypatch.chdir(tmp_path)
    out = Path("sketchwalk_demo")
    val_dir, cmp_dir, tensor_dir = (
        out / "validation_results",
        out / "comparison_results",
        out / "tensor_data",
    )
    for folder in (val_dir, cmp_dir, tensor_dir):
        folder.mkdir(parents=True)
    ts = "20260101_000000"
    (val_dir / f"validation_summary_{ts}.json").write_text(json.dumps(_validation_summary()))
    csum = _comparison_summary()
    png = cmp_dir / f"comparison_summary_{ts}.png"
    plot_summary(png, csum, METHOD)
    csum["plots"] = [str(png)]
    (cmp_dir / f"comparison_summary_{ts}.json").write_text(json.dumps(csum))

    report = write_report(out, val_dir, cmp_dir, tensor_dir, {"collect_s": 1.0, "compare_s": 2.0})

    monkeypatch.chdir(report.parent.parent)  # somewhere that is not the report's folder
    links = _image_links(report.resolve())
    print("image links:", links)
    assert len(links) >= 2, f"expected the validation and comparison plots, got {links}"
    folder = report.resolve().parent
    for link in links:
        assert not Path(link).is_absolute(), f"absolute image link {link}"
        target = folder / link
        assert target.is_file(), f"{link} does not resolve from {folder}"
        assert target.read_bytes()[:8] == PNG_MAGIC, f"{link} is not a PNG"


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("which", ["summary", "validation"])
def test_plot_legends_cover_no_axes(tmp_path, monkeypatch, which):
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    path = tmp_path / f"{which}.png"
    if which == "summary":
        plot_summary(path, _comparison_summary(), METHOD)
    else:
        plot_validation(_validation_summary(), path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    legends = 0
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        legends += 1
        box = legend.get_window_extent(renderer)
        for other in fig.axes:
            frame = other.get_window_extent(renderer)
            print(which, "legend", box.bounds, "axes", frame.bounds)
            assert not _overlaps(box, frame), "a legend covers an axes"
    assert legends >= 1
    close(fig)

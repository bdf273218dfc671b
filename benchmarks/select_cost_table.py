"""The default preset's prefill selection cost against cuDNN, from `benchmarks/attention.py`
JSON files: one row per (length, density), one column per timed configuration (query_rows x
walk_dtype), the share of cuDNN's causal attention, the growth per doubling of the length and
the end-to-end speed-up (selection plus the Triton kernel on the selected blocks).

    python3 benchmarks/select_cost_table.py RESULT.json [RESULT.json ...] > table.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(paths: list[str]) -> tuple[list[dict], dict]:
    records, env = [], {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            records += [r for r in data["records"] if r.get("kind") == "prefill"]
            env = env or data["environment"]
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"{path}: not a benchmarks/attention.py result ({exc})") from None
    return records, env


def _config(record: dict) -> tuple:
    """(query_rows, walk_dtype, query-row backend) of a selection timing (None: not recorded;
    the query rows ran the reference before the kernel existed)."""
    return (record.get("query_rows"), record.get("walk_dtype"), record.get("query_rows_backend"))


def table(records: list[dict], env: dict) -> str:
    cudnn = {(r["shape"], r["seq_len"]): r["ms"] for r in records if r["method"] == "sdpa_cudnn"}
    sel = [r for r in records if r["method"] == "sketchwalk_select"]
    # the default preset's configuration (bfloat16 walk) last: the growth column follows it
    configs = sorted(
        {_config(r) for r in sel},
        key=lambda c: (str(c[0]), c[1] == "bfloat16", str(c[2])),
    )
    e2e = {(r["shape"], r["seq_len"], r["density"]): r for r in records
           if r["method"] == "end_to_end"}  # fmt: skip
    keys = sorted({(r["shape"], r["seq_len"], r["density"]) for r in sel})
    head = " | ".join(
        f"query_rows {q}, {w}{'' if b is None else ', rows: ' + b} ms (% of cuDNN)"
        for q, w, b in configs
    )
    lines = [
        f"{env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, "
        f"driver {env.get('driver')}; {env.get('date')}.",
        "",
        f"| shape | T | density | cuDNN ms | {head} | growth per doubling (last column) | "
        "end to end ms (x cuDNN) |",
        "|---|---:|---:|---:|" + "---:|" * len(configs) + "---:|---:|",
    ]
    previous: dict = {}
    for shape, t, density in keys:
        base = cudnn.get((shape, t))
        cells = []
        last = None
        for config in configs:
            hit = [
                r["ms"]
                for r in sel
                if (r["shape"], r["seq_len"], r["density"]) == (shape, t, density)
                and _config(r) == config
            ]
            if not hit:
                cells.append("")
                continue
            last = hit[0]
            pct = f" ({100 * last / base:.1f}%)" if base else ""
            cells.append(f"{last:.2f}{pct}")
        prev = previous.get((shape, density))
        growth = ""
        if prev is not None and last is not None and t == 2 * prev[0]:
            growth = f"{last / prev[1]:.2f}x"
        if last is not None:
            previous[(shape, density)] = (t, last)
        end = e2e.get((shape, t, density))
        end_cell = ""
        if end is not None and base:
            end_cell = f"{end['ms']:.2f} ({base / end['ms']:.2f}x)"
        lines.append(
            f"| {shape} | {t} | {density:g} | {base:.2f} | " + " | ".join(cells)
            + f" | {growth} | {end_cell} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+")
    args = p.parse_args(argv)
    records, env = load(args.results)
    sys.stdout.write(table(records, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""benchmarks/offline_gpu_session.sh refuses an unknown stage before it writes or installs
anything (a typo must not cost device time)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "offline_gpu_session.sh"


def test_unknown_stage_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), "-", "-", str(out), "gputests", "ruler_reprot"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "unknown stage ruler_reprot" in done.stderr and "ruler_report" in done.stderr
    assert not out.exists()


EVAL_SCRIPT = SCRIPT.parent / "eval_qwen_gpu.sh"


def _stages(script: Path) -> list[str]:
    """The stage labels of eval_qwen_gpu.sh's case statement."""
    text = script.read_text()
    body = text[text.index('case "$stage" in') :]
    labels = re.findall(r"^  ([a-z0-9_| ]+)\)$", body, flags=re.M)
    return [s.strip() for label in labels for s in label.split("|")]


def test_every_eval_stage_passes_flags_the_cli_accepts(tmp_path):
    """Each stage of benchmarks/eval_qwen_gpu.sh, run with a stand-in python3 that records its
    arguments, calls `sketchwalk` with flags the parser takes and variants that build: a
    misspelt flag or config field must fail here, not on the GPU. Every stage is known to
    offline_gpu_session.sh."""
    import shlex

    from sketchwalk.cli import build_parser
    from sketchwalk.config import SketchWalkConfig
    from sketchwalk.pipeline.eval.runs import build_runs

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "python3"
    fake.write_text(f"#!/bin/bash\nprintf '%q ' \"$@\" >> {calls}\necho >> {calls}\n")
    fake.chmod(0o755)
    stages = _stages(EVAL_SCRIPT)
    assert {"ruler_report", "ruler_pins", "ruler_tune2", "ruler_ppl", "gate"} <= set(stages)
    known = SCRIPT.read_text()
    parser = build_parser()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SECONDS_LIMIT": "5"}
    for stage in stages:
        assert f" {stage} " in known.replace("\n", " ").replace('"', " "), stage
        if calls.exists():
            calls.unlink()
        done = subprocess.run(["bash", str(EVAL_SCRIPT), stage, str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
        assert done.returncode == 0, (stage, done.stderr)
        for line in calls.read_text().splitlines():
            args = shlex.split(line)
            if args[0] == "-c":  # a snippet (setup): it must at least compile
                compile(args[1], stage, "exec")
                continue
            assert args[:2] == ["-m", "sketchwalk"], (stage, args)
            ns = parser.parse_args(args[2:])  # SystemExit on a bad flag
            if args[2] == "eval":
                build_runs(ns.selectors, ns.densities or [0.1], SketchWalkConfig.preset("default"),
                           ns.variant or [], getattr(ns, "decode", None) or ["dense"])  # fmt: skip


def test_benchmark_stages_pass_flags_the_scripts_accept(tmp_path):
    """The stages of offline_gpu_session.sh that need no model (run with stand-ins for python3
    and nvidia-smi) call benchmarks/attention.py with flags its parser takes (on the CPU it
    then stops with "needs a CUDA GPU", not at the flags) and pytest on files that exist."""
    import importlib.util
    import shlex

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    for name in ("python3", "nvidia-smi"):
        fake = bin_dir / name
        fake.write_text(f"#!/bin/bash\nprintf '%q ' {name} \"$@\" >> {calls}\necho >> {calls}\n")
        fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    stages = ["walktests", "gputests", "attention", "attention_long", "zoo_attention"]
    done = subprocess.run(["bash", str(SCRIPT), "-", "-", str(tmp_path / "out"), *stages],
                          capture_output=True, text=True, timeout=60, env=env,
                          cwd=SCRIPT.parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr
    spec = importlib.util.spec_from_file_location("attention_bench", SCRIPT.parent / "attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seen = {"pytest": 0, "attention": 0}
    for line in calls.read_text().splitlines():
        args = shlex.split(line)
        if args[0] != "python3":
            continue
        if args[1:3] == ["-m", "pytest"]:
            files = [a for a in args if a.startswith("tests/")]
            assert files and all((SCRIPT.parents[1] / f).is_file() for f in files), files
            seen["pytest"] += 1
        else:
            assert args[1] == "benchmarks/attention.py", args
            argv = args[2:]
            if torch.cuda.is_available():  # the flags alone: parse, do not run
                continue
            assert bench.main(argv) == 2  # a bad flag would exit from argparse instead
            seen["attention"] += 1
    assert seen["pytest"] == 2 and (seen["attention"] == 3 or torch.cuda.is_available())

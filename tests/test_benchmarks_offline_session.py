"""benchmarks/offline_gpu_session.sh refuses an unknown stage before it writes or installs
anything (a typo must not cost device time)."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "offline_gpu_session.sh"


def test_unknown_stage_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), "-", "-", str(out), "gputests", "ruler_reprot"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "unknown stage ruler_reprot" in done.stderr and "ruler_report" in done.stderr
    assert not out.exists()

"""`bench/gpu_check.sh` (issue 20 item 5) runs end to end in its CPU mode: every step it runs here ends `ok`, within
its budget, and writes its results."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
def test_gpu_check_script_runs_in_cpu_mode(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_RESULTS": str(tmp_path), "GPU_CHECK_BUDGET": "300"}
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "gpu-check" / "summary-cpu-smoke.txt").read_text()
    steps = [line for line in summary.splitlines() if line.split(" ", 1)[0] in ("ok", "FAILED", "TIMED", "SKIP")]
    assert steps and all(line.startswith(("ok ", "SKIP main-job")) for line in steps), summary
    throughput = json.loads((tmp_path / "train_throughput-cpu-smoke.json").read_text())
    assert {row["model"] for row in throughput["results"]} == {"ltm", "llama"}
    assert (tmp_path / "generate-cpu-smoke.json").is_file() and (tmp_path / "train_profile-cpu-smoke.json").is_file()

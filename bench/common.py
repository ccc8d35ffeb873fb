"""What the benches share: loading a sibling bench as a module, and the metadata every result file records."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path


BENCH_DIR = Path(__file__).resolve().parent


def load_bench(name: str):
    """`bench/<name>.py` as a module (the benches are scripts, not a package), e.g. for its models or recipe."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_metadata(script: str, argv: list[str] | None, args, load_before: tuple, started: float) -> dict:
    """The command that made a result, its arguments, the machine, torch, the load average around the run and its
    wall time (seconds since `started`, a `time.time()`)."""
    import torch

    return {
        "command": f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_seconds": time.time() - started,
    }


def save_json(path: str | None, payload: dict) -> None:
    """Write `payload` as indented JSON to `path` (folders created); nothing when `path` is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1))

"""What the benches share: loading a sibling bench as a module, the metadata every result file records (with paths
relative to the repository, `portable`), and the `--device` / `--dtype` flags every bench takes (CUDA and bf16 on a
GPU, fp32 on CPU by default)."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import sys
import time
from pathlib import Path


BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# An absolute path inside a string: a `/` that starts a word (not the `/` of `tokens/s`, `a / b` or `https://`).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])/[^\s\"',;:=()\[\]]+")
_PARENT_PATH = re.compile(r"(?<![\w.~:/-])(?:\.\./)+[^\s\"',;:=()\[\]]+")  # ../x/y: outside the repository


def _neutral_path(match: re.Match) -> str:
    path = os.path.normpath(match.group(0))
    for root in {str(REPO_ROOT), os.path.realpath(REPO_ROOT)}:
        if path == root:
            return "."
        if path.startswith(root + os.sep):
            return os.path.relpath(path, root)
    return Path(path).name or path  # outside the repository: the name only, never a machine's folders


def portable(value):
    """`value` (a string, path, or a dict / list / tuple of them) with every absolute path made machine-neutral:
    relative to the repository root when inside it, else its last component. Result files record the command and
    its arguments this way, so they read the same on every clone."""
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable(item) for item in value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        value = _PARENT_PATH.sub(lambda match: os.path.join("path", "to", Path(match.group(0)).name), value)
        return _ABSOLUTE_PATH.sub(_neutral_path, value)
    return value


def load_bench(name: str):
    """`bench/<name>.py` as a module (the benches are scripts, not a package), e.g. for its models or recipe."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_metadata(script: str, argv: list[str] | None, args, load_before: tuple, started: float) -> dict:
    """The command that made a result, its arguments (paths relative to the repository: `portable`), the machine,
    torch, the load average around the run and its wall time (seconds since `started`, a `time.time()`)."""
    import torch

    return {
        "command": portable(f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:])),
        "args": portable(vars(args)),
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


DTYPES = ("fp32", "bf16")


def add_device_arguments(parser) -> None:
    """`--device` (`cpu`, `cuda`, `cuda:N`) and `--dtype` (`fp32`, `bf16`): see `resolve_device`."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=DTYPES,
        help="bf16: inference benches run the models in bfloat16, training benches train in bf16 mixed precision",
    )


def resolve_device(device: str, dtype: str):
    """`(torch.device, torch.dtype)` for the `--device` / `--dtype` flags.

    Raises:
        ValueError: (one line, naming the flag and the fix) a device that is neither CPU nor CUDA, CUDA asked for
            where torch sees none, or bf16 on a GPU without bf16 support.
    """
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: use cpu, cuda or cuda:N.")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is visible to torch here; use --device cpu.")
        if dtype == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError("--dtype bf16: this GPU has no bf16 support; use --dtype fp32.")
    return resolved, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def precision_arguments(device: str, dtype: str) -> dict:
    """`TrainingArguments` keywords for the `--device` / `--dtype` flags (bf16 = mixed precision; Trainer places the
    model on the one visible GPU, or on the CPU with `use_cpu`). Raises as `resolve_device` does."""
    resolved, _ = resolve_device(device, dtype)
    return {"use_cpu": resolved.type == "cpu", "bf16": dtype == "bf16"}


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA), so that wall times cover it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()

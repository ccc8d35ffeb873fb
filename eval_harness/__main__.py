"""`python -m eval_harness ...` / `ltm eval ...`: lm-evaluation-harness's own command line with model `ltm`.

Every flag is lm-eval's (`--model ltm --model_args pretrained=PATH --tasks ... --include_path ... --num_fewshot
--output_path --limit --log_samples ...`); the packaged tasks (`eval_harness/tasks`: `wikitext2_local`,
`lambada_local`, `arithmetic_local`, tag `ltm_local`) are found without `--include_path`, beside any folder it names.
This entry point only registers the model first, checks the model folder,
`--device`, `--batch_size`, the time budget of the model_args and that `--output_path` can be written (so that a
damaged file, a missing GPU or an unwritable folder is named in one line before any work), then hands over to
`lm_eval.__main__.cli_evaluate`, which reads `sys.argv`. lm-eval only logs a warning when it cannot save its results:
here that is an error. Errors are printed as one line with exit code 2 by `modeling_ltm.tooling.cli_errors.run_cli`; `--debug`
shows the full traceback.
"""

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from lm_eval.__main__ import cli_evaluate
from lm_eval._cli.utils import MergeDictAction

import eval_harness  # registers model "ltm"
from modeling_ltm.tooling.budgets import check_inference_steps, check_iw_samples, check_memory
from modeling_ltm.tooling.cli_errors import (
    CLIError,
    check_finite_safetensors,
    check_model_folder,
    looks_like_a_local_path,
    resolve_device,
    run_cli,
)


def _known_arguments(argv: list[str]) -> argparse.Namespace:
    """The flags checked here, `--model_args` parsed by lm-eval's own `MergeDictAction` (`key=value` pairs, comma- or
    space-separated, or one JSON object; values typed as lm-eval types them), so the checks see what `LTMLM` will
    get. (`lm_eval.utils.simple_parse_args_string` is the parser of `LM.create_from_arg_string`, not of lm-eval's
    command line: it reads no JSON object and splits `key=[a,b]` at its comma.)"""
    pre = argparse.ArgumentParser(prog="ltm eval", add_help=False)
    pre.add_argument("--model")
    pre.add_argument("--model_args", "-a", nargs="+", action=MergeDictAction, default={})
    pre.add_argument("--device")
    pre.add_argument("--batch_size", "-b")
    pre.add_argument("--output_path", "-o")
    pre.add_argument("--limit", "-L")
    known, _ = pre.parse_known_args(argv)
    return known


def _int_arg(flag: str, value: str, check) -> None:
    try:
        number = float(value)  # lm-eval's parser reads `-1` as -1.0, as `LTMLM` will get it
    except ValueError:
        number = float("nan")
    if not number.is_integer():
        raise CLIError(f"{flag} must be an integer, got {value!r}.")
    check(flag, int(number))


def check_ltm_arguments(argv: list[str]) -> None:
    """For `--model ltm`: a local `pretrained=` folder must be an intact saved LTM with finite weights, the device
    usable, the batch size >= 1 and the fast steps and importance samples within `modeling_ltm.tooling.budgets`."""
    known = _known_arguments(argv)
    if known.limit is not None:
        try:
            limit = float(known.limit)
        except ValueError:
            limit = float("nan")
        if not 0 < limit < float("inf"):
            raise CLIError(
                f"--limit {known.limit} evaluates no document: pass a number of documents per task >= 1, or a "
                "fraction of each task's documents in (0, 1), or leave --limit out to evaluate them all."
            )
    if known.batch_size is not None and not known.batch_size.startswith("auto"):
        try:
            batch_size = int(known.batch_size)
        except ValueError:
            raise CLIError(f"--batch_size must be an integer >= 1, got {known.batch_size!r}.") from None
        if batch_size < 1:
            raise CLIError(f"--batch_size must be an integer >= 1 (requests per batch), got {known.batch_size}.")
    if known.model != "ltm":
        return
    model_args = {key: str(value) for key, value in known.model_args.items() if value is not None}
    pretrained = model_args.get("pretrained")
    local = pretrained is not None and (Path(pretrained).expanduser().exists() or looks_like_a_local_path(pretrained))
    if local:  # a folder that does not exist is named here, not sent to the Hub as a repository id
        check_model_folder(Path(pretrained).expanduser(), "--model_args pretrained=", model_type="ltm")
        check_finite_safetensors(Path(pretrained).expanduser(), "evaluating")
    for flag, device in (("--device", known.device), ("--model_args device=", model_args.get("device"))):
        if device is not None:
            resolve_device(device, flag)
    if model_args.get("num_inference_steps") is not None:
        _int_arg("--model_args num_inference_steps=", model_args["num_inference_steps"], check_inference_steps)
    if model_args.get("iw_samples") is not None:
        _int_arg("--model_args iw_samples=", model_args["iw_samples"], check_iw_samples)
    if local:
        check_eval_memory(Path(pretrained).expanduser(), known, model_args)


def check_eval_memory(folder: Path, known: argparse.Namespace, model_args: dict[str, str]) -> None:
    """The rows of one `--batch_size` batch (with `iw_samples=K` importance draws each) against the memory budget,
    before the model is loaded (`LTMLM` checks again with the loaded model)."""
    from transformers import AutoConfig

    batch_size = int(known.batch_size) if known.batch_size and known.batch_size.isdigit() else 1
    config = AutoConfig.from_pretrained(folder)
    try:
        length = int(model_args.get("max_length") or config.max_position_embeddings)
        samples = int(model_args.get("iw_samples") or 0)
    except ValueError:
        return  # LTMLM names the bad value
    device = model_args.get("device") or known.device or resolve_device(None)
    half = (model_args.get("dtype") or "").lower() in ("bfloat16", "bf16", "float16", "fp16", "half")
    check_memory(
        "--batch_size", batch_size, config, batch_size, length, device, half_precision=half, iw_samples=samples,
        iw_flag="--model_args iw_samples=",
    )  # fmt: skip


def check_output_path(output_path: str | None) -> None:
    """`--output_path` (a folder, or a `.json` file whose folder gets it) must be writable: lm-eval only warns when it
    cannot save the results, after the whole evaluation."""
    if output_path is None:
        return
    path = Path(output_path).expanduser()
    folder = path.parent if path.suffix == ".json" else path
    if folder.exists() and not folder.is_dir():
        raise CLIError(
            f"--output_path {output_path}: {folder} is a file, and lm-eval writes its results into a folder there; "
            "pass a folder (or a new name ending in .json)."
        )
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(
            f"--output_path {output_path}: {existing} is not writable, so the results could not be saved; pass a "
            "folder you can write to."
        )


def check_results_saved(output_path: str, since: float) -> None:
    """lm-eval's `results_<date>.json` (or `<name>_<date>.json`) written under `output_path` since `since`, else a
    `CLIError`: lm-eval logged only a warning."""
    path = Path(output_path).expanduser()
    found = path.parent.glob(f"{path.stem}_*.json") if path.suffix == ".json" else path.glob("*/results_*.json")
    if any(result.stat().st_mtime >= since - 1 for result in found):
        return
    raise CLIError(
        f"lm-eval could not save its results to --output_path {output_path} (see its warning above: a full disk, a "
        "read-only folder, or a file in the way); the scores are only in the printed table. Fix the path and run "
        "again."
    )


@contextlib.contextmanager
def packaged_tasks():
    """While active, every `lm_eval.tasks.TaskManager` (lm-eval's CLI builds one from `--include_path` alone, in
    `run`, `ls` and `validate`) also indexes the packaged tasks, `eval_harness.TASKS_DIR`."""
    import lm_eval.tasks

    original = lm_eval.tasks.TaskManager

    class WithPackagedTasks(original):
        def __init__(self, verbosity=None, include_path=None, *args, **kwargs):
            paths = list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
            paths = [path for path in paths if path]
            if not any(Path(p).expanduser().resolve() == eval_harness.TASKS_DIR for p in paths):
                paths.append(str(eval_harness.TASKS_DIR))
            super().__init__(verbosity, paths, *args, **kwargs)

    lm_eval.tasks.TaskManager = WithPackagedTasks
    try:
        yield
    finally:
        lm_eval.tasks.TaskManager = original


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI on `argv` (defaults to `sys.argv[1:]`) and return the exit code."""
    return run_cli("ltm eval", _main, argv)


def _main(argv: list[str]) -> int:
    check_ltm_arguments(argv)
    output_path = _known_arguments(argv).output_path
    check_output_path(output_path)
    saved_argv, started = sys.argv, time.time()
    sys.argv = ["ltm eval", *argv]
    try:
        with packaged_tasks():
            cli_evaluate()
    except SystemExit as exit_:  # argparse's --help and usage errors
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved_argv
    eval_harness.finish_processes()
    if output_path is not None and int(os.environ.get("RANK", "0")) == 0 and argv[:1] not in (["ls"], ["validate"]):
        check_results_saved(output_path, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())

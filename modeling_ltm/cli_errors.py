"""The one place where the `ltm` commands turn errors into one-line messages (exit code 2).

Every command (`ltm train | eval | generate | export | push`, `python -m eval_harness`) runs its body through
`run_cli`: an error the user can fix (bad flags, files, data or numbers; the project's own errors and the common
library ones below) is printed as ONE line, `<command>: error: <problem, file and fix>`, and the command returns
`EXIT_CODE`. `--debug` anywhere on the command line re-raises it with the full traceback instead. Unexpected errors
(bugs) keep their traceback.

The checks of a model folder (`check_model_folder`) and of `--device` (`resolve_device`) live here too, so that a
truncated `model.safetensors` or a garbage `config.json` is blamed by path before any library reads it.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


EXIT_CODE = 2
DEBUG_FLAG = "--debug"


class CLIError(ValueError):
    """A problem the user can fix; the message names the problem, the file and the fix."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`" (did you mean 'x'?)"` for the closest of `choices` (difflib), or `""`."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return error


def message_for(error: BaseException) -> str | None:
    """The one-line message for a known kind of error, or None for an unexpected one (a bug: keep its traceback)."""
    name = type(error).__name__
    if name == "SafetensorError":
        return (
            f"a .safetensors weights file is truncated or corrupt ({error}); re-save the model "
            "(`ltm train` / save_pretrained) or copy the file again."
        )
    if name in ("DatasetGenerationError", "DatasetBuildError"):
        return (
            f"the dataset could not be read ({type(_root_cause(error)).__name__}: {_root_cause(error)}); check the "
            "files given with --dataset / --data_files (e.g. one JSON object per line for .jsonl)."
        )
    if isinstance(error, AssertionError) and "CUDA" in str(error):
        return f"CUDA is not available here ({error}); pass --device cpu."
    if name == "OutOfMemoryError":
        return f"out of memory on the device ({one_line(error)[:200]}); lower the batch size or use a smaller model."
    if isinstance(error, json.JSONDecodeError):
        return f"invalid JSON ({error}); fix the file named by the flag you passed."
    if name in ("StrictDataclassFieldValidationError", "StrictDataclassClassValidationError"):  # LTMConfig's checks
        return f"invalid model configuration: {one_line(error)}; fix that value in the config JSON (or the flag)."
    # The project's own errors (ValueError / TypeError naming the argument, NonFiniteWeightsError, NonFiniteELBOError,
    # TrainCLIError, CLIError) already say what to fix.
    if isinstance(error, (ValueError, TypeError, FloatingPointError)):
        return str(error)
    if isinstance(error, (OSError, RuntimeError)) and _is_user_facing(error):
        return str(error)
    return None


def _is_user_facing(error: BaseException) -> bool:
    """OSErrors (missing files, Hub and network failures) and the project's own RuntimeErrors speak to the user."""
    if isinstance(error, OSError):
        return True
    module = type(error).__module__ or ""
    return module.startswith(("modeling_ltm", "hub_cards", "eval_harness"))


def run_cli(prog: str, body: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `body(argv)` (argv without `--debug`); print a known error as one line on stderr and return `EXIT_CODE`.

    With `--debug` in `argv`, errors propagate with their full traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        return body(argv) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        message = message_for(error)
        if message is None:
            raise
        print(f"{prog}: error: {one_line(message)} (run with {DEBUG_FLAG} for the full traceback)", file=sys.stderr)
        return EXIT_CODE


# ---------------------------------------------------------------------------------------------------------------
# Checks shared by the commands
# ---------------------------------------------------------------------------------------------------------------


def resolve_device(device: str | None, flag: str = "--device") -> str:
    """`device`, or `cuda` when available else `cpu`; `CLIError` for a device torch cannot use here."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise CLIError(f"{flag} {device!r} is not a device ({error}); use cpu, cuda or cuda:N.") from error
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise CLIError(
                f"{flag} {device}: CUDA is not available (torch {torch.__version__} is {build}, or no GPU is "
                "visible); pass --device cpu."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CLIError(
                f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible; use cuda:0 "
                f"to cuda:{torch.cuda.device_count() - 1}."
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"{flag} {device}: MPS is not available on this machine; pass --device cpu.")
    return device


def check_model_folder(path: str | Path, flag: str = "model folder") -> Path:
    """Raise `CLIError` naming the file unless `path` is a folder whose `config.json` is a JSON object with a
    `model_type` and whose `*.safetensors` files have intact headers (a truncated file fails here, by name)."""
    from safetensors import safe_open

    path = Path(path)
    config_path = path / "config.json"
    if not path.is_dir() or not config_path.is_file():
        raise CLIError(
            f"{flag} {str(path)!r} is not a saved model folder (no config.json); train one with `ltm train` or pass "
            "the folder written by save_pretrained."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CLIError(
            f"{config_path} is not valid JSON ({error}): the model folder is damaged; re-save the model "
            "(save_pretrained / `ltm train`) or restore config.json."
        ) from error
    if not isinstance(config, dict) or "model_type" not in config:
        raise CLIError(
            f"{config_path} is not a model config (a JSON object with a 'model_type'); re-save the model or restore "
            "config.json."
        )
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as error:  # safetensors' SafetensorError (not importable under a stable name)
            raise CLIError(
                f"{weights} is truncated or corrupt ({error}); re-save the model (save_pretrained / `ltm train`) or "
                "copy the file again."
            ) from error
    return path


def check_finite_safetensors(folder: str | Path, action: str) -> None:
    """`NonFiniteWeightsError` naming the file and the first tensor of `folder`'s `*.safetensors` files that holds
    NaN/inf (tensors read one at a time, without building the model)."""
    from safetensors import safe_open

    from .generation_ltm import check_finite_weights

    for weights in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as tensors:
            check_finite_weights(((name, tensors.get_tensor(name)) for name in tensors.keys()), action, str(weights))


__all__ = [
    "CLIError",
    "DEBUG_FLAG",
    "EXIT_CODE",
    "check_finite_safetensors",
    "check_model_folder",
    "did_you_mean",
    "message_for",
    "one_line",
    "resolve_device",
    "run_cli",
]

"""`python -m eval_harness ...` / `ltm eval ...`: lm-evaluation-harness's own command line with model `ltm`.

Every flag is lm-eval's (`--model ltm --model_args pretrained=PATH --tasks ... --include_path ... --num_fewshot
--output_path --limit --log_samples ...`); this entry point only registers the model first, checks the model folder
and `--device` (so that a damaged file or a missing GPU is named in one line), then hands over to
`lm_eval.__main__.cli_evaluate`, which reads `sys.argv`. Errors are printed as one line with exit code 2 by
`modeling_ltm.cli_errors.run_cli`; `--debug` shows the full traceback.
"""

import argparse
import sys
from pathlib import Path

from lm_eval.__main__ import cli_evaluate

import eval_harness  # registers model "ltm"
from modeling_ltm.cli_errors import check_finite_safetensors, check_model_folder, resolve_device, run_cli


def _model_args(values: list[str] | None) -> dict[str, str]:
    """`key=value` pairs of `--model_args` (comma- or space-separated, lm-eval's syntax)."""
    pairs = {}
    for value in values or []:
        for item in value.split(","):
            key, sep, val = item.partition("=")
            if sep:
                pairs[key.strip()] = val.strip()
    return pairs


def check_ltm_arguments(argv: list[str]) -> None:
    """For `--model ltm`: a local `pretrained=` folder must be an intact saved model with finite weights, and the
    device usable."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model")
    pre.add_argument("--model_args", "-a", nargs="+")
    pre.add_argument("--device")
    known, _ = pre.parse_known_args(argv)
    if known.model != "ltm":
        return
    model_args = _model_args(known.model_args)
    pretrained = model_args.get("pretrained")
    if pretrained is not None and (Path(pretrained).exists() or pretrained.startswith((".", "/", "~"))):
        check_model_folder(Path(pretrained).expanduser(), "--model_args pretrained=")
        check_finite_safetensors(Path(pretrained).expanduser(), "evaluating")
    for flag, device in (("--device", known.device), ("--model_args device=", model_args.get("device"))):
        if device is not None:
            resolve_device(device, flag)


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI on `argv` (defaults to `sys.argv[1:]`) and return the exit code."""
    return run_cli("ltm eval", _main, argv)


def _main(argv: list[str]) -> int:
    check_ltm_arguments(argv)
    saved_argv = sys.argv
    sys.argv = ["ltm eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exit_:  # argparse's --help and usage errors
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved_argv
    eval_harness.finish_processes()
    return 0


if __name__ == "__main__":
    sys.exit(main())

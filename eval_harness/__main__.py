"""`python -m eval_harness ...` / `ltm eval ...`: lm-evaluation-harness's own command line with model `ltm`.

Every flag is lm-eval's (`--model ltm --model_args pretrained=PATH --tasks ... --include_path ... --num_fewshot
--output_path --limit --log_samples ...`); this entry point only registers the model first, then hands over to
`lm_eval.__main__.cli_evaluate`, which reads `sys.argv`.
"""

import sys

from lm_eval.__main__ import cli_evaluate

import eval_harness  # noqa: F401  (registers model "ltm")


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI on `argv` (defaults to `sys.argv[1:]`) and return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    saved_argv = sys.argv
    sys.argv = ["ltm eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exit_:  # argparse's --help and usage errors
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved_argv
    return 0


if __name__ == "__main__":
    sys.exit(main())

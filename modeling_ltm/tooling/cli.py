"""`ltm` command line: `ltm train | eval | generate | compare | export | push | convert-original`.

Each subcommand lives in the module that owns its job and is imported only when called, so `ltm generate` does not
pay for lm-eval's import and `ltm train` does not pay for the Hub client's.
"""

import importlib
import sys


SUBCOMMANDS = {
    "train": ("modeling_ltm.tooling.train_cli", "main", "train an LTM with LTMTrainer (HfArgumentParser flags)"),
    "eval": ("eval_harness.__main__", "main", "lm-evaluation-harness with model 'ltm' (lm-eval's own flags)"),
    "generate": ("modeling_ltm.tooling.generate_cli", "main", "generate text, fitting z on each prompt"),
    "compare": ("modeling_ltm.tooling.compare_cli", "main", "an LTM run against its Llama peer: bounds vs exact, speed, FLOPs"),
    "export": ("hub_cards.cli", "export_main", "write a Hub-ready folder (weights, remote code, tokenizer, card)"),
    "push": ("hub_cards.cli", "push_main", "upload an exported folder to the Hugging Face Hub"),
    "convert-original": (
        "modeling_ltm.tooling.convert_original",
        "main",
        "turn a checkpoint of the authors' code (ckpt_N.pt) into a save_pretrained folder",
    ),
}


def usage() -> str:
    lines = ["usage: ltm <command> [options]", "", "commands:"]
    width = max(map(len, SUBCOMMANDS))
    lines += [f"  {name:<{width}} {help_text}" for name, (_, _, help_text) in SUBCOMMANDS.items()]
    lines += [
        "",
        "Run `ltm <command> --help` for a command's options. Errors print one line (exit code 2); add --debug for "
        "the full traceback.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--debug" and len(argv) > 1:  # `ltm --debug train ...`: the commands read it themselves
        argv = [argv[1], "--debug", *argv[2:]]
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"ltm: unknown command {name!r}.\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = SUBCOMMANDS[name]
    command = getattr(importlib.import_module(module_name), function_name)
    return command(rest) or 0


if __name__ == "__main__":
    sys.exit(main())

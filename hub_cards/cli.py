"""`ltm export` and `ltm push`: thin argparse front-ends of `export_for_hub` and `push_folder`."""

from __future__ import annotations

import argparse

from modeling_ltm.tooling.cli_errors import run_cli


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltm export",
        description=(
            "Write a Hub-ready folder for a trained LTM: config.json with auto_map, model.safetensors, the remote-code "
            "files, generation_config.json with the inference-step defaults, the tokenizer and a model card."
        ),
    )
    parser.add_argument("checkpoint", help="Trainer output folder or one of its checkpoint-N folders")
    parser.add_argument("output_dir", help="folder to write (must be empty or absent unless --overwrite)")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id, if the checkpoint has none")
    parser.add_argument(
        "--lm-eval-results",
        action="append",
        default=[],
        metavar="PATH",
        help="lm-eval results JSON (or a folder with results*.json) for the card; repeatable",
    )
    parser.add_argument(
        "--repo-id",
        help="Hub repository the folder is for (the card's usage code loads from it). Without it the card names a "
        "marked placeholder, which `ltm push` replaces with the repository it pushes to",
    )
    parser.add_argument("--model-name", help="card title (default: last part of --repo-id)")
    parser.add_argument(
        "--dataset",
        action="append",
        dest="datasets",
        metavar="ID",
        help="training dataset Hub id for the card's metadata; repeatable (default: the Hub dataset `ltm train` "
        "recorded, if any)",
    )
    parser.add_argument("--eval-dataset-name", help="name of the split the trainer evaluated on")
    parser.add_argument("--license", default="apache-2.0", help="license of the weights (default: apache-2.0)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty output folder, replacing only the files an export writes (others are kept)",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def _push_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltm push",
        description="Upload an `ltm export` folder to the Hugging Face Hub (creates the repository if needed).",
    )
    parser.add_argument("folder", help="an `ltm export` folder")
    parser.add_argument("repo_id", help="'user/name' or 'org/name'")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", help="commit message")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the one saved by `hf auth login`)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    """`ltm export`; errors are printed as one line (exit code 2) by `modeling_ltm.tooling.cli_errors.run_cli`."""
    return run_cli("ltm export", _export, argv)


def push_main(argv: list[str] | None = None) -> int:
    """`ltm push`; errors are printed as one line (exit code 2) by `modeling_ltm.tooling.cli_errors.run_cli`."""
    return run_cli("ltm push", _push, argv)


def _export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    from .export import export_for_hub

    folder = export_for_hub(
        args.checkpoint,
        args.output_dir,
        tokenizer=args.tokenizer,
        lm_eval_results=args.lm_eval_results,
        repo_id=args.repo_id,
        model_name=args.model_name,
        datasets=args.datasets,
        eval_dataset_name=args.eval_dataset_name,
        license=args.license,
        overwrite=args.overwrite,
    )
    print(f"Exported to {folder}. Push it with: ltm push {folder} <user>/<name>")
    return 0


def _push(argv: list[str]) -> int:
    args = _push_parser().parse_args(argv)
    from .push import push_folder

    url = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        token=args.token,
    )
    print(f"Pushed {args.folder} to {url}")
    return 0


__all__ = ["export_main", "push_main"]

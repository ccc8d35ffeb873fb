"""`ltm compare LTM_RUN PEER_RUN`: an LTM run against its Llama peer (`ltm train ... --baseline llama` with the same
tokenizer, data, steps and recipe), in one table: held-out bounds of the LTM (ELBO and importance-weighted, with the
KL) against the peer's exact perplexity on the same held-out blocks, the same on one outside text, training tokens/s
and FLOPs per token. The table is printed and saved as `LTM_RUN/comparison.json`.

    ltm compare runs/ltm-tiny runs/ltm-tiny-llama                        # outside text: WikiText-2, else named
    ltm compare runs/ltm-tiny runs/ltm-tiny-llama --outside path/to/wiki.test.raw --outside-blocks 32

The outside text is WikiText-2's test set (`$LTM_EVAL_WIKITEXT` or the public dataset through `datasets`); where it
cannot be had (offline, not cached), the held-out part of the embedded corpus after the blocks the runs evaluated,
named as such in the table (in-domain text, not an outside one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

import datasets

from . import data as ltm_data
from .cli_errors import CLIError, run_cli


PROG = "ltm compare"
RESULT_FILE = "comparison.json"
# FLOPs per token of a forward pass: 2N (N = parameters; attention scores not counted). A fast step is a forward and
# an activation-only backward (2N + 2N); a training step of the LTM is T fast steps, the slow forward/backward (6N)
# and the fit's final scoring forward (2N): (4T + 6 + 2)N. The peer's: 6N.
RATIO_MEANING = (
    "ratio = the LTM's importance-weighted bound / the peer's exact perplexity: an upper bound against an exact "
    "number, so a ratio <= 1 means the LTM is at least as good whatever its bound's slack"
)


class CompareError(CLIError):
    """A run folder that cannot be compared (missing results, another tokenizer or data): one line."""


def read_run(folder: Path) -> dict:
    """A run folder's recorded results: `eval_results.json`, `train_results.json`, `ltm_train_data.json`."""
    record = {}
    for name in ("eval_results.json", "train_results.json", "ltm_train_data.json"):
        path = folder / name
        if not path.is_file():
            raise CompareError(
                f"{folder}: no {name}; pass the output folder of a finished `ltm train` run (with its evaluation)."
            )
        record[name.split("_")[0] if name != "ltm_train_data.json" else "data"] = json.loads(path.read_text())
    return record


def check_same_setup(ltm: dict, peer: dict, ltm_dir: Path, peer_dir: Path) -> None:
    """Both runs trained on the same data, blocks and tokenizer, and evaluated the same held-out blocks."""
    pairs = {key: (ltm["data"].get(key), peer["data"].get(key)) for key in ("corpus", "block_size", "tokenizer",
                                                                          "train_blocks_fingerprint")}  # fmt: skip
    pairs["eval_blocks"] = (ltm["eval"].get("eval_blocks"), peer["eval"].get("eval_blocks"))
    for key, (mine, theirs) in pairs.items():
        if mine != theirs:
            raise CompareError(
                f"{peer_dir} was not trained like {ltm_dir}: its {key} is {theirs!r}, not {mine!r}; train the peer "
                f"with the LTM run's flags plus `--baseline llama --tokenizer {ltm_dir}`."
            )
    if "eval_perplexity" not in peer["eval"] or "eval_elbo_ppl" not in ltm["eval"]:
        raise CompareError(
            f"pass the LTM run first and the Llama peer (`--baseline llama`) second: {ltm_dir}, {peer_dir}."
        )


def outside_blocks(choice: str, tokenizer, block_size: int, num_blocks: int, skip_held_out: int):
    """`(name, blocks)` of the outside text: WikiText-2 test (`choice` "auto" or "wikitext"; a file path reads that
    file), or for "auto" where WikiText-2 cannot be had, the held-out embedded corpus after `skip_held_out` blocks."""
    from eval_harness.tasks._paths import MissingTaskDataError
    from eval_harness.tasks.wikitext_local import load_documents, split_articles

    try:
        if choice in ("auto", "wikitext"):
            pages = load_documents()["test"]["page"]
            name = "WikiText-2 test (raw)"
        else:
            path = Path(choice)
            if not path.is_file():
                raise CompareError(f"--outside {choice}: no such file; pass a text file, `wikitext` or `none`.")
            pages, name = split_articles(path.read_text(encoding="utf-8")) or [path.read_text()], path.name
        rows = datasets.Dataset.from_dict({"text": list(pages)})
        blocks = ltm_data.tokenize_and_pack(rows, tokenizer, block_size, load_from_cache_file=False)
        return name, blocks.select(range(min(num_blocks, len(blocks))))
    except MissingTaskDataError as error:
        if choice != "auto":
            raise CompareError(str(error)) from error
    held_out = ltm_data.load_text_dataset()["validation"]
    blocks = ltm_data.tokenize_and_pack(held_out, tokenizer, block_size, load_from_cache_file=False)
    end = min(skip_held_out + num_blocks, len(blocks))
    name = (
        f"embedded corpus, held-out blocks {skip_held_out + 1}-{end} (in-domain: WikiText-2 could not be had; "
        "set $LTM_EVAL_WIKITEXT=path/to/wiki.test.raw)"
    )
    return name, blocks.select(range(skip_held_out, end))


def score_outside(ltm_dir: Path, peer_dir: Path, blocks, batch_size: int, iw_samples: int) -> tuple[dict, float]:
    """The LTM's bounds (its config's evaluation fit, IW with `iw_samples`) and the peer's exact perplexity on
    `blocks`, through the same Trainer evaluation as the runs' own held-out numbers."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from .trainer import LTMTrainer, LTMTrainingArguments

    with tempfile.TemporaryDirectory() as scratch:
        common = dict(
            per_device_eval_batch_size=batch_size, report_to="none", use_cpu=not _has_cuda(), seed=0, disable_tqdm=True,
            dataloader_pin_memory=False,
        )
        ltm_args = LTMTrainingArguments(
            os.path.join(scratch, "ltm"), eval_iw_samples=iw_samples, eval_reconstruction=False, **common
        )
        ltm = AutoModelForCausalLM.from_pretrained(ltm_dir).eval()
        ltm_metrics = LTMTrainer(model=ltm, args=ltm_args, data_collator=ltm_data.collate_blocks).evaluate(blocks)
        peer = AutoModelForCausalLM.from_pretrained(peer_dir).eval()
        peer_args = TrainingArguments(os.path.join(scratch, "peer"), **common)
        peer_metrics = Trainer(model=peer, args=peer_args, data_collator=ltm_data.collate_blocks).evaluate(blocks)
    return ltm_metrics, math.exp(peer_metrics["eval_loss"])


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def flops_per_token(num_parameters: int, fast_steps: int | None) -> float:
    """Training FLOPs per token: `(4T + 8) N` for an LTM with `T` fast steps, `6N` for an autoregressive peer
    (`fast_steps=None`); see the comment on `RATIO_MEANING`'s neighbours."""
    return (6 * num_parameters) if fast_steps is None else (4 * fast_steps + 8) * num_parameters


def comparison(ltm_dir: Path, peer_dir: Path, outside: str, num_blocks: int, batch_size: int) -> dict:
    ltm, peer = read_run(ltm_dir), read_run(peer_dir)
    check_same_setup(ltm, peer, ltm_dir, peer_dir)
    from transformers import AutoConfig

    from ..fit_settings import PosteriorFitSettings

    config = AutoConfig.from_pretrained(ltm_dir)
    recipe = json.loads((ltm_dir / "training_args.json").read_text()) if (ltm_dir / "training_args.json").is_file() else {}
    fast_steps = recipe.get("num_inference_steps") or config.num_inference_steps
    evaluation_fit = PosteriorFitSettings.evaluation(
        config, num_steps=ltm["eval"].get("eval_inference_steps"), lr=ltm["eval"].get("eval_inference_lr")
    ).describe()
    iw_samples = int(ltm["eval"].get("eval_iw_samples") or 16)
    rows = {
        "held_out": {
            "text": f"{ltm['eval']['eval_blocks']} held-out blocks of the training corpus ({ltm['data']['corpus']})",
            "ltm": _bounds(ltm["eval"]),
            "peer_perplexity": peer["eval"]["eval_perplexity"],
        }
    }
    if outside != "none":
        tokenizer = ltm_data.load_tokenizer(str(ltm_dir))
        name, blocks = outside_blocks(outside, tokenizer, ltm["data"]["block_size"], num_blocks,
                                      ltm["eval"]["eval_blocks"])  # fmt: skip
        ltm_metrics, peer_perplexity = score_outside(ltm_dir, peer_dir, blocks, batch_size, iw_samples)
        rows["outside"] = {"text": f"{name}, {len(blocks)} blocks", "ltm": _bounds(ltm_metrics),
                           "peer_perplexity": peer_perplexity}  # fmt: skip
    for row in rows.values():
        row["ratio"] = row["ltm"]["iw_ppl"] / row["peer_perplexity"] if row["ltm"]["iw_ppl"] else None
    return {
        "ltm_run": str(ltm_dir),
        "peer_run": str(peer_dir),
        "rows": rows,
        "evaluation_fit": evaluation_fit,
        "training": {
            "ltm": _training(ltm, flops_per_token(ltm["train"]["num_parameters"], fast_steps), fast_steps),
            "peer": _training(peer, flops_per_token(peer["train"]["num_parameters"], None), None),
        },
        "ratio_meaning": RATIO_MEANING,
    }


def _bounds(metrics: dict) -> dict:
    return {
        "elbo_ppl": metrics["eval_elbo_ppl"],
        "iw_ppl": metrics.get("eval_iw_ppl"),
        "iw_samples": metrics.get("eval_iw_samples"),
        "nll_per_token": metrics["eval_nll_per_token"],
        "kl_per_token": metrics["eval_kl_per_token"],
    }


def _training(run: dict, flops: float, fast_steps: int | None) -> dict:
    return {
        "tokens_per_second": run["train"].get("train_tokens_per_second"),
        "tokens": run["train"].get("train_tokens"),
        "num_parameters": run["train"]["num_parameters"],
        "flops_per_token": flops,
        "fast_steps": fast_steps,
        "stopped_by_time_budget": bool(run["train"].get("stopped_by_time_budget")),
    }


def table(result: dict) -> str:
    """The comparison as the text table `ltm compare` prints."""
    ltm, peer = result["training"]["ltm"], result["training"]["peer"]
    lines = ["", "=" * 100, "ltm compare: the LTM against its Llama peer (same tokenizer, data, steps, recipe)"]
    lines.append(f"{'':24s}{'LTM: IW bound | ELBO bound (NLL + KL nats/token)':54s}{'Llama: exact':>13s}{'ratio':>9s}")
    for row in result["rows"].values():
        bounds = row["ltm"]
        iw = f"{bounds['iw_ppl']:.2f} (K={bounds['iw_samples']})" if bounds["iw_ppl"] else "-"
        cell = f"{iw} | {bounds['elbo_ppl']:.2f} ({bounds['nll_per_token']:.3f} + {bounds['kl_per_token']:.3f})"
        ratio = f"{row['ratio']:.3f}x" if row["ratio"] is not None else "-"
        lines.append(f"{'perplexity':24s}{cell:54s}{row['peer_perplexity']:>13.2f}{ratio:>9s}")
        lines.append(f"  on {row['text']}")
    speed = (ltm["tokens_per_second"] or 0) / (peer["tokens_per_second"] or math.inf)
    lines.append(f"{'training tokens':24s}{ltm['tokens']:<54,}{peer['tokens']:>13,}")
    for name, run in (("LTM", ltm), ("Llama peer", peer)):
        if run["stopped_by_time_budget"]:
            lines.append(f"  the {name} was stopped by its time budget (--max_train_minutes): not equal tokens")
    lines.append(f"{'training tokens/s':24s}{_rate(ltm):54s}{_rate(peer):>13s}{speed:>8.3f}x")
    flops = f"(4T + 8) N = {ltm['flops_per_token']:.3g} (T = {ltm['fast_steps']})"
    ratio = ltm["flops_per_token"] / peer["flops_per_token"]
    lines.append(f"{'training FLOPs/token':24s}{flops:54s}{peer['flops_per_token']:>13.3g}{ratio:>8.2f}x")
    lines.append(f"evaluation fit: {result['evaluation_fit']}")
    lines.append(result["ratio_meaning"] + ".")
    lines.append("=" * 100)
    return "\n".join(lines)


def _rate(run: dict) -> str:
    return f"{run['tokens_per_second']:,.0f}" if run["tokens_per_second"] else "-"


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("ltm_run", type=Path, help="the LTM's `ltm train` output folder")
    parser.add_argument("peer_run", type=Path, help="its Llama peer's (`ltm train ... --baseline llama`)")
    parser.add_argument(
        "--outside", default="auto",
        help="the outside text: `auto` (WikiText-2 test, else the named held-out embedded corpus), `wikitext`, a "
        "text file, or `none`",
    )  # fmt: skip
    parser.add_argument("--outside-blocks", type=int, default=32, help="blocks of the outside text scored")
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    if args.outside_blocks < 1:
        raise CompareError(f"--outside-blocks must be >= 1, got {args.outside_blocks}.")
    result = comparison(args.ltm_run, args.peer_run, args.outside, args.outside_blocks, args.batch_size)
    print(table(result))
    (args.ltm_run / RESULT_FILE).write_text(json.dumps(result, indent=1))
    print(f"saved to {args.ltm_run / RESULT_FILE}")
    return 0

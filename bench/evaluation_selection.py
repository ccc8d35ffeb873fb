"""The evaluation's selection rule on issue 10's recipe (issue 22): the held-out bound of the trivial posterior
q = p(z), of the evaluation fit without selection, and of the default (the better of start and fit per sequence).

    .venv/bin/python bench/evaluation_selection.py --out bench/results/evaluation-selection.json   # ~2 min, 2 cores

The recipe, exactly as `tests/test_trainer.py::test_default_evaluation_bound_is_within_1_percent_of_the_trivial_posterior`:
a byte-level LTM (vocab 256, hidden 96, 2 layers, 4 heads, MLP 256, 4 latents per layer, every other config field
default: the training fast loop has T = 16) trained by `LTMTrainer` for 30 steps of 16 x 128 bytes of Tiny Shakespeare
at lr 3e-3 (seed 0); the last 32 blocks are held out. Every bound is per predicted token, averaged over the held-out
blocks (nats -> perplexity): the trivial posterior's NLL at `--trivial-draws` prior draws (KL 0); the evaluation fit
(`PosteriorFitSettings.evaluation(config)`: from the prior, eps redrawn, 32 steps at lr 0.1) with `select_samples` 0
(the fitted posterior, whatever it scores) and the default 4 (see `docs/evaluation.md`), the NLL averaged over the
config's `eval_score_samples` fresh draws; and the importance-weighted bound (K = 16) of the default.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from bench.common import run_metadata, save_json  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trivial-draws", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    return parser.parse_args(argv)


def train_recipe_model(workdir: str):
    """Issue 10's model and its 32 held-out blocks (the test's recipe; `tests/test_trainer.py` helpers)."""
    from datasets import Dataset
    from test_trainer import text_bytes

    from modeling_ltm import LTMConfig, LTMForCausalLM
    from modeling_ltm.tooling.trainer import LTMTrainer, LTMTrainingArguments

    block = 128
    data = torch.tensor(list(text_bytes((30 * 16 + 32) * block))).view(-1, block)
    train = Dataset.from_dict({"input_ids": data[:-32].tolist()})
    torch.manual_seed(0)
    config = LTMConfig(
        vocab_size=256, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        n_latents_per_layer=4,
    )  # fmt: skip
    model = LTMForCausalLM(config)
    args = LTMTrainingArguments(
        workdir, max_steps=30, per_device_train_batch_size=16, learning_rate=3e-3, use_cpu=True, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    LTMTrainer(model=model, args=args, train_dataset=train).train()
    return model.eval(), data[-32:]


def main(argv=None) -> int:
    import tempfile

    from datasets import Dataset
    from test_trainer import trivial_posterior_ppl

    from modeling_ltm.inference import PosteriorFitSettings, evaluate_posterior

    args = parse_args(argv)
    started, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir:
        model, heldout = train_recipe_model(workdir)
    trivial = trivial_posterior_ppl(model, Dataset.from_dict({"input_ids": heldout.tolist()}), args.trivial_draws)
    rows = [{"evaluation": f"trivial posterior q = p(z) ({args.trivial_draws} prior draws, KL 0)", "ppl": trivial}]
    seeds = list(range(heldout.shape[0]))
    for select_samples in (0, model.config.eval_select_samples):
        settings = PosteriorFitSettings.evaluation(model.config, select_samples=select_samples)
        iw = 16 if select_samples else 0
        summary = evaluate_posterior(model, heldout, settings=settings, iw_samples=iw, seed=seeds).summary()
        label = "default: better of start and fit" if select_samples else "the fitted posterior (no selection)"
        rows.append(
            {
                "evaluation": f"{label}, select_samples={select_samples}",
                "ppl": summary["elbo_ppl"],
                "nll_per_token": summary["nll_per_token"],
                "kl_per_token": summary["kl_per_token"],
                "start_kept_fraction": summary.get("start_kept_fraction"),
                "iw_ppl": summary.get("iw_ppl"),
            }
        )
    lines = ["| evaluation | ELBO bound | / trivial | NLL + KL (nats/token) | start kept | IW bound (K = 16) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        nll_kl = f"{row['nll_per_token']:.4f} + {row['kl_per_token']:.4f}" if "nll_per_token" in row else "-"
        kept = "-" if row.get("start_kept_fraction") is None else f"{row['start_kept_fraction']:.0%}"
        iw = "-" if row.get("iw_ppl") is None else f"{row['iw_ppl']:.2f}"
        lines.append(
            f"| {row['evaluation']} | {row['ppl']:.2f} | {row['ppl'] / trivial:.3f} | {nll_kl} | {kept} | {iw} |"
        )
    markdown = "\n".join(lines)
    print(markdown)
    assert all(math.isfinite(row["ppl"]) for row in rows)
    save_json(args.out, {"meta": run_metadata("evaluation_selection.py", argv, args, load_before, started),
                         "results": rows, "markdown": markdown})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

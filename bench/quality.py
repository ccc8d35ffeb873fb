"""Training quality of an LTM vs its `LlamaForCausalLM` peer at equal training tokens (acceptance of issue 3).

    .venv/bin/python bench/quality.py                      # everything; prints markdown, writes bench/results/quality.json

Setup: Tiny Shakespeare (`../shared/data/tinyshakespeare/input.txt`), first 90% of the characters for training, the
last 10% held out; one byte-level BPE trained on the training part for every model; packed blocks of `--block`
tokens. Three models of the same shape (`--hidden`, `--layers`, `--heads`, vocabulary, MLP width, tied embeddings)
are trained on the same blocks in the same order for the same number of tokens (`--train-tokens`) with the same
optimizer and schedule:

- `llama`: transformers' `LlamaForCausalLM` with the plain `Trainer`; held-out perplexity is exact.
- `ltm-T8`, `ltm-T16`: `LTMForCausalLM` with `LTMTrainer`, 8 or 16 fast steps per training batch. Held-out figures are
  upper bounds on perplexity: the ELBO bound `exp((NLL + KL) / tokens)` (with NLL and KL per token shown) and the
  importance-weighted bound with `--iw-samples` samples, after `T` fast steps; plus the ELBO bound as a function of
  the eval inference steps (`--eval-steps`).

Zero-shot: the same bounds / perplexity on the first `--wikitext-blocks` blocks of
`../shared/data/wikitext-2-raw/wiki.test.raw` (tokenized with the Shakespeare tokenizer).

Models train in parallel processes (`--jobs`, each with `--threads` torch threads); training tokens/s are measured
per process while the others run, so compare them within one run only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TINY_SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
WIKITEXT2_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
MODELS = ("llama", "ltm-T8", "ltm-T16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    p.add_argument("--train-tokens", type=int, default=1_000_000, help="training tokens per model")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--latents", type=int, default=4, help="LTM latent vectors per layer")
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary (incl. 2 special tokens)")
    p.add_argument("--block", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--iw-samples", type=int, default=16)
    p.add_argument("--eval-steps", default="0,4,8,16,32", help="eval inference steps of the sweep")
    p.add_argument("--max-eval-blocks", type=int, default=None, help="held-out blocks evaluated (default: all)")
    p.add_argument("--wikitext-blocks", type=int, default=128)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=3, help="models trained in parallel processes")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "quality.json"))
    p.add_argument("--workdir", default=str(REPO_ROOT / "runs" / "bench-quality"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Data (built once by the parent, shared through the workdir)
# ---------------------------------------------------------------------------------------------------------------


def prepare_data(args) -> None:
    from datasets import Dataset, DatasetDict

    from modeling_ltm import data

    workdir = Path(args.workdir)
    if (workdir / "data" / "done").exists():
        return
    raw = data.load_text_dataset(str(TINY_SHAKESPEARE), validation_fraction=0.1)
    tokenizer = data.train_tokenizer(raw["train"], args.vocab, model_max_length=args.block)
    tokenizer.save_pretrained(workdir / "tokenizer")
    wiki = Dataset.from_dict({"text": [WIKITEXT2_TEST.read_text(encoding="utf-8")]})
    blocks = DatasetDict(
        train=data.tokenize_and_pack(raw["train"], tokenizer, args.block),
        validation=data.tokenize_and_pack(raw["validation"], tokenizer, args.block),
        wikitext=data.tokenize_and_pack(wiki, tokenizer, args.block),
    )
    if args.max_eval_blocks:
        blocks["validation"] = blocks["validation"].select(range(min(args.max_eval_blocks, len(blocks["validation"]))))
    blocks["wikitext"] = blocks["wikitext"].select(range(min(args.wikitext_blocks, len(blocks["wikitext"]))))
    blocks.save_to_disk(workdir / "data")
    (workdir / "data" / "done").write_text("ok")


# ---------------------------------------------------------------------------------------------------------------
# One model (child process)
# ---------------------------------------------------------------------------------------------------------------


def run_model(args, name: str) -> dict:
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

    from modeling_ltm import LTMConfig, LTMForCausalLM
    from modeling_ltm.data import collate_blocks
    from modeling_ltm.train_cli import llama_peer_config
    from modeling_ltm.trainer import LTMTrainer, LTMTrainingArguments

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    blocks = load_from_disk(workdir / "data")
    config = LTMConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=64 * -(-(8 * args.hidden // 3) // 64),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.block,
        n_latents_per_layer=args.latents,
        latent_dim=args.latent_dim,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tokens_per_step = args.batch * args.block
    max_steps = math.ceil(args.train_tokens / tokens_per_step)
    common = dict(
        output_dir=str(workdir / name),
        max_steps=max_steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=32,
        learning_rate=args.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=max(1, max_steps // 20),
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=1.0,
        logging_steps=max(1, max_steps // 20),
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=True,
        prediction_loss_only=True,
        dataloader_num_workers=0,
    )
    set_seed(args.seed)
    is_ltm = name.startswith("ltm")
    if is_ltm:
        steps = int(name.split("T")[-1])
        model = LTMForCausalLM(config)
        training_args = LTMTrainingArguments(
            **common, num_inference_steps=steps, eval_inference_steps=steps, eval_iw_samples=args.iw_samples
        )
        trainer = LTMTrainer(
            model=model,
            args=training_args,
            train_dataset=blocks["train"],
            eval_dataset=blocks["validation"],
            data_collator=collate_blocks,
        )
    else:
        model = LlamaForCausalLM(llama_peer_config(config))
        training_args = TrainingArguments(**common)
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=blocks["train"],
            eval_dataset=blocks["validation"],
            data_collator=collate_blocks,
        )

    result = {"model": name, "parameters": sum(p.numel() for p in model.parameters()), "max_steps": max_steps}
    train_metrics = trainer.train().metrics
    tokens = trainer.state.global_step * tokens_per_step
    result.update(
        train_tokens=tokens,
        train_seconds=train_metrics["train_runtime"],
        train_tokens_per_second=tokens / train_metrics["train_runtime"],
        train_loss=train_metrics["train_loss"],
        train_log=[entry for entry in trainer.state.log_history if "loss" in entry],
    )
    eval_start = time.time()
    if is_ltm:
        held_out = trainer.evaluate(inference_steps=steps, iw_samples=args.iw_samples)
        result["held_out"] = _ltm_metrics(held_out)
        result["sweep"] = []
        for eval_steps in [int(s) for s in args.eval_steps.split(",") if s.strip()]:
            metrics = held_out if eval_steps == steps else trainer.evaluate(inference_steps=eval_steps, iw_samples=0)
            result["sweep"].append({"inference_steps": eval_steps, **_ltm_metrics(metrics, iw=False)})
        wiki = trainer.evaluate(
            blocks["wikitext"], inference_steps=steps, iw_samples=args.iw_samples, metric_key_prefix="eval"
        )
        result["wikitext"] = _ltm_metrics(wiki)
    else:
        result["held_out"] = {"perplexity": math.exp(trainer.evaluate()["eval_loss"])}
        result["wikitext"] = {"perplexity": math.exp(trainer.evaluate(blocks["wikitext"])["eval_loss"])}
    result["eval_seconds"] = time.time() - eval_start
    result["held_out_tokens"] = len(blocks["validation"]) * (args.block - 1)
    result["wikitext_tokens"] = len(blocks["wikitext"]) * (args.block - 1)
    return result


def _ltm_metrics(metrics: dict, iw: bool = True) -> dict:
    out = {
        "nll_per_token": metrics["eval_nll_per_token"],
        "kl_per_token": metrics["eval_kl_per_token"],
        "elbo_ppl": metrics["eval_elbo_ppl"],
        "inference_steps": metrics["eval_inference_steps"],
    }
    if iw and "eval_iw_ppl" in metrics:
        out.update(iw_ppl=metrics["eval_iw_ppl"], iw_samples=metrics["eval_iw_samples"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Parent: data, child processes, tables
# ---------------------------------------------------------------------------------------------------------------


def markdown(results: list[dict], meta: dict) -> str:
    by_name = {r["model"]: r for r in results}
    lines = [
        f"Tiny Shakespeare, {meta['train_blocks']:,} training blocks / {meta['held_out_tokens']:,} held-out predicted "
        f"tokens of {meta['args']['block']}-token blocks, BPE vocabulary {meta['vocab_size']}; "
        f"{meta['args']['train_tokens']:,} training tokens per model.",
        "",
        "| model | params | train tokens | train tokens/s | train wall (s) | held-out NLL/token | held-out KL/token "
        "| held-out ppl (ELBO bound) | held-out ppl (IW bound) | wikitext-2 ppl (ELBO / IW bound) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        r = by_name.get(name)
        if r is None:
            continue
        common = (
            f"| {name} | {r['parameters'] / 1e6:.3f}M | {r['train_tokens']:,} | {r['train_tokens_per_second']:,.0f} "
            f"| {r['train_seconds']:.0f} "
        )
        h, w = r["held_out"], r["wikitext"]
        if name == "llama":
            lines.append(
                common + f"| {math.log(h['perplexity']):.3f} | - | {h['perplexity']:.2f} (exact) | - "
                f"| {w['perplexity']:.2f} (exact) |"
            )
        else:
            lines.append(
                common + f"| {h['nll_per_token']:.3f} | {h['kl_per_token']:.3f} | {h['elbo_ppl']:.2f} "
                f"| {h.get('iw_ppl', float('nan')):.2f} (K={h.get('iw_samples', '-')}) "
                f"| {w['elbo_ppl']:.2f} / {w.get('iw_ppl', float('nan')):.2f} (KL {w['kl_per_token']:.3f}) |"
            )
    sweeps = [by_name[n] for n in MODELS if n in by_name and "sweep" in by_name[n]]
    if sweeps:
        steps = [s["inference_steps"] for s in sweeps[0]["sweep"]]
        lines += [
            "",
            "Held-out ELBO perplexity bound vs eval inference steps (NLL + KL nats/token in brackets):",
            "",
            "| model | " + " | ".join(f"T_eval = {s}" for s in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for r in sweeps:
            cells = [f"{s['elbo_ppl']:.2f} ({s['nll_per_token']:.3f} + {s['kl_per_token']:.3f})" for s in r["sweep"]]
            lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    workdir = Path(args.workdir)
    if args.child:
        (result,) = [run_model(args, name) for name in models]
        (workdir / f"{models[0]}.json").write_text(json.dumps(result, indent=1))
        return 0

    wall_start = time.time()
    load_before = os.getloadavg()
    prepare_data(args)
    child_argv = list(argv if argv is not None else sys.argv[1:])  # flags pass through; `--models` is overridden
    pending, running, failed = list(models), [], []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            command = [sys.executable, __file__, *child_argv, "--models", name, "--child"]
            log = open(workdir / f"{name}.log", "w")
            running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
            print(f"[{time.time() - wall_start:6.0f} s] started {name} (log: {workdir / (name + '.log')})", flush=True)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                if proc.returncode != 0:
                    failed.append(name)
                print(f"[{time.time() - wall_start:6.0f} s] {name} {status}", flush=True)
        time.sleep(2)

    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    blocks = load_from_disk(workdir / "data")
    results = [json.loads((workdir / f"{m}.json").read_text()) for m in models if m not in failed]
    meta = {
        "command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_seconds": time.time() - wall_start,
        "train_blocks": len(blocks["train"]),
        "held_out_tokens": len(blocks["validation"]) * (args.block - 1),
        "wikitext_tokens": len(blocks["wikitext"]) * (args.block - 1),
        "vocab_size": len(AutoTokenizer.from_pretrained(workdir / "tokenizer")),
        "failed": failed,
    }
    table = markdown(results, meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "markdown": table}, indent=1))
    print(table)
    print(
        f"\nwall {meta['wall_seconds']:.0f} s; load average before {load_before}, after {meta['load_average_after']}; "
        f"torch {meta['torch']}; results in {out}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

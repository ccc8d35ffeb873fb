"""Evaluation-fit efficiency (issue 13): held-out ELBO per token against compute and wall time, for the baseline
evaluation fit and the new default, on a trained model.

    .venv/bin/python bench/inference_efficiency.py --quick     # < 5 min on 2 CPU cores; trains its own small model

Setup (the shape of `bench/quality.py`'s model): the text of `--dataset` (as `bench/quality.py --dataset`; default the
embedded corpus, Shakespeare's works; the figures of docs/benchmarks.md used Tiny Shakespeare,
`--dataset path/to/tinyshakespeare/input.txt`), first 90% of the characters for training, last 10% held out, one
byte-level BPE for both models. An `LTMForCausalLM`
(`LTMTrainer`, 8 fast steps per batch) and its `LlamaForCausalLM` peer (same width, depth, heads, MLP, vocabulary)
are trained on the same blocks for `--train-tokens` tokens; then the LTM's posterior encoder. All are cached in
`--workdir`.

Every fit is scored on the same held-out blocks with per-row seeds:

- ELBO per token = `-(E_q[-log p(x|z)] + KL) / tokens`, the likelihood term averaged over `--score-samples` fresh
  draws `z ~ q` (batched forwards) so the comparison is not drowned in single-sample noise.
- compute in forward+backward equivalents per sequence: a fast step on `r` rows costs `r` row-steps; the one scoring
  forward a reported ELBO needs costs `--forward-cost` (0.5: a forward is about half of a forward + backward with
  respect to activations); the extra `--score-samples` draws taken here for precision are not counted (both fits
  would pay them alike).
- wall time: the fit plus one scoring forward, median of `--repeats` runs.

The baseline is `PosteriorFitSettings.evaluation(config)` as of issue 10 (T = 32, lr 0.1 -> 0.01 cosine, start at
the prior, eps redrawn every step), run through the plain path (no prefix reuse, fixed step count); its curve sweeps
`T` with the same rule. The new code has two curves, each reusing the latent-independent prefix:

- from the prior: the adaptive-stopping tolerance swept (`stop_tol`, window 8), then no stopping;
- warm start: the same decoder given an amortized posterior encoder (width 4 x hidden), trained once on the training
  blocks with the decoder frozen (`modeling_ltm.tooling.amortized.fit_posterior_encoder`, 300 steps of 16 sequences: a
  one-time cost of 4,800 forward+backward equivalents, recorded in the results), and fits from its proposal swept
  over T; the new default `PosteriorFitSettings.evaluation(config)` of that model (T = 8, lr 0.03) is its last point.
  The encoder's own forward (an MLP on the pooled prefix) is not counted: it is far below one decoder forward.

The last line printed is `compute_ratio=<new / baseline compute at the baseline's ELBO>` (the cheapest point of
either new curve that reaches the baseline's ELBO, interpolated linearly within a curve; `inf` if none does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.common import add_device_arguments, load_bench, resolve_device, run_metadata  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small training budget and evaluation set (< 5 min)")
    p.add_argument("--dataset", nargs="+", default=None, metavar="SOURCE",
                   help="training and held-out text, as `bench/quality.py --dataset` (default: the embedded corpus)")  # fmt: skip
    p.add_argument(
        "--train-tokens",
        type=int,
        default=None,
        help="training tokens per model (quick: 245,760 = 120 steps of 16 x 128)",
    )
    p.add_argument("--eval-blocks", type=int, default=None, help="held-out blocks scored (quick: 16)")
    p.add_argument("--batch", type=int, default=16, help="held-out sequences per fit")
    p.add_argument("--score-samples", type=int, default=8, help="draws z ~ q averaged in each ELBO estimate")
    p.add_argument("--forward-cost", type=float, default=0.5, help="a forward, in forward+backward equivalents")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per point (median)")
    add_device_arguments(p)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--retrain", action="store_true", help="ignore the models cached in --workdir")
    p.add_argument("--workdir", default=str(REPO_ROOT / "runs" / "bench-inference-efficiency"))
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "inference_efficiency.json"))
    p.add_argument("--png", default=str(REPO_ROOT / "docs" / "img" / "inference_efficiency.png"))
    args = p.parse_args(argv)
    if args.train_tokens is None:
        args.train_tokens = 245_760 if args.quick else 1_000_000
    if args.eval_blocks is None:
        args.eval_blocks = 16 if args.quick else 64
    return args


# ---------------------------------------------------------------------------------------------------------------
# Models: data and training as in bench/quality.py (hidden 64, 2 layers, 4 latents of width 32 per layer)
# ---------------------------------------------------------------------------------------------------------------


def quality_args(args):
    quality = load_bench("quality")
    qargs = quality.parse_args(
        [
            "--workdir",
            args.workdir,
            "--train-tokens",
            str(args.train_tokens),
            "--seed",
            str(args.seed),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--no-wikitext",  # this bench scores held-out blocks only
            *(["--dataset", *args.dataset] if args.dataset else []),
        ]  # fmt: skip
    )
    qargs.threads = args.threads
    return quality, qargs


def train_models(args) -> None:
    """Train (or reuse) the LTM and the Llama peer; writes `<workdir>/{ltm,llama}/` and their training seconds."""
    workdir = Path(args.workdir)
    if not args.retrain and all((workdir / name / "done.json").exists() for name in ("ltm", "llama")):
        done = [json.loads((workdir / n / "done.json").read_text()) for n in ("ltm", "llama")]
        if all(d["train_tokens_requested"] == args.train_tokens for d in done):
            return
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

    from modeling_ltm import LTMForCausalLM
    from modeling_ltm.tooling.data import collate_blocks
    from modeling_ltm.tooling.train_cli import llama_peer_config
    from modeling_ltm.tooling.trainer import LTMTrainer, LTMTrainingArguments

    quality, qargs = quality_args(args)
    quality.prepare_data(qargs)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    blocks = load_from_disk(workdir / "data")
    config = quality.ltm_config(qargs, tokenizer, n_latents_per_layer=qargs.latents, latent_dim=qargs.latent_dim)
    max_steps = math.ceil(args.train_tokens / (qargs.batch * qargs.block))
    torch.set_num_threads(args.threads)
    for name in ("llama", "ltm"):
        # The study's optimizer and schedule (bench/quality.py), with this bench's seed.
        recipe = argparse.Namespace(**{**vars(qargs), "seed": args.seed})
        common = dict(
            quality.training_arguments(recipe, workdir / f"{name}-trainer", max_steps),
            logging_steps=max(1, max_steps // 10),
        )
        set_seed(args.seed)
        if name == "ltm":
            model = LTMForCausalLM(config)
            trainer = LTMTrainer(
                model=model,
                args=LTMTrainingArguments(**common, num_inference_steps=8),
                train_dataset=blocks["train"],
                data_collator=collate_blocks,
            )
        else:
            model = LlamaForCausalLM(llama_peer_config(config))
            trainer = Trainer(
                model=model,
                args=TrainingArguments(**common),
                train_dataset=blocks["train"],
                data_collator=collate_blocks,
            )
        start = time.time()
        trainer.train()
        model.save_pretrained(workdir / name)
        (workdir / name / "done.json").write_text(
            json.dumps(
                {
                    "train_tokens": trainer.state.global_step * qargs.batch * qargs.block,
                    "train_tokens_requested": args.train_tokens,
                    "train_seconds": time.time() - start,
                }
            )
        )


def train_encoder(args) -> None:
    """Give the trained LTM an amortized posterior encoder (width 4 x hidden) and train it on the training blocks
    with the decoder frozen (`fit_posterior_encoder`); writes `<workdir>/ltm-encoder/` (same decoder weights) and the
    one-time cost in forward+backward equivalents."""
    workdir = Path(args.workdir)
    done = workdir / "ltm-encoder" / "done.json"
    ltm_done = json.loads((workdir / "ltm" / "done.json").read_text())
    fitted = workdir / "ltm-encoder" / "config.json"
    if (
        done.exists()
        and json.loads(done.read_text()).get("decoder_train_seconds") == ltm_done["train_seconds"]
        and json.loads(fitted.read_text()).get("posterior_encoder_fit") == "evaluation"  # saved before the field
    ):
        return
    import torch
    from datasets import load_from_disk

    from modeling_ltm import LTMConfig, LTMForCausalLM
    from modeling_ltm.tooling.amortized import fit_posterior_encoder

    torch.set_num_threads(args.threads)
    width = 4 * LTMConfig.from_pretrained(workdir / "ltm").hidden_size
    device, _ = resolve_device(args.device, args.dtype)
    model = LTMForCausalLM.from_pretrained(workdir / "ltm", posterior_encoder_size=width).to(device)
    blocks = torch.tensor(load_from_disk(workdir / "data")["train"]["input_ids"], device=device)
    start = time.time()
    history = fit_posterior_encoder(
        model, blocks, num_steps=ENCODER_STEPS, batch_size=ENCODER_BATCH, lr=ENCODER_LR, seed=args.seed
    )
    model.save_pretrained(workdir / "ltm-encoder")
    done.write_text(
        json.dumps(
            {
                "train_seconds": time.time() - start,
                "steps": ENCODER_STEPS,
                "forward_backward_equivalents": ENCODER_STEPS * ENCODER_BATCH,
                "elbo_per_token_first_last_20": [sum(history[:20]) / 20, sum(history[-20:]) / 20],
                "decoder_train_seconds": ltm_done["train_seconds"],
            }
        )
    )


# ---------------------------------------------------------------------------------------------------------------
# Fits and their scores
# ---------------------------------------------------------------------------------------------------------------


def run_fit(model, batches, settings, seeds, args, plain: bool) -> dict:
    """Fit every batch with `settings`; score ELBO per token with `args.score_samples` draws; count compute."""
    import torch

    from modeling_ltm import fast_loop, inference

    saved = fast_loop.compute_prefix
    if plain:  # the baseline as it ran before issue 13: every forward from the tokens
        fast_loop.compute_prefix = lambda *a: None
    neg_elbo = tokens = row_steps = rows = 0.0
    seconds, row_elbo = 0.0, []
    try:
        for input_ids, row_seeds in zip(batches, seeds):
            start = time.perf_counter()
            fit = inference.fit_posterior(model, input_ids, settings=settings, seed=row_seeds)
            seconds += time.perf_counter() - start  # the fit includes its one scoring forward
            with torch.no_grad():
                _, nll, _ = inference._importance_sample(
                    model, input_ids, None, None, args.score_samples, fit, row_seeds, None
                )
            neg_elbo += float((nll + fit.kl).sum())
            row_elbo += (-(nll + fit.kl) / fit.num_tokens).tolist()
            tokens += float(fit.num_tokens.sum())
            row_steps += float(fit.num_steps_taken.sum())
            rows += input_ids.shape[0]
    finally:
        fast_loop.compute_prefix = saved
    return {
        "elbo_per_token": -neg_elbo / tokens,
        "compute_per_sequence": (row_steps + args.forward_cost * rows) / rows,
        "mean_steps": row_steps / rows,
        "seconds": seconds,
        "row_elbo_per_token": row_elbo,
    }


def llama_nats_per_token(model, batches) -> float:
    """The peer's exact held-out NLL, nats per predicted token."""
    import torch

    total = tokens = 0.0
    with torch.no_grad():
        for input_ids in batches:
            loss = model(input_ids=input_ids, labels=input_ids).loss  # mean over B * (T - 1) predicted tokens
            n = input_ids.shape[0] * (input_ids.shape[1] - 1)
            total += float(loss) * n
            tokens += n
    return total / tokens


def compute_at(curve: list[dict], target: float, key: str) -> float:
    """The smallest `key` (compute or seconds) at which the curve's ELBO reaches `target`, interpolating linearly
    between measured points sorted by `key`; `inf` when no point reaches it."""
    points = sorted(curve, key=lambda p: p[key])
    for i, point in enumerate(points):
        if point["elbo_per_token"] >= target:
            if i == 0:
                return point[key]
            prev = points[i - 1]
            if prev["elbo_per_token"] >= target:
                return prev[key]
            frac = (target - prev["elbo_per_token"]) / (point["elbo_per_token"] - prev["elbo_per_token"])
            return prev[key] + frac * (point[key] - prev[key])
    return math.inf


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "compute_per_sequence", "forward+backward equivalents per sequence"),
                           (axes[1], "seconds", "wall time of the fits (s)")):  # fmt: skip
        new = result["new_curve"]
        for curve, style, name in ((result["baseline_curve"], "o-", "baseline fit (sweep of T)"),
                                   ([p for p in new if p["group"] == "from the prior"], "s-",
                                    "new code from the prior: stop_tol sweep + no stop"),
                                   ([p for p in new if p["group"] == "warm start"], "^-",
                                    "new default: warm start from the encoder (sweep of T)")):  # fmt: skip
            pts = sorted(curve, key=lambda p: p[key])
            ax.plot([p[key] for p in pts], [p["elbo_per_token"] for p in pts], style, label=name)
        ax.axhline(result["baseline"]["elbo_per_token"], color="grey", ls="--", lw=1, label="baseline ELBO (T=32)")
        ax.axhline(-result["llama_nats_per_token"], color="k", ls=":", lw=1, label="Llama peer, exact log p")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out ELBO (nats / token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="center right")
    fig.suptitle(f"Evaluation fit: ELBO vs compute (compute ratio {result['compute_ratio']:.2f}, "
                 f"wall ratio {result['wall_ratio']:.2f})")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


BASELINE_SWEEP = (4, 8, 16, 24, 32)
QUICK_BASELINE_SWEEP = (8, 16, 32)
TOL_SWEEP = (0.02, 0.01, 0.005, 0.002, 0.001, 0.0005)
QUICK_TOL_SWEEP = (0.01, 0.002, 0.0005)
WARM_SWEEP = (2, 4, 8, 16)
ENCODER_STEPS, ENCODER_BATCH, ENCODER_LR = 300, 16, 3e-3


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    wall_start, load_before = time.time(), os.getloadavg()
    train_models(args)
    train_encoder(args)

    import torch
    from datasets import load_from_disk
    from transformers import LlamaForCausalLM

    from modeling_ltm import LTMForCausalLM, PosteriorFitSettings

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    _, dtype = resolve_device(args.device, args.dtype)
    ltm = LTMForCausalLM.from_pretrained(workdir / "ltm", dtype=dtype).to(args.device).eval()
    warm_ltm = LTMForCausalLM.from_pretrained(workdir / "ltm-encoder", dtype=dtype).to(args.device).eval()
    llama = LlamaForCausalLM.from_pretrained(workdir / "llama", dtype=dtype).to(args.device).eval()
    held_out = load_from_disk(workdir / "data")["validation"]
    ids = torch.tensor(held_out["input_ids"][: args.eval_blocks], device=args.device)
    batches = list(ids.split(args.batch))
    seeds = [list(range(i * args.batch, i * args.batch + len(b))) for i, b in enumerate(batches)]

    # Issue 10's evaluation fit, the baseline: T = 32, lr 0.1 -> 0.01 cosine, start at the prior, eps redrawn.
    baseline_settings = PosteriorFitSettings(num_steps=32, lr=0.1)
    prior_settings = PosteriorFitSettings.evaluation(ltm.config)  # no encoder: from the prior, as the baseline
    new_settings = PosteriorFitSettings.evaluation(warm_ltm.config)  # the new default: warm start from the encoder
    assert new_settings.warm_start, "the encoder in <workdir>/ltm-encoder is not marked as fitted for evaluation"
    llama_nll = llama_nats_per_token(llama, batches)

    baseline_sweep = QUICK_BASELINE_SWEEP if args.quick else BASELINE_SWEEP
    tol_sweep = QUICK_TOL_SWEEP if args.quick else TOL_SWEEP
    jobs = [(ltm, baseline_settings.replace(num_steps=t), True) for t in baseline_sweep]
    jobs += [(ltm, prior_settings.replace(stop_tol=tol, stop_window=8), False) for tol in tol_sweep]
    jobs.append((ltm, prior_settings, False))  # prefix and batching, from the prior, no stopping
    jobs += [(warm_ltm, new_settings.replace(num_steps=t), False) for t in WARM_SWEEP if t != new_settings.num_steps]
    jobs.append((warm_ltm, new_settings, False))  # the new default: warm start, prefix and batching, no stopping
    # Rounds over all points, so that the machine's load drifts over every point alike; median wall time per point.
    rounds = [[run_fit(m, batches, s, seeds, args, plain) for m, s, plain in jobs] for _ in range(args.repeats)]
    points = []
    for i, (_, settings, _) in enumerate(jobs):
        runs = [r[i] for r in rounds]
        group = "warm start" if settings.warm_start else "from the prior"
        points.append(
            dict(
                runs[0],
                seconds=statistics.median(r["seconds"] for r in runs),
                settings=settings.describe(),
                group=group,
            )
        )
    baseline_curve, new_curve = points[: len(baseline_sweep)], points[len(baseline_sweep) :]
    baseline, new = baseline_curve[baseline_sweep.index(32)], new_curve[-1]
    groups = [[p for p in new_curve if p["group"] == g] for g in ("from the prior", "warm start")]
    target = baseline["elbo_per_token"]
    diff = [a - b for a, b in zip(new["row_elbo_per_token"], baseline["row_elbo_per_token"])]
    result = {
        "baseline": baseline,
        "new_default": new,
        "baseline_curve": baseline_curve,
        "new_curve": new_curve,
        "llama_nats_per_token": llama_nll,
        "llama_perplexity": math.exp(llama_nll),
        # Each curve of the new code (prior start with stopping; warm start over T) on its own, the cheaper one.
        "compute_ratio": min(compute_at(g, target, "compute_per_sequence") for g in groups)
        / baseline["compute_per_sequence"],
        "wall_ratio": min(compute_at(g, target, "seconds") for g in groups) / baseline["seconds"],
        "default_compute_ratio": new["compute_per_sequence"] / baseline["compute_per_sequence"],
        "default_wall_ratio": new["seconds"] / baseline["seconds"],
        # Paired per-sequence difference of the ELBO (new default - baseline), nats/token, and its standard error.
        "default_elbo_diff": statistics.mean(diff),
        "default_elbo_diff_stderr": statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else math.nan,
    }
    training = {n: json.loads((workdir / n / "done.json").read_text()) for n in ("ltm", "llama", "ltm-encoder")}
    result["meta"] = run_metadata("inference_efficiency.py", argv, args, load_before, wall_start)
    result["meta"].update(
        training=training,
        held_out_sequences=int(ids.shape[0]),
        held_out_tokens=int(ids.shape[0] * (ids.shape[1] - 1)),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, Path(args.png))
    print(markdown(result))
    print(f"wall {result['meta']['wall_seconds']:.0f} s; results in {out}, plot in {args.png}")
    print(f"compute_ratio={result['compute_ratio']:.3f}")
    return 0


def markdown(result: dict) -> str:
    lines = [
        f"Held-out: {result['meta']['held_out_sequences']} blocks, {result['meta']['held_out_tokens']:,} predicted "
        f"tokens. Llama peer: {result['llama_nats_per_token']:.4f} nats/token, perplexity "
        f"{result['llama_perplexity']:.2f} (exact).",
        "",
        "| fit | ELBO (nats/token) | ELBO ppl bound | mean fast steps | compute / sequence | wall (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for tag, curve in (("baseline", result["baseline_curve"]), ("new", result["new_curve"])):
        for p in curve:
            lines.append(
                f"| {tag}: {p['settings']} | {p['elbo_per_token']:.4f} | {math.exp(-p['elbo_per_token']):.2f} "
                f"| {p['mean_steps']:.1f} | {p['compute_per_sequence']:.1f} | {p['seconds']:.2f} |"
            )
    lines += [
        "",
        f"At the baseline's ELBO ({result['baseline']['elbo_per_token']:.4f}): compute ratio "
        f"{result['compute_ratio']:.3f}, wall-time ratio {result['wall_ratio']:.3f} (new / baseline). The new default "
        f"itself: compute ratio {result['default_compute_ratio']:.3f}, wall ratio {result['default_wall_ratio']:.3f}, "
        f"ELBO {result['default_elbo_diff']:+.4f} +- {result['default_elbo_diff_stderr']:.4f} nats/token vs the "
        "baseline (paired over sequences, mean +- standard error).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if "--train-only" in sys.argv:
        sys.argv.remove("--train-only")
        train_models(parse_args())
        sys.exit(0)
    sys.exit(main())

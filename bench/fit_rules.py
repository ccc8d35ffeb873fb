"""Step rules for the evaluation fit (issue 13, "fewer steps for the same ELBO"): held-out ELBO per token after T
fast steps of each rule, on a trained LTM whose posterior moves (the main job's model by default).

    make main                                              # trains runs/ltm-tiny (or pass any saved LTM folder)
    .venv/bin/python bench/fit_rules.py runs/ltm-tiny --json bench/results/fit_rules.json

Held out: the first `--blocks` blocks of the embedded corpus's validation split, tokenized with the model's own
tokenizer into blocks of `max_position_embeddings` tokens (as `ltm train` builds its held-out set). Every rule starts
at the prior (`mu = 0`, `logvar = 0`), draws a fresh `eps` every step from per-sequence generators (the same draws
for every rule), and is scored alike: ELBO per token = `-(E_q[-log p(x|z)] + KL) / tokens` with the likelihood term
averaged over `--score-samples` draws (the same for every rule), KL in closed form. A fast step is one forward +
backward for every rule, so equal T is equal compute.

Rules:
- `adam`: the baseline, `PosteriorFitSettings.evaluation` (Adam on `(mu, logvar)`, lr cosine `lr -> lr/10`), run
  through `fit_posterior` itself.
- `adam-split`: Adam with its own learning rate for `logvar` (cosine alike).
- `adam-avg`: Adam at a constant lr, returning the average of the iterates of the last `avg` steps (Polyak).
- `rprop`: `torch.optim.Rprop` (per-coordinate steps that grow while a gradient's sign persists and shrink when it
  flips: large steps where the gradient is signal, small where it is noise).
- `ngvi`: natural-gradient VI for a diagonal Gaussian, the improved Bayesian learning rule (Lin, Schmidt & Khan,
  2020) on the precision `S` with the reparameterization Hessian estimate `h = g * eps * sqrt(S)` (Stein/Price) or
  the squared gradient (`gn`): `G = 1 + h - S`, `S += b G + b^2 G^2 / (2 S)`, `mu -= b (g + mu) / S`, with `g` the
  gradient of the sequence's NLL at `z` (nats per sequence) and step size `b`.
- `warm`: not a step rule but a start: the same decoder given an amortized posterior encoder (width 4 x hidden),
  trained on the training split with the decoder frozen (`fit_posterior_encoder`, `--encoder-steps` steps of 16
  blocks, lr 3e-3), then the model's evaluation fit from the encoder's proposal (lr 0.03) over `WARM_STEPS`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.common import add_device_arguments, resolve_device, run_metadata, save_json  # noqa: E402
from modeling_ltm import LTMConfig, LTMForCausalLM, PosteriorFitSettings, fast_loop, inference, randomness  # noqa: E402


# (label, rule, steps, options): the baseline's curve over T, then each alternative at T = 16 (half the baseline's
# 32 steps) and, for the promising ones, at 32.
RULES = [
    *[("adam lr 0.1 (baseline)", "adam", t, {"lr": 0.1}) for t in (8, 16, 32, 64)],
    ("adam lr 0.2", "adam", 16, {"lr": 0.2}),
    ("adam lr 0.3", "adam", 16, {"lr": 0.3}),
    ("adam mu lr 0.1, logvar lr 0.01", "adam-split", 16, {"lr": 0.1, "logvar_lr": 0.01}),
    ("adam mu lr 0.2, logvar lr 0.02", "adam-split", 16, {"lr": 0.2, "logvar_lr": 0.02}),
    ("adam mu lr 0.2, logvar lr 0.02", "adam-split", 32, {"lr": 0.2, "logvar_lr": 0.02}),
    ("adam lr 0.1 const, average of last 12", "adam-avg", 16, {"lr": 0.1, "avg": 12}),
    ("rprop lr 0.1, etas (0.5, 1.2)", "rprop", 16, {"lr": 0.1, "etas": (0.5, 1.2)}),
    ("rprop lr 0.05, etas (0.5, 1.2)", "rprop", 16, {"lr": 0.05, "etas": (0.5, 1.2)}),
    ("rprop lr 0.1, etas (0.5, 1.2)", "rprop", 32, {"lr": 0.1, "etas": (0.5, 1.2)}),
    ("ngvi stein, b 0.1", "ngvi", 16, {"beta": 0.1, "hessian": "stein"}),
    ("ngvi gn, b 0.1", "ngvi", 16, {"beta": 0.1, "hessian": "gn"}),
]


WARM_STEPS = (0, 2, 4, 8, 16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=str(REPO_ROOT / "runs" / "ltm-tiny"), help="a saved LTM folder")
    p.add_argument("--blocks", type=int, default=32, help="held-out blocks scored")
    p.add_argument("--score-samples", type=int, default=8)
    p.add_argument(
        "--encoder-steps", type=int, default=300, help="training steps of the warm start's encoder (0: none)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    add_device_arguments(p)  # bf16: the model's weights in bfloat16 (the posteriors stay float32)
    return p.parse_args(argv)


def corpus_blocks(model_dir: str, block_size: int, split: str, count: int | None = None) -> torch.Tensor:
    """The first `count` blocks (all when None) of the embedded corpus's `split`, in the model's tokenizer."""
    from transformers import AutoTokenizer

    from modeling_ltm.tooling.data import load_text_dataset, tokenize_and_pack

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = tokenize_and_pack(load_text_dataset(None)[split], tokenizer, block_size)
    return torch.tensor(blocks["input_ids"][:count])


def warm_start_rows(args, fitter, block_size: int) -> list[dict]:
    """The same decoder with an amortized posterior encoder (width 4 x hidden) trained on the training split
    (`fit_posterior_encoder`, decoder frozen), then warm-started evaluation fits over `WARM_STEPS`."""
    from modeling_ltm.tooling.amortized import fit_posterior_encoder

    width = 4 * LTMConfig.from_pretrained(args.model).hidden_size
    device, dtype = resolve_device(args.device, args.dtype)
    model = LTMForCausalLM.from_pretrained(args.model, posterior_encoder_size=width, dtype=dtype).to(device).eval()
    train = corpus_blocks(args.model, block_size, "train").to(device)
    start = time.time()
    fit_posterior_encoder(model, train, num_steps=args.encoder_steps, batch_size=16, lr=3e-3, seed=0)
    seconds = time.time() - start
    print(f"encoder: {args.encoder_steps} steps of 16 blocks in {seconds:.0f} s", flush=True)
    rows = []
    for steps in WARM_STEPS:
        settings = PosteriorFitSettings.evaluation(model.config, num_steps=steps)
        fit = inference.fit_posterior(model, fitter.input_ids, settings=settings, seed=fitter.seeds)
        elbo, kl = fitter.score(fit.mu, fit.logvar, args.score_samples)
        label = f"warm start from the encoder, lr {settings.lr:g}"
        rows.append({"label": label, "rule": "warm", "steps": steps, "elbo": elbo, "kl": kl,
                     "encoder_seconds": seconds, "encoder_steps": args.encoder_steps})  # fmt: skip
        print(f"{label:42s} T={steps:3d}  ELBO {elbo:.4f}  KL {kl:.4f}", flush=True)
    return rows


class Fitter:
    """The held-out batch, its targets, prefix and per-sequence seeds, shared by every rule."""

    def __init__(self, model, input_ids):
        self.model, self.input_ids = model, input_ids
        self.seeds = list(range(input_ids.shape[0]))
        self.shape = (input_ids.shape[0], *model.config.latent_shape)
        self.targets = inference.next_token_targets(input_ids, None)
        self.prefix = fast_loop.compute_prefix(model, input_ids, None, None)

    def draws(self, offset: int = 0):
        generators = randomness.row_generators([s + offset for s in self.seeds], None, len(self.seeds))
        return lambda: randomness.standard_normal(self.shape, generators, self.input_ids.device)

    def nll(self, z):
        """`-log p(x|z)` per sequence (nats), `(batch,)`, and the scored tokens per sequence."""
        return inference.sequence_nll(self.model, self.input_ids, z, self.targets, None, None, self.prefix)

    def score(self, mu, logvar, samples: int) -> tuple[float, float]:
        """(ELBO, KL) in nats per token, the likelihood term averaged over `samples` draws."""
        draw = self.draws(offset=10_000)
        with torch.no_grad():
            total = 0.0
            for _ in range(samples):
                nll, tokens = self.nll(mu + torch.exp(0.5 * logvar) * draw())
                total = total + nll
            kl = inference.gaussian_kl(mu, logvar)
        return float(-(total / samples + kl).sum() / tokens.sum()), float(kl.sum() / tokens.sum())

    def adam(self, steps, lr):
        fit = inference.fit_posterior(
            self.model, self.input_ids, settings=PosteriorFitSettings(num_steps=steps, lr=lr), seed=self.seeds
        )
        return fit.mu, fit.logvar

    def torch_optimizer(self, steps, make_optimizer, schedule=True, avg=None):
        """Minimise the negative ELBO per token with a torch optimizer on `(mu, logvar)`; `schedule`: cosine
        `lr -> lr/10` on every group; `avg`: return the mean of the last `avg` iterates."""
        mu = torch.zeros(self.shape, device=self.input_ids.device, requires_grad=True)
        logvar = torch.zeros(self.shape, device=self.input_ids.device, requires_grad=True)
        optimizer = make_optimizer(mu, logvar)
        base = [group["lr"] for group in optimizer.param_groups]
        draw, kept = self.draws(), []
        for step in range(steps):
            if schedule:
                for group, lr in zip(optimizer.param_groups, base):
                    group["lr"] = inference.cosine_fast_lr(step, steps, lr, 0.1)
            with torch.enable_grad():
                loss, *_ = inference.negative_elbo(
                    self.model, self.input_ids, self.targets, mu, logvar, draw(), prefix=self.prefix
                )
                mu.grad, logvar.grad = torch.autograd.grad(loss, [mu, logvar])
            optimizer.step()
            if avg is not None and step >= steps - avg:
                kept.append((mu.detach().clone(), logvar.detach().clone()))
        if kept:
            return torch.stack([m for m, _ in kept]).mean(0), torch.stack([v for _, v in kept]).mean(0)
        return mu.detach(), logvar.detach()

    def ngvi(self, steps, beta, hessian):
        mu = torch.zeros(self.shape, device=self.input_ids.device)
        precision = torch.ones(self.shape, device=self.input_ids.device)
        draw = self.draws()
        for _ in range(steps):
            eps = draw()
            z = (mu + eps / precision.sqrt()).requires_grad_(True)
            with torch.enable_grad():
                nll, _ = self.nll(z)
                (grad,) = torch.autograd.grad(nll.sum(), z)
            curvature = grad * eps * precision.sqrt() if hessian == "stein" else grad.square()
            gap = 1.0 + curvature - precision  # prior precision 1
            precision = precision + beta * gap + 0.5 * beta**2 * gap.square() / precision
            mu = mu - beta * (grad + mu) / precision
        return mu, precision.reciprocal().log()

    def run(self, rule: str, steps: int, options: dict):
        if rule == "adam":
            return self.adam(steps, options["lr"])
        if rule == "adam-split":
            return self.torch_optimizer(
                steps,
                lambda mu, logvar: torch.optim.Adam(
                    [{"params": [mu], "lr": options["lr"]}, {"params": [logvar], "lr": options["logvar_lr"]}]
                ),
            )
        if rule == "adam-avg":
            return self.torch_optimizer(
                steps, lambda mu, logvar: torch.optim.Adam([mu, logvar], lr=options["lr"]), False, options["avg"]
            )
        if rule == "rprop":
            return self.torch_optimizer(
                steps,
                lambda mu, logvar: torch.optim.Rprop(
                    [mu, logvar], lr=options["lr"], etas=options["etas"], step_sizes=(1e-4, 2.0)
                ),
                schedule=False,
            )
        if rule == "ngvi":
            return self.ngvi(steps, options["beta"], options["hessian"])
        raise ValueError(rule)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start, load_before = time.time(), os.getloadavg()
    device, dtype = resolve_device(args.device, args.dtype)
    model = LTMForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    input_ids = corpus_blocks(args.model, model.config.max_position_embeddings, "validation", args.blocks)
    input_ids = input_ids.to(device)
    fitter = Fitter(model, input_ids)
    zeros = torch.zeros(fitter.shape, device=device)
    prior_elbo, _ = fitter.score(zeros, zeros, args.score_samples)
    rows = [{"label": "no fit: q = prior", "rule": "prior", "steps": 0, "elbo": prior_elbo, "kl": 0.0}]
    for label, rule, steps, options in RULES:
        mu, logvar = fitter.run(rule, steps, options)
        elbo, kl = fitter.score(mu, logvar, args.score_samples)
        rows.append({"label": label, "rule": rule, "steps": steps, "elbo": elbo, "kl": kl, "options": options})
        print(f"{label:42s} T={steps:3d}  ELBO {elbo:.4f}  KL {kl:.4f}", flush=True)
    if args.encoder_steps:
        rows += warm_start_rows(args, fitter, model.config.max_position_embeddings)
    target = next(r["elbo"] for r in rows if r["rule"] == "adam" and r["steps"] == 32)
    print("\n| rule | fast steps T | ELBO (nats/token) | KL (nats/token) | vs the baseline at T = 32 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['steps']} | {r['elbo']:.4f} | {r['kl']:.4f} | {r['elbo'] - target:+.4f} |")
    meta = run_metadata("fit_rules.py", argv, args, load_before, start)
    meta["held_out"] = {
        "blocks": int(input_ids.shape[0]),
        "tokens": int(input_ids.shape[0] * (input_ids.shape[1] - 1)),
    }
    print(json.dumps(meta))
    save_json(args.json, {"rows": rows, "meta": meta})
    return 0


if __name__ == "__main__":
    sys.exit(main())

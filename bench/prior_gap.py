"""How far a trained model's prior is from the Gaussians an evaluation fit can start at (issue 22's flow diagnosis).

    .venv/bin/python bench/prior_gap.py runs/study22-b128-s1337/ltm_T16_nz1_dz16_pflow/model [more model folders]

For each saved model: the spread of its prior's samples (per-dimension standard deviation over `--samples` draws), and
`KL(q || p)` in nats per sequence (Monte Carlo over `--kl-draws` draws of `q`, the prior's own `kl`) for two Gaussians
`q`: the fit's start (`prior.start()`: `N(0, I)` for a flow, the prior itself for the Gaussian priors) and the Gaussian
with the prior samples' mean and variance (moment-matched). Mean, median and 99th percentile over the draws.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.common import run_metadata, save_json  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="saved LTM folders")
    parser.add_argument("--samples", type=int, default=8192, help="prior draws for the moments")
    parser.add_argument("--kl-draws", type=int, default=4096, help="draws of q for the Monte Carlo KL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    return parser.parse_args(argv)


def kl_statistics(prior, mu: torch.Tensor, logvar: torch.Tensor, draws: int, generator) -> dict:
    """`KL(N(mu, exp(logvar)) || prior)` at `draws` draws of the Gaussian: nats per sequence."""
    noise = torch.randn(draws, *mu.shape, generator=generator)
    z = mu + torch.exp(0.5 * logvar) * noise
    kl = prior.kl(mu.expand_as(z), logvar.expand_as(z), z).double()
    return {"mean": float(kl.mean()), "median": float(kl.median()), "q99": float(kl.quantile(0.99))}


def main(argv=None) -> int:
    from modeling_ltm import LTMForCausalLM
    from modeling_ltm.weight_checks import latent_prior_of

    args = parse_args(argv)
    started, load_before = time.time(), os.getloadavg()
    rows = []
    for folder in args.models:
        model = LTMForCausalLM.from_pretrained(folder).eval()
        prior = latent_prior_of(model)
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            samples = prior.sample(torch.randn(args.samples, *model.config.latent_shape, generator=generator))
            spread = samples.std(0)
            start = kl_statistics(prior, *prior.start(), args.kl_draws, generator)
            matched = kl_statistics(prior, samples.mean(0), samples.var(0).log(), args.kl_draws, generator)
        row = {
            "model": folder,
            "prior_type": model.config.prior_type,
            "sample_std": {"mean": float(spread.mean()), "min": float(spread.min()), "max": float(spread.max())},
            "kl_from_start": start,
            "kl_from_moment_matched": matched,
        }
        rows.append(row)
        print(
            f"{folder} ({row['prior_type']}): sample std {spread.min():.2f}-{spread.max():.2f}; KL(start || p) mean "
            f"{start['mean']:.1f} median {start['median']:.1f}; KL(moment-matched || p) mean {matched['mean']:.1f} "
            f"median {matched['median']:.1f} q99 {matched['q99']:.1f} (nats per sequence)"
        )
    save_json(args.out, {"meta": run_metadata("prior_gap.py", argv, args, load_before, started), "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

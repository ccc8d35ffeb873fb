"""The evaluation's selection rule: a reported bound is never looser than the posterior its fit started from.

A fit of `q(z|x)` by a few noisy Adam steps can end *looser* than where it started (bench/evaluation_selection.py
measures it on a small model: every fitted posterior above the trivial `q = p(z)`, whose ELBO is `E_p[log p(x|z)]`).
Any `q` gives a valid bound, so the evaluation may pick the better of two candidates per sequence, the start and the
last iterate, as long as the number it reports is computed on draws the choice did not see:

1. both candidates are scored on the same `num_samples` draws `eps` (a paired comparison: the noise common to the two
   cancels), from a stream of their own (`SELECTION_SEED_OFFSET`);
2. the chosen one is scored on fresh draws: the fit's own final draw, a draw of the scoring stream
   (`SCORING_SEED_OFFSET`) for a sequence sent back to its start, and the importance samples (another stream).

Given the choice, those draws are independent of it, so the reported ELBO (IW) is an unbiased estimate of the ELBO
(IW bound) of the chosen `q`, a valid bound on `log p(x)`.

Imports only torch and siblings (copied next to the weights for `trust_remote_code=True`).
"""

import torch

from .fast_loop import FitBatch, LowPrecisionWeights
from .randomness import SCORING_SEED_OFFSET, SELECTION_SEED_OFFSET, NoiseStream, derived_seed, row_generators


@torch.no_grad()
def fit_beats_start(
    model, batch: FitBatch, fitted: tuple, start: tuple, num_samples: int, seed=None
) -> torch.BoolTensor:
    """Per sequence, whether the fit's last iterate `fitted = (mu, logvar)` has a higher ELBO than its start
    `start = (mu, logvar)` (each `(batch, *latent_shape)`), estimated on `num_samples` shared draws of the selection
    stream derived from `seed` (an int, one per row, or None for the global RNG). Returns `(batch,)` bools."""
    mu, logvar = fitted
    rows = mu.shape[0]
    forward = LowPrecisionWeights.for_fit(model, mu.device)
    generators = row_generators(derived_seed(seed, SELECTION_SEED_OFFSET), None, rows, mu.device)
    draws = NoiseStream(mu.shape, generators, mu.device, num_draws=num_samples)
    both = batch.select(torch.arange(rows, device=mu.device).repeat(2))  # rows 0..B-1 the fit, B..2B-1 the start
    mus, logvars = torch.cat([mu, start[0].expand_as(mu)]), torch.cat([logvar, start[1].expand_as(logvar)])
    margin = torch.zeros(rows, dtype=torch.float64, device=mu.device)  # start's -ELBO minus the fit's, summed
    for _ in range(num_samples):
        eps = draws.next()
        _, nll, kl, _ = both.negative_elbo(forward, mus, logvars, torch.cat([eps, eps]))
        loss = (nll + kl).double()
        margin += loss[rows:] - loss[:rows]
    return margin > 0


@torch.no_grad()
def score_at_fresh_draw(model, batch: FitBatch, mu, logvar, seed=None):
    """`(z, nll, kl)` of `q = N(mu, diag(exp(logvar)))` at one draw of the scoring stream derived from `seed` (one the
    selection did not see): `z` `(batch, *latent_shape)`, `nll` and `kl` `(batch,)` in nats."""
    generators = row_generators(derived_seed(seed, SCORING_SEED_OFFSET), None, mu.shape[0], mu.device)
    noise = NoiseStream(mu.shape, generators, mu.device, num_draws=1).next()
    forward = LowPrecisionWeights.for_fit(model, mu.device)
    _, nll, kl, _ = batch.negative_elbo(forward, mu, logvar, noise)
    return mu + torch.exp(0.5 * logvar) * noise, nll.float(), kl.float()


__all__ = ["fit_beats_start", "score_at_fresh_draw"]

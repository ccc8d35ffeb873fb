"""Densities of the latents: the Gaussian posterior's log-density and its KL divergence from the prior `N(0, I)`, in
nats per sequence (summed over every latent dimension).

Imports only torch (copied next to the weights for `trust_remote_code=True`).
"""

import math

import torch


def gaussian_kl_per_dimension(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """`KL(N(mu_d, exp(logvar_d)) || N(0, 1))` of each latent dimension in nats: `(batch, ...)` → `(batch, D)`."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """`KL(N(mu, exp(logvar)) || N(0, I))` in nats per sequence: `(batch, ...)` → `(batch,)`."""
    return gaussian_kl_per_dimension(mu, logvar).sum(-1)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor | None = None, logvar: torch.Tensor | None = None):
    """`log N(z; mu, diag(exp(logvar)))` summed per sequence (standard normal when `mu`/`logvar` are None)."""
    mu = torch.zeros_like(z) if mu is None else mu
    logvar = torch.zeros_like(z) if logvar is None else logvar
    log_density = -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar))
    return log_density.flatten(1).sum(-1)


__all__ = ["gaussian_kl", "gaussian_kl_per_dimension", "gaussian_log_prob"]

"""Priors `p(z)` over an LTM's latent thoughts, each with an exact log-density, so every bound stays a bound.

`z` has shape `(batch, num_hidden_layers, n_latents_per_layer, latent_dim)`: one latent vector per *slot*
(layer, latent). `config.prior_type` picks the prior:

- `"standard_normal"`: `N(0, I)`, the paper's. No parameters (the model holds no prior module).
- `"diagonal_gaussian"`: a learned `N(m, diag(exp(s)))` with its own mean and log-variance per slot and dimension
  (`m = 0`, `s = 0` at initialisation: the standard normal).
- `"flow"`: a normalizing flow per slot: an elementwise affine map and `config.prior_flow_layers` affine coupling
  layers (RealNVP, Dinh et al., 2017) with SiLU conditioners of width `config.prior_flow_hidden`, one set of weights
  per slot (batched), mapping `z` to a standard normal `u`: `log p(z) = log N(u; 0, I) + log |det du/dz|`. The last
  layer of every conditioner and the affine map start at zero: an untrained flow is the standard normal.

Each prior gives, per sequence (shape `(batch,)`, nats, summed over every latent dimension):

- `log_prob(z)`: `log p(z)`, exact;
- `kl(mu, logvar, z)`: `KL(q || p)` of the Gaussian posterior `q = N(mu, diag(exp(logvar)))`: closed form for the
  Gaussian priors (`z` unused); for the flow `log q(z) - log p(z)` at the draw `z ~ q`: an unbiased estimate, so an
  ELBO estimate built from it is an unbiased estimate of a valid bound;
- `sample(noise)`: `z` from standard normal draws `noise` (`z = m + exp(s/2) noise`, or the flow's inverse);
- `start()`: `(mu, logvar)` of shape `latent_shape`, the Gaussian a posterior fit starts from: the prior itself for
  the Gaussian priors (so `q = p`, KL 0, at the start), the flow's base `N(0, I)` for the flow.

Densities run in float32, outside any autocast. Imports only torch, transformers and siblings (copied next to the
weights for `trust_remote_code=True`).
"""

import math

import torch
from torch import nn
from transformers import initialization as init

from .configuration_ltm import PRIOR_TYPES
from .densities import gaussian_kl_per_dimension, gaussian_log_prob


# Each prior in words, for model cards and run summaries.
PRIOR_DESCRIPTIONS = {
    "standard_normal": "N(0, I) (the paper's)",
    "diagonal_gaussian": "a learned diagonal Gaussian (a mean and variance per latent dimension), exact KL",
    "flow": "a learned normalizing flow (affine couplings per latent vector), exact log-density",
}
# Each coupling layer's log-scale is squashed into (-MAX_LOG_SCALE, MAX_LOG_SCALE): a flow cannot blow up early on.
MAX_LOG_SCALE = 3.0


def _float32(function):
    """Run a density method in float32 with autocast off (a bf16 log-density would round away the KL)."""

    def wrapped(self, *tensors):
        device_type = tensors[0].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return function(self, *(t.float() for t in tensors))

    wrapped.__name__, wrapped.__doc__ = function.__name__, function.__doc__
    return wrapped


class StandardNormalPrior:
    """`N(0, I)`: the paper's prior, and what a model with `prior_type="standard_normal"` uses (no parameters)."""

    exact_kl = True

    def __init__(self, latent_shape):
        self.latent_shape = tuple(latent_shape)

    def kl_per_dimension(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """`KL(q_d || p_d)` of each latent dimension in nats: `(batch, ...)` → `(batch, D)`."""
        return gaussian_kl_per_dimension(mu, logvar)

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.kl_per_dimension(mu, logvar).sum(-1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(z)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def start(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return _standard_normal_start(self.latent_shape, device)


class DiagonalGaussianPrior(nn.Module):
    """A learned `N(mean, diag(exp(logvar)))` over `z`, one mean and log-variance per slot and dimension."""

    exact_kl = True

    def __init__(self, latent_shape):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        self.mean = nn.Parameter(torch.zeros(self.latent_shape))
        self.logvar = nn.Parameter(torch.zeros(self.latent_shape))

    def reset_parameters(self) -> None:
        """The standard normal. (transformers' `init` functions: weights loaded by `from_pretrained` stay.)"""
        init.zeros_(self.mean)
        init.zeros_(self.logvar)

    @_float32
    def kl_per_dimension(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        prior_mean, prior_logvar = self.mean.float(), self.logvar.float()
        ratio = (logvar.exp() + (mu - prior_mean).pow(2)) * torch.exp(-prior_logvar)
        return 0.5 * (prior_logvar - logvar + ratio - 1.0).flatten(1)

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.kl_per_dimension(mu, logvar).sum(-1)

    @_float32
    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(z, self.mean.float(), self.logvar.float())

    @_float32
    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        return self.mean.float() + torch.exp(0.5 * self.logvar.float()) * noise

    def start(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.detach().float().to(device), self.logvar.detach().float().to(device)


class FlowPrior(nn.Module):
    """A normalizing flow per slot (see the module docstring): `z -> u = f(z)` with `u ~ N(0, I)`.

    `f` = an elementwise affine map `(z - shift) * exp(-log_scale)`, then `num_layers` affine couplings, each
    keeping one half of the vector and shifting/scaling the other by an MLP of the kept half; the halves swap from
    one layer to the next. Weights are batched over the `S = num_hidden_layers * n_latents_per_layer` slots.
    """

    exact_kl = False

    def __init__(self, latent_shape, num_layers: int, hidden_size: int):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        slots, dim = latent_shape[0] * latent_shape[1], latent_shape[2]
        if dim < 2:
            raise ValueError(f"A flow prior couples halves of each latent vector: latent_dim must be >= 2, got {dim}.")
        self.split = dim // 2
        self.shift = nn.Parameter(torch.zeros(slots, dim))
        self.log_scale = nn.Parameter(torch.zeros(slots, dim))
        self.num_layers, self.hidden_size = num_layers, hidden_size
        # Layer l conditions on `kept` dimensions and moves the other `dim - kept`: halves alternate.
        self.in_weights, self.in_biases, self.out_weights, self.out_biases = (nn.ParameterList() for _ in range(4))
        for layer in range(num_layers):
            kept = self._kept(layer, dim)
            self.in_weights.append(nn.Parameter(torch.empty(slots, kept, hidden_size)))
            self.in_biases.append(nn.Parameter(torch.zeros(slots, hidden_size)))
            self.out_weights.append(nn.Parameter(torch.zeros(slots, hidden_size, 2 * (dim - kept))))
            self.out_biases.append(nn.Parameter(torch.zeros(slots, 2 * (dim - kept))))
        self.reset_parameters()

    def _kept(self, layer: int, dim: int) -> int:
        return self.split if layer % 2 == 0 else dim - self.split

    def reset_parameters(self) -> None:
        """Conditioner inputs ~ N(0, 1/kept); every output layer, the affine map: zero (an identity flow).
        (transformers' `init` functions: weights loaded by `from_pretrained` stay.)"""
        for weights in self.in_weights:
            init.normal_(weights, mean=0.0, std=1.0 / math.sqrt(weights.shape[1]))
        for tensor in (self.shift, self.log_scale, *self.in_biases, *self.out_weights, *self.out_biases):
            init.zeros_(tensor)

    def _coupling(self, layer: int, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(shift, log_scale)` `(N, S, moved)` for the moved half, from the kept half `(N, S, kept)`."""
        hidden = torch.einsum("nsk,skh->nsh", kept, self.in_weights[layer].float()) + self.in_biases[layer].float()
        out = torch.einsum("nsh,sho->nso", nn.functional.silu(hidden), self.out_weights[layer].float())
        shift, raw_scale = (out + self.out_biases[layer].float()).chunk(2, dim=-1)
        return shift, MAX_LOG_SCALE * torch.tanh(raw_scale / MAX_LOG_SCALE)

    def _halves(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = self._kept(layer, x.shape[-1])
        return (x[..., :kept], x[..., kept:]) if layer % 2 == 0 else (x[..., -kept:], x[..., :-kept])

    def _join(self, layer: int, kept: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        return torch.cat([kept, moved] if layer % 2 == 0 else [moved, kept], dim=-1)

    @_float32
    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[0]
        x = z.reshape(batch, *self.shift.shape)
        log_det = -self.log_scale.float().sum().expand(batch)
        x = (x - self.shift.float()) * torch.exp(-self.log_scale.float())
        for layer in range(self.num_layers):
            kept, moved = self._halves(layer, x)
            shift, log_scale = self._coupling(layer, kept)
            x = self._join(layer, kept, (moved - shift) * torch.exp(-log_scale))
            log_det = log_det - log_scale.flatten(1).sum(-1)
        return gaussian_log_prob(x) + log_det

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # `log q(z) - log p(z)` at the draw: unbiased, and exactly 0 where q = p (the analytic entropy in place of
        # `log q(z)` has the same mean and gradients but keeps the sample's noise there).
        return gaussian_log_prob(z.float(), mu.float(), logvar.float()) - self.log_prob(z)

    def kl_per_dimension(self, mu, logvar):
        raise ValueError(
            "Free bits need a KL per latent dimension, which a flow prior does not have; use free_bits=0 with "
            'prior_type="flow", or a Gaussian prior ("standard_normal", "diagonal_gaussian").'
        )

    @_float32
    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        batch = noise.shape[0]
        x = noise.reshape(batch, *self.shift.shape)
        for layer in reversed(range(self.num_layers)):
            kept, moved = self._halves(layer, x)
            shift, log_scale = self._coupling(layer, kept)
            x = self._join(layer, kept, moved * torch.exp(log_scale) + shift)
        x = x * torch.exp(self.log_scale.float()) + self.shift.float()
        return x.reshape(batch, *self.latent_shape)

    def start(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return _standard_normal_start(self.latent_shape, device)


def _standard_normal_start(latent_shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(mu, logvar)` = `(0, 0)` of shape `latent_shape`: `N(0, I)`, the start of the standard normal and of a flow
    (its base)."""
    zeros = torch.zeros(latent_shape, device=device)
    return zeros, zeros.clone()


def build_prior(config) -> nn.Module | None:
    """The prior module of `config.prior_type`, or None for the standard normal (which has no parameters)."""
    prior_type = getattr(config, "prior_type", "standard_normal")
    if prior_type == "diagonal_gaussian":
        return DiagonalGaussianPrior(config.latent_shape)
    if prior_type == "flow":
        return FlowPrior(config.latent_shape, config.prior_flow_layers, config.prior_flow_hidden)
    return None


__all__ = [
    "PRIOR_DESCRIPTIONS",
    "PRIOR_TYPES",
    "DiagonalGaussianPrior",
    "FlowPrior",
    "StandardNormalPrior",
    "build_prior",
]

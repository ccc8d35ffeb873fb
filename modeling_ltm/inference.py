"""Posterior inference over an LTM's latent thought vectors: the paper's "fast learning" loop and the bounds on
`log p(x)` it yields.

For each sequence `x` the variational posterior is `q(z|x) = N(mu, diag(exp(logvar)))` over
`z` of shape `(num_hidden_layers, n_latents_per_layer, latent_dim)`, with prior `p(z) = N(0, I)`:

    ELBO(x) = E_q[log p(x|z)] - KL(q || p),    KL = 1/2 * sum(mu^2 + exp(logvar) - 1 - logvar)

The fast loop runs `T` Adam steps on `(mu, logvar)` only, with the decoder frozen: gradients come from
`torch.autograd.grad(loss, [mu, logvar])`, so no weight gradient is computed and no decoder `.grad` is touched.

Units: every `nll`, `kl`, `elbo` here is in nats, summed over one sequence's predicted tokens (all tokens but the
first real one, which is conditioned upon) unless a name says `per_token`.

This file imports only torch and transformers, so `save_pretrained` can copy it for `trust_remote_code=True`.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F


if TYPE_CHECKING:
    from .modeling_ltm import LTMForCausalLM


class NonFiniteELBOError(FloatingPointError):
    """The ELBO became NaN or infinite inside the fast loop."""


@dataclass
class PosteriorOutput:
    """A fitted Gaussian posterior `q(z|x)` per sequence and the ELBO terms at its final parameters.

    Args:
        mu (`torch.FloatTensor` of shape `(batch, num_hidden_layers, n_latents_per_layer, latent_dim)`):
            Posterior means.
        logvar (`torch.FloatTensor`, same shape as `mu`):
            Posterior log-variances.
        z (`torch.FloatTensor`, same shape as `mu`):
            A sample `mu + exp(logvar / 2) * eps` from the fitted posterior, with a fresh `eps` (not the one the fast
            loop optimised against), so `nll` and `elbo` below are unbiased single-sample estimates.
        nll (`torch.FloatTensor` of shape `(batch,)`):
            `-log p(x|z)` in nats, summed over each sequence's predicted tokens, at `z`.
        kl (`torch.FloatTensor` of shape `(batch,)`):
            `KL(q || p)` in nats (closed form).
        elbo (`torch.FloatTensor` of shape `(batch,)`):
            Single-sample ELBO estimate `-(nll + kl)` in nats.
        num_tokens (`torch.LongTensor` of shape `(batch,)`):
            Number of predicted tokens per sequence (the denominators of per-token figures).
        elbo_trace (`torch.FloatTensor` of shape `(num_steps + 1, batch)`):
            ELBO estimate before each fast step and, last row, at the final parameters.
    """

    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    elbo: torch.Tensor
    num_tokens: torch.Tensor
    elbo_trace: torch.Tensor

    @property
    def elbo_gain(self) -> torch.Tensor:
        """ELBO improvement over the fast loop, nats per token, shape `(batch,)`."""
        return (self.elbo_trace[-1] - self.elbo_trace[0]) / self.num_tokens.clamp(min=1)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh draw `z ~ q(z|x)`, same shape as `mu`."""
        noise = torch.randn(self.mu.shape, generator=generator, dtype=self.mu.dtype, device="cpu").to(self.mu.device)
        return self.mu + torch.exp(0.5 * self.logvar) * noise

    def index_select(self, index: torch.Tensor) -> "PosteriorOutput":
        """The posterior of rows `index` (e.g. `repeat_interleave`d for beams), every field indexed on dim 0."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        fields["elbo_trace"] = fields["elbo_trace"][:, index]
        return PosteriorOutput(**{k: (v if k == "elbo_trace" else v[index]) for k, v in fields.items()})


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """`KL(N(mu, exp(logvar)) || N(0, I))` in nats per sequence: `(batch, ...)` → `(batch,)`."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(-1)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor | None = None, logvar: torch.Tensor | None = None):
    """`log N(z; mu, diag(exp(logvar)))` summed per sequence (standard normal when `mu`/`logvar` are None)."""
    mu = torch.zeros_like(z) if mu is None else mu
    logvar = torch.zeros_like(z) if logvar is None else logvar
    log_density = -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar))
    return log_density.flatten(1).sum(-1)


def next_token_targets(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, labels: torch.LongTensor | None = None
) -> torch.LongTensor:
    """Unshifted targets with `-100` wherever no prediction is scored (padding; where `labels` says -100)."""
    targets = input_ids.clone() if labels is None else labels.clone()
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask == 0, -100)
    return targets


def sequence_nll(
    model: "LTMForCausalLM",
    input_ids: torch.LongTensor,
    latents: torch.Tensor,
    targets: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`-log p(x|z)` in nats per sequence, shape `(batch,)`, and the number of scored tokens, shape `(batch,)`.

    Token `t + 1` is scored from positions `<= t` when `targets[:, t + 1] != -100` and position `t` is not padding.
    """
    seq_length = input_ids.shape[1]
    # Logits of the first T - 1 positions only, contiguous: slicing (B, T, V) logits afterwards would cost a copy
    # of the largest activation forward and a zero-filled (B, T, V) gradient backward.
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        latents=latents,
        use_cache=False,
        logits_to_keep=torch.arange(seq_length - 1, device=input_ids.device),
    ).logits  # (B, T-1, V)
    shift_targets = targets[:, 1:]
    if attention_mask is not None:
        shift_targets = shift_targets.masked_fill(attention_mask[:, :-1] == 0, -100)
    token_nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), shift_targets.reshape(-1), ignore_index=-100, reduction="none"
    )
    return token_nll.view(shift_targets.shape).sum(-1), (shift_targets != -100).sum(-1)


def _row_generators(seed, generator, batch_size: int) -> list[torch.Generator] | torch.Generator | None:
    """One CPU generator per row for per-sequence seeds (results independent of batching), a shared one for an
    int seed or an explicit generator, or None for the global RNG."""
    if generator is not None:
        return generator
    if seed is None:
        return None
    if isinstance(seed, int):
        return torch.Generator().manual_seed(seed)
    seeds = list(seed)
    if len(seeds) != batch_size:
        raise ValueError(f"`seed` has {len(seeds)} per-sequence seeds for a batch of {batch_size}; pass one per row.")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _standard_normal(shape, generators, device) -> torch.Tensor:
    """Float32 N(0, I) draws of `shape` = `(batch, ...)`; rows drawn from their own generator when given a list."""
    if isinstance(generators, list):
        rows = [torch.randn(shape[1:], generator=g) for g in generators]
        return torch.stack(rows).to(device)
    if generators is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generators).to(device)


def cosine_fast_lr(step: int, num_steps: int, lr: float, min_ratio: float) -> float:
    """Fast learning rate at `step` of `num_steps`: cosine decay from `lr` to `lr * min_ratio`."""
    if num_steps <= 1:
        return lr
    floor = lr * min_ratio
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * step / (num_steps - 1)))


def negative_elbo(
    model: "LTMForCausalLM",
    input_ids: torch.LongTensor,
    targets: torch.LongTensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    noise: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    kl_weight: float = 1.0,
    free_bits: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fast loop's objective and its parts at `z = mu + exp(logvar / 2) * noise`.

    Returns `(loss, nll, kl, num_tokens)`: `loss` is the scalar `sum_i (nll_i + kl_weight * kl'_i) / num_tokens_i`,
    so each sequence's `(mu_i, logvar_i)` gets the gradient of its own per-token objective, whatever the batch.
    With the defaults (`kl_weight=1`, `free_bits=0`) `kl'` is the KL and the loss is the negative ELBO.

    Training-only knobs (a bound is always evaluated at `kl_weight=1`, `free_bits=0`):
        kl_weight: beta of a KL-weighted objective (0 = the NLL alone; warm-up schedules move it from 0 to 1).
        free_bits: nats per latent dimension *per sequence* that cost nothing: `kl'_i = sum_d max(kl_id, free_bits)`,
            so a dimension whose KL is below the floor gets gradients from the NLL only (Kingma et al., 2016, with
            one group per dimension of a local posterior).

    The returned `kl` is always the true `KL(q || p)` in nats per sequence, shape `(batch,)`.
    """
    z = mu + torch.exp(0.5 * logvar) * noise
    nll, num_tokens = sequence_nll(model, input_ids, z, targets, attention_mask, position_ids)
    kl = gaussian_kl(mu, logvar)
    penalty = kl
    if free_bits > 0:
        kl_per_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1)
        penalty = kl_per_dim.clamp(min=free_bits).sum(-1)
    loss = ((nll + kl_weight * penalty) / num_tokens.clamp(min=1)).sum()
    return loss, nll, kl, num_tokens


def _check_inputs(model, input_ids, attention_mask) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"`input_ids` must be a (batch, sequence_length) tensor of token ids, got {shape}.")
    if input_ids.shape[1] == 0:
        raise ValueError(
            "Cannot fit a posterior to an empty sequence. For unconditional use, sample the prior: "
            "`torch.randn(batch, *model.config.latent_shape)`."
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)} but `input_ids` has {tuple(input_ids.shape)}."
        )
    max_len = model.config.max_position_embeddings
    if input_ids.shape[1] > max_len:
        raise ValueError(
            f"Sequence of {input_ids.shape[1]} tokens is longer than max_position_embeddings={max_len}; split it into "
            f"windows of at most {max_len} tokens or truncate it."
        )


def fit_posterior(
    model: "LTMForCausalLM",
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    num_steps: int | None = None,
    lr: float | None = None,
    lr_min_ratio: float | None = None,
    init_logvar: float | None = None,
    init_logvar_noise: float | None = None,
    fixed_noise: bool | None = None,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    kl_weight: float = 1.0,
    free_bits: float = 0.0,
) -> PosteriorOutput:
    """Fit `q(z|x) = N(mu, diag(exp(logvar)))` to each sequence by `num_steps` Adam steps on `(mu, logvar)`.

    The decoder is frozen: gradients are taken with `torch.autograd.grad` with respect to `(mu, logvar)` only, so no
    weight gradient is computed, no decoder `.grad` changes, and no graph survives the call. Call it on the bare
    model (`accelerator.unwrap_model(model)` under DDP/FSDP). It runs with gradients enabled even inside
    `torch.no_grad()` or `torch.inference_mode()` (as `generate()` and evaluation loops are), and honours an
    enclosing autocast.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, seq)`): token ids.
        attention_mask (`torch.Tensor` of shape `(batch, seq)`, *optional*): 1 for tokens, 0 for padding (left or
            right). A padded row gets the same posterior as the row alone (within float tolerance) when seeded
            per sequence.
        labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*): unshifted targets; `-100` excludes a token
            from the likelihood. Defaults to `input_ids` with padding excluded.
        num_steps, lr, lr_min_ratio: fast steps `T`, fast learning rate, and the floor of its cosine decay as a
            fraction of `lr`. Default to the config's `num_inference_steps`, `inference_lr`, `inference_lr_min_ratio`.
        init_logvar, init_logvar_noise: `logvar` starts at `init_logvar + init_logvar_noise * N(0, 1)`, `mu` at 0.
        fixed_noise: keep one `eps` for all steps (the paper's code) or redraw it every step.
        seed: an int seeds one generator for the batch; a sequence of ints (one per row) seeds each row on its own,
            so a row's result does not depend on the batch it is in. `generator` may be given instead.
        kl_weight, free_bits: training-only objective of the fast loop (see `negative_elbo`): the KL's weight beta
            and a floor in nats per latent dimension per sequence. The defaults (1, 0) fit the ELBO; the returned
            `kl`, `elbo` and `elbo_trace` are always the true KL and ELBO whatever the objective.

    Raises:
        NonFiniteELBOError: if the ELBO becomes NaN/inf at some step (lower `lr`).
    """
    config = model.config
    _check_inputs(model, input_ids, attention_mask)
    num_steps = config.num_inference_steps if num_steps is None else num_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"`num_steps` must be an integer >= 0, got {num_steps!r}.")
    lr = config.inference_lr if lr is None else lr
    if not lr > 0:
        raise ValueError(f"`lr` (the fast learning rate) must be > 0, got {lr!r}.")
    lr_min_ratio = config.inference_lr_min_ratio if lr_min_ratio is None else lr_min_ratio
    init_logvar = config.posterior_init_logvar if init_logvar is None else init_logvar
    init_logvar_noise = config.posterior_init_logvar_noise if init_logvar_noise is None else init_logvar_noise
    fixed_noise = config.posterior_fixed_noise if fixed_noise is None else fixed_noise
    if not 0.0 < lr_min_ratio <= 1.0:
        raise ValueError(f"`lr_min_ratio` must be in (0, 1], got {lr_min_ratio!r}.")
    if not init_logvar_noise >= 0:
        raise ValueError(f"`init_logvar_noise` must be >= 0, got {init_logvar_noise!r}.")
    if not kl_weight >= 0:
        raise ValueError(f"`kl_weight` (beta of the fast loop's KL term) must be >= 0, got {kl_weight!r}.")
    if not free_bits >= 0:
        raise ValueError(f"`free_bits` (nats per latent dimension) must be >= 0, got {free_bits!r}.")
    if torch.is_inference_mode_enabled():
        # `torch.inference_mode()` forbids autograd even under `enable_grad()`: leave it for the fast loop, with
        # copies of the inputs that are ordinary tensors (inference tensors cannot be saved for backward).
        with torch.inference_mode(False):
            input_ids, attention_mask, labels = (
                None if t is None else t.clone() for t in (input_ids, attention_mask, labels)
            )
            return fit_posterior(
                model, input_ids, attention_mask, labels, num_steps, lr, lr_min_ratio, init_logvar,
                init_logvar_noise, fixed_noise, seed, generator, kl_weight, free_bits,
            )  # fmt: skip

    batch_size = input_ids.shape[0]
    shape = (batch_size, *config.latent_shape)
    device = input_ids.device
    generators = _row_generators(seed, generator, batch_size)
    targets = next_token_targets(input_ids, attention_mask, labels)
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    mu = torch.zeros(shape, device=device, dtype=torch.float32, requires_grad=True)
    logvar_init = init_logvar + init_logvar_noise * _standard_normal(shape, generators, device)
    logvar = logvar_init.detach().requires_grad_(True)
    noise = _standard_normal(shape, generators, device)
    optimizer = torch.optim.Adam([mu, logvar], lr=lr)
    elbo_trace = []

    with torch.enable_grad():
        for step in range(num_steps):
            for group in optimizer.param_groups:
                group["lr"] = cosine_fast_lr(step, num_steps, lr, lr_min_ratio)
            if step > 0 and not fixed_noise:
                noise = _standard_normal(shape, generators, device)
            loss, nll, kl, num_tokens = negative_elbo(
                model, input_ids, targets, mu, logvar, noise, attention_mask, position_ids, kl_weight, free_bits
            )
            if not torch.isfinite(loss):
                raise NonFiniteELBOError(
                    f"The ELBO became non-finite at fast step {step + 1}/{num_steps} (lr={lr}). Lower the fast "
                    "learning rate (`inference_lr` / `lr`), or check the model's weights and inputs for NaN/inf."
                )
            mu.grad, logvar.grad = torch.autograd.grad(loss, [mu, logvar])
            optimizer.step()
            elbo_trace.append(-(nll + kl).detach())

    with torch.no_grad():
        if num_steps > 0:
            # Score the fitted q at a fresh draw: the loop's own `eps` is the one point it optimised against, so an
            # estimate there is optimistically biased; a fresh draw makes `elbo` an unbiased single-sample estimate.
            noise = _standard_normal(shape, generators, device)
        _, nll, kl, num_tokens = negative_elbo(
            model, input_ids, targets, mu, logvar, noise, attention_mask, position_ids
        )
        if not bool(torch.isfinite(nll).all() and torch.isfinite(kl).all()):
            raise NonFiniteELBOError(
                f"The ELBO is non-finite after {num_steps} fast steps (lr={lr}). Lower the fast learning rate "
                "(`inference_lr` / `lr`), or check the model's weights and inputs for NaN/inf."
            )
        mu, logvar = mu.detach(), logvar.detach()
        z = mu + torch.exp(0.5 * logvar) * noise
    elbo = -(nll + kl)
    elbo_trace.append(elbo)
    return PosteriorOutput(
        mu=mu, logvar=logvar, z=z, nll=nll, kl=kl, elbo=elbo, num_tokens=num_tokens, elbo_trace=torch.stack(elbo_trace)
    )


@torch.no_grad()
def importance_weighted_bound(
    model: "LTMForCausalLM",
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    num_samples: int = 16,
    posterior: PosteriorOutput | None = None,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    **fit_kwargs,
) -> torch.Tensor:
    """Importance-weighted lower bound on `log p(x)` in nats per sequence, shape `(batch,)`:

        log p(x) >= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x),    z_k ~ q(z|x)

    It is never looser than the ELBO in expectation and tightens as `K = num_samples` grows. `posterior` is fitted
    first with `fit_kwargs` (e.g. `num_steps`, `lr`) when not given. Divide by `posterior.num_tokens` for nats per
    token.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be an integer >= 1, got {num_samples!r}.")
    _check_inputs(model, input_ids, attention_mask)
    if posterior is None:
        posterior = fit_posterior(
            model, input_ids, attention_mask, labels=labels, seed=seed, generator=generator, **fit_kwargs
        )
    generators = _row_generators(None if generator is not None else _next_seed(seed), generator, input_ids.shape[0])
    targets = next_token_targets(input_ids, attention_mask, labels)
    position_ids = None if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    log_weights = []
    for _ in range(num_samples):
        noise = _standard_normal(posterior.mu.shape, generators, posterior.mu.device)
        z = posterior.mu + torch.exp(0.5 * posterior.logvar) * noise
        nll, _ = sequence_nll(model, input_ids, z, targets, attention_mask, position_ids)
        log_weights.append(-nll.float() + gaussian_log_prob(z) - gaussian_log_prob(z, posterior.mu, posterior.logvar))
    return torch.logsumexp(torch.stack(log_weights), dim=0) - math.log(num_samples)


def _next_seed(seed):
    """Derive the importance-sampling seed(s) from the fitting seed(s), so the two draws differ."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return seed + 1_000_003
    return [int(s) + 1_000_003 for s in seed]


__all__ = [
    "NonFiniteELBOError",
    "PosteriorOutput",
    "cosine_fast_lr",
    "fit_posterior",
    "gaussian_kl",
    "gaussian_log_prob",
    "importance_weighted_bound",
    "negative_elbo",
    "sequence_nll",
]

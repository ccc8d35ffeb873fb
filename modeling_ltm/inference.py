"""Posterior inference over an LTM's latent thought vectors: the paper's "fast learning" loop and the bounds on
`log p(x)` it yields.

For each sequence `x` the variational posterior is `q(z|x) = N(mu, diag(exp(logvar)))` over
`z` of shape `(num_hidden_layers, n_latents_per_layer, latent_dim)`, with the model's prior `p(z)`
(`config.prior_type`, modeling_ltm/priors.py: the paper's `N(0, I)`, a learned diagonal Gaussian or a flow):

    ELBO(x) = E_q[log p(x|z)] - KL(q || p)

with the KL in closed form for the Gaussian priors (for `N(0, I)`: `1/2 * sum(mu^2 + exp(logvar) - 1 - logvar)`) and
estimated at the draw `z ~ q` for a flow. A fit starts relative to the prior (`prior.start()`: its own mean and
log-variance, the base `N(0, I)` for a flow), see `PosteriorFitSettings`.

The fast loop runs `T` Adam steps on `(mu, logvar)` only, with the decoder frozen: gradients come from
`torch.autograd.grad(loss, [mu, logvar])`, so no weight gradient is computed and no decoder `.grad` is touched.

Two sets of fast-loop settings (`PosteriorFitSettings`): the *training* fast loop (the config's
`num_inference_steps`, `inference_lr`, `posterior_*` fields; the paper's, starting at `logvar = -5` with one fixed
`eps`) and the *evaluation* fit (the config's `eval_*` fields; starting at the prior with `eps` redrawn every step),
which gives a much tighter bound per fast step. `evaluate_posterior` is the one definition of every reported number:
the ELBO and importance-weighted bounds under the evaluation fit, and the paper's reconstruction NLL (not a bound).

Units: every `nll`, `kl`, `elbo` here is in nats, summed over one sequence's predicted tokens (all tokens but the
first real one, which is conditioned upon) unless a name says `per_token`.

The pieces live in modules of their own: `fit_settings` (the settings), `fast_loop` (the loop), `scoring` (the
objective), `densities` (KL and log-densities), `randomness` (seeds and noise), `errors`. This module is the API every
caller uses; it re-exports the names callers had from it.

Imports only torch, transformers and siblings (copied next to the weights for `trust_remote_code=True`).
"""

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .configuration_ltm import check_int
from .densities import gaussian_kl, gaussian_log_prob
from .errors import FitDeadlineExceeded, NonFiniteELBOError, NonFiniteLatentsError
from .fast_loop import FitBatch, LowPrecisionWeights, cosine_fast_lr, raise_non_finite, run_fast_loop
from .fit_settings import EVAL_STOP_TOL, EVAL_STOP_WINDOW, SUGGESTED_STOP_TOL, PosteriorFitSettings
from .randomness import NoiseStream, content_seed, importance_seed, row_generators
from .scoring import negative_elbo, next_token_targets, position_ids_from_attention_mask, sequence_nll
from .selection import fit_beats_start, score_at_fresh_draw
from .weight_checks import latent_prior_of


if TYPE_CHECKING:
    from .modeling_ltm import LTMForCausalLM


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
            `KL(q || p)` in nats: closed form for a Gaussian prior; for a flow prior, the single-sample estimate at
            `z` (unbiased).
        elbo (`torch.FloatTensor` of shape `(batch,)`):
            Single-sample ELBO estimate `-(nll + kl)` in nats.
        num_tokens (`torch.LongTensor` of shape `(batch,)`):
            Number of predicted tokens per sequence (the denominators of per-token figures).
        elbo_trace (`torch.FloatTensor` of shape `(num_steps + 1, batch)`):
            ELBO estimate before each fast step and, last row, at the final parameters. A row stopped early by
            adaptive stopping repeats its last fast-step value until the last row.
        num_steps_taken (`torch.LongTensor` of shape `(batch,)`, *optional*):
            Fast steps each row actually took (fewer than `num_steps` for rows stopped by adaptive stopping).
        initial_mu, initial_logvar (`torch.FloatTensor`, same shape as `mu`, *optional*):
            Where the fit started (the evaluation's selection rule may report that instead of the last iterate).
        fit_noise (`torch.FloatTensor`, same shape as `mu`, *optional*):
            The `eps` of the fast loop's last step (its only one with fixed noise); `fit_sample` is `q`'s draw at it.
    """

    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    elbo: torch.Tensor
    num_tokens: torch.Tensor
    elbo_trace: torch.Tensor
    num_steps_taken: torch.Tensor | None = None
    initial_mu: torch.Tensor | None = None
    initial_logvar: torch.Tensor | None = None
    fit_noise: torch.Tensor | None = None

    @property
    def fit_sample(self) -> torch.Tensor:
        """`mu + exp(logvar / 2) * fit_noise`: the draw at the `eps` the fast loop optimised against (what the paper's
        code decodes with in the slow step), same shape as `mu`."""
        return self.mu + torch.exp(0.5 * self.logvar) * self.fit_noise

    @property
    def elbo_gain(self) -> torch.Tensor:
        """ELBO improvement over the fast loop, nats per token, shape `(batch,)`; NaN for a sequence with no scored
        token (e.g. a one-token prompt), which has no per-token figure."""
        gain = (self.elbo_trace[-1] - self.elbo_trace[0]) / self.num_tokens.clamp(min=1)
        return gain.masked_fill(self.num_tokens == 0, float("nan"))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh draw `z ~ q(z|x)`, same shape as `mu`, made on `generator`'s device (default: `mu`'s)."""
        device = self.mu.device if generator is None else generator.device
        noise = torch.randn(self.mu.shape, generator=generator, dtype=self.mu.dtype, device=device).to(self.mu.device)
        return self.mu + torch.exp(0.5 * self.logvar) * noise

    def index_select(self, index: torch.Tensor) -> "PosteriorOutput":
        """The posterior of rows `index` (e.g. `repeat_interleave`d for beams), every field indexed on dim 0."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        fields["elbo_trace"] = fields["elbo_trace"][:, index]
        return PosteriorOutput(**{k: (v if k == "elbo_trace" or v is None else v[index]) for k, v in fields.items()})


def _check_inputs(model, input_ids, attention_mask) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"`input_ids` must be a (batch, sequence_length) tensor of token ids, got {shape}.")
    if input_ids.shape[0] == 0:
        raise ValueError("`input_ids` has 0 rows: pass a batch of at least one sequence.")
    if input_ids.shape[1] == 0:
        raise ValueError(
            "Cannot fit a posterior to an empty sequence. For unconditional use, sample the prior: "
            "`torch.randn(batch, *model.config.latent_shape)`."
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)} but `input_ids` has {tuple(input_ids.shape)}."
        )
    max_len = model.config.max_input_positions
    if input_ids.shape[1] > max_len:
        raise ValueError(
            f"Sequence of {input_ids.shape[1]} tokens is longer than the context, {max_len} positions "
            f"(max_position_embeddings={model.config.max_position_embeddings}); split it into "
            f"windows of at most {max_len} tokens or truncate it."
        )


def _resolve_settings(config, settings, **overrides) -> PosteriorFitSettings:
    """`settings` (default: the training fast loop's) with the keyword arguments that are not None applied."""
    if settings is None:
        settings = PosteriorFitSettings.training(config)
    elif not isinstance(settings, PosteriorFitSettings):
        raise TypeError(
            f"`settings` must be a PosteriorFitSettings (e.g. PosteriorFitSettings.evaluation(model.config)), got "
            f"{type(settings).__name__}."
        )
    return settings.replace(**overrides)


def _without_inference_mode(function, model, input_ids, attention_mask, labels, *args):
    """`function(model, input_ids, attention_mask, labels, *args)`; under `torch.inference_mode()`, which forbids
    autograd even under `enable_grad()`, run outside it with copies of the inputs that are ordinary tensors
    (inference tensors cannot be saved for backward)."""
    if not torch.is_inference_mode_enabled():
        return function(model, input_ids, attention_mask, labels, *args)
    with torch.inference_mode(False):
        input_ids, attention_mask, labels = (
            None if t is None else t.clone() for t in (input_ids, attention_mask, labels)
        )
        return function(model, input_ids, attention_mask, labels, *args)


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
    settings: PosteriorFitSettings | None = None,
    kl_weight: float | None = None,
    free_bits: float | None = None,
    init_mu: torch.Tensor | None = None,
    prefix=None,
    deadline: float | None = None,
) -> PosteriorOutput:
    """Fit `q(z|x) = N(mu, diag(exp(logvar)))` to each sequence by `num_steps` Adam steps on `(mu, logvar)`.

    The decoder is frozen (gradients with respect to `(mu, logvar)` only: no weight gradient, no decoder `.grad`, no
    graph left behind). Call it on the bare model (`accelerator.unwrap_model(model)` under DDP/FSDP). Gradients are
    enabled even inside `torch.no_grad()` / `torch.inference_mode()`; an enclosing autocast applies to the whole fit.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, seq)`): token ids.
        attention_mask (`torch.Tensor` of shape `(batch, seq)`, *optional*): 1 for tokens, 0 for padding (left or
            right); a padded row, seeded per sequence, gets the posterior it gets alone (to float tolerance).
        labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*): unshifted targets, `-100` not scored;
            default `input_ids` with padding excluded.
        settings ([`PosteriorFitSettings`], *optional*): default `PosteriorFitSettings.training(model.config)` (the
            training fast loop); `.evaluation(config)` is the evaluation fit. The keywords below override its fields:
        num_steps, lr, lr_min_ratio: fast steps `T`, fast learning rate, and the floor of its cosine decay (a
            fraction of `lr`).
        init_logvar, init_logvar_noise: `logvar` starts at the prior's log-variance plus `init_logvar +
            init_logvar_noise * N(0, 1)`; `mu` at the prior's mean plus `init_mu_noise * N(0, 1)` (the settings'
            `init_mu_noise`, 0 unless set).
        fixed_noise: one `eps` for all steps (the paper's code) or a new one every step.
        seed: an int seeds one generator for the batch; one int per row seeds each row on its own (a row's result
            then does not depend on its batch). Or `generator`.
        kl_weight, free_bits: the training objective's KL weight and free-bits floor (see `negative_elbo`); the
            returned `kl`, `elbo` and `elbo_trace` are the true KL and ELBO whatever they are.
        init_mu (`torch.Tensor` of shape `(batch, *config.latent_shape)`, *optional*): where `mu` starts (e.g. the
            posterior encoder's proposal); not differentiated through.
        prefix ([`LTMPrefix`], *optional*): the batch's `model.model.compute_prefix(...)`, if the caller has it.
        deadline (`float`, *optional*): a `time.monotonic()` value; passed between two fast steps, the fit raises
            `FitDeadlineExceeded`.

    Returns a [`PosteriorOutput`] whose `nll`, `kl`, `elbo` are scored at a fresh draw `z ~ q` (an unbiased
    single-sample ELBO estimate).

    Raises:
        NonFiniteELBOError: if the ELBO becomes NaN/inf at some step (lower `lr`).
        FitDeadlineExceeded: if `deadline` passed before the last fast step.
    """
    _check_inputs(model, input_ids, attention_mask)
    settings = _resolve_settings(
        model.config,
        settings,
        num_steps=num_steps,
        lr=lr,
        lr_min_ratio=lr_min_ratio,
        init_logvar=init_logvar,
        init_logvar_noise=init_logvar_noise,
        fixed_noise=fixed_noise,
        kl_weight=kl_weight,
        free_bits=free_bits,
    )
    if init_mu is not None and tuple(init_mu.shape) != (input_ids.shape[0], *model.config.latent_shape):
        raise ValueError(
            f"`init_mu` must have shape {(input_ids.shape[0], *model.config.latent_shape)} (batch, *latent_shape), "
            f"got {tuple(init_mu.shape)}."
        )
    extra = (init_mu, prefix, deadline)
    return _without_inference_mode(_fit, model, input_ids, attention_mask, labels, settings, seed, generator, *extra)


def _fit(
    model, input_ids, attention_mask, labels, settings, seed, generator, init_mu=None, prefix=None, deadline=None
):
    state = run_fast_loop(
        model, input_ids, attention_mask, labels, settings, seed, generator, init_mu, prefix, deadline
    )
    mu, logvar, noise = state.mu, state.logvar, state.noise
    fit_noise = noise
    with torch.no_grad():
        if settings.num_steps > 0:
            # Score the fitted q at a fresh draw: the loop's own `eps` is the one point it optimised against, so an
            # estimate there is optimistically biased; a fresh draw makes `elbo` an unbiased single-sample estimate.
            noise = state.noise_stream.next()
        try:
            _, nll, kl, num_tokens = state.batch.negative_elbo(state.forward, mu, logvar, noise)
        except NonFiniteLatentsError:
            nll = kl = torch.full((input_ids.shape[0],), float("nan"), device=input_ids.device)
        if not bool(torch.isfinite(nll).all() and torch.isfinite(kl).all()):
            raise_non_finite(
                model,
                f"is non-finite after {settings.num_steps} fast steps (lr={settings.lr})",
                settings.num_steps + 1,
            )
        z = mu + torch.exp(0.5 * logvar) * noise
    elbo = -(nll + kl)
    return PosteriorOutput(
        mu=mu,
        logvar=logvar,
        z=z,
        nll=nll,
        kl=kl,
        elbo=elbo,
        num_tokens=num_tokens,
        elbo_trace=torch.stack([*state.elbo_trace, elbo]),
        num_steps_taken=state.num_steps_taken,
        initial_mu=state.start[0].expand_as(mu),
        initial_logvar=state.start[1].expand_as(logvar),
        fit_noise=fit_noise,
    )


def reconstruction_nll(
    model: "LTMForCausalLM",
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    settings: PosteriorFitSettings | None = None,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's reported quantity: `-log p(x|z)` with `z` fitted on the very tokens `x` it scores.

    The fit is the training fast loop (`settings`, default `PosteriorFitSettings.training(model.config)`) with one
    fixed `eps` for all steps (forced), and the NLL is scored at `z = mu + sigma * eps` with that same `eps`; no KL.
    `exp(nll.sum() / num_tokens.sum())` is the *reconstruction perplexity*: not a bound on perplexity; not
    comparable with an autoregressive model's perplexity.

    Returns `(nll, num_tokens)`, both of shape `(batch,)`, `nll` in nats summed over each sequence's predicted tokens.
    """
    _check_inputs(model, input_ids, attention_mask)
    settings = _resolve_settings(model.config, settings, fixed_noise=True)
    return _without_inference_mode(
        _reconstruction_nll, model, input_ids, attention_mask, labels, settings, seed, generator
    )


def _reconstruction_nll(model, input_ids, attention_mask, labels, settings, seed, generator):
    state = run_fast_loop(model, input_ids, attention_mask, labels, settings, seed, generator)
    batch = state.batch
    with torch.no_grad():
        z = state.mu + torch.exp(0.5 * state.logvar) * state.noise
        nll, num_tokens = sequence_nll(
            state.forward, input_ids, z, batch.targets, attention_mask, batch.position_ids, batch.prefix
        )
    if not bool(torch.isfinite(nll).all()):
        raise NonFiniteELBOError(
            f"The reconstruction NLL is non-finite after {settings.num_steps} fast steps (lr={settings.lr}); check "
            "the model's weights and inputs for NaN/inf."
        )
    return nll.float(), num_tokens


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
    max_rows_per_forward: int | None = None,
    **fit_kwargs,
) -> torch.Tensor:
    """Importance-weighted lower bound on `log p(x)` in nats per sequence, shape `(batch,)`:

        log p(x) >= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x),    z_k ~ q(z|x)

    It is never looser than the ELBO in expectation and tightens as `K = num_samples` grows. `posterior` is fitted
    first with `fit_kwargs` (e.g. `num_steps`, `lr`) when not given. Divide by `posterior.num_tokens` for nats per
    token. The `K` samples of every sequence run as batched forwards of at most `max_rows_per_forward` rows (the
    memory cap; default `max(batch, 16384 // seq_length)`).
    """
    check_int("num_samples", num_samples, 1)
    _check_inputs(model, input_ids, attention_mask)
    if posterior is None:
        posterior = fit_posterior(
            model, input_ids, attention_mask, labels=labels, seed=seed, generator=generator, **fit_kwargs
        )
    return _importance_sample(
        model, input_ids, attention_mask, labels, num_samples, posterior, seed, generator, max_rows_per_forward
    )[0]


def _importance_sample(
    model, input_ids, attention_mask, labels, num_samples, posterior, seed, generator, max_rows_per_forward=None
):
    """`(iw_bound, mean_nll, mean_log_ratio)`, each `(batch,)`: the importance-weighted bound from `num_samples` draws
    `z_k ~ q`, the mean of `-log p(x|z_k)` over those same draws (a `K`-sample estimate of `E_q[-log p(x|z)]`), and
    the mean of `log q(z_k) - log p(z_k)` (a `K`-sample estimate of the KL).

    The `K * batch` (sequence, draw) pairs run as batched forwards of at most `max_rows_per_forward` rows (default
    [`default_max_rows`]), on the batch's latent-independent prefix computed once; the draws are the same as `K`
    sequential passes would take, so the numbers are too (up to float rounding)."""
    batch_size, seq_length = input_ids.shape
    seed = None if generator is not None else importance_seed(seed)
    generators = row_generators(seed, generator, batch_size, input_ids.device)
    batch = FitBatch.prepare(model, input_ids, attention_mask, labels)
    forward = LowPrecisionWeights.for_fit(model, input_ids.device)
    mu, logvar = posterior.mu, posterior.logvar
    noise = NoiseStream(mu.shape, generators, mu.device, num_draws=num_samples)
    noise = torch.stack([noise.next() for _ in range(num_samples)])  # (K, B, ...)
    z = (mu + torch.exp(0.5 * logvar) * noise).flatten(0, 1)  # (K * B, ...), row k * B + b
    rows = torch.arange(batch_size, device=input_ids.device).repeat(num_samples)
    max_rows = default_max_rows(batch_size, seq_length) if max_rows_per_forward is None else max_rows_per_forward
    check_int("max_rows_per_forward", max_rows, 1)
    nlls = []
    for chunk in torch.arange(rows.numel(), device=rows.device).split(max_rows):
        rows_batch = batch.select(rows[chunk])
        nlls.append(
            sequence_nll(
                forward, rows_batch.input_ids, z[chunk], rows_batch.targets, rows_batch.attention_mask,
                rows_batch.position_ids, rows_batch.prefix,
            )[0].float()
        )  # fmt: skip
    nll = torch.cat(nlls).view(num_samples, batch_size)
    z = z.view(num_samples, batch_size, *mu.shape[1:])
    log_weights = torch.stack(
        [-nll[k] + batch.prior.log_prob(z[k]) - gaussian_log_prob(z[k], mu, logvar) for k in range(num_samples)]
    )
    bound = torch.logsumexp(log_weights, dim=0) - math.log(num_samples)
    return bound, nll.mean(0), (-nll - log_weights).mean(0)


def select_start_or_fit(
    model: "LTMForCausalLM",
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    labels: torch.LongTensor | None,
    posterior: PosteriorOutput,
    num_samples: int,
    seed: int | Sequence[int] | None = None,
) -> tuple[PosteriorOutput, torch.BoolTensor]:
    """The evaluation's selection rule (modeling_ltm/selection.py): per sequence, the better of the fit's start and
    its last iterate on `num_samples` shared draws, scored at a fresh draw. Returns the posterior with the chosen
    `(mu, logvar)` and its `z`, `nll`, `kl`, `elbo`, and which rows went back to their start `(batch,)`."""
    if posterior.initial_mu is None:
        raise ValueError("The selection rule needs the fit's start: pass a PosteriorOutput made by `fit_posterior`.")
    if torch.is_inference_mode_enabled():
        return _without_inference_mode(
            select_start_or_fit, model, input_ids, attention_mask, labels, posterior, num_samples, seed
        )
    batch = FitBatch.prepare(model, input_ids, attention_mask, labels)
    start = (posterior.initial_mu, posterior.initial_logvar)
    keep_fit = fit_beats_start(model, batch, (posterior.mu, posterior.logvar), start, num_samples, seed)
    if bool(keep_fit.all()):
        return posterior, ~keep_fit
    z, nll, kl = score_at_fresh_draw(model, batch, *start, seed=seed)
    rows = keep_fit.view(-1, *([1] * (posterior.mu.dim() - 1)))
    nll, kl = torch.where(keep_fit, posterior.nll, nll), torch.where(keep_fit, posterior.kl, kl)
    chosen = dataclasses.replace(
        posterior,
        mu=torch.where(rows, posterior.mu, start[0]),
        logvar=torch.where(rows, posterior.logvar, start[1]),
        z=torch.where(rows, posterior.z, z),
        nll=nll,
        kl=kl,
        elbo=-(nll + kl),
    )
    return chosen, ~keep_fit


def default_max_rows(batch_size: int, seq_length: int, max_tokens: int = 16384) -> int:
    """Rows per batched scoring forward when no cap is given: at least the batch, else `max_tokens` tokens' worth."""
    return max(batch_size, max_tokens // max(seq_length, 1))


@dataclass
class PosteriorEvaluation:
    """Per-sequence numbers of [`evaluate_posterior`], all in nats summed over each sequence's predicted tokens.

    Args:
        nll (`torch.FloatTensor` of shape `(batch,)`): an estimate of `E_q[-log p(x|z)]` under the evaluation fit:
            the mean of `-log p(x|z)` over the `iw_samples` importance draws when those are taken, else over
            `settings.score_samples` fresh draws (one when that is 1).
        kl (`torch.FloatTensor` of shape `(batch,)`): `KL(q || p)` of the evaluation fit: closed form for a Gaussian
            prior; for a flow prior, the mean of `log q(z) - log p(z)` over the same draws as `nll`.
        elbo (`torch.FloatTensor` of shape `(batch,)`): `-(nll + kl)`, an unbiased estimate of the ELBO, a lower
            bound on `log p(x)` in expectation.
        num_tokens (`torch.LongTensor` of shape `(batch,)`): predicted tokens per sequence.
        settings ([`PosteriorFitSettings`]): the evaluation fit's settings.
        posterior ([`PosteriorOutput`]): the evaluation fit itself (`mu`, `logvar`, `z`, `elbo_trace`).
        iw (`torch.FloatTensor` of shape `(batch,)`, *optional*): the importance-weighted bound on `log p(x)` with
            `iw_samples` draws from the evaluation fit (when `iw_samples > 0`).
        iw_samples (`int`): `K` of `iw` (0 when not computed).
        reconstruction_nll (`torch.FloatTensor` of shape `(batch,)`, *optional*): `-log p(x|z)` with `z` fitted on
            `x` by `reconstruction_settings` and scored at the fit's own fixed `eps`, no KL (when `reconstruction`):
            the paper's protocol. Not a bound on `-log p(x)`.
        reconstruction_settings ([`PosteriorFitSettings`], *optional*): the training fast loop's settings it used.
        start_kept (`torch.BoolTensor` of shape `(batch,)`, *optional*): which sequences the selection rule
            (`settings.select_samples > 0`) scored at the fit's start rather than its last iterate.
    """

    nll: torch.Tensor
    kl: torch.Tensor
    elbo: torch.Tensor
    num_tokens: torch.Tensor
    settings: PosteriorFitSettings
    posterior: PosteriorOutput
    iw: torch.Tensor | None = None
    iw_samples: int = 0
    reconstruction_nll: torch.Tensor | None = None
    reconstruction_settings: PosteriorFitSettings | None = None
    start_kept: torch.Tensor | None = None

    def summary(self) -> dict:
        """Token-weighted figures over the batch: `nll_per_token`, `kl_per_token` (nats), `elbo_ppl` =
        `exp(-sum elbo / sum tokens)` (an upper bound on perplexity), `iw_ppl` (tighter, when computed) and
        `reconstruction_ppl` (when computed: not a bound on perplexity; not comparable with an autoregressive
        model's perplexity)."""
        tokens = float(self.num_tokens.sum().clamp(min=1))
        out = {
            "nll_per_token": float(self.nll.sum()) / tokens,
            "kl_per_token": float(self.kl.sum()) / tokens,
            "elbo_ppl": math.exp(-float(self.elbo.sum()) / tokens),
        }
        if self.iw is not None:
            out["iw_ppl"] = math.exp(-float(self.iw.sum()) / tokens)
        if self.reconstruction_nll is not None:
            out["reconstruction_ppl"] = math.exp(float(self.reconstruction_nll.sum()) / tokens)
        if self.start_kept is not None:
            out["start_kept_fraction"] = float(self.start_kept.float().mean())
        return out


RECONSTRUCTION_CAVEAT = "not a bound on perplexity; not comparable with an autoregressive model's perplexity"


def evaluate_posterior(
    model: "LTMForCausalLM",
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    settings: PosteriorFitSettings | None = None,
    iw_samples: int = 0,
    reconstruction: bool = False,
    reconstruction_settings: PosteriorFitSettings | None = None,
    seed: int | Sequence[int] | None = None,
    max_rows_per_forward: int | None = None,
) -> PosteriorEvaluation:
    """Every number an LTM reports about `log p(x)`, from one definition.

    1. Fit `q(z|x)` with the evaluation settings (`settings`, default `PosteriorFitSettings.evaluation(config)`:
       start at the prior, `eps` redrawn every step) and score it at a fresh draw: `nll`, `kl`, `elbo = -(nll + kl)`.
       With `settings.select_samples = S > 0` (the config's `eval_select_samples`, 4 by default), each sequence
       keeps the better of the fit's start and its last iterate, compared on `S` shared draws and scored on fresh
       ones (modeling_ltm/selection.py): the bound is never looser than the start's beyond noise, and still a bound.
    2. With `iw_samples = K > 0`, the importance-weighted bound `log 1/K sum_k p(x|z_k) p(z_k) / q(z_k)` from that
       fit; `nll` (and so `elbo`) then averages `-log p(x|z_k)` over the same K draws instead of one. Without it,
       `nll` averages over `settings.score_samples` fresh draws (the config's `eval_score_samples`, 8).
    3. With `reconstruction`, the paper's reconstruction NLL (see [`reconstruction_nll`]): a separate fit with the
       training fast loop (`reconstruction_settings`, default `PosteriorFitSettings.training(config)`, fixed `eps`)
       scored at its own `eps`, no KL. Not a bound.

    Args:
        input_ids, attention_mask, labels: as [`fit_posterior`] (`labels` = -100 excludes a token from every term).
        seed: an int, or one int per row (results then do not depend on batching). Both fits start from it; the
            importance samples draw from seeds derived from it.
        max_rows_per_forward: memory cap of the batched importance-sample forwards (rows = sequences x samples);
            default `max(batch, 16384 // seq_length)`.

    Returns a [`PosteriorEvaluation`] (per-sequence tensors in nats; `.summary()` for per-token figures).
    """
    check_int("iw_samples", iw_samples, why="0 = no importance-weighted bound")
    if settings is None:
        settings = PosteriorFitSettings.evaluation(model.config)
    posterior = fit_posterior(model, input_ids, attention_mask, labels=labels, settings=settings, seed=seed)
    start_kept = None
    if settings.select_samples > 0 and settings.num_steps > 0:
        posterior, start_kept = select_start_or_fit(
            model, input_ids, attention_mask, labels, posterior, settings.select_samples, seed
        )
    result = PosteriorEvaluation(
        nll=posterior.nll.float(),
        kl=posterior.kl.float(),
        elbo=posterior.elbo.float(),
        num_tokens=posterior.num_tokens,
        settings=_resolve_settings(model.config, settings),
        posterior=posterior,
        start_kept=start_kept,
    )
    score_samples = iw_samples or (settings.score_samples if settings.score_samples > 1 else 0)
    if score_samples > 0:
        with torch.no_grad():
            iw, result.nll, log_ratio = _importance_sample(
                model, input_ids, attention_mask, labels, score_samples, posterior, seed, None, max_rows_per_forward
            )
        # The ELBO's terms from the K draws rather than one: a lower-variance estimate of the same ELBO (the KL too,
        # for a prior whose KL is estimated from draws).
        if not latent_prior_of(model).exact_kl:
            result.kl = log_ratio
        result.elbo = -(result.nll + result.kl)
        if iw_samples > 0:
            result.iw, result.iw_samples = iw, iw_samples
    if reconstruction:
        recon_settings = _resolve_settings(model.config, reconstruction_settings, fixed_noise=True)
        result.reconstruction_nll, _ = reconstruction_nll(
            model, input_ids, attention_mask, labels=labels, settings=recon_settings, seed=seed
        )
        result.reconstruction_settings = recon_settings
    return result


__all__ = [
    "EVAL_STOP_TOL",
    "EVAL_STOP_WINDOW",
    "RECONSTRUCTION_CAVEAT",
    "SUGGESTED_STOP_TOL",
    "FitDeadlineExceeded",
    "NonFiniteELBOError",
    "NonFiniteLatentsError",
    "PosteriorEvaluation",
    "PosteriorFitSettings",
    "PosteriorOutput",
    "content_seed",
    "cosine_fast_lr",
    "default_max_rows",
    "evaluate_posterior",
    "fit_posterior",
    "gaussian_kl",
    "gaussian_log_prob",
    "importance_weighted_bound",
    "negative_elbo",
    "next_token_targets",
    "position_ids_from_attention_mask",
    "reconstruction_nll",
    "select_start_or_fit",
    "sequence_nll",
]

"""The fast loop: `T` Adam steps on the posterior's `(mu, logvar)` with the decoder frozen (the paper's "fast
learning"), gradients with respect to those two tensors only (`torch.autograd.grad`), so no weight gradient is
computed and no decoder `.grad` changes.

One step body, [`FastStep`], serves every loop:

- the plain loop ([`run_fast_loop`]): on a GPU it runs with no host synchronisation inside (noise drawn on the
  device before the loop, the ELBO trace and the finiteness checks kept on the device and read once at the end),
  and, for a whole CUDA batch, replays the step from a CUDA graph ([`FastStepGraph`]: the kernels of one step
  launched as one, which is what a small model's loop is bound by);
- the adaptive loop ([`run_adaptive_fast_loop`], evaluation only), where rows stop on their own and leave the batch.

Under an autocast, the whole fit runs in one autocast region and the decoder's matrix weights are cast once per fit
([`LowPrecisionWeights`]), not at every fast step.

Imports only torch, transformers and siblings (copied next to the weights for `trust_remote_code=True`).
"""

import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers.utils import logging

from .errors import FitDeadlineExceeded, NonFiniteELBOError, NonFiniteLatentsError, NonFiniteWeightsError
from .randomness import NoiseStream, row_generators, standard_normal
from .scoring import negative_elbo, next_token_targets, position_ids_from_attention_mask
from .weight_checks import check_finite_weights, is_fsdp_sharded, latent_prior_of, posterior_encoder_of


logger = logging.get_logger(__name__)

# "0" turns the CUDA-graph fast loop off (the eager loop then runs on the GPU too); anything else leaves it on.
CUDA_GRAPHS_ENV = "LTM_CUDA_GRAPHS"
# Below this many fast steps, capturing a graph (two warm-up steps and a capture) costs more than it saves.
MIN_GRAPHED_STEPS = 4
# Graphs kept per model, most recently used first (each holds one step's activations in its memory pool).
MAX_CACHED_GRAPHS = 4


def cosine_fast_lr(
    step: int, num_steps: int, lr: float, min_ratio: float, schedule: str = "cosine_t_minus_1"
) -> float:
    """Fast learning rate at `step` (0-based) of `num_steps`: `floor + (lr - floor) (1 + cos(pi step / P)) / 2`,
    `floor = lr * min_ratio`, with the half period `P = num_steps - 1` (`schedule="cosine_t_minus_1"`: the last step
    runs at the floor) or `P = num_steps` (`"cosine_t"`, the paper's code: the floor is never reached).

    The closed form of `torch.optim.lr_scheduler.CosineAnnealingLR` with `T_max = P` (a test checks the two agree).
    The scheduler itself does not fit here: the graphed loop fills a device tensor from these values between replays,
    and the adaptive loop rebuilds its optimizer in the middle of the schedule.
    """
    period = num_steps if schedule == "cosine_t" else num_steps - 1
    if period < 1:
        return lr
    floor = lr * min_ratio
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * step / period))


def check_deadline(deadline: float | None, step: int, num_steps: int) -> None:
    """Raise `FitDeadlineExceeded` when `deadline` (a `time.monotonic()` value, or None for none) has passed."""
    if deadline is not None and time.monotonic() > deadline:
        error = FitDeadlineExceeded(
            f"The posterior fit passed its time budget after {step} of {num_steps} fast steps; stopped there."
        )
        error.fast_step = step
        raise error


def raise_non_finite(model, what: str, fast_step: int) -> None:
    """Raise `NonFiniteELBOError` (with `.fast_step`, 1-based; `num_steps + 1` for the final scoring), blaming the
    weights (by name) when they hold NaN/inf, else the fast learning rate."""
    try:
        check_finite_weights(model, "posterior fitting")
    except NonFiniteWeightsError as weights_error:
        error = NonFiniteELBOError(f"The ELBO {what}: {weights_error}")
        error.fast_step = fast_step
        raise error from weights_error
    error = NonFiniteELBOError(
        f"The ELBO {what} with finite weights. Lower the fast learning rate (`inference_lr` / `lr`), or check the "
        "inputs."
    )
    error.fast_step = fast_step
    raise error


def compute_prefix(model, input_ids, attention_mask, position_ids):
    """The batch's latent-independent `LTMPrefix` (once per fit), or None: for a model without `compute_prefix`, one
    sharded by FSDP2 (`fully_shard`), whose parameters are gathered only by the hooks of a full `model(...)` call, and
    one on flex attention, whose mask (a `BlockMask`) cannot be sliced into rows."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "compute_prefix") or is_fsdp_sharded(model):
        return None
    if getattr(base.config, "_attn_implementation", None) == "flex_attention":
        return None
    return base.compute_prefix(input_ids, attention_mask=attention_mask, position_ids=position_ids)


@dataclass
class FitBatch:
    """What every fast step of one fit reads: the tokens `(B, T)`, their unshifted targets (-100: not scored), the
    padding mask and positions (None without padding), and the latent-independent prefix (None: not computable)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    prefix: object
    prior: object  # the model's prior over z (modeling_ltm/priors.py), always set: `latent_prior_of(model)`

    @classmethod
    def prepare(cls, model, input_ids, attention_mask, labels=None, prefix=None) -> "FitBatch":
        targets = next_token_targets(input_ids, attention_mask, labels)
        position_ids = None if attention_mask is None else position_ids_from_attention_mask(attention_mask)
        if prefix is None:
            prefix = compute_prefix(model, input_ids, attention_mask, position_ids)
        return cls(input_ids, targets, attention_mask, position_ids, prefix, latent_prior_of(model))

    def select(self, rows: torch.Tensor) -> "FitBatch":
        """The batch of rows `rows` (a 1-D LongTensor)."""

        def pick(tensor):
            return None if tensor is None else tensor.index_select(0, rows)

        prefix = None if self.prefix is None else self.prefix.index_select(rows)
        return FitBatch(
            *(pick(t) for t in (self.input_ids, self.targets, self.attention_mask, self.position_ids)), prefix,
            self.prior,
        )  # fmt: skip

    def negative_elbo(self, forward, mu, logvar, noise, kl_weight=1.0, free_bits=0.0, loss_reduction="per_token"):
        """[`negative_elbo`] of this batch at `z = mu + exp(logvar / 2) * noise`, through `forward`."""
        return negative_elbo(
            forward, self.input_ids, self.targets, mu, logvar, noise, self.attention_mask, self.position_ids,
            self.prefix, kl_weight, free_bits, self.prior, loss_reduction,
        )  # fmt: skip


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of the autocast enabled for `device`'s type here, or None when none is."""
    if device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


class FitCache:
    """What fits keep on a model between calls (its low-precision weight copies, its CUDA graphs), in the model's
    `__dict__`: not a module, a parameter or state. A copy (`copy.deepcopy`, pickling) of the model starts empty."""

    def __init__(self):
        self.low_precision = None
        self.graphs = OrderedDict()

    @classmethod
    def of(cls, model) -> "FitCache":
        cache = model.__dict__.get("_ltm_fit_cache")
        if cache is None:
            cache = model.__dict__["_ltm_fit_cache"] = cls()
        return cache

    def __deepcopy__(self, memo):
        return FitCache()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class ModelCall(torch.nn.Module):
    """Calls the model as a fit should: its own forward, without the mixed-precision wrapper that accelerate puts on a
    prepared model's `forward` (the fit runs inside one autocast region of its own; the wrapper would enter another at
    every fast step and copy every step's logits to float32). Callable like the model; `config` is the model's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, **kwargs):
        original = self.model.__dict__.get("_original_forward")  # accelerate's saved, unwrapped forward
        return original(**kwargs) if original is not None else self.model(**kwargs)


class LowPrecisionWeights:
    """Runs the model with its matrix weights (every floating parameter of 2+ dimensions) replaced by copies in the
    enclosing autocast's dtype, refreshed once per fit.

    Autocast casts a float32 weight again each time it enters a region, and at every replay of a graph that includes
    the cast; with these copies the weights are cast once per fit and the fast steps read them as they are (autocast
    leaves a tensor already in its dtype alone), with the same numbers: the copies round as autocast's casts do.
    Callable like the model (`torch.func.functional_call` of a [`ModelCall`]); the copies live on the model, at fixed
    addresses, so a CUDA graph that reads them stays valid from one fit to the next.
    """

    def __init__(self, model, dtype: torch.dtype):
        self.call, self.dtype = ModelCall(model), dtype
        names_of = {}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if parameter.is_floating_point() and parameter.dim() >= 2 and parameter.dtype != dtype:
                names_of.setdefault(parameter, []).append(f"model.{name}")
        self.sources = list(names_of)
        self.copies = [torch.empty_like(p, dtype=dtype) for p in self.sources]
        self.tensors = {name: copy for p, copy in zip(self.sources, self.copies) for name in names_of[p]}
        self.signature = _parameter_signature(model)

    @property
    def config(self):
        return self.call.config

    @classmethod
    def for_fit(cls, model, device: torch.device):
        """The callable a fit scores through: the model's own forward ([`ModelCall`]) without autocast (or with nothing
        to cast), else the model's `LowPrecisionWeights` for the autocast dtype, refreshed from the current weights."""
        dtype = autocast_dtype(device)
        if dtype is None or dtype == torch.float32 or is_fsdp_sharded(model):
            return ModelCall(model)
        cache = FitCache.of(model)
        cached = cache.low_precision
        if cached is None or cached.dtype != dtype or cached.signature != _parameter_signature(model):
            cached = cls(model, dtype)
            if not cached.sources:
                return ModelCall(model)
            cache.low_precision = cached
        cached.refresh()
        return cached

    @torch.no_grad()
    def refresh(self) -> None:
        for source, copy in zip(self.sources, self.copies):
            copy.copy_(source)

    def __call__(self, **kwargs):
        return torch.func.functional_call(self.call, self.tensors, args=(), kwargs=kwargs, strict=False)


def _parameter_signature(model) -> tuple:
    """Identity of a model's parameter storage: changes when a parameter is replaced (`model.to(...)`, `load_state_dict
    (assign=True)`), not when it is updated in place (an optimizer step)."""
    return tuple((p.data_ptr(), p.dtype, tuple(p.shape)) for p in model.parameters())


class FastStep:
    """One fast step, the body of every fast loop: the objective at the current `(mu, logvar)` with this step's
    `eps`, its gradient with respect to `(mu, logvar)` only, and the optimizer's update of them.

    Calling it with `noise` (`eps`, same shape as `mu`) returns the ELBO estimate `-(nll + kl)` in nats per
    sequence `(B,)` *before* the update, and a 0-d bool tensor: whether the loss and the gradients were finite. Nothing
    is read back to the host.
    """

    def __init__(self, forward, batch: FitBatch, mu, logvar, optimizer, settings, kl_weight=None):
        """`settings`: the fit's [`PosteriorFitSettings`] (its KL weight, free bits and loss reduction);
        `kl_weight` replaces the settings' (a 0-d tensor that a CUDA graph reads)."""
        self.forward, self.batch, self.mu, self.logvar, self.optimizer = forward, batch, mu, logvar, optimizer
        self.kl_weight = settings.kl_weight if kl_weight is None else kl_weight
        self.free_bits, self.loss_reduction = settings.free_bits, settings.loss_reduction
        self.num_tokens = None  # scored tokens per row `(B,)`, from the last call

    def __call__(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, nll, kl, self.num_tokens = self.batch.negative_elbo(
            self.forward, self.mu, self.logvar, noise, self.kl_weight, self.free_bits, self.loss_reduction
        )
        grads = torch.autograd.grad(loss, [self.mu, self.logvar])
        finite = torch.isfinite(torch.stack([loss.detach(), *(g.sum() for g in grads)])).all()
        self.mu.grad, self.logvar.grad = grads
        self.optimizer.step()
        return -(nll + kl).detach().float(), finite


@dataclass
class FastLoopState:
    """Where a fit ended: `mu`, `logvar` `(B, *latent_shape)`; `noise`, the `eps` of the last step (the only one with
    fixed noise); `noise_stream`, for the fit's further draws; `elbo_trace`, a list of `(B,)` ELBO estimates (one per
    step); `batch`; `num_steps_taken` `(B,)`; `forward`, what the fit scored through (for its final scoring)."""

    mu: torch.Tensor
    logvar: torch.Tensor
    noise: torch.Tensor
    elbo_trace: list
    batch: FitBatch
    noise_stream: NoiseStream
    num_steps_taken: torch.Tensor
    forward: object = None
    start: tuple | None = None  # `(mu, logvar)` where the fit started (a candidate of the evaluation's selection)


def relative_to_prior(prior, mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An encoder's output read relative to the prior's Gaussian start: `(prior mean + mu, prior logvar + logvar)`, so
    an untrained encoder (output 0) proposes the prior itself, learned or not."""
    prior_mu, prior_logvar = prior.start(mu.device)
    return prior_mu + mu, prior_logvar + logvar


def encoder_proposal(model, batch: FitBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The amortized posterior encoder's `(mu, logvar)` for these rows (no gradient), from the fit's prefix, relative
    to the prior ([`relative_to_prior`])."""
    encoder = posterior_encoder_of(model)
    if encoder is None:
        raise ValueError(
            "`warm_start=True` needs an amortized posterior encoder, and this model has none "
            "(config.posterior_encoder_size = 0). Load it with `posterior_encoder_size=N` and train the encoder with "
            "`modeling_ltm.tooling.amortized.fit_posterior_encoder`, or fit from the prior (`warm_start=False`)."
        )
    prefix = batch.prefix
    if prefix is None and is_fsdp_sharded(model):
        raise ValueError(
            "Warm starts need the latent-independent prefix, which a model sharded by FSDP2 (`fully_shard`) does not "
            "compute outside its forward; fit from the prior (`warm_start=False`) or evaluate the unsharded model."
        )
    with torch.no_grad():
        if prefix is None:
            prefix = model.model.compute_prefix(
                batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
            )
        return relative_to_prior(batch.prior, *encoder(prefix.hidden_states, batch.attention_mask))


def _starting_point(model, batch, settings, noise_stream, init_mu):
    """`(mu, logvar)` where the fit starts, float32 leaf copies: the settings' start (the prior's mean plus
    `init_mu_noise * N(0, 1)` and its logvar plus `init_logvar + init_logvar_noise * N(0, 1)`, or the encoder's
    proposal), `mu` replaced by `init_mu` if given."""
    jitter = noise_stream.next()  # drawn either way: the eps stream is the same for any start
    # Drawn only when used, after the logvar jitter: a fit without it draws what it always drew.
    mu_jitter = noise_stream.next() if settings.init_mu_noise and not settings.warm_start else None
    if settings.warm_start:
        mu, logvar = encoder_proposal(model, batch)
    else:
        prior_mu, prior_logvar = batch.prior.start(jitter.device)  # N(0, I) for the standard normal and a flow
        mu = prior_mu.expand(jitter.shape).float()
        if mu_jitter is not None:
            mu = mu + settings.init_mu_noise * mu_jitter
        logvar = prior_logvar + settings.init_logvar + settings.init_logvar_noise * jitter
    if init_mu is not None:
        mu = init_mu.float()
    return mu.detach().clone(), logvar.detach().clone()


def run_fast_loop(
    model, input_ids, attention_mask, labels, settings, seed, generator, init_mu=None, prefix=None, deadline=None
) -> FastLoopState:
    """`settings.num_steps` Adam steps on `(mu, logvar)` for this batch; see the module docstring.

    The batch's latent-independent prefix (embeddings, masks, layer 0's self-attention) is computed once (unless
    given) and reused by every step. `init_mu` replaces the settings' start of `mu` (the warm start's included).
    With `settings.stop_tol`, rows stop on their own ([`run_adaptive_fast_loop`]).
    """
    batch = FitBatch.prepare(model, input_ids, attention_mask, labels, prefix)
    shape, device, num_steps = (input_ids.shape[0], *model.config.latent_shape), input_ids.device, settings.num_steps
    generators = row_generators(seed, generator, shape[0], device)
    steps_drawn = 1 if settings.fixed_noise else num_steps
    start_draws = 2 if settings.init_mu_noise and not settings.warm_start else 1
    noise_stream = NoiseStream(shape, generators, device, num_draws=start_draws + 1 + min(steps_drawn, num_steps))
    mu, logvar = _starting_point(model, batch, settings, noise_stream, init_mu)
    start = (mu.clone(), logvar.clone())
    noise = noise_stream.next()
    if settings.stop_tol is not None and num_steps > 0:
        state = run_adaptive_fast_loop(model, batch, settings, generators, noise_stream, mu, logvar, noise, deadline)
        state.start = start
        return state
    forward = LowPrecisionWeights.for_fit(model, device)
    graph = FastStepGraph.for_fit(model, forward, batch, settings)
    trace = torch.empty((num_steps, shape[0]), device=device)
    finite_steps = torch.ones(num_steps, dtype=torch.bool, device=device)
    if graph is not None:
        mu, logvar, noise = graph.run(batch, mu, logvar, noise, noise_stream, settings, trace, finite_steps, deadline)
    else:
        mu, logvar, noise = _run_eager(forward, batch, settings, mu, logvar, noise, noise_stream, trace, finite_steps,
                                       deadline, model)  # fmt: skip
    if num_steps and not bool(finite_steps.all()):  # the loop's one host sync
        step = int(finite_steps.int().argmin()) + 1
        raise_non_finite(model, f"became non-finite at fast step {step}/{num_steps} (lr={settings.lr})", step)
    steps_taken = torch.full((shape[0],), num_steps, dtype=torch.long, device=device)
    return FastLoopState(mu, logvar, noise, list(trace.unbind(0)), batch, noise_stream, steps_taken, forward, start)


def fast_optimizer(params, settings, lr, **options) -> torch.optim.Optimizer:
    """The fast optimizer over `params` (`[mu, logvar]`): Adam, or AdamW when `settings.weight_decay > 0` (betas
    0.9/0.999, eps 1e-8: torch's defaults, as in the paper's code). `options` go to the optimizer (`capturable`,
    `foreach`); `lr` may be a float or a 0-d tensor."""
    if settings.weight_decay:
        return torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay, **options)
    return torch.optim.Adam(params, lr=lr, **options)


def fast_lr_at(step: int, settings) -> float:
    """The fast learning rate of step `step` of a fit run with `settings` ([`cosine_fast_lr`])."""
    return cosine_fast_lr(step, settings.num_steps, settings.lr, settings.lr_min_ratio, settings.lr_schedule)


def _leaf_optimizer(mu, logvar, settings):
    """`(mu, logvar)` as the leaves the loop optimises, and the fast optimizer over them."""
    mu, logvar = mu.requires_grad_(True), logvar.requires_grad_(True)
    return mu, logvar, fast_optimizer([mu, logvar], settings, settings.lr)


def _begin_step(optimizer, step: int, settings, deadline) -> None:
    """Before fast step `step`: the time budget, then the step's learning rate on the cosine schedule."""
    check_deadline(deadline, step, settings.num_steps)
    for group in optimizer.param_groups:
        group["lr"] = fast_lr_at(step, settings)


def _start_fit(forward, batch, mu, logvar, settings):
    """`(mu, logvar, optimizer, step_fn)`: the fit's leaf latents, their fast optimizer and the `FastStep` on them."""
    mu, logvar, optimizer = _leaf_optimizer(mu, logvar, settings)
    return mu, logvar, optimizer, FastStep(forward, batch, mu, logvar, optimizer, settings)


def _raise_non_finite_at(model, step: int, settings) -> None:
    """The fit became non-finite at (0-based) fast step `step`: the error naming the step and the learning rate."""
    what = f"became non-finite at fast step {step + 1}/{settings.num_steps} (lr={settings.lr})"
    raise_non_finite(model, what, step + 1)


def _run_eager(forward, batch, settings, mu, logvar, noise, noise_stream, trace, finite_steps, deadline, model):
    """The plain loop, step by step; returns the final `(mu, logvar, noise)`."""
    num_steps = settings.num_steps
    mu, logvar, optimizer, step_fn = _start_fit(forward, batch, mu, logvar, settings)
    with torch.enable_grad():
        for step in range(num_steps):
            _begin_step(optimizer, step, settings, deadline)
            if step > 0 and not settings.fixed_noise:
                noise = noise_stream.next()
            try:
                trace[step], finite_steps[step] = step_fn(noise)
            except NonFiniteLatentsError:  # a model forward that checks its latents: the last step sent them to inf
                _raise_non_finite_at(model, step, settings)
    return mu.detach(), logvar.detach(), noise


class FastStepGraph:
    """The fast step of one batch shape captured as a CUDA graph, replayed by every fit of that shape.

    Static inputs (the batch's tensors and prefix, `mu`, `logvar`, `eps`, the learning rate and the KL weight) are
    buffers of their own that each fit and each step fill in place; Adam (`capturable=True`, its state reset per fit)
    updates `mu` and `logvar` inside the graph. Built on first use: two eager steps on a side stream (lazy state,
    cuBLAS workspaces, compiled kernels), then the capture. Kept on the model, keyed by everything that changes the
    recorded kernels (shapes, dtypes, autocast, training mode, the weights' storage).

    `capture=False` runs the same static-buffer loop with each replay executed eagerly: how the CPU tests check the
    plumbing (loading, resetting, the schedule) against the plain loop.
    """

    def __init__(self, forward, batch: FitBatch, settings, autocast: torch.dtype | None, capture: bool = True):
        """`settings`: the fit's [`PosteriorFitSettings`]; what the graph records of them (free bits, the loss
        reduction, the optimizer and its weight decay) is part of the cache key of [`for_fit`]."""
        self.batch = _static_copy(batch)
        device = batch.input_ids.device
        shape = (batch.input_ids.shape[0], *forward.config.latent_shape)
        self.mu = torch.zeros(shape, device=device, requires_grad=True)
        self.logvar = torch.zeros(shape, device=device, requires_grad=True)
        self.noise = torch.zeros(shape, device=device)
        self.lr = torch.zeros((), device=device)
        self.kl_weight = torch.ones((), device=device)
        on_gpu = device.type == "cuda"
        self.optimizer = fast_optimizer([self.mu, self.logvar], settings, self.lr, capturable=on_gpu, foreach=on_gpu)
        self.step = FastStep(forward, self.batch, self.mu, self.logvar, self.optimizer, settings, self.kl_weight)
        self.autocast, self.graph = autocast, None
        self.elbo = self.finite = None
        if capture:
            self._capture(device)

    def _capture(self, device: torch.device) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), self._autocast(device), torch.enable_grad():
            for _ in range(2):
                self.lr.fill_(1e-3)
                self.noise.normal_()
                self.step(self.noise)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), self._autocast(device), torch.enable_grad():
            self.elbo, self.finite = self.step(self.noise)

    def _autocast(self, device: torch.device):
        # No weight-cast cache inside a capture: a cached cast would be freed with the region that made it.
        if self.autocast is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=self.autocast, cache_enabled=False)

    def _replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        with torch.enable_grad():
            self.elbo, self.finite = self.step(self.noise)

    @classmethod
    def for_fit(cls, model, forward, batch: FitBatch, settings) -> "FastStepGraph | None":
        """The graph for this fit, built if needed; None where the eager loop runs (CPU, FSDP2, no prefix, few
        steps, `LTM_CUDA_GRAPHS=0`, inside another capture), or where capturing failed (with a warning, once)."""
        device = batch.input_ids.device
        if (
            device.type != "cuda"
            or batch.prefix is None
            or settings.num_steps < MIN_GRAPHED_STEPS
            or os.environ.get(CUDA_GRAPHS_ENV, "1") == "0"
            or torch.cuda.is_current_stream_capturing()
        ):
            return None
        autocast = autocast_dtype(device)
        key = (
            _tensor_layout(batch), autocast, float(settings.free_bits), settings.loss_reduction,
            float(settings.weight_decay), model.training,
            model.config._attn_implementation, _parameter_signature(model), type(forward).__name__,
        )  # fmt: skip
        graphs = FitCache.of(model).graphs
        if key in graphs:
            graphs.move_to_end(key)
            return graphs[key]
        try:
            graph = cls(forward, batch, settings, autocast)
        except Exception as error:  # noqa: BLE001 - any capture failure: the eager loop computes the same thing
            logger.warning_once(f"Running the fast loop without a CUDA graph: capturing it failed ({error}).")
            return None
        graphs[key] = graph
        while len(graphs) > MAX_CACHED_GRAPHS:
            graphs.popitem(last=False)
        return graph

    @torch.no_grad()
    def run(self, batch, mu, logvar, noise, noise_stream, settings, trace, finite_steps, deadline):
        """One fit: load the batch and the starting point, replay the step `settings.num_steps` times; returns the
        final `(mu, logvar)` (copies, not the graph's buffers) and the last step's `eps`."""
        _copy_batch(self.batch, batch)
        self.mu.copy_(mu)
        self.logvar.copy_(logvar)
        self.kl_weight.fill_(settings.kl_weight)
        for state in self.optimizer.state.values():
            for value in state.values():
                value.zero_()
        num_steps = settings.num_steps
        for step in range(num_steps):
            check_deadline(deadline, step, num_steps)
            if step > 0 and not settings.fixed_noise:
                noise = noise_stream.next()
            self.lr.fill_(fast_lr_at(step, settings))
            self.noise.copy_(noise)
            self._replay()
            trace[step].copy_(self.elbo)
            finite_steps[step].copy_(self.finite)
        return self.mu.detach().clone(), self.logvar.detach().clone(), noise


def _tensor_layout(batch: FitBatch) -> tuple:
    """Shapes and dtypes of every tensor a fast step reads from `batch` (None for absent ones)."""
    prefix = batch.prefix
    tensors = (batch.input_ids, batch.targets, batch.attention_mask, batch.position_ids, prefix.hidden_states,
               prefix.causal_mask, *prefix.position_embeddings)  # fmt: skip
    return tuple(None if t is None else (tuple(t.shape), t.dtype) for t in tensors)


def _static_copy(batch: FitBatch) -> FitBatch:
    def clone(tensor):
        return None if tensor is None else tensor.clone()

    prefix = batch.prefix.map(clone)
    return FitBatch(*(clone(t) for t in (batch.input_ids, batch.targets, batch.attention_mask, batch.position_ids)),
                    prefix, batch.prior)  # fmt: skip


def _copy_batch(static: FitBatch, batch: FitBatch) -> None:
    for target, source in zip(
        (static.input_ids, static.targets, static.attention_mask, static.position_ids),
        (batch.input_ids, batch.targets, batch.attention_mask, batch.position_ids),
    ):
        if target is not None:
            target.copy_(source)
    static.prefix.copy_(batch.prefix)


def smoothed_gain(trace: torch.Tensor, window: int) -> torch.Tensor:
    """ELBO gain per step from a trace of shape `(steps, rows)`: the mean of the last `window` values minus the mean of
    the `window` before them, over `window` steps (difference of window means: the single-sample estimates are
    noisy). Shape `(rows,)`; needs `steps >= 2 * window`."""
    recent = trace[-window:].mean(0)
    before = trace[-2 * window : -window].mean(0)
    return (recent - before) / window


def run_adaptive_fast_loop(
    model, batch, settings, generators, noise_stream, mu, logvar, noise, deadline=None
) -> FastLoopState:
    """The fast loop with per-row stopping (`settings.stop_tol`): a row stops once `smoothed_gain` of its per-token
    ELBO trace falls below `stop_tol` (after at least `max(min_steps, 2 * stop_window)` steps), and leaves the batch:
    the remaining rows continue in a smaller batch, with their Adam state. Host syncs at each check (evaluation
    only)."""
    batch_size, device = batch.input_ids.shape[0], batch.input_ids.device
    num_steps, window = settings.num_steps, settings.stop_window
    first_check = max(settings.min_steps, 2 * window)
    mu_out, logvar_out, noise_out = mu.clone(), logvar.clone(), noise.clone()
    steps_taken = torch.full((batch_size,), num_steps, dtype=torch.long, device=device)
    trace = torch.zeros(num_steps, batch_size, device=device)
    active = torch.arange(batch_size, device=device)
    row_generators_left, sub_batch, tokens = generators, batch, None
    forward = LowPrecisionWeights.for_fit(model, device)
    mu, logvar, optimizer, step_fn = _start_fit(forward, sub_batch, mu, logvar, settings)
    with torch.enable_grad():
        for step in range(num_steps):
            _begin_step(optimizer, step, settings, deadline)
            if step > 0 and not settings.fixed_noise:
                if isinstance(generators, list):  # per-row streams: stopped rows draw nothing
                    noise = standard_normal(mu.shape, row_generators_left, device)
                else:
                    noise = standard_normal((batch_size, *mu.shape[1:]), generators, device).index_select(0, active)
            try:
                elbo, finite = step_fn(noise)
            except NonFiniteLatentsError:
                finite = torch.tensor(False)
            if not bool(finite):
                _raise_non_finite_at(model, step, settings)
            trace[step, active] = elbo
            if tokens is None:
                tokens = step_fn.num_tokens.clamp(min=1).float()
            if not first_check <= step + 1 < num_steps:
                continue
            stop = smoothed_gain(trace[: step + 1].index_select(1, active), window) / tokens < settings.stop_tol
            if not bool(stop.any()):
                continue
            stopped, keep = active[stop], stop.logical_not().nonzero().squeeze(1)
            mu_out[stopped], logvar_out[stopped] = mu.detach()[stop], logvar.detach()[stop]
            noise_out[stopped] = noise[stop]
            steps_taken[stopped] = step + 1
            trace[step + 1 :, stopped] = trace[step, stopped]
            active = active.index_select(0, keep)
            if keep.numel() == 0:
                break
            tokens, noise = tokens.index_select(0, keep), noise.index_select(0, keep)
            if isinstance(generators, list):
                row_generators_left = [row_generators_left[i] for i in keep.tolist()]
            sub_batch = batch.select(active)
            mu, logvar, optimizer = compact_optimizer(optimizer, mu, logvar, keep, settings)
            step_fn = FastStep(forward, sub_batch, mu, logvar, optimizer, settings)
    if active.numel():
        mu_out[active], logvar_out[active], noise_out[active] = mu.detach(), logvar.detach(), noise
    return FastLoopState(
        mu_out, logvar_out, noise_out, list(trace.unbind(0)), batch, noise_stream, steps_taken, forward
    )


def compact_optimizer(optimizer, mu, logvar, keep, settings):
    """New leaf `(mu, logvar)` holding rows `keep`, and a fast optimizer carrying those rows' moments and step
    count."""
    new_params = [p.detach().index_select(0, keep).requires_grad_(True) for p in (mu, logvar)]
    new_optimizer = fast_optimizer(new_params, settings, settings.lr)
    for old, new in zip((mu, logvar), new_params):
        state = optimizer.state.get(old)
        if state:
            new_optimizer.state[new] = {
                key: (value.index_select(0, keep) if key != "step" else value.clone()) for key, value in state.items()
            }
    return new_params[0], new_params[1], new_optimizer


__all__ = [
    "CUDA_GRAPHS_ENV",
    "FastLoopState",
    "FastStep",
    "FastStepGraph",
    "FitCache",
    "FitBatch",
    "LowPrecisionWeights",
    "ModelCall",
    "check_deadline",
    "compact_optimizer",
    "compute_prefix",
    "cosine_fast_lr",
    "encoder_proposal",
    "fast_lr_at",
    "fast_optimizer",
    "relative_to_prior",
    "raise_non_finite",
    "run_adaptive_fast_loop",
    "run_fast_loop",
    "smoothed_gain",
]

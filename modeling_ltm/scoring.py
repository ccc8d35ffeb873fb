"""Scoring tokens given latents: next-token targets, positions that skip padding, the per-token NLL and the fast
loop's objective (the negative ELBO).

Units: `nll`, `kl` and the ELBO are in nats summed over one sequence's predicted tokens (all tokens but the first real
one, which is conditioned upon).

Imports only torch, transformers (its logger) and siblings (copied next to the weights for `trust_remote_code=True`).
"""

import os

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .priors import StandardNormalPrior


logger = logging.get_logger(__name__)

# How `token_nll` computes the per-token NLL: "native" is `F.cross_entropy` on float32 logits, "fused" the
# `_TokenNLL` function below (compiled with torch.compile on a GPU), "auto" fused on CUDA and native elsewhere.
TOKEN_NLL_ENV = "LTM_TOKEN_NLL"


def position_ids_from_attention_mask(
    attention_mask: torch.Tensor, past_length: int = 0, seq_length: int | None = None
) -> torch.LongTensor:
    """Positions that skip padding, so a left-padded row gets the positions it would have alone: `(batch, seq)`.

    `attention_mask` covers the cached tokens and the new ones: shape `(batch, past_length + seq_length)`;
    `seq_length=None` keeps every position after the cached ones.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    end = None if seq_length is None else past_length + seq_length
    return position_ids[:, past_length:end]


def next_token_targets(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, labels: torch.LongTensor | None = None
) -> torch.LongTensor:
    """Unshifted targets with `-100` wherever no prediction is scored (padding; where `labels` says -100)."""
    targets = input_ids.clone() if labels is None else labels.clone()
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask == 0, -100)
    return targets


def _nll_and_logsumexp(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(nll, logsumexp)` of `logits` `(N, V)` at `targets` `(N,)` (-100: not scored, NLL 0), both float32 `(N,)`."""
    logits = logits.float()
    logsumexp = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != -100, logsumexp - picked, 0.0), logsumexp


def _nll_logits_grad(
    logits: torch.Tensor, targets: torch.Tensor, logsumexp: torch.Tensor, grad_nll: torch.Tensor
) -> torch.Tensor:
    """`d (grad_nll . nll) / d logits` = `(softmax(logits) - onehot(targets)) * grad_nll`, in the logits' dtype."""
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    onehot = (targets.unsqueeze(-1) == vocab).float()
    weight = torch.where(targets != -100, grad_nll, 0.0).unsqueeze(-1)
    return ((torch.exp(logits.float() - logsumexp.unsqueeze(-1)) - onehot) * weight).to(logits.dtype)


class _Kernels:
    """`_nll_and_logsumexp` and `_nll_logits_grad` as run on a GPU: compiled by torch.compile on first use, so each is
    one or two fused kernels that read the logits once (instead of a float32 copy of them, a log-softmax of that
    copy and its gradient: ~3x the memory traffic). If compiling fails, the plain functions, once, with a warning."""

    forward = backward = None

    @classmethod
    def get(cls):
        if cls.forward is None:
            try:
                cls.forward = torch.compile(_nll_and_logsumexp)
                cls.backward = torch.compile(_nll_logits_grad)
            except Exception as error:  # noqa: BLE001 - any compile failure falls back to the same maths, eagerly
                logger.warning("torch.compile is unavailable for the fused token NLL (%s); running it eagerly.", error)
                cls.forward, cls.backward = _nll_and_logsumexp, _nll_logits_grad
        return cls.forward, cls.backward

    @classmethod
    def disable(cls, error: Exception) -> None:
        logger.warning("The compiled token NLL failed (%s); running it eagerly from now on.", error)
        cls.forward, cls.backward = _nll_and_logsumexp, _nll_logits_grad


def _call_kernel(which: int, *args):
    try:
        return _Kernels.get()[which](*args)
    except Exception as error:  # noqa: BLE001 - a backend failing at run time (no compiler, ...): same maths, eagerly
        if _Kernels.forward is _nll_and_logsumexp:
            raise
        _Kernels.disable(error)
        return _Kernels.get()[which](*args)


class _TokenNLL(torch.autograd.Function):
    """Per-token NLL `(N,)` in float32 from logits `(N, V)` in any float dtype. Saves the logits themselves (no float32
    copy) and recomputes the softmax in the backward."""

    @staticmethod
    def forward(ctx, logits, targets):
        nll, logsumexp = _call_kernel(0, logits, targets)
        ctx.save_for_backward(logits, targets, logsumexp)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        logits, targets, logsumexp = ctx.saved_tensors
        return _call_kernel(1, logits, targets, logsumexp, grad_nll.float()), None


def token_nll_mode(device: torch.device) -> str:
    """`"fused"` or `"native"`: what `token_nll` runs on `device` (the `LTM_TOKEN_NLL` environment variable,
    `auto` by default: fused on CUDA, native elsewhere, where `F.cross_entropy` is as fast and bit-stable)."""
    mode = os.environ.get(TOKEN_NLL_ENV, "auto")
    if mode not in ("auto", "native", "fused"):
        raise ValueError(f"{TOKEN_NLL_ENV}={mode!r}: use auto, native or fused.")
    if mode == "auto":
        return "fused" if device.type == "cuda" else "native"
    return mode


def token_nll(logits: torch.Tensor, targets: torch.LongTensor) -> torch.Tensor:
    """`-log softmax(logits)[target]` per token in nats, float32, shape `(N,)`; 0 where `targets` is -100.

    `logits` `(N, V)` in any float dtype (padded vocabulary columns at -inf carry no probability); the softmax is
    taken in float32 either way.
    """
    if token_nll_mode(logits.device) == "fused":
        return _TokenNLL.apply(logits, targets)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")


def sequence_nll(
    model,
    input_ids: torch.LongTensor,
    latents: torch.Tensor,
    targets: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    prefix=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`-log p(x|z)` in nats per sequence, shape `(batch,)`, and the number of scored tokens, shape `(batch,)`.

    Token `t + 1` is scored from positions `<= t` when `targets[:, t + 1] != -100` and position `t` is not padding.
    `prefix` (an `LTMPrefix` of these rows, from `model.model.compute_prefix`) skips the latent-independent start of
    the forward; same numbers. `model` is an `LTMForCausalLM` or any callable with its signature.
    """
    seq_length = input_ids.shape[1]
    # Logits of the first T - 1 positions only, contiguous: slicing (B, T, V) logits afterwards would cost a copy
    # of the largest activation forward and a zero-filled (B, T, V) gradient backward.
    token_inputs = (
        dict(attention_mask=attention_mask, position_ids=position_ids) if prefix is None else dict(prefix=prefix)
    )
    logits = model(
        input_ids=input_ids,
        **token_inputs,
        latents=latents,
        use_cache=False,
        logits_to_keep=torch.arange(seq_length - 1, device=input_ids.device),
    ).logits  # (B, T-1, V)
    shift_targets = targets[:, 1:]
    if attention_mask is not None:
        shift_targets = shift_targets.masked_fill(attention_mask[:, :-1] == 0, -100)
    nll = token_nll(logits.reshape(-1, logits.shape[-1]), shift_targets.reshape(-1))
    return nll.view(shift_targets.shape).sum(-1), (shift_targets != -100).sum(-1)


def negative_elbo(
    model,
    input_ids: torch.LongTensor,
    targets: torch.LongTensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    noise: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    prefix=None,
    kl_weight: float | torch.Tensor = 1.0,
    free_bits: float = 0.0,
    prior=None,
    loss_reduction: str = "per_token",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fast loop's objective and its parts at `z = mu + exp(logvar / 2) * noise`.

    Returns `(loss, nll, kl, num_tokens)`: `loss` is the scalar `sum_i (nll_i + kl_weight * kl'_i) / num_tokens_i`
    (`loss_reduction="per_token"`), so each sequence's `(mu_i, logvar_i)` gets the gradient of its own per-token
    objective, whatever the batch; or `sum_i (nll_i + kl_weight * kl'_i)` (`"sum"`: the paper's code, NLL summed
    over tokens and sequences plus the summed KL), the same gradient times `num_tokens_i`.
    With the defaults (`kl_weight=1`, `free_bits=0`) `kl'` is the KL and the loss is the negative ELBO.
    `prefix`: as in [`sequence_nll`].

    Training-only knobs (a bound is always evaluated at `kl_weight=1`, `free_bits=0`):
        kl_weight: beta of a KL-weighted objective (0 = the NLL alone; warm-up schedules move it from 0 to 1); a
            float or a 0-d tensor (what a CUDA graph of the fast step reads).
        free_bits: nats per latent dimension *per sequence* that cost nothing: `kl'_i = sum_d max(kl_id, free_bits)`,
            so a dimension whose KL is below the floor gets gradients from the NLL only (Kingma et al., 2016, with
            one group per dimension of a local posterior).

    `prior` (modeling_ltm/priors.py; default `N(0, I)`) is `p(z)`. The returned `kl` is always the true
    `KL(q || p)` in nats per sequence, shape `(batch,)`: closed form for a Gaussian prior, for a flow prior the
    single-sample estimate at this `z` (unbiased).
    """
    if prior is None:
        prior = StandardNormalPrior(mu.shape[1:])
    z = mu + torch.exp(0.5 * logvar) * noise
    nll, num_tokens = sequence_nll(model, input_ids, z, targets, attention_mask, position_ids, prefix)
    kl = prior.kl(mu, logvar, z)
    penalty = kl
    if free_bits > 0:
        penalty = prior.kl_per_dimension(mu, logvar).clamp(min=free_bits).sum(-1)
    objective = nll + kl_weight * penalty
    if loss_reduction == "per_token":
        objective = objective / num_tokens.clamp(min=1)
    loss = objective.sum()
    return loss, nll, kl, num_tokens


__all__ = [
    "negative_elbo",
    "next_token_targets",
    "position_ids_from_attention_mask",
    "sequence_nll",
    "token_nll",
    "token_nll_mode",
]

"""Time and memory budgets of the `ltm` commands: the limits a flag is checked against before any work starts.

A flag beyond its limit is an error that names the flag, the value, the limit and what to do (`ValueError`; the
commands print it as one line with exit code 2), instead of a run that goes on until a timeout or the out-of-memory
killer ends it.

- `MAX_INFERENCE_STEPS` bounds the fast steps of one posterior fit (each costs a forward and a backward pass):
  `ltm generate --num-inference-steps`, `ltm eval --model_args num_inference_steps=`, `ltm train
  --num_inference_steps / --num_inference_steps_end / --eval_inference_steps` and the model config's defaults.
- `MAX_IW_SAMPLES` bounds the samples K of an importance-weighted bound (each costs a forward pass, and the K draws
  of every sequence are held at once): `ltm train --eval_iw_samples`, `ltm eval --model_args iw_samples=`.
- Memory: `estimate_bytes` is a rough upper estimate of what a batch of `rows` sequences of `length` tokens needs
  (logits and their softmax, activations for one backward pass, the KV cache, the latents), compared with
  `memory_budget_bytes(device)`: `$LTM_MEMORY_BUDGET_GB` when set, else the GPU's memory, else this machine's RAM.
  Checked for `ltm generate` (prompts x return sequences x beams, or `--num-samples`), the training and evaluation
  batch sizes of `ltm train`, and `ltm eval`'s `--batch_size`. With importance samples (`iw_samples=K`), the estimate
  adds what the bound holds at once: the `K x rows` latent draws (`IW_LATENT_COPIES` copies) and one chunk of the
  scoring forwards (`max(rows, IW_TOKENS_PER_FORWARD // length)` rows, `inference.default_max_rows`).
  `LTM_MEMORY_BUDGET_GB=inf` means no memory budget; NaN, 0 or a negative number is an error naming the variable.
"""

from __future__ import annotations

import math
import os

from ..configuration_ltm import is_integer


MAX_INFERENCE_STEPS = 10_000
MAX_IW_SAMPLES = 4_096
MEMORY_BUDGET_ENV = "LTM_MEMORY_BUDGET_GB"
# Fallback budget when the machine's memory cannot be read.
DEFAULT_MEMORY_BUDGET_BYTES = 16 * 2**30
_GIB = 2**30
# Copies of the `K x rows` latent draws the importance-weighted bound holds at its peak (the draws, their stack, the
# scaled noise and `z`; on a GPU the pre-drawn noise too): measured ~3.3 on a CPU.
IW_LATENT_COPIES = 5
# Tokens of one batched scoring forward of the importance samples (`inference.default_max_rows`' `max_tokens`).
IW_TOKENS_PER_FORWARD = 16384


def _named(flag: str, value) -> str:
    """`--flag value`, or `key=value` for a model_args key."""
    shown = value if isinstance(value, str) else repr(value)
    return f"{flag}{shown}" if flag.endswith("=") else f"{flag} {shown}"


def _gb(size: float) -> str:
    return f"{size / _GIB:,.1f}" if size >= 0.1 * _GIB else f"{size / _GIB:.3f}"


def _check_at_most(flag: str, value: int | None, limit: int, why: str) -> None:
    """`ValueError` naming the flag, the value, the limit and `why`, unless `value` is None or an integer in
    `[0, limit]`."""
    if value is not None and not (is_integer(value) and 0 <= value <= limit):
        raise ValueError(f"{_named(flag, value)} is outside [0, {limit:,}]: {why}")


def check_inference_steps(flag: str, value: int | None) -> None:
    """`ValueError` unless `value` is None or an integer in `[0, MAX_INFERENCE_STEPS]`."""
    _check_at_most(
        flag, value, MAX_INFERENCE_STEPS, "each fast step of a posterior fit costs a forward and a backward pass (the "
        f"paper uses 16-64); pass at most {MAX_INFERENCE_STEPS:,}."
    )  # fmt: skip


def check_iw_samples(flag: str, value: int | None) -> None:
    """`ValueError` unless `value` is None or an integer in `[0, MAX_IW_SAMPLES]`."""
    _check_at_most(
        flag, value, MAX_IW_SAMPLES, "every sample of the importance-weighted bound costs a forward pass and its draws "
        f"are held in memory at once; pass at most {MAX_IW_SAMPLES:,} (16-64 already tighten the bound)."
    )  # fmt: skip


def memory_budget_bytes(device=None) -> tuple[int | float, str]:
    """`(bytes, what it is)`: `$LTM_MEMORY_BUDGET_GB` (`inf`: no budget, `math.inf`), else the CUDA device's memory,
    else the machine's RAM."""
    value = os.environ.get(MEMORY_BUDGET_ENV)
    if value:
        try:
            budget = float(value)
        except ValueError:
            raise ValueError(
                f"{MEMORY_BUDGET_ENV}={value!r} is not a number of GB; set e.g. {MEMORY_BUDGET_ENV}=16 (or inf for no "
                "memory budget)."
            ) from None
        if not budget > 0:  # NaN, 0, negative
            raise ValueError(
                f"{MEMORY_BUDGET_ENV}={value!r} must be a number of GB > 0; set e.g. {MEMORY_BUDGET_ENV}=16 (or inf "
                "for no memory budget), or unset it to use the device's memory."
            )
        if math.isinf(budget):
            return math.inf, f"{MEMORY_BUDGET_ENV}={value} (no budget)"
        return int(budget * _GIB), f"{MEMORY_BUDGET_ENV}={value}"
    device = str(device or "cpu")
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = torch.device(device).index
            index = torch.cuda.current_device() if index is None else index
            return torch.cuda.get_device_properties(index).total_memory, f"the memory of {device}"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
    except (AttributeError, ValueError, OSError):  # not POSIX
        return DEFAULT_MEMORY_BUDGET_BYTES, "the default budget"


def estimate_bytes(
    config, rows: int, length: int, backward: bool = True, half_precision: bool = False, iw_samples: int = 0
) -> int:
    """A rough upper estimate of the memory of one batch of `rows` sequences of `length` tokens through `config`'s
    model: logits, log-probabilities and (with `backward`) their gradient (float32, plus a bf16/fp16 copy under
    `half_precision`); the activations of every layer kept for the backward pass (~24 values per hidden unit and
    token, in the compute precision); the KV cache; the latents and their optimiser state.

    With `iw_samples = K > 0` (an importance-weighted bound after the fit), also the `K x rows` latent draws it holds
    at once (`IW_LATENT_COPIES` float32 copies) and the larger of the fit and one scoring forward of
    `max(rows, IW_TOKENS_PER_FORWARD // length)` rows without a backward pass."""
    fit = _batch_bytes(config, rows, length, backward, half_precision)
    if not iw_samples:
        return fit
    latents = _latent_values(config)
    chunk_rows = max(rows, IW_TOKENS_PER_FORWARD // max(length, 1))
    scoring = _batch_bytes(config, chunk_rows, length, False, half_precision)
    return max(fit, scoring) + iw_samples * rows * latents * 4 * IW_LATENT_COPIES


def _latent_values(config) -> int:
    latents = 1
    for size in getattr(config, "latent_shape", ()):
        latents *= size
    return latents


def _batch_bytes(config, rows: int, length: int, backward: bool, half_precision: bool) -> int:
    vocab = config.vocab_size
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    value_bytes = 2 if half_precision else 4
    latents = _latent_values(config)
    logits = vocab * ((3 if backward else 2) * 4 + (2 if half_precision else 0))
    activations = (24 if backward else 4) * hidden * layers * value_bytes
    cache = 2 * layers * heads * head_dim * value_bytes
    return rows * (length * (logits + activations + cache) + 8 * latents * 4)


def check_memory(
    flag: str,
    value,
    config,
    rows: int,
    length: int,
    device=None,
    backward: bool = True,
    half_precision: bool = False,
    iw_samples: int = 0,
    iw_flag: str | None = None,
) -> None:
    """`ValueError` naming `flag` (and `iw_flag`, the flag of `iw_samples`) when `estimate_bytes(config, rows,
    length, ...)` exceeds the memory budget."""
    needed = estimate_bytes(
        config, rows, length, backward=backward, half_precision=half_precision, iw_samples=iw_samples
    )
    budget, what = memory_budget_bytes(device)
    if needed > budget:
        samples, lower = "", f"lower {flag} (run several smaller batches)"
        if iw_samples:
            shown = _named(iw_flag, iw_samples) if iw_flag else f"{iw_samples:,} importance samples"
            samples = f" with {shown} ({iw_samples:,} latent draws per sequence)"
            lower = f"lower {flag} or {iw_flag or 'the importance samples'}"
        raise ValueError(
            f"{_named(flag, value)}: {rows:,} sequences of {length:,} tokens{samples} need about "
            f"{_gb(needed)} GB, more than {what} ({_gb(budget)} GB); {lower}, or set "
            f"{MEMORY_BUDGET_ENV} if you know better."
        )


__all__ = [
    "IW_LATENT_COPIES",
    "IW_TOKENS_PER_FORWARD",
    "MAX_INFERENCE_STEPS",
    "MAX_IW_SAMPLES",
    "MEMORY_BUDGET_ENV",
    "check_inference_steps",
    "check_iw_samples",
    "check_memory",
    "estimate_bytes",
    "memory_budget_bytes",
]

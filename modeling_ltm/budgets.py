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
  batch sizes of `ltm train`, and `ltm eval`'s `--batch_size`.
"""

from __future__ import annotations

import os


MAX_INFERENCE_STEPS = 10_000
MAX_IW_SAMPLES = 4_096
MEMORY_BUDGET_ENV = "LTM_MEMORY_BUDGET_GB"
# Fallback budget when the machine's memory cannot be read.
DEFAULT_MEMORY_BUDGET_BYTES = 16 * 2**30
_GIB = 2**30


def _named(flag: str, value) -> str:
    """`--flag value`, or `key=value` for a model_args key."""
    shown = value if isinstance(value, str) else repr(value)
    return f"{flag}{shown}" if flag.endswith("=") else f"{flag} {shown}"


def check_inference_steps(flag: str, value: int | None) -> None:
    """`ValueError` unless `value` is None or an integer in `[0, MAX_INFERENCE_STEPS]`."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INFERENCE_STEPS:
        raise ValueError(
            f"{_named(flag, value)} is outside [0, {MAX_INFERENCE_STEPS:,}]: each fast step of a posterior fit costs "
            f"a forward and a backward pass (the paper uses 16-64); pass at most {MAX_INFERENCE_STEPS:,}."
        )


def check_iw_samples(flag: str, value: int | None) -> None:
    """`ValueError` unless `value` is None or an integer in `[0, MAX_IW_SAMPLES]`."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_IW_SAMPLES:
        raise ValueError(
            f"{_named(flag, value)} is outside [0, {MAX_IW_SAMPLES:,}]: every sample of the importance-weighted bound "
            f"costs a forward pass and its draws are held in memory at once; pass at most {MAX_IW_SAMPLES:,} (16-64 "
            "already tighten the bound)."
        )


def memory_budget_bytes(device=None) -> tuple[int, str]:
    """`(bytes, what it is)`: `$LTM_MEMORY_BUDGET_GB`, else the CUDA device's memory, else the machine's RAM."""
    value = os.environ.get(MEMORY_BUDGET_ENV)
    if value:
        try:
            budget = float(value)
        except ValueError:
            raise ValueError(f"{MEMORY_BUDGET_ENV}={value!r} is not a number of GB; set e.g. {MEMORY_BUDGET_ENV}=16.")
        if not budget > 0:
            raise ValueError(f"{MEMORY_BUDGET_ENV}={value!r} must be > 0 GB.")
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


def estimate_bytes(config, rows: int, length: int, backward: bool = True, half_precision: bool = False) -> int:
    """A rough upper estimate of the memory of one batch of `rows` sequences of `length` tokens through `config`'s
    model: logits, log-probabilities and (with `backward`) their gradient (float32, plus a bf16/fp16 copy under
    `half_precision`); the activations of every layer kept for the backward pass (~24 values per hidden unit and
    token, in the compute precision); the KV cache; the latents and their optimiser state."""
    vocab = config.vocab_size
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    value_bytes = 2 if half_precision else 4
    latents = 1
    for size in getattr(config, "latent_shape", ()):
        latents *= size
    logits = vocab * ((3 if backward else 2) * 4 + (2 if half_precision else 0))
    activations = (24 if backward else 4) * hidden * layers * value_bytes
    cache = 2 * layers * heads * head_dim * value_bytes
    return rows * (length * (logits + activations + cache) + 8 * latents * 4)


def check_memory(
    flag: str, value, config, rows: int, length: int, device=None, backward: bool = True, half_precision: bool = False
) -> None:
    """`ValueError` naming `flag` when `estimate_bytes(config, rows, length, ...)` exceeds the memory budget."""
    needed = estimate_bytes(config, rows, length, backward=backward, half_precision=half_precision)
    budget, what = memory_budget_bytes(device)
    if needed > budget:
        raise ValueError(
            f"{_named(flag, value)}: {rows:,} sequences of {length:,} tokens need about {needed / _GIB:,.1f} GB, "
            f"more than {what} ({budget / _GIB:,.1f} GB); lower {flag} (run several smaller batches), or set "
            f"{MEMORY_BUDGET_ENV} if you know better."
        )


__all__ = [
    "MAX_INFERENCE_STEPS",
    "MAX_IW_SAMPLES",
    "MEMORY_BUDGET_ENV",
    "check_inference_steps",
    "check_iw_samples",
    "check_memory",
    "estimate_bytes",
    "memory_budget_bytes",
]

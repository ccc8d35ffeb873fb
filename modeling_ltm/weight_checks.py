"""What the fitting code needs to know about a model it is handed: the bare `LTMForCausalLM` inside a DDP/PEFT wrapper,
whether FSDP2 shards it, its posterior encoder and its prior over the latents, and whether its weights are finite.

Imports only torch, transformers and siblings (copied next to the weights for `trust_remote_code=True`).
"""

import torch

from .errors import NonFiniteWeightsError
from .priors import StandardNormalPrior


def bare_ltm(model):
    """The `LTMForCausalLM` inside `model` (bare, or wrapped by DDP, `torch.compile` or PEFT).

    accelerate's `extract_model_from_parallel` does the unwrapping when accelerate is installed (it also knows
    DeepSpeed's and FSDP1's wrappers); the fallback, for remote code on a machine without accelerate, unwraps the
    `.module` / `._orig_mod` attributes those wrappers have. PEFT's wrapper is not a parallel wrapper: unwrapped here.
    """
    try:
        from accelerate.utils import extract_model_from_parallel
    except ImportError:  # remote code without accelerate
        model = getattr(model, "_orig_mod", model)
        model = getattr(model, "module", model)
    else:
        model = extract_model_from_parallel(model, keep_torch_compile=False)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_fsdp_sharded(model) -> bool:
    """Whether FSDP2 (`fully_shard`) shards `model`: its parameters are gathered only by the hooks of a full call."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed support
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


def posterior_encoder_of(model):
    """The amortized `LTMPosteriorEncoder` of an `LTMForCausalLM` (bare, or wrapped by DDP or PEFT), or None when
    `config.posterior_encoder_size = 0`."""
    return getattr(getattr(bare_ltm(model), "model", None), "posterior_encoder", None)


def latent_prior_of(model):
    """The prior over the latents of an `LTMForCausalLM` (bare, or wrapped by DDP or PEFT) or an `LTMModel`: its learned
    prior module (`config.prior_type` not `"standard_normal"`), else a [`StandardNormalPrior`] of its latent shape."""
    model = bare_ltm(model)
    prior = getattr(getattr(model, "model", model), "latent_prior", None)
    return prior if prior is not None else StandardNormalPrior(model.config.latent_shape)


def check_finite_weights(model, action: str = "using it", source: str | None = None) -> None:
    """Raise `NonFiniteWeightsError` naming the first parameter that holds NaN or inf.

    Args:
        model: a module (its `named_parameters()`, in order) or an iterable of `(name, tensor)` pairs (e.g. read
            from a `.safetensors` file one tensor at a time).
        action: what is about to happen ("generating", "exporting", "pushing"), for the message.
        source: the folder or file the weights came from, for the message.

    Fast path: one float32 sum per tensor, read back with one host sync (a sum is finite when every value is, NaN
    and inf propagate); only when some sum is not finite are the bad values counted, to name the parameter.
    """
    named = model.named_parameters() if isinstance(model, torch.nn.Module) else model
    names, tensors, sums = [], [], []
    for name, tensor in named:
        if tensor.is_floating_point() and tensor.numel() > 0:
            device = sums[0].device if sums else tensor.device
            names.append((name, tensor.numel()))
            tensors.append(tensor.detach())
            sums.append(tensors[-1].sum(dtype=torch.float32).to(device))
    if not sums or bool(torch.isfinite(torch.stack(sums)).all()):
        return
    # A float32 sum of finite values can also overflow: count the bad values themselves.
    counts = torch.stack([(~torch.isfinite(tensor)).sum().to(sums[0].device) for tensor in tensors])
    if not bool(counts.any()):
        return
    bad_index = counts.nonzero()[:, 0]
    name, numel = names[int(bad_index[0])]
    where = f" in {source}" if source else ""
    raise NonFiniteWeightsError(
        f"The model's weights{where} are not finite: `{name}` holds {int(counts[bad_index[0]])} NaN/inf values of "
        f"{numel} (first of {len(bad_index)} such parameters), found before {action}. The training run diverged or "
        "the file is damaged: use an earlier checkpoint, or retrain with a lower learning rate."
    )


__all__ = [
    "NonFiniteWeightsError",
    "bare_ltm",
    "check_finite_weights",
    "is_fsdp_sharded",
    "latent_prior_of",
    "posterior_encoder_of",
]

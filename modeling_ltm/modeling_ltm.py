"""PyTorch Latent-Thought Language Model (LTM, arXiv:2502.01567).

A pre-norm Transformer decoder in which every layer, after causal self-attention, cross-attends from the tokens to
that layer's latent thought vectors `z_l`. The latents of a sequence are not computed by the network: they are
fitted per sequence by posterior inference (see `inference.py` and `LTMForCausalLM.infer_latents`) or drawn from
the prior `N(0, I)`.

This file imports only torch, transformers and its siblings (relative imports), so `save_pretrained` can copy it
next to the weights for `trust_remote_code=True` loading.
"""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithCrossAttentions
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.utils import auto_docstring, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_ltm import LTMConfig
from .errors import NonFiniteLatentsError
from .generation_ltm import LTMGenerationConfig, LTMGenerationMixin, latent_cache_like
from .inference import (
    PosteriorEvaluation,
    PosteriorOutput,
    evaluate_posterior,
    fit_posterior,
    importance_weighted_bound,
)
from .priors import DiagonalGaussianPrior, FlowPrior, build_prior
from .scoring import position_ids_from_attention_mask


logger = logging.get_logger(__name__)

# Logged once per process (`logger.warning_once`) when `z` is not fitted although the caller may think it is: generic
# paths (lm-eval's `--model hf`, plain `transformers.Trainer`) call `forward` without `latents`. Our own calls pass
# `latents` (the fit, `generate`, `LTMTrainer`, `ltm eval`) or decode from the latents' cache; a caller who means the
# prior's mean passes it explicitly, `latents=model.prior_mean_latents(batch_size)`, and is not warned.
NO_LATENTS_WARNING = (
    "LTM forward() got no `latents` (and no cached ones): it runs at z = the prior's mean, which is neither a fitted "
    "posterior nor a bound on log p(x). Generic paths do this (lm-eval `--model hf`, plain `transformers.Trainer`). "
    "Score an LTM with `ltm eval` / lm-eval `--model ltm` (fits z, reports bounds), train it with `LTMTrainer` (the "
    "dual-rate update), fit z with `model.infer_latents(...)`; to use the prior's mean on purpose, pass "
    "`latents=model.prior_mean_latents(batch_size)`."
)
OUTPUT_ATTENTIONS_FALLBACK_WARNING = (
    "`output_attentions=True` needs the attention weights, which the {!r} attention does not form: this forward runs "
    'the eager attention. Load the model with `attn_implementation="eager"` to make that the default.'
)
TRAINING_WITHOUT_LATENTS_WARNING = (
    "LTMForCausalLM is training (labels given, train mode) without `latents`: this trains a plain LM at z = the "
    "prior's mean, not the LTM's dual-rate update (plain `transformers.Trainer` does this). Train with "
    "`modeling_ltm.LTMTrainer` (fits z per sequence, then updates the decoder), or pass the latents yourself."
)


# `LTMModel` returns transformers' own output classes: `last_hidden_state`, the `cache` (`EncoderDecoderCache`: the
# tokens' self-attention keys/values and the latents' cross-attention keys/values, computed once per sequence), and
# `hidden_states` / `attentions` / `cross_attentions` when asked for (`output_hidden_states=True`,
# `output_attentions=True`; recorded by transformers' `capture_outputs` hooks, see `LTMPreTrainedModel`).
LTMModelOutput = BaseModelOutputWithPastAndCrossAttentions
LTMCausalLMOutput = CausalLMOutputWithCrossAttentions


class LTMRMSNorm(nn.Module):
    """Root-mean-square layer norm over the last dimension, computed in float32, with a learned scale."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # `x * rsqrt(mean(x^2) + eps)` in float32 in one op with the scale (a decoding step is a chain of small
        # kernels, where each op's overhead counts; bit-identical to scaling afterwards, forward and backward), else
        # normalized in float32 and scaled in the input's dtype, as Llama's RMSNorm does.
        input_dtype, weight = hidden_states.dtype, self.weight
        if input_dtype == torch.float32 and weight.dtype == torch.float32:
            return nn.functional.rms_norm(hidden_states, weight.shape, weight, self.variance_epsilon)
        normed = nn.functional.rms_norm(hidden_states.float(), weight.shape, eps=self.variance_epsilon)
        return weight * normed.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LTMRotaryEmbedding(nn.Module):
    """Rotary position embeddings, shared by the self-attention (token positions) and the cross-attention (token
    positions for queries, latent positions for keys). The inverse frequencies come from `config.rope_parameters` as
    in Llama: the default RoPE, or a static scaling type of transformers' `ROPE_INIT_FUNCTIONS` ("dynamic" is refused:
    see `LTMConfig.rope_parameters`). Called as Llama's rotary module is, it returns Llama's `(cos, sin)`,
    which [`apply_rotary_pos_emb`] takes."""

    def __init__(self, config: LTMConfig):
        super().__init__()
        config.validate_rope_parameters()  # also a "dynamic" written into the dict after the config was built
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: LTMConfig, **kwargs) -> tuple[torch.Tensor, float]:
        """Llama's default RoPE: `1 / rope_theta ** (arange(0, head_dim, 2) / head_dim)`, no scaling."""
        dim = config.head_dim
        base = config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`position_ids` of shape `(batch, seq)` or `(1, seq)` → `cos`, `sin` of shape `(batch or 1, seq, head_dim)`
        in `x`'s dtype, as transformers' rotary modules return them (Llama's `cat((freqs, freqs))` layout)."""
        freqs = position_ids[:, :, None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return torch.cat((cos, cos), dim=-1).to(dtype=x.dtype), torch.cat((sin, sin), dim=-1).to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input (copied from `transformers.models.llama.modeling_llama`)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    """Rotate `x` of shape `(batch, heads, seq, head_dim)` by [`LTMRotaryEmbedding`]'s `cos`, `sin` of shape
    `(batch or 1, seq, head_dim)`: Llama's `x * cos + rotate_half(x) * sin`, for one tensor (copied from
    `transformers.models.gemma3n.modeling_gemma3n`): the cross-attention rotates its queries and keys at different
    positions (the tokens', the latents')."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (x * cos) + (rotate_half(x) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """`(batch, kv_heads, seq, head_dim)` → `(batch, kv_heads * n_rep, seq, head_dim)`."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key_states.shape[-2]]
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


def _attention_interface(config: LTMConfig, kwargs: dict) -> Callable:
    """The attention function of `config._attn_implementation`, as Llama's attention looks it up; the eager one when
    the forward was asked for `output_attentions`, which only the eager attention forms (see
    `LTMModel._attention_config`)."""
    implementation = "eager" if kwargs.get("output_attentions") else config._attn_implementation
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


class LTMMLP(nn.Module):
    """Gated feed-forward block (SwiGLU with the default `hidden_act="silu"`): `down(act(gate(x)) * up(x))`,
    `(..., hidden_size)` → `(..., hidden_size)`."""

    def __init__(self, config: LTMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LTMAttentionProjections(nn.Module):
    """What self- and cross-attention share: the attributes the attention interface reads (`head_dim`, `scaling`,
    `num_key_value_groups`, `is_causal`, ...) and the query/key/value/output projections, keys and values projected
    from `key_value_size` features (the hidden states, or a latent vector)."""

    is_causal = False

    def __init__(self, config: LTMConfig, layer_idx: int, key_value_size: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.dropout
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(key_value_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(key_value_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)


class LTMSelfAttention(LTMAttentionProjections):
    """Causal (optionally sliding-window) multi-head self-attention with grouped-query key/value heads."""

    is_causal = True

    def __init__(self, config: LTMConfig, layer_idx: int):
        super().__init__(config, layer_idx, key_value_size=config.hidden_size)
        self.sliding_window = config.sliding_window

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the output `(batch, seq, hidden_size)` and, from the eager attention only, the attention weights
        `(batch, num_attention_heads, seq, past_length + seq)` (else `None`)."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nh, T, hd)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nkv, T, hd)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states = apply_rotary_pos_emb(query_states, cos, sin)
        key_states = apply_rotary_pos_emb(key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
        attention_interface: Callable = _attention_interface(self.config, kwargs)
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights


class LTMCrossAttention(LTMAttentionProjections):
    """Attention from the tokens to this layer's latent vectors `z_l` (no mask: every token sees every latent), through
    the model's attention interface (eager, sdpa, flash or flex), as an encoder-decoder model's cross-attention.

    Queries carry the tokens' RoPE positions, keys the latents' positions (spread evenly over the context). With an
    `EncoderDecoderCache`, the first call projects the latents and stores their keys (rotated) and values in the
    cross-attention cache, in the standard layout `(batch, num_key_value_heads, n_latents_per_layer, head_dim)`; later
    calls (decoding steps) read them from there.
    """

    def __init__(self, config: LTMConfig, layer_idx: int):
        super().__init__(config, layer_idx, key_value_size=config.latent_dim)

    def project_latents(
        self, latents: torch.Tensor, latent_position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`latents` of shape `(batch, n_latents, latent_dim)` → keys, values of shape `(batch, nkv, n_latents, hd)`.

        Latents are cast to the projection's dtype, so a bf16 model accepts the float32 latents that posterior
        inference returns (gradients still flow back to them in float32); an enclosing autocast applies on top.
        """
        weight_dtype = self.k_proj.weight.dtype
        if weight_dtype.is_floating_point and latents.dtype != weight_dtype:
            latents = latents.to(weight_dtype)
        kv_shape = (*latents.shape[:-1], -1, self.head_dim)
        key_states = self.k_proj(latents).view(kv_shape).transpose(1, 2)
        value_states = self.v_proj(latents).view(kv_shape).transpose(1, 2)
        cos, sin = latent_position_embeddings
        return apply_rotary_pos_emb(key_states, cos, sin), value_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        latents: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        latent_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        cache: EncoderDecoderCache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the output `(batch, seq, hidden_size)` and, from the eager attention only, the attention weights
        over the latents `(batch, num_attention_heads, seq, n_latents_per_layer)` (else `None`)."""
        input_shape = hidden_states.shape[:-1]
        query_states = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query_states = apply_rotary_pos_emb(query_states, cos, sin)

        if cache is not None and cache.is_updated.get(self.layer_idx, False):  # decoding: the latents are cached
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            key_states, value_states = layer.keys, layer.values
        else:
            key_states, value_states = self.project_latents(latents, latent_position_embeddings)
            if cache is not None:
                key_states, value_states = cache.cross_attention_cache.update(key_states, value_states, self.layer_idx)
                cache.is_updated[self.layer_idx] = True

        attention_interface: Callable = _attention_interface(self.config, kwargs)
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights


class LTMDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: causal self-attention → cross-attention to `z_l` → SwiGLU MLP, each with a residual."""

    def __init__(self, config: LTMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LTMSelfAttention(config, layer_idx)
        self.cross_attn = LTMCrossAttention(config, layer_idx)
        self.mlp = LTMMLP(config)
        self.input_layernorm = LTMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_layernorm = LTMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LTMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.residual_dropout = config.dropout
        # GPT-2's depth-scaled initial std for the projections the config names, read by `_init_weights` (marked on
        # the layers: transformers skips `_init_weights` on modules without parameters of their own).
        scaled_std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
        for name in config.scaled_init_projections or ():
            for sublayer in (self.self_attn, self.cross_attn, self.mlp):
                if hasattr(sublayer, name):
                    getattr(sublayer, name).init_std = scaled_std

    def forward(
        self,
        hidden_states: torch.Tensor,
        latents: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        latent_position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        skip_self_attention: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        if not skip_self_attention:  # skipped when `hidden_states` is an `LTMPrefix` that already went through it
            hidden_states = self.self_attention_block(
                hidden_states, position_embeddings, attention_mask, cache, **kwargs
            )

        residual = hidden_states
        hidden_states, _ = self.cross_attn(
            self.cross_attn_layernorm(hidden_states),
            latents,
            position_embeddings,
            latent_position_embeddings,
            cache,
            **kwargs,
        )
        hidden_states = residual + self._dropout(hidden_states)

        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + self._dropout(hidden_states)

    def _dropout(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Dropout on a sublayer's output before the residual sum; no call at all outside training (a decoding step
        is a chain of small kernels, where each call's overhead counts)."""
        if self.training and self.residual_dropout:
            return nn.functional.dropout(hidden_states, self.residual_dropout, training=True)
        return hidden_states

    def self_attention_block(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The z-independent first sublayer: `hidden_states + self_attn(norm(hidden_states))`, `(B, T, hidden)`."""
        self_cache = cache.self_attention_cache if cache is not None else None
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, self_cache, **kwargs
        )
        return residual + self._dropout(hidden_states)


class LTMPosteriorEncoder(nn.Module):
    """Amortized proposal of the posterior, the start of a warm-started fit (semi-amortized inference, Kim et al.,
    2018): the masked mean over tokens of the latent-independent prefix's hidden states (layer 0's self-attention
    output, which every fit computes anyway), RMSNorm, a SiLU MLP of width `config.posterior_encoder_size`, and
    `(mu, logvar)` of shape `(batch, *config.latent_shape)` in float32. Its output layer starts at zero, so an
    untrained encoder proposes the prior (`mu = 0`, `logvar = 0`). Not part of `forward`: the fast loop calls it
    (`PosteriorFitSettings(warm_start=True)`), and `modeling_ltm.tooling.amortized.fit_posterior_encoder` trains it."""

    def __init__(self, config: LTMConfig):
        super().__init__()
        self.latent_shape = config.latent_shape
        self.norm = LTMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.fc_in = nn.Linear(config.hidden_size, config.posterior_encoder_size)
        self.act_fn = nn.SiLU()
        self.fc_out = nn.Linear(config.posterior_encoder_size, 2 * math.prod(config.latent_shape))
        self.fc_out.zero_init = True  # read by `LTMPreTrainedModel._init_weights`

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden_states` `(batch, seq, hidden_size)` (an `LTMPrefix`'s), `attention_mask` `(batch, seq)` with 0 for
        padding → `(mu, logvar)`, each `(batch, num_hidden_layers, n_latents_per_layer, latent_dim)`, float32."""
        if attention_mask is None:
            pooled = hidden_states.mean(1)
        else:
            weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
            pooled = (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)
        mu, logvar = self.fc_out(self.act_fn(self.fc_in(self.norm(pooled)))).float().chunk(2, dim=-1)
        return mu.reshape(-1, *self.latent_shape), logvar.reshape(-1, *self.latent_shape)


class LTMPreTrainedModel(PreTrainedModel):
    """Holds the flags shared by the LTM models; weights are initialised by `PreTrainedModel._init_weights` (normal
    with `config.initializer_range` for linear and embedding weights, ones for RMSNorm scales, RoPE tables rebuilt),
    which leaves weights loaded by `from_pretrained` untouched.

    `_can_record_outputs` tells transformers' `capture_outputs` (on `LTMModel.forward`) which modules' outputs make up
    `hidden_states` (the input of the first decoder layer, then each layer's output), `attentions` (the self-attention
    weights) and `cross_attentions` (the weights over the latents, recorded with `output_attentions`)."""

    config_class = LTMConfig
    config: LTMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LTMDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Decoding with a static cache compiles to one graph (tests/test_static_cache.py), as generate's compiled
    # decoding (`cache_implementation="static"`) needs.
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": LTMDecoderLayer,
        "attentions": LTMSelfAttention,
        "cross_attentions": LTMCrossAttention,
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a damaged `.safetensors` file (truncated, corrupt), whose error from
        the safetensors library names no file, is reported as an `OSError` naming the folder and the fix."""
        from safetensors import SafetensorError  # a dependency of transformers, as torch is

        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"The weights in {pretrained_model_name_or_path} are truncated or corrupt ({error}); re-save the model "
                "(save_pretrained / `ltm train`) or copy its .safetensors file again."
            ) from error

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # The posterior encoder's output layer: an untrained encoder proposes the prior. (Marked on the layer: for
        # remote code, transformers skips `_init_weights` on modules without parameters of their own.)
        if getattr(module, "zero_init", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        # A learned prior starts as the standard normal (its own rule: its weights are batched over latent slots).
        if isinstance(module, (DiagonalGaussianPrior, FlowPrior)):
            module.reset_parameters()
        # A projection named in `config.scaled_init_projections` (marked by `LTMDecoderLayer`): its own std.
        if isinstance(module, nn.Linear) and getattr(module, "init_std", None) is not None:
            init.normal_(module.weight, mean=0.0, std=module.init_std)


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on `device`'s current stream (no host reads allowed)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def latent_position_ids(config: LTMConfig, device: torch.device | None = None) -> torch.LongTensor:
    """RoPE positions of one layer's latents (every layer's are the same), shape `(n_latents_per_layer,)`:
    `arange(0, latent_position_range, stride)[:n_latents_per_layer]`, `stride = latent_position_range // N`, where
    `config.latent_position_range` is the training context (`max_position_embeddings` when the config was built; a
    later context extension leaves it, and so the latents, where training put them).

    `N` is `n_latents_per_layer` (`config.latent_position_spacing = "per_layer"`) or all the model's latents,
    `num_hidden_layers * n_latents_per_layer` (`"all_latents"`: the authors' code, where `max_z_len` counts every
    layer's latents).
    """
    spread_over = config.n_latents_per_layer
    if config.latent_position_spacing == "all_latents":
        spread_over *= config.num_hidden_layers
    stride = (getattr(config, "latent_position_range", None) or config.max_position_embeddings) // spread_over
    return torch.arange(0, config.n_latents_per_layer, device=device) * stride


@dataclass
class LTMPrefix:
    """The part of a forward pass that does not depend on the latents, computed once by [`LTMModel.compute_prefix`]
    and reused by every forward on the same tokens (the fast loop's steps, importance samples, final scoring):
    the token embeddings and layer 0's self-attention sublayer (everything before the first cross-attention).

    Args:
        hidden_states (`torch.FloatTensor` of shape `(batch, seq, hidden_size)`): the residual stream after layer 0's
            self-attention sublayer.
        causal_mask (`torch.Tensor` of shape `(batch or 1, 1, seq, seq)`, or `None`): the self-attention mask every
            layer uses (causal, sliding window, padding), as built by transformers' mask functions.
        position_embeddings (`tuple` of two `torch.FloatTensor` of shape `(batch or 1, seq, head_dim)`): the
            tokens' RoPE `(cos, sin)` from [`LTMRotaryEmbedding`].
    """

    hidden_states: torch.Tensor
    causal_mask: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.hidden_states.shape[0]

    def index_select(self, index: torch.Tensor) -> "LTMPrefix":
        """The prefix of rows `index` (a 1-D LongTensor; repeat rows to batch several samples per sequence)."""

        def rows(tensor):
            if tensor is None or tensor.shape[0] != self.batch_size:  # broadcast over the batch: nothing to select
                return tensor
            return tensor.index_select(0, index)

        return self.map(rows)

    def map(self, function) -> "LTMPrefix":
        """A prefix whose every tensor is `function(tensor)` (`None` stays `None`), e.g. `prefix.map(torch.clone)`."""
        if self.causal_mask is not None and not isinstance(self.causal_mask, torch.Tensor):
            raise TypeError(f"Cannot map a {type(self.causal_mask).__name__} attention mask (a tensor is needed).")
        cos, sin = self.position_embeddings
        return LTMPrefix(*(None if t is None else function(t) for t in (self.hidden_states, self.causal_mask)),
                         (function(cos), function(sin)))  # fmt: skip

    @torch.no_grad()
    def copy_(self, other: "LTMPrefix") -> "LTMPrefix":
        """Copy `other`'s tensors into this prefix's, in place (same shapes; e.g. the static inputs of a CUDA graph)."""
        for mine, theirs in zip(self._tensors(), other._tensors()):
            if mine is not None:
                mine.copy_(theirs)
        return self

    def _tensors(self) -> tuple:
        return (self.hidden_states, self.causal_mask, *self.position_embeddings)


class LTMModel(LTMPreTrainedModel):
    """The LTM decoder without the language-model head."""

    def __init__(self, config: LTMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LTMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LTMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LTMRotaryEmbedding(config)
        self.dropout = nn.Dropout(config.dropout)
        self.posterior_encoder = LTMPosteriorEncoder(config) if config.posterior_encoder_size else None
        self.latent_prior = build_prior(config)  # None: the standard normal, which has no parameters
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def check_latents(self, latents: torch.Tensor, batch_size: int, check_finite: bool = True) -> None:
        """Raise unless `latents` is a floating-point tensor of shape `(batch_size, *config.latent_shape)`, on the
        model's device, with finite values (`TypeError` for the type, `ValueError` otherwise). `check_finite=False`
        skips the one check that reads a value back to the host (the fast loop checks its own numbers)."""
        expected = (batch_size, *self.config.latent_shape)
        if not isinstance(latents, torch.Tensor):
            raise TypeError(
                f"`latents` must be a tensor of shape {expected} (batch, num_hidden_layers, n_latents_per_layer, "
                f"latent_dim), got {type(latents).__name__}. Use `model.infer_latents(...).z` or `latents=None` "
                "for the prior mean."
            )
        if tuple(latents.shape) != expected:
            raise ValueError(
                f"`latents` has shape {tuple(latents.shape)}, expected {expected} (batch, num_hidden_layers, "
                "n_latents_per_layer, latent_dim) for this model and batch."
            )
        if not latents.is_floating_point():
            raise TypeError(f"`latents` must be a floating-point tensor, got dtype {latents.dtype}.")
        device = self.embed_tokens.weight.device
        if latents.device != device:
            raise ValueError(
                f"`latents` is on {latents.device} but the model is on {device}; move it with "
                "`latents.to(model.device)`."
            )
        # One host sync, skipped while compiling or capturing a CUDA graph (a graph break, a capture error).
        if not check_finite or torch.compiler.is_compiling() or _capturing(latents.device):
            return
        if not bool(torch.isfinite(latents).all()):
            raise NonFiniteLatentsError(
                "`latents` contains NaN or inf values; pass finite latents (e.g. `model.infer_latents(...).z`, or "
                "`latents=None` for the prior mean)."
            )

    def prior_mean_latents(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The prior's mean as latents, `(batch_size, *config.latent_shape)` (an expanded view): `z = 0` for N(0, I)
        and a flow's base, a learned diagonal Gaussian's mean. What `forward(latents=None)` uses, with a one-time
        warning (it fits nothing and bounds nothing); pass this tensor as `latents` to use the prior's mean on
        purpose, without the warning. `device`/`dtype` default to the embedding's."""
        device = self.embed_tokens.weight.device if device is None else device
        dtype = self.embed_tokens.weight.dtype if dtype is None else dtype
        if self.latent_prior is None:
            mean = torch.zeros(self.config.latent_shape, device=device, dtype=dtype)
        else:
            mean = self.latent_prior.start(device)[0].to(dtype)
        return mean.expand(batch_size, *self.config.latent_shape)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)
    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        latents: torch.Tensor | None = None,
        use_cache: bool | None = None,
        prefix: LTMPrefix | None = None,
        **kwargs,
    ) -> LTMModelOutput:
        r"""
        cache (`Cache`, *optional*):
            An `EncoderDecoderCache` (self-attention cache + latents' cross-attention cache), as `generate()`
            prepares it (dynamic or static) or a previous call returned it. An empty self-attention-only cache
            (`DynamicCache`, `StaticCache`) gets an empty cross-attention cache of the same kind.
        latents (`torch.Tensor` of shape `(batch_size, num_hidden_layers, n_latents_per_layer, latent_dim)`, *optional*):
            The latent thought vectors `z`, any floating dtype (cast to the weights' dtype). `None` means the
            prior's mean (`z = 0` for N(0, I); see `config.prior_type`): `forward` never fits a posterior by itself
            (use `LTMForCausalLM.infer_latents`). `None` logs a warning once (neither a fit nor a bound: what
            lm-eval's `--model hf` and plain `Trainer` do); `latents=model.prior_mean_latents(batch_size)` is the same
            numbers, on purpose, without it. Ignored, and not checked, once every layer's cross-attention keys/values
            are in `cache` (decoding).
        prefix ([`LTMPrefix`], *optional*):
            The latent-independent start of the forward, from [`LTMModel.compute_prefix`]: it replaces
            `inputs_embeds`, `attention_mask` and `position_ids` (pass none of them; `input_ids` may be passed
            along for hooks and logging, the prefix's own tokens, unused) and the work up to layer 0's
            cross-attention. No cache, and no check that the latents are finite (the fast loop checks its own
            numbers; the check would read a value back to the host at every fast step). Same numbers as the plain
            call.

        Returns:
            [`LTMModelOutput`] (transformers' `BaseModelOutputWithPastAndCrossAttentions`) with

            - `last_hidden_state` of shape `(batch_size, sequence_length, hidden_size)`, after the final norm;
            - when caching, the `EncoderDecoderCache` as `cache`;
            - with `output_hidden_states`: `hidden_states`, a tuple of `num_hidden_layers + 1` tensors of shape
              `(batch_size, sequence_length, hidden_size)`: the input of the first layer (the embeddings, after
              dropout), then each layer's output, the last one replaced by `last_hidden_state` (as in Llama);
            - with `output_attentions`: `attentions`, one tensor per layer of shape `(batch_size,
              num_attention_heads, sequence_length, past_length + sequence_length)` (softmax over the last axis), and
              `cross_attentions`, one per layer of shape `(batch_size, num_attention_heads, sequence_length,
              n_latents_per_layer)`, the attention of each token over its layer's latents.

        Raises:
            ValueError: 1-D `input_ids`, 0 rows, both or neither of `input_ids`/`inputs_embeds`, latents of the wrong
                shape, on another device or with NaN/inf, or more than `max_position_embeddings` tokens (cached +
                new).
            TypeError: `latents` not a floating-point tensor, or a cache that is not an `EncoderDecoderCache`.
        """
        self._check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, cache, prefix, kwargs)
        if prefix is not None:
            hidden_states = self._decoder_layers(
                prefix.hidden_states, latents, prefix.causal_mask, prefix.position_embeddings, None, True, **kwargs
            )
            return LTMModelOutput(last_hidden_state=hidden_states)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        cache = self._encoder_decoder_cache(cache, use_cache)
        past_length = cache.get_seq_length() if cache is not None else 0
        self._check_length(past_length, inputs_embeds.shape[1], position_ids)
        hidden_states, causal_mask, position_embeddings = self._layer_inputs(
            inputs_embeds, attention_mask, position_ids, cache, past_length, self._attention_config(kwargs)
        )
        hidden_states = self._decoder_layers(
            hidden_states, latents, causal_mask, position_embeddings, cache, False, **kwargs
        )
        return LTMModelOutput(last_hidden_state=hidden_states, cache=cache if use_cache else None)

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, prefix, kwargs) -> None:
        """The argument checks of `forward` (raises `ValueError` naming the argument and the fix)."""
        if prefix is not None:
            given = [n for n, v in [("inputs_embeds", inputs_embeds), ("attention_mask", attention_mask),
                                    ("position_ids", position_ids), ("cache", cache)] if v is not None]  # fmt: skip
            if given:
                raise ValueError(f"`prefix` already holds the tokens, mask and positions; do not also pass {given}.")
            if input_ids is not None and tuple(input_ids.shape) != tuple(prefix.hidden_states.shape[:2]):
                raise ValueError(
                    f"`input_ids` of shape {tuple(input_ids.shape)} are not the prefix's tokens "
                    f"{tuple(prefix.hidden_states.shape[:2])}; pass the ids the prefix was computed from, or none."
                )
            return
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(
                f"`input_ids` must have shape (batch, sequence_length), got {tuple(input_ids.shape)}; "
                "add a batch dimension with `input_ids.unsqueeze(0)`."
            )
        if (input_ids if input_ids is not None else inputs_embeds).shape[0] == 0:
            raise ValueError("`input_ids` has 0 rows: pass a batch of at least one sequence.")

    def _encoder_decoder_cache(self, cache: Cache | None, use_cache: bool) -> EncoderDecoderCache | None:
        """The cache this forward reads and fills: `cache` as given when it is an `EncoderDecoderCache`; a new dynamic
        pair when none is given and `use_cache`; an empty self-attention cache paired with an empty cross-attention
        cache of its kind (static for static: `n_latents_per_layer` long)."""
        if cache is None:
            return EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache()) if use_cache else None
        if isinstance(cache, EncoderDecoderCache):
            return cache
        if (
            isinstance(cache, Cache)
            and not isinstance(cache.get_seq_length(), torch.Tensor)
            and not (cache.get_seq_length())
        ):
            return EncoderDecoderCache(cache, latent_cache_like(cache, self.config))
        raise TypeError(
            "`cache` must be an `EncoderDecoderCache` (self-attention + latent cross-attention) as `generate()` "
            f"prepares it or this model returns it, or an empty `DynamicCache`/`StaticCache`; got {type(cache).__name__}."
        )

    def _check_length(
        self, past_length: int | torch.Tensor, seq_length: int, position_ids: torch.LongTensor | None = None
    ) -> None:
        """Raise when the input reaches past the context, `config.max_input_positions` RoPE positions. Counted in
        positions, not tokens: a row packing several sequences whose `position_ids` restart (padding-free training)
        may hold more tokens than the context. The positions are read (one host read) only when the tokens
        outnumber the context; default positions never exceed the token count. A static cache counts its tokens in a
        tensor (no host read here): its own length, which `generate` checks against the context before any work,
        bounds it."""
        if isinstance(past_length, torch.Tensor):
            return
        limit = self.config.max_input_positions
        if past_length + seq_length <= limit:
            return
        if position_ids is not None and not torch.compiler.is_compiling() and not _capturing(position_ids.device):
            if int(position_ids.max()) < limit:
                return
        raise ValueError(
            f"Input of {past_length + seq_length} positions (cached {past_length} + new {seq_length}) is longer "
            f"than the context, {limit} positions (max_position_embeddings={self.config.max_position_embeddings}). "
            f"Truncate the input to the last {limit} tokens (e.g. tokenizer(..., truncation=True, "
            f"max_length={limit}), truncation_side='left'), or restart `position_ids` at each packed sequence."
        )

    def _decoder_layers(
        self, hidden_states, latents, causal_mask, position_embeddings, cache, prefix_given: bool, **kwargs
    ) -> torch.Tensor:
        """The decoder layers and the final norm, `(B, T, hidden)` → `(B, T, hidden)`. `prefix_given`: the input is an
        `LTMPrefix`'s, which already went through layer 0's self-attention."""
        cross_cached = cache is not None and all(cache.is_updated.get(i, False) for i in range(len(self.layers)))
        latent_position_embeddings = None
        if cross_cached:  # decoding steps ignore them: no per-token check (and its host sync), no slicing
            latents = None
        else:
            batch_size = hidden_states.shape[0]
            if latents is None:  # the mean of the fit's start: the prior's mean (0 for N(0, I) and a flow's base)
                if not torch.compiler.is_compiling():
                    logger.warning_once(NO_LATENTS_WARNING)
                latents = self.prior_mean_latents(batch_size, hidden_states.device, hidden_states.dtype)
            else:
                self.check_latents(latents, batch_size, check_finite=not prefix_given)
            latent_position_embeddings = self.rotary_emb(
                hidden_states, latent_position_ids(self.config, hidden_states.device).unsqueeze(0)
            )
        for layer_idx, decoder_layer in enumerate(self.layers):
            hidden_states = decoder_layer(
                hidden_states,
                latents[:, layer_idx] if latents is not None else None,
                position_embeddings,
                latent_position_embeddings,
                attention_mask=causal_mask,
                cache=cache,
                skip_self_attention=prefix_given and layer_idx == 0,
                **kwargs,
            )
        return self.norm(hidden_states)

    def _attention_config(self, kwargs: dict) -> LTMConfig:
        """The config whose `_attn_implementation` this forward's attention and masks follow: the model's, or with
        `output_attentions=True` under a fused kernel (which never forms the weights) an eager copy, with a warning
        once, as transformers' models fall back to the eager attention (same numbers to float rounding)."""
        if not kwargs.get("output_attentions") or self.config._attn_implementation == "eager":
            return self.config
        if not torch.compiler.is_compiling():
            logger.warning_once(OUTPUT_ATTENTIONS_FALLBACK_WARNING.format(self.config._attn_implementation))
        eager = copy.copy(self.config)
        eager._attn_implementation_internal = "eager"
        return eager

    def _layer_inputs(self, inputs_embeds, attention_mask, position_ids, cache, past_length, mask_config=None):
        """`(hidden_states, causal_mask, position_embeddings)` entering layer 0, from the token embeddings."""
        seq_length = inputs_embeds.shape[1]
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2 and not isinstance(past_length, torch.Tensor):
                # Counting over the mask is `past_length + arange` for a mask without padding, with no host sync
                # deciding which case it is (a graph break under torch.compile).
                position_ids = position_ids_from_attention_mask(attention_mask, past_length, seq_length)
            else:
                position_ids = torch.arange(seq_length, device=inputs_embeds.device) + past_length
                position_ids = position_ids.unsqueeze(0)

        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        self_cache = cache.self_attention_cache if cache is not None else None
        mask_config = mask_config or self.config
        causal_mask = mask_function(mask_config, inputs_embeds, attention_mask, self_cache, position_ids)

        hidden_states = self.dropout(inputs_embeds)
        return hidden_states, causal_mask, self.rotary_emb(hidden_states, position_ids)

    @torch.no_grad()
    def compute_prefix(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
    ) -> LTMPrefix:
        """The latent-independent start of `forward` for these tokens (embeddings, masks, RoPE tables and layer 0's
        self-attention sublayer), to pass as `forward(prefix=...)` to any number of forwards with different latents.

        Computed under `torch.no_grad()`: it carries no gradient to the weights (the fast loop needs gradients with
        respect to the latents only, which never reach this part). Arguments as in `forward`; under an autocast,
        compute it inside the same autocast as the forwards that use it. With `config.dropout > 0` in training mode,
        its dropout masks are drawn once and shared by every forward that reuses it.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        self._check_length(0, inputs_embeds.shape[1], position_ids)
        hidden_states, causal_mask, position_embeddings = self._layer_inputs(
            inputs_embeds, attention_mask, position_ids, None, 0
        )
        hidden_states = self.layers[0].self_attention_block(hidden_states, position_embeddings, causal_mask)
        return LTMPrefix(hidden_states, causal_mask, position_embeddings)


class LTMForCausalLM(LTMPreTrainedModel, LTMGenerationMixin):
    """LTM decoder with a tied language-model head, plus posterior inference over the latents.

    Example:

    ```python
    >>> import torch
    >>> from modeling_ltm import LTMConfig, LTMForCausalLM
    >>> model = LTMForCausalLM(LTMConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
    >>> input_ids = torch.randint(0, 256, (2, 16))
    >>> posterior = model.infer_latents(input_ids, num_steps=4, seed=0)
    >>> out = model(input_ids, latents=posterior.z, labels=input_ids)  # NLL given z, nats per token
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # `generate()`'s defaults for the latents, kept in generation_config.json (see `LTMGenerationConfig`).
    generation_config_class = LTMGenerationConfig

    def __init__(self, config: LTMConfig):
        super().__init__(config)
        self.model = LTMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        latents: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        prefix: LTMPrefix | None = None,
        **kwargs,
    ) -> LTMCausalLMOutput:
        r"""
        cache (`Cache`, *optional*):
            An `EncoderDecoderCache`, or an empty `DynamicCache` / `StaticCache` (see [`LTMModel.forward`]).
        latents (`torch.Tensor` of shape `(batch_size, num_hidden_layers, n_latents_per_layer, latent_dim)`, *optional*):
            The latent thought vectors `z` (see [`LTMModel.forward`]); `None` is the prior's mean, with a warning
            once. The loss given `labels` is the mean NLL in nats per predicted token given `latents`.
        prefix ([`LTMPrefix`], *optional*):
            The latent-independent start of the forward, from [`LTMModel.compute_prefix`] (see
            [`LTMModel.forward`]); keeps no cache.

        Returns:
            [`LTMCausalLMOutput`] with `logits` of shape `(batch_size, kept_positions, config.padded_vocab_size)`
            (the columns past `config.vocab_size`, padding of the embedding for fast matrix shapes, are `-inf`: no
            probability, never generated, outside every loss and bound), `loss` when `labels` is given, `cache` when
            caching, and the model's `hidden_states`, `attentions` and `cross_attentions` when asked for (a tuple of
            the non-`None` fields with `return_dict=False`).
        """
        if prefix is not None and use_cache:
            raise ValueError("`prefix` forwards keep no cache; do not pass `use_cache=True` with it.")
        if labels is not None and self.training and latents is None and prefix is None and cache is None:
            # Plain `Trainer`: one warning naming `LTMTrainer`, then the prior's mean passed explicitly (so the
            # generic warning of `LTMModel` does not repeat it).
            if not torch.compiler.is_compiling():
                logger.warning_once(TRAINING_WITHOUT_LATENTS_WARNING)
            latents = self.prior_mean_latents((input_ids if input_ids is not None else inputs_embeds).shape[0])
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            latents=latents,
            use_cache=use_cache,
            return_dict=True,
            prefix=prefix,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        logits = self.mask_padded_vocab(logits)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        return LTMCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions,
        )

    def prior_mean_latents(self, batch_size: int) -> torch.Tensor:
        """The prior's mean as `latents`, `(batch_size, *config.latent_shape)` (see `LTMModel.prior_mean_latents`):
        `model(input_ids, latents=model.prior_mean_latents(len(input_ids)))` is `model(input_ids)` without the
        warning that `forward` without latents logs once."""
        return self.model.prior_mean_latents(batch_size)

    def mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` `(..., padded_vocab_size)` with the padding columns (ids `>= config.vocab_size`, rows that only
        make the embedding's shape fast) set to `-inf` in place: zero probability in every softmax, loss and bound,
        and never generated. A no-op without padding."""
        if logits.shape[-1] > self.config.vocab_size:
            logits[..., self.config.vocab_size :] = float("-inf")
        return logits

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """`PreTrainedModel.resize_token_embeddings` with the config's padding: the embedding gets
        `new_num_tokens` rounded up to `pad_to_multiple_of` (default `config.pad_vocab_size_to_multiple_of`) rows,
        while `config.vocab_size` becomes `new_num_tokens`, the tokenizer's size (transformers would record the padded
        size there, and the padding rows would become predictable tokens)."""
        multiple = pad_to_multiple_of or self.config.pad_vocab_size_to_multiple_of
        embeddings = super().resize_token_embeddings(new_num_tokens, multiple if multiple > 1 else None, mean_resizing)
        if new_num_tokens is not None:
            self.config.vocab_size = self.vocab_size = new_num_tokens
            self.config.pad_vocab_size_to_multiple_of = multiple
        return embeddings

    def infer_latents(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        num_steps: int | None = None,
        lr: float | None = None,
        **kwargs,
    ) -> PosteriorOutput:
        """Fit `q(z|x)` to each sequence with the fast loop (decoder frozen); see [`inference.fit_posterior`].

        Returns a [`PosteriorOutput`] with `mu`, `logvar`, `z` and per-sequence `nll`, `kl`, `elbo` (nats) and
        `num_tokens`. `num_steps` and `lr` default to `config.num_inference_steps` and `config.inference_lr`.
        """
        return fit_posterior(self, input_ids, attention_mask, num_steps=num_steps, lr=lr, **kwargs)

    def importance_weighted_bound(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        num_samples: int = 16,
        posterior: PosteriorOutput | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Importance-weighted lower bound on `log p(x)` per sequence, in nats, shape `(batch,)`; see
        [`inference.importance_weighted_bound`]."""
        return importance_weighted_bound(
            self, input_ids, attention_mask, num_samples=num_samples, posterior=posterior, **kwargs
        )

    def evaluate_posterior(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> PosteriorEvaluation:
        """Bounds on `log p(x)` per sequence under the evaluation fit (`config.eval_*`: start at the prior, or at the
        posterior encoder's proposal when the model has one; `eps` redrawn), optionally the importance-weighted bound (`iw_samples=K`) and the reconstruction NLL
        (`reconstruction=True`, not a bound); see [`inference.evaluate_posterior`]. `.summary()` gives per-token
        figures (`elbo_ppl`, ...)."""
        return evaluate_posterior(self, input_ids, attention_mask, **kwargs)


__all__ = [
    "LTMForCausalLM",
    "LTMModel",
    "LTMPrefix",
    "LTMPreTrainedModel",
    "LTMCausalLMOutput",
    "LTMModelOutput",
]

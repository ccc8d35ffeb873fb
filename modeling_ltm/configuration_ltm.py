"""Configuration of Latent-Thought Language Models (LTMs, arXiv:2502.01567).

A strict dataclass, as transformers' own configs are (`huggingface_hub.dataclasses.strict`): every field's type and
range is checked when it is set, and the relations between fields by the `validate_*` methods; an invalid value raises
`StrictDataclassFieldValidationError` / `StrictDataclassClassValidationError` naming the field and the rule.

This file imports only `transformers` (and `huggingface_hub`, which transformers requires) so that `save_pretrained`
can copy it next to the weights for `trust_remote_code=True` loading.
"""

import math

from huggingface_hub.dataclasses import strict, validated_field
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters
from transformers.utils.type_validators import activation_fn_key, interval


# The oldest transformers release this configuration and the model code run on: the lower bound of pyproject.toml's
# range (a test keeps the two equal). Model cards state it; config.json records, as transformers does, the release that
# wrote it (`transformers_version`).
MIN_TRANSFORMERS_VERSION = "5.24.0"

# `LTMConfig.posterior_encoder_fit`: what a posterior encoder's proposals were fitted to (None: untrained or stale).
POSTERIOR_ENCODER_FITS = (None, "evaluation", "training")
# `LTMConfig.prior_type`: the priors of modeling_ltm/priors.py (which reads this tuple).
PRIOR_TYPES = ("standard_normal", "diagonal_gaussian", "flow")
# `LTMConfig.latent_position_spacing`: how far apart a layer's latents sit on the RoPE axis (`latent_position_ids`).
LATENT_POSITION_SPACINGS = ("per_layer", "all_latents")
# `LTMConfig.inference_lr_schedule`: the cosine's half period within the T fast steps (see `fast_loop.cosine_fast_lr`).
INFERENCE_LR_SCHEDULES = ("cosine_t_minus_1", "cosine_t")
# `LTMConfig.inference_loss_reduction`: how the training fast loop's objective is summed (see `scoring.negative_elbo`).
INFERENCE_LOSS_REDUCTIONS = ("per_token", "sum")
# `LTMConfig.scaled_init_projections`: the projections whose initial weights can get the depth-scaled std.
SCALABLE_INIT_PROJECTIONS = ("o_proj", "up_proj", "down_proj")


def is_integer(value) -> bool:
    """An `int` that is not a `bool` (`True` is an `int` in Python, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An `int` or `float` that is not a `bool` and not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _rule_text(rule: str, optional: bool, why: str | None) -> str:
    return f"{rule}{' or None' if optional else ''}{f' ({why})' if why else ''}"


def check_int(name: str, value, minimum: int = 0, *, optional: bool = False, why: str | None = None) -> None:
    """The one check of a count (a field, argument or flag named `name`): `ValueError` naming it, the rule and
    `value` unless `value` is an integer (not a bool) >= `minimum`, or None when `optional`. `why` says what the
    value means, e.g. `"0 = no warm-up"`."""
    if optional and value is None:
        return
    if not (is_integer(value) and value >= minimum):
        raise ValueError(f"`{name}` must be an integer {_rule_text(f'>= {minimum}', optional, why)}, got {value!r}.")


# The rules `check_number` knows, by the words its error states.
NUMBER_RULES = {
    "": lambda value: True,
    ">= 0": lambda value: value >= 0,
    "> 0": lambda value: value > 0,
    "in (0, 1]": lambda value: 0 < value <= 1,
}


def check_number(
    name: str, value, rule: str = "", *, finite: bool = False, optional: bool = False, why: str | None = None
) -> None:
    """The one check of a real-valued knob named `name`: `ValueError` naming it, the rule and `value` unless `value`
    is an int or float (not a bool, not NaN), finite when `finite`, that meets `rule` (a key of `NUMBER_RULES`:
    `">= 0"`, `"> 0"`, `"in (0, 1]"`, or `""` for any number), or is None when `optional`."""
    if optional and value is None:
        return
    if not (is_number(value) and (not finite or math.isfinite(value)) and NUMBER_RULES[rule](value)):
        kind = f"a {'finite ' if finite else ''}number{f' {rule}' if rule else ''}"
        raise ValueError(f"`{name}` must be {_rule_text(kind, optional, why)}, got {value!r}.")


def _positive(value):
    if value is not None and not value >= 1:
        raise ValueError(f"must be a positive integer, got {value!r}")


def _non_negative(value):
    if not value >= 0:
        raise ValueError(f"must be >= 0, got {value!r}")


def _finite(value):
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")


def _greater_than_zero(value):
    if not value > 0:
        raise ValueError(f"must be > 0, got {value!r}")


def _one_of(choices):
    def check(value):
        if value not in choices:
            raise ValueError(f"must be one of {choices}, got {value!r}")

    return check


def _projections(value):
    if value is not None and not set(value) <= set(SCALABLE_INIT_PROJECTIONS):
        raise ValueError(f"must be None or a list of names from {SCALABLE_INIT_PROJECTIONS}, got {value!r}")


def _static_rope_type(value):
    """`rope_parameters` without `"rope_type": "dynamic"` (checked at construction, on assignment and by the model)."""
    if isinstance(value, dict) and value.get("rope_type", "default") == "dynamic":
        raise ValueError(
            'rope_parameters["rope_type"] = "dynamic" is not supported: its frequencies change with the input\'s '
            "length, so the latents' keys cached at the prefill would not match later tokens. Use \"default\" or a "
            'static scaling ("linear", "yarn", "llama3").'
        )


def _field(*validators, default):
    """A dataclass field whose value must pass every validator (each raises `ValueError` saying why)."""
    return validated_field(list(validators), default=default)


@strict
class LTMConfig(PreTrainedConfig):
    r"""
    Configuration of an [`LTMForCausalLM`]: a pre-norm Transformer decoder (RMSNorm, RoPE, SwiGLU, tied embeddings)
    in which every layer cross-attends to its own group of latent "thought" vectors `z_l`, plus the defaults of the
    posterior inference ("fast learning") that fits `q(z|x) = N(mu, diag(exp(logvar)))` to each sequence.

    The shapes' defaults are those of the paper's public code (12 layers of width 768, 8 latents per layer, GPT-2
    vocabulary, context 1024, 16 fast steps); the paper presets (`configuration/ltm-{s,m,l}.json`) also set the
    fields in which the authors' code differs from this library's defaults (`latent_position_spacing`,
    `inference_lr`, `posterior_init_mu_noise`, `inference_weight_decay`, `inference_lr_schedule`,
    `inference_loss_reduction`), listed in docs/fidelity.md.

    Args:
        vocab_size (`int`, *optional*, defaults to 50257):
            Number of tokens in the vocabulary (the tokenizer's).
        pad_vocab_size_to_multiple_of (`int`, *optional*, defaults to 1):
            The embedding and the LM head get `vocab_size` rounded up to a multiple of this many rows
            (`padded_vocab_size`; the paper presets use 128, as nanoGPT's 50304 for GPT-2's 50257), so the LM head's
            matrix products run the GPU's fast kernels (an unaligned 50257 falls back to slow ones). The padding rows
            are never predicted: their logits are `-inf` (no probability in any loss or bound; never generated).
        hidden_size (`int`, *optional*, defaults to 768):
            Width of the residual stream.
        intermediate_size (`int`, *optional*):
            Width of the SwiGLU MLP. Defaults to `8/3 * hidden_size` rounded up to a multiple of 64.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of decoder layers; each has its own group of latent vectors.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Number of query heads in self- and cross-attention. Must divide `hidden_size`.
        num_key_value_heads (`int`, *optional*):
            Number of key/value heads (grouped-query attention). Defaults to `num_attention_heads`; must divide it.
        max_position_embeddings (`int`, *optional*, defaults to 1024):
            The context: the longest input, counted in RoPE positions (a row packing several sequences whose
            `position_ids` restart counts its longest sequence), unless a RoPE scaling extends it (see
            `max_input_positions`). At construction it also sets `latent_position_range`, the span over which the
            latents' RoPE positions are spread: two models built with different `max_position_embeddings` put their
            latents at different positions, so the same weights give different logits. To extend the context of a
            trained model, change `max_position_embeddings` / `rope_parameters` on its loaded config
            (`from_pretrained(..., max_position_embeddings=...)` or assignment), which keeps the recorded
            `latent_position_range`.
        latent_position_range (`int`, *optional*):
            The span of positions over which the latents' RoPE positions are spread (`latent_position_ids`): the
            training context. Defaults to `max_position_embeddings` at construction and is saved in config.json, so
            that extending the context afterwards (a larger `max_position_embeddings`, a RoPE scaling) leaves the
            latents' positions where training put them. A config.json written before this field loads with its own
            `max_position_embeddings` (the positions it was trained with).
        rope_parameters (`dict`, *optional*):
            The rotary position embeddings, as transformers' configs give them: `{"rope_type": "default",
            "rope_theta": 10000.0}` by default; a scaling type of `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`
            ("linear", "yarn", "llama3", ...) applies to the frequencies of tokens and latents alike (the latents keep
            their positions, `latent_position_range`) and extends the context to `max_input_positions`; "dynamic"
            is refused, at construction and on assignment (its frequencies change with the input's length, so the
            latents' keys cached at the prefill would not match later tokens). A config.json with the older
            `rope_theta` key loads as `rope_parameters`.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the RMSNorm layers.
        hidden_act (`str`, *optional*, defaults to `"silu"`):
            Activation of the gated MLP (a key of transformers' `ACT2FN`; `"silu"` makes it SwiGLU).
        sliding_window (`int`, *optional*):
            Self-attention window in tokens (the paper's code uses 256). `None` means full causal attention.
        n_latents_per_layer (`int`, *optional*, defaults to 8):
            Number of latent vectors each layer cross-attends to.
        latent_position_spacing (`str`, *optional*, defaults to `"per_layer"`):
            The latents' RoPE positions (every layer's latents take the same ones, `latent_position_ids`):
            `arange(0, latent_position_range, stride)[:n_latents_per_layer]` with
            `stride = latent_position_range // N`, where `N` is `n_latents_per_layer` for `"per_layer"` (spread over
            the whole context) and `num_hidden_layers * n_latents_per_layer` for `"all_latents"` (the authors' code,
            whose `max_z_len` counts the latents of all layers: a layer's latents sit in the first
            `1 / num_hidden_layers` of the context). The paper presets use `"all_latents"`.
        latent_dim (`int`, *optional*):
            Width of each latent vector. Defaults to `hidden_size`.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Share the input embedding matrix with the output projection.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of linear and embedding weights.
        scaled_init_projections (`list[str]`, *optional*):
            Projections initialised with the depth-scaled std `initializer_range / sqrt(2 * num_hidden_layers)` (GPT-2's
            rule), by name: `"o_proj"` (self- and cross-attention outputs), `"up_proj"`, `"down_proj"`. `None`: none.
            The paper presets use `["o_proj", "up_proj"]`, as the authors' code does.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities and on each sublayer's output, in training mode only.
        num_inference_steps (`int`, *optional*, defaults to 16):
            Default number of fast (posterior) Adam steps `T`.
        inference_lr (`float`, *optional*, defaults to 0.3):
            Default fast learning rate `eta_fast`, cosine-decayed within the `T` steps.
        inference_lr_min_ratio (`float`, *optional*, defaults to 0.1):
            Floor of that cosine decay as a fraction of `inference_lr` (the paper decays to `eta_fast / 10`).
        posterior_init_logvar (`float`, *optional*, defaults to -5.0):
            Initial `logvar` of the posterior, relative to the prior's; `mu` starts at the prior's mean (0 for
            `N(0, I)`; see `prior_type`).
        posterior_init_logvar_noise (`float`, *optional*, defaults to 0.1):
            Standard deviation of the Gaussian jitter added to the initial `logvar`.
        posterior_fixed_noise (`bool`, *optional*, defaults to `True`):
            Draw the reparameterisation noise `eps` once and keep it for all fast steps (as the paper's code does);
            `False` draws a new `eps` at every step.

        posterior_init_mu_noise (`float`, *optional*, defaults to 0.0):
            Standard deviation of the Gaussian jitter added to the initial `mu` (the paper's code starts `mu` at
            `0.01 * N(0, 1)`).
        inference_weight_decay (`float`, *optional*, defaults to 0.0):
            Decoupled weight decay of the fast optimizer on `(mu, logvar)`: 0 is Adam, > 0 AdamW (the paper's code
            uses `torch.optim.AdamW`'s default, 0.01).
        inference_lr_schedule (`str`, *optional*, defaults to `"cosine_t_minus_1"`):
            The cosine decay within the `T` fast steps: step `s` gets `floor + (lr - floor) (1 + cos(pi s / P)) / 2`
            with `P = T - 1` (`"cosine_t_minus_1"`: the last step runs at the floor) or `P = T` (`"cosine_t"`: the
            paper's code, never reaching the floor).
        inference_loss_reduction (`str`, *optional*, defaults to `"per_token"`):
            The objective the fast optimizer minimises: `"per_token"`, each sequence's `(NLL + KL) / tokens`, summed
            over sequences (a sequence's step does not depend on its length), or `"sum"`, NLL summed over tokens
            and sequences plus the summed KL (the paper's code). Same gradient direction per sequence; Adam's `eps`
            (1e-8) weighs `tokens` times more under `"per_token"`.

            The ten fields above are the *training* fast loop (`PosteriorFitSettings.training`), also used by
            `generate()` and `infer_latents()` by default, and by the reconstruction perplexity. The `eval_*` fields
            below are the *evaluation* fit (`PosteriorFitSettings.evaluation`) behind every reported bound
            (`LTMTrainer.evaluate`, lm-eval model `ltm`, the `elbo_perplexity` metric, `ltm train`'s summary, model
            cards): it starts at the prior and redraws `eps` at every step, which gives a far tighter bound per fast
            step than the training loop's start at `logvar = -5` (see docs/evaluation.md for the measurements).
        eval_inference_steps (`int`, *optional*, defaults to 32):
            Fast steps `T` of the evaluation fit.
        eval_inference_lr (`float`, *optional*, defaults to 0.1):
            Fast learning rate of the evaluation fit, cosine-decayed within its steps.
        eval_inference_lr_min_ratio (`float`, *optional*, defaults to 0.1):
            Floor of that cosine decay as a fraction of `eval_inference_lr`.
        eval_posterior_init_logvar (`float`, *optional*, defaults to 0.0):
            Initial `logvar` of the evaluation fit, relative to the prior's (`mu` starts at the prior's mean): 0 starts
            at the prior, `q = p(z)`, whose KL is 0 (for a flow prior: at its base `N(0, I)`).
        eval_posterior_init_logvar_noise (`float`, *optional*, defaults to 0.0):
            Standard deviation of the jitter added to that initial `logvar`.
        eval_posterior_fixed_noise (`bool`, *optional*, defaults to `False`):
            Keep one `eps` for all evaluation fast steps (`True`) or draw a new one at every step (`False`).
        eval_select_samples (`int`, *optional*, defaults to 4):
            The evaluation never reports a posterior looser than where its fit started: per sequence, the start and
            the fit's last iterate are compared on this many shared `eps` draws, and the better one is scored on fresh
            draws the comparison did not see (an unbiased estimate of a valid bound). 0 reports the last iterate.
        eval_score_samples (`int`, *optional*, defaults to 8):
            Fresh draws `z ~ q` the reported ELBO's likelihood term averages over (when no importance-weighted bound
            is computed; with one, its `K` draws): an unbiased estimate either way, 8 draws for a steadier number.
        prior_type (`str`, *optional*, defaults to `"standard_normal"`):
            The prior `p(z)`: `"standard_normal"` (`N(0, I)`, the paper's), `"diagonal_gaussian"` (a learned mean and
            log-variance per latent dimension) or `"flow"` (a learned affine-coupling flow per latent vector). Learned
            priors train with the decoder (slow step); every bound uses their exact log-density
            (modeling_ltm/priors.py).
        prior_flow_layers (`int`, *optional*, defaults to 4):
            Affine coupling layers of the flow prior.
        prior_flow_hidden (`int`, *optional*, defaults to 64):
            Width of each coupling layer's conditioner MLP.
        posterior_encoder_size (`int`, *optional*, defaults to 0):
            Width of the amortized posterior encoder (`LTMPosteriorEncoder`: pooled layer-0 hidden states -> MLP ->
            an initial `(mu, logvar)`); 0 means none. Train it with `modeling_ltm.tooling.amortized.fit_posterior_encoder`.
        posterior_encoder_fit (`str`, *optional*):
            What the encoder's proposals were fitted to, kept up to date by the code that trains it: `"evaluation"`
            (`fit_posterior_encoder`: amortized VI on the ELBO, decoder frozen, so it proposes `mu` and `logvar` for
            this decoder), `"training"` (trained alongside the decoder by `LTMTrainingArguments.posterior_warm_start`:
            it proposes the training loop's `mu`; its `logvar` output is untrained), or `None` (untrained, or stale:
            the decoder was trained since). Only with `"evaluation"` does the evaluation fit start from the encoder's
            proposal (a warm start) and run `eval_warm_start_steps` steps at `eval_warm_start_lr` instead of the
            `eval_inference_*` settings; otherwise it starts from the prior (a warm start from the training
            encoder measured 0.7% looser, docs/training.md).
        eval_warm_start_steps (`int`, *optional*, defaults to 8):
            Fast steps of the evaluation fit when it starts from the encoder's proposal.
        eval_warm_start_lr (`float`, *optional*, defaults to 0.03):
            Fast learning rate of that fit (cosine-decayed to `eval_inference_lr_min_ratio` of it): smaller than
            from the prior, as the fit starts near its optimum (measured in docs/benchmarks.md).
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether `forward` returns key/value caches for generation.

    Example:

    ```python
    >>> from modeling_ltm import LTMConfig, LTMForCausalLM
    >>> config = LTMConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    >>> model = LTMForCausalLM(config)
    >>> config.latent_dim, config.latent_shape
    (64, (2, 8, 64))
    ```
    """

    model_type = "ltm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = _field(_positive, default=50257)
    pad_vocab_size_to_multiple_of: int = _field(_positive, default=1)
    hidden_size: int = _field(_positive, default=768)
    intermediate_size: int | None = _field(_positive, default=None)
    num_hidden_layers: int = _field(_positive, default=12)
    num_attention_heads: int = _field(_positive, default=12)
    num_key_value_heads: int | None = _field(_positive, default=None)
    max_position_embeddings: int = _field(_positive, default=1024)
    latent_position_range: int | None = _field(_positive, default=None)
    rope_parameters: RopeParameters | dict | None = _field(_static_rope_type, default=None)
    rms_norm_eps: float | int = _field(_finite, _greater_than_zero, default=1e-6)
    hidden_act: str = activation_fn_key(default="silu")
    sliding_window: int | None = _field(_positive, default=None)
    n_latents_per_layer: int = _field(_positive, default=8)
    latent_position_spacing: str = _field(_one_of(LATENT_POSITION_SPACINGS), default="per_layer")
    latent_dim: int | None = _field(_positive, default=None)
    tie_word_embeddings: bool = True
    initializer_range: float | int = _field(_finite, _non_negative, default=0.02)
    scaled_init_projections: list[str] | None = _field(_projections, default=None)
    dropout: float | int = interval(min=0.0, max=1.0, exclude_max=True)(default=0.0)
    num_inference_steps: int = _field(_non_negative, default=16)
    inference_lr: float | int = _field(_finite, _greater_than_zero, default=0.3)
    inference_lr_min_ratio: float | int = interval(min=0.0, max=1.0, exclude_min=True)(default=0.1)
    posterior_init_logvar: float | int = _field(_finite, default=-5.0)
    posterior_init_logvar_noise: float | int = _field(_finite, _non_negative, default=0.1)
    posterior_fixed_noise: bool = True
    posterior_init_mu_noise: float | int = _field(_finite, _non_negative, default=0.0)
    inference_weight_decay: float | int = _field(_finite, _non_negative, default=0.0)
    inference_lr_schedule: str = _field(_one_of(INFERENCE_LR_SCHEDULES), default="cosine_t_minus_1")
    inference_loss_reduction: str = _field(_one_of(INFERENCE_LOSS_REDUCTIONS), default="per_token")
    eval_inference_steps: int = _field(_non_negative, default=32)
    eval_inference_lr: float | int = _field(_finite, _greater_than_zero, default=0.1)
    eval_inference_lr_min_ratio: float | int = interval(min=0.0, max=1.0, exclude_min=True)(default=0.1)
    eval_posterior_init_logvar: float | int = _field(_finite, default=0.0)
    eval_posterior_init_logvar_noise: float | int = _field(_finite, _non_negative, default=0.0)
    eval_posterior_fixed_noise: bool = False
    eval_select_samples: int = _field(_non_negative, default=4)
    eval_score_samples: int = _field(_positive, default=8)
    prior_type: str = _field(_one_of(PRIOR_TYPES), default="standard_normal")
    prior_flow_layers: int = _field(_positive, default=4)
    prior_flow_hidden: int = _field(_positive, default=64)
    posterior_encoder_size: int = _field(_non_negative, default=0)
    posterior_encoder_fit: str | None = _field(_one_of(POSTERIOR_ENCODER_FITS), default=None)
    eval_warm_start_steps: int = _field(_non_negative, default=8)
    eval_warm_start_lr: float | int = _field(_finite, _greater_than_zero, default=0.03)
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.latent_dim is None:
            self.latent_dim = self.hidden_size
        if self.intermediate_size is None:
            self.intermediate_size = 64 * -(-(8 * self.hidden_size // 3) // 64)
        if self.latent_position_range is None:  # the training context: later context extensions keep it
            self.latent_position_range = self.max_position_embeddings
        super().__post_init__(**kwargs)  # moves an older config.json's `rope_theta` into `rope_parameters`

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the LM head: `vocab_size` rounded up to `pad_vocab_size_to_multiple_of`."""
        multiple = self.pad_vocab_size_to_multiple_of
        return -(-self.vocab_size // multiple) * multiple

    @property
    def max_input_positions(self) -> int:
        """The longest input the model accepts, in RoPE positions: `max_position_embeddings`, or with a RoPE scaling
        the scaled context, `rope_parameters["factor"]` times `rope_parameters["original_max_position_embeddings"]`
        (default `max_position_embeddings`), when that is longer."""
        parameters = self.rope_parameters or {}
        factor = parameters.get("factor") or 1.0
        original = parameters.get("original_max_position_embeddings") or self.max_position_embeddings
        return max(self.max_position_embeddings, int(factor * original))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one sequence's latents: `(num_hidden_layers, n_latents_per_layer, latent_dim)`."""
        return (self.num_hidden_layers, self.n_latents_per_layer, self.latent_dim)

    def validate_architecture(self):
        """Part of `@strict` validation: the relations between the model's shapes."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); choose a hidden_size that is a multiple of the head count."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"the head dimension hidden_size / num_attention_heads = {self.head_dim} must be even for rotary "
                "embeddings."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.prior_type == "flow" and self.latent_dim < 2:
            raise ValueError(
                f'prior_type="flow" couples two halves of each latent vector: latent_dim must be >= 2, got '
                f'{self.latent_dim}; use a wider latent or prior_type="diagonal_gaussian".'
            )
        spread_over = self.n_latents_per_layer
        if self.latent_position_spacing == "all_latents":
            spread_over *= self.num_hidden_layers
        if spread_over > self.latent_position_range:
            raise ValueError(
                f"{'num_hidden_layers * ' if spread_over != self.n_latents_per_layer else ''}n_latents_per_layer "
                f"({spread_over}) must be at most latent_position_range ({self.latent_position_range}, by default "
                f"max_position_embeddings): latents "
                f"get RoPE positions spread over the context (latent_position_spacing="
                f"{self.latent_position_spacing!r})."
            )

    def validate_rope_parameters(self):
        """Part of `@strict` validation: a finite, positive `rope_theta`, and a RoPE type whose positions do not depend
        on the input's length."""
        parameters = self.rope_parameters or {}
        theta = parameters.get("rope_theta", self.default_theta)
        check_number('rope_parameters["rope_theta"]', theta, "> 0", finite=True)
        _static_rope_type(parameters)


__all__ = ["LTMConfig", "MIN_TRANSFORMERS_VERSION", "check_int", "check_number", "is_integer", "is_number"]

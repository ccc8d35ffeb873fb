"""Configuration of Latent-Thought Language Models (LTMs, arXiv:2502.01567).

This file imports only `transformers` so that `save_pretrained` can copy it next to the weights for
`trust_remote_code=True` loading.
"""

import math

from transformers.configuration_utils import PreTrainedConfig


# The oldest transformers release this configuration and the model code run on: the lower bound of pyproject.toml's
# range (a test keeps the two equal). Model cards state it; config.json records, as transformers does, the release that
# wrote it (`transformers_version`).
MIN_TRANSFORMERS_VERSION = "5.24.0"

# `LTMConfig.posterior_encoder_fit`: what a posterior encoder's proposals were fitted to (None: untrained or stale).
POSTERIOR_ENCODER_FITS = (None, "evaluation", "training")


class LTMConfig(PreTrainedConfig):
    r"""
    Configuration of an [`LTMForCausalLM`]: a pre-norm Transformer decoder (RMSNorm, RoPE, SwiGLU, tied embeddings)
    in which every layer cross-attends to its own group of latent "thought" vectors `z_l`, plus the defaults of the
    posterior inference ("fast learning") that fits `q(z|x) = N(mu, diag(exp(logvar)))` to each sequence.

    The defaults follow the paper's public code (12 layers of width 768, 8 latents per layer, GPT-2 vocabulary,
    context 1024, 16 fast steps at learning rate 0.3).

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
            Longest sequence the model accepts, in tokens. Also the span over which the latents' RoPE positions are
            spread.
        rope_theta (`float`, *optional*, defaults to 10000.0):
            Base period of the rotary position embeddings.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the RMSNorm layers.
        hidden_act (`str`, *optional*, defaults to `"silu"`):
            Activation of the gated MLP (a key of transformers' `ACT2FN`; `"silu"` makes it SwiGLU).
        sliding_window (`int`, *optional*):
            Self-attention window in tokens (the paper's code uses 256). `None` means full causal attention.
        n_latents_per_layer (`int`, *optional*, defaults to 8):
            Number of latent vectors each layer cross-attends to.
        latent_dim (`int`, *optional*):
            Width of each latent vector. Defaults to `hidden_size`.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Share the input embedding matrix with the output projection.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of linear and embedding weights.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities and on each sublayer's output, in training mode only.
        num_inference_steps (`int`, *optional*, defaults to 16):
            Default number of fast (posterior) Adam steps `T`.
        inference_lr (`float`, *optional*, defaults to 0.3):
            Default fast learning rate `eta_fast`, cosine-decayed within the `T` steps.
        inference_lr_min_ratio (`float`, *optional*, defaults to 0.1):
            Floor of that cosine decay as a fraction of `inference_lr` (the paper decays to `eta_fast / 10`).
        posterior_init_logvar (`float`, *optional*, defaults to -5.0):
            Initial `logvar` of the posterior; `mu` starts at 0.
        posterior_init_logvar_noise (`float`, *optional*, defaults to 0.1):
            Standard deviation of the Gaussian jitter added to the initial `logvar`.
        posterior_fixed_noise (`bool`, *optional*, defaults to `True`):
            Draw the reparameterisation noise `eps` once and keep it for all fast steps (as the paper's code does);
            `False` draws a new `eps` at every step.

            The six fields above are the *training* fast loop (`PosteriorFitSettings.training`), also used by
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
            Initial `logvar` of the evaluation fit (`mu` starts at 0): 0 starts at the prior, `q = p(z)`, whose KL
            is 0.
        eval_posterior_init_logvar_noise (`float`, *optional*, defaults to 0.0):
            Standard deviation of the jitter added to that initial `logvar`.
        eval_posterior_fixed_noise (`bool`, *optional*, defaults to `False`):
            Keep one `eps` for all evaluation fast steps (`True`) or draw a new one at every step (`False`).
        posterior_encoder_size (`int`, *optional*, defaults to 0):
            Width of the amortized posterior encoder (`LTMPosteriorEncoder`: pooled layer-0 hidden states -> MLP ->
            an initial `(mu, logvar)`); 0 means none. Train it with `modeling_ltm.amortized.fit_posterior_encoder`.
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

    vocab_size: int = 50257
    pad_vocab_size_to_multiple_of: int = 1
    hidden_size: int = 768
    intermediate_size: int | None = None
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    sliding_window: int | None = None
    n_latents_per_layer: int = 8
    latent_dim: int | None = None
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    dropout: float = 0.0
    num_inference_steps: int = 16
    inference_lr: float = 0.3
    inference_lr_min_ratio: float = 0.1
    posterior_init_logvar: float = -5.0
    posterior_init_logvar_noise: float = 0.1
    posterior_fixed_noise: bool = True
    eval_inference_steps: int = 32
    eval_inference_lr: float = 0.1
    eval_inference_lr_min_ratio: float = 0.1
    eval_posterior_init_logvar: float = 0.0
    eval_posterior_init_logvar_noise: float = 0.0
    eval_posterior_fixed_noise: bool = False
    posterior_encoder_size: int = 0
    posterior_encoder_fit: str | None = None
    eval_warm_start_steps: int = 8
    eval_warm_start_lr: float = 0.03
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.latent_dim is None:
            self.latent_dim = self.hidden_size
        if self.intermediate_size is None and isinstance(self.hidden_size, int) and self.hidden_size > 0:
            self.intermediate_size = 64 * -(-(8 * self.hidden_size // 3) // 64)
        self._validate_ltm_fields()
        super().__post_init__(**kwargs)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the LM head: `vocab_size` rounded up to `pad_vocab_size_to_multiple_of`."""
        multiple = self.pad_vocab_size_to_multiple_of
        return -(-self.vocab_size // multiple) * multiple

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one sequence's latents: `(num_hidden_layers, n_latents_per_layer, latent_dim)`."""
        return (self.num_hidden_layers, self.n_latents_per_layer, self.latent_dim)

    def _validate_ltm_fields(self) -> None:
        """Raise `ValueError` naming the first field outside its valid range."""

        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LTMConfig.{name} must be a positive integer, got {value!r}.")

        for name in (
            "vocab_size",
            "pad_vocab_size_to_multiple_of",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "n_latents_per_layer",
            "latent_dim",
        ):
            positive_int(name)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"LTMConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); choose a hidden_size that is a multiple of the head count."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"LTMConfig: head dimension hidden_size / num_attention_heads = {self.head_dim} must be even for "
                "rotary embeddings."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"LTMConfig.num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.n_latents_per_layer > self.max_position_embeddings:
            raise ValueError(
                f"LTMConfig.n_latents_per_layer ({self.n_latents_per_layer}) must be at most max_position_embeddings "
                f"({self.max_position_embeddings}): latents get RoPE positions spread over the context."
            )
        if self.sliding_window is not None:
            positive_int("sliding_window")
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"LTMConfig.hidden_act must be one of transformers' ACT2FN keys, got {self.hidden_act!r}."
            )
        for name in ("posterior_encoder_size", "eval_warm_start_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LTMConfig.{name} must be an integer >= 0, got {value!r}.")
        if self.posterior_encoder_fit not in POSTERIOR_ENCODER_FITS:
            raise ValueError(
                f"LTMConfig.posterior_encoder_fit must be one of {POSTERIOR_ENCODER_FITS}, got "
                f"{self.posterior_encoder_fit!r}."
            )
        lr = self.eval_warm_start_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"LTMConfig.eval_warm_start_lr must be a finite number > 0, got {lr!r}.")
        for name in (
            "rope_theta",
            "rms_norm_eps",
            "dropout",
            "initializer_range",
            "inference_lr",
            "inference_lr_min_ratio",
            "posterior_init_logvar",
            "posterior_init_logvar_noise",
            "eval_inference_lr",
            "eval_inference_lr_min_ratio",
            "eval_posterior_init_logvar",
            "eval_posterior_init_logvar_noise",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"LTMConfig.{name} must be a finite number, got {value!r}.")
        for name in ("posterior_fixed_noise", "eval_posterior_fixed_noise"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LTMConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if not self.rope_theta > 0:
            raise ValueError(f"LTMConfig.rope_theta must be > 0, got {self.rope_theta!r}.")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"LTMConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LTMConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.initializer_range >= 0:
            raise ValueError(f"LTMConfig.initializer_range must be >= 0, got {self.initializer_range!r}.")
        for prefix in ("", "eval_"):
            steps_name = "eval_inference_steps" if prefix else "num_inference_steps"
            steps = getattr(self, steps_name)
            if isinstance(steps, bool) or not isinstance(steps, int):
                raise ValueError(f"LTMConfig.{steps_name} must be an integer >= 0, got {steps!r}.")
            if steps < 0:
                raise ValueError(f"LTMConfig.{steps_name} must be >= 0, got {steps!r}.")
            lr = getattr(self, f"{prefix}inference_lr")
            if not lr > 0:
                raise ValueError(f"LTMConfig.{prefix}inference_lr must be > 0, got {lr!r}.")
            ratio = getattr(self, f"{prefix}inference_lr_min_ratio")
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"LTMConfig.{prefix}inference_lr_min_ratio must be in (0, 1], got {ratio!r}.")
            noise = getattr(self, f"{prefix}posterior_init_logvar_noise")
            if not noise >= 0:
                raise ValueError(f"LTMConfig.{prefix}posterior_init_logvar_noise must be >= 0, got {noise!r}.")


__all__ = ["LTMConfig", "MIN_TRANSFORMERS_VERSION"]

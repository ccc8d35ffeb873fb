"""Thought-conditioned generation for LTMs: settle the latents, then hand over to `GenerationMixin.generate`.

`LTMGenerationMixin.generate` does one thing before the ordinary transformers decoding loop runs: it decides the
latent thought vectors `z` of each prompt, and passes them on as the `latents` model kwarg. Everything else (greedy,
sampling, beam search, `num_return_sequences`, logits processors, stopping criteria, streamers, caches) is
transformers' own code:

- `latents` (a `forward` argument) is expanded by transformers for beams and `num_return_sequences` like any other
  tensor kwarg, and forwarded at every step by the default `prepare_inputs_for_generation`;
- the latents' cross-attention keys (rotated to the latents' positions) and values are projected once, on the first
  forward pass, into the `cross_attention_cache` of the model's `EncoderDecoderCache`, in the standard layout
  `(batch, num_key_value_heads, n_latents_per_layer, head_dim)` (see `LTMCrossAttention`, and `latent_cache_like`
  for a static cache), and reused at every later step; beam search reorders both the self-attention and the
  cross-attention caches (`EncoderDecoderCache.reorder_cache`).

The defaults of the latents' settings live in `LTMGenerationConfig`, the model's `generation_config_class`, so
`save_pretrained` / `from_pretrained` keep them in `generation_config.json` like any other generation default.

Imports only torch, transformers and siblings (copied next to the weights for `trust_remote_code=True`).
"""

import copy

import torch
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache, StaticLayer
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.utils import logging

from .configuration_ltm import check_int, check_number
from .errors import NonFiniteWeightsError
from .inference import fit_posterior
from .randomness import row_content_seeds, row_generators, standard_normal
from .weight_checks import check_finite_weights, latent_prior_of


logger = logging.get_logger(__name__)

# Used when neither generate(), the generation config nor the model config says otherwise (GenerationConfig's own).
_DEFAULT_MAX_LENGTH = 20
# Base seed and purpose tag of the content seeds (`randomness.content_seed`) of a fit on the prompt when decoding is
# deterministic (`do_sample=False`) and no seed or generator is given: each row's seed comes from its own tokens.
GENERATE_CONTENT_SEED = 0
GENERATE_SEED_PURPOSE = "generate"


class LTMGenerationConfig(GenerationConfig):
    r"""[`~generation.GenerationConfig`] plus the defaults of how [`LTMGenerationMixin.generate`] settles the latents.

    A new model builds it from its config (`num_inference_steps`, `inference_lr`, `inference_lr_min_ratio` are
    copied from [`LTMConfig`]); `save_pretrained` writes it to `generation_config.json` and `from_pretrained` reads it
    back as this class. Change a default with `model.generation_config.num_inference_steps = 32`; a `generate()`
    argument of the same name wins for one call.

    Args:
        num_inference_steps (`int`, *optional*):
            Fast Adam steps of posterior fitting on the prompt. `None`: the model config's.
        inference_lr (`float`, *optional*):
            Fast learning rate (decayed by cosine within the steps). `None`: the model config's.
        inference_lr_min_ratio (`float`, *optional*):
            Floor of that decay as a fraction of `inference_lr`. `None`: the model config's.
        latent_temperature (`float`, *optional*):
            Standard deviation of the latents drawn from the prior (`latents="prior"`, or no prompt). `None`: 1.0.
        kwargs:
            Everything [`~generation.GenerationConfig`] accepts.

    Example:

    ```python
    >>> from modeling_ltm.generation_ltm import LTMGenerationConfig
    >>> LTMGenerationConfig(num_inference_steps=32, max_new_tokens=64, do_sample=True).num_inference_steps
    32
    ```
    """

    inference_fields = ("num_inference_steps", "inference_lr", "inference_lr_min_ratio", "latent_temperature")

    def __init__(
        self,
        num_inference_steps: int | None = None,
        inference_lr: float | None = None,
        inference_lr_min_ratio: float | None = None,
        latent_temperature: float | None = None,
        **kwargs,
    ):
        # Set before `GenerationConfig.__init__`, which validates, and which drops unknown keys of a config derived
        # from the model config (`_from_model_config`).
        self.num_inference_steps = num_inference_steps
        self.inference_lr = inference_lr
        self.inference_lr_min_ratio = inference_lr_min_ratio
        self.latent_temperature = latent_temperature
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, model_config) -> "LTMGenerationConfig":
        """`GenerationConfig.from_model_config` (what a new model starts from: special tokens etc.) plus the inference
        fields the model config holds.

        The result is not flagged `_from_model_config`: its fields are settings, and a loader that reads
        `generation_config.json` with the base `GenerationConfig` (which drops unknown keys of a flagged file) keeps
        them. (`GenerationConfig.from_model_config` itself cannot build a subclass with extra fields: it compares
        every field with a base `GenerationConfig`'s.)
        """
        config_dict = model_config if isinstance(model_config, dict) else model_config.to_dict()
        fields = {name: config_dict.get(name) for name in cls.inference_fields}
        common = GenerationConfig.from_model_config(model_config).to_dict()
        return cls(**fields, **{**common, "_from_model_config": False})

    def validate(self, *args, **kwargs):
        """`GenerationConfig.validate`, plus: `ValueError` naming the field when an inference field is out of range."""
        super().validate(*args, **kwargs)
        check_int("num_inference_steps", self.num_inference_steps, optional=True)
        check_number("inference_lr", self.inference_lr, "> 0", optional=True)
        check_number("inference_lr_min_ratio", self.inference_lr_min_ratio, "in (0, 1]", optional=True)
        check_number("latent_temperature", self.latent_temperature, ">= 0", optional=True)


def latent_cache_like(cache: Cache, config) -> Cache:
    """An empty cache for the latents' cross-attention keys/values, to pair with the self-attention `cache` in an
    `EncoderDecoderCache`: for a compilable (static) cache, static layers `n_latents_per_layer` long (full-attention
    layers whatever the self-attention's sliding window: every token sees every latent), so that compiled decoding
    reads fixed addresses; a `DynamicCache` otherwise."""
    if cache.is_compileable:
        return Cache(
            layers=[StaticLayer(max_cache_len=config.n_latents_per_layer) for _ in range(config.num_hidden_layers)]
        )
    return DynamicCache()


class LTMGenerationMixin(GenerationMixin):
    """`generate()` for [`LTMForCausalLM`]: fit `z` on the prompt (or sample it from the prior), then decode with
    [`~generation.GenerationMixin.generate`] (all its arguments and decoding modes work unchanged).

    How `z` is chosen, per prompt:

    - `latents=None` (default) and a non-empty prompt: the posterior `q(z | prompt)` is fitted with
      `num_inference_steps` fast Adam steps at `inference_lr` (see [`inference.fit_posterior`]); decoding uses its
      sample `z = mu + sigma * eps` (`PosteriorOutput.z`, a fresh draw from the fitted posterior). Padding in
      `attention_mask` is honoured, and each row is fitted with its own seed, so a row of a left-padded batch gets the
      latents it would get alone. Without `inference_seed` / `inference_generator`, deterministic decoding
      (`do_sample=False`: greedy, beam search) seeds each row's fit from the row's own (unpadded) tokens, so the same
      prompt gives the same text on every call, alone or in any batch; sampling draws the fit's seed from torch's
      global RNG (see `generate`'s `inference_seed`).
    - `latents="prior"`, or no prompt at all (`inputs=None`, or an empty prompt of shape `(batch, 0)`):
      `z` from the model's prior (`config.prior_type`; its standard normal draws scaled by `latent_temperature`:
      `N(0, latent_temperature^2 I)` for the paper's prior), i.e. unconditional generation. With no prompt, decoding starts from
      `bos_token_id`.
    - `latents=<tensor of shape (batch, num_hidden_layers, n_latents_per_layer, latent_dim)>` or a
      [`PosteriorOutput`] (its `.z` is used): taken as given.

    All return sequences and beams of one prompt share that prompt's `z`. The latents' settings follow transformers'
    precedence for every generation setting: a `generate()` argument, then the `generation_config` argument, then
    `model.generation_config` (saved in `generation_config.json`); still unset, the model config's.
    """

    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        *args,
        latents=None,
        num_inference_steps: int | None = None,
        inference_lr: float | None = None,
        inference_lr_min_ratio: float | None = None,
        latent_temperature: float | None = None,
        inference_seed: int | list[int] | None = None,
        inference_generator: torch.Generator | None = None,
        **kwargs,
    ):
        r"""
        Generate continuations conditioned on latent thought vectors `z` (how `z` is chosen: the class docstring).

        Args:
            inputs (`torch.LongTensor` of shape `(batch, prompt_length)`, *optional*):
                Prompt token ids (also accepted as `input_ids=`). Left-pad batches and pass `attention_mask`.
            latents (`torch.Tensor`, `PosteriorOutput` or `"prior"`, *optional*):
                The latents to decode with, `"prior"` for samples of the prior; `None` fits them on the prompt.
            num_inference_steps, inference_lr, inference_lr_min_ratio, latent_temperature (*optional*):
                [`LTMGenerationConfig`]'s fields for this call: fast steps on the prompt, fast learning rate and the
                floor of its decay, standard deviation of prior samples (default 1.0).
            inference_seed (`int` or `list[int]`, *optional*):
                Seed of the latents' noise. Posterior fit: an int seeds every row alike (a row's latents do not
                depend on its batch), a list one seed per row. Prior samples: an int seeds one generator for the
                batch, a list each row. Neither this nor `inference_generator`:

                - posterior fit with `do_sample=False` (greedy, beam search): each row's seed is a hash of its
                  unpadded prompt tokens (`randomness.content_seed`, as `ltm eval` seeds its fits), so decoding is
                  deterministic: the same prompt gives the same text on every call, and a left-padded batch gives
                  each row what that prompt gives alone;
                - posterior fit with `do_sample=True`, and prior samples (`latents="prior"`, no prompt): a seed from
                  torch's global RNG, the RNG that transformers' token sampling uses too (`transformers.set_seed(...)`
                  makes the call reproducible). Sampling is a draw from the model given the prompt, and `z` is part of
                  that draw: two sampled calls differ in both `z` and the tokens, and a fixed `z` per prompt would
                  narrow the samples to one posterior draw.

                An explicit `inference_seed` or `inference_generator` always wins.
            inference_generator (`torch.Generator`, *optional*):
                A generator for that noise, instead of `inference_seed` (rows then depend on the batch).
            kwargs:
                Everything [`~generation.GenerationMixin.generate`] accepts.

        Raises:
            ValueError: before any work, the prompt plus the new tokens exceed `max_position_embeddings`, or the
                weights hold NaN/inf (`NonFiniteWeightsError`); `latents` of the wrong shape or with NaN/inf
                values; fitting asked for on `inputs_embeds`.

        Example:

        ```python
        >>> out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32, num_inference_steps=16)
        >>> out = model.generate(max_new_tokens=32, do_sample=True, latents="prior")  # unconditional, from BOS
        ```
        """
        prompt, inputs, kwargs = self._prompt_on_device(inputs, kwargs)
        batch_size = prompt.shape[0] if prompt is not None else self._unprompted_batch_size(latents, kwargs)
        if isinstance(inputs, torch.Tensor) and inputs.shape[1] == 0:  # an empty prompt: unconditional, from BOS
            batch_size, inputs = inputs.shape[0], None
        inference_arguments = dict(
            num_inference_steps=num_inference_steps,
            inference_lr=inference_lr,
            inference_lr_min_ratio=inference_lr_min_ratio,
            latent_temperature=latent_temperature,
        )
        # transformers' own precedence: this call's arguments, then `generation_config`, then the model's.
        settings, _ = self._prepare_generation_config(
            generation_config, **kwargs, **{k: v for k, v in inference_arguments.items() if v is not None}
        )
        self._check_generation_length(prompt, kwargs, settings)
        check_finite_weights(self, "generating")
        if (
            prompt is None
            and "inputs_embeds" not in kwargs
            and kwargs.get("bos_token_id", settings.bos_token_id) is None
        ):
            raise ValueError(
                "Generating without a prompt starts from the BOS token, but no `bos_token_id` is set. Pass "
                "`bos_token_id=...` (or set `model.generation_config.bos_token_id`), or give a prompt."
            )
        if inference_seed is None and inference_generator is None and latents is None and prompt is not None:
            if not settings.do_sample:  # deterministic decoding: the fit's noise seeded by each row's own tokens
                inference_seed = row_content_seeds(
                    GENERATE_CONTENT_SEED, prompt, kwargs.get("attention_mask"), GENERATE_SEED_PURPOSE
                )
        latents = self._settle_latents(
            latents, prompt, kwargs, settings, batch_size, inference_seed, inference_generator
        )
        return super().generate(inputs, generation_config, *args, latents=latents, **kwargs)

    def _prompt_on_device(self, inputs, kwargs) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
        """`(prompt, inputs, kwargs)`: the prompt token ids (`inputs`, or `input_ids=` in `kwargs`) and the attention
        mask moved to the model's device where they enter (a prompt or mask made on the CPU, e.g.
        `torch.ones_like(cpu_ids)`, would otherwise meet the model's tensors on another device). An empty prompt
        `(batch, 0)` gives `prompt=None` (unconditional generation, its mask dropped) and `inputs` of shape
        `(batch, 0)`, for the batch size."""
        in_kwargs = inputs is None and "input_ids" in kwargs
        prompt = kwargs.get("input_ids") if in_kwargs else inputs
        if prompt is not None and (not isinstance(prompt, torch.Tensor) or prompt.dim() != 2):
            shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
            raise ValueError(
                f"The prompt must be a (batch, prompt_length) tensor of token ids, got {shape}; add a batch "
                "dimension with `input_ids.unsqueeze(0)`."
            )
        if prompt is not None:
            prompt = prompt.to(self.device)
        if isinstance(kwargs.get("attention_mask"), torch.Tensor):
            kwargs["attention_mask"] = kwargs["attention_mask"].to(self.device)
        if prompt is not None and prompt.shape[1] == 0:
            kwargs.pop("attention_mask", None)
            kwargs.pop("input_ids", None)
            return None, prompt, kwargs
        if in_kwargs:
            kwargs["input_ids"] = prompt
            return prompt, None, kwargs
        return prompt, prompt, kwargs

    def _settle_latents(self, latents, prompt, kwargs, settings, batch_size, seed, generator) -> torch.Tensor:
        """The latents decoding runs with, `(batch, *latent_shape)`: prior samples (`latents="prior"`, or no prompt),
        the posterior fitted on the prompt (`latents=None`), or the given tensor / `PosteriorOutput`, checked."""
        if isinstance(latents, str) and latents != "prior":
            raise ValueError(f'`latents` must be a tensor, a PosteriorOutput, "prior" or None; got {latents!r}.')
        if seed is None and generator is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        if isinstance(latents, str) or (latents is None and prompt is None and "inputs_embeds" not in kwargs):
            temperature = getattr(settings, "latent_temperature", None)
            return self._sample_prior_latents(batch_size, 1.0 if temperature is None else temperature, seed, generator)
        if latents is None:
            if prompt is None:
                raise ValueError(
                    "Posterior fitting needs token ids, but only `inputs_embeds` were given. Pass `input_ids`, "
                    'or `latents=` (a tensor, `model.infer_latents(...)`, or "prior").'
                )
            posterior = fit_posterior(
                self,
                prompt,
                kwargs.get("attention_mask"),
                num_steps=getattr(settings, "num_inference_steps", None),  # None: the model config's
                lr=getattr(settings, "inference_lr", None),
                lr_min_ratio=getattr(settings, "inference_lr_min_ratio", None),
                seed=None if generator is not None else self._row_seeds(seed, batch_size),
                generator=generator,
            )
            logger.info(
                "Fitted z on the prompt: ELBO gain %s nats/token, KL %s nats.",
                posterior.elbo_gain.tolist(),
                posterior.kl.tolist(),
            )
            return posterior.z
        if hasattr(latents, "z") and hasattr(latents, "mu"):  # a PosteriorOutput (duck-typed for remote code)
            latents = latents.z
        if isinstance(latents, torch.Tensor):
            latents = latents.to(self.device)
        self.model.check_latents(latents, batch_size)  # raises naming the expected shape, or NaN/inf values
        return latents

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`GenerationMixin._prepare_cache_for_generation`, whose cache (dynamic, or static for
        `cache_implementation="static"`) becomes the self-attention half of an `EncoderDecoderCache`, as transformers
        does for encoder-decoder models; the other half holds the latents' keys/values (see `latent_cache_like`)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if isinstance(cache, Cache) and not isinstance(cache, EncoderDecoderCache):
            if not getattr(cache, "_is_user_defined", False):
                model_kwargs["cache"] = EncoderDecoderCache(cache, latent_cache_like(cache, self.config))

    def adjust_generation_fn(self, *args, **kwargs):
        """`GenerationMixin.adjust_generation_fn` (run by `from_pretrained`), which reads `generation_config.json`
        with the base `GenerationConfig` (transformers 5.23 and 5.24 use `generation_config_class` only for a new
        model); the result is turned into `generation_config_class`, keeping every field."""
        super().adjust_generation_fn(*args, **kwargs)
        if not isinstance(self.generation_config, self.generation_config_class):
            self.generation_config = self.generation_config_class.from_dict(self.generation_config.to_dict())

    def _unprompted_batch_size(self, latents, kwargs) -> int:
        """Batch size when there is no prompt: from `latents`, `inputs_embeds`, else 1 (transformers' rule)."""
        if isinstance(latents, torch.Tensor):
            return latents.shape[0]
        if hasattr(latents, "z"):
            return latents.z.shape[0]
        if isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
            return kwargs["inputs_embeds"].shape[0]
        return 1

    def _check_generation_length(self, prompt, kwargs, settings) -> None:
        """Raise `ValueError` before any work when the prompt plus the new tokens exceed the context. The total length
        is transformers' own (`_prepare_generated_length` on the call's resolved `settings`)."""
        limit = self.config.max_input_positions  # max_position_embeddings, or the context a RoPE scaling extends
        embeds = kwargs.get("inputs_embeds")
        prompt_length = prompt.shape[1] if prompt is not None else embeds.shape[1] if embeds is not None else 1
        if prompt_length > limit:
            raise ValueError(
                f"The prompt has {prompt_length} tokens, more than max_position_embeddings={limit}. Keep its last "
                f"tokens, leaving room for the new ones: e.g. tokenizer(..., truncation=True, max_length={limit} - "
                "max_new_tokens) with tokenizer.truncation_side = 'left'."
            )
        lengths = self._prepare_generated_length(
            copy.copy(settings),
            has_default_max_length=kwargs.get("max_length") is None and settings.max_length is not None,
            has_default_min_length=kwargs.get("min_length") is None and settings.min_length is not None,
            model_input_name="input_ids",
            input_ids_length=prompt_length,
            inputs_tensor=prompt,
        )
        if lengths.max_length > limit:
            asked = (
                f"max_new_tokens={settings.max_new_tokens}"
                if settings.max_new_tokens is not None
                else f"max_length={settings.max_length}"
            )
            raise ValueError(
                f"Cannot generate {asked} after a prompt of {prompt_length} tokens: prompt + new tokens = "
                f"{lengths.max_length} exceeds the model's context, max_position_embeddings={limit}. Use "
                f"max_new_tokens <= {max(limit - prompt_length, 0)} or a shorter prompt."
            )

    @staticmethod
    def _row_seeds(seed: int | list[int], batch_size: int) -> list[int]:
        """One seed per row, so that each row's posterior is fitted as if the row were alone."""
        seeds = [seed] * batch_size if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != batch_size:
            raise ValueError(f"`inference_seed` has {len(seeds)} seeds for a batch of {batch_size}; give one per row.")
        return seeds

    def _sample_prior_latents(self, batch_size, temperature, seed, generator) -> torch.Tensor:
        """`z` from the model's prior, with its standard normal draws scaled by `temperature` (`N(0, temperature^2 I)`
        for the paper's prior), of shape `(batch_size, *config.latent_shape)`, float32, on the model device.

        An int `seed` seeds one generator for the batch (each row gets its own draw); a list seeds each row."""
        check_number("latent_temperature", temperature, ">= 0")
        if generator is None and not isinstance(seed, int):
            seed = self._row_seeds(seed, batch_size)  # names `inference_seed` when the count is wrong
        generators = row_generators(None if generator is not None else seed, generator, batch_size, self.device)
        noise = temperature * standard_normal((batch_size, *self.config.latent_shape), generators, self.device)
        with torch.no_grad():
            return latent_prior_of(self).sample(noise)


__all__ = [
    "LTMGenerationConfig",
    "LTMGenerationMixin",
    "NonFiniteWeightsError",
    "check_finite_weights",
    "latent_cache_like",
]

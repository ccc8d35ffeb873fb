"""Thought-conditioned generation for LTMs: settle the latents, then hand over to `GenerationMixin.generate`.

`LTMGenerationMixin.generate` does one thing before the ordinary transformers decoding loop runs: it decides the
latent thought vectors `z` of each prompt, and passes them on as the `latents` model kwarg. Everything else (greedy,
sampling, beam search, `num_return_sequences`, logits processors, stopping criteria, streamers, caches) is
transformers' own code:

- `latents` (a `forward` argument) is expanded by transformers for beams and `num_return_sequences` like any other
  tensor kwarg, and forwarded at every step by the default `prepare_inputs_for_generation`;
- the latents' cross-attention keys/values are projected once, on the first forward pass, into the
  `cross_attention_cache` of the model's `EncoderDecoderCache` and reused at every later step; beam search reorders
  both the self-attention and the cross-attention caches (`EncoderDecoderCache.reorder_cache`).

Imports only torch, transformers and siblings (copied next to the weights for `trust_remote_code=True`).
"""

import torch
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.utils import logging

from .inference import fit_posterior


logger = logging.get_logger(__name__)

# Used when neither generate(), the generation config nor the model config says otherwise (GenerationConfig's own).
_DEFAULT_MAX_LENGTH = 20


class NonFiniteWeightsError(ValueError):
    """A model's weights hold NaN or inf values (a diverged training run, or a damaged file)."""


def check_finite_weights(model, action: str = "using it", source: str | None = None) -> None:
    """Raise `NonFiniteWeightsError` naming the first parameter that holds NaN or inf.

    Args:
        model: a module (its `named_parameters()`, in order) or an iterable of `(name, tensor)` pairs (e.g. read
            from a `.safetensors` file one tensor at a time).
        action: what is about to happen ("generating", "exporting", "pushing"), for the message.
        source: the folder or file the weights came from, for the message.

    The counts of bad values are gathered on the device and read back with one host sync.
    """
    named = model.named_parameters() if isinstance(model, torch.nn.Module) else model
    names, counts = [], []
    for name, tensor in named:
        if tensor.is_floating_point() and tensor.numel() > 0:
            device = counts[0].device if counts else tensor.device
            names.append((name, tensor.numel()))
            counts.append((~torch.isfinite(tensor.detach())).sum().to(device))
    if not counts:
        return
    counts = torch.stack(counts)
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


class LTMGenerationMixin(GenerationMixin):
    """`generate()` for [`LTMForCausalLM`]: fit `z` on the prompt (or sample it from the prior), then decode."""

    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        *args,
        latents=None,
        num_inference_steps: int | None = None,
        inference_lr: float | None = None,
        latent_temperature: float | None = None,
        inference_seed: int | list[int] | None = None,
        inference_generator: torch.Generator | None = None,
        **kwargs,
    ):
        r"""
        Generate continuations conditioned on latent thought vectors `z`, then decode with
        [`~generation.GenerationMixin.generate`] (all its arguments and decoding modes work unchanged).

        How `z` is chosen, per prompt:

        - `latents=None` (default) and a non-empty prompt: the posterior `q(z | prompt)` is fitted with
          `num_inference_steps` fast Adam steps at `inference_lr` (see [`inference.fit_posterior`]); decoding uses
          its sample `z = mu + sigma * eps` (`PosteriorOutput.z`, a fresh draw from the fitted posterior). Padding
          in `attention_mask` is honoured, and each row is fitted with its own seed, so a row of a left-padded batch
          gets the latents it would get alone.
        - `latents="prior"`, or no prompt at all (`inputs=None`, or an empty prompt of shape `(batch, 0)`):
          `z ~ N(0, latent_temperature^2 I)`, i.e. unconditional generation. With no prompt, decoding starts from
          `bos_token_id`.
        - `latents=<tensor of shape (batch, num_hidden_layers, n_latents_per_layer, latent_dim)>` or a
          [`PosteriorOutput`] (its `.z` is used): taken as given.

        All return sequences and beams of one prompt share that prompt's `z`.

        Args:
            inputs (`torch.LongTensor` of shape `(batch, prompt_length)`, *optional*):
                Prompt token ids (also accepted as `input_ids=`). Left-pad batches and pass `attention_mask`.
            latents (`torch.Tensor`, `PosteriorOutput` or `"prior"`, *optional*):
                See above.
            num_inference_steps (`int`, *optional*):
                Fast steps of posterior fitting on the prompt. Defaults to `generation_config.num_inference_steps`,
                else `config.num_inference_steps`.
            inference_lr (`float`, *optional*):
                Fast learning rate. Defaults to `generation_config.inference_lr`, else `config.inference_lr`.
            latent_temperature (`float`, *optional*, defaults to 1.0):
                Standard deviation of prior samples (`latents="prior"` / no prompt). Defaults to
                `generation_config.latent_temperature`, else 1.0.
            inference_seed (`int` or `list[int]`, *optional*):
                Seed of the latents' noise. Posterior fit: an int seeds every row alike (a row's latents do not
                depend on the batch it is in), a list gives one seed per row. Prior samples: an int seeds one
                generator for the batch (rows differ), a list seeds each row. When neither this nor
                `inference_generator` is given, a seed is drawn from torch's global RNG, so `torch.manual_seed(...)`
                / `transformers.set_seed(...)` before `generate` makes the whole call reproducible.
            inference_generator (`torch.Generator`, *optional*):
                A CPU generator for that noise, instead of `inference_seed` (rows then depend on the batch).
            kwargs:
                Everything [`~generation.GenerationMixin.generate`] accepts.

        Raises:
            ValueError: the prompt plus `max_new_tokens` (or `max_length`) exceeds `max_position_embeddings`
                (checked before any work); `latents` of the wrong shape or with NaN/inf values; fitting requested on
                `inputs_embeds`.
            NonFiniteWeightsError (a `ValueError`): the model's weights hold NaN/inf (checked before any work).

        Example:

        ```python
        >>> out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32, num_inference_steps=16)
        >>> out = model.generate(max_new_tokens=32, do_sample=True, latents="prior")  # unconditional, from BOS
        ```
        """
        prompt_in_kwargs = inputs is None and "input_ids" in kwargs
        prompt = kwargs.get("input_ids") if prompt_in_kwargs else inputs
        attention_mask = kwargs.get("attention_mask")
        generation_defaults = generation_config if generation_config is not None else self.generation_config

        if prompt is not None and (not isinstance(prompt, torch.Tensor) or prompt.dim() != 2):
            shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
            raise ValueError(
                f"The prompt must be a (batch, prompt_length) tensor of token ids, got {shape}; add a batch "
                "dimension with `input_ids.unsqueeze(0)`."
            )
        if prompt is not None and prompt.shape[1] == 0:
            batch_size = prompt.shape[0]
            prompt = None
            kwargs.pop("attention_mask", None)
            attention_mask = None
        else:
            batch_size = prompt.shape[0] if prompt is not None else self._unprompted_batch_size(latents, kwargs)
        if prompt is None:
            if prompt_in_kwargs:
                kwargs.pop("input_ids")
            inputs = None
        elif not prompt_in_kwargs:
            inputs = prompt

        self._check_generation_length(prompt, kwargs, generation_defaults)
        check_finite_weights(self, "generating")

        if prompt is None and "inputs_embeds" not in kwargs:
            bos = kwargs.get("bos_token_id", generation_defaults.bos_token_id)
            if bos is None:
                bos = self.generation_config.bos_token_id
            if bos is None:
                raise ValueError(
                    "Generating without a prompt starts from the BOS token, but no `bos_token_id` is set. Pass "
                    "`bos_token_id=...` (or set `model.generation_config.bos_token_id`), or give a prompt."
                )

        def setting(value, name, fallback):
            """A generate() argument, else the generation config's attribute, else `fallback`."""
            if value is not None:
                return value
            value = getattr(generation_defaults, name, None)
            if value is None and generation_defaults is not self.generation_config:
                value = getattr(self.generation_config, name, None)
            return fallback if value is None else value

        if isinstance(latents, str) and latents != "prior":
            raise ValueError(f'`latents` must be a tensor, a PosteriorOutput, "prior" or None; got {latents!r}.')
        seed = inference_seed
        if seed is None and inference_generator is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        if isinstance(latents, str) or (latents is None and prompt is None and "inputs_embeds" not in kwargs):
            temperature = setting(latent_temperature, "latent_temperature", 1.0)
            latents = self._sample_prior_latents(batch_size, temperature, seed, inference_generator)
        elif latents is None:
            if prompt is None:
                raise ValueError(
                    "Posterior fitting needs token ids, but only `inputs_embeds` were given. Pass `input_ids`, "
                    'or `latents=` (a tensor, `model.infer_latents(...)`, or "prior").'
                )
            posterior = fit_posterior(
                self,
                prompt,
                attention_mask,
                num_steps=setting(num_inference_steps, "num_inference_steps", self.config.num_inference_steps),
                lr=setting(inference_lr, "inference_lr", self.config.inference_lr),
                seed=None if inference_generator is not None else self._row_seeds(seed, batch_size),
                generator=inference_generator,
            )
            logger.info(
                "Fitted z on the prompt: ELBO gain %s nats/token, KL %s nats.",
                posterior.elbo_gain.tolist(),
                posterior.kl.tolist(),
            )
            latents = posterior.z
        else:
            if hasattr(latents, "z") and hasattr(latents, "mu"):  # a PosteriorOutput (duck-typed for remote code)
                latents = latents.z
            if isinstance(latents, torch.Tensor):
                latents = latents.to(self.device)
            self.model.check_latents(latents, batch_size)  # raises naming the expected shape, or NaN/inf values
        return super().generate(inputs, generation_config, *args, latents=latents, **kwargs)

    def set_inference_defaults(
        self,
        num_inference_steps: int | None = None,
        inference_lr: float | None = None,
        latent_temperature: float | None = None,
    ) -> GenerationConfig:
        """Store `generate()`'s defaults for the latents in `self.generation_config` (those not None), so that
        `save_pretrained` / `from_pretrained` keep them in `generation_config.json`.

        Use this rather than setting the attributes by hand: a generation config derived from the model config
        (`_from_model_config=True`, the default of a new model) drops custom attributes when it is loaded back.
        """
        values = dict(
            num_inference_steps=num_inference_steps, inference_lr=inference_lr, latent_temperature=latent_temperature
        )
        for name, value in values.items():
            if value is not None:
                setattr(self.generation_config, name, value)
        self.generation_config._from_model_config = False
        return self.generation_config

    def _unprompted_batch_size(self, latents, kwargs) -> int:
        """Batch size when there is no prompt: from `latents`, `inputs_embeds`, else 1 (transformers' rule)."""
        if isinstance(latents, torch.Tensor):
            return latents.shape[0]
        if hasattr(latents, "z"):
            return latents.z.shape[0]
        if isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
            return kwargs["inputs_embeds"].shape[0]
        return 1

    def _check_generation_length(self, prompt, kwargs, generation_defaults) -> None:
        """Raise `ValueError` before any work when the prompt plus the new tokens exceed the context."""
        limit = self.config.max_position_embeddings
        if prompt is not None:
            prompt_length = prompt.shape[1]
        elif isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
            prompt_length = kwargs["inputs_embeds"].shape[1]
        else:
            prompt_length = 1  # the BOS token
        if prompt_length > limit:
            raise ValueError(
                f"The prompt has {prompt_length} tokens, more than max_position_embeddings={limit}. Keep its last "
                f"tokens, leaving room for the new ones: e.g. tokenizer(..., truncation=True, max_length={limit} - "
                "max_new_tokens) with tokenizer.truncation_side = 'left'."
            )

        def resolved(name):
            if kwargs.get(name) is not None:
                return kwargs[name]
            for source in (generation_defaults, self.generation_config):
                if getattr(source, name, None) is not None:
                    return getattr(source, name)
            return None

        max_new_tokens = resolved("max_new_tokens")
        if max_new_tokens is not None:
            total, asked = prompt_length + max_new_tokens, f"max_new_tokens={max_new_tokens}"
        else:
            total = resolved("max_length") or _DEFAULT_MAX_LENGTH
            asked = f"max_length={total}"
        if total > limit:
            raise ValueError(
                f"Cannot generate {asked} after a prompt of {prompt_length} tokens: prompt + new tokens = {total} "
                f"exceeds the model's context, max_position_embeddings={limit}. Use max_new_tokens <= "
                f"{max(limit - prompt_length, 0)} or a shorter prompt."
            )

    @staticmethod
    def _row_seeds(seed: int | list[int], batch_size: int) -> list[int]:
        """One seed per row, so that each row's posterior is fitted as if the row were alone."""
        seeds = [seed] * batch_size if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != batch_size:
            raise ValueError(f"`inference_seed` has {len(seeds)} seeds for a batch of {batch_size}; give one per row.")
        return seeds

    def _sample_prior_latents(self, batch_size, temperature, seed, generator) -> torch.Tensor:
        """`z ~ N(0, temperature^2 I)` of shape `(batch_size, *config.latent_shape)`, float32, on the model device.

        An int `seed` seeds one generator for the batch (each row gets its own draw); a list seeds each row."""
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"`latent_temperature` must be a number >= 0, got {temperature!r}.")
        shape = (batch_size, *self.config.latent_shape)
        if generator is None and not isinstance(seed, int):
            seeds = self._row_seeds(seed, batch_size)
            noise = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        else:
            noise = torch.randn(shape, generator=generator or torch.Generator().manual_seed(seed))
        return (temperature * noise).to(self.device)


__all__ = ["LTMGenerationMixin", "NonFiniteWeightsError", "check_finite_weights"]

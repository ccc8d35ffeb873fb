"""lm-evaluation-harness model `ltm`: Latent-Thought Language Models scored without peeking at the answer.

`LTMLM` is lm-eval's own `HFLM` (model `hf`) with the latent thought vectors added, as lm-eval's Mamba wrapper is
`HFLM` with Mamba's loading: `model_args` parsing, device and dtype, model and tokenizer loading, batching, the
`generate_until` loop and multi-process evaluation (`accelerate launch` / `torchrun`) are HFLM's. Only what an LTM
does differently is overridden:

An LTM's likelihood of a text depends on its latents `z`, which are not computed by the network but fitted per
sequence by posterior inference (the fast loop, `modeling_ltm.inference`). Every fit uses the model's *evaluation*
settings (`PosteriorFitSettings.evaluation(config)`: start at the prior, `eps` redrawn every step,
`config.eval_inference_steps` steps at `config.eval_inference_lr`); `num_inference_steps` / `inference_lr` override
its steps and learning rate. Fits always pass an attention mask (HFLM's `_model_call` passes none), so padding never
enters a posterior.

- `loglikelihood(context, continuation)`: `z` is fitted on the **context only**, then the continuation is scored
  given `(context, z)` with one forward pass over context + continuation. The continuation never influences `z`,
  so multiple-choice answers are compared under the same thought vectors. The result is a plug-in estimate of
  `log p(continuation | context)`, not a bound.
- `loglikelihood_rolling(text)`: a lower bound on `log p(text)`, the ELBO `-(NLL given z + KL(q || p))` (or the
  importance-weighted bound with `iw_samples > 0`) of each rolling window, summed over windows
  (`modeling_ltm.inference.evaluate_posterior`). Never the conditional NLL without its KL, and never the paper's
  reconstruction perplexity.
- `generate_until(context, gen_kwargs)`: HFLM's loop; its `_model_generate` hook fits `z` on each (truncated)
  context and calls `model.generate(latents=z, ...)`.

Every posterior fit is seeded per sequence from the base `seed` and the sequence's token ids, so a request's
result does not depend on the batch it lands in, on batch size, on request order or on the number of processes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (registers lm-eval's built-in names, so "hf" etc. still resolve)
import torch
import torch.nn.functional as F
import transformers
from lm_eval import utils as lm_eval_utils
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator, normalize_gen_kwargs
from tqdm import tqdm

import modeling_ltm  # noqa: F401  (registers model_type "ltm" with the Auto classes)
from modeling_ltm.tooling.budgets import check_inference_steps, check_iw_samples, check_memory
from modeling_ltm.tooling.cli_errors import check_model_folder, load_checked_model, looks_like_a_local_path
from modeling_ltm.inference import PosteriorFitSettings, content_seed, evaluate_posterior, fit_posterior
from modeling_ltm.weight_checks import latent_prior_of


logger = transformers.utils.logging.get_logger(__name__)

# The model_args model `ltm` adds to lm-eval's `hf` model (HFLM); every other model_arg is HFLM's.
MODEL_ARGS = ("num_inference_steps", "inference_lr", "iw_samples", "seed")


def finish_processes() -> None:
    """End a multi-process evaluation (`accelerate launch` / `torchrun`) cleanly: wait for every process, then destroy
    the process group. A process that exits while another still talks to it over gloo can abort at interpreter exit
    ("terminate called without an active exception"), failing the launch after the results were written. A no-op in
    a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate import PartialState

        state = PartialState()
        state.wait_for_everyone()
        state.destroy_process_group()


def _register(cls: type) -> type:
    """`@register_model("ltm")` that tolerates a second import of this module (e.g. under another name or after a
    reload): lm-eval raises when a name is re-registered with a different class object."""
    existing = model_registry.get("ltm", None)
    if existing is None:
        return register_model("ltm")(cls)
    if isinstance(existing, type) and (existing.__module__, existing.__qualname__) == (
        cls.__module__,
        cls.__qualname__,
    ):
        return cls
    raise ValueError(f"lm-eval model name 'ltm' is already registered to {existing!r}; cannot register {cls!r}.")


def _as_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.") from None
    if number != float(value) or number < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return number


class _CheckedLoading:
    """HFLM's `AUTO_MODEL_CLASS` while it loads the model: `from_pretrained` through
    `modeling_ltm.tooling.cli_errors.load_checked_model`, as `ltm generate` and `ltm export` load."""

    def __init__(self, auto_class):
        self.auto_class = auto_class

    def from_pretrained(self, pretrained, **kwargs):
        return load_checked_model(pretrained, "evaluating", self.auto_class, **kwargs)

    def __getattr__(self, name):
        return getattr(self.auto_class, name)


def _check_arguments(pretrained, backend: str, batch_size, kwargs: dict) -> None:
    """`LTMLM`'s checks of its arguments before loading anything: `pretrained` given (with a tokenizer for an
    instance), a causal backend, integer batch sizes, and an intact model folder."""
    if pretrained is None:
        raise ValueError("model 'ltm' needs `pretrained` (a model folder, Hub id or LTMForCausalLM instance).")
    if backend != "causal":
        raise ValueError(f"model 'ltm' is a causal LM; `backend` must be 'causal', got {backend!r}.")
    if str(batch_size).startswith("auto"):
        raise ValueError(
            f"batch_size={batch_size!r} is not supported by model 'ltm' (HFLM sizes batches by a forward pass; "
            "every posterior fit step also takes a backward pass); pass an integer, e.g. --batch_size 8."
        )
    if (
        not isinstance(pretrained, str)
        and kwargs.get("tokenizer") is None
        and not getattr(pretrained, "name_or_path", "")
    ):
        raise ValueError("Pass `tokenizer` (a tokenizer or its path) when `pretrained` is a model instance.")
    if not str(batch_size).startswith("auto"):
        _as_int("batch_size", batch_size, 1)
    if kwargs.get("max_batch_size") is not None:
        _as_int("max_batch_size", kwargs["max_batch_size"], 1)
    if isinstance(pretrained, str) and (
        os.path.exists(os.path.expanduser(pretrained)) or looks_like_a_local_path(pretrained)
    ):
        # names a damaged config.json or a truncated .safetensors file, and refuses pickled weights, by path
        check_model_folder(os.path.expanduser(pretrained), "pretrained", model_type="ltm")


@_register
class LTMLM(HFLM):
    """lm-eval model `ltm` for [`LTMForCausalLM`]: lm-eval's `HFLM` with posterior inference of the latents.

    Args (lm-eval `model_args`, e.g. `--model_args pretrained=runs/ltm-tiny,num_inference_steps=16`): every
    argument of lm-eval's `hf` model (`HFLM`: `pretrained`, `tokenizer`, `batch_size`, `device`, `dtype`,
    `max_length`, `trust_remote_code`, `revision`, `prefix_token_id`, ...; any other keyword goes to
    `from_pretrained`, so `LTMConfig` fields can be overridden), plus:
        num_inference_steps (`int`, *optional*): fast steps `T` of every posterior fit (context, window or prompt).
            Defaults to `config.eval_inference_steps` (the evaluation fit; see `PosteriorFitSettings.evaluation`).
        inference_lr (`float`, *optional*): fast learning rate. Defaults to `config.eval_inference_lr`.
        iw_samples (`int`, defaults to 0): `loglikelihood_rolling` reports the importance-weighted bound with this
            many samples of `q(z|x)` when > 0, else the ELBO.
        seed (`int`, defaults to 1234): base seed of every posterior fit (each sequence gets a seed derived from it
            and its token ids).
    Defaults that differ from HFLM's: `device` is CUDA when available, else the CPU (HFLM: "cuda"); `dtype` is
    "float32" (HFLM: "auto"); `backend` can only be "causal".

    Raises:
        ValueError: a model_arg that neither HFLM, `from_pretrained` nor the config knows (the message names it),
            invalid values of the LTM arguments, `batch_size="auto"` (HFLM sizes batches by a forward pass; the fast
            loop also takes a backward pass per step), `max_length` beyond `max_position_embeddings`.
        TypeError: `pretrained` is not a Latent-Thought LM.
    """

    def __init__(
        self,
        pretrained: str | transformers.PreTrainedModel | None = None,
        num_inference_steps: int | None = None,
        inference_lr: float | None = None,
        iw_samples: int = 0,
        seed: int = 1234,
        backend: str = "causal",
        device: str | None = None,
        dtype: str | torch.dtype | None = "float32",
        batch_size: int | str = 1,
        **kwargs: Any,
    ) -> None:
        _check_arguments(pretrained, backend, batch_size, kwargs)
        self.iw_samples = _as_int("iw_samples", iw_samples, 0)
        check_iw_samples("`iw_samples`", self.iw_samples)
        self.seed = _as_int("seed", seed, 0)
        steps = None if num_inference_steps is None else _as_int("num_inference_steps", num_inference_steps, 0)
        check_inference_steps("`num_inference_steps`", steps)
        try:
            lr = None if inference_lr is None else float(inference_lr)
        except (TypeError, ValueError):
            lr = float("nan")
        if lr is not None and not lr > 0:
            raise ValueError(f"`inference_lr` must be a number > 0, got {inference_lr!r}.")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"

        super().__init__(
            pretrained=pretrained, backend="causal", device=device, dtype=dtype, batch_size=batch_size, **kwargs
        )

        if not callable(getattr(self.model, "infer_latents", None)):
            raise TypeError(
                f"`pretrained` is a {type(self.model).__name__}, not a Latent-Thought LM (no `infer_latents`); use "
                "lm-eval's `--model hf` for ordinary causal LMs."
            )
        self._check_tokenizer_and_length()
        accelerator = getattr(self, "accelerator", None)
        self._cpu_processes = None
        if accelerator is not None and accelerator.num_processes > 1 and self.world_size == 1:
            # lm-eval 0.4.13's HFLM splits the requests between processes only when more than one GPU is visible;
            # on CPU (gloo) every process would evaluate everything. `rank` / `world_size` below say the truth.
            self._cpu_processes = (accelerator.process_index, accelerator.num_processes)
        self._check_processes_and_memory(pretrained, kwargs)
        self.fit_settings = PosteriorFitSettings.evaluation(self.model.config, num_steps=steps, lr=lr)
        check_inference_steps(
            "`num_inference_steps` (the model config's eval_inference_steps)", self.fit_settings.num_steps
        )
        self.num_inference_steps, self.inference_lr = self.fit_settings.num_steps, self.fit_settings.lr
        self.rolling_totals = {"nll": 0.0, "kl": 0.0, "bound": 0.0, "tokens": 0}

    def _check_tokenizer_and_length(self) -> None:
        """`ValueError` for a tokenizer with ids the model has no embedding for or without EOS, or a `max_length`
        past the model's context."""
        vocab_size = self.model.config.vocab_size
        if len(self.tokenizer) > vocab_size:
            raise ValueError(
                f"The tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is {vocab_size}: ids from "
                f"{vocab_size} on have no embedding. Pass the tokenizer the model was trained with (`tokenizer=`, or "
                "save it next to the model)."
            )
        if self.tokenizer.eos_token_id is None:
            raise ValueError(
                "The tokenizer has no EOS token; model 'ltm' needs it as the end-of-text token (stop sequence of "
                "generation, conditioning prefix of rolling windows). Set `tokenizer.eos_token`."
            )
        positions = self.model.config.max_position_embeddings
        if self.max_length > positions:
            raise ValueError(
                f"max_length={self.max_length} exceeds the model's max_position_embeddings ({positions}); pass "
                f"max_length <= {positions}."
            )

    def _check_processes_and_memory(self, pretrained, kwargs: dict) -> None:
        """`ValueError` for several launched processes that accelerate sees as one; `check_memory` of a batch."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.world_size == 1 and isinstance(pretrained, str) and kwargs.get("tp_plan") is None:
            raise ValueError(
                f"Launched as {launched} processes (WORLD_SIZE={launched}), but accelerate sees one, so each would "
                "evaluate every request. Without GPUs, set ACCELERATE_USE_CPU=1 (as `accelerate launch --cpu` "
                "does), e.g. `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m eval_harness ...`."
            )
        if isinstance(self.batch_size, int):  # the rows of one batch of windows, with a backward pass per fast step
            half = self.model.dtype in (torch.bfloat16, torch.float16) or self.mixed_precision_dtype is not None
            rows, length = self.batch_size, self.max_length
            check_memory(
                "batch_size", rows, self.model.config, rows, length, self.device, half_precision=half,
                iw_samples=self.iw_samples, iw_flag="iw_samples=",
            )  # fmt: skip

    @property
    def rank(self) -> int:
        """lm-eval's process index (`TemplateLM.rank`, which a model overrides for data-parallel evaluation), with the
        CPU processes that HFLM itself does not split counted."""
        processes = getattr(self, "_cpu_processes", None)
        return super().rank if processes is None else processes[0]

    @property
    def world_size(self) -> int:
        """lm-eval's number of processes (`TemplateLM.world_size`); see `rank`."""
        processes = getattr(self, "_cpu_processes", None)
        return super().world_size if processes is None else processes[1]

    def _create_model(self, pretrained: str, **kwargs) -> None:
        """HFLM's loading, through `cli_errors.load_checked_model` (weights with a missing, unexpected or mismatched
        tensor are refused, naming them); a model_arg nobody knows reaches `LTMForCausalLM.__init__`, and is named
        here."""
        auto_class = self.AUTO_MODEL_CLASS
        self.AUTO_MODEL_CLASS = _CheckedLoading(auto_class)
        try:
            super()._create_model(pretrained, **kwargs)
        except TypeError as error:
            unknown = re.findall(r"unexpected keyword argument '(\w+)'", str(error))
            if not unknown:
                raise
            raise ValueError(
                f"Unknown model_args for model 'ltm': {unknown}. Valid model_args: {', '.join(MODEL_ARGS)}, those "
                "of lm-eval's `hf` model (pretrained, tokenizer, batch_size, device, dtype, max_length, "
                "trust_remote_code, ...), LTMConfig fields and from_pretrained keyword arguments."
            ) from error
        finally:
            self.AUTO_MODEL_CLASS = auto_class

    def get_model_info(self) -> dict:
        """HFLM's model info plus how the latents were inferred and, for rolling requests, the bound's parts in nats
        per scored token (so a perplexity bound always comes with its KL); added to lm-eval's results `config`."""
        info = super().get_model_info() | {
            "ltm_num_inference_steps": self.num_inference_steps,
            "ltm_inference_lr": self.inference_lr,
            "ltm_fit_settings": self.fit_settings.describe(),
            "ltm_seed": self.seed,
            "ltm_rolling_bound": f"importance_weighted(K={self.iw_samples})" if self.iw_samples else "elbo",
        }
        tokens = self.rolling_totals["tokens"]
        if tokens:
            info |= {
                "ltm_rolling_tokens": tokens,
                "ltm_rolling_nll_per_token": self.rolling_totals["nll"] / tokens,
                "ltm_rolling_kl_per_token": self.rolling_totals["kl"] / tokens,
                "ltm_rolling_neg_bound_per_token": -self.rolling_totals["bound"] / tokens,
            }
        return info

    # ---------------------------------------------------------------------------------------- masked model calls

    def _left_pad(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad token lists with the tokenizer → `(input_ids, attention_mask)`, both `(batch, longest)` on the
        model's device; the model derives positions from the mask, so a padded row is processed as it would be
        alone."""
        batch = self.tokenizer.pad(
            {"input_ids": [list(s) for s in sequences]}, padding_side="left", return_tensors="pt"
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def _model_call_with_latents(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        """HFLM's `_model_call` with the attention mask and the latents: logits `(batch, seq, vocab)`."""
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, latents=latents, use_cache=False
            ).logits

    def fit_context_latents(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Latents `z` for each context: `(len(contexts), num_hidden_layers, n_latents_per_layer, latent_dim)`.

        Contexts are fitted together (left-padded, masked), each with its own content seed; `z` is
        `PosteriorOutput.z`, a fresh draw from the fitted posterior (as `generate()` uses). A context of fewer than
        2 tokens has no token to predict, hence no evidence about `z`: it gets the prior's mean (`z = 0` for N(0, I)).
        """
        prior_mean = latent_prior_of(self.model).start(self.device)[0]
        latents = prior_mean.expand(len(contexts), *prior_mean.shape).clone()
        rows = [i for i, ctx in enumerate(contexts) if len(ctx) >= 2]
        if rows:
            ids, mask = self._left_pad([contexts[i] for i in rows])
            posterior = fit_posterior(
                self.model,
                ids,
                mask,
                settings=self.fit_settings,
                seed=[content_seed(self.seed, contexts[i], "context") for i in rows],
            )
            latents[rows] = posterior.z.to(latents.dtype)
        return latents

    # ------------------------------------------------------------------------------------------ loglikelihood

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        for index, request in enumerate(requests):
            context, continuation = request.args
            if continuation == "":
                raise ValueError(
                    f"loglikelihood request {index} has an empty continuation (context {context[-40:]!r}); there is "
                    "nothing to score. Check the task's doc_to_target / doc_to_choice."
                )
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _split_request(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[list[int], list[int]]:
        """`(model input, visible context)` for one request, left-truncated to the model's length as HFLM does:

        CTX      CONT
        0 1 2 3|4 5 6 7 8 9
        input:   the last `max_length` tokens of `(ctx + cont)[:-1]`
        context: the part of the input before the continuation (what `z` is fitted on)
        """
        if not continuation_enc:
            raise ValueError("A loglikelihood continuation tokenized to zero tokens; there is nothing to score.")
        if len(continuation_enc) > self.max_length:
            raise ValueError(
                f"A continuation of {len(continuation_enc)} tokens is longer than the model's context "
                f"({self.max_length} tokens); it cannot be scored in one window."
            )
        whole = context_enc + continuation_enc
        if len(whole) > self.max_length + 1:
            logger.warning_once(
                f"Context + continuation exceed the model's {self.max_length} tokens; contexts are left-truncated "
                "(as lm-eval's HF model does), and z is fitted on the truncated context."
            )
        model_input = whole[-(self.max_length + 1) :][:-1]
        return model_input, model_input[: len(model_input) - len(continuation_enc) + 1]

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        """Score `(request_strings, context_enc, continuation_enc)` triples → `(log p(cont | ctx, z), is_greedy)`.

        Replaces HFLM's (which calls the model without latents and without a mask). Requests are sorted by visible
        context (longest first, identical contexts adjacent), so each distinct context is fitted once per batch
        even when a multiple-choice task asks about several continuations; the original order is restored at the
        end.
        """
        prepared = [(strings, *self._split_request(ctx, cont), cont) for strings, ctx, cont in requests]

        def sort_key(item):
            _, model_input, context, continuation = item
            return -len(context), tuple(context), -len(continuation), tuple(continuation)

        collator = Collator(prepared, sort_fn=sort_key)
        results = []
        previous_latents: dict[tuple[int, ...], torch.Tensor] = {}
        progress = tqdm(
            total=len(prepared),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests (ltm)",
        )
        for chunk in collator.get_batched(n=override_bs or self.batch_size):
            contexts = list(dict.fromkeys(tuple(item[2]) for item in chunk))
            to_fit = [c for c in contexts if c not in previous_latents]
            fitted = dict(zip(to_fit, self.fit_context_latents(to_fit), strict=True)) if to_fit else {}
            latents_by_context = {c: previous_latents.get(c, fitted.get(c)) for c in contexts}
            previous_latents = latents_by_context

            ids, mask = self._left_pad([item[1] for item in chunk])
            latents = torch.stack([latents_by_context[tuple(item[2])] for item in chunk])
            logits = self._model_call_with_latents(ids, mask, latents)
            log_probs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype or torch.float32)  # (B, T, V)
            for row, (strings, _, _, continuation) in enumerate(chunk):
                # Left padding puts every row's last input token at the last position.
                cont_log_probs = log_probs[row, -len(continuation) :]  # (len(cont), V)
                targets = torch.tensor(continuation, device=cont_log_probs.device)
                is_greedy = bool((cont_log_probs.argmax(-1) == targets).all())
                answer = (float(cont_log_probs.gather(-1, targets[:, None]).sum()), is_greedy)
                results.append(answer)
                if strings is not None:
                    self.cache_hook.add_partial("loglikelihood", strings, answer)
                progress.update(1)
        progress.close()
        return collator.get_original(results)

    # ---------------------------------------------------------------------------------- loglikelihood_rolling

    def rolling_windows(self, string: str) -> list[tuple[list[int], list[int]]]:
        """`(conditioning, predicted)` token windows of `string`, each fitting in the model's context.

        lm-eval's rolling scheme (`get_rolling_token_windows` + `make_disjoint_window`, context_len 1) with
        `max_seq_len = max_length - 1` (HFLM: `max_length`), so that conditioning + predicted tokens fit in one
        sequence (the fast loop scores tokens inside the sequence it is given). With max_length 5:

            tokens:  0 1 2 3 4 5 6 7 8 9        prefix: EOT
            window 1:  EOT | 0 1 2 3            scored: 0 1 2 3
            window 2:    3 | 4 5 6 7            scored: 4 5 6 7
            window 3:    7 | 8 9                scored: 8 9

        Every token is scored exactly once; each window gets its own posterior `q(z_w | window)`.
        """
        return [
            lm_eval_utils.make_disjoint_window(window)
            for window in lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1,
                context_len=1,
            )
        ]

    def window_seed(self, window: tuple[Sequence[int], Sequence[int]]) -> int:
        """Seed of a rolling window's posterior fit (depends on the window's tokens and the base seed only)."""
        conditioning, predicted = window
        return content_seed(self.seed, list(conditioning) + list(predicted), "rolling")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A lower bound on `log p(text)` in nats for each request's text, for perplexity tasks.

        The text is split into windows of the model's context (see [`rolling_windows`]); window `w` with
        conditioning tokens `c_w` and predicted tokens `x_w` gets its own posterior `q(z_w)`, fitted with the fast
        loop on that window alone with only `x_w` in the likelihood, and contributes

            ELBO_w = E_q[log p(x_w | c_w, z_w)] - KL(q(z_w) || p(z_w))          (iw_samples = 0)
            IW_w   = log 1/K sum_k p(x_w | c_w, z_k) p(z_k) / q(z_k),  z_k ~ q   (iw_samples = K > 0)

        The sum over windows bounds `sum_w log p(x_w | c_w)`, lm-eval's rolling log-likelihood (each window's
        latents are independent draws from the prior: the model never sees more than one window). Both come from
        `evaluate_posterior(model, window, settings=self.fit_settings, seed=[self.window_seed(window)])` (the
        evaluation fit; the ELBO is a single draw from the fitted posterior). The NLL and KL totals are kept in
        `self.rolling_totals` (summed over all processes; a request lm-eval repeats to even out the processes' shares
        counts once) and reported by `get_model_info()`.
        """
        windows, owners = [], []
        for index, request in enumerate(requests):
            (string,) = request.args
            for window in self.rolling_windows(string):
                windows.append(window)
                owners.append(index)
        first_index = {}
        for index, request in enumerate(requests):
            first_index.setdefault(id(request), index)

        order = sorted(range(len(windows)), key=lambda i: -(len(windows[i][0]) + len(windows[i][1])))
        bounds = [0.0] * len(windows)
        totals = torch.zeros(4, dtype=torch.float64)  # nll, kl, bound, tokens over the requests counted once
        for start in tqdm(
            range(0, len(order), self.batch_size),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood_rolling (ltm)",
        ):
            batch = order[start : start + self.batch_size]
            ids, mask = self._left_pad([windows[i][0] + windows[i][1] for i in batch])
            # Only the predicted tokens are scored: each row's last len(predicted) positions.
            num_predicted = torch.tensor([len(windows[i][1]) for i in batch], device=ids.device)
            scored = torch.arange(ids.shape[1], device=ids.device) >= ids.shape[1] - num_predicted[:, None]
            result = evaluate_posterior(
                self.model,
                ids,
                mask,
                labels=ids.masked_fill(~scored, -100),
                settings=self.fit_settings,
                iw_samples=self.iw_samples,
                seed=[self.window_seed(windows[i]) for i in batch],
            )
            bound = result.iw if self.iw_samples > 0 else result.elbo
            for row, i in enumerate(batch):
                bounds[i] = float(bound[row])
                if first_index[id(requests[owners[i]])] == owners[i]:
                    parts = (result.nll[row], result.kl[row], bound[row], result.num_tokens[row])
                    totals += torch.tensor([float(p) for p in parts], dtype=torch.float64)
        if self.world_size > 1:
            wire_dtype = torch.float32 if torch.device(self.device).type == "mps" else torch.float64  # MPS: no float64
            totals = (
                self.all_gather(totals.to(self.device, wire_dtype)).view(self.world_size, -1).sum(0).cpu().double()
            )
        for key, value in zip(("nll", "kl", "bound", "tokens"), totals.tolist(), strict=True):
            self.rolling_totals[key] += int(value) if key == "tokens" else value

        per_request = [0.0] * len(requests)
        for i, owner in enumerate(owners):
            per_request[owner] += bounds[i]
        for request, total in zip(requests, per_request, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return per_request

    # ----------------------------------------------------------------------------------------- generate_until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """HFLM's `generate_until` (contexts left-truncated to `max_length - max_gen_toks` tokens, lm-eval's stop
        sequences), with `z` fitted on each truncated context in [`_model_generate`]. A `max_gen_toks` that leaves
        no room for the context raises a `ValueError` before any work."""
        for request in requests:
            max_gen_toks = normalize_gen_kwargs(request.args[1], self.max_gen_toks)["max_gen_toks"]
            if max_gen_toks >= self.max_length:
                raise ValueError(
                    f"max_gen_toks={max_gen_toks} leaves no room for the context in the model's {self.max_length} "
                    "tokens; lower max_gen_toks (task generation_kwargs or --gen_kwargs max_gen_toks=...)."
                )
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """HFLM's `_model_generate` with latents: `z` is fitted on each row's tokens (content-seeded, see
        [`fit_context_latents`]) and passed as `model.generate(latents=z, ...)`.

        `context` is HFLM's left-padded `(batch, width)` batch, `generation_kwargs["attention_mask"]` its mask. A
        row without tokens (empty context) is conditioned on the prefix token, as lm-eval conditions an empty
        loglikelihood context: one column is added on the left and dropped from the output, so the output keeps
        HFLM's layout `(batch, width + new tokens)`.
        """
        mask = generation_kwargs.pop("attention_mask", None)
        mask = torch.ones_like(context) if mask is None else mask.to(context.device)
        empty = ~mask.bool().any(dim=1)
        added = int(empty.any())
        if added:
            pad = context.new_full((context.shape[0], 1), self.tokenizer.pad_token_id)
            context, mask = torch.cat([pad, context], dim=1), torch.cat([torch.zeros_like(pad), mask], dim=1)
            context[empty, -1], mask[empty, -1] = self.prefix_token_id, 1
        latents = self.fit_context_latents([row[keep.bool()].tolist() for row, keep in zip(context, mask)])
        output = super()._model_generate(
            context, max_length + added, stop, attention_mask=mask, latents=latents, **generation_kwargs
        )
        return output[:, added:]


__all__ = ["LTMLM", "MODEL_ARGS", "content_seed"]

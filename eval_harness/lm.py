"""lm-evaluation-harness model `ltm`: Latent-Thought Language Models scored without peeking at the answer.

An LTM's likelihood of a text depends on its latent thought vectors `z`, which are not computed by the network but
fitted per sequence by posterior inference (the fast loop, `modeling_ltm.inference.fit_posterior`). The three
request types are answered as follows:

Every fit uses the model's *evaluation* settings (`PosteriorFitSettings.evaluation(config)`: start at the prior, `eps`
redrawn every step, `config.eval_inference_steps` steps at `config.eval_inference_lr`), not the training fast loop's;
`num_inference_steps` / `inference_lr` override its steps and learning rate.

- `loglikelihood(context, continuation)`: `z` is fitted on the **context only**, then the continuation is scored
  given `(context, z)` with one forward pass over context + continuation. The continuation never influences `z`,
  so multiple-choice answers are compared under the same thought vectors. The result is a plug-in estimate of
  `log p(continuation | context)`, not a bound.
- `loglikelihood_rolling(text)`: a lower bound on `log p(text)`, the ELBO `-(NLL given z + KL(q || p))` (or the
  importance-weighted bound with `iw_samples > 0`) of each rolling window, summed over windows
  (`modeling_ltm.inference.evaluate_posterior`). Never the conditional NLL without its KL, and never the paper's
  reconstruction perplexity.
- `generate_until(context, gen_kwargs)`: `z` is fitted on the context, then `model.generate(latents=z, ...)`
  decodes with lm-eval's stop sequences and `max_gen_toks`.

Every posterior fit is seeded per sequence from the base `seed` and the sequence's token ids, so a request's
result does not depend on the batch it lands in, on batch size or on request order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (registers lm-eval's built-in names, so "hf" etc. still resolve)
import torch
import torch.nn.functional as F
import transformers
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.models.utils_hf import stop_sequences_criteria
from tqdm import tqdm

import modeling_ltm  # noqa: F401  (registers model_type "ltm" with the Auto classes)
from modeling_ltm.inference import PosteriorFitSettings, evaluate_posterior, fit_posterior


logger = transformers.utils.logging.get_logger(__name__)

MODEL_ARGS = (
    "pretrained",
    "tokenizer",
    "num_inference_steps",
    "inference_lr",
    "iw_samples",
    "batch_size",
    "max_batch_size",
    "device",
    "dtype",
    "seed",
    "trust_remote_code",
)


def content_seed(base_seed: int, tokens: Sequence[int], purpose: str) -> int:
    """A stable 31-bit seed for one sequence's posterior fit, from the base seed, a purpose tag and the token ids.

    Deterministic across processes and platforms (sha256, not Python's salted `hash`), so the fit of a sequence
    does not depend on its batch, the batch size or the order of requests.
    """
    digest = hashlib.sha256(f"{base_seed}|{purpose}|{','.join(map(str, tokens))}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


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


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"`{name}` must be true or false, got {value!r}.")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        # lm-eval's CLI passes device="cuda:0" unless told otherwise; on a CPU-only machine that means "cpu".
        logger.warning(f"device={str(device)!r} was requested but CUDA is not available; using the CPU.")
        return torch.device("cpu")
    return device


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return "auto" if dtype is None else dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(
            f"`dtype` must be 'auto' or a torch dtype name such as 'float32' or 'bfloat16', got {dtype!r}."
        )
    return resolved


@_register
class LTMLM(TemplateLM):
    """lm-eval model `ltm` for [`LTMForCausalLM`].

    Args (lm-eval `model_args`, e.g. `--model_args pretrained=runs/ltm-tiny,num_inference_steps=16`):
        pretrained (`str` or `LTMForCausalLM`): a local folder / Hub id, or a model instance.
        tokenizer (`str` or tokenizer, *optional*): defaults to the tokenizer saved with `pretrained`.
        num_inference_steps (`int`, *optional*): fast steps `T` of every posterior fit (context, window or prompt).
            Defaults to `config.eval_inference_steps` (the evaluation fit; see `PosteriorFitSettings.evaluation`).
        inference_lr (`float`, *optional*): fast learning rate. Defaults to `config.eval_inference_lr`.
        iw_samples (`int`, defaults to 0): `loglikelihood_rolling` reports the importance-weighted bound with this
            many samples of `q(z|x)` when > 0, else the ELBO.
        batch_size (`int` or `str`, defaults to 1): sequences per posterior fit / forward pass (the CLI passes a
            string). `auto` is not supported: the fast loop's memory depends on `num_inference_steps`.
        max_batch_size (`int`, *optional*): accepted for lm-eval compatibility; unused (no automatic batch size).
        device (`str`, *optional*): defaults to CUDA when available, else the CPU (a CUDA device on a machine
            without CUDA falls back to the CPU with a warning).
        dtype (`str`, defaults to "float32"): weights' dtype; posterior parameters stay in float32.
        seed (`int`, defaults to 1234): base seed of every posterior fit (each sequence gets a seed derived from it
            and its token ids).
        trust_remote_code (`bool`, defaults to False): load the model through its saved remote code.

    Raises:
        ValueError: unknown `model_args` (the message lists the valid ones) or invalid values.
    """

    backend = "causal"

    def __init__(
        self,
        pretrained: str | transformers.PreTrainedModel | None = None,
        tokenizer: str | transformers.PreTrainedTokenizerBase | None = None,
        num_inference_steps: int | None = None,
        inference_lr: float | None = None,
        iw_samples: int = 0,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = "float32",
        seed: int = 1234,
        trust_remote_code: bool = False,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ValueError(
                f"Unknown model_args for model 'ltm': {sorted(unknown)}. Valid model_args: {', '.join(MODEL_ARGS)}."
            )
        super().__init__()
        if pretrained is None:
            raise ValueError("model 'ltm' needs `pretrained` (a model folder, Hub id or LTMForCausalLM instance).")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            raise ValueError(
                f"batch_size={batch_size!r} is not supported by model 'ltm' (the fast loop's memory grows with "
                "num_inference_steps); pass an integer, e.g. --batch_size 8."
            )
        self.batch_size_per_gpu = _as_int("batch_size", batch_size, 1)
        self.iw_samples = _as_int("iw_samples", iw_samples, 0)
        self.seed = _as_int("seed", seed, 0)
        trust_remote_code = _as_bool("trust_remote_code", trust_remote_code)
        self._device = _resolve_device(device)

        if isinstance(pretrained, transformers.PreTrainedModel):
            model = pretrained
            if tokenizer is None:
                raise ValueError("Pass `tokenizer` (a tokenizer or its path) when `pretrained` is a model instance.")
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(pretrained), dtype=_resolve_dtype(dtype), trust_remote_code=trust_remote_code
            )
        if not callable(getattr(model, "infer_latents", None)):
            raise TypeError(
                f"`pretrained` is a {type(model).__name__}, not a Latent-Thought LM (no `infer_latents`); use "
                "lm-eval's `--model hf` for ordinary causal LMs."
            )
        self._model = model.to(self._device).eval()
        self.config = self._model.config

        if isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
            self.tokenizer = tokenizer
        else:
            source = tokenizer if tokenizer is not None else pretrained
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(source), trust_remote_code=trust_remote_code
            )
        if self.tokenizer.eos_token_id is None and self.tokenizer.bos_token_id is None:
            raise ValueError(
                "The tokenizer has neither an EOS nor a BOS token; model 'ltm' needs one as the end-of-text token "
                "(the conditioning prefix of empty contexts and rolling windows). Set `tokenizer.eos_token`."
            )

        steps = None if num_inference_steps is None else _as_int("num_inference_steps", num_inference_steps, 0)
        try:
            lr = None if inference_lr is None else float(inference_lr)
        except (TypeError, ValueError):
            lr = float("nan")
        if lr is not None and not lr > 0:
            raise ValueError(f"`inference_lr` must be a number > 0, got {inference_lr!r}.")
        self.fit_settings = PosteriorFitSettings.evaluation(self.config, num_steps=steps, lr=lr)
        self.num_inference_steps, self.inference_lr = self.fit_settings.num_steps, self.fit_settings.lr
        self.rolling_totals = {"nll": 0.0, "kl": 0.0, "bound": 0.0, "tokens": 0}

    # ---------------------------------------------------------------------------------------------------- basics

    @property
    def model(self) -> transformers.PreTrainedModel:
        return self._model

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.tokenizer.bos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        """Longest sequence the model accepts, in tokens (`max_position_embeddings`)."""
        return self.config.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        """Token ids of `string`, without special tokens unless `add_special_tokens=True` (the conditioning prefix
        token is added explicitly where lm-eval needs one)."""
        # verbose=False: long documents are split into windows later; the "longer than the model" warning is noise.
        encoding = self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens), verbose=False)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        """Added to lm-eval's results `config`: how the latents were inferred and, for rolling requests, the bound's
        parts in nats per scored token (so a perplexity bound always comes with its KL)."""
        info = {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
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

    # ------------------------------------------------------------------------------------------ tensor helpers

    def _left_pad(self, sequences: Sequence[Sequence[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad token lists → `(ids, mask)`, both `(batch, longest)`; the model derives positions from the mask,
        so a padded row is processed as it would be alone."""
        longest = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), longest), fill, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, seq in enumerate(sequences):
            if seq:
                ids[row, longest - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
                mask[row, longest - len(seq) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def fit_context_latents(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Latents `z` for each context: `(len(contexts), num_hidden_layers, n_latents_per_layer, latent_dim)`.

        Contexts are fitted together (left-padded, masked), each with its own content seed; `z` is
        `PosteriorOutput.z`, a fresh draw from the fitted posterior (as `generate()` uses). A context of fewer than
        2 tokens has no token to predict, hence no evidence about `z`: it gets the prior mean `z = 0`.
        """
        latents = torch.zeros(len(contexts), *self.config.latent_shape, device=self.device)
        rows = [i for i, ctx in enumerate(contexts) if len(ctx) >= 2]
        if rows:
            ids, mask = self._left_pad([contexts[i] for i in rows], self.eot_token_id)
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

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Score `(request_strings, context_enc, continuation_enc)` triples → `(log p(cont | ctx, z), is_greedy)`.

        Requests are sorted by visible context (longest first, identical contexts adjacent), so each distinct
        context is fitted once per batch even when a multiple-choice task asks about several continuations; the
        original order is restored at the end.
        """
        prepared = [(strings, *self._split_request(ctx, cont), cont) for strings, ctx, cont in requests]

        def sort_key(item):
            _, model_input, context, continuation = item
            return -len(context), tuple(context), -len(continuation), tuple(continuation)

        collator = Collator(prepared, sort_fn=sort_key)
        results = []
        previous_latents: dict[tuple[int, ...], torch.Tensor] = {}
        progress = tqdm(total=len(prepared), disable=disable_tqdm, desc="Running loglikelihood requests (ltm)")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts = list(dict.fromkeys(tuple(item[2]) for item in chunk))
            to_fit = [c for c in contexts if c not in previous_latents]
            fitted = dict(zip(to_fit, self.fit_context_latents(to_fit), strict=True)) if to_fit else {}
            latents_by_context = {c: previous_latents.get(c, fitted.get(c)) for c in contexts}
            previous_latents = latents_by_context

            ids, mask = self._left_pad([item[1] for item in chunk], self.eot_token_id)
            latents = torch.stack([latents_by_context[tuple(item[2])] for item in chunk])
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask, latents=latents, use_cache=False).logits
            log_probs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
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
        `max_seq_len = max_length - 1`, so that conditioning + predicted tokens fit in one sequence (the fast loop
        scores tokens inside the sequence it is given). With max_length 5:

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
        `self.rolling_totals` and reported by `get_model_info()`.
        """
        windows, owners = [], []
        for index, request in enumerate(requests):
            (string,) = request.args
            for window in self.rolling_windows(string):
                windows.append(window)
                owners.append(index)

        order = sorted(range(len(windows)), key=lambda i: -(len(windows[i][0]) + len(windows[i][1])))
        bounds = [0.0] * len(windows)
        for start in tqdm(
            range(0, len(order), self.batch_size), disable=disable_tqdm, desc="Running loglikelihood_rolling (ltm)"
        ):
            batch = order[start : start + self.batch_size]
            sequences = [windows[i][0] + windows[i][1] for i in batch]
            labels = [[-100] * len(windows[i][0]) + windows[i][1] for i in batch]
            ids, mask = self._left_pad(sequences, self.eot_token_id)
            label_ids, _ = self._left_pad(labels, -100)
            seeds = [self.window_seed(windows[i]) for i in batch]
            result = evaluate_posterior(
                self.model,
                ids,
                mask,
                labels=label_ids,
                settings=self.fit_settings,
                iw_samples=self.iw_samples,
                seed=seeds,
            )
            bound = result.iw if self.iw_samples > 0 else result.elbo
            for row, i in enumerate(batch):
                bounds[i] = float(bound[row])
            self.rolling_totals["nll"] += float(result.nll.sum())
            self.rolling_totals["kl"] += float(result.kl.sum())
            self.rolling_totals["bound"] += float(bound.sum())
            self.rolling_totals["tokens"] += int(result.num_tokens.sum())

        totals = [0.0] * len(requests)
        for i, owner in enumerate(owners):
            totals[owner] += bounds[i]
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ----------------------------------------------------------------------------------------- generate_until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, per `gen_kwargs`) continuations of each context, cut at lm-eval's `until` strings.

        Contexts are left-truncated to `max_length - max_gen_toks` tokens (as HFLM does), `z` is fitted on the
        truncated context (content-seeded, see [`fit_context_latents`]), and `model.generate(latents=z, ...)`
        decodes up to `max_gen_toks` new tokens with lm-eval's multi-token stop criteria.
        """
        results = []
        collator = Collator(
            [request.args for request in requests],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests (ltm)")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_gen_kwargs = zip(*chunk, strict=True)
            gen_kwargs = all_gen_kwargs[0]
            if not isinstance(gen_kwargs, dict):
                raise TypeError(f"generate_until expects gen_kwargs to be a dict, got {type(gen_kwargs).__name__}.")
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            kwargs.pop("max_length", None)
            if not kwargs.get("do_sample"):
                kwargs.pop("temperature", None)
            max_context = self.max_length - max_gen_toks
            if max_context < 1:
                raise ValueError(
                    f"max_gen_toks={max_gen_toks} leaves no room for the context in the model's {self.max_length} "
                    "tokens; lower max_gen_toks (task generation_kwargs or --gen_kwargs max_gen_toks=...)."
                )
            encoded = [
                self.tok_encode(context, left_truncate_len=max_context) or [self.prefix_token_id]
                for context in contexts
            ]
            latents = self.fit_context_latents(encoded)
            ids, mask = self._left_pad(encoded, self.eot_token_id)
            with torch.no_grad():
                output = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    latents=latents,
                    max_new_tokens=max_gen_toks,
                    stopping_criteria=stop_sequences_criteria(self.tokenizer, until, ids.shape[1], ids.shape[0]),
                    pad_token_id=self.eot_token_id,
                    use_cache=True,
                    **kwargs,
                )
            for row, (context, _) in enumerate(chunk):
                text = self.tok_decode(output[row, ids.shape[1] :].tolist())
                text = postprocess_generated_text(text, stop=until, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                progress.update(1)
        progress.close()
        return collator.get_original(results)


__all__ = ["LTMLM", "MODEL_ARGS", "content_seed"]

"""`LTMTrainer`: the LTM's dual-rate update inside `transformers.Trainer`.

Each micro-batch of a training step runs

1. **fast learning** - `fit_posterior` fits `q(z|x) = N(mu, diag(exp(logvar)))` to every sequence with `T` Adam steps
   on `(mu, logvar)` only, on the *unwrapped* model (`accelerator.unwrap_model`): no weight gradient, no DDP hook, no
   graph kept across steps;
2. **slow learning** - exactly one forward/backward of the *wrapped* model, `model(input_ids, attention_mask,
   latents=z, labels=labels)`, whose loss is `-log p(x|z)` in nats per token, at a fresh draw `z ~ q` or, with
   `slow_step_noise="fast_loop"` (the paper's code), at the fast loop's own `eps`. The loss back-propagated and
   logged as `loss` adds the ELBO's terms of other trained weights (`compute_loss`): a learned prior's
   `KL(q || p_psi)` (then `loss = nll_per_token + kl_per_token`); none for the standard normal, whose KL depends on
   no trained weight (`loss = nll_per_token`); with `posterior_warm_start`, the encoder's term.

Everything else is `Trainer`'s: gradient accumulation, clipping, mixed precision, LR schedules, logging,
checkpointing, callbacks, `report_to`, DDP. Besides Trainer's `loss` (the NLL given `z`, plus the terms above), every
logging step reports, token-weighted over all processes and over the steps since the previous log:

- `nll_per_token`: `-log p(x|z)` at the fitted posterior's sample, nats per token;
- `kl_per_token`: `KL(q || p)`, nats per token;
- `elbo_ppl`: `exp((nll + kl) / tokens)`, the training batches' ELBO perplexity bound;
- `elbo_gain`: how much the fast loop raised the ELBO, nats per token;
- with `posterior_warm_start`, `posterior_encoder_error`: `1/2 ||mu_encoder - mu_fitted||^2`, nats per token (the
  term that trains the posterior encoder, whose proposal of `mu` starts the fast loop);
- `inference_lr`: the fast learning rate used at the last step (see `LTMTrainingArguments.inference_lr_end`);
- `inference_steps`: the fast steps T of the last step (see `LTMTrainingArguments.num_inference_steps_end`).

With `aggressive_inference_steps`, each held-out check of the aggressive phase logs `posterior_mi` (nats per sequence)
and the one that ends it `aggressive_inference_ended` (`modeling_ltm.tooling.aggressive`).

`trainer.evaluate()` reports, token-weighted over the whole eval set, the numbers of
`inference.evaluate_posterior` (one definition shared with lm-eval, the `evaluate` metric and model cards):
`eval_nll_per_token`, `eval_kl_per_token` and `eval_elbo_ppl` (= `exp(-ELBO / tokens)`, an upper bound on perplexity)
under the *evaluation* fit (the model config's `eval_*` settings: start at the prior, `eps` redrawn every step; not
the training fast loop's), with `eval_iw_samples > 0` `eval_iw_ppl` (importance-weighted bound), and with
`eval_reconstruction` `eval_reconstruction_ppl`: the paper's reconstruction perplexity `exp(NLL(x|z) / N)` with `z`
fitted on `x` by the training fast loop (fixed `eps`, no KL) - not a bound on perplexity; not comparable with an
autoregressive model's perplexity. The fit settings are reported beside them. `evaluate(inference_steps=T)`
overrides the evaluation fit's steps, to plot the bound against inference-time compute.

Random draws of the posterior (initial `logvar` noise and `eps`) come from per-sequence generators seeded from
`(args.seed, global step, position of the sequence in the global batch)`, so they do not depend on how the global
batch is split into processes and accumulation steps, and a resumed run redraws exactly what the uninterrupted run
drew (no generator state needs checkpointing).
"""

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import Trainer, TrainingArguments
from transformers.data.data_collator import default_data_collator
from transformers.trainer_utils import TrainOutput
from transformers.utils import logging

from ..configuration_ltm import check_int, check_number
from ..fast_loop import relative_to_prior
from ..inference import PosteriorFitSettings, evaluate_posterior, fit_posterior
from ..weight_checks import bare_ltm, latent_prior_of, posterior_encoder_of
from .aggressive import AggressiveInferenceCallback, phase_ended, posterior_mutual_information
from .data import check_token_dataset, collate_blocks


logger = logging.get_logger(__name__)

# Streams of the per-sequence seeds: training draws, evaluation draws and the aggressive phase's held-out checks never
# share a seed.
_TRAIN_STREAM, _EVAL_STREAM, _MUTUAL_INFORMATION_STREAM = 0, 1, 2
# Columns of the statistics tensors. Both the training sums (`_record_train_stats`) and the evaluation's per-sequence
# rows (`prediction_step`) start with the NLL, the KL and the token count; each then has two columns of its own.
_NLL, _KL, _TOKENS = range(3)
_TRAIN_ELBO_GAIN, _TRAIN_ENCODER_ERROR = 3, 4  # training: the fast loop's ELBO gain, the encoder's squared error
_EVAL_IW_LOG_PX, _EVAL_RECONSTRUCTION_NLL = 3, 4  # evaluation: the importance-weighted log p(x), reconstruction NLL


@dataclass
class LTMTrainingArguments(TrainingArguments):
    """[`~transformers.TrainingArguments`] plus the fast-learning (posterior inference) knobs of an LTM.

    Every field has a `help` string, so `HfArgumentParser(LTMTrainingArguments)` gives a command line for free.
    Fields left at `None` fall back to the model's config (`config.num_inference_steps`, `config.inference_lr`).
    One inherited default changes: `ddp_find_unused_parameters` is False unless set (every weight takes part in the
    decoder step, and the fast loop never goes through the DDP wrapper).
    """

    num_inference_steps: int | None = field(
        default=None,
        metadata={
            "help": "Fast (posterior) Adam steps T per training batch. Default: the model config's "
            "`num_inference_steps` (16 for LTM-S/M in the paper)."
        },
    )
    num_inference_steps_end: int | None = field(
        default=None,
        metadata={
            "help": "Fast steps T at the last training step: T moves linearly from `num_inference_steps` (step 0) to "
            "this value over `max_steps`, rounded half up (a ramp of the training fast loop's compute; "
            "0 -> 8 costs half of a constant 8). None keeps T constant. Evaluation fits are not affected."
        },
    )
    num_inference_steps_ramp_start: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of training (0-1) where the ramp of T to `num_inference_steps_end` begins; before it, "
            "T = `num_inference_steps`."
        },
    )
    num_inference_steps_ramp_stop: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of training (0-1, >= the ramp's start) where the ramp of T ends; after it, T = "
            "`num_inference_steps_end` (start = stop is a switch). T = 0 until 0.51, then 0 -> 16 costs half of a "
            "constant 8 (docs/training.md)."
        },
    )
    inference_lr: float | None = field(
        default=None,
        metadata={
            "help": "Fast learning rate at the first training step (inside the T fast steps it decays by cosine to "
            "`inference_lr * config.inference_lr_min_ratio`). Default: the model config's `inference_lr` (0.3)."
        },
    )
    inference_lr_end: float | None = field(
        default=None,
        metadata={
            "help": "Fast learning rate at the last training step: the fast lr moves linearly from `inference_lr` to "
            "this value over `max_steps`. None keeps it constant (the paper's code: its 0.3 -> 0.34 ramp is "
            "overwritten inside its fast loop by the constant `fast_lr` 0.34, docs/fidelity.md)."
        },
    )
    slow_step_noise: str = field(
        default="fresh",
        metadata={
            "help": "The z the slow (decoder) step decodes with: `mu + exp(logvar / 2) * eps` with a fresh `eps` "
            '("fresh") or with the fast loop\'s own `eps` ("fast_loop", the paper\'s code).',
            "choices": ["fresh", "fast_loop"],
        },
    )
    kl_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Training only: the fast loop's KL weight beta rises linearly from 0 (step 0) to 1 (this step "
            "and later), so the decoder learns to use z before the KL pushes the posterior to the prior. 0 = beta 1 "
            "throughout (the ELBO). Evaluation always fits the ELBO (beta 1)."
        },
    )
    aggressive_inference_steps: int = field(
        default=0,
        metadata={
            "help": "Training only: aggressive inference early in training (He et al. 2019, against posterior "
            "collapse): each batch's posterior is fitted with this many fast steps from the first step until the "
            "held-out mutual information I_q(x; z) stops rising (checked every `aggressive_check_steps` steps on the "
            "first `aggressive_mi_rows` rows of the eval dataset), then with `num_inference_steps`. Needs an "
            "eval_dataset. 0 = off."
        },
    )
    aggressive_check_steps: int = field(
        default=50,
        metadata={
            "help": "Optimizer steps between two estimates of the held-out mutual information in the aggressive "
            "phase; the phase ends at the first estimate not above the best so far."
        },
    )
    aggressive_mi_rows: int = field(
        default=64,
        metadata={
            "help": "Held-out rows (the first of the eval dataset) of the mutual-information estimate; the estimate "
            "is at most log(rows) nats."
        },
    )
    free_bits: float = field(
        default=0.0,
        metadata={
            "help": "Training only: free bits of the fast loop's KL, in nats per latent dimension per sequence "
            "(each dimension's KL below this floor costs nothing). 0 = off. Evaluation never uses free bits."
        },
    )
    posterior_warm_start: bool = field(
        default=False,
        metadata={
            "help": "Training only: start each batch's fast loop at the model's posterior encoder's proposal of mu "
            "(logvar starts as usual) instead of mu = 0, and train the encoder alongside the decoder to propose the "
            "fitted mu (a squared-error term on the encoder's weights only, added to the loss). Needs a model with "
            "`posterior_encoder_size > 0`. Experimental: measured at half the fast steps, it does not reach the plain "
            "loop's held-out bound (docs/benchmarks.md, 'Training fast-loop compute')."
        },
    )
    eval_inference_steps: int | None = field(
        default=None,
        metadata={
            "help": "Fast steps T of the evaluation fit (start at the prior, eps redrawn every step). Default: the "
            "model config's `eval_inference_steps`."
        },
    )
    eval_inference_lr: float | None = field(
        default=None,
        metadata={
            "help": "Fast learning rate of the evaluation fit. Default: the model config's `eval_inference_lr`."
        },
    )
    eval_reconstruction: bool = field(
        default=True,
        metadata={
            "help": "Also report `eval_reconstruction_ppl`: the paper's reconstruction perplexity exp(NLL(x|z)/N), z "
            "fitted on x by the training fast loop (fixed eps), no KL. Not a bound on perplexity; not comparable "
            "with an autoregressive model's perplexity. Costs one more fit per eval batch."
        },
    )
    eval_iw_samples: int = field(
        default=0,
        metadata={
            "help": "Samples K of the importance-weighted bound reported as `eval_iw_ppl` (0 = do not compute it; "
            "each sample costs one forward pass)."
        },
    )

    def __post_init__(self):
        if self.ddp_find_unused_parameters is None:
            # Trainer's default (True for a model without gradient checkpointing) costs an extra traversal of the
            # graph every step; the one wrapped forward of each micro-step uses every decoder weight.
            self.ddp_find_unused_parameters = False
        super().__post_init__()
        for name in ("num_inference_steps", "num_inference_steps_end", "eval_inference_steps"):
            check_int(name, getattr(self, name), optional=True, why="use the model config")
        start, stop = self.num_inference_steps_ramp_start, self.num_inference_steps_ramp_stop
        if not 0.0 <= start <= stop <= 1.0:
            raise ValueError(
                "`num_inference_steps_ramp_start` and `num_inference_steps_ramp_stop` are fractions of training with "
                f"0 <= start <= stop <= 1, got start={start!r}, stop={stop!r}."
            )
        for name in ("inference_lr", "inference_lr_end", "eval_inference_lr"):
            check_number(name, getattr(self, name), "> 0", optional=True, why="a fast learning rate")
        if self.slow_step_noise not in ("fresh", "fast_loop"):
            raise ValueError(f'`slow_step_noise` must be "fresh" or "fast_loop", got {self.slow_step_noise!r}.')
        check_int("kl_warmup_steps", self.kl_warmup_steps, why="0 = no warm-up")
        check_int("aggressive_inference_steps", self.aggressive_inference_steps, why="0 = off")
        check_int("aggressive_check_steps", self.aggressive_check_steps, 1, why="optimizer steps between checks")
        check_int("aggressive_mi_rows", self.aggressive_mi_rows, 2, why="held-out rows of the estimate")
        check_number("free_bits", self.free_bits, ">= 0", why="nats per latent dimension, 0 = off")
        check_int("eval_iw_samples", self.eval_iw_samples, why="0 turns the importance-weighted bound off")


class _CausalLMLabels:
    """Wraps a data collator so every batch has `labels`: `input_ids` with padding set to -100 when absent.

    With explicit labels, `Trainer` counts the predicted tokens of the whole accumulated batch (`num_items_in_batch`)
    and the loss can be normalised per token across accumulation steps and processes.

    Not transformers' `DataCollatorForLanguageModeling(mlm=False)`: that one needs a tokenizer (LTMTrainer also trains
    on pre-packed blocks without one), replaces the user's own collator, and masks by `pad_token_id`, which for a
    GPT-2 tokenizer (pad = EOS) would also unscore every real end-of-text token; this wrapper masks by the attention
    mask and keeps whatever collator the user passed.
    """

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        if batch.get("labels") is None and "input_ids" in batch:
            labels = batch["input_ids"].clone()
            if batch.get("attention_mask") is not None:
                labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
            batch["labels"] = labels
        return batch


def _unpack(inputs) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`(input_ids, attention_mask, labels)` of a batch, with a clear error when there are no token ids."""
    if inputs.get("input_ids") is None:
        raise ValueError(
            f"LTMTrainer needs batches with `input_ids` (fit the posterior to token ids), got keys {sorted(inputs)}. "
            "Tokenize the dataset into an `input_ids` column (e.g. `modeling_ltm.tooling.data`)."
        )
    return inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")


def _row_seeds(base_seed: int, stream: int, step: int, first_row: int, num_rows: int) -> list[int]:
    """One well-mixed 64-bit seed per sequence, a function of `(base_seed, stream, step, global row index)` only."""
    return [
        int(np.random.SeedSequence([base_seed, stream, step, row]).generate_state(1, dtype=np.uint64)[0])
        for row in range(first_row, first_row + num_rows)
    ]


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for running sums of nats and tokens, on a device that has it (Apple's MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


class LTMTrainer(Trainer):
    """[`~transformers.Trainer`] for [`LTMForCausalLM`]: posterior fitting (fast learning) before each decoder update.

    Use it exactly like `Trainer`; pass [`LTMTrainingArguments`] for the fast-learning knobs (a plain
    `TrainingArguments` works too, with the model config's defaults). Datasets need an `input_ids` column
    (fixed-length blocks, or padded batches with `attention_mask`); `labels` default to `input_ids` with padding
    ignored.

    Example:

    ```python
    >>> from modeling_ltm import LTMConfig, LTMForCausalLM, LTMTrainer, LTMTrainingArguments
    >>> args = LTMTrainingArguments("runs/ltm", max_steps=100, num_inference_steps=8, eval_iw_samples=8)
    >>> trainer = LTMTrainer(model=LTMForCausalLM(config), args=args, train_dataset=train, eval_dataset=dev)
    >>> trainer.train()
    >>> trainer.evaluate(inference_steps=32)["eval_elbo_ppl"]  # the bound with more inference-time compute
    ```
    """

    def __init__(self, model=None, args=None, data_collator=None, *trainer_args, **trainer_kwargs):
        if model is not None and not hasattr(getattr(model, "config", None), "latent_shape"):
            raise TypeError(
                f"LTMTrainer trains a latent-thought model (LTMForCausalLM), got {type(model).__name__}. "
                "Use transformers.Trainer for an ordinary causal LM."
            )
        super().__init__(model, args, data_collator, *trainer_args, **trainer_kwargs)
        if getattr(self.args, "posterior_warm_start", False) and posterior_encoder_of(self.model) is None:
            raise ValueError(
                "`posterior_warm_start=True` starts the fast loop at the posterior encoder's proposal, and this model "
                "has none (config.posterior_encoder_size = 0). Create or load the model with "
                "`posterior_encoder_size=N` (e.g. N = 4 * hidden_size), or leave `posterior_warm_start` off."
            )
        self.data_collator = _CausalLMLabels(self.data_collator or default_data_collator)
        if getattr(self.args, "aggressive_inference_steps", 0) > 0:
            if self._mutual_information_dataset() is None:
                raise ValueError(
                    "`aggressive_inference_steps` ends the aggressive phase when the held-out mutual information "
                    "stops rising, and this trainer has no eval_dataset to estimate it on. Pass eval_dataset=..., or "
                    "set aggressive_inference_steps=0."
                )
            self.add_callback(AggressiveInferenceCallback(self))
        # Empty datasets, blocks of several lengths (for collators that do not pad), token ids outside the vocabulary
        # or not integers, labels of another length, rows with nothing to predict, and (for the default collators)
        # rows that are not dicts fail here, naming the row, instead of deep inside the first step.
        fixed_length = self.data_collator.collator in (default_data_collator, collate_blocks)
        vocab_size = self._model_config().vocab_size
        evals = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"": self.eval_dataset}
        to_check = {"train_dataset": self.train_dataset}
        to_check.update({f"eval_dataset[{key!r}]" if key else "eval_dataset": data for key, data in evals.items()})
        for name, dataset in to_check.items():
            check_token_dataset(dataset, name, vocab_size, fixed_length, rows_are_dicts=fixed_length)
        # A `time.monotonic()` value: training fits stop between two fast steps once it passes (`--max_train_minutes`).
        self.fit_deadline: float | None = None
        self._train_sums = None  # (5,) float64: nll, kl, tokens, elbo gain, encoder error since the last log
        self._last_inference_lr = self._last_inference_steps = None
        self._micro_step_of = (-1, 0)  # (global step, micro-steps taken in it)
        self.training_fast_steps: list[int] = []  # the fast steps of each training micro-batch's fit, in order
        self._eval_overrides = {}
        self._eval_stats = []
        self._eval_batches_seen = 0

    # ---- fast-learning settings --------------------------------------------------------------------------------

    def _model_config(self):
        return self.accelerator.unwrap_model(self.model).config

    @property
    def num_inference_steps(self) -> int:
        """Fast steps `T` per training batch at step 0 (`args.num_inference_steps`, else the model config's)."""
        steps = getattr(self.args, "num_inference_steps", None)
        return self._model_config().num_inference_steps if steps is None else steps

    def inference_steps_at(self, step: int) -> int:
        """Fast steps `T` of the training batch at optimizer step `step`: `num_inference_steps` until the ramp's
        start, linear to `num_inference_steps_end` at its stop (fractions of `max_steps - 1`; by default the whole
        run), rounded half up; constant when `num_inference_steps_end` is None;
        `aggressive_inference_steps` while the aggressive phase lasts."""
        if self.in_aggressive_phase:
            return self.args.aggressive_inference_steps
        window = (
            getattr(self.args, "num_inference_steps_ramp_start", 0.0),
            getattr(self.args, "num_inference_steps_ramp_stop", 1.0),
        )
        steps = self._linear_in_training(step, self.num_inference_steps, "num_inference_steps_end", window)
        return math.floor(steps + 0.5)

    @property
    def in_aggressive_phase(self) -> bool:
        """Whether training is in the aggressive-inference phase (`aggressive_inference_steps > 0` and no held-out
        check has ended it yet; `modeling_ltm.tooling.aggressive`)."""
        if getattr(self.args, "aggressive_inference_steps", 0) <= 0:
            return False
        return not phase_ended(self.state.log_history)

    def _mutual_information_dataset(self):
        evals = self.eval_dataset
        if isinstance(evals, dict):
            evals = next(iter(evals.values()), None)
        return evals

    def held_out_mutual_information(self) -> float:
        """`I_q(x; z)` in nats per sequence (`aggressive.posterior_mutual_information`) of the first
        `args.aggressive_mi_rows` rows of the eval dataset, their posteriors fitted by the *evaluation* fit (from the
        prior, `eps` redrawn; `eval_fit_settings`), the model in eval mode; seeded by the step, so every process
        computes the same value.

        Not the training fit: it starts at `logvar = init_logvar` (-5, tiny variances) and Adam moves every `mu` by
        about the learning rate per step whatever the gradient, so its posteriors never overlap and the estimate
        sits at its ceiling `log(rows)`; fitted from the prior, a decoder that ignores `z` leaves every posterior at
        the prior (estimate 0)."""
        dataset = self._mutual_information_dataset()
        rows = [dataset[index] for index in range(min(self.args.aggressive_mi_rows, len(dataset)))]
        input_ids, attention_mask, labels = _unpack(self._prepare_inputs(self.data_collator(rows)))
        step = self.state.global_step
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        was_training = model.training
        model.eval()
        try:
            with self.accelerator.autocast():
                posterior = fit_posterior(
                    model,
                    input_ids,
                    attention_mask,
                    labels=labels,
                    settings=self.eval_fit_settings,
                    seed=_row_seeds(self.args.seed, _MUTUAL_INFORMATION_STREAM, step, 0, input_ids.shape[0]),
                )
        finally:
            model.train(was_training)
        generator = torch.Generator(device=posterior.mu.device).manual_seed(step)
        return posterior_mutual_information(posterior.mu, posterior.logvar, generator=generator)

    @property
    def eval_fit_settings(self) -> PosteriorFitSettings:
        """The evaluation fit: the model config's `eval_*` settings, with the steps from the
        `evaluate(inference_steps=...)` override, else `args.eval_inference_steps`, and `args.eval_inference_lr`."""
        steps = self._eval_overrides.get("inference_steps")
        if steps is None:
            steps = getattr(self.args, "eval_inference_steps", None)
        lr = getattr(self.args, "eval_inference_lr", None)
        return PosteriorFitSettings.evaluation(self._model_config(), num_steps=steps, lr=lr)

    @property
    def eval_inference_steps(self) -> int:
        """Fast steps of the evaluation fit (see `eval_fit_settings`)."""
        return self.eval_fit_settings.num_steps

    def training_fit_settings(self, step: int) -> PosteriorFitSettings:
        """The training fast loop at optimizer step `step` (the reconstruction perplexity's fit, with fixed `eps`)."""
        return PosteriorFitSettings.training(
            self._model_config(), num_steps=self.inference_steps_at(step), lr=self.inference_lr_at(step)
        )

    @property
    def eval_iw_samples(self) -> int:
        samples = self._eval_overrides.get("iw_samples")
        return getattr(self.args, "eval_iw_samples", 0) if samples is None else samples

    @property
    def eval_reconstruction(self) -> bool:
        reconstruction = self._eval_overrides.get("reconstruction")
        return getattr(self.args, "eval_reconstruction", True) if reconstruction is None else reconstruction

    def inference_lr_at(self, step: int) -> float:
        """The fast learning rate at optimizer step `step`: linear from `inference_lr` (step 0) to `inference_lr_end`
        (step `max_steps - 1`), constant when `inference_lr_end` is None (in effect the paper's code: its ramp is
        overwritten by a constant peak inside its fast loop)."""
        start = getattr(self.args, "inference_lr", None)
        start = self._model_config().inference_lr if start is None else start
        return self._linear_in_training(step, start, "inference_lr_end")

    def _linear_in_training(
        self, step: int, start: float, end_argument: str, window: tuple[float, float] = (0.0, 1.0)
    ) -> float:
        """`start` until the fraction `window[0]` of training (of step `max_steps - 1`), then linear to
        `args.<end_argument>` at `window[1]`, that value after it (a zero-width window is a switch); `start`
        throughout when that argument is None or training has one step."""
        end = getattr(self.args, end_argument, None)
        max_steps = self.state.max_steps or 0
        if end is None or max_steps <= 1:
            return start
        position = min(max(step, 0) / (max_steps - 1), 1.0)
        ramp_start, ramp_stop = window
        if position < ramp_start:
            return start
        if position >= ramp_stop:
            return end
        return start + (position - ramp_start) / (ramp_stop - ramp_start) * (end - start)

    def kl_weight_at(self, step: int) -> float:
        """The training fast loop's KL weight beta at optimizer step `step`: `min(1, step / kl_warmup_steps)`, 1
        without warm-up."""
        warmup = getattr(self.args, "kl_warmup_steps", 0) or 0
        return 1.0 if warmup <= 0 else min(max(step, 0) / warmup, 1.0)

    # ---- training ----------------------------------------------------------------------------------------------

    def _first_global_row(self, batch_index: int, batch_size: int) -> int:
        """Index of this process's first row among all processes' rows: accelerate hands the `k`-th batch of the
        global stream to process `k % num_processes`, so this process's `batch_index`-th batch is the global
        `batch_index * num_processes + process_index`-th."""
        return (batch_index * self.accelerator.num_processes + self.accelerator.process_index) * batch_size

    def _next_micro_step(self) -> int:
        step, taken = self._micro_step_of
        if step != self.state.global_step:
            step, taken = self.state.global_step, 0
        self._micro_step_of = (step, taken + 1)
        return taken

    def train(self, *args, **kwargs):
        """[`Trainer.train`]. A posterior encoder that this run does not train (`posterior_warm_start` off) is frozen
        for the run (`requires_grad=False`, restored afterwards): the optimizer then holds no idle weights, and DDP,
        whose reducer expects a gradient for every trainable weight, does not fail on it. Its proposals age as the
        decoder changes, so `config.posterior_encoder_fit` becomes `None` (evaluation fits start from the prior
        until it is refitted with `modeling_ltm.tooling.amortized.fit_posterior_encoder`); an encoder trained by the run
        (`posterior_warm_start`) is marked `"training"`, which evaluation does not warm-start from either."""
        encoder = posterior_encoder_of(self.model)
        idle = []
        warm_start = getattr(self.args, "posterior_warm_start", False)
        if encoder is not None:
            bare_ltm(self.model).config.posterior_encoder_fit = "training" if warm_start else None
        if encoder is not None and not warm_start:
            idle = [parameter for parameter in encoder.parameters() if parameter.requires_grad]
            logger.warning(
                "The model's posterior encoder is not trained by this run (posterior_warm_start=False) and stays "
                "frozen; evaluation fits start from the prior until it is refitted to the trained decoder "
                "(modeling_ltm.tooling.amortized.fit_posterior_encoder)."
            )
        for parameter in idle:
            parameter.requires_grad_(False)
        from ..inference import FitDeadlineExceeded

        try:
            return super().train(*args, **kwargs)
        except FitDeadlineExceeded as error:  # `fit_deadline` passed inside a step: stop there, that step not taken
            logger.warning(f"Training stopped at step {self.state.global_step}: {error}")
            self.is_in_train = False
            self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
            metrics = {"stopped_by_fit_deadline": True, "stopped_at_fast_step": error.fast_step}
            return TrainOutput(self.state.global_step, float("nan"), metrics)
        finally:
            for parameter in idle:
                parameter.requires_grad_(True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Fit the batch's posterior with the decoder frozen, then hand the batch with the fitted `latents` to
        `Trainer.compute_loss`: one forward of the wrapped `model`, whose loss is `-log p(x|z)` per token.

        Everything else is Trainer's: the model's forward takes `**kwargs`, so Trainer passes `num_items_in_batch`
        (the predicted tokens of the whole accumulated batch over all processes) to the loss and scales it for
        gradient accumulation and data parallelism itself.
        """
        input_ids, attention_mask, labels = _unpack(inputs)
        step = self.state.global_step
        batch_size = self.state.train_batch_size or self.args.per_device_train_batch_size
        first_row = self._first_global_row(self._next_micro_step(), batch_size)
        lr = self.inference_lr_at(step)
        # The module itself, not a `torch_compile=True` wrapper: the fast loop replays its own CUDA graphs on it, and
        # the compiled forward serves the one wrapped (decoder) forward below.
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        encoder_mu = prefix = None
        # One autocast region (the mixed precision of the run, if any) around the whole fit, prefix included: the
        # weights are cast once per fit, not at each fast step's forward (which enters and leaves its own region).
        with self.accelerator.autocast():
            if getattr(self.args, "posterior_warm_start", False):
                # The prefix (no gradient) is the fit's own, computed once; the encoder's forward keeps its graph.
                prefix = bare_ltm(unwrapped).model.compute_prefix(input_ids, attention_mask=attention_mask)
                proposal = posterior_encoder_of(unwrapped)(prefix.hidden_states, attention_mask)
                encoder_mu, _ = relative_to_prior(latent_prior_of(unwrapped), *proposal)
            posterior = fit_posterior(
                unwrapped,
                input_ids,
                attention_mask,
                labels=labels,
                num_steps=self.inference_steps_at(step),
                lr=lr,
                seed=_row_seeds(self.args.seed, _TRAIN_STREAM, step, first_row, input_ids.shape[0]),
                kl_weight=self.kl_weight_at(step),
                free_bits=getattr(self.args, "free_bits", 0.0) or 0.0,
                init_mu=None if encoder_mu is None else encoder_mu.detach(),
                prefix=prefix,
                deadline=self.fit_deadline,
            )
        encoder_error = None
        if encoder_mu is not None:
            # 1/2 ||mu_encoder - mu_fitted||^2 per sequence (nats: the KL between unit-variance Gaussians at the two).
            encoder_error = 0.5 * (encoder_mu - posterior.mu).pow(2).flatten(1).sum(-1)
        self._record_train_stats(posterior, lr, encoder_error)

        latents = (
            posterior.fit_sample if getattr(self.args, "slow_step_noise", "fresh") == "fast_loop" else posterior.z
        )
        inputs = {**inputs, "latents": latents, "use_cache": False}
        loss = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        extra = self._prior_term(unwrapped, posterior)
        if encoder_error is not None:
            extra = extra + encoder_error.sum()
        if not isinstance(extra, torch.Tensor):
            return loss
        extra = self._per_token_like_trainer(extra, posterior.num_tokens, num_items_in_batch)
        return (loss[0] + extra, loss[1]) if return_outputs else loss + extra

    @staticmethod
    def _prior_term(model, posterior):
        """The ELBO's prior term for the slow step, summed over the micro-batch (nats): `KL(q || p_psi)` at the fitted
        posterior (held fixed), whose gradient with respect to a learned prior's weights `psi` is that of
        `-E_q[log p_psi(z)]`; 0 for the standard normal or a frozen prior (e.g. under PEFT)."""
        prior = latent_prior_of(model)
        if not any(parameter.requires_grad for parameter in getattr(prior, "parameters", list)()):
            return 0.0
        return prior.kl(posterior.mu.detach(), posterior.logvar.detach(), posterior.z.detach()).sum()

    def _per_token_like_trainer(self, total, num_tokens, num_items_in_batch):
        """`total` (nats, summed over this micro-batch) divided as `Trainer.compute_loss` divides the decoder's summed
        NLL: by the accumulated batch's predicted tokens over all processes times the processes (`num_items_in_batch`
        given), else by this micro-batch's tokens (Trainer then divides by the accumulation steps).

        Trainer has no public hook that scales an extra loss term as it scales the model's own (the model's forward
        divides by `num_items_in_batch`, Trainer multiplies by the processes under `average_tokens_across_devices`):
        these two rules are repeated here, and tests/test_ddp.py checks the term's DDP gradient against one process."""
        if num_items_in_batch is None:
            return total / num_tokens.sum().clamp(min=1)
        total = total / num_items_in_batch
        if getattr(self.args, "average_tokens_across_devices", False):
            total = total * self.accelerator.num_processes
        return total

    def _record_train_stats(self, posterior, lr: float, encoder_error: torch.Tensor | None = None) -> None:
        gain = posterior.elbo_trace[-1] - posterior.elbo_trace[0]
        encoder_sum = gain.new_zeros(()) if encoder_error is None else encoder_error.detach().sum()
        columns = {_NLL: posterior.nll.sum(), _KL: posterior.kl.sum(), _TOKENS: posterior.num_tokens.sum()}
        columns.update({_TRAIN_ELBO_GAIN: gain.sum(), _TRAIN_ENCODER_ERROR: encoder_sum})
        sums = torch.stack([columns[index] for index in range(len(columns))])
        sums = sums.to(_sum_dtype(sums.device))
        self._train_sums = sums if self._train_sums is None else self._train_sums + sums
        self._last_inference_lr = lr
        self._last_inference_steps = len(posterior.elbo_trace) - 1
        self.training_fast_steps.append(self._last_inference_steps)

    def create_model_card(self, *args, **kwargs) -> None:
        """Keep the model card already in `output_dir` (the LTM's card, written from this run by
        `hub_cards.LTMCardCallback`); without one, transformers' own. `push_to_hub` calls
        this before uploading. The trainer builds no card itself: cards read what the run recorded."""
        if os.path.isfile(os.path.join(self.args.output_dir, "README.md")):
            return
        super().create_model_card(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the fast-learning metrics to Trainer's training logs (those with `loss`), summed over processes and
        over the steps since the previous log, then clear them."""
        if "loss" in logs and self._train_sums is not None:
            # Plain `gather`, not `gather_for_metrics`: these are sums, nothing was padded to even out batches.
            sums = self.accelerator.gather(self._train_sums.unsqueeze(0)).sum(0).tolist()
            self._train_sums = None
            tokens = max(sums[_TOKENS], 1.0)
            logs["nll_per_token"] = sums[_NLL] / tokens
            logs["kl_per_token"] = sums[_KL] / tokens
            logs["elbo_ppl"] = float(np.exp((sums[_NLL] + sums[_KL]) / tokens))
            logs["elbo_gain"] = sums[_TRAIN_ELBO_GAIN] / tokens
            if getattr(self.args, "posterior_warm_start", False):
                logs["posterior_encoder_error"] = sums[_TRAIN_ENCODER_ERROR] / tokens
            logs["inference_lr"] = self._last_inference_lr
            logs["inference_steps"] = self._last_inference_steps
        super().log(logs, start_time)

    # ---- evaluation --------------------------------------------------------------------------------------------

    def evaluate(
        self,
        eval_dataset=None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        inference_steps: int | None = None,
        iw_samples: int | None = None,
        reconstruction: bool | None = None,
    ) -> dict[str, float]:
        """[`Trainer.evaluate`] with the LTM's bounds (see the module docstring), and overrides for this call:

        Args:
            inference_steps (`int`, *optional*): fast steps T of the evaluation fit (default
                `args.eval_inference_steps`, else the model config's `eval_inference_steps`). 0 scores the initial
                posterior (the prior, with the default evaluation settings).
            iw_samples (`int`, *optional*): samples K of the importance-weighted bound (default
                `args.eval_iw_samples`; 0 turns it off).
            reconstruction (`bool`, *optional*): report the reconstruction perplexity (default
                `args.eval_reconstruction`).

        Returns (each prefixed with `metric_key_prefix`): `eval_loss` (the negative ELBO per token,
        `eval_nll_per_token + eval_kl_per_token`: what `metric_for_best_model="loss"` and early stopping compare),
        `eval_nll_per_token`, `eval_kl_per_token`, `eval_elbo_ppl` and the evaluation fit's settings
        (`eval_inference_steps`, `eval_inference_lr`, `eval_inference_lr_min_ratio`, `eval_posterior_init_logvar`,
        `eval_posterior_fixed_noise`); `eval_iw_ppl`, `eval_iw_samples` when K > 0; `eval_reconstruction_ppl`,
        `eval_reconstruction_nll_per_token` and the training fit's `eval_reconstruction_inference_steps`,
        `eval_reconstruction_inference_lr`, `eval_reconstruction_init_logvar` when reconstruction is on.
        """
        check_int("inference_steps", inference_steps, optional=True)
        check_int("iw_samples", iw_samples, optional=True)
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if not isinstance(dataset, (dict, str)):  # a dict is evaluated dataset by dataset
            check_token_dataset(dataset, "eval_dataset")
        if reconstruction is not None and not isinstance(reconstruction, bool):
            raise ValueError(f"`reconstruction` must be True, False or None, got {reconstruction!r}.")
        previous = self._eval_overrides
        self._eval_overrides = {
            **previous,
            "inference_steps": inference_steps,
            "iw_samples": iw_samples,
            "reconstruction": reconstruction,
        }
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._eval_overrides = previous

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Trainer's loop; afterwards the per-sequence statistics gathered by `prediction_step` become metrics."""
        self._eval_stats, self._eval_batches_seen = [], 0
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        if not self._eval_stats:
            raise ValueError(
                f"The evaluation set ({metric_key_prefix}) gave no batches, so there is no bound to report; pass an "
                "eval_dataset with at least one row of token ids."
            )
        stats = torch.cat(self._eval_stats).sum(0).tolist()
        self._eval_stats = []
        tokens = max(stats[_TOKENS], 1.0)
        nll, kl = stats[_NLL] / tokens, stats[_KL] / tokens
        settings = self.eval_fit_settings
        metrics = {
            "loss": nll + kl,
            "nll_per_token": nll,
            "kl_per_token": kl,
            "elbo_ppl": float(np.exp(nll + kl)),
            "inference_steps": settings.num_steps,
            "inference_lr": settings.lr,
            "inference_lr_min_ratio": settings.lr_min_ratio,
            "posterior_init_logvar": settings.init_logvar,
            "posterior_fixed_noise": settings.fixed_noise,
            "posterior_warm_start": settings.warm_start,  # from the posterior encoder: init_logvar unused
        }
        if self.eval_iw_samples > 0:
            metrics["iw_ppl"] = float(np.exp(-stats[_EVAL_IW_LOG_PX] / tokens))
            metrics["iw_samples"] = self.eval_iw_samples
        if self.eval_reconstruction:
            training = self.training_fit_settings(self.state.global_step)
            metrics["reconstruction_ppl"] = float(np.exp(stats[_EVAL_RECONSTRUCTION_NLL] / tokens))
            metrics["reconstruction_nll_per_token"] = stats[_EVAL_RECONSTRUCTION_NLL] / tokens
            metrics["reconstruction_inference_steps"] = training.num_steps
            metrics["reconstruction_inference_lr"] = training.lr
            metrics["reconstruction_init_logvar"] = training.init_logvar
        output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in metrics.items()})
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """`inference.evaluate_posterior` on each eval batch (the fits re-enable gradients under Trainer's
        `no_grad`): record its per-sequence NLL, KL, token count, importance-weighted bound and reconstruction NLL
        (gathered over processes), and return the batch's negative ELBO per token (plus the logits given the
        evaluation fit's `z` unless `prediction_loss_only`)."""
        inputs = self._prepare_inputs(inputs)
        input_ids, attention_mask, labels = _unpack(inputs)
        bare_model = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        first_row = self._first_global_row(self._eval_batches_seen, self.args.eval_batch_size)
        # Eval draws depend on the sequence's place in the eval set only: the same model gets the same numbers.
        seeds = _row_seeds(self.args.seed, _EVAL_STREAM, 0, first_row, input_ids.shape[0])
        self._eval_batches_seen += 1
        with self.accelerator.autocast():  # one region around the fits, as in training
            result = evaluate_posterior(
                bare_model,
                input_ids,
                attention_mask,
                labels=labels,
                settings=self.eval_fit_settings,
                iw_samples=self.eval_iw_samples,
                reconstruction=self.eval_reconstruction,
                reconstruction_settings=self.training_fit_settings(self.state.global_step),
                seed=seeds,
            )
        zeros = torch.zeros_like(result.nll)
        columns = {_NLL: result.nll, _KL: result.kl, _TOKENS: result.num_tokens.to(result.nll.dtype)}
        columns[_EVAL_IW_LOG_PX] = zeros if result.iw is None else result.iw
        columns[_EVAL_RECONSTRUCTION_NLL] = zeros if result.reconstruction_nll is None else result.reconstruction_nll
        stats = torch.stack([columns[index] for index in range(len(columns))], -1)
        gathered = self.accelerator.gather_for_metrics(stats.to(_sum_dtype(stats.device)))
        self._eval_stats.append(gathered.cpu().double())
        loss = ((result.nll + result.kl).sum() / result.num_tokens.sum().clamp(min=1)).detach()
        if prediction_loss_only:
            return loss, None, None
        with torch.no_grad():
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, latents=result.posterior.z, use_cache=False
            ).logits
        return loss, logits.detach(), labels


__all__ = ["LTMTrainer", "LTMTrainingArguments"]

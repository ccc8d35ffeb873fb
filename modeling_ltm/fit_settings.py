"""How a posterior fit runs: `PosteriorFitSettings`, with the training fast loop's and the evaluation fit's settings
read from an `LTMConfig`.

Imports only the standard library and its sibling `configuration_ltm` (copied next to the weights for
`trust_remote_code=True`).
"""

import dataclasses
from dataclasses import dataclass

from .configuration_ltm import INFERENCE_LOSS_REDUCTIONS, INFERENCE_LR_SCHEDULES, check_int, check_number


# Adaptive stopping for the evaluation fit is opt-in (`stop_tol`): measured in bench/inference_efficiency.py, it
# stops rows at about half the steps but leaves the bound slightly looser than the fixed 32 steps, so the default keeps
# the tight fit. These are the settings measured there (`PosteriorFitSettings.evaluation(config, stop_tol=...)`).
EVAL_STOP_TOL = None
EVAL_STOP_WINDOW = 8
SUGGESTED_STOP_TOL = 0.002


@dataclass(frozen=True)
class PosteriorFitSettings:
    """How one posterior fit runs: `num_steps` Adam steps on `(mu, logvar)` from `mu = init_mu_noise * N(0, 1)`,
    `logvar = init_logvar + init_logvar_noise * N(0, 1)` (relative to the prior's mean and log-variance), learning rate
    cosine-decayed from `lr` to `lr * lr_min_ratio`, with one `eps` for all steps (`fixed_noise=True`) or a new one at
    every step.

    The fast optimizer is Adam, or AdamW with `weight_decay > 0` (decoupled decay of `mu` and `logvar`); the cosine's
    half period is `num_steps - 1` (`lr_schedule="cosine_t_minus_1"`: the last step runs at the floor) or
    `num_steps` (`"cosine_t"`); the objective is each sequence's `(NLL + KL) / tokens` summed over sequences
    (`loss_reduction="per_token"`) or the NLL summed over tokens and sequences plus the summed KL (`"sum"`). The
    paper's code: AdamW with weight decay 0.01, `"cosine_t"`, `"sum"`, `init_mu_noise=0.01` (docs/fidelity.md).

    `select_samples > 0` (evaluation only: [`evaluate_posterior`]) reports, per sequence, the better of the fit's
    start and its last iterate, compared on that many shared `eps` draws and scored on fresh ones
    (modeling_ltm/selection.py); the training fast loop has 0. `score_samples` (evaluation only) is how many fresh
    draws of `z ~ q` the reported ELBO averages its likelihood term over when no importance-weighted bound is asked.

    `warm_start=True` starts instead from the proposal of the model's amortized posterior encoder
    (`model.model.posterior_encoder`, `config.posterior_encoder_size > 0`), computed from the fit's prefix;
    `init_logvar*` are then unused.

    Adaptive stopping (`stop_tol` not None): a row stops once its ELBO gain per step falls below `stop_tol` nats per
    token, measured as the difference of the means of its last two windows of `stop_window` ELBO estimates divided by
    `stop_window` (checked from step `max(min_steps, 2 * stop_window)` on); stopped rows leave the batch, so the
    remaining rows' steps cost less. `num_steps` is then the most steps any row takes, and the cosine schedule runs
    over it. Off (`None`) in the training fast loop.

    Two named sets come from an [`LTMConfig`]:

    - [`PosteriorFitSettings.training`]: the training fast loop (`num_inference_steps`, `inference_lr`,
      `inference_lr_min_ratio`, `posterior_init_logvar`, `posterior_init_logvar_noise`, `posterior_fixed_noise`).
      In the paper's presets: 16 steps, lr 0.3 -> 0.03, `logvar = -5 + 0.1 * N(0, 1)`, fixed `eps`.
    - [`PosteriorFitSettings.evaluation`]: the fit behind every reported bound (the config's `eval_*` fields).
      Defaults: start at the prior (`mu = 0`, `logvar = 0`, no jitter, so the initial KL is 0), `eps` redrawn at
      every step, 32 steps at lr 0.1 -> 0.01, chosen from the measurements in docs/evaluation.md, the better of start
      and last iterate kept per sequence (`eval_select_samples`, 4 draws). Adaptive stopping
      is off; `evaluation(config, stop_tol=SUGGESTED_STOP_TOL)` turns it on (window 8): about half the fast steps
      for a slightly looser bound (docs/benchmarks.md, "Evaluation-fit efficiency"). A model whose amortized
      posterior encoder was fitted for evaluation to its decoder (`config.posterior_encoder_fit == "evaluation"`,
      set by `fit_posterior_encoder`) starts from the encoder's proposal instead (`warm_start=True`) with
      `eval_warm_start_steps` (8) steps at `eval_warm_start_lr` (0.03): the 32-step bound for about a quarter of
      the compute in the same benchmark. An untrained, stale or training-fitted encoder leaves the prior start.

    Example:

    ```python
    >>> settings = PosteriorFitSettings.evaluation(model.config, num_steps=64)
    >>> result = evaluate_posterior(model, input_ids, settings=settings, iw_samples=16, seed=0)
    ```
    """

    num_steps: int
    lr: float
    lr_min_ratio: float = 0.1
    init_logvar: float = 0.0
    init_logvar_noise: float = 0.0
    fixed_noise: bool = False
    kl_weight: float = 1.0
    free_bits: float = 0.0
    stop_tol: float | None = None
    stop_window: int = 4
    min_steps: int = 0
    warm_start: bool = False
    select_samples: int = 0
    score_samples: int = 1
    init_mu_noise: float = 0.0
    weight_decay: float = 0.0
    lr_schedule: str = "cosine_t_minus_1"
    loss_reduction: str = "per_token"

    def __post_init__(self):
        check_int("num_steps", self.num_steps)
        for name in ("lr", "lr_min_ratio", "init_logvar", "init_logvar_noise", "init_mu_noise", "weight_decay"):
            check_number(name, getattr(self, name), finite=True)
        check_number("lr", self.lr, "> 0", why="the fast learning rate")
        check_number("lr_min_ratio", self.lr_min_ratio, "in (0, 1]")
        for name in ("init_logvar_noise", "init_mu_noise", "weight_decay"):
            check_number(name, getattr(self, name), ">= 0")
        for name, choices in (("lr_schedule", INFERENCE_LR_SCHEDULES), ("loss_reduction", INFERENCE_LOSS_REDUCTIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"`{name}` must be one of {choices}, got {getattr(self, name)!r}.")
        for name in ("fixed_noise", "warm_start"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        check_number("kl_weight", self.kl_weight, ">= 0", why="beta of the fast loop's KL term")
        check_number("free_bits", self.free_bits, ">= 0", why="nats per latent dimension")
        check_number("stop_tol", self.stop_tol, optional=True, why="nats per token per step")
        for name, low in (("stop_window", 1), ("min_steps", 0), ("select_samples", 0), ("score_samples", 1)):
            check_int(name, getattr(self, name), low)

    @classmethod
    def training(cls, config, **overrides) -> "PosteriorFitSettings":
        """The training fast loop's settings from `config`; `overrides` that are not None replace fields."""
        base = cls(
            num_steps=config.num_inference_steps,
            lr=config.inference_lr,
            lr_min_ratio=config.inference_lr_min_ratio,
            init_logvar=config.posterior_init_logvar,
            init_logvar_noise=config.posterior_init_logvar_noise,
            fixed_noise=config.posterior_fixed_noise,
            init_mu_noise=config.posterior_init_mu_noise,
            weight_decay=config.inference_weight_decay,
            lr_schedule=config.inference_lr_schedule,
            loss_reduction=config.inference_loss_reduction,
        )
        return base.replace(**overrides)

    @classmethod
    def evaluation(cls, config, **overrides) -> "PosteriorFitSettings":
        """The evaluation fit's settings from `config` (its `eval_*` fields; the class defaults for a config saved
        before they existed); `overrides` that are not None replace fields."""
        default = cls(num_steps=32, lr=0.1)
        base = cls(
            num_steps=getattr(config, "eval_inference_steps", default.num_steps),
            lr=getattr(config, "eval_inference_lr", default.lr),
            lr_min_ratio=getattr(config, "eval_inference_lr_min_ratio", default.lr_min_ratio),
            init_logvar=getattr(config, "eval_posterior_init_logvar", default.init_logvar),
            init_logvar_noise=getattr(config, "eval_posterior_init_logvar_noise", default.init_logvar_noise),
            fixed_noise=getattr(config, "eval_posterior_fixed_noise", default.fixed_noise),
            stop_tol=EVAL_STOP_TOL,  # adaptive stopping is no config field: opt in with `stop_tol=...` here
            stop_window=EVAL_STOP_WINDOW,
            select_samples=getattr(config, "eval_select_samples", 4),
            score_samples=getattr(config, "eval_score_samples", 8),
        )
        encoder_fit = getattr(config, "posterior_encoder_fit", None)
        if getattr(config, "posterior_encoder_size", 0) and encoder_fit == "evaluation":
            # Start from the proposal of an encoder fitted for evaluation to this decoder (`fit_posterior_encoder`).
            base = base.replace(warm_start=True, num_steps=config.eval_warm_start_steps, lr=config.eval_warm_start_lr)
        return base.replace(**overrides)

    def replace(self, **changes) -> "PosteriorFitSettings":
        """A copy with the fields in `changes` that are not None replaced (unknown names raise `TypeError`)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"PosteriorFitSettings has no field(s) {unknown}.")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for summaries and cards, e.g. `T=32, lr 0.1 -> 0.01 (cosine), start at the prior (q = p(z)), eps
        redrawn every step`. The start is relative to the prior (`N(0, I)`: mu 0, logvar 0; a learned prior: its own)."""
        if self.warm_start:
            start = "start at the posterior encoder's proposal (warm start)"
        elif self.init_logvar == 0 and not self.init_logvar_noise:
            start = "start at the prior (q = p(z))"
        else:
            start = f"start mu = the prior's mean, logvar = the prior's {self.init_logvar:+g}"
            if self.init_logvar_noise:
                start += f" + {self.init_logvar_noise:g}*N(0,1)"
        noise = "one fixed eps" if self.fixed_noise else "eps redrawn every step"
        if self.init_mu_noise and not self.warm_start:
            start = start.replace("mu = the prior's mean", f"mu = the prior's mean + {self.init_mu_noise:g}*N(0,1)")
            if start.startswith("start at the prior"):
                start += f", mu + {self.init_mu_noise:g}*N(0,1)"
        schedule = "cosine" if self.lr_schedule == "cosine_t_minus_1" else "cosine over T steps, floor not reached"
        line = f"T={self.num_steps}, lr {self.lr:g} -> {self.lr * self.lr_min_ratio:g} ({schedule}), {start}, {noise}"
        if self.weight_decay:
            line += f", AdamW (weight decay {self.weight_decay:g})"
        if self.loss_reduction == "sum":
            line += ", objective summed over tokens and sequences"
        if self.select_samples:
            line += f", the better of start and fit kept per sequence ({self.select_samples} shared draws)"
        if self.stop_tol is not None:
            line += (
                f", a row stops when its ELBO gains < {self.stop_tol:g} nats/token/step (window {self.stop_window}"
                + (f", at least {self.min_steps} steps)" if self.min_steps else ")")
            )
        return line


__all__ = [
    "EVAL_STOP_TOL",
    "EVAL_STOP_WINDOW",
    "SUGGESTED_STOP_TOL",
    "PosteriorFitSettings",
]

"""Aggressive inference early in training, against posterior collapse (He et al. 2019, "Lagging inference networks
and posterior collapse in variational autoencoders", arXiv:1901.05534).

While the phase lasts, every training batch's posterior is fitted with `LTMTrainingArguments.aggressive_inference_steps`
fast steps instead of `num_inference_steps`; every `aggressive_check_steps` optimizer steps the mutual information
`I_q(x; z)` between held-out sequences and their latents is estimated, and the phase ends at the first estimate that is
not above the best so far (He et al.'s rule: "until the mutual information stops climbing"). Then training goes on
with the normal `T`.

The phase's state is kept in `TrainerState.log_history`: each check logs `posterior_mi`, the check that ends the phase
also logs `aggressive_inference_ended` (the step). Trainer saves and restores the log history with every checkpoint,
so a resumed run continues in the phase it was in without a callback state of its own (transformers restores
`ExportableState` callbacks only under `restore_callback_states_from_checkpoint=True`, off by default).
"""

import math

import torch
from transformers import TrainerCallback


MI_KEY = "posterior_mi"
ENDED_KEY = "aggressive_inference_ended"


def posterior_mutual_information(
    mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> float:
    """The estimate of `I_q(x; z) = E_x E_q(z|x)[log q(z|x) - log q(z)]` of He et al. over a batch, in nats per
    sequence, with the aggregate posterior `q(z)` taken as the batch's mixture of its posteriors.

    Args:
        mu, logvar (`torch.Tensor` of shape `(batch, ...)`): the diagonal Gaussian posteriors `N(mu, exp(logvar))` of
            `batch` sequences (all latent dimensions of a sequence flattened into one vector).
        generator: for the one draw `z_i ~ q(z|x_i)` per sequence.

    One draw per sequence scores both terms (He et al.'s code takes `E_q[log q(z|x)]` in closed form; scoring it at
    the same draw as `log q(z)` cancels the draw's noise: identical posteriors give exactly 0, posteriors that never
    overlap exactly `log(batch)`). The mixture has `batch` components, so the estimate is at most `log(batch)` nats:
    use enough sequences (64 rows: 4.16 nats). Computed in float64.
    """
    mu = mu.detach().flatten(1).double()
    logvar = logvar.detach().flatten(1).double()
    batch, dims = mu.shape
    noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + torch.exp(0.5 * logvar) * noise
    # log q(z_i | x_j) for every pair: (batch_i, batch_j); its diagonal is each draw under its own posterior
    squared = (z[:, None, :] - mu[None, :, :]).pow(2) * torch.exp(-logvar)[None, :, :]
    log_density = -0.5 * (dims * math.log(2 * math.pi) + logvar.sum(-1)[None, :] + squared.sum(-1))
    log_aggregate = torch.logsumexp(log_density, dim=1) - math.log(batch)
    return float((log_density.diagonal() - log_aggregate).mean())


def phase_ended(log_history: list[dict]) -> bool:
    """Whether a check in `log_history` (Trainer's) ended the aggressive phase."""
    return any(ENDED_KEY in entry for entry in log_history)


def best_mutual_information(log_history: list[dict]) -> float | None:
    """The highest `posterior_mi` logged so far, None before the first check."""
    values = [entry[MI_KEY] for entry in log_history if MI_KEY in entry]
    return max(values) if values else None


class AggressiveInferenceCallback(TrainerCallback):
    """Runs the phase's checks for an `LTMTrainer` (added by it when `aggressive_inference_steps > 0`).

    Every `aggressive_check_steps` optimizer steps while the phase lasts, `trainer.held_out_mutual_information()` is
    logged as `posterior_mi`; the phase ends (logged as `aggressive_inference_ended`: the step) at the first estimate
    not above the best earlier one. Every process computes the same estimate on the same rows with the same seeds,
    so all processes leave the phase at the same step.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        every = getattr(args, "aggressive_check_steps", 0)
        if not self.trainer.in_aggressive_phase or every <= 0 or state.global_step % every:
            return control
        best = best_mutual_information(state.log_history)
        mutual_information = self.trainer.held_out_mutual_information()
        logs = {MI_KEY: mutual_information}
        if best is not None and mutual_information <= best:
            logs[ENDED_KEY] = state.global_step
        # `Trainer.log` ends in `on_log`, which clears `should_log`: keep the step's own decision to log its loss.
        should_log = control.should_log
        self.trainer.log(logs)
        control.should_log = self.trainer.control.should_log = should_log
        return control


__all__ = ["AggressiveInferenceCallback", "posterior_mutual_information"]

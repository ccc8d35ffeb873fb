"""The errors posterior fitting and the model raise about non-finite numbers and time budgets.

Imports nothing but the standard library (copied next to the weights for `trust_remote_code=True`).
"""


class NonFiniteWeightsError(ValueError):
    """A model's weights hold NaN or inf values (a diverged training run, or a damaged file)."""


class NonFiniteLatentsError(ValueError):
    """Latents given to the model hold NaN or inf (raised by `LTMModel.check_latents`)."""


class NonFiniteELBOError(FloatingPointError):
    """The ELBO became NaN or infinite inside the fast loop; `fast_step` says where (1 = at the starting point, where
    only the decoder can be at fault)."""

    fast_step: int | None = None


class FitDeadlineExceeded(TimeoutError):
    """A posterior fit passed its `deadline` (a `time.monotonic()` value) between two fast steps; `fast_step` says
    how many steps it had taken. Raised by `fit_posterior(..., deadline=...)`, e.g. for `--max_train_minutes`."""

    fast_step: int | None = None


__all__ = ["FitDeadlineExceeded", "NonFiniteELBOError", "NonFiniteLatentsError", "NonFiniteWeightsError"]

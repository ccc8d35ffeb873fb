"""Seeds and noise of posterior fitting: stable per-sequence seeds, per-row generators, and `N(0, I)` draws made on
the device that uses them (a draw on the CPU copied to a GPU at every fast step stalls the loop).

Imports only torch (copied next to the weights for `trust_remote_code=True`).
"""

import hashlib
from collections.abc import Sequence

import torch


# Derive the seeds of the importance samples, and of the evaluation's selection and scoring draws, from the fitting
# seeds, so that no two of these sets of draws are the same.
IMPORTANCE_SEED_OFFSET = 1_000_003
SELECTION_SEED_OFFSET = 2_000_029
SCORING_SEED_OFFSET = 3_000_017


def content_seed(base_seed: int, tokens: Sequence[int], purpose: str) -> int:
    """A stable 31-bit seed for one sequence's posterior fit, from the base seed, a purpose tag and the token ids.

    Deterministic across processes and platforms (sha256, not Python's salted `hash`), so the fit of a sequence
    does not depend on its batch, the batch size, the order of requests or the process that runs it.
    """
    digest = hashlib.sha256(f"{base_seed}|{purpose}|{','.join(map(str, tokens))}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def row_content_seeds(
    base_seed: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, purpose: str
) -> list[int]:
    """`content_seed` of each row of a (padded) `(batch, length)` batch, from the row's real tokens only (those where
    `attention_mask` is 1), so a row of a padded batch gets the seed it gets alone. One host read of the batch."""
    rows = input_ids.tolist()
    if attention_mask is not None:
        masks = attention_mask.bool().tolist()
        rows = [[token for token, real in zip(row, mask) if real] for row, mask in zip(rows, masks)]
    return [content_seed(base_seed, row, purpose) for row in rows]


def row_generators(
    seed: int | Sequence[int] | None,
    generator: torch.Generator | None,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> list[torch.Generator] | torch.Generator | None:
    """The random streams of a batch: one generator per row for per-sequence seeds (results independent of
    batching), one shared generator for an int seed, the caller's `generator` as given, or None for the global RNG.

    Generators made here live on `device`, so the draws are made where they are used; a CPU generator (the default
    device) gives the same numbers on every platform.
    """
    if generator is not None:
        return generator
    if seed is None:
        return None
    if isinstance(seed, int):
        return torch.Generator(device=device).manual_seed(seed)
    seeds = list(seed)
    if len(seeds) != batch_size:
        raise ValueError(f"`seed` has {len(seeds)} per-sequence seeds for a batch of {batch_size}; pass one per row.")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def standard_normal(shape, generators, device) -> torch.Tensor:
    """Float32 `N(0, I)` draws of `shape` = `(batch, ...)` on `device`; rows drawn from their own generator when
    given a list. A generator on another device than `device` draws there and the result is copied over."""
    if isinstance(generators, list):
        rows = [torch.randn(shape[1:], generator=g, device=g.device) for g in generators]
        return torch.stack(rows).to(device)
    if generators is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generators, device=generators.device).to(device)


def derived_seed(seed: int | Sequence[int] | None, offset: int) -> int | list[int] | None:
    """The seed(s) of another stream of draws, derived from the fitting seed(s) by `offset`, so the streams differ.
    None (the global RNG) stays None."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return seed + offset
    return [int(s) + offset for s in seed]


def importance_seed(seed: int | Sequence[int] | None) -> int | list[int] | None:
    """The importance-sampling seed(s) derived from the fitting seed(s), so the two sets of draws differ."""
    return derived_seed(seed, IMPORTANCE_SEED_OFFSET)


class NoiseStream:
    """The `eps` of one fit, `(batch, *latent_shape)` float32 per draw, drawn in the order the fit uses them.

    On the CPU each draw is made when asked for (the numbers then do not depend on how many draws the fit makes). On
    a GPU all `num_draws` draws are made at once, before the loop, one call per row generator: the fast steps then
    read them with no random-number work (or host round trip) of their own, which a CUDA graph needs.
    """

    def __init__(self, shape, generators, device, num_draws: int, predraw: bool | None = None):
        """`predraw`: draw all `num_draws` at once (default: on any device but the CPU)."""
        self.shape, self.generators, self.device = tuple(shape), generators, torch.device(device)
        self._next = 0
        self._drawn = None
        if predraw is None:
            predraw = self.device.type != "cpu"
        if predraw and num_draws > 0:
            self._drawn = self._draw_many(num_draws)

    def _draw_many(self, num_draws: int) -> torch.Tensor:
        """`(num_draws, *shape)`: row `r`'s draws come from its own generator, as `num_draws` single draws would."""
        batch, rest = self.shape[0], self.shape[1:]
        if isinstance(self.generators, list):
            rows = [torch.randn((num_draws, *rest), generator=g, device=g.device) for g in self.generators]
            return torch.stack(rows, dim=1).to(self.device)
        if self.generators is None:
            return torch.randn((num_draws, batch, *rest), device=self.device)
        drawn = torch.randn((num_draws, batch, *rest), generator=self.generators, device=self.generators.device)
        return drawn.to(self.device)

    def next(self) -> torch.Tensor:
        """The next draw, `(batch, *latent_shape)`; past the pre-drawn ones, a fresh draw."""
        index, self._next = self._next, self._next + 1
        if self._drawn is not None and index < self._drawn.shape[0]:
            return self._drawn[index]
        return standard_normal(self.shape, self.generators, self.device)


__all__ = [
    "IMPORTANCE_SEED_OFFSET",
    "SCORING_SEED_OFFSET",
    "SELECTION_SEED_OFFSET",
    "NoiseStream",
    "content_seed",
    "derived_seed",
    "importance_seed",
    "row_content_seeds",
    "row_generators",
    "standard_normal",
]

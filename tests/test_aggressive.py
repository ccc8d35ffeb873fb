"""Aggressive inference early in training (modeling_ltm/tooling/aggressive.py): the mutual-information estimate, the
phase's steps, its end at the first held-out check that does not rise, and exact resume through Trainer's log history."""

import math

import pytest
import torch
from test_trainer import byte_blocks, byte_model, heldout_blocks, make_args

from modeling_ltm import LTMTrainer, LTMTrainingArguments
from modeling_ltm.tooling.aggressive import posterior_mutual_information


def test_mutual_information_is_log_batch_for_separated_posteriors_and_0_for_identical_ones():
    generator = torch.Generator().manual_seed(0)
    batch, shape = 64, (2, 1, 8)  # (layers, latents, width): 16 dimensions per sequence
    separated_mu = 50.0 * torch.randn((batch, *shape), generator=generator)
    small = torch.full((batch, *shape), -4.0)
    assert posterior_mutual_information(separated_mu, small, generator) == pytest.approx(math.log(batch), abs=1e-6)
    same_mu = torch.randn(shape, generator=generator).expand(batch, *shape)
    assert posterior_mutual_information(same_mu, torch.zeros_like(same_mu), generator) == pytest.approx(0, abs=1e-12)


def test_mutual_information_matches_the_exact_value_of_two_clusters():
    """Half the sequences at N(-m, 1), half at N(+m, 1), one dimension: with m >> 1, I(x; z) = log 2 (which cluster)
    whatever the batch size; and for overlapping clusters the estimate is near the exact value (numerical integral)."""
    mu = torch.cat([torch.full((32, 1), -30.0), torch.full((32, 1), 30.0)])
    estimate = posterior_mutual_information(mu, torch.zeros_like(mu), torch.Generator().manual_seed(1))
    assert estimate == pytest.approx(math.log(2), abs=1e-6)

    m, batch = 1.0, 4096
    mu = torch.cat([torch.full((batch // 2, 1), -m), torch.full((batch // 2, 1), m)])
    grid = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    density = lambda center: torch.exp(-0.5 * (grid - center) ** 2) / math.sqrt(2 * math.pi)  # noqa: E731
    mixture = 0.5 * (density(-m) + density(m))
    exact = float(torch.trapezoid(density(m) * torch.log(density(m) / mixture), grid))  # I = E KL(q(z|x) || q(z))
    estimate = posterior_mutual_information(mu, torch.zeros_like(mu), torch.Generator().manual_seed(2))
    assert estimate == pytest.approx(exact, abs=0.02)  # 4,096 draws: standard error ~0.006 nats


def _scripted_trainer(tmp_path, tiny_shakespeare_path, monkeypatch, values, **overrides):
    """An LTMTrainer whose held-out estimates are `values[global_step]` (the rule is tested, not the estimate)."""
    monkeypatch.setattr(LTMTrainer, "held_out_mutual_information", lambda self: values[self.state.global_step])
    args = make_args(
        tmp_path,
        max_steps=6,
        num_inference_steps=1,
        aggressive_inference_steps=3,
        aggressive_check_steps=1,
        **overrides,
    )
    return LTMTrainer(
        model=byte_model(),
        args=args,
        train_dataset=byte_blocks(tiny_shakespeare_path, 32, 24),
        eval_dataset=heldout_blocks(tiny_shakespeare_path, 32, 8),
    )


MI_BY_STEP = {1: 0.1, 2: 0.3, 3: 0.2, 4: 0.5, 5: 0.6, 6: 0.7}


def test_the_phase_fits_with_more_steps_until_the_held_out_estimate_stops_rising(
    tmp_path, tiny_shakespeare_path, monkeypatch
):
    trainer = _scripted_trainer(tmp_path, tiny_shakespeare_path, monkeypatch, MI_BY_STEP)
    assert trainer.in_aggressive_phase and trainer.inference_steps_at(0) == 3
    trainer.train()
    # Checks after steps 1, 2, 3: 0.1, 0.3 (rising), 0.2 (not above 0.3): the phase ends after step 3; later rises
    # do not restart it.
    assert trainer.training_fast_steps == [3, 3, 3, 1, 1, 1]
    checks = [entry for entry in trainer.state.log_history if "posterior_mi" in entry]
    assert [(entry["step"], entry["posterior_mi"]) for entry in checks] == [(1, 0.1), (2, 0.3), (3, 0.2)]
    assert checks[-1]["aggressive_inference_ended"] == 3
    assert not trainer.in_aggressive_phase and trainer.inference_steps_at(5) == 1
    logged = [entry["inference_steps"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [3, 3, 3, 1, 1, 1]


@pytest.mark.parametrize("checkpoint, expected", [(2, [3, 1, 1, 1]), (4, [1, 1])])
def test_a_resumed_run_continues_in_the_phase_it_was_in(
    tmp_path, tiny_shakespeare_path, monkeypatch, checkpoint, expected
):
    saving = dict(save_strategy="steps", save_steps=2)
    _scripted_trainer(tmp_path / "run", tiny_shakespeare_path, monkeypatch, MI_BY_STEP, **saving).train()
    resumed = _scripted_trainer(tmp_path / "run", tiny_shakespeare_path, monkeypatch, MI_BY_STEP, **saving)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{checkpoint}"))
    assert resumed.training_fast_steps == expected
    ends = [
        entry["aggressive_inference_ended"]
        for entry in resumed.state.log_history
        if "aggressive_inference_ended" in entry
    ]
    assert ends == [3]


def test_the_real_estimate_is_finite_and_at_most_log_rows(tmp_path, tiny_shakespeare_path):
    trainer = LTMTrainer(
        model=byte_model(),
        args=make_args(tmp_path, max_steps=1, aggressive_inference_steps=2, aggressive_mi_rows=8),
        train_dataset=byte_blocks(tiny_shakespeare_path, 32, 8),
        eval_dataset=heldout_blocks(tiny_shakespeare_path, 32, 16),
    )
    estimate = trainer.held_out_mutual_information()
    assert math.isfinite(estimate) and estimate <= math.log(8) + 1e-9
    assert trainer.held_out_mutual_information() == estimate  # seeded by the step: every process agrees
    assert trainer.model.training  # the mode is restored


def test_the_phase_needs_held_out_rows_and_valid_settings(tmp_path, tiny_shakespeare_path):
    with pytest.raises(ValueError, match="no eval_dataset"):
        LTMTrainer(
            model=byte_model(),
            args=make_args(tmp_path, aggressive_inference_steps=8),
            train_dataset=byte_blocks(tiny_shakespeare_path, 32, 8),
        )
    for name, value in (("aggressive_inference_steps", -1), ("aggressive_check_steps", 0), ("aggressive_mi_rows", 1)):
        with pytest.raises(ValueError, match=name):
            LTMTrainingArguments(str(tmp_path), use_cpu=True, **{name: value})

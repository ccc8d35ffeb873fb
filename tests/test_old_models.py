"""A model saved before a config field existed means what it meant: its `config.json` lacks the field, the field's
default reproduces the old behaviour, to float32 rounding (the RoPE's product-sum is no longer fused, see
`assert_equal_to_rounding`; tests/fixtures/README.md says how the fixture was made)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_remote_code import CODE_FILES, run_clean_child

from modeling_ltm import LTMForCausalLM
from modeling_ltm.inference import fit_posterior


FIXTURE = Path(__file__).parent / "fixtures" / "model_before_paper_fields"
NEW_FIELDS = (
    "latent_position_spacing",
    "posterior_init_mu_noise",
    "inference_weight_decay",
    "inference_lr_schedule",
    "inference_loss_reduction",
    "scaled_init_projections",
)


def assert_equal_to_rounding(actual: torch.Tensor, expected: torch.Tensor, roundings: int = 8) -> None:
    """`actual` is `expected` up to `roundings` float32 roundings at the tensor's scale.

    The saved numbers came from a RoPE written as one fused `addcmul` (`x * cos + roll(x) * signed_sin`, the
    product-sum rounded once); the model now uses Llama's helper (`x * cos + rotate_half(x) * sin`, rounded twice).
    Each rotated query/key element moves by at most one float32 rounding (`eps` relative); the two-layer tiny model
    carries a few such moves into each output, measured at 2.7 `eps x max|expected|` for the logits and the fitted
    `mu` (0.8 for `logvar`). 8 allows for that and nothing else: a change of the model's meaning (a field's default,
    the latents' positions) moves these numbers by orders of magnitude more."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    bound = roundings * torch.finfo(expected.dtype).eps * expected.abs().max()
    assert (actual - expected).abs().max() <= bound


@pytest.fixture(scope="module")
def old():
    return LTMForCausalLM.from_pretrained(FIXTURE / "model").eval(), load_file(FIXTURE / "expected.safetensors")


def test_the_fixture_predates_the_fields():
    saved = json.loads((FIXTURE / "model" / "config.json").read_text())
    assert not set(NEW_FIELDS) & set(saved)


def test_an_old_config_loads_with_the_fields_that_reproduce_it(old):
    model, _ = old
    config = model.config
    assert config.latent_position_spacing == "per_layer" and config.scaled_init_projections is None
    assert (config.posterior_init_mu_noise, config.inference_weight_decay) == (0.0, 0.0)
    assert (config.inference_lr_schedule, config.inference_loss_reduction) == ("cosine_t_minus_1", "per_token")


def test_logits_posterior_and_generation_are_those_of_the_code_that_saved_it(old):
    model, expected = old
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], latents=expected["latents"]).logits
    assert_equal_to_rounding(logits, expected["logits"])
    posterior = fit_posterior(model, expected["input_ids"], seed=[3, 4])
    assert_equal_to_rounding(posterior.mu, expected["mu"])
    assert_equal_to_rounding(posterior.logvar, expected["logvar"])
    generated = model.generate(expected["input_ids"][:, :6], max_new_tokens=5, do_sample=False, inference_seed=5)
    assert torch.equal(generated, expected["generated"])


@pytest.mark.slow
def test_todays_remote_code_computes_the_old_logits(old, tmp_path):
    """The old folder with today's remote-code files beside it (what a Hub user gets after the files update), loaded
    with `trust_remote_code=True` in a fresh interpreter without our package: the old logits."""
    model, expected = old
    folder = tmp_path / "old"
    shutil.copytree(FIXTURE / "model", folder)
    package = Path(__file__).resolve().parents[1] / "modeling_ltm"
    for name in CODE_FILES:
        shutil.copy(package / name, folder / name)
    tensors_in = tmp_path / "inputs.safetensors"
    save_file({"input_ids": expected["input_ids"], "latents": expected["latents"]}, tensors_in)
    process, outputs = run_clean_child(folder, tmp_path, tensors_in)
    assert process.returncode == 0, process.stderr[-4000:]
    assert_equal_to_rounding(outputs["logits"], expected["logits"])
    torch.testing.assert_close(outputs["mu"], model.infer_latents(expected["input_ids"], num_steps=2, seed=[0, 1]).mu)

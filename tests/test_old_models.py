"""A model saved before a config field existed means what it meant: its `config.json` lacks the field, the field's
default reproduces the old behaviour, bit for bit (tests/fixtures/README.md says how the fixture was made)."""

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
    assert torch.equal(logits, expected["logits"])
    posterior = fit_posterior(model, expected["input_ids"], seed=[3, 4])
    assert torch.equal(posterior.mu, expected["mu"]) and torch.equal(posterior.logvar, expected["logvar"])
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
    assert torch.equal(outputs["logits"], expected["logits"])
    torch.testing.assert_close(outputs["mu"], model.infer_latents(expected["input_ids"], num_steps=2, seed=[0, 1]).mu)

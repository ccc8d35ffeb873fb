"""Presets in configuration/: every `ltm-*.json` round-trips through LTMConfig and builds on the meta device with
the parameter counts of configuration/README.md's table; every training recipe parses as LTMTrainingArguments."""

import json
import math
import re

import pytest
import torch
from conftest import REPO_ROOT
from transformers import HfArgumentParser

from modeling_ltm import LTMConfig, LTMForCausalLM


CONFIG_DIR = REPO_ROOT / "configuration"
PRESETS = sorted(CONFIG_DIR.glob("ltm-*.json"))
RECIPES = sorted((CONFIG_DIR / "recipes").glob("ltm-*.json"))
PAPER_PRESETS = {"ltm-s.json": 38e6, "ltm-m.json": 51e6, "ltm-l.json": 76e6}  # the paper's reported sizes


def _count(cell: str) -> int:
    return int(cell.strip().strip("*").replace(",", ""))


def readme_table() -> dict[str, dict[str, int]]:
    """Rows of the parameter table in configuration/README.md: preset file -> total / non-embedding counts."""
    text = (CONFIG_DIR / "README.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    total_col, non_embedding_col = header.index("parameters (total)"), header.index("non-embedding")
    table = {}
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        match = re.fullmatch(r"`(ltm-[\w-]+\.json)`", cells[0])
        if match:
            counts = {"total": _count(cells[total_col]), "non_embedding": _count(cells[non_embedding_col])}
            table[match.group(1)] = counts
    return table


def test_paper_presets_exist_and_have_a_table_row():
    names = {path.name for path in PRESETS}
    assert set(PAPER_PRESETS) <= names
    assert set(PAPER_PRESETS) <= set(readme_table())


@pytest.mark.parametrize("path", PRESETS, ids=lambda path: path.name)
def test_preset_round_trips_and_builds_on_meta(path):
    preset = json.loads(path.read_text())
    config = LTMConfig.from_dict(preset)
    for key, value in preset.items():
        assert getattr(config, key) == value, key
    assert LTMConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()

    with torch.device("meta"):
        model = LTMForCausalLM(config)
    total, non_embedding = model.num_parameters(), model.num_parameters(exclude_embeddings=True)
    assert total - non_embedding == config.padded_vocab_size * config.hidden_size  # tied embeddings counted once

    row = readme_table().get(path.name)
    if path.name in PAPER_PRESETS:
        assert row is not None, f"{path.name} has no row in configuration/README.md"
        # The paper counts the GPT-2 vocabulary's 50257 rows; the padding rows (47 x hidden) are ours.
        unpadded = total - (config.padded_vocab_size - config.vocab_size) * config.hidden_size
        assert abs(unpadded - PAPER_PRESETS[path.name]) / PAPER_PRESETS[path.name] < 0.01  # within its rounding
    if row is not None:
        assert row == {"total": total, "non_embedding": non_embedding}, (
            f"configuration/README.md's row for {path.name} is stale: the model has {total:,} parameters "
            f"({non_embedding:,} non-embedding)"
        )


def test_paper_presets_follow_the_paper():
    """Each paper preset, built, has the paper's setup (GPT-2's vocabulary, a 1024-token context with a 256-token
    sliding window, the latent slots and fast steps of its size: docs/fidelity.md), and trains with it: its recipe runs
    the preset's fast steps, the model's latent tensor has that many slots, and the vocabulary is padded only up to
    the next multiple of 128 rows (as nanoGPT pads it: the LM head's GEMMs then run Hopper's kernels)."""
    paper = {"ltm-s.json": (24, 16), "ltm-m.json": (24, 16), "ltm-l.json": (96, 64)}  # latent slots, fast steps T
    for name, (slots, steps) in paper.items():
        config = LTMConfig.from_json_file(CONFIG_DIR / name)
        assert (config.vocab_size, config.max_position_embeddings, config.sliding_window) == (50257, 1024, 256)
        with torch.device("meta"):
            model = LTMForCausalLM(config)
        assert math.prod(model.config.latent_shape[:-1]) == slots
        recipe = json.loads((CONFIG_DIR / "recipes" / name).read_text())
        assert recipe["num_inference_steps"] == config.num_inference_steps == steps
        multiple = config.pad_vocab_size_to_multiple_of
        assert multiple == 128 and model.get_output_embeddings().weight.shape[0] == config.padded_vocab_size
        padding = config.padded_vocab_size - config.vocab_size
        assert config.padded_vocab_size % multiple == 0 and 0 <= padding < multiple


# What the authors' code does where this library's defaults differ (docs/fidelity.md, section 7).
AUTHORS_FAST_LOOP = {
    "latent_position_spacing": "all_latents",
    "inference_lr": 0.34,
    "inference_lr_min_ratio": 0.1,
    "inference_lr_schedule": "cosine_t",
    "inference_weight_decay": 0.01,
    "inference_loss_reduction": "sum",
    "posterior_init_mu_noise": 0.01,
    "posterior_init_logvar": -5.0,
    "posterior_init_logvar_noise": 0.1,
    "posterior_fixed_noise": True,
    "scaled_init_projections": ["o_proj", "up_proj"],
}


@pytest.mark.parametrize("variant", ["", "-honest", "-prior"])
@pytest.mark.parametrize("size", ["s", "m", "l"])
def test_paper_presets_set_every_field_where_the_authors_code_differs_from_our_defaults(size, variant):
    config = LTMConfig.from_json_file(CONFIG_DIR / f"ltm-{size}{variant}.json")
    assert {name: getattr(config, name) for name in AUTHORS_FAST_LOOP} == AUTHORS_FAST_LOOP
    recipe = json.loads((CONFIG_DIR / "recipes" / f"ltm-{size}{variant}.json").read_text())
    # A constant peak fast lr (the authors' 0.3 -> 0.34 ramp is overwritten by 0.34 inside their loop), and the slow
    # step at the fast loop's own eps.
    assert recipe["inference_lr"] == 0.34 and "inference_lr_end" not in recipe
    assert recipe["slow_step_noise"] == "fast_loop"


def test_every_preset_has_a_recipe_matching_its_inference_steps():
    recipes = {path.name for path in RECIPES}
    assert set(PAPER_PRESETS) <= recipes
    for name in PAPER_PRESETS:
        recipe = json.loads((CONFIG_DIR / "recipes" / name).read_text())
        assert recipe["num_inference_steps"] == LTMConfig.from_json_file(CONFIG_DIR / name).num_inference_steps


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.name)
def test_recipe_parses_as_ltm_training_arguments(path, tmp_path):
    trainer = pytest.importorskip("modeling_ltm.tooling.trainer")
    recipe = json.loads(path.read_text())
    recipe["output_dir"] = str(tmp_path)
    if recipe.get("bf16") and not torch.cuda.is_available():
        recipe["bf16"] = False  # the recipes target GPUs; TrainingArguments refuses bf16 on this CPU
    paper_recipe = path.name in PAPER_PRESETS
    # Other recipes (ltm-tiny) may carry the training CLI's data options next to the training arguments.
    parser = HfArgumentParser(trainer.LTMTrainingArguments)
    (args,) = parser.parse_dict(recipe, allow_extra_keys=not paper_recipe)
    if not paper_recipe:
        return
    # The paper's slow-learning optimiser: AdamW lr 4e-4, betas (0.9, 0.95), weight decay 0.1, clip 1.0, cosine
    # schedule with warm-up down to lr / 10.
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2) == (4e-4, 0.9, 0.95)
    assert (args.weight_decay, args.max_grad_norm) == (0.1, 1.0)
    assert args.lr_scheduler_type.value == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert args.warmup_steps > 0
    assert args.inference_lr == 0.34 and args.inference_lr_end is None and args.slow_step_noise == "fast_loop"


# Fields an honest variant may change: the training fast loop and the evaluation fit. Everything else (the
# architecture, the tokenizer, the context) stays the paper's, so the variant trains the same-size model.
HONEST_VARIANT_FIELDS = {
    "num_inference_steps",
    "inference_lr",
    "inference_lr_min_ratio",
    "posterior_init_logvar",
    "posterior_init_logvar_noise",
    "posterior_fixed_noise",
}


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS))
def test_each_paper_preset_has_a_documented_honest_variant(name, tmp_path):
    honest_name = name.replace(".json", "-honest.json")
    paper = json.loads((CONFIG_DIR / name).read_text())
    honest = json.loads((CONFIG_DIR / honest_name).read_text())
    for key in set(paper) | set(honest):
        if key in HONEST_VARIANT_FIELDS or key.startswith("eval_"):
            continue
        assert honest.get(key) == paper.get(key), f"{honest_name} changes {key}, which is not a fit setting"
    # The evaluation fit of the honest variant: from the prior, eps redrawn every step.
    assert honest["eval_posterior_init_logvar"] == 0.0 and honest["eval_posterior_init_logvar_noise"] == 0.0
    assert honest["eval_posterior_fixed_noise"] is False
    assert honest["eval_inference_steps"] >= 32
    assert honest_name in readme_table(), f"{honest_name} has no row in configuration/README.md"
    assert honest_name in (CONFIG_DIR / "README.md").read_text()

    trainer = pytest.importorskip("modeling_ltm.tooling.trainer")
    recipe = json.loads((CONFIG_DIR / "recipes" / honest_name).read_text())
    recipe.update(output_dir=str(tmp_path), bf16=False)
    (args,) = HfArgumentParser(trainer.LTMTrainingArguments).parse_dict(recipe)
    assert args.eval_iw_samples >= 16
    assert args.num_inference_steps == honest["num_inference_steps"]


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS))
def test_each_paper_preset_has_a_learned_prior_variant_of_its_honest_one(name):
    honest_name, prior_name = name.replace(".json", "-honest.json"), name.replace(".json", "-prior.json")
    honest = json.loads((CONFIG_DIR / honest_name).read_text())
    prior = json.loads((CONFIG_DIR / prior_name).read_text())
    assert prior.pop("prior_type") == "diagonal_gaussian"
    assert prior == honest, f"{prior_name} must be {honest_name} plus the learned prior"
    assert prior_name in readme_table(), f"{prior_name} has no row in configuration/README.md"
    recipes = CONFIG_DIR / "recipes"
    assert (recipes / prior_name).read_text() == (recipes / honest_name).read_text()


def test_converted_checkpoints_get_the_presets_fast_loop():
    """`ltm convert-original` writes the same paper fast loop into a converted model's config as the presets hold."""
    from modeling_ltm.tooling.convert_original import PAPER_FAST_LOOP

    assert PAPER_FAST_LOOP == {name: AUTHORS_FAST_LOOP[name] for name in PAPER_FAST_LOOP}

"""LTMConfig: validation of every field (ValueError naming it), derived defaults, dict/JSON round trips."""

import pytest
from conftest import tiny_config
from huggingface_hub.errors import StrictDataclassError

from modeling_ltm import LTMConfig


# A strict dataclass, as transformers' configs are: errors name the field (or the class rule) and say why.
CONFIG_ERRORS = (ValueError, StrictDataclassError)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(hidden_size=66, num_attention_heads=4), "hidden_size"),  # not divisible by the heads
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),  # does not divide the heads
        (dict(hidden_size=12, num_attention_heads=4, num_key_value_heads=4), "head dimension"),  # head_dim 3 is odd
        (dict(vocab_size=0), "vocab_size"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(hidden_size=-64), "hidden_size"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(num_attention_heads=0), "num_attention_heads"),
        (dict(num_key_value_heads=0), "num_key_value_heads"),
        (dict(max_position_embeddings=0), "max_position_embeddings"),
        (dict(n_latents_per_layer=0), "n_latents_per_layer"),
        (dict(latent_dim=0), "latent_dim"),
        (dict(hidden_size=64.0), "hidden_size"),  # a float where an int is needed
        (dict(num_hidden_layers=True), "num_hidden_layers"),  # a bool is not a count
        (dict(dropout=-0.1), "dropout"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_inference_steps=-1), "num_inference_steps"),
        (dict(num_inference_steps=2.5), "num_inference_steps"),
        (dict(inference_lr=0.0), "inference_lr"),
        (dict(inference_lr=-0.3), "inference_lr"),
        (dict(inference_lr_min_ratio=0.0), "inference_lr_min_ratio"),
        (dict(inference_lr_min_ratio=1.5), "inference_lr_min_ratio"),
        (dict(n_latents_per_layer=65, max_position_embeddings=64), "n_latents_per_layer"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 0.0}), "rope_theta"),
        (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "dynamic"),
        (dict(pad_vocab_size_to_multiple_of=0), "pad_vocab_size_to_multiple_of"),
        (dict(hidden_act="swishy"), "hidden_act"),
        (dict(posterior_encoder_fit="sometimes"), "posterior_encoder_fit"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(initializer_range=-0.02), "initializer_range"),
        (dict(posterior_init_logvar_noise=-0.1), "posterior_init_logvar_noise"),
        (dict(inference_lr="0.3"), "inference_lr"),  # a string from a hand-edited JSON
        (dict(dropout=None), "dropout"),
        (dict(posterior_init_logvar=float("nan")), "posterior_init_logvar"),
        (dict(rope_theta=float("inf")), "rope_theta"),  # an older config.json's key, moved into rope_parameters
        (dict(posterior_fixed_noise="yes"), "posterior_fixed_noise"),
        (dict(eval_inference_steps=-1), "eval_inference_steps"),
        (dict(eval_inference_steps=2.5), "eval_inference_steps"),
        (dict(eval_inference_lr=0.0), "eval_inference_lr"),
        (dict(eval_inference_lr_min_ratio=1.5), "eval_inference_lr_min_ratio"),
        (dict(eval_posterior_init_logvar=float("nan")), "eval_posterior_init_logvar"),
        (dict(eval_posterior_init_logvar_noise=-0.1), "eval_posterior_init_logvar_noise"),
        (dict(eval_posterior_fixed_noise="no"), "eval_posterior_fixed_noise"),
    ],
)
def test_invalid_value_raises_an_error_naming_the_field(overrides, field):
    with pytest.raises(CONFIG_ERRORS, match=field):
        tiny_config(**overrides)


def test_error_message_gives_the_values_and_the_fix():
    with pytest.raises(CONFIG_ERRORS) as excinfo:
        tiny_config(hidden_size=66, num_attention_heads=4)
    message = str(excinfo.value)
    assert "66" in message and "4" in message and "multiple" in message


def test_edge_values_are_accepted():
    config = tiny_config(
        dropout=0.0,
        num_inference_steps=0,
        inference_lr_min_ratio=1.0,
        n_latents_per_layer=64,
        sliding_window=1,
        initializer_range=0.0,
    )
    assert config.num_inference_steps == 0 and config.sliding_window == 1


def test_derived_defaults():
    config = LTMConfig(hidden_size=96, num_attention_heads=6, num_hidden_layers=3, n_latents_per_layer=2)
    assert config.num_key_value_heads == 6  # defaults to the query heads (no grouping)
    assert config.latent_dim == 96  # defaults to the hidden size
    assert config.intermediate_size == 256  # 8/3 * 96 = 256, already a multiple of 64
    assert config.intermediate_size % 64 == 0
    assert LTMConfig(hidden_size=64, num_attention_heads=4).intermediate_size == 192  # 170 rounded up to 192
    assert config.head_dim == 16
    assert config.latent_shape == (3, 2, 96)
    # Explicit values win over the derived ones.
    explicit = LTMConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, latent_dim=8, intermediate_size=100
    )
    assert (explicit.num_key_value_heads, explicit.latent_dim, explicit.intermediate_size) == (2, 8, 100)


def test_paper_defaults():
    config = LTMConfig()
    assert config.model_type == "ltm"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (12, 768, 50257)
    assert config.max_position_embeddings == 1024 and config.sliding_window is None
    assert (config.num_inference_steps, config.inference_lr, config.inference_lr_min_ratio) == (16, 0.3, 0.1)
    assert (config.posterior_init_logvar, config.posterior_init_logvar_noise, config.posterior_fixed_noise) == (
        -5.0,
        0.1,
        True,
    )
    assert config.tie_word_embeddings is True
    # The evaluation fit (issue 10): start at the prior, eps redrawn, 32 steps at lr 0.1 -> 0.01.
    assert (config.eval_inference_steps, config.eval_inference_lr, config.eval_inference_lr_min_ratio) == (
        32,
        0.1,
        0.1,
    )
    assert (
        config.eval_posterior_init_logvar,
        config.eval_posterior_init_logvar_noise,
        config.eval_posterior_fixed_noise,
    ) == (0.0, 0.0, False)


def test_to_dict_from_dict_round_trip():
    config = tiny_config(sliding_window=16, dropout=0.1, inference_lr=0.05, posterior_fixed_noise=False)
    as_dict = config.to_dict()
    assert as_dict["model_type"] == "ltm"
    restored = LTMConfig.from_dict(as_dict)
    assert restored.to_dict() == as_dict
    for name in ("sliding_window", "latent_dim", "intermediate_size", "num_key_value_heads", "posterior_fixed_noise"):
        assert getattr(restored, name) == getattr(config, name)


def test_save_pretrained_round_trip_and_auto_config(tmp_path):
    from transformers import AutoConfig

    config = tiny_config(sliding_window=8)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LTMConfig)
    loaded_dict, config_dict = loaded.to_dict(), config.to_dict()
    loaded_dict.pop("_name_or_path"), config_dict.pop("_name_or_path")
    assert loaded_dict == config_dict


def test_from_dict_validates():
    as_dict = tiny_config().to_dict()
    as_dict["num_key_value_heads"] = 3
    with pytest.raises(CONFIG_ERRORS, match="num_key_value_heads"):
        LTMConfig.from_dict(as_dict)


def test_setting_a_field_later_is_checked_too():
    config = tiny_config()
    with pytest.raises(CONFIG_ERRORS, match="vocab_size"):
        config.vocab_size = -1
    config.inference_lr = 1  # an int where a float is expected: accepted, as in a hand-written JSON


def test_an_older_config_json_with_rope_theta_loads():
    as_dict = tiny_config().to_dict()
    del as_dict["rope_parameters"]
    as_dict["rope_theta"] = 500.0
    assert LTMConfig.from_dict(as_dict).rope_parameters == {"rope_type": "default", "rope_theta": 500.0}


def test_the_cli_shows_a_config_error_on_one_line(tmp_path, capsys):
    import json

    from modeling_ltm.tooling.cli import main as ltm_main

    preset = tiny_config().to_dict()
    preset["num_key_value_heads"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(preset))
    assert ltm_main(["train", "--config", str(tmp_path / "bad.json"), "--output_dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "invalid model configuration" in error and "num_key_value_heads" in error

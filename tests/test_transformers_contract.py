"""The checks transformers' shared model tests make (`ModelTesterMixin`, `GenerationTesterMixin` in transformers'
tests/, which the installed package does not ship), written for this model: common attributes, outputs as tuples and
dicts alike, gradients reaching hidden states and attentions, loading with `dtype`, `device_map` and mismatched
sizes, the attention implementations the model declares, and generation continued from a returned cache."""

import pytest
import torch
from conftest import tiny_config

from modeling_ltm import LTMConfig, LTMForCausalLM, LTMModel


def make_model(**overrides) -> LTMForCausalLM:
    torch.manual_seed(0)
    return LTMForCausalLM(tiny_config(initializer_range=0.3, **overrides)).eval()


def ids(batch=2, length=10, seed=0):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def latents(model, batch=2, seed=1):
    return torch.randn(batch, *model.config.latent_shape, generator=torch.Generator().manual_seed(seed))


def test_model_common_attributes():
    """ModelTesterMixin.test_model_get_set_embeddings / test_model_main_input_name / test_can_generate."""
    model = make_model()
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    assert model.get_output_embeddings() is model.lm_head
    new_embeddings = torch.nn.Embedding(model.config.padded_vocab_size, model.config.hidden_size)
    model.set_input_embeddings(new_embeddings)
    assert model.get_input_embeddings() is new_embeddings
    assert model.main_input_name == "input_ids" and model.can_generate()
    assert LTMModel._no_split_modules == ["LTMDecoderLayer"] and model.base_model is model.model
    assert isinstance(model.get_decoder(), LTMModel)


def test_outputs_equivalence_tuple_and_dict():
    """ModelTesterMixin.test_model_outputs_equivalence: `return_dict=False` gives the same tensors, in order."""
    model = make_model()
    model.set_attn_implementation("eager")
    kwargs = dict(latents=latents(model), output_hidden_states=True, output_attentions=True, use_cache=True)
    as_dict = model(ids(), **kwargs)
    as_tuple = model(ids(), return_dict=False, **kwargs)
    fields = [value for value in as_dict.to_tuple()]
    assert len(as_tuple) == len(fields)
    for mine, theirs in zip(as_tuple, fields):
        if isinstance(mine, torch.Tensor):
            torch.testing.assert_close(mine, theirs)


def test_retain_grad_hidden_states_attentions():
    """ModelTesterMixin.test_retain_grad_hidden_states_attentions."""
    model = make_model()
    model.set_attn_implementation("eager")
    out = model(ids(), latents=latents(model), output_hidden_states=True, output_attentions=True)
    hidden, attentions, cross = out.hidden_states[0], out.attentions[0], out.cross_attentions[0]
    for tensor in (hidden, attentions, cross):
        tensor.retain_grad()
    out.logits[..., : model.config.vocab_size].sum().backward()
    assert hidden.grad is not None and attentions.grad is not None and cross.grad is not None


def test_from_pretrained_with_dtype_device_map_and_mismatched_sizes(tmp_path):
    """ModelTesterMixin's loading tests: `dtype`, `device_map` (accelerate's low-memory loading), and
    `ignore_mismatched_sizes` for a model of another vocabulary."""
    model = make_model()
    model.save_pretrained(tmp_path)
    half = LTMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.lm_head.weight is half.model.embed_tokens.weight
    mapped = LTMForCausalLM.from_pretrained(tmp_path, device_map="cpu").eval()
    torch.testing.assert_close(mapped(ids()).logits, model(ids()).logits)
    other_vocab = LTMForCausalLM.from_pretrained(tmp_path, vocab_size=96, ignore_mismatched_sizes=True)
    assert other_vocab.model.embed_tokens.weight.shape[0] == 96


def test_declared_attention_implementations():
    """The model declares sdpa, flash and flex (`_supports_*`): asking for flash without the flash-attn package is
    refused for the package, not for the model."""
    model = make_model()
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises((ImportError, ValueError)) as raised:
            model.set_attn_implementation("flash_attention_2")
        assert "does not support" not in str(raised.value) and "flash" in str(raised.value).lower()


@pytest.mark.slow
def test_flex_attention_forward_equals_sdpa():
    """Flex attention (compiled by transformers) gives the sdpa logits; on a CPU, torch runs flex forwards only (no
    backward, so no fit), which is what is checked here."""
    model = make_model()
    input_ids, z = ids(), latents(make_model())
    with torch.no_grad():
        expected = model(input_ids, latents=z).logits
        model.set_attn_implementation("flex_attention")
        torch.testing.assert_close(model(input_ids, latents=z).logits, expected, rtol=1e-4, atol=1e-4)


def test_generate_continues_from_the_returned_cache():
    """GenerationTesterMixin.test_generate_continue_from_past_key_values: continuing from the cache of a first call
    (which holds the latents' keys and values) gives the tokens of one long call."""
    model = make_model()
    prompt, z = ids(1, 5), latents(make_model(), 1)
    kwargs = dict(do_sample=False, latents=z, pad_token_id=0, return_dict_in_generate=True)
    full = model.generate(prompt, max_new_tokens=8, **kwargs).sequences
    first = model.generate(prompt, max_new_tokens=4, **kwargs)
    second = model.generate(first.sequences, max_new_tokens=4, cache=first.cache, **kwargs).sequences
    assert torch.equal(second, full)


def test_config_round_trips_through_auto_classes(tmp_path):
    """ConfigTester.run_common_tests: to/from dict and JSON, save/load, `num_labels` untouched, common properties."""
    from transformers import AutoConfig

    config = tiny_config(sliding_window=8)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LTMConfig) and loaded.to_json_string() == config.to_json_string()
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers"):
        assert hasattr(config, name)


def test_packed_rows_count_positions_not_tokens():
    """Padding-free packing (`DataCollatorWithFlattening`): two sequences in one row, `position_ids` restarting, more
    tokens than max_position_embeddings; each sequence's logits are the ones it gets alone. Positions past the context
    are still refused."""
    model = make_model()
    limit = model.config.max_position_embeddings
    first, second = ids(1, limit - 4, seed=1), ids(1, limit - 4, seed=2)
    z = latents(model, batch=1)
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(limit - 4), torch.arange(limit - 4)]).unsqueeze(0)
    out = model(packed, position_ids=positions, latents=z).logits
    torch.testing.assert_close(out[:, : limit - 4], model(first, latents=z).logits)
    with pytest.raises(ValueError, match="longer than the context"):
        model(packed, latents=z)


def test_rope_scaling_extends_the_context():
    model = make_model(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert model.config.max_input_positions == 2 * model.config.max_position_embeddings
    model(ids(1, 2 * model.config.max_position_embeddings), latents=latents(model, batch=1))


def test_dynamic_rope_is_refused_also_on_assignment():
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    config = tiny_config()
    with pytest.raises(StrictDataclassFieldValidationError, match='"dynamic" is not supported'):
        config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    config.rope_parameters["rope_type"] = "dynamic"  # edited in place: refused when the model is built
    with pytest.raises(ValueError, match='"dynamic" is not supported'):
        LTMForCausalLM(config)


def test_context_extension_keeps_the_latents_positions(tmp_path):
    """A trained model's context extended on its loaded config (larger max_position_embeddings, RoPE scaling) keeps
    the latents' positions, `latent_position_range`; a config built with another max_position_embeddings moves them."""
    model = make_model()
    model.save_pretrained(tmp_path)
    x, z = ids(1, 12), latents(model, batch=1)
    extended = LTMForCausalLM.from_pretrained(
        tmp_path, max_position_embeddings=2 * model.config.max_position_embeddings
    ).eval()
    assert extended.config.latent_position_range == model.config.max_position_embeddings
    torch.testing.assert_close(extended(x, latents=z).logits, model(x, latents=z).logits, rtol=0, atol=0)
    rebuilt = LTMConfig.from_dict({**model.config.to_dict(), "max_position_embeddings": 128})
    assert rebuilt.latent_position_range == model.config.latent_position_range  # recorded in config.json
    other = tiny_config(max_position_embeddings=128)
    assert other.latent_position_range == 128


def test_generate_from_inputs_embeds_alone_names_input_ids():
    model = make_model()
    embeds = model.get_input_embeddings()(ids(1, 6))
    with pytest.raises(ValueError, match=r"only `inputs_embeds` were given\. Pass `input_ids`"):
        model.generate(inputs_embeds=embeds, max_new_tokens=2)
    out = model.generate(inputs_embeds=embeds, latents=latents(model, batch=1), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 2)

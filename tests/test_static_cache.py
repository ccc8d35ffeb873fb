"""The cache contract of the latents' cross-attention (issue 20 item 4, issue 23 item 1): the cache `generate`
prepares is used as given (dynamic or static), the latents' keys/values sit in transformers' standard layout behind
the attention interface, static decoding equals dynamic decoding token for token, and compiled static decoding does
not recompile per token."""

import pytest
import torch
from conftest import tiny_config
from transformers import StaticCache
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.generation import CompileConfig

from modeling_ltm import LTMForCausalLM


def make_model(**overrides) -> LTMForCausalLM:
    torch.manual_seed(0)
    return LTMForCausalLM(tiny_config(initializer_range=0.3, **overrides)).eval()


def prompt(batch=1, length=6, seed=0):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def latents_for(model, batch, seed=1):
    return torch.randn(batch, *model.config.latent_shape, generator=torch.Generator().manual_seed(seed))


def test_cross_attention_cache_holds_the_latents_in_the_standard_layout():
    model = make_model()
    config = model.config
    out = model(prompt(2), latents=latents_for(model, 2), use_cache=True)
    cache = out.cache
    assert isinstance(cache, EncoderDecoderCache)
    cross = cache.cross_attention_cache
    assert cross.get_seq_length() == config.n_latents_per_layer  # the number of latents, not head_dim
    for layer in range(config.num_hidden_layers):
        assert cache.is_updated[layer]
        keys, values = cross.layers[layer].keys, cross.layers[layer].values
        expected = (2, config.num_key_value_heads, config.n_latents_per_layer, config.head_dim)
        assert tuple(keys.shape) == tuple(values.shape) == expected
    assert cache.self_attention_cache.get_seq_length() == 6


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_decoding_through_the_attention_interface_equals_the_full_forward(implementation):
    model = make_model()
    model.set_attn_implementation(implementation)
    input_ids, latents = prompt(2, 9), latents_for(make_model(), 2)
    full = model(input_ids, latents=latents).logits
    out = model(input_ids[:, :5], latents=latents, use_cache=True)
    steps = [out.logits]
    for t in range(5, 9):
        out = model(input_ids[:, t : t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    # Same numbers up to float32 rounding: the cached steps run the products in other shapes (one query row against
    # the cached keys), measured at 14-18 `eps x max|logit|` (roll+addcmul RoPE, then Llama's rotate_half); a wrong
    # position or a missing latent moves the logits by ~1e-1.
    atol = 32 * torch.finfo(full.dtype).eps * full.abs().max().item()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=atol, rtol=0)


def test_forward_uses_the_cache_it_is_given():
    """An `EncoderDecoderCache` passed in comes back as the same object (filled), never replaced by a new one; an
    empty static self-attention cache is paired with a static cross-attention cache of `n_latents_per_layer`."""
    model = make_model()
    given = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache())
    out = model(prompt(), latents=latents_for(model, 1), cache=given, use_cache=True)
    assert out.cache is given
    static = StaticCache(config=model.config, max_cache_len=16)
    out = model(prompt(), latents=latents_for(model, 1), cache=static, use_cache=True)
    assert out.cache.self_attention_cache is static
    assert out.cache.cross_attention_cache.is_compileable
    assert out.cache.cross_attention_cache.layers[0].max_cache_len == model.config.n_latents_per_layer
    with pytest.raises(TypeError, match="EncoderDecoderCache"):
        model(prompt(), cache=out.cache.self_attention_cache, use_cache=True)  # a filled cache without the latents


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_static_cache_generation_equals_dynamic_token_for_token(sliding_window):
    model = make_model(sliding_window=sliding_window)
    input_ids = prompt(2, 5)
    kwargs = dict(max_new_tokens=10, do_sample=False, latents=latents_for(model, 2), pad_token_id=0)
    dynamic = model.generate(input_ids, **kwargs)
    static = model.generate(input_ids, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)


def test_generate_prepares_an_encoder_decoder_cache_of_the_asked_kind():
    model = make_model()
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("cache")), with_kwargs=True)
    model.generate(prompt(), max_new_tokens=2, latents=latents_for(model, 1), cache_implementation="static")
    assert isinstance(seen[0], EncoderDecoderCache) and isinstance(seen[0].self_attention_cache, StaticCache)
    assert all(cache is seen[0] for cache in seen)  # one cache through every step
    seen.clear()
    model.generate(prompt(), max_new_tokens=2, latents=latents_for(model, 1))
    assert isinstance(seen[0], EncoderDecoderCache) and type(seen[0].self_attention_cache) is DynamicCache


def test_model_declares_fullgraph_compilation():
    assert LTMForCausalLM._can_compile_fullgraph
    assert LTMForCausalLM._supports_flex_attn and LTMForCausalLM._supports_flash_attn


@pytest.mark.slow
def test_compiled_static_decoding_does_not_recompile_per_token():
    """generate's compiled decoding step (forced on the CPU with the eager backend, fullgraph, static shapes) equals
    the uncompiled tokens, and the number of compiled graphs does not grow with the number of new tokens."""
    torch._dynamo.reset()
    model = make_model()
    input_ids, latents = prompt(1, 5), latents_for(model, 1)
    compile_config = CompileConfig(backend="eager", fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles decoding on accelerators only otherwise
    kwargs = dict(do_sample=False, latents=latents, pad_token_id=0, cache_implementation="static")
    expected = model.generate(input_ids, max_new_tokens=12, **kwargs)
    counters = torch._dynamo.utils.counters
    counters.clear()
    short = model.generate(input_ids, max_new_tokens=4, compile_config=compile_config, **kwargs)
    graphs_after_short = counters["stats"]["unique_graphs"]
    long = model.generate(input_ids, max_new_tokens=12, compile_config=compile_config, **kwargs)
    graphs_after_long = counters["stats"]["unique_graphs"]
    again = model.generate(input_ids, max_new_tokens=12, compile_config=compile_config, **kwargs)
    assert torch.equal(long, expected) and torch.equal(again, expected)
    assert torch.equal(short, expected[:, : short.shape[1]])
    # One graph for every decoding step of all three calls: transformers sizes the static cache by the longest call
    # so far (the uncompiled `expected` call's), so no call and no token brings a new shape.
    assert graphs_after_short == graphs_after_long == counters["stats"]["unique_graphs"] == 1

"""LTMForCausalLM as a transformers model: Auto classes, shapes, tied weights, latents, save/load, padding,
sliding window, loss, gradient checkpointing, mixed precision, attention back-ends, caching, bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from transformers import AutoModel, AutoModelForCausalLM
from transformers.cache_utils import EncoderDecoderCache

from modeling_ltm import LTMForCausalLM, LTMModel


def random_latents(config, batch_size, seed=0):
    return torch.randn(batch_size, *config.latent_shape, generator=torch.Generator().manual_seed(seed))


def random_ids(config, batch_size, seq_length, seed=0):
    return torch.randint(0, config.vocab_size, (batch_size, seq_length), generator=torch.Generator().manual_seed(seed))


def same_weights(source, config, **kwargs):
    """A fresh model of `config` carrying `source`'s weights (for comparing variants of one network)."""
    model = LTMForCausalLM._from_config(config, **kwargs)
    model.load_state_dict(source.state_dict())
    return model.eval()


def test_auto_classes_from_config(config):
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, LTMForCausalLM)
    assert isinstance(AutoModel.from_config(config), LTMModel)


def test_output_shapes(model, config):
    input_ids = random_ids(config, 3, 10)
    out = model(input_ids, latents=random_latents(config, 3), labels=input_ids)
    assert out.logits.shape == (3, 10, config.vocab_size)
    assert out.loss.shape == ()
    cache = out.cache
    assert isinstance(cache, EncoderDecoderCache)
    assert cache.get_seq_length() == 10
    assert model(input_ids, use_cache=False).cache is None
    assert model(input_ids, logits_to_keep=1).logits.shape == (3, 1, config.vocab_size)
    hidden = model.model(input_ids).last_hidden_state
    assert hidden.shape == (3, 10, config.hidden_size)


def test_tied_embeddings_survive_save_and_load(model, tmp_path):
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_resize_token_embeddings_keeps_the_tie(model):
    new_size = model.config.vocab_size + 72
    model.resize_token_embeddings(new_size, mean_resizing=False)
    assert model.config.vocab_size == new_size
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model(torch.randint(0, new_size, (1, 5))).logits.shape == (1, 5, new_size)


def test_untied_embeddings(config):
    model = LTMForCausalLM(tiny_config(tie_word_embeddings=False))
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_changing_latents_changes_logits(model, config):
    input_ids = random_ids(config, 2, 8)
    logits_a = model(input_ids, latents=random_latents(config, 2, seed=0)).logits
    logits_b = model(input_ids, latents=random_latents(config, 2, seed=1)).logits
    assert (logits_a - logits_b).abs().max() > 1e-3
    # Each layer's latents matter on their own.
    for layer in range(config.num_hidden_layers):
        latents = torch.zeros(2, *config.latent_shape)
        latents[:, layer] = random_latents(config, 2)[:, layer]
        assert (model(input_ids, latents=latents).logits - model(input_ids).logits).abs().max() > 1e-4


def test_latents_none_is_the_prior_mean(model, config):
    input_ids = random_ids(config, 2, 8)
    zeros = torch.zeros(2, *config.latent_shape)
    assert torch.equal(model(input_ids).logits, model(input_ids, latents=zeros).logits)


def test_save_load_bit_identical_logits(model, config, tmp_path):
    input_ids = random_ids(config, 2, 12)
    latents = random_latents(config, 2)
    expected = model(input_ids, latents=latents).logits
    model.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith(".bin") for name in files)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LTMForCausalLM)
    assert torch.equal(loaded(input_ids, latents=latents).logits, expected)


def test_from_pretrained_reports_no_missing_or_unexpected_weights(model, tmp_path):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    model.save_pretrained(tmp_path)
    with CaptureLogger(logging.get_logger("transformers")) as captured:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "MISSING" not in captured.out and "UNEXPECTED" not in captured.out, captured.out


def test_init_weights_does_not_clobber_loaded_weights(model, tmp_path):
    # Weights no initializer would produce: norms away from 1, a linear layer set to a constant.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or name == "model.norm.weight":
                param.copy_(torch.linspace(0.5, 1.5, param.numel()))
        model.model.layers[0].cross_attn.k_proj.weight.fill_(0.125)
    model.save_pretrained(tmp_path)
    loaded = LTMForCausalLM.from_pretrained(tmp_path)
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # Non-persistent RoPE tables are rebuilt, not left as uninitialised memory.
    rotary = loaded.model.rotary_emb
    reference = rotary.compute_default_rope_parameters(loaded.config)[0]
    assert torch.equal(rotary.inv_freq, reference) and torch.equal(rotary.original_inv_freq, reference)


def test_init_weights_fresh_model(config):
    torch.manual_seed(0)
    model = LTMForCausalLM(config)
    assert torch.equal(model.model.norm.weight, torch.ones(config.hidden_size))
    std = model.model.layers[0].mlp.gate_proj.weight.std().item()
    assert abs(std - config.initializer_range) < 0.2 * config.initializer_range


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(model, config, side):
    lengths = [12, 7, 3]
    rows = [random_ids(config, 1, n, seed=n) for n in lengths]
    latents = random_latents(config, len(rows))
    width = max(lengths)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - row.shape[1], width) if side == "left" else slice(0, row.shape[1])
        input_ids[i, span], attention_mask[i, span] = row[0], 1
    batched = model(input_ids, attention_mask=attention_mask, latents=latents).logits
    for i, row in enumerate(rows):
        alone = model(row, latents=latents[i : i + 1]).logits[0]
        span = slice(width - row.shape[1], width) if side == "left" else slice(0, row.shape[1])
        torch.testing.assert_close(batched[i, span], alone, atol=1e-5, rtol=1e-5)


def test_sliding_window_differs_from_full_attention_only_beyond_the_window(model, config):
    window = 4
    windowed = same_weights(model, tiny_config(sliding_window=window))
    input_ids = random_ids(config, 2, 16)
    latents = random_latents(config, 2)
    full_logits = model(input_ids, latents=latents).logits
    window_logits = windowed(input_ids, latents=latents).logits
    # A position sees at most `window` tokens (itself included): identical while the prefix fits in the window.
    torch.testing.assert_close(window_logits[:, :window], full_logits[:, :window], atol=1e-5, rtol=1e-5)
    assert (window_logits[:, window:] - full_logits[:, window:]).abs().max() > 1e-4


def test_sliding_window_ignores_tokens_outside_the_window(config):
    torch.manual_seed(0)
    window = 4
    model = LTMForCausalLM(tiny_config(sliding_window=window)).eval()
    input_ids = random_ids(config, 1, 12)
    changed = input_ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % config.vocab_size
    # Layer l's position t depends on tokens back to t - l * (window - 1): beyond that, token 0 is invisible.
    horizon = config.num_hidden_layers * (window - 1)
    logits, logits_changed = model(input_ids).logits, model(changed).logits
    torch.testing.assert_close(logits[:, horizon + 1 :], logits_changed[:, horizon + 1 :], atol=1e-5, rtol=1e-5)
    assert (logits[:, 1:horizon] - logits_changed[:, 1:horizon]).abs().max() > 1e-5


def test_labels_loss_is_shifted_cross_entropy(model, config):
    input_ids = random_ids(config, 2, 10)
    labels = input_ids.clone()
    labels[0, 4] = -100
    latents = random_latents(config, 2)
    out = model(input_ids, latents=latents, labels=labels)
    manual = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, config.vocab_size), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, manual)


def test_dropout_applies_in_training_only(config):
    """`config.dropout` drops in training mode (a fresh mask per forward) and is the identity in eval mode."""
    torch.manual_seed(0)
    plain = LTMForCausalLM(config).eval()
    dropout_config = copy.deepcopy(config)
    dropout_config.dropout = 0.5
    with_dropout = same_weights(plain, dropout_config)
    input_ids, latents = random_ids(config, 2, 10), random_latents(config, 2)
    torch.testing.assert_close(
        with_dropout.eval()(input_ids, latents=latents).logits,
        plain(input_ids, latents=latents).logits,
        rtol=0,
        atol=0,
    )
    with_dropout.train()
    first, second = (with_dropout(input_ids, latents=latents).logits for _ in range(2))
    assert not torch.allclose(first, second)


def test_gradient_checkpointing_training_step(config):
    torch.manual_seed(0)
    reference = LTMForCausalLM(config).train()
    checkpointed = same_weights(reference, config).train()
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.model.gradient_checkpointing
    input_ids = random_ids(config, 2, 10)
    latents = random_latents(config, 2).requires_grad_(True)
    losses, grads = [], []
    for model in (reference, checkpointed):
        out = model(input_ids, latents=latents, labels=input_ids)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1])
    assert checkpointed(input_ids, latents=latents).cache is None  # no cache while checkpointing
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # One optimizer step actually moves the weights.
    before = checkpointed.model.layers[0].mlp.up_proj.weight.detach().clone()
    torch.optim.SGD(checkpointed.parameters(), lr=0.1).step()
    assert not torch.equal(before, checkpointed.model.layers[0].mlp.up_proj.weight)


def test_bf16_autocast_forward_on_cpu(model, config):
    input_ids = random_ids(config, 2, 8)
    latents = random_latents(config, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids, latents=latents, labels=input_ids)
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits.float(), model(input_ids, latents=latents).logits, atol=0.1, rtol=0.1)


def test_bf16_model_accepts_float32_latents(model, config):
    bf16_model = same_weights(model, config).to(torch.bfloat16)
    input_ids = random_ids(config, 2, 8)
    latents = random_latents(config, 2)  # float32, as `infer_latents` returns them
    logits = bf16_model(input_ids, latents=latents).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), model(input_ids, latents=latents).logits, atol=0.1, rtol=0.1)


def test_eager_attention_equals_sdpa(model, config):
    assert model.config._attn_implementation == "sdpa"
    for sliding_window in (None, 4):
        sdpa = same_weights(model, tiny_config(sliding_window=sliding_window), attn_implementation="sdpa")
        eager = same_weights(model, tiny_config(sliding_window=sliding_window), attn_implementation="eager")
        assert eager.config._attn_implementation == "eager"
        input_ids = random_ids(config, 2, 12)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :5] = 0  # left padding exercises the explicit mask path
        latents = random_latents(config, 2)
        expected = sdpa(input_ids, attention_mask=attention_mask, latents=latents).logits
        actual = eager(input_ids, attention_mask=attention_mask, latents=latents).logits
        torch.testing.assert_close(actual[0, 5:], expected[0, 5:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(actual[1], expected[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_incremental_decoding_with_cache_equals_full_forward(model, sliding_window):
    config = tiny_config(sliding_window=sliding_window)
    model = same_weights(model, config)
    input_ids = random_ids(config, 2, 12)
    latents = random_latents(config, 2)
    full = model(input_ids, latents=latents).logits
    out = model(input_ids[:, :6], latents=latents, use_cache=True)
    cache = out.cache
    assert all(cache.is_updated.get(i, False) for i in range(config.num_hidden_layers))
    steps = [out.logits]
    # One token at a time and a chunk of three (the decoding attention over the latents has a path for each), past
    # the sliding window: the cache must drop exactly the tokens the mask hides.
    for start, stop in [(6, 7), (7, 10), (10, 11), (11, 12)]:
        # Latents are read from the cross-attention cache: passing none must not fall back to z = 0.
        out = model(input_ids[:, start:stop], cache=cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_is_accepted_under_both_names_of_the_transformers_5_24_rename(model, config):
    """`cache=` is the name from transformers 5.24 on; `past_key_values=` (the older name) gives the same logits, with
    transformers' own deprecation (`deprecate_kwarg`, a FutureWarning). Both at once is an error."""
    input_ids = random_ids(config, 1, 8)
    latents = random_latents(config, 1)
    expected = model(input_ids, latents=latents).logits[:, 4:]
    for name in ("cache", "past_key_values"):
        prefix = model(input_ids[:, :4], latents=latents, use_cache=True)
        if name == "past_key_values":
            with pytest.warns(FutureWarning, match="past_key_values"):
                out = model(input_ids[:, 4:], past_key_values=prefix.cache, use_cache=True)
        else:
            out = model(input_ids[:, 4:], **{name: prefix.cache}, use_cache=True)
        torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    prefix = model(input_ids[:, :4], latents=latents, use_cache=True).cache
    with pytest.raises(ValueError, match="Both"):
        model(input_ids[:, 4:], cache=prefix, past_key_values=prefix)


@pytest.mark.parametrize("call", ["fast step", "fast step, padded", "fast step on a prefix", "cached decoding"])
def test_forward_compiles_without_graph_breaks(model, config, call):
    """`torch.compile(..., fullgraph=True)` (dynamo with the eager backend: tracing only) of the forwards on the hot
    paths: the fast step's forward with gradients to the latents (plain, with a padded attention mask, on a
    precomputed `LTMPrefix`) and a cached one-token decoding step. A host sync (`bool(mask.all())`, a finiteness
    check, `.item()`) would be a graph break and fail here."""
    torch._dynamo.reset()
    input_ids = random_ids(config, 2, 10)
    latents = random_latents(config, 2).requires_grad_(True)
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    if call == "cached decoding":
        with torch.no_grad():
            prompt_caches = [model(input_ids, latents=latents, use_cache=True).cache for _ in "ab"]
        next_ids, positions = random_ids(config, 2, 1, seed=1), torch.full((2, 1), 10)

        def forward(z):  # each call extends its own cache (eager first, then compiled)
            cache = prompt_caches.pop(0)
            return model(input_ids=next_ids, position_ids=positions, latents=z, cache=cache, use_cache=True).logits

        latents = latents.detach()
    else:
        prefix = model.model.compute_prefix(input_ids) if call == "fast step on a prefix" else None

        def forward(z):
            if prefix is not None:
                return model(prefix=prefix, latents=z).logits
            return model(input_ids, attention_mask=mask if call == "fast step, padded" else None, latents=z).logits

    expected = forward(latents)
    compiled = torch.compile(forward, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(latents), expected)
    if latents.requires_grad:  # the fast step's backward goes through the compiled graph
        (grad,) = torch.autograd.grad(compiled(latents).square().mean(), latents)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch._dynamo.reset()


def test_latents_of_wrong_shape_raise_value_error_with_expected_shape(model, config):
    input_ids = random_ids(config, 2, 8)
    expected = str((2, *config.latent_shape))
    for bad_shape in [(2, config.num_hidden_layers, config.n_latents_per_layer), (1, *config.latent_shape)]:
        with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            model(input_ids, latents=torch.zeros(bad_shape))


def test_latents_of_wrong_type_raise_type_error(model, config):
    input_ids = random_ids(config, 2, 8)
    with pytest.raises(TypeError, match="latents"):
        model(input_ids, latents=torch.zeros(2, *config.latent_shape).tolist())
    with pytest.raises(TypeError, match="floating-point"):
        model(input_ids, latents=torch.zeros(2, *config.latent_shape, dtype=torch.long))


def test_over_long_input_raises_value_error(model, config):
    too_long = random_ids(config, 1, config.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(too_long)
    model(too_long[:, : config.max_position_embeddings])  # exactly the limit is fine


def test_one_dimensional_input_ids_raise_value_error(model, config):
    with pytest.raises(ValueError, match="unsqueeze"):
        model(random_ids(config, 1, 8)[0])


def test_foreign_cache_raises_type_error(model, config):
    from transformers.cache_utils import DynamicCache

    input_ids = random_ids(config, 1, 4)
    cache = DynamicCache(config=config)
    cache.update(torch.zeros(1, 2, 3, config.head_dim), torch.zeros(1, 2, 3, config.head_dim), 0)
    with pytest.raises(TypeError, match="EncoderDecoderCache"):
        model(input_ids, cache=cache)


@pytest.mark.parametrize("obj_name", ["LTMConfig", "LTMForCausalLM"])
def test_docstring_examples_run(obj_name):
    """The `>>>` examples in the public docstrings run and print what they claim (Markdown fences stripped)."""
    import doctest

    import modeling_ltm

    obj = getattr(modeling_ltm, obj_name)
    text = obj.__doc__.replace("```python", "").replace("```", "")
    test = doctest.DocTestParser().get_doctest(text, {}, obj_name, None, 0)
    assert test.examples, f"{obj_name} has no example"
    torch.manual_seed(0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0

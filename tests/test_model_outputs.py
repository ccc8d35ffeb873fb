"""transformers' output conventions in `LTMModel.forward` / `LTMForCausalLM.forward`: `output_hidden_states`,
`output_attentions` (self- and cross-attention weights), `return_dict`, on the installed and the lowest declared
transformers."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from test_remote_code import transformers_build
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_ltm import LTMForCausalLM


def ids_and_latents(config, batch_size=2, seq_length=7):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_length), generator=generator)
    return input_ids, torch.randn(batch_size, *config.latent_shape, generator=generator)


@pytest.fixture
def eager_model(config):
    torch.manual_seed(0)
    return LTMForCausalLM._from_config(config, attn_implementation="eager").eval()


def test_hidden_states_are_the_embeddings_then_each_layer(model, config):
    input_ids, latents = ids_and_latents(config)
    out = model.model(input_ids, latents=latents, output_hidden_states=True)
    hidden_states = out.hidden_states
    assert isinstance(hidden_states, tuple) and len(hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (2, 7, config.hidden_size) for h in hidden_states)
    torch.testing.assert_close(hidden_states[0], model.model.embed_tokens(input_ids))
    # As in Llama: the last entry is `last_hidden_state` (after the final norm); the others are layer outputs.
    assert hidden_states[-1] is out.last_hidden_state
    layer_outputs = []
    handle = model.model.layers[0].register_forward_hook(lambda module, args, output: layer_outputs.append(output))
    model.model(input_ids, latents=latents)
    handle.remove()
    torch.testing.assert_close(hidden_states[1], layer_outputs[0])
    # Asking for them changes nothing else; not asking returns none.
    plain = model.model(input_ids, latents=latents)
    assert plain.hidden_states is None and plain.attentions is None and plain.cross_attentions is None
    assert torch.equal(plain.last_hidden_state, out.last_hidden_state)


def test_last_hidden_state_relation_matches_llama(model, config):
    """Same convention as transformers' Llama on the installed version: `hidden_states[-1]` is `last_hidden_state`."""
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    ).eval()
    input_ids, latents = ids_and_latents(config)
    llama_out = llama.model(input_ids % 64, output_hidden_states=True)
    ours = model.model(input_ids, latents=latents, output_hidden_states=True)
    assert len(llama_out.hidden_states) == llama.config.num_hidden_layers + 1
    assert len(ours.hidden_states) == config.num_hidden_layers + 1
    assert llama_out.hidden_states[-1] is llama_out.last_hidden_state
    assert ours.hidden_states[-1] is ours.last_hidden_state


def test_causal_lm_returns_the_models_hidden_states(model, config):
    input_ids, latents = ids_and_latents(config)
    out = model(input_ids, latents=latents, output_hidden_states=True)
    base = model.model(input_ids, latents=latents, output_hidden_states=True)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    for ours, expected in zip(out.hidden_states, base.hidden_states):
        assert torch.equal(ours, expected)
    torch.testing.assert_close(out.logits, model.lm_head(out.hidden_states[-1]))


def test_attentions_and_cross_attentions(eager_model, config):
    input_ids, latents = ids_and_latents(config)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    out = eager_model(input_ids, attention_mask=attention_mask, latents=latents, output_attentions=True)
    heads, n_latents = config.num_attention_heads, config.n_latents_per_layer
    assert len(out.attentions) == len(out.cross_attentions) == config.num_hidden_layers
    for weights in out.attentions:
        assert weights.shape == (2, heads, 7, 7)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, heads, 7))
        # Causal, and real tokens never attend to padding (a padding query's row is whatever the mask makes it).
        assert torch.all(weights[0].triu(diagonal=1) == 0)
        assert torch.all(weights[1, :, 3:, 3:].triu(diagonal=1) == 0)
        assert torch.all(weights[1, :, 3:, :3] == 0)
    for weights in out.cross_attentions:
        assert weights.shape == (2, heads, 7, n_latents)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, heads, 7))
        assert torch.all(weights > 0)  # every token sees every latent
    # The weights are those the forward used: at the real tokens the logits equal the fused (sdpa) model's.
    sdpa = LTMForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager_model.state_dict())
    expected = sdpa(input_ids, attention_mask=attention_mask, latents=latents).logits
    torch.testing.assert_close(out.logits[0], expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.logits[1, 3:], expected[1, 3:], rtol=1e-4, atol=1e-5)


def test_attentions_while_decoding_with_the_cache(eager_model, config):
    input_ids, latents = ids_and_latents(config)
    first = eager_model(input_ids[:, :6], latents=latents, use_cache=True)
    step = eager_model(
        input_ids[:, 6:], cache=first.cache, use_cache=True, output_attentions=True
    )  # the latents' keys/values come from the cache
    assert [w.shape for w in step.attentions] == [(2, config.num_attention_heads, 1, 7)] * config.num_hidden_layers
    assert [w.shape for w in step.cross_attentions] == [
        (2, config.num_attention_heads, 1, config.n_latents_per_layer)
    ] * config.num_hidden_layers
    full = eager_model(input_ids, latents=latents, output_attentions=True)
    for cached, whole in zip(step.cross_attentions + step.attentions, full.cross_attentions + full.attentions):
        torch.testing.assert_close(cached[:, :, 0], whole[:, :, -1])


def test_output_attentions_under_sdpa_warns_and_runs_the_eager_attention(model, config, caplog):
    """As transformers' models do (ModelTesterMixin.test_model_outputs_equivalence): the weights, with a warning."""
    from transformers.utils import logging as transformers_logging

    input_ids, latents = ids_and_latents(config)
    assert model.config._attn_implementation == "sdpa"
    transformers_logging.get_logger("modeling_ltm.modeling_ltm").warning_once.cache_clear()
    transformers_logging.enable_propagation()
    with caplog.at_level("WARNING"):
        out = model(input_ids, latents=latents, output_attentions=True)
    assert "runs the eager attention" in caplog.text
    assert model.config._attn_implementation == "sdpa"  # this call only
    model.set_attn_implementation("eager")
    eager = model(input_ids, latents=latents, output_attentions=True)
    assert len(out.attentions) == len(out.cross_attentions) == config.num_hidden_layers
    for fallback, reference in zip(out.attentions + out.cross_attentions, eager.attentions + eager.cross_attentions):
        torch.testing.assert_close(fallback, reference)
    torch.testing.assert_close(out.logits, eager.logits)


def test_generate_returns_hidden_states_and_attentions(eager_model, config):
    input_ids, latents = ids_and_latents(config, seq_length=4)
    out = eager_model.generate(
        input_ids,
        latents=latents,
        max_new_tokens=3,
        do_sample=False,
        return_dict_in_generate=True,
        output_hidden_states=True,
        output_attentions=True,
    )
    assert len(out.hidden_states) == len(out.attentions) == 3  # one entry per generated token
    assert all(len(step) == config.num_hidden_layers + 1 for step in out.hidden_states)
    assert out.attentions[0][0].shape == (2, config.num_attention_heads, 4, 4)
    assert out.attentions[-1][0].shape == (2, config.num_attention_heads, 1, 6)
    greedy = eager_model.generate(input_ids, latents=latents, max_new_tokens=3, do_sample=False)
    assert torch.equal(out.sequences, greedy)


def test_return_dict_false_gives_tuples(eager_model, config):
    input_ids, latents = ids_and_latents(config)
    out = eager_model(input_ids, latents=latents, labels=input_ids, output_hidden_states=True)
    as_tuple = eager_model(
        input_ids, latents=latents, labels=input_ids, output_hidden_states=True, use_cache=False, return_dict=False
    )
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3  # loss, logits, hidden_states (None fields dropped)
    loss, logits, hidden_states = as_tuple
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)
    assert len(hidden_states) == config.num_hidden_layers + 1

    base = eager_model.model(input_ids, latents=latents, return_dict=False)
    assert isinstance(base, tuple) and len(base) == 2  # last_hidden_state, cache
    assert torch.equal(base[0], out.hidden_states[-1])

    eager_model.config.return_dict = False  # the config's default applies when the call does not say
    from_config = eager_model(input_ids, latents=latents, use_cache=False)
    assert isinstance(from_config, tuple) and torch.equal(from_config[0], out.logits)
    assert not isinstance(eager_model(input_ids, latents=latents, return_dict=True), tuple)


def test_config_defaults_for_outputs(config):
    torch.manual_seed(0)
    model = LTMForCausalLM._from_config(
        tiny_config(output_hidden_states=True, output_attentions=True), attn_implementation="eager"
    ).eval()
    input_ids, latents = ids_and_latents(config)
    out = model(input_ids, latents=latents)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert len(out.attentions) == len(out.cross_attentions) == config.num_hidden_layers
    assert model(input_ids, latents=latents, output_hidden_states=False).hidden_states is None


CHILD = textwrap.dedent(
    """
    import json, sys
    import torch, transformers
    from modeling_ltm import LTMConfig, LTMForCausalLM
    config = LTMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=32, n_latents_per_layer=4, latent_dim=16)
    model = LTMForCausalLM._from_config(config, attn_implementation="eager").eval()
    input_ids = torch.randint(0, 64, (2, 5))
    out = model(input_ids, output_hidden_states=True, output_attentions=True)
    as_tuple = model(input_ids, use_cache=False, return_dict=False)
    print(json.dumps({
        "version": transformers.__version__,
        "hidden_states": [list(h.shape) for h in out.hidden_states],
        "last_is_last_hidden_state": bool(torch.equal(out.hidden_states[-1], model.model(input_ids)[0])),
        "attentions": [list(a.shape) for a in out.attentions],
        "cross_attentions": [list(a.shape) for a in out.cross_attentions],
        "row_sums": max(float(a.sum(-1).sub(1).abs().max()) for a in out.attentions + out.cross_attentions),
        "tuple": [type(as_tuple).__name__, len(as_tuple)],
    }))
    """
)


@pytest.mark.slow
def test_outputs_on_the_lowest_declared_transformers(tmp_path):
    """The same conventions hold on the lowest transformers pyproject.toml declares (before 5.24's renames)."""
    site, version = transformers_build("lowest")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, str(REPO_ROOT)]), "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result["version"] == version
    assert result["hidden_states"] == [[2, 5, 32]] * 3
    assert result["last_is_last_hidden_state"]
    assert result["attentions"] == [[2, 4, 5, 5]] * 2
    assert result["cross_attentions"] == [[2, 4, 5, 4]] * 2
    assert result["row_sums"] < 1e-5
    assert result["tuple"] == ["tuple", 1]

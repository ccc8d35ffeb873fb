"""`ltm convert-original` (issue 28, item 3): the authors' Latent-Thought-LM checkpoints as save_pretrained folders.

No code of the authors here: the references are written from their formulas (interleaved RoPE pairs, latent
positions `arange(0, max_seq_len, max_seq_len // max_z_len)` over ALL latents), and their checkpoint layout is built
from a model of ours by the inverse mapping (`to_original_state_dict`).
"""

import pickle

import numpy as np
import pytest
import torch
from conftest import small_tokenizer, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from modeling_ltm import LTMForCausalLM
from modeling_ltm.tooling.cli import main as ltm_main
from modeling_ltm.tooling.convert_original import (
    PAPER_FAST_LOOP,
    config_from_original,
    permute_rotary,
    to_original_state_dict,
    unpermute_rotary,
)
from modeling_ltm.modeling_ltm import apply_rotary_pos_emb, latent_position_ids


def authors_config(**overrides):
    """A tiny model the authors' code can express: latents as wide as the residual stream, their latent positions."""
    return tiny_config(latent_dim=64, latent_position_spacing="all_latents", sliding_window=16, **overrides)


def tiny_model(seed: int = 0, **overrides) -> LTMForCausalLM:
    torch.manual_seed(seed)
    model = LTMForCausalLM(authors_config(**overrides)).eval()
    with torch.no_grad():  # norms away from 1, so that a swapped norm would show
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model


def save_checkpoint(path, state_dict, model_args, training_config=None, **extra):
    """A file shaped as the authors' train_ltm.py saves it."""
    checkpoint = {
        "model": state_dict,
        "optimizer": {"state": {}, "param_groups": [{"lr": 4e-4, "betas": (0.9, 0.95), "params": [0, 1]}]},
        "model_args": model_args,
        "iter_num": 1000,
        "best_val_loss": torch.tensor(3.5),
        "config": {"num_steps": 5, "fast_lr": 0.34, "initial_fast_lr": 0.3, "out_dir": "output/x", "compile": False}
        if training_config is None
        else training_config,
        "rng_state": torch.random.get_rng_state(),
        **extra,
    }
    torch.save(checkpoint, path)
    return path


def convert(capsys, *args):
    """`ltm convert-original ARGS` -> (exit code, stderr's lines)."""
    code = ltm_main(["convert-original", *map(str, args)])
    return code, capsys.readouterr().err.strip().splitlines()


# ---------------------------------------------------------------------------------------------------------------
# The RoPE permutation against an interleaved reference
# ---------------------------------------------------------------------------------------------------------------


def interleaved_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """The authors' rotation, from its formula: `x` `(batch, heads, seq, head_dim)`, pairs `(x[..., 2i], x[..., 2i+1])`
    rotated by `position * theta ** (-2i / head_dim)`."""
    head_dim = x.shape[-1]
    angle = positions.double()[:, None] * theta ** (-torch.arange(0, head_dim, 2).double() / head_dim)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def authors_heads(x, weight, n_heads, positions):
    """`x @ weight.T` split into heads `(batch, heads, seq, head_dim)`, rotated by `interleaved_rope`."""
    batch, seq, _ = x.shape
    return interleaved_rope((x @ weight.T).view(batch, seq, n_heads, -1).transpose(1, 2), positions)


def our_heads(x, projection, n_heads, position_embeddings):
    batch, seq, _ = x.shape
    return apply_rotary_pos_emb(projection(x).view(batch, seq, n_heads, -1).transpose(1, 2), *position_embeddings)


def scores(q, k):
    """Attention logits `(batch, heads, seq_q, seq_k)`, keys repeated over the query heads (grouped-query)."""
    return q @ k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(-1, -2)


def test_permuted_weights_match_interleaved_rope_in_self_and_cross_attention():
    model = tiny_model()
    config = model.config
    n_heads, n_kv, dim = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    torch.manual_seed(1)
    kv_rows = n_kv * config.head_dim
    wq, wk, cq, ck = (torch.randn(rows, dim) / 8 for rows in (dim, kv_rows, dim, kv_rows))
    layer = model.model.layers[0]
    with torch.no_grad():  # the authors' (interleaved) weights, converted
        layer.self_attn.q_proj.weight.copy_(permute_rotary(wq, n_heads))
        layer.self_attn.k_proj.weight.copy_(permute_rotary(wk, n_kv))
        layer.cross_attn.q_proj.weight.copy_(permute_rotary(cq, n_heads))
        layer.cross_attn.k_proj.weight.copy_(permute_rotary(ck, n_kv))
    x, z = torch.randn(2, 40, dim), torch.randn(2, config.n_latents_per_layer, dim)
    positions = torch.arange(40)
    # The authors' latent positions: interval max_seq_len // max_z_len, max_z_len counting every layer's latents.
    max_z_len = config.num_hidden_layers * config.n_latents_per_layer
    z_positions = torch.arange(0, config.max_position_embeddings, config.max_position_embeddings // max_z_len)
    z_positions = z_positions[: config.n_latents_per_layer]
    assert torch.equal(latent_position_ids(config), z_positions)

    rotary = model.model.rotary_emb
    token_tables = rotary(x, positions[None])
    latent_tables = rotary(z, latent_position_ids(config)[None])
    with torch.no_grad():
        ours_self = scores(
            our_heads(x, layer.self_attn.q_proj, n_heads, token_tables),
            our_heads(x, layer.self_attn.k_proj, n_kv, token_tables),
        )
        ours_cross = scores(
            our_heads(x, layer.cross_attn.q_proj, n_heads, token_tables),
            layer.cross_attn.project_latents(z, latent_tables)[0],
        )
    authors_self = scores(authors_heads(x, wq, n_heads, positions), authors_heads(x, wk, n_kv, positions))
    authors_cross = scores(authors_heads(x, cq, n_heads, positions), authors_heads(z, ck, n_kv, z_positions))
    torch.testing.assert_close(ours_self, authors_self, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_cross, authors_cross, atol=1e-5, rtol=1e-5)


def test_unpermute_inverts_permute():
    weight = torch.randn(4 * 16, 24)
    assert torch.equal(unpermute_rotary(permute_rotary(weight, 4), 4), weight)
    assert not torch.equal(permute_rotary(weight, 4), weight)


@pytest.mark.parametrize(
    "dim, hidden_dim, multiple_of, expected",
    [(64, None, 32, 192), (128, None, 256, 512), (768, None, 32, 2048), (64, 100, 32, 100)],
)
def test_feed_forward_width_follows_the_authors_rule(dim, hidden_dim, multiple_of, expected):
    """`hidden_dim`, or `multiple_of * ceil(int(2 * 4 * dim / 3) / multiple_of)`; the other model_args as the authors'
    dataclass defaults (norm_eps 1e-5, window 256, n_kv_heads = n_heads)."""
    shapes = {"dim": dim, "n_layers": 2, "n_heads": 4, "vocab_size": 50258, "max_seq_len": 64, "max_z_len": 8}
    model_args = {**shapes, "hidden_dim": hidden_dim, "multiple_of": multiple_of}
    config = config_from_original(model_args, {"num_steps": 16, "fast_lr": 0.34})
    assert config.intermediate_size == expected
    assert (config.n_latents_per_layer, config.latent_dim, config.rms_norm_eps) == (4, dim, 1e-5)
    assert (config.sliding_window, config.num_key_value_heads, config.vocab_size) == (256, 4, 50258)


# ---------------------------------------------------------------------------------------------------------------
# Round trip: ours -> the authors' layout -> ltm convert-original -> from_pretrained
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "liger, compiled, prefix",
    [(True, True, ""), (False, False, ""), (True, False, "module."), (False, True, "_orig_mod.")],
)
def test_converted_checkpoint_gives_the_original_logits(tmp_path, capsys, liger, compiled, prefix):
    model = tiny_model()
    state_dict, model_args = to_original_state_dict(model, liger=liger, compiled=compiled)
    names = set(state_dict)
    assert ("layers.0.feed_forward.gate_proj.weight" in names) == liger
    assert ("layers.1.feed_forward.w2.weight" in names) == (not liger)
    assert ("layers.0.cross_attention._orig_mod.wk.weight" in names) == compiled
    assert state_dict["output.weight"] is state_dict["tok_embeddings.weight"]
    assert model_args["max_z_len"] == 8 and model_args["hidden_dim"] is None  # all latents; width from multiple_of
    state_dict = {prefix + key: value for key, value in state_dict.items()}
    checkpoint = save_checkpoint(tmp_path / "ckpt_1000.pt", state_dict, model_args)

    code, err = convert(capsys, checkpoint, tmp_path / "hf")
    assert code == 0, err
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(loaded, LTMForCausalLM)
    assert loaded.config.latent_position_spacing == "all_latents"
    assert (loaded.config.num_inference_steps, loaded.config.inference_lr) == (5, 0.34)
    assert {name: getattr(loaded.config, name) for name in PAPER_FAST_LOOP} == PAPER_FAST_LOOP
    generation = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (generation.num_inference_steps, generation.inference_lr) == (5, 0.34)
    assert generation.inference_lr_min_ratio == 0.1

    torch.manual_seed(2)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 48))
    latents = torch.randn(2, *model.config.latent_shape)
    with torch.no_grad():
        expected = model(input_ids, latents=latents).logits
        got = loaded(input_ids, latents=latents).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied


def test_tokenizer_is_saved_with_the_model(tmp_path, capsys):
    small_tokenizer(5_000, 280).save_pretrained(tmp_path / "tokenizer")
    model = tiny_model(vocab_size=280)
    state_dict, model_args = to_original_state_dict(model)
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", state_dict, model_args, training_config={})  # config.py's
    code, err = convert(capsys, checkpoint, tmp_path / "hf", "--tokenizer", tmp_path / "tokenizer")
    assert code == 0, err
    assert len(AutoTokenizer.from_pretrained(tmp_path / "hf")) == 280
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config
    assert (config.num_inference_steps, config.inference_lr) == (16, 0.34)  # the authors' config.py defaults


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one line, exit code 2, naming the file; nothing written
# ---------------------------------------------------------------------------------------------------------------


class Trap:
    """Unpickling it would create `path` (`open(path, "w")`): proof that a file was executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def assert_refused(code, err, *needles):
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("ltm convert-original: error:")
    for needle in needles:
        assert str(needle) in err[0], (needle, err[0])


def test_trap_works_when_unpickled(tmp_path):
    pickle.loads(pickle.dumps(Trap(tmp_path / "sprung")))
    assert (tmp_path / "sprung").exists()


@pytest.mark.parametrize("payload", ["trap", "numpy"])
def test_file_needing_unpickling_is_refused_and_never_executed(tmp_path, capsys, payload):
    model = tiny_model()
    state_dict, model_args = to_original_state_dict(model)
    marker = tmp_path / "executed"
    training_config = {"num_steps": 16, "extra": Trap(marker) if payload == "trap" else np.arange(3.0)}
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", state_dict, model_args, training_config=training_config)
    assert not marker.exists()
    code, err = convert(capsys, checkpoint, tmp_path / "hf")
    assert_refused(code, err, checkpoint, "weights-only", "not unpickled", "torch.save(")
    assert ("Unsupported global" in err[0]) and "weights_only=False" not in err[0]
    assert not marker.exists()
    assert not (tmp_path / "hf").exists()


def test_missing_key_is_refused(tmp_path, capsys):
    state_dict, model_args = to_original_state_dict(tiny_model(), liger=False, compiled=False)
    del state_dict["layers.1.feed_forward.w3.weight"]
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", state_dict, model_args)
    assert_refused(*convert(capsys, checkpoint, tmp_path / "hf"), checkpoint, "layers.1.feed_forward.up_proj.weight")
    assert not (tmp_path / "hf").exists()


def test_unexpected_key_is_refused(tmp_path, capsys):
    state_dict, model_args = to_original_state_dict(tiny_model())
    state_dict["layers.0.prior.weight"] = torch.zeros(3)
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", state_dict, model_args)
    assert_refused(*convert(capsys, checkpoint, tmp_path / "hf"), checkpoint, "layers.0.prior.weight")


def test_shape_that_disagrees_with_model_args_is_refused(tmp_path, capsys):
    state_dict, model_args = to_original_state_dict(tiny_model())
    state_dict["layers.0.attention._orig_mod.wk.weight"] = torch.zeros(64, 64)  # n_kv_heads=2 gives (32, 64)
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", state_dict, model_args)
    code, err = convert(capsys, checkpoint, tmp_path / "hf")
    assert_refused(code, err, checkpoint, "layers.0.attention._orig_mod.wk.weight", "(64, 64)", "(32, 64)")


def test_model_args_without_latent_positions_are_refused(tmp_path, capsys):
    state_dict, model_args = to_original_state_dict(tiny_model())
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", state_dict, {**model_args, "use_z_pos_emb": False})
    assert_refused(*convert(capsys, checkpoint, tmp_path / "hf"), checkpoint, "use_z_pos_emb=False")


@pytest.mark.parametrize("content", ["text", "empty", "no_model_args"])
def test_file_that_is_not_an_authors_checkpoint_is_refused(tmp_path, capsys, content):
    path = tmp_path / "ckpt.pt"
    if content == "text":
        path.write_text("hello, not a checkpoint\n")
    elif content == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"model": {"tok_embeddings.weight": torch.zeros(2, 2)}}, path)
    assert_refused(*convert(capsys, path, tmp_path / "hf"), path)
    assert not (tmp_path / "hf").exists()


def test_tokenizer_that_cannot_be_loaded_is_refused(tmp_path, capsys):
    state_dict, model_args = to_original_state_dict(tiny_model())
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", state_dict, model_args)
    code, err = convert(capsys, checkpoint, tmp_path / "hf", "--tokenizer", tmp_path / "no-tokenizer")
    assert_refused(code, err, "--tokenizer", tmp_path / "no-tokenizer")
    assert not (tmp_path / "hf").exists()


def test_missing_file_is_refused(tmp_path, capsys):
    assert_refused(*convert(capsys, tmp_path / "nope.pt", tmp_path / "hf"), tmp_path / "nope.pt", "not a file")


def test_non_empty_output_dir_is_refused_and_kept(tmp_path, capsys):
    state_dict, model_args = to_original_state_dict(tiny_model())
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", state_dict, model_args)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    assert_refused(*convert(capsys, checkpoint, tmp_path / "hf"), tmp_path / "hf", "not empty")
    assert [path.name for path in (tmp_path / "hf").iterdir()] == ["notes.txt"]
    assert not list(tmp_path.glob(".hf.tmp-*"))

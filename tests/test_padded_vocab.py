"""A vocabulary padded for the GPU's fast matrix shapes (issue 20 item 2): the embedding and the LM head get
`padded_vocab_size` rows, the tokenizer's `vocab_size` is unchanged, and the padding ids carry no probability in any
loss or bound and are never generated."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from huggingface_hub.errors import StrictDataclassError

from modeling_ltm import LTMConfig, LTMForCausalLM, PosteriorFitSettings, evaluate_posterior
from modeling_ltm.scoring import sequence_nll
from modeling_ltm.tooling.train_cli import llama_peer_config


VOCAB, MULTIPLE = 100, 64  # 100 tokens in 128 rows


def make_model(**overrides) -> LTMForCausalLM:
    torch.manual_seed(0)
    config = tiny_config(vocab_size=VOCAB, pad_vocab_size_to_multiple_of=MULTIPLE, initializer_range=0.3, **overrides)
    return LTMForCausalLM(config).eval()


def ids(batch=2, length=10, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_config_pads_the_embedding_and_keeps_the_tokenizer_size():
    config = LTMConfig(vocab_size=50257, pad_vocab_size_to_multiple_of=128)
    assert (config.vocab_size, config.padded_vocab_size) == (50257, 50304)
    assert LTMConfig(vocab_size=50257).padded_vocab_size == 50257  # default: no padding (older checkpoints)
    with pytest.raises(StrictDataclassError, match="pad_vocab_size_to_multiple_of"):
        LTMConfig(pad_vocab_size_to_multiple_of=0)
    model = make_model()
    assert model.model.embed_tokens.weight.shape[0] == model.lm_head.weight.shape[0] == 128
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert llama_peer_config(model.config).vocab_size == 128  # the peer runs the same matrix shapes


def test_padding_logits_carry_no_probability_and_the_loss_ignores_them():
    model = make_model()
    input_ids = ids()
    out = model(input_ids, labels=input_ids)
    assert out.logits.shape[-1] == 128
    assert torch.isneginf(out.logits[..., VOCAB:]).all()
    assert torch.softmax(out.logits, -1)[..., VOCAB:].sum() == 0
    real = out.logits[..., :VOCAB]
    expected = F.cross_entropy(real[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()  # the masked columns pass no gradient to the padding rows
    assert model.lm_head.weight.grad[VOCAB:].abs().sum() == 0


def test_bounds_are_computed_over_the_real_vocabulary():
    model = make_model()
    input_ids = ids()
    latents = torch.randn(2, *model.config.latent_shape, generator=torch.Generator().manual_seed(1))
    nll, tokens = sequence_nll(model, input_ids, latents, input_ids)
    logits = model(input_ids, latents=latents).logits[:, :-1, :VOCAB]
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(nll, expected.view(2, -1).sum(-1))
    result = evaluate_posterior(
        model, input_ids, settings=PosteriorFitSettings.evaluation(model.config, num_steps=3), iw_samples=2, seed=0
    )
    assert torch.isfinite(result.elbo).all() and torch.isfinite(result.iw).all()


def test_generation_never_emits_a_padding_id():
    model = make_model()
    with torch.no_grad():  # make the padding rows the most likely by far, were they not masked
        model.lm_head.weight[VOCAB:] = 50.0
    latents = torch.zeros(1, *model.config.latent_shape)
    for sampling in (dict(do_sample=False), dict(do_sample=True, top_k=0, temperature=2.0)):
        out = model.generate(ids(1, 4), max_new_tokens=12, latents=latents, pad_token_id=0, **sampling)
        assert out.max() < VOCAB


def test_save_load_and_resize_keep_the_padding(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "saved")
    loaded = LTMForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert (loaded.config.vocab_size, loaded.config.padded_vocab_size) == (VOCAB, 128)
    torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits)
    loaded.resize_token_embeddings(130)  # a tokenizer that grew
    assert loaded.config.vocab_size == 130 and loaded.config.padded_vocab_size == 192
    assert loaded.model.embed_tokens.weight.shape[0] == loaded.lm_head.weight.shape[0] == 192
    assert torch.isneginf(loaded(ids()).logits[..., 130:]).all()

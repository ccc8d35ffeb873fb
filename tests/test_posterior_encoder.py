"""The amortized posterior encoder and warm-started fits (issue 13): an untrained encoder proposes the prior, training
it changes only its own weights and raises the ELBO at its proposal, it round-trips through save/load and can be
added to a saved model, padding does not change a row's proposal, and the evaluation fit starts from it once it is
fitted for evaluation to the current decoder (`config.posterior_encoder_fit`)."""

import pytest
import torch
from conftest import tiny_config
from huggingface_hub.errors import StrictDataclassError

from modeling_ltm import LTMConfig, LTMForCausalLM, PosteriorFitSettings
from modeling_ltm.tooling.amortized import fit_posterior_encoder
from modeling_ltm.inference import fit_posterior, gaussian_kl, next_token_targets, sequence_nll


def encoder_model(size: int = 32, seed: int = 0) -> LTMForCausalLM:
    """A tiny model whose latents matter: at the default init (std 0.02) the cross-attention barely moves the
    logits, so its value and output projections are scaled up."""
    torch.manual_seed(seed)
    model = LTMForCausalLM(tiny_config(posterior_encoder_size=size)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.cross_attn.v_proj.weight.mul_(10)
            layer.cross_attn.o_proj.weight.mul_(10)
    return model


def ids(config, rows: int, length: int = 12, seed: int = 0) -> torch.LongTensor:
    return torch.randint(3, config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


def proposal(model, input_ids, attention_mask=None):
    prefix = model.model.compute_prefix(input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        return model.model.posterior_encoder(prefix.hidden_states, attention_mask)


def elbo_at(model, input_ids, mu, logvar, draws: int = 8) -> float:
    """ELBO per token (nats) of q = N(mu, exp(logvar)), averaged over fixed draws."""
    generator = torch.Generator().manual_seed(123)
    targets = next_token_targets(input_ids, None)
    with torch.no_grad():
        nll = sum(
            sequence_nll(model, input_ids, mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator),
                         targets)[0]
            for _ in range(draws)
        ) / draws  # fmt: skip
        tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)
        return float(-(nll + gaussian_kl(mu, logvar)).sum() / tokens)


def test_untrained_encoder_proposes_the_prior_and_a_warm_start_equals_the_prior_start():
    model = encoder_model()
    input_ids = ids(model.config, 3)
    mu, logvar = proposal(model, input_ids)
    assert mu.shape == logvar.shape == (3, *model.config.latent_shape) and mu.dtype == torch.float32
    assert not mu.any() and not logvar.any()
    settings = PosteriorFitSettings(num_steps=4, lr=0.1)
    cold = fit_posterior(model, input_ids, settings=settings, seed=[0, 1, 2])
    warm = fit_posterior(model, input_ids, settings=settings.replace(warm_start=True), seed=[0, 1, 2])
    for name in ("mu", "logvar", "elbo"):
        torch.testing.assert_close(getattr(warm, name), getattr(cold, name), rtol=0, atol=0)


def test_fit_posterior_encoder_trains_only_the_encoder_and_raises_the_elbo():
    model = encoder_model()
    # Each row repeats one token: what the latents can carry, and the encoder can read off the pooled prefix.
    input_ids = torch.arange(3, 19).unsqueeze(1).repeat(1, 12)
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if "posterior_encoder" not in k}
    elbo_before = elbo_at(model, input_ids, *proposal(model, input_ids))
    history = fit_posterior_encoder(model, input_ids, num_steps=40, batch_size=8, lr=1e-2, seed=0)
    assert len(history) == 40 and all(torch.isfinite(torch.tensor(history)))
    elbo_after = elbo_at(model, input_ids, *proposal(model, input_ids))
    assert elbo_after > elbo_before + 0.05, (elbo_before, elbo_after)  # measured: +0.095
    for key, value in model.state_dict().items():
        if "posterior_encoder" not in key:
            assert torch.equal(value, decoder_before[key]), key
    assert all(p.grad is None for p in model.parameters()) and not model.training


def test_encoder_survives_save_and_load_and_can_be_added_to_a_saved_model(tmp_path):
    model = encoder_model()
    input_ids = ids(model.config, 4)
    fit_posterior_encoder(model, input_ids, num_steps=5, batch_size=4)
    model.save_pretrained(tmp_path / "with")
    loaded = LTMForCausalLM.from_pretrained(tmp_path / "with").eval()
    assert loaded.config.posterior_encoder_size == 32
    for a, b in zip(proposal(model, input_ids), proposal(loaded, input_ids)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    torch.manual_seed(0)
    plain = LTMForCausalLM(tiny_config()).eval()
    plain.save_pretrained(tmp_path / "without")
    added = LTMForCausalLM.from_pretrained(tmp_path / "without", posterior_encoder_size=16).eval()
    mu, logvar = proposal(added, input_ids)
    assert not mu.any() and not logvar.any()  # the new encoder proposes the prior; the decoder is the saved one
    torch.testing.assert_close(added(input_ids).logits, plain(input_ids).logits, rtol=0, atol=0)


def test_a_padded_row_gets_the_proposal_of_the_row_alone():
    model = encoder_model()
    fit_posterior_encoder(model, ids(model.config, 8), num_steps=5, batch_size=8, lr=1e-2)
    row = ids(model.config, 1, length=9, seed=1)
    padded = torch.cat([torch.full((1, 3), model.config.pad_token_id or 0), row], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    for alone, with_padding in zip(proposal(model, row), proposal(model, padded, mask)):
        torch.testing.assert_close(with_padding, alone, rtol=1e-5, atol=1e-5)


def test_evaluation_fit_starts_from_an_encoder_fitted_for_evaluation_only():
    fitted = tiny_config(posterior_encoder_size=8, posterior_encoder_fit="evaluation")
    with_encoder = PosteriorFitSettings.evaluation(fitted)
    assert with_encoder.warm_start and (with_encoder.num_steps, with_encoder.lr) == (8, 0.03)
    assert "posterior encoder" in with_encoder.describe()
    assert PosteriorFitSettings.evaluation(fitted, num_steps=3).num_steps == 3
    assert fitted.eval_warm_start_steps == 8
    # No encoder, an untrained or stale one (None), or one trained alongside the decoder: the prior start.
    for config in (tiny_config(), tiny_config(posterior_encoder_size=8),
                   tiny_config(posterior_encoder_size=8, posterior_encoder_fit="training")):  # fmt: skip
        prior_start = PosteriorFitSettings.evaluation(config)
        assert not prior_start.warm_start and (prior_start.num_steps, prior_start.lr) == (32, 0.1)


def test_the_config_records_what_the_encoder_was_fitted_to(tmp_path):
    """`fit_posterior_encoder` marks it "evaluation" (kept by save/load); training the decoder without training the
    encoder marks it stale (None); training it alongside the decoder marks it "training"."""
    model = encoder_model()
    assert model.config.posterior_encoder_fit is None
    fit_posterior_encoder(model, ids(model.config, 4), num_steps=2, batch_size=4)
    assert model.config.posterior_encoder_fit == "evaluation"
    model.save_pretrained(tmp_path / "fitted")
    assert LTMForCausalLM.from_pretrained(tmp_path / "fitted").config.posterior_encoder_fit == "evaluation"
    _train(model, tmp_path, "decoder-only", 1)
    assert model.config.posterior_encoder_fit is None
    _train(model, tmp_path, "warm", 1, posterior_warm_start=True)
    assert model.config.posterior_encoder_fit == "training"


def test_warm_start_without_an_encoder_and_bad_sizes_are_named():
    model = LTMForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="posterior_encoder_size"):
        fit_posterior(model, ids(model.config, 2), settings=PosteriorFitSettings(num_steps=1, lr=0.1, warm_start=True))
    with pytest.raises(ValueError, match="posterior_encoder_size"):
        fit_posterior_encoder(model, ids(model.config, 2), num_steps=1)
    for field, value in (("posterior_encoder_size", -1), ("eval_warm_start_steps", 1.5), ("eval_warm_start_lr", 0),
                         ("posterior_encoder_fit", "eval")):  # fmt: skip
        with pytest.raises(StrictDataclassError, match=field):  # the config is a strict dataclass
            LTMConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, **{field: value})


def test_trainer_evaluate_warm_starts_and_says_so(tmp_path):
    """`LTMTrainer.evaluate` on a model with an encoder fits from its proposal (8 steps at lr 0.03 by default) and
    records `eval_posterior_warm_start`, which the card turns into "warm start from the posterior encoder"."""
    from datasets import Dataset

    from hub_cards.card import trainer_eval_results
    from modeling_ltm import LTMTrainer, LTMTrainingArguments

    model = encoder_model()
    fit_posterior_encoder(model, ids(model.config, 8), num_steps=2, batch_size=8)
    args = LTMTrainingArguments(
        str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=8, disable_tqdm=True, seed=0
    )
    held_out = Dataset.from_dict({"input_ids": ids(model.config, 8, length=16, seed=2).tolist()})
    metrics = LTMTrainer(model=model, args=args, eval_dataset=held_out).evaluate()
    assert metrics["eval_posterior_warm_start"] is True
    assert (metrics["eval_inference_steps"], metrics["eval_inference_lr"]) == (8, 0.03)
    names = [r.metric_name for r in trainer_eval_results(metrics, dataset_name="held-out")]
    assert any("warm start from the posterior encoder" in n for n in names)


def test_fit_posterior_starts_mu_at_init_mu_and_reuses_a_given_prefix():
    model = encoder_model()
    input_ids = ids(model.config, 3)
    init_mu = torch.randn(3, *model.config.latent_shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(fit_posterior(model, input_ids, num_steps=0, init_mu=init_mu, seed=[0, 1, 2]).mu, init_mu)
    prefix = model.model.compute_prefix(input_ids)
    plain = fit_posterior(model, input_ids, num_steps=3, init_mu=init_mu, seed=[0, 1, 2])
    reused = fit_posterior(model, input_ids, num_steps=3, init_mu=init_mu, seed=[0, 1, 2], prefix=prefix)
    for name in ("mu", "logvar", "elbo"):
        torch.testing.assert_close(getattr(reused, name), getattr(plain, name), rtol=0, atol=0)
    with pytest.raises(ValueError, match="init_mu"):
        fit_posterior(model, input_ids, num_steps=1, init_mu=init_mu[:2])


def _train(model, tmp_path, name, max_steps, **overrides):
    from datasets import Dataset

    from modeling_ltm import LTMTrainer, LTMTrainingArguments

    # Each row repeats one token, so the latents can carry the row and the encoder can read it off the prefix.
    rows = torch.arange(3, 19).unsqueeze(1).repeat(1, 12)
    args = dict(
        output_dir=str(tmp_path / name), use_cpu=True, report_to="none", disable_tqdm=True, seed=0, max_steps=max_steps,
        per_device_train_batch_size=16, learning_rate=1e-2, logging_steps=1, save_strategy="no", max_grad_norm=0.0,
        num_inference_steps=2,
    )  # fmt: skip
    trainer = LTMTrainer(
        model=model,
        args=LTMTrainingArguments(**{**args, **overrides}),
        train_dataset=Dataset.from_dict({"input_ids": rows.tolist()}),
    )
    trainer.train()
    return trainer, rows


def test_training_warm_start_with_an_untrained_encoder_is_the_plain_training_step(tmp_path):
    """The untrained encoder proposes mu = 0, the plain loop's start: the first decoder update is the plain one (no
    clipping, which would couple the encoder's gradient norm to the decoder's), and only the encoder learns more."""
    plain, warm = encoder_model(), encoder_model()
    _train(plain, tmp_path, "plain", 1)
    _train(warm, tmp_path, "warm", 1, posterior_warm_start=True)
    changed = []
    for (key, value), (_, warm_value) in zip(plain.state_dict().items(), warm.state_dict().items()):
        if "posterior_encoder" in key:
            changed.append(not torch.equal(value, warm_value))
        else:
            torch.testing.assert_close(warm_value, value, rtol=0, atol=0, msg=key)
    assert any(changed)


def test_training_warm_start_learns_to_propose_the_fitted_mu_and_logs_its_error(tmp_path):
    model = encoder_model()
    decoder = {k: v.clone() for k, v in model.state_dict().items()}
    trainer, rows = _train(model, tmp_path, "warm", 30, posterior_warm_start=True)
    errors = [entry["posterior_encoder_error"] for entry in trainer.state.log_history if "loss" in entry]
    # Not driven to 0: Adam's first fast steps move every coordinate by about the fast lr, whatever the start.
    assert len(errors) == 30 and all(0 < error < float("inf") for error in errors)
    model.eval()
    mu, _ = proposal(model, rows)
    assert mu.abs().sum() > 0
    # The proposal is where the fast loop would go: it starts above the plain start (mu = 0) in ELBO.
    start = PosteriorFitSettings.training(model.config, num_steps=0)
    plain_start = fit_posterior(model, rows, settings=start, seed=list(range(16)))
    warm_start = fit_posterior(model, rows, settings=start, seed=list(range(16)), init_mu=mu)
    assert float(warm_start.elbo.sum()) > float(plain_start.elbo.sum())
    assert any(not torch.equal(v, decoder[k]) for k, v in model.state_dict().items() if "posterior_encoder" not in k)


def test_training_warm_start_needs_an_encoder(tmp_path):
    from modeling_ltm import LTMTrainer, LTMTrainingArguments

    args = LTMTrainingArguments(str(tmp_path), use_cpu=True, report_to="none", posterior_warm_start=True)
    with pytest.raises(ValueError, match="posterior_encoder_size"):
        LTMTrainer(model=LTMForCausalLM(tiny_config()), args=args)

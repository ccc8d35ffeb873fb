"""Posterior inference (the fast loop) and the bounds on log p(x): gradients, decoder isolation, KL, ELBO ascent,
importance weighting, padding, seeding, errors, precision and grad modes."""

import math

import pytest
import torch
from conftest import tiny_config

from modeling_ltm import (
    LTMForCausalLM,
    NonFiniteELBOError,
    PosteriorFitSettings,
    evaluate_posterior,
    fit_posterior,
    importance_weighted_bound,
)
from modeling_ltm.inference import (
    gaussian_kl,
    gaussian_log_prob,
    negative_elbo,
    next_token_targets,
    reconstruction_nll,
    sequence_nll,
)


def random_ids(config, batch_size, seq_length, seed=0):
    return torch.randint(0, config.vocab_size, (batch_size, seq_length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def sensitive_model():
    """A tiny model whose logits depend strongly on `z` (larger init), so the likelihood term moves visibly."""
    torch.manual_seed(0)
    return LTMForCausalLM(tiny_config(initializer_range=0.1)).eval()


def posterior_params(config, batch_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, *config.latent_shape)
    mu = (0.5 * torch.randn(shape, generator=generator)).requires_grad_(True)
    logvar = (-1.0 + 0.1 * torch.randn(shape, generator=generator)).requires_grad_(True)
    noise = torch.randn(shape, generator=generator)
    return mu, logvar, noise


def test_fast_gradient_equals_full_backward(sensitive_model):
    model, config = sensitive_model, sensitive_model.config
    input_ids = random_ids(config, 3, 16)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    targets = next_token_targets(input_ids, attention_mask)
    mu, logvar, noise = posterior_params(config, 3)

    # The fast loop's path: autograd.grad w.r.t. (mu, logvar) only.
    loss, *_ = negative_elbo(model, input_ids, targets, mu, logvar, noise, attention_mask)
    fast_grad_mu, fast_grad_logvar = torch.autograd.grad(loss, [mu, logvar])
    assert all(p.grad is None for p in model.parameters())

    # The plain path: a full backward with every weight requiring grad.
    assert all(p.requires_grad for p in model.parameters())
    loss, *_ = negative_elbo(model, input_ids, targets, mu, logvar, noise, attention_mask)
    loss.backward()
    assert model.model.layers[0].cross_attn.k_proj.weight.grad is not None
    torch.testing.assert_close(fast_grad_mu, mu.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast_grad_logvar, logvar.grad, atol=1e-6, rtol=1e-5)
    assert fast_grad_mu.abs().max() > 0 and fast_grad_logvar.abs().max() > 0


def test_infer_latents_leaves_decoder_grads_alone(model):
    config = model.config
    params = dict(model.named_parameters())
    preset_name = "model.layers.0.mlp.up_proj.weight"
    preset = torch.randn_like(params[preset_name])
    params[preset_name].grad = preset.clone()
    model.infer_latents(random_ids(config, 2, 12), num_steps=3, seed=0)
    for name, param in params.items():
        if name == preset_name:
            assert torch.equal(param.grad, preset), name  # a pre-set grad stays bit-identical
        else:
            assert param.grad is None, name  # None stays None
        assert param.requires_grad, name  # never toggled


def test_no_graph_survives(model):
    posterior = model.infer_latents(random_ids(model.config, 2, 12), num_steps=3, seed=0)
    for name in ("mu", "logvar", "z", "nll", "kl", "elbo", "num_tokens", "elbo_trace"):
        tensor = getattr(posterior, name)
        assert tensor.grad_fn is None and not tensor.requires_grad, name
    bound = model.importance_weighted_bound(random_ids(model.config, 2, 12), num_samples=2, seed=0, num_steps=1)
    assert bound.grad_fn is None and not bound.requires_grad


def test_kl_closed_form_matches_monte_carlo():
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 6, generator=generator)
    logvar = torch.randn(3, 6, generator=generator) * 0.5
    closed_form = gaussian_kl(mu, logvar)
    num_samples = 200_000
    z = mu + torch.exp(0.5 * logvar) * torch.randn(num_samples, 3, 6, generator=generator)  # (S, B, D)
    log_q = gaussian_log_prob(z.reshape(-1, 6), mu.repeat(num_samples, 1), logvar.repeat(num_samples, 1))
    log_p = gaussian_log_prob(z.reshape(-1, 6))
    monte_carlo = (log_q - log_p).reshape(num_samples, 3).double().mean(0)
    torch.testing.assert_close(monte_carlo.float(), closed_form, atol=0.05, rtol=0.02)
    # And torch's own closed form agrees.
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(torch.distributions.kl_divergence(q, p).sum(-1), closed_form)


def test_elbo_rises_over_the_fast_steps(sensitive_model):
    model = sensitive_model
    input_ids = random_ids(model.config, 4, 32)
    posterior = model.infer_latents(input_ids, num_steps=8, seed=0)
    prior_fit = model.infer_latents(input_ids, num_steps=0, seed=0)
    assert posterior.elbo_trace.shape == (9, 4)
    assert (posterior.elbo_trace[-1] > posterior.elbo_trace[0]).all()
    assert (posterior.elbo_gain > 0).all()
    torch.testing.assert_close(posterior.elbo, posterior.elbo_trace[-1])
    # Not only the KL falls: the likelihood term improves too (by several nats per sequence on this model).
    assert (posterior.nll < prior_fit.nll - 1.0).all()
    assert (posterior.kl < prior_fit.kl).all()


def test_importance_weighted_bound_is_at_least_the_elbo(sensitive_model):
    model = sensitive_model
    input_ids = random_ids(model.config, 3, 16)
    posterior = model.infer_latents(input_ids, num_steps=4, seed=0)
    bounds, single_sample_elbos = [], []
    for seed in range(4):
        bounds.append(model.importance_weighted_bound(input_ids, num_samples=32, posterior=posterior, seed=seed))
        # Single-sample ELBO estimates -log p(x|z_k) - KL with z_k ~ q, from the same posterior.
        targets = next_token_targets(input_ids, None)
        z = posterior.sample(torch.Generator().manual_seed(100 + seed))
        nll, _ = negative_elbo(model, input_ids, targets, z, torch.full_like(z, -80.0), torch.zeros_like(z))[1:3]
        single_sample_elbos.append(-(nll + posterior.kl))
    bound = torch.stack(bounds).mean(0)
    assert bound.shape == (3,)
    assert torch.isfinite(bound).all()
    assert (bound >= posterior.elbo).all()
    assert (bound >= torch.stack(single_sample_elbos).mean(0)).all()
    # A bound on log p(x) of a 128-token vocabulary: never above 0 nats.
    assert (bound <= 0).all()


def test_importance_weighted_bound_fits_its_own_posterior(model):
    input_ids = random_ids(model.config, 2, 10)
    bound = importance_weighted_bound(model, input_ids, num_samples=4, seed=0, num_steps=2)
    again = model.importance_weighted_bound(input_ids, num_samples=4, seed=0, num_steps=2)
    assert bound.shape == (2,)
    assert torch.equal(bound, again)
    with pytest.raises(ValueError, match="num_samples"):
        model.importance_weighted_bound(input_ids, num_samples=0)


def _padded_batch(rows, side):
    width = max(row.shape[1] for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - row.shape[1], width) if side == "left" else slice(0, row.shape[1])
        input_ids[i, span], attention_mask[i, span] = row[0], 1
    return input_ids, attention_mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(sensitive_model, side):
    model = sensitive_model
    rows = [random_ids(model.config, 1, n, seed=n) for n in (14, 9, 4)]
    seeds = [11, 22, 33]
    input_ids, attention_mask = _padded_batch(rows, side)
    batched = model.infer_latents(input_ids, attention_mask, num_steps=4, seed=seeds)
    for i, row in enumerate(rows):
        alone = model.infer_latents(row, num_steps=4, seed=[seeds[i]])
        for name in ("mu", "logvar", "z"):
            torch.testing.assert_close(getattr(batched, name)[i], getattr(alone, name)[0], atol=1e-4, rtol=1e-4)
        for name in ("nll", "kl", "elbo"):
            torch.testing.assert_close(getattr(batched, name)[i], getattr(alone, name)[0], atol=1e-3, rtol=1e-5)
        assert batched.num_tokens[i] == alone.num_tokens[0] == row.shape[1] - 1
    bound = model.importance_weighted_bound(input_ids, attention_mask, num_samples=3, posterior=batched, seed=seeds)
    for i, row in enumerate(rows):
        alone = model.importance_weighted_bound(
            row, num_samples=3, posterior=batched.index_select(torch.tensor([i])), seed=[seeds[i]]
        )
        torch.testing.assert_close(bound[i], alone[0], atol=1e-3, rtol=1e-5)


def test_seeding(model):
    input_ids = random_ids(model.config, 2, 10)
    first = model.infer_latents(input_ids, num_steps=3, seed=7)
    second = model.infer_latents(input_ids, num_steps=3, seed=7)
    other = model.infer_latents(input_ids, num_steps=3, seed=8)
    for name in ("mu", "logvar", "z", "elbo"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not torch.equal(first.logvar, other.logvar)
    assert not torch.equal(first.z, other.z)
    with_generator = model.infer_latents(input_ids, num_steps=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(with_generator.z, first.z)


def test_bad_input(model):
    config = model.config
    with pytest.raises(ValueError, match="empty sequence"):
        model.infer_latents(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.infer_latents(random_ids(config, 1, config.max_position_embeddings + 1))
    with pytest.raises(ValueError, match=r"\(batch, sequence_length\)"):
        model.infer_latents(random_ids(config, 1, 8)[0])
    with pytest.raises(ValueError, match="attention_mask"):
        model.infer_latents(random_ids(config, 2, 8), torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="per-sequence seeds"):
        model.infer_latents(random_ids(config, 2, 8), seed=[1, 2, 3])
    with pytest.raises(ValueError, match="num_steps"):
        model.infer_latents(random_ids(config, 2, 8), num_steps=-1)
    with pytest.raises(ValueError, match="lr"):
        model.infer_latents(random_ids(config, 2, 8), lr=0.0)
    with pytest.raises(ValueError, match="lr_min_ratio"):
        model.infer_latents(random_ids(config, 2, 8), lr_min_ratio=0.0)
    with pytest.raises(ValueError, match="init_logvar_noise"):
        model.infer_latents(random_ids(config, 2, 8), init_logvar_noise=-1.0)


def test_exploding_fast_lr_raises_and_leaves_weights_untouched(model):
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    # One Adam step moves mu by ~lr: with lr = 1e30 the KL (mu^2) overflows float32 at the second step.
    with pytest.raises(NonFiniteELBOError, match=r"step 2/4.*[Ll]ower the fast learning rate"):
        model.infer_latents(random_ids(model.config, 2, 8), num_steps=4, lr=1e30, seed=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(p.grad is None for p in model.parameters())


def test_nan_weight_raises_at_the_first_step(model):
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteELBOError, match="step 1/"):
        model.infer_latents(random_ids(model.config, 2, 8), num_steps=2, seed=0)
    with pytest.raises(NonFiniteELBOError, match="after 0 fast steps"):
        model.infer_latents(random_ids(model.config, 2, 8), num_steps=0, seed=0)


def test_zero_steps_is_the_initial_posterior(model):
    config = model.config
    posterior = model.infer_latents(random_ids(config, 2, 8), num_steps=0, seed=0)
    assert posterior.elbo_trace.shape == (1, 2)
    assert torch.equal(posterior.mu, torch.zeros(2, *config.latent_shape))
    assert (posterior.logvar - config.posterior_init_logvar).abs().max() < 1.0
    assert torch.isfinite(posterior.elbo).all()


def test_fresh_noise_per_step(model):
    input_ids = random_ids(model.config, 2, 8)
    fresh = model.infer_latents(input_ids, num_steps=3, seed=0, fixed_noise=False)
    fixed = model.infer_latents(input_ids, num_steps=3, seed=0, fixed_noise=True)
    assert torch.isfinite(fresh.elbo).all()
    assert fresh.elbo_trace.shape == (4, 2)
    assert not torch.equal(fresh.z, fixed.z)
    again = model.infer_latents(input_ids, num_steps=3, seed=0, fixed_noise=False)
    assert torch.equal(fresh.z, again.z)


def test_works_under_no_grad(model):
    input_ids = random_ids(model.config, 2, 8)
    expected = model.infer_latents(input_ids, num_steps=3, seed=0)
    with torch.no_grad():
        posterior = model.infer_latents(input_ids, num_steps=3, seed=0)
        bound = model.importance_weighted_bound(input_ids, num_samples=2, posterior=posterior, seed=0)
    assert torch.equal(posterior.mu, expected.mu) and torch.equal(posterior.elbo, expected.elbo)
    assert torch.isfinite(bound).all()
    assert torch.is_grad_enabled()


def test_works_under_inference_mode(model):
    input_ids = random_ids(model.config, 2, 8)
    expected = model.infer_latents(input_ids, num_steps=3, seed=0)
    with torch.inference_mode():
        inference_ids = input_ids.clone()  # an inference tensor, as pipelines and eval loops may hand over
        posterior = model.infer_latents(inference_ids, torch.ones_like(inference_ids), num_steps=3, seed=0)
        bound = model.importance_weighted_bound(inference_ids, num_samples=2, seed=0, num_steps=1)
    assert torch.equal(posterior.mu, expected.mu) and torch.equal(posterior.elbo, expected.elbo)
    assert torch.isfinite(bound).all()


def assert_bf16_bound_matches_float32(posterior, expected):
    """A bf16 fit's bound against the float32 fit's, on 2 sequences of 7 predicted tokens. What it must catch: a term
    lost or sign-flipped (the KL here is ~450 nats, the NLL ~33), or a fit that went elsewhere in bf16 (its KL would
    move by far more than 0.1 nats). What it must allow: bf16 rounding of the decoder (~1e-2 relative on the NLL at
    most; measured 1e-4), carried through 3 fast steps into `mu`, `logvar` (the KL, float32 given them, moved ~1e-6
    relative)."""
    nll_tol = 0.01 * float(expected.nll.abs().max())  # ~0.33 nats
    assert float(expected.nll.min()) > 20 * nll_tol and float(expected.kl.min()) > 20 * nll_tol  # each term is visible
    torch.testing.assert_close(posterior.nll, expected.nll, atol=nll_tol, rtol=0)
    torch.testing.assert_close(posterior.kl, expected.kl, atol=0.1, rtol=1e-4)
    torch.testing.assert_close(posterior.elbo, expected.elbo, atol=nll_tol + 0.1, rtol=1e-4)


def test_works_under_bf16_autocast(model):
    input_ids = random_ids(model.config, 2, 8)
    expected = model.infer_latents(input_ids, num_steps=3, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        posterior = model.infer_latents(input_ids, num_steps=3, seed=0)
        bound = model.importance_weighted_bound(input_ids, num_samples=2, posterior=posterior, seed=0)
    assert posterior.mu.dtype == torch.float32  # the variational parameters stay in float32
    assert posterior.elbo.dtype == torch.float32
    assert torch.isfinite(posterior.elbo).all() and torch.isfinite(bound).all()
    assert_bf16_bound_matches_float32(posterior, expected)


def test_bf16_model(model):
    input_ids = random_ids(model.config, 2, 8)
    bf16_model = LTMForCausalLM(model.config)
    bf16_model.load_state_dict(model.state_dict())
    bf16_model = bf16_model.to(torch.bfloat16).eval()
    posterior = bf16_model.infer_latents(input_ids, num_steps=3, seed=0)
    assert posterior.mu.dtype == torch.float32 and posterior.nll.dtype == torch.float32
    expected = model.infer_latents(input_ids, num_steps=3, seed=0)
    assert_bf16_bound_matches_float32(posterior, expected)


def test_posterior_output_helpers(model):
    posterior = model.infer_latents(random_ids(model.config, 3, 8), num_steps=2, seed=0)
    picked = posterior.index_select(torch.tensor([2, 2, 0]))
    assert torch.equal(picked.mu[0], posterior.mu[2]) and torch.equal(picked.mu[2], posterior.mu[0])
    assert picked.elbo_trace.shape == (3, 3)
    assert torch.equal(picked.elbo_trace[:, 1], posterior.elbo_trace[:, 2])
    sample = posterior.sample(torch.Generator().manual_seed(0))
    assert sample.shape == posterior.mu.shape
    assert torch.equal(sample, posterior.sample(torch.Generator().manual_seed(0)))


def test_labels_exclude_tokens_from_the_likelihood(model):
    input_ids = random_ids(model.config, 1, 10)
    labels = input_ids.clone()
    labels[0, 5:] = -100
    posterior = fit_posterior(model, input_ids, labels=labels, num_steps=1, seed=0)
    assert posterior.num_tokens.tolist() == [4]


# ------------------------------------------------------------------------------ fit settings and evaluation


def test_fit_settings_come_from_the_config_and_validate(config):
    training = PosteriorFitSettings.training(config)
    assert training == PosteriorFitSettings(
        num_steps=config.num_inference_steps,
        lr=config.inference_lr,
        lr_min_ratio=config.inference_lr_min_ratio,
        init_logvar=config.posterior_init_logvar,
        init_logvar_noise=config.posterior_init_logvar_noise,
        fixed_noise=config.posterior_fixed_noise,
    )
    evaluation = PosteriorFitSettings.evaluation(config)
    assert (evaluation.num_steps, evaluation.lr, evaluation.lr_min_ratio) == (32, 0.1, 0.1)
    # The evaluation fit starts at the prior (KL 0) and redraws eps at every step.
    assert (evaluation.init_logvar, evaluation.init_logvar_noise, evaluation.fixed_noise) == (0.0, 0.0, False)
    assert PosteriorFitSettings.evaluation(config, num_steps=8, lr=None).num_steps == 8  # None keeps the field
    assert "T=32" in evaluation.describe() and "the prior" in evaluation.describe()
    assert "one fixed eps" in training.describe() and "logvar = the prior's -5" in training.describe()
    config.eval_inference_steps, config.eval_inference_lr = 5, 0.2
    assert PosteriorFitSettings.evaluation(config).num_steps == 5 and PosteriorFitSettings.evaluation(config).lr == 0.2
    for field, value in (("num_steps", -1), ("lr", 0.0), ("lr_min_ratio", 2.0), ("init_logvar_noise", -0.1)):
        with pytest.raises(ValueError, match=field):
            training.replace(**{field: value})
    with pytest.raises(TypeError, match="PosteriorFitSettings"):
        fit_posterior(LTMForCausalLM(config), random_ids(config, 1, 4), settings={"num_steps": 1})


def test_fit_posterior_follows_settings_and_keyword_overrides(sensitive_model):
    model = sensitive_model
    input_ids = random_ids(model.config, 2, 12)
    settings = PosteriorFitSettings.evaluation(model.config, num_steps=3)
    by_settings = fit_posterior(model, input_ids, settings=settings, seed=0)
    by_keywords = fit_posterior(
        model, input_ids, num_steps=3, lr=0.1, lr_min_ratio=0.1, init_logvar=0.0, init_logvar_noise=0.0,
        fixed_noise=False, seed=0,
    )  # fmt: skip
    assert torch.equal(by_settings.mu, by_keywords.mu) and torch.equal(by_settings.elbo, by_keywords.elbo)
    # The evaluation fit with 0 steps is the prior itself: mu = 0, logvar = 0, no KL.
    prior = fit_posterior(model, input_ids, settings=settings.replace(num_steps=0), seed=0)
    assert torch.equal(prior.mu, torch.zeros_like(prior.mu)) and torch.equal(prior.logvar, prior.mu)
    assert torch.equal(prior.kl, torch.zeros(2))


def test_evaluate_posterior_is_the_evaluation_fit_with_its_bounds(sensitive_model):
    model = sensitive_model
    input_ids = random_ids(model.config, 3, 16)
    seeds = [3, 4, 5]
    result = evaluate_posterior(model, input_ids, iw_samples=4, reconstruction=True, seed=seeds)
    assert result.settings == PosteriorFitSettings.evaluation(model.config)
    posterior = fit_posterior(model, input_ids, settings=result.settings, seed=seeds)
    for name in ("mu", "logvar", "kl", "num_tokens"):
        assert torch.equal(getattr(result.posterior, name), getattr(posterior, name)), name
    iw = importance_weighted_bound(model, input_ids, num_samples=4, posterior=posterior, seed=seeds)
    assert torch.equal(result.iw, iw) and result.iw_samples == 4
    # With importance draws, the ELBO's NLL term averages over them: the same ELBO, estimated with less variance.
    torch.testing.assert_close(result.elbo, -(result.nll + result.kl))
    assert not torch.equal(result.nll, posterior.nll)
    summary = result.summary()
    tokens = float(result.num_tokens.sum())
    assert summary["elbo_ppl"] == pytest.approx(math.exp(-float(result.elbo.sum()) / tokens), rel=1e-6)
    assert summary["iw_ppl"] == pytest.approx(math.exp(-float(result.iw.sum()) / tokens), rel=1e-6)
    assert summary["reconstruction_ppl"] == pytest.approx(
        math.exp(float(result.reconstruction_nll.sum()) / tokens), rel=1e-6
    )
    one_draw = evaluate_posterior(model, input_ids, settings=result.settings.replace(score_samples=1), seed=seeds)
    for name in ("nll", "kl", "elbo", "num_tokens"):
        assert torch.equal(getattr(one_draw, name), getattr(posterior, name)), name
    # By default the ELBO's likelihood term averages over `eval_score_samples` (8) fresh draws: the importance draws'.
    plain = evaluate_posterior(model, input_ids, seed=seeds)
    assert torch.equal(plain.kl, posterior.kl)
    with_eight = evaluate_posterior(model, input_ids, iw_samples=8, seed=seeds)
    torch.testing.assert_close(plain.nll, with_eight.nll)
    assert (
        plain.iw is None
        and plain.reconstruction_nll is None
        and set(plain.summary())
        == {
            "nll_per_token",
            "kl_per_token",
            "elbo_ppl",
            "start_kept_fraction",
        }
    )
    with pytest.raises(ValueError, match="iw_samples"):
        evaluate_posterior(model, input_ids, iw_samples=-1)


def test_reconstruction_nll_is_the_nll_at_z_fitted_on_the_same_tokens(sensitive_model):
    """The paper's protocol: fit with the training fast loop and ONE fixed eps, score -log p(x|z) at
    z = mu + sigma * eps with that same eps, no KL; the reconstruction perplexity is exp(NLL / N)."""
    model, config = sensitive_model, sensitive_model.config
    input_ids = random_ids(config, 2, 16)
    seeds = [7, 8]
    result = evaluate_posterior(model, input_ids, reconstruction=True, seed=seeds)
    training = PosteriorFitSettings.training(config)
    assert result.reconstruction_settings == training.replace(fixed_noise=True)

    # Redo it by hand: the fit's (mu, logvar), and its eps: each row's generator draws the logvar jitter, then eps.
    fitted = fit_posterior(model, input_ids, settings=training.replace(fixed_noise=True), seed=seeds)
    eps = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        torch.randn(config.latent_shape, generator=generator)  # the initial logvar's jitter
        eps.append(torch.randn(config.latent_shape, generator=generator))
    z = fitted.mu + torch.exp(0.5 * fitted.logvar) * torch.stack(eps)
    with torch.no_grad():
        logits = model(input_ids, latents=z).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none").sum(-1)
    torch.testing.assert_close(result.reconstruction_nll, expected, atol=1e-4, rtol=1e-5)
    nll, num_tokens = reconstruction_nll(model, input_ids, seed=seeds)
    torch.testing.assert_close(nll, expected, atol=1e-4, rtol=1e-5)
    assert num_tokens.tolist() == [15, 15]
    # The fitted z is scored on the tokens it was fitted to: far below the prior mean's NLL, and no KL is added.
    prior_nll, _ = sequence_nll(model, input_ids, torch.zeros_like(z), next_token_targets(input_ids, None))
    assert (expected < prior_nll).all()
    assert result.summary()["reconstruction_ppl"] == pytest.approx(math.exp(float(expected.sum()) / 30), rel=1e-4)


def prior_elbo(model, input_ids, num_draws=64, seed=0):
    """ELBO at q = p(z): -E_p[NLL(x|z)] (the KL is 0), averaged over `num_draws` prior draws, shape `(batch,)`."""
    generator = torch.Generator().manual_seed(seed)
    targets = next_token_targets(input_ids, None)
    draws = []
    with torch.no_grad():
        for _ in range(num_draws):
            z = torch.randn(input_ids.shape[0], *model.config.latent_shape, generator=generator)
            draws.append(-sequence_nll(model, input_ids, z, targets)[0])
    return torch.stack(draws).mean(0)


def test_evaluation_elbo_beats_the_prior_and_iw_beats_the_elbo_on_average(sensitive_model):
    model = sensitive_model
    input_ids = random_ids(model.config, 4, 24)
    results = [evaluate_posterior(model, input_ids, iw_samples=16, seed=seed) for seed in range(4)]
    elbo = torch.stack([r.elbo for r in results]).mean(0)
    iw = torch.stack([r.iw for r in results]).mean(0)
    # The evaluation fit starts at q = p(z) and only moves where it raises the ELBO.
    assert elbo.mean() >= prior_elbo(model, input_ids).mean()
    assert iw.mean() >= elbo.mean()
    assert (iw <= 0).all()  # a bound on log p(x): never above 0 nats


# ---- training-only objective of the fast loop: KL weight (warm-up) and free bits ---------------------------------


def _objective_grads(model, input_ids, targets, mu, logvar, noise, **kwargs):
    loss, nll, kl, num_tokens = negative_elbo(model, input_ids, targets, mu, logvar, noise, **kwargs)
    return torch.autograd.grad(loss, [mu, logvar]), nll.detach(), kl.detach(), num_tokens


def test_kl_weight_zero_gives_gradients_from_the_nll_only(sensitive_model):
    model, config = sensitive_model, sensitive_model.config
    input_ids = random_ids(config, 2, 12)
    targets = next_token_targets(input_ids, None)
    mu, logvar, noise = posterior_params(config, 2)
    (g_mu, g_logvar), nll, kl, num_tokens = _objective_grads(
        model, input_ids, targets, mu, logvar, noise, kl_weight=0.0
    )
    z = mu + torch.exp(0.5 * logvar) * noise
    from modeling_ltm.inference import sequence_nll

    nll_only = (sequence_nll(model, input_ids, z, targets)[0] / num_tokens).sum()
    e_mu, e_logvar = torch.autograd.grad(nll_only, [mu, logvar])
    torch.testing.assert_close(g_mu, e_mu)
    torch.testing.assert_close(g_logvar, e_logvar)
    # The returned KL is the true KL whatever the weight.
    torch.testing.assert_close(kl, gaussian_kl(mu, logvar).detach())

    # Beta scales the KL's gradient linearly: grad(beta) = grad(NLL) + beta * grad(KL).
    (f_mu, f_logvar), *_ = _objective_grads(model, input_ids, targets, mu, logvar, noise)
    (h_mu, h_logvar), *_ = _objective_grads(model, input_ids, targets, mu, logvar, noise, kl_weight=0.5)
    torch.testing.assert_close(h_mu, 0.5 * (e_mu + f_mu))
    torch.testing.assert_close(h_logvar, 0.5 * (e_logvar + f_logvar))


def test_free_bits_floor_each_latent_dimension(sensitive_model):
    model, config = sensitive_model, sensitive_model.config
    input_ids = random_ids(config, 2, 12)
    targets = next_token_targets(input_ids, None)
    mu, logvar, noise = posterior_params(config, 2)
    kl_per_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).detach()
    floor = float(kl_per_dim.median())
    loss, nll, kl, num_tokens = negative_elbo(model, input_ids, targets, mu, logvar, noise, free_bits=floor)
    expected = ((nll + kl_per_dim.clamp(min=floor).flatten(1).sum(-1)) / num_tokens).sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(kl, gaussian_kl(mu, logvar))  # reported KL is the true one

    # Below the floor a dimension's gradient is the NLL's alone; above it, the full negative ELBO's.
    (fb_mu, fb_logvar), *_ = _objective_grads(model, input_ids, targets, mu, logvar, noise, free_bits=floor)
    (nll_mu, nll_logvar), *_ = _objective_grads(model, input_ids, targets, mu, logvar, noise, kl_weight=0.0)
    (full_mu, full_logvar), *_ = _objective_grads(model, input_ids, targets, mu, logvar, noise)
    below = kl_per_dim < floor
    assert below.any() and (~below).any()
    torch.testing.assert_close(fb_mu[below], nll_mu[below])
    torch.testing.assert_close(fb_logvar[below], nll_logvar[below])
    torch.testing.assert_close(fb_mu[~below], full_mu[~below])
    torch.testing.assert_close(fb_logvar[~below], full_logvar[~below])


def test_fit_posterior_objective_knobs_default_to_the_elbo(model):
    input_ids = random_ids(model.config, 2, 8)
    default = fit_posterior(model, input_ids, num_steps=3, seed=0)
    explicit = fit_posterior(model, input_ids, num_steps=3, seed=0, kl_weight=1.0, free_bits=0.0)
    assert torch.equal(default.mu, explicit.mu) and torch.equal(default.logvar, explicit.logvar)
    nll_only = fit_posterior(model, input_ids, num_steps=3, seed=0, kl_weight=0.0)
    assert not torch.equal(default.logvar, nll_only.logvar)
    # Whatever the objective, the reported terms are the true KL and ELBO of the fitted q.
    torch.testing.assert_close(nll_only.kl, gaussian_kl(nll_only.mu, nll_only.logvar))
    torch.testing.assert_close(nll_only.elbo, -(nll_only.nll + nll_only.kl))
    for name in ("kl_weight", "free_bits"):
        with pytest.raises(ValueError, match=name):
            fit_posterior(model, input_ids, num_steps=1, **{name: -0.1})


def test_fit_stops_at_its_deadline_between_fast_steps():
    import time

    from modeling_ltm.inference import FitDeadlineExceeded

    model = LTMForCausalLM(tiny_config()).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(FitDeadlineExceeded, match="after 0 of 4 fast steps") as raised:
        fit_posterior(model, input_ids, num_steps=4, seed=0, deadline=time.monotonic() - 1)
    assert raised.value.fast_step == 0
    fit_posterior(model, input_ids, num_steps=4, seed=0, deadline=time.monotonic() + 600)  # far off: runs to the end

"""Issue 13's inference efficiency: the latent-independent prefix computed once per fit, batched importance samples,
and per-sequence adaptive stopping of the fast loop give the same numbers as the plain paths (or stop only rows
whose ELBO has stopped rising)."""

import math

import pytest
import torch
from conftest import tiny_config
from torch.testing import assert_close

from modeling_ltm import LTMForCausalLM, PosteriorFitSettings, fast_loop, fit_posterior, inference
from modeling_ltm.fast_loop import smoothed_gain
from modeling_ltm.inference import next_token_targets, sequence_nll


def random_ids(config, batch_size, seq_length, seed=0):
    return torch.randint(0, config.vocab_size, (batch_size, seq_length), generator=torch.Generator().manual_seed(seed))


def make_model(**overrides):
    torch.manual_seed(0)
    return LTMForCausalLM(tiny_config(initializer_range=0.1, **overrides)).eval()


def left_padded(config, batch_size=3, seq_length=16):
    input_ids = random_ids(config, batch_size, seq_length)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    attention_mask[2, :9] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("variant", ["plain", "left_padding", "sliding_window", "bf16_autocast"])
def test_prefix_forward_equals_the_plain_forward(variant):
    model = make_model(sliding_window=4) if variant == "sliding_window" else make_model()
    config = model.config
    input_ids, attention_mask = left_padded(config)
    if variant in ("plain", "sliding_window"):
        attention_mask = None
    latents = torch.randn(input_ids.shape[0], *config.latent_shape, generator=torch.Generator().manual_seed(1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16_autocast")
    with torch.no_grad(), autocast:
        plain = model(input_ids, attention_mask=attention_mask, latents=latents, use_cache=False).logits
        prefix = model.model.compute_prefix(input_ids, attention_mask=attention_mask)
        reused = model(prefix=prefix, latents=latents).logits
        again = model(prefix=prefix, latents=latents + 1).logits  # the prefix is reusable with other latents
        plain_again = model(input_ids, attention_mask=attention_mask, latents=latents + 1, use_cache=False).logits
    if attention_mask is not None:  # padded positions carry no prediction
        keep = attention_mask.bool()
        plain, reused, again, plain_again = plain[keep], reused[keep], again[keep], plain_again[keep]
    assert_close(reused, plain)
    assert_close(again, plain_again)
    assert prefix.hidden_states.grad_fn is None


def test_prefix_rows_can_be_selected_and_repeated():
    model = make_model()
    input_ids, attention_mask = left_padded(model.config)
    latents = torch.randn(6, *model.config.latent_shape, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([2, 0, 1, 2, 0, 1])
    with torch.no_grad():
        prefix = model.model.compute_prefix(input_ids, attention_mask=attention_mask).index_select(index)
        reused = model(prefix=prefix, latents=latents).logits
        plain = model(input_ids[index], attention_mask=attention_mask[index], latents=latents, use_cache=False).logits
    keep = attention_mask[index].bool()
    assert_close(reused[keep], plain[keep])


def test_prefix_refuses_token_inputs_too():
    model = make_model()
    input_ids = random_ids(model.config, 2, 8)
    prefix = model.model.compute_prefix(input_ids)
    with pytest.raises(ValueError, match="prefix"):
        model(input_ids[:, :4], prefix=prefix)
    with pytest.raises(ValueError, match="prefix"):
        model(prefix=prefix, attention_mask=torch.ones_like(input_ids))
    with pytest.raises(ValueError, match="prefix"):
        model(prefix=prefix, use_cache=True)


def plain_path(monkeypatch):
    monkeypatch.setattr(fast_loop, "compute_prefix", lambda *args: None)


@pytest.mark.parametrize("adaptive", [False, True])
def test_fit_with_prefix_equals_the_plain_fit(monkeypatch, adaptive):
    model = make_model()
    input_ids, attention_mask = left_padded(model.config)
    settings = PosteriorFitSettings.evaluation(model.config, num_steps=10, stop_tol=0.01 if adaptive else None)
    fast = fit_posterior(model, input_ids, attention_mask, settings=settings, seed=[1, 2, 3])
    plain_path(monkeypatch)
    plain = fit_posterior(model, input_ids, attention_mask, settings=settings, seed=[1, 2, 3])
    for name in ("mu", "logvar", "nll", "kl", "elbo", "elbo_trace"):
        assert_close(getattr(fast, name), getattr(plain, name), rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.num_steps_taken, plain.num_steps_taken)


def sequential_iw(model, input_ids, attention_mask, posterior, num_samples, seed):
    """The reference: K sequential plain forwards, drawing noise exactly as `_importance_sample` documents."""
    generators = [torch.Generator().manual_seed(s + 1_000_003) for s in seed]
    targets = next_token_targets(input_ids, attention_mask)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    log_weights, nlls = [], []
    for _ in range(num_samples):
        noise = torch.stack([torch.randn(posterior.mu.shape[1:], generator=g) for g in generators])
        z = posterior.mu + torch.exp(0.5 * posterior.logvar) * noise
        nll, _ = sequence_nll(model, input_ids, z, targets, attention_mask, position_ids)
        nlls.append(nll)
        log_weights.append(
            -nll + inference.gaussian_log_prob(z) - inference.gaussian_log_prob(z, posterior.mu, posterior.logvar)
        )
    return torch.logsumexp(torch.stack(log_weights), 0) - math.log(num_samples), torch.stack(nlls).mean(0)


@pytest.mark.parametrize("max_rows", [None, 1, 5, 100])
def test_batched_importance_samples_equal_sequential_passes(max_rows):
    model = make_model()
    input_ids, attention_mask = left_padded(model.config)
    seed = [4, 5, 6]
    posterior = fit_posterior(
        model,
        input_ids,
        attention_mask,
        settings=PosteriorFitSettings.evaluation(model.config, num_steps=3),
        seed=seed,
    )
    with torch.no_grad():
        bound, mean_nll, _ = inference._importance_sample(
            model, input_ids, attention_mask, None, 7, posterior, seed, None, max_rows_per_forward=max_rows
        )
        ref_bound, ref_nll = sequential_iw(model, input_ids, attention_mask, posterior, 7, seed)
    assert_close(bound, ref_bound, rtol=1e-5, atol=1e-4)
    assert_close(mean_nll, ref_nll, rtol=1e-5, atol=1e-4)


def test_iw_bound_refuses_a_bad_row_cap():
    model = make_model()
    input_ids = random_ids(model.config, 2, 8)
    with pytest.raises(ValueError, match="max_rows_per_forward"):
        inference.importance_weighted_bound(model, input_ids, num_samples=2, num_steps=1, max_rows_per_forward=0)


def test_adaptive_stopping_never_stops_a_row_still_rising_faster_than_the_tolerance():
    model = make_model()
    config = model.config
    input_ids = random_ids(config, 6, 32, seed=3)
    tol, window = 0.002, 2
    settings = PosteriorFitSettings.evaluation(config, num_steps=24, lr=0.1, stop_tol=tol, stop_window=window)
    fit = fit_posterior(model, input_ids, settings=settings, seed=list(range(6)))
    tokens = fit.num_tokens.float()
    steps = fit.num_steps_taken
    assert steps.min() < settings.num_steps, "some row should converge within the budget"
    first_check = 2 * window
    for row in range(input_ids.shape[0]):
        trace = fit.elbo_trace[:-1, row : row + 1]
        for taken in range(first_check, int(steps[row]) + 1):
            gain = float(smoothed_gain(trace[:taken], window)) / float(tokens[row])
            if taken < int(steps[row]):
                assert gain >= tol, f"row {row} kept going at step {taken} with gain {gain} < tol"
            elif taken < settings.num_steps:
                assert gain < tol, f"row {row} stopped at step {taken} while its ELBO rose {gain} >= {tol}/step"
    # A stopped row's trace is flat after it stopped; the others carry on.
    for row in range(input_ids.shape[0]):
        after = fit.elbo_trace[int(steps[row]) - 1 : -1, row]
        assert torch.all(after == after[0])


def test_adaptive_stopping_with_an_unreachable_tolerance_is_the_plain_loop():
    model = make_model()
    input_ids, attention_mask = left_padded(model.config)
    settings = PosteriorFitSettings.evaluation(model.config, num_steps=8)
    plain = fit_posterior(model, input_ids, attention_mask, settings=settings, seed=[1, 2, 3])
    never = fit_posterior(
        model, input_ids, attention_mask, settings=settings.replace(stop_tol=-math.inf), seed=[1, 2, 3]
    )
    for name in ("mu", "logvar", "elbo", "elbo_trace"):
        assert_close(getattr(never, name), getattr(plain, name))
    assert never.num_steps_taken.tolist() == [8, 8, 8]


def test_adaptive_rows_do_not_depend_on_their_batch():
    model = make_model()
    input_ids, attention_mask = left_padded(model.config)
    settings = PosteriorFitSettings.evaluation(model.config, num_steps=16, stop_tol=0.005, stop_window=2)
    batch = fit_posterior(model, input_ids, attention_mask, settings=settings, seed=[1, 2, 3])
    for row in range(3):
        real = attention_mask[row].bool()
        alone = fit_posterior(model, input_ids[row : row + 1, real], settings=settings, seed=[row + 1])
        assert int(alone.num_steps_taken[0]) == int(batch.num_steps_taken[row])
        assert_close(alone.mu[0], batch.mu[row], rtol=1e-3, atol=1e-4)


def test_stop_settings_validate():
    with pytest.raises(ValueError, match="stop_window"):
        PosteriorFitSettings(num_steps=4, lr=0.1, stop_tol=0.1, stop_window=0)
    with pytest.raises(ValueError, match="stop_tol"):
        PosteriorFitSettings(num_steps=4, lr=0.1, stop_tol="x")

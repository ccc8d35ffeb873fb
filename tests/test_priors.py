"""Learned priors over the latents (issue 22): exact densities, KL estimates that match Monte Carlo, bounds that stay
bounds (IW >= ELBO on average), training through the slow step, unconditional sampling, save/load and remote code."""

import math

import pytest
import torch
from conftest import tiny_config

from modeling_ltm import LTMConfig, LTMForCausalLM
from modeling_ltm.inference import evaluate_posterior, fit_posterior, importance_weighted_bound
from modeling_ltm.priors import DiagonalGaussianPrior, FlowPrior, StandardNormalPrior
from modeling_ltm.weight_checks import latent_prior_of


PRIOR_TYPES = ("standard_normal", "diagonal_gaussian", "flow")


def trained_like(prior, seed=0, scale=0.3):
    """A prior moved away from N(0, I) (as training would), with non-trivial couplings for the flow."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in getattr(prior, "parameters", list)():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return prior


def make_prior(kind, latent_shape):
    torch.manual_seed(0)  # the flow's conditioner inputs are drawn at construction: the same flow in any test order
    if kind == "standard_normal":
        return StandardNormalPrior(latent_shape)
    if kind == "diagonal_gaussian":
        return trained_like(DiagonalGaussianPrior(latent_shape))
    return trained_like(FlowPrior(latent_shape, num_layers=3, hidden_size=16))


@pytest.mark.parametrize("kind", PRIOR_TYPES)
def test_log_density_integrates_to_one_in_2d(kind):
    """One slot of 2 dimensions: the density summed over a fine grid on [-20, 20]^2 is the probability of that square
    (the flow's Jacobian term included): 1 where the square holds all the mass, else the fraction of the prior's own
    samples inside it (a flow's couplings can give it tails wider than the square)."""
    prior = make_prior(kind, (1, 1, 2))
    axis = torch.linspace(-20.0, 20.0, 4001)
    step = float(axis[1] - axis[0])
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 1, 1, 2)
    with torch.no_grad():
        mass = sum(prior.log_prob(chunk).double().exp().sum() for chunk in grid.split(1 << 20)) * step * step
        samples = prior.sample(torch.randn(400_000, 1, 1, 2, generator=torch.Generator().manual_seed(1)))
    inside = float((samples.abs() <= 20.0).flatten(1).all(-1).double().mean())
    assert inside > 0.9
    assert float(mass) == pytest.approx(inside, abs=3e-3)
    if kind != "flow":
        assert float(mass) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("kind", ["diagonal_gaussian", "flow"])
def test_sampling_is_the_inverse_of_the_density(kind):
    """`sample` maps base draws u to z, and `log_prob(z)` = log N(u; 0, I) - log |det dz/du| (change of variables),
    with the Jacobian of `sample` computed by autograd."""
    prior = make_prior(kind, (2, 2, 4))
    noise = torch.randn(6, 2, 2, 4, generator=torch.Generator().manual_seed(1))
    base = StandardNormalPrior((2, 2, 4)).log_prob(noise)
    for row in range(noise.shape[0]):
        jacobian = torch.autograd.functional.jacobian(
            lambda u: prior.sample(u.view(1, 2, 2, 4)).flatten(), noise[row].flatten()
        )
        log_det = torch.linalg.slogdet(jacobian.double())[1].float()
        with torch.no_grad():
            log_p = prior.log_prob(prior.sample(noise[row : row + 1]))
        torch.testing.assert_close(log_p[0], base[row] - log_det, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", PRIOR_TYPES)
def test_kl_estimate_matches_monte_carlo(kind):
    """`kl(mu, logvar, z)` (closed form for the Gaussians, the draw's own estimate for the flow) averages to the Monte
    Carlo estimate E_q[log q(z) - log p(z)] with many draws."""
    shape = (2, 2, 4)
    prior = make_prior(kind, shape)
    generator = torch.Generator().manual_seed(2)
    mu = 0.5 * torch.randn(1, *shape, generator=generator)
    logvar = -0.5 + 0.3 * torch.randn(1, *shape, generator=generator)
    draws = 200_000
    noise = torch.randn(draws, *shape, generator=generator)
    z = mu + torch.exp(0.5 * logvar) * noise
    with torch.no_grad():
        log_q = (-0.5 * (math.log(2 * math.pi) + logvar + noise.pow(2))).flatten(1).sum(-1)
        monte_carlo = (log_q - prior.log_prob(z)).mean()
        estimate = prior.kl(mu.expand_as(z), logvar.expand_as(z), z).mean()
    assert float(estimate) == pytest.approx(float(monte_carlo), abs=0.02)
    if prior.exact_kl:
        assert float(prior.kl(mu, logvar)[0].detach()) == pytest.approx(float(monte_carlo), abs=0.02)


def test_an_untrained_learned_prior_is_the_standard_normal():
    z = torch.randn(8, 2, 2, 4)
    standard = StandardNormalPrior((2, 2, 4))
    for prior in (DiagonalGaussianPrior((2, 2, 4)), FlowPrior((2, 2, 4), num_layers=2, hidden_size=8)):
        torch.testing.assert_close(prior.log_prob(z), standard.log_prob(z))
        torch.testing.assert_close(prior.sample(z), z)


def prior_model(kind, **overrides):
    torch.manual_seed(0)
    model = LTMForCausalLM(tiny_config(prior_type=kind, prior_flow_layers=2, prior_flow_hidden=16, **overrides))
    trained_like(model.model.latent_prior) if kind != "standard_normal" else None
    return model.eval()


@pytest.mark.parametrize("kind", PRIOR_TYPES)
def test_iw_bound_is_at_least_the_elbo_on_average(kind):
    model = prior_model(kind)
    input_ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(3))
    posterior = fit_posterior(model, input_ids, num_steps=4, seed=[1, 2, 3, 4])
    elbos, iws = [], []
    for seed in range(6):
        seeds = [10 * seed + row for row in range(4)]
        z = posterior.sample(torch.Generator().manual_seed(seed))
        with torch.no_grad():
            from modeling_ltm.fast_loop import FitBatch

            batch = FitBatch.prepare(model, input_ids, None)
            noise = (z - posterior.mu) * torch.exp(-0.5 * posterior.logvar)
            _, nll, kl, _ = batch.negative_elbo(model, posterior.mu, posterior.logvar, noise)
        elbos.append(-(nll + kl))
        iws.append(importance_weighted_bound(model, input_ids, num_samples=8, posterior=posterior, seed=seeds))
    assert float(torch.stack(iws).mean()) >= float(torch.stack(elbos).mean())


def test_the_model_holds_the_prior_its_config_names():
    assert prior_model("standard_normal").model.latent_prior is None
    assert isinstance(latent_prior_of(prior_model("standard_normal")), StandardNormalPrior)
    assert isinstance(prior_model("diagonal_gaussian").model.latent_prior, DiagonalGaussianPrior)
    assert isinstance(prior_model("flow").model.latent_prior, FlowPrior)
    with pytest.raises(Exception, match="prior_type"):
        tiny_config(prior_type="vampprior")
    with pytest.raises(Exception, match="latent_dim must be >= 2"):
        LTMConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, latent_dim=1,
                  prior_type="flow")  # fmt: skip


@pytest.mark.parametrize("kind", ["diagonal_gaussian", "flow"])
def test_learned_prior_round_trips_through_save_load_and_remote_code(tmp_path, kind):
    """`from_pretrained` restores the prior exactly; the remote-code copy (loaded where our package is not
    importable, tests/test_remote_code.py) fits the same posterior, which starts at and is pulled toward the prior."""
    from safetensors.torch import save_file
    from test_remote_code import run_clean_child

    model = prior_model(kind)
    model.save_pretrained(tmp_path / "model")
    z = torch.randn(3, *model.config.latent_shape)
    expected = latent_prior_of(model).log_prob(z)
    loaded = LTMForCausalLM.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(latent_prior_of(loaded).log_prob(z), expected)

    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    latents = torch.randn(2, *model.config.latent_shape, generator=torch.Generator().manual_seed(1))
    save_file({"input_ids": input_ids, "latents": latents}, tmp_path / "inputs.safetensors")
    process, outputs = run_clean_child(tmp_path / "model", tmp_path, tmp_path / "inputs.safetensors")
    assert process.returncode == 0, process.stderr[-3000:]
    local = model.infer_latents(input_ids, num_steps=2, seed=[0, 1])
    torch.testing.assert_close(outputs["mu"], local.mu)
    standard = LTMForCausalLM(tiny_config()).eval()
    standard.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(standard.infer_latents(input_ids, num_steps=2, seed=[0, 1]).mu, local.mu)


@pytest.mark.parametrize("kind", ["diagonal_gaussian", "flow"])
def test_unconditional_generation_samples_the_learned_prior(kind, monkeypatch):
    model = prior_model(kind, bos_token_id=1)
    seen = []
    prior = model.model.latent_prior
    original = type(prior).sample
    monkeypatch.setattr(type(prior), "sample", lambda self, noise: seen.append(noise) or original(self, noise))
    model.generate(max_new_tokens=2, do_sample=True, latents="prior", inference_seed=0)
    assert len(seen) == 1


def test_the_slow_step_trains_the_prior_toward_the_posteriors(tmp_path):
    """A few LTMTrainer steps move a diagonal prior's parameters (the ELBO's log p(z) term reaches the slow step), and
    the decoder still trains; a flow prior gets gradients too."""
    from datasets import Dataset

    from modeling_ltm.tooling.trainer import LTMTrainer, LTMTrainingArguments

    data = Dataset.from_dict({"input_ids": torch.randint(0, 128, (16, 32), generator=torch.Generator()
                                                          .manual_seed(0)).tolist()})  # fmt: skip
    for kind in ("diagonal_gaussian", "flow"):
        model = LTMForCausalLM(tiny_config(prior_type=kind, prior_flow_layers=2, prior_flow_hidden=8))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "latent_prior" in n}
        args = LTMTrainingArguments(
            str(tmp_path / kind), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
            report_to="none", save_strategy="no", disable_tqdm=True, num_inference_steps=2,
        )  # fmt: skip
        LTMTrainer(model=model, args=args, train_dataset=data).train()
        moved = [n for n, p in model.named_parameters() if "latent_prior" in n and not torch.equal(p, before[n])]
        assert moved, kind


def test_evaluation_with_a_learned_prior_starts_at_the_prior():
    """The evaluation fit starts at a Gaussian prior itself (q = p, KL 0 at the start); its bound is a bound."""
    model = prior_model("diagonal_gaussian")
    input_ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    result = evaluate_posterior(model, input_ids, settings=None, seed=[1, 2])
    prior = model.model.latent_prior
    torch.testing.assert_close(result.posterior.initial_mu[0], prior.mean.detach())
    torch.testing.assert_close(result.posterior.initial_logvar[0], prior.logvar.detach())
    start = fit_posterior(model, input_ids, num_steps=0, settings=result.settings, seed=[1, 2])
    assert torch.allclose(start.kl, torch.zeros(2), atol=1e-3)


def test_free_bits_need_a_gaussian_prior():
    model = prior_model("flow")
    with pytest.raises(ValueError, match="Free bits"):
        fit_posterior(model, torch.randint(0, 128, (1, 8)), num_steps=1, free_bits=0.1, seed=0)


def test_posterior_encoder_proposes_relative_to_a_learned_prior():
    """An untrained encoder (output 0) proposes the learned prior itself; `fit_posterior_encoder` trains it against
    the learned prior's KL and raises the ELBO; the warm-started evaluation fit starts at its proposal."""
    from modeling_ltm.tooling.amortized import fit_posterior_encoder
    from modeling_ltm.fast_loop import FitBatch, encoder_proposal

    model = prior_model("diagonal_gaussian", posterior_encoder_size=16)
    with torch.no_grad():  # latents that matter (as tests/test_posterior_encoder.py's model)
        for layer in model.model.layers:
            layer.cross_attn.v_proj.weight.mul_(10)
            layer.cross_attn.o_proj.weight.mul_(10)
    input_ids = torch.randint(3, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    prior = latent_prior_of(model)
    mu, logvar = encoder_proposal(model, FitBatch.prepare(model, input_ids, None))
    torch.testing.assert_close(mu, prior.mean.detach().expand_as(mu))
    torch.testing.assert_close(logvar, prior.logvar.detach().expand_as(logvar))

    history = fit_posterior_encoder(model, input_ids, num_steps=40, batch_size=8, lr=1e-2, seed=0)
    assert all(math.isfinite(value) for value in history)
    assert sum(history[-5:]) / 5 > sum(history[:5]) / 5  # the ELBO per token rises
    result = evaluate_posterior(model, input_ids, seed=list(range(8)))
    assert result.settings.warm_start and math.isfinite(result.summary()["elbo_ppl"])


def test_lora_fine_tuning_of_a_learned_prior_model_keeps_the_prior(tmp_path):
    """PEFT freezes every base weight, the learned prior included: LoRA trains through `LTMTrainer` (the prior's
    slow-step term is then 0), the bound stays finite, and the adapter round-trips."""
    pytest.importorskip("peft")
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model

    from modeling_ltm import LTMTrainer, LTMTrainingArguments

    base = prior_model("diagonal_gaussian")
    base.save_pretrained(tmp_path / "base")
    prior_before = {name: tensor.clone() for name, tensor in base.model.latent_prior.state_dict().items()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    rows = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    args = LTMTrainingArguments(
        str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=1e-2, num_inference_steps=2, eval_inference_steps=2, save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=True, seed=0,
    )  # fmt: skip
    dataset = Dataset.from_dict({"input_ids": rows})
    trainer = LTMTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    assert math.isfinite(trainer.evaluate()["eval_elbo_ppl"])
    for name, tensor in base.model.latent_prior.state_dict().items():
        assert torch.equal(tensor, prior_before[name]), name
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(LTMForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert isinstance(latent_prior_of(loaded), DiagonalGaussianPrior)


def test_forward_without_latents_uses_the_prior_mean_and_the_card_names_the_prior():
    from hub_cards.card import architecture_summary

    model = prior_model("diagonal_gaussian")
    input_ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    mean = model.model.latent_prior.mean.detach().expand(2, *model.config.latent_shape)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, model(input_ids, latents=mean).logits)
        assert not torch.allclose(model(input_ids).logits, model(input_ids, latents=torch.zeros_like(mean)).logits)
    assert "learned diagonal Gaussian" in architecture_summary(model.config, 1, 1)["prior"]
    assert "N(0, I)" in architecture_summary(prior_model("standard_normal").config, 1, 1)["prior"]

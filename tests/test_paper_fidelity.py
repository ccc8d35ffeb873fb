"""The paper presets compute what the authors' code computes (github mingluzhao/Latent-Thought-LM), checked against
references written here from the formulas (their code is not in this repository; bench/authors_parity.py runs it
side by side): the latents' RoPE positions, the training fast loop (AdamW with weight decay, a constant peak fast
lr on a cosine over `s / T`, `mu` started at `0.01 N(0, 1)`, one summed objective) and the slow step at the fast
loop's own `eps`."""

import math

import pytest
import torch
from conftest import REPO_ROOT, tiny_config

from modeling_ltm import LTMConfig, LTMForCausalLM
from modeling_ltm.fast_loop import cosine_fast_lr
from modeling_ltm.inference import PosteriorFitSettings, fit_posterior
from modeling_ltm.modeling_ltm import latent_position_ids
from modeling_ltm.scoring import negative_elbo, next_token_targets, position_ids_from_attention_mask


CONFIG_DIR = REPO_ROOT / "configuration"
PAPER_FIELDS = (
    "latent_position_spacing",
    "inference_lr",
    "inference_lr_min_ratio",
    "inference_lr_schedule",
    "inference_weight_decay",
    "inference_loss_reduction",
    "posterior_init_mu_noise",
    "posterior_init_logvar",
    "posterior_init_logvar_noise",
    "posterior_fixed_noise",
)


def paper_tiny_model(seed=0, **overrides):
    """The tiny model with the LTM-S preset's paper fields, weights perturbed so every one matters."""
    preset = LTMConfig.from_json_file(CONFIG_DIR / "ltm-s.json")
    fields = {name: getattr(preset, name) for name in PAPER_FIELDS}
    torch.manual_seed(seed)
    model = LTMForCausalLM(tiny_config(**{**fields, **overrides})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("layers, per_layer, context", [(3, 8, 1024), (12, 8, 1024), (6, 4, 1024), (2, 4, 64)])
def test_latent_positions_follow_the_authors_formula(layers, per_layer, context):
    """`interval = max_seq_len // max_z_len` with `max_z_len` all latents, positions `arange(0, max_seq_len,
    interval)[:n_latents_per_layer]` (their model.py); the library's default spreads one layer's over the context."""
    shape = dict(num_hidden_layers=layers, n_latents_per_layer=per_layer, max_position_embeddings=context)
    authors = list(range(0, context, context // (layers * per_layer)))[:per_layer]
    paper = tiny_config(latent_position_spacing="all_latents", **shape)
    assert latent_position_ids(paper).tolist() == authors
    assert latent_position_ids(tiny_config(**shape)).tolist() == list(range(0, context, context // per_layer))


def test_all_latents_must_fit_the_context():
    with pytest.raises(Exception, match="num_hidden_layers \\* n_latents_per_layer"):
        tiny_config(latent_position_spacing="all_latents", num_hidden_layers=4, n_latents_per_layer=32)


def test_the_spacing_changes_what_the_model_computes_with_latents_only():
    """Same weights, the two spacings: equal logits at z = 0 (zero keys and values, whatever their positions),
    different ones at random z."""
    model = paper_tiny_model()
    other = LTMForCausalLM(LTMConfig(**{**model.config.to_dict(), "latent_position_spacing": "per_layer"})).eval()
    other.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    z = torch.randn((2, *model.config.latent_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids, latents=z).logits, other(input_ids=ids, latents=z).logits)
        zero = torch.zeros_like(z)
        assert torch.equal(model(input_ids=ids, latents=zero).logits, other(input_ids=ids, latents=zero).logits)


@pytest.mark.parametrize("schedule, period", [("cosine_t", 4), ("cosine_t_minus_1", 3)])
def test_fast_lr_schedules(schedule, period):
    """`cosine_t`: the authors' `lr/10 + 0.5 (1 + cos(pi s / T)) 0.9 lr` at s = 0..T-1 (never the floor)."""
    lr = 0.34
    rates = [cosine_fast_lr(step, 4, lr, 0.1, schedule) for step in range(4)]
    expected = [lr / 10 + 0.5 * (1 + math.cos(math.pi * step / period)) * 0.9 * lr for step in range(4)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert (rates[-1] > lr / 10 + 1e-3) == (schedule == "cosine_t")


def hand_adamw_fit(model, input_ids, num_steps, seed, lr=0.34, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8):
    """The authors' training fast loop written out: draws `logvar`'s jitter, then `mu`'s, then one `eps` (this
    library's order, from one generator), AdamW by its update rule on the summed objective `sum(NLL) + sum(KL)`."""
    generator = torch.Generator().manual_seed(seed)
    shape = (input_ids.shape[0], *model.config.latent_shape)
    logvar = (-5.0 + 0.1 * torch.randn(shape, generator=generator)).requires_grad_(True)
    mu = (0.01 * torch.randn(shape, generator=generator)).requires_grad_(True)
    noise = torch.randn(shape, generator=generator)
    moments = {name: [torch.zeros(shape), torch.zeros(shape)] for name in ("mu", "logvar")}
    for step in range(num_steps):
        rate = lr / 10 + 0.5 * (1 + math.cos(math.pi * step / num_steps)) * 0.9 * lr
        z = mu + torch.exp(0.5 * logvar) * noise
        logits = model(input_ids=input_ids, latents=z).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten(), reduction="sum")
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum()
        grads = torch.autograd.grad(nll + kl, [mu, logvar])
        with torch.no_grad():
            for (name, parameter), grad in zip((("mu", mu), ("logvar", logvar)), grads):
                m, v = moments[name]
                m.mul_(betas[0]).add_((1 - betas[0]) * grad)
                v.mul_(betas[1]).add_((1 - betas[1]) * grad * grad)
                parameter.mul_(1 - rate * weight_decay)
                m_hat, v_hat = m / (1 - betas[0] ** (step + 1)), v / (1 - betas[1] ** (step + 1))
                parameter.sub_(rate * m_hat / (v_hat.sqrt() + eps))
    return mu.detach(), logvar.detach(), noise


def test_the_paper_presets_fast_loop_is_the_hand_written_adamw_trajectory():
    model = LTMForCausalLM(tiny_config()).eval()  # the config's own fields do not matter: the settings are the preset's
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    settings = PosteriorFitSettings.training(LTMConfig.from_json_file(CONFIG_DIR / "ltm-s.json"), num_steps=4)
    posterior = fit_posterior(model, ids, settings=settings, generator=torch.Generator().manual_seed(7))
    mu, logvar, noise = hand_adamw_fit(model, ids, num_steps=4, seed=7)
    torch.testing.assert_close(posterior.mu, mu, rtol=0, atol=1e-5)
    torch.testing.assert_close(posterior.logvar, logvar, rtol=0, atol=1e-5)
    # The slow step of the paper recipes decodes at the fast loop's own eps.
    torch.testing.assert_close(posterior.fit_noise, noise)
    torch.testing.assert_close(posterior.fit_sample, mu + torch.exp(0.5 * logvar) * noise, rtol=0, atol=1e-5)
    # ... and the library's defaults do not (the check above can fail).
    library = fit_posterior(model, ids, settings=settings.replace(weight_decay=0.0, lr_schedule="cosine_t_minus_1"),
                            generator=torch.Generator().manual_seed(7))  # fmt: skip
    assert (library.mu - mu).abs().max() > 1e-3


def test_the_summed_objective_is_the_per_token_one_times_the_tokens():
    """`inference_loss_reduction`: "sum" is the authors' scalar `sum(NLL) + sum(KL)`; "per_token" divides each
    sequence's part by its scored tokens (the same direction per sequence)."""
    model = paper_tiny_model()
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row: 14 scored tokens against 19
    shape = (2, *model.config.latent_shape)
    mu, logvar, noise = (torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(3))
    targets = next_token_targets(ids, mask)
    positions = position_ids_from_attention_mask(mask)
    total, nll, kl, tokens = negative_elbo(model, ids, targets, mu, logvar, noise, mask, positions,
                                           loss_reduction="sum")  # fmt: skip
    per_token, *_ = negative_elbo(model, ids, targets, mu, logvar, noise, mask, positions)
    assert tokens.tolist() == [19, 14]
    torch.testing.assert_close(total, (nll + kl).sum())
    torch.testing.assert_close(per_token, ((nll + kl) / tokens).sum())

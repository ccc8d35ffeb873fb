"""Training the amortized posterior encoder of a trained LTM (semi-amortized inference).

`LTMPosteriorEncoder` (in `modeling_ltm.py`, present when `config.posterior_encoder_size > 0`) maps a sequence's
latent-independent prefix to an initial `(mu, logvar)`; a warm-started fit (`PosteriorFitSettings(warm_start=True)`,
the evaluation default for a model with an encoder) refines it with a few fast steps instead of walking from the
prior. `fit_posterior_encoder` trains it for a frozen decoder by amortized variational inference: Adam on the
encoder's weights only, minimizing the negative ELBO per token at the encoder's `q` (one reparameterized draw per
sequence and step). The decoder's weights get no gradient and do not change.

    >>> model = LTMForCausalLM.from_pretrained("runs/ltm-tiny", posterior_encoder_size=512)   # encoder proposes the prior
    >>> history = fit_posterior_encoder(model, train_blocks, num_steps=300)                    # (N, seq) token ids
    >>> model.save_pretrained("runs/ltm-tiny-encoder")
"""

from __future__ import annotations

import torch

from ..fast_loop import FitBatch, relative_to_prior
from ..randomness import row_generators, standard_normal
from ..weight_checks import bare_ltm, posterior_encoder_of


def fit_posterior_encoder(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    num_steps: int = 300,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Train `model.model.posterior_encoder` on random batches of the rows of `input_ids` (`(N, seq)`, with an
    optional `(N, seq)` `attention_mask`), decoder frozen. Returns the ELBO per token (nats, one draw) of each step's
    batch, before that step's update. The model is left in the mode it was in, with
    `config.posterior_encoder_fit = "evaluation"`: its evaluation fits start from the encoder's proposal.

    Raises:
        ValueError: the model has no encoder (`config.posterior_encoder_size = 0`), or `input_ids` is not 2-D.
    """
    encoder = posterior_encoder_of(model)
    if encoder is None:
        raise ValueError(
            "This model has no posterior encoder (config.posterior_encoder_size = 0); load it with "
            "`LTMForCausalLM.from_pretrained(path, posterior_encoder_size=N)` (e.g. N = 4 * hidden_size) first."
        )
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be (num_sequences, seq_length) token ids, got {tuple(input_ids.shape)}.")
    parameters = list(encoder.parameters())
    trainable = [parameter.requires_grad for parameter in parameters]
    for parameter in parameters:  # e.g. frozen by an `LTMTrainer` run that did not train it
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    sampler = torch.Generator().manual_seed(seed)
    noise_generator = row_generators(seed, None, 1)
    was_training = model.training
    model.eval()
    history = []
    try:
        with torch.enable_grad():
            for _ in range(num_steps):
                rows = torch.randint(0, input_ids.shape[0], (min(batch_size, input_ids.shape[0]),), generator=sampler)
                ids = input_ids[rows.to(input_ids.device)]
                mask = None if attention_mask is None else attention_mask[rows.to(attention_mask.device)]
                batch = FitBatch.prepare(model, ids, mask)
                mu, logvar = relative_to_prior(batch.prior, *encoder(batch.prefix.hidden_states, mask))
                noise = standard_normal(mu.shape, noise_generator, mu.device)
                loss, nll, kl, tokens = batch.negative_elbo(model, mu, logvar, noise)
                grads = torch.autograd.grad(loss / ids.shape[0], parameters)
                for parameter, grad in zip(parameters, grads):
                    parameter.grad = grad
                optimizer.step()
                history.append(float(-(nll + kl).detach().sum() / tokens.sum()))
        # Evaluation now warm-starts from it by default (`PosteriorFitSettings.evaluation`).
        bare_ltm(model).config.posterior_encoder_fit = "evaluation"
    finally:
        for parameter, requires_grad in zip(parameters, trainable):
            parameter.grad = None
            parameter.requires_grad_(requires_grad)
        model.train(was_training)
    return history

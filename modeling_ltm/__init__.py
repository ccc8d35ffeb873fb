"""Latent-Thought Language Models (arXiv:2502.01567) as transformers models.

Importing this package registers `LTMConfig` / `LTMModel` / `LTMForCausalLM` with `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM`, and in the class-name tables of those two (`MODEL_MAPPING_NAMES`,
`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`: code that asks "is this a base model / a causal LM" by class name, e.g.
transformers' text-generation pipeline and its common model tests, counts an LTM), and marks them for remote-code
export (`auto_map` in `config.json`, code files copied by `save_pretrained`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto import modeling_auto

from .configuration_ltm import LTMConfig
from .generation_ltm import LTMGenerationConfig
from .inference import (
    NonFiniteELBOError,
    PosteriorEvaluation,
    PosteriorFitSettings,
    PosteriorOutput,
    evaluate_posterior,
    fit_posterior,
    importance_weighted_bound,
)
from .modeling_ltm import LTMForCausalLM, LTMModel, LTMPosteriorEncoder, LTMPreTrainedModel
from .weight_checks import NonFiniteWeightsError, check_finite_weights


AutoConfig.register("ltm", LTMConfig, exist_ok=True)
AutoModel.register(LTMConfig, LTMModel, exist_ok=True)
AutoModelForCausalLM.register(LTMConfig, LTMForCausalLM, exist_ok=True)
# `register` fills the lazy mappings (class lookups); the name tables beside them are what transformers reads by name.
# Lookups by config class check the registered classes first, so these entries never import `transformers.models.ltm`.
modeling_auto.MODEL_MAPPING_NAMES.setdefault(LTMConfig.model_type, LTMModel.__name__)
modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(LTMConfig.model_type, LTMForCausalLM.__name__)
LTMConfig.register_for_auto_class()
LTMModel.register_for_auto_class("AutoModel")
LTMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"


# Re-exported from the tooling (`modeling_ltm.tooling`, never shipped to the Hub), imported on first use only: the
# trainer pulls in `transformers.Trainer` (and with it datasets, pandas, scipy), which the model package never needs.
def __getattr__(name):
    if name in ("LTMTrainer", "LTMTrainingArguments"):
        from .tooling import trainer

        return getattr(trainer, name)
    if name == "fit_posterior_encoder":
        from .tooling import amortized

        return amortized.fit_posterior_encoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LTMConfig",
    "LTMForCausalLM",
    "LTMGenerationConfig",
    "LTMModel",
    "LTMPosteriorEncoder",
    "LTMPreTrainedModel",
    "LTMTrainer",
    "LTMTrainingArguments",
    "NonFiniteELBOError",
    "NonFiniteWeightsError",
    "PosteriorEvaluation",
    "PosteriorFitSettings",
    "PosteriorOutput",
    "check_finite_weights",
    "evaluate_posterior",
    "fit_posterior",
    "fit_posterior_encoder",
    "importance_weighted_bound",
]

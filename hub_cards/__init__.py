"""Hub export for LTMs: a loadable folder with remote code and a generated model card, and its upload.

- `export_for_hub(checkpoint, folder)` (`ltm export`): weights, config with `auto_map`, remote-code files,
  generation config with the inference defaults, tokenizer, model card.
- `build_model_card(...)`: the card alone (`huggingface_hub.ModelCard` from `templates/modelcard_template.md`).
- `LTMCardCallback`: a training run's card, written into its output folder from what the trainer recorded.
- `push_folder(folder, repo_id)` (`ltm push`): `HfApi.create_repo` + `HfApi.upload_folder`.
"""

from .callback import LTMCardCallback, card_for_run
from .card import build_model_card, lm_eval_results, trainer_eval_results, usage_snippet
from .export import export_for_hub, hub_generation_config
from .push import HubPushError, push_folder


__all__ = [
    "HubPushError",
    "LTMCardCallback",
    "card_for_run",
    "build_model_card",
    "export_for_hub",
    "hub_generation_config",
    "lm_eval_results",
    "push_folder",
    "trainer_eval_results",
    "usage_snippet",
]

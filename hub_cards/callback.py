"""The LTM's model card for a training run, written by a `TrainerCallback` from what the trainer recorded (its
config, arguments and `state.log_history`), so `LTMTrainer` itself builds no card:

    trainer = LTMTrainer(model, args, ..., callbacks=[LTMCardCallback(dataset="tiny_shakespeare")])
    trainer.train(); trainer.evaluate(); trainer.push_to_hub()   # the card in output_dir is the LTM's

`ltm export` builds the card of a saved folder from the same records (`hub_cards.export`).
"""

from __future__ import annotations

import os

from huggingface_hub import ModelCard
from transformers import TrainerCallback

from modeling_ltm.weight_checks import bare_ltm

from .card import build_model_card, trainer_eval_results
from .export import CARD_HYPERPARAMETERS


def card_for_run(model, args, state, dataset: str | list[str] | None = None, language=None, license=None) -> ModelCard:
    """The card of a run: `model`'s architecture, `args`' hyperparameters (`CARD_HYPERPARAMETERS`) and the last
    evaluation's bounds in `state.log_history`."""
    model = bare_ltm(model)
    metrics = next((entry for entry in reversed(state.log_history) if "eval_elbo_ppl" in entry), {})
    datasets = [dataset] if isinstance(dataset, str) else list(dataset or [])
    repo_id = args.hub_model_id  # None: the card's code names a marked placeholder, never a local folder
    hyperparameters = {
        name: getattr(args, name) for name in CARD_HYPERPARAMETERS if getattr(args, name, None) not in (None, {}, "")
    }
    return build_model_card(
        model.config,
        model_name=(repo_id or os.path.basename(os.path.abspath(args.output_dir))).split("/")[-1],
        repo_id=repo_id,
        num_parameters=model.num_parameters(),
        num_parameters_non_embedding=model.num_parameters(exclude_embeddings=True),
        eval_results=trainer_eval_results(metrics, dataset_name=datasets[0] if datasets else "held-out split"),
        hyperparameters=hyperparameters,
        datasets=datasets or None,
        license=license or "apache-2.0",
        language=[language] if isinstance(language, str) else language,
    )


class LTMCardCallback(TrainerCallback):
    """Writes the run's model card to `output_dir/README.md` after each save, evaluation and at the end of training
    (on the main process), which `Trainer.push_to_hub` then uploads (`LTMTrainer.create_model_card` keeps it)."""

    def __init__(self, dataset: str | list[str] | None = None, language: str | list[str] | None = None, license=None):
        self.dataset, self.language, self.license = dataset, language, license

    def _write(self, args, state, model) -> None:
        if model is None or not state.is_world_process_zero:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        card = card_for_run(model, args, state, self.dataset, self.language, self.license)
        card.save(os.path.join(args.output_dir, "README.md"))

    def on_save(self, args, state, control, model=None, **kwargs):
        self._write(args, state, model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._write(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write(args, state, model)


__all__ = ["LTMCardCallback", "card_for_run"]

"""Export a trained LTM into a folder any transformers user can load from the Hub with `trust_remote_code=True`.

The folder holds what `save_pretrained` writes for a model registered for the Auto classes (`config.json` with
`auto_map`, `model.safetensors`, the remote-code files), a `generation_config.json` carrying the inference-step
defaults, the tokenizer, and the model card (`README.md`). It is written into a temporary sibling folder
(`.<name>.tmp-<pid>-*`, removed by the next export if a kill left it) and renamed into place at the end, so a failed
export leaves nothing behind; with `overwrite=True` into an existing folder, only the files an export writes are
replaced there, other files are kept. One export at a time writes a folder (`ExportLock`, the hidden sibling
`.<name>.ltm-export.lock`). Weights holding NaN/inf, weights missing a tensor of the model (it would be newly
initialised) or holding one it does not have (`cli_errors.load_checked_model`), and a tokenizer without an end-of-text
token are refused, and `training_args.bin` (a pickle) is read through an allow-list that runs no code from the file.
"""

from __future__ import annotations

import copy
import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer
from transformers.utils import logging

from modeling_ltm import LTMForCausalLM  # importing the package registers the classes for `auto_map`
from modeling_ltm.tooling.cli_errors import CLIError, check_model_folder, load_checked_model, no_such_folder
from modeling_ltm.generation_ltm import LTMGenerationConfig
from modeling_ltm.tooling.run_folder import (
    MODEL_FILE_PATTERNS,
    MODEL_PACKAGE,
    REMOTE_CODE_FILES,
    RunLock,
    describe_lock_holder,
    give_weights_the_usual_mode,
    move_staged_files,
    pause_for_fault_injection,
    process_alive,
    read_json,
)
from modeling_ltm.weight_checks import check_finite_weights

from .card import build_model_card, load_lm_eval_results, trainer_eval_results


logger = logging.get_logger(__name__)


# LTMs take no token type ids; without this, `tokenizer(...)` may return them and `generate(**inputs)` would pass
# them on to `forward`.
TOKENIZER_INPUT_NAMES = ["input_ids", "attention_mask"]
# Training hyper-parameters shown on the card, in this order, when the checkpoint records them.
CARD_HYPERPARAMETERS = (
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "seed",
    "bf16",
    "num_inference_steps",
    "num_inference_steps_end",
    "num_inference_steps_ramp_start",
    "num_inference_steps_ramp_stop",
    "inference_lr",
    "inference_lr_end",
    "eval_inference_steps",
    "eval_iw_samples",
)
CHECKPOINT_DIR_PATTERN = re.compile(r"checkpoint-\d+")
# Names an export may write (a saved model's files): replaced in an existing folder, every other file kept.
EXPORT_FILE_PATTERNS = MODEL_FILE_PATTERNS


def _is_checkpoint_n(checkpoint: Path) -> bool:
    return CHECKPOINT_DIR_PATTERN.fullmatch(checkpoint.name) is not None


def read_trainer_eval_metrics(checkpoint: str | Path) -> dict[str, Any]:
    """The last evaluation metrics recorded for this checkpoint (`eval_*` keys), or `{}`.

    A Trainer output folder has `eval_results.json` (or `all_results.json`) from `trainer.save_metrics`; a
    `checkpoint-N` folder has only `trainer_state.json`, whose `log_history` holds the evaluations up to step N
    (entries of the last evaluated step are merged, since metrics may be logged in several entries).
    """
    checkpoint = Path(checkpoint)
    if not _is_checkpoint_n(checkpoint):
        for name in ("eval_results.json", "all_results.json"):
            results = read_json(checkpoint / name, strict=True)
            if results and any(key.startswith("eval_") for key in results):
                return {key: value for key, value in results.items() if key.startswith("eval_")}
    state = read_json(checkpoint / "trainer_state.json", strict=True) or {}
    evaluations = [entry for entry in state.get("log_history", []) if any(key.startswith("eval_") for key in entry)]
    if not evaluations:
        return {}
    last_step = evaluations[-1].get("step")
    merged: dict[str, Any] = {}
    for entry in evaluations:
        if entry.get("step") == last_step:
            merged.update({key: value for key, value in entry.items() if key.startswith("eval_")})
    return merged


# Trainer pickles its arguments into `training_args.bin`. That file is read with `torch.load(weights_only=True)` and an
# allow-list that maps the names it may refer to onto inert stand-ins: no class or function named by the file is
# ever imported, constructed or called, so a crafted file cannot run code. Anything else in it makes the load fail.
_TRAINING_ARGS_CLASSES = (
    "transformers.training_args.TrainingArguments",
    "transformers.training_args_seq2seq.Seq2SeqTrainingArguments",
    "modeling_ltm.tooling.trainer.LTMTrainingArguments",
    "transformers.trainer_pt_utils.AcceleratorConfig",
    "accelerate.state.PartialState",
)
_TRAINING_ARGS_ENUMS = (
    "transformers.trainer_utils.HubStrategy",
    "transformers.trainer_utils.IntervalStrategy",
    "transformers.trainer_utils.SaveStrategy",
    "transformers.trainer_utils.SchedulerType",
    "transformers.trainer_utils.FSDPOption",
    "transformers.training_args.OptimizerNames",
    "transformers.debug_utils.DebugOption",
    "accelerate.utils.dataclasses.DistributedType",
)


class _ArgumentsRecord:
    """Stand-in for a pickled arguments object: keeps its fields (`__dict__` state) as plain data."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise TypeError(f"unexpected pickled state of type {type(state).__name__}")
        self.__dict__.update(state)


def _enum_value(value):
    """Stand-in for `SomeEnum(value)`: the value itself."""
    return value


def read_pickled_training_args(path: Path) -> dict[str, Any]:
    """The fields of a Trainer's `training_args.bin` as a dict, read without running any code from the file.

    Raises `ValueError` naming the globals of a file that refers to anything outside the allow-list (listed from the
    pickle's opcodes, before loading), or whatever `torch.load(weights_only=True)` raises.
    """
    import torch

    refused = sorted(
        set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        - {*_TRAINING_ARGS_CLASSES, *_TRAINING_ARGS_ENUMS}
    )
    if refused:  # listed from the pickle's opcodes, nothing executed
        raise ValueError(f"it refers to {', '.join(refused)}, outside the allow-list")
    allow_list = [(_ArgumentsRecord, name) for name in _TRAINING_ARGS_CLASSES]
    allow_list += [(_enum_value, name) for name in _TRAINING_ARGS_ENUMS]
    with torch.serialization.safe_globals(allow_list):
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(loaded, _ArgumentsRecord):
        raise TypeError(f"{path} holds a {type(loaded).__name__}, not training arguments")

    def plain(value):
        if isinstance(value, _ArgumentsRecord):
            return {k: plain(v) for k, v in vars(value).items()}
        return value

    return {key: plain(value) for key, value in vars(loaded).items() if not key.startswith("_")}


def _load_training_args(checkpoint: Path) -> dict[str, Any]:
    """Training arguments as a dict: `training_args.json` if present, else the Trainer's `training_args.bin` read
    through an allow-list (see `read_pickled_training_args`); `{}` (with a warning) when neither can be read."""
    for folder in (checkpoint, checkpoint.parent) if _is_checkpoint_n(checkpoint) else (checkpoint,):
        as_json = read_json(folder / "training_args.json", strict=True)
        if as_json is not None:
            return as_json
        pickled = folder / "training_args.bin"
        if pickled.is_file():
            try:
                return read_pickled_training_args(pickled)
            except Exception as error:  # refused by the allow-list, or not a torch file: the card omits them
                logger.warning(
                    f"Did not read {pickled}: it is a pickle and only known training-argument classes are accepted "
                    f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). The card will not "
                    "list training arguments; save them as training_args.json (`args.to_json_string()`) to include them."
                )
                return {}
    return {}


def read_training_hyperparameters(checkpoint: str | Path) -> dict[str, Any]:
    """Hyper-parameters for the card: selected training arguments, plus steps, tokens and final training loss from
    `trainer_state.json` / `train_results.json`."""
    checkpoint = Path(checkpoint)
    args = _load_training_args(checkpoint)
    hyperparameters = {name: args[name] for name in CARD_HYPERPARAMETERS if args.get(name) not in (None, {}, "")}
    if hyperparameters.get("max_steps", 0) > 0:
        hyperparameters.pop("num_train_epochs", None)
    for key in ("warmup_steps", "warmup_ratio"):
        if hyperparameters.get(key) == 0:
            hyperparameters.pop(key)
    if "num_inference_steps_end" not in hyperparameters:  # constant T: the ramp's window does not apply
        hyperparameters.pop("num_inference_steps_ramp_start", None)
        hyperparameters.pop("num_inference_steps_ramp_stop", None)
    state = read_json(checkpoint / "trainer_state.json", strict=True) or {}
    if state.get("global_step"):
        hyperparameters["trained_steps"] = state["global_step"]
    train_results = {}
    if not _is_checkpoint_n(checkpoint):
        train_results = read_json(checkpoint / "train_results.json", strict=True) or {}
    trained_tokens = state.get("num_input_tokens_seen") or train_results.get("train_tokens")  # `ltm train` logs it
    if trained_tokens:
        hyperparameters["trained_tokens"] = trained_tokens
    # Trainer's `train_loss` is the mean over the run; the last value logged is what the model ended at.
    logged = [entry for entry in state.get("log_history", []) if isinstance(entry.get("loss"), (int, float))]
    if logged:
        hyperparameters["final_train_loss"] = logged[-1]["loss"]
        hyperparameters["final_train_loss_step"] = logged[-1].get("step")
    if isinstance(train_results.get("train_loss"), (int, float)):
        hyperparameters["mean_train_loss"] = train_results["train_loss"]
    return {name: value for name, value in hyperparameters.items() if value is not None}


# What `ltm train` records about its data, in the run folder and in every checkpoint (`train_cli.DATA_RECORD_NAME`).
DATA_RECORD_NAME = "ltm_train_data.json"


def read_training_data(checkpoint: str | Path) -> tuple[str | None, str | None]:
    """`(corpus in words, Hub dataset id or None)` as `ltm train` recorded them (`ltm_train_data.json` of the run
    folder, or of a checkpoint-N and then its run folder); `(None, None)` when nothing was recorded."""
    checkpoint = Path(checkpoint)
    for folder in (checkpoint, checkpoint.parent) if _is_checkpoint_n(checkpoint) else (checkpoint,):
        record = read_json(folder / DATA_RECORD_NAME, strict=True)
        if record and isinstance(record.get("corpus"), str):
            hub_dataset = record.get("hub_dataset")
            return record["corpus"], hub_dataset if isinstance(hub_dataset, str) else None
    return None, None


def _load_tokenizer(checkpoint: Path, tokenizer: str | Path | None, max_length: int):
    sources = [tokenizer] if tokenizer is not None else [checkpoint]
    if tokenizer is None and _is_checkpoint_n(checkpoint):
        sources.append(checkpoint.parent)  # the Trainer output folder holds the tokenizer too
    errors = []
    for source in sources:
        try:
            loaded = AutoTokenizer.from_pretrained(str(source), model_input_names=TOKENIZER_INPUT_NAMES)
        except (OSError, ValueError, TypeError) as error:
            errors.append(f"{source}: {error}")
            continue
        if loaded.eos_token is None:  # `ltm generate` and `ltm eval` would refuse the export
            missing = "" if (Path(source) / "tokenizer_config.json").is_file() else " (no tokenizer_config.json there)"
            fix = (
                "pass the tokenizer the model was trained with (--tokenizer <folder or Hub id>)"
                if tokenizer is None
                else "pass a tokenizer that has one (--tokenizer)"
            )
            raise CLIError(
                f"the tokenizer in {source} has no end-of-text (EOS) token{missing}, so `ltm generate` and `ltm eval` "
                f"would refuse the export; {fix}, or save it into {source} (`tokenizer.save_pretrained(folder)` "
                "writes tokenizer_config.json)."
            )
        # So that `tokenizer(..., truncation=True)` stops at the model's context instead of a huge sentinel.
        if loaded.model_max_length > max_length:
            loaded.model_max_length = max_length
            loaded.init_kwargs["model_max_length"] = max_length
        return loaded
    raise ValueError(
        f"No tokenizer could be loaded from {' or '.join(str(s) for s in sources)}; pass one with "
        f"`--tokenizer <folder or Hub id>` (`tokenizer=` in Python).\n" + "\n".join(errors)
    )


def hub_generation_config(model):
    """The model's `LTMGenerationConfig` with every default stated: inference fields and special tokens left `None`
    (meaning "the model config's", e.g. in a checkpoint saved before they were set) are filled from the model config,
    so the Hub file says the numbers `generate()` uses."""
    generation_config = copy.deepcopy(model.generation_config)
    defaults = LTMGenerationConfig.from_model_config(model.config)
    for name in (*LTMGenerationConfig.inference_fields, "bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation_config, name, None) is None:
            setattr(generation_config, name, getattr(defaults, name, None))
    return generation_config


def _replace_export_files(staging: Path, output_dir: Path) -> None:
    """Move the files of `staging` into `output_dir`, first removing files there that an export writes
    (`EXPORT_FILE_PATTERNS`) and this one did not; every other file of `output_dir` stays."""
    written = move_staged_files(staging, output_dir, EXPORT_FILE_PATTERNS)
    kept = sorted(path.name for path in output_dir.iterdir() if path.name not in written)
    if kept:
        logger.warning(
            f"Kept {len(kept)} file(s) in {output_dir} that an export does not write ({', '.join(kept[:10])}"
            f"{', ...' if len(kept) > 10 else ''}); `ltm push` uploads the whole folder, so remove them first if they "
            "are not meant for the Hub."
        )


def _staging_prefix(output_dir: Path) -> str:
    return f".{output_dir.name}.tmp-"


class ExportLock(RunLock):
    """`RunLock` for one `ltm export` into `output_dir`: the lock file is the hidden sibling
    `.<name>.ltm-export.lock` (inside the folder it would be uploaded by `ltm push`, and the folder is renamed into
    place), held from before the checks of the folder to the end of the export."""

    def __init__(self, output_dir: Path):
        super().__init__(output_dir.parent)
        self.output_dir = output_dir
        self.path = output_dir.parent / f".{output_dir.name}.ltm-export.lock"

    command = "ltm export"

    def _subject(self) -> tuple[str, str]:
        return f"the export folder {self.output_dir}", "folder"

    def _took_over(self, previous: dict) -> None:
        logger.warning(
            f"An `ltm export` into {self.output_dir} was interrupted ({describe_lock_holder(previous)}); exporting again."
        )


def _unwritable(output_dir: Path, error: OSError) -> CLIError:
    """The export folder cannot be written: named as the user gave it, not by the temporary path that failed."""
    return CLIError(
        f"cannot write the export folder {output_dir} ({error.strerror or error}: its parent folder "
        f"{output_dir.parent} is read-only or not yours); choose a folder you can write to."
    )


def _check_writable(output_dir: Path) -> None:
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if existing == output_dir and any(output_dir.iterdir()):
        targets = (output_dir, output_dir.parent)  # --overwrite moves files into it
    else:
        targets = (existing if existing != output_dir else output_dir.parent,)  # the staging folder goes beside it
    for target in targets:
        if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
            raise _unwritable(output_dir, PermissionError(errno.EACCES, f"{target} is not writable"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_staging(output_dir: Path) -> None:
    """Delete the temporary siblings `.<name>.tmp-<pid>-*` that an export killed midway left next to `output_dir`
    (their pid no longer runs on this host), and those of exports older than the pid in the name (an hour old)."""
    for entry in output_dir.parent.glob(f"{_staging_prefix(output_dir)}*"):
        pid = entry.name[len(_staging_prefix(output_dir)) :].split("-", 1)[0]
        if pid.isdigit():
            stale = not process_alive(int(pid))
        else:
            stale = time.time() - entry.stat().st_mtime > 3600
        if stale and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _check_repo_id(repo_id: str) -> None:
    """`CLIError` unless `repo_id` is a valid Hub repository id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise CLIError(
            f"--repo-id {repo_id!r} is not a Hub repository id ({str(error).splitlines()[0]}); pass "
            "'user/name' or 'org/name' (letters, digits, '-', '_', '.'), or leave it out and name the repository "
            "in `ltm push`."
        ) from None


def export_for_hub(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    lm_eval_results: Iterable[str | Path] = (),
    repo_id: str | None = None,
    model_name: str | None = None,
    datasets: list[str] | None = None,
    eval_dataset_name: str | None = None,
    license: str = "apache-2.0",
    overwrite: bool = False,
) -> Path:
    """Write a Hub-ready folder for the LTM in `checkpoint`; returns the folder.

    Args:
        checkpoint: a Trainer output folder (model, tokenizer, `*_results.json`) or one of its `checkpoint-N` folders.
        output_dir: the folder to write; must be empty or absent unless `overwrite=True`.
        tokenizer: tokenizer folder or Hub id, when the checkpoint has none.
        lm_eval_results: lm-eval results JSON files (or folders holding `results*.json`) for the card's
            `model-index`.
        repo_id: the Hub repository the folder is meant for; the card's usage snippet loads from it. Without it,
            the card names a marked placeholder (`card.REPO_ID_PLACEHOLDER`), never a local path, and `ltm push`
            writes the repository id in its place.
        model_name: card title and `model-index` name (defaults to the last part of `repo_id`, else the name of
            the training run's folder).
        datasets: Hub ids of the training data for the card's metadata. Default: the Hub dataset `ltm train`
            recorded (`ltm_train_data.json`), if it trained on one; the corpus it recorded is named on the card
            either way.
        eval_dataset_name: name of the split the trainer evaluated on (defaults to the first dataset or
            "held-out split").
        license: the weights' license identifier for the card.
        overwrite: write into an existing non-empty `output_dir`, replacing only the files an export writes
            (`EXPORT_FILE_PATTERNS`); other files there are kept.

    Raises:
        ValueError: not an LTM checkpoint, a damaged file (named), a non-empty `output_dir` without `overwrite`, or
            weights holding NaN/inf (`NonFiniteWeightsError`, naming the first bad parameter).
    """
    if not Path(checkpoint).expanduser().exists():
        raise no_such_folder(checkpoint, "checkpoint")
    if repo_id is not None:
        _check_repo_id(repo_id)
    checkpoint = Path(checkpoint).expanduser().resolve()
    output_dir = Path(output_dir).expanduser().resolve()
    config_dict = read_json(checkpoint / "config.json", strict=True)
    if not checkpoint.is_dir() or config_dict is None:
        raise ValueError(
            f"{checkpoint} is not a model checkpoint (no config.json). Pass a Trainer output folder or one of its "
            "checkpoint-N folders."
        )
    if config_dict.get("model_type") != "ltm":
        raise ValueError(
            f"{checkpoint} holds a model of type {config_dict.get('model_type')!r}, not 'ltm'; export needs an LTM."
        )
    if output_dir == checkpoint or output_dir in checkpoint.parents:
        raise ValueError(
            f"The export folder {output_dir} would contain (and with --overwrite replace files of) the checkpoint; "
            "choose a new folder, e.g. <checkpoint>/hub."
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"{output_dir} exists and is not a folder.")
    check_model_folder(checkpoint, "checkpoint")  # names a truncated .safetensors file; refuses pickled weights
    _check_writable(output_dir)
    lock = ExportLock(output_dir)
    try:
        lock.acquire()  # one export at a time into this folder; released when this one ends
    except OSError as error:
        raise _unwritable(output_dir, error) from error
    try:
        return _export_locked(
            checkpoint, output_dir, tokenizer=tokenizer, lm_eval_results=lm_eval_results, repo_id=repo_id,
            model_name=model_name, datasets=datasets, eval_dataset_name=eval_dataset_name, license=license,
            overwrite=overwrite,
        )  # fmt: skip
    finally:
        lock.release()
        lock.remove_created_dirs()


def _export_card(model, checkpoint: Path, *, lm_eval_results, repo_id, model_name, datasets, eval_dataset_name,
                 license):  # fmt: skip
    """The model card of an export: the checkpoint's training data, hyper-parameters and held-out metrics, and the
    lm-eval results given."""
    default_name = (repo_id or str(checkpoint.parent if _is_checkpoint_n(checkpoint) else checkpoint)).rstrip("/")
    default_name = default_name.split("/")[-1]
    training_data, hub_dataset = read_training_data(checkpoint)
    if not datasets and hub_dataset is not None:
        datasets = [hub_dataset]
    eval_name = eval_dataset_name or (datasets[0] if datasets else "held-out split")
    eval_metrics = read_trainer_eval_metrics(checkpoint)
    hyperparameters = read_training_hyperparameters(checkpoint)
    if "eval_iw_ppl" in eval_metrics and "eval_iw_samples" in hyperparameters:
        eval_metrics.setdefault("eval_iw_samples", hyperparameters["eval_iw_samples"])  # names K in the card
    eval_results = trainer_eval_results(eval_metrics, dataset_name=eval_name)
    eval_results += load_lm_eval_results(lm_eval_results)
    return build_model_card(
        model.config,
        model_name=model_name or default_name,
        repo_id=repo_id,
        num_parameters=model.num_parameters(),
        num_parameters_non_embedding=model.num_parameters(exclude_embeddings=True),
        eval_results=eval_results,
        hyperparameters=hyperparameters,
        datasets=datasets,
        license=license,
        training_data=training_data,
    )


def _write_staging(staging: Path, model, tokenizer_object, card) -> None:
    """Writes the export into `staging`: weights and config, the model package's code, tokenizer and card."""
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700; the export folder gets the usual mode
    model.save_pretrained(staging)
    give_weights_the_usual_mode(staging)  # safetensors writes model.safetensors 0600
    for name in REMOTE_CODE_FILES:  # the model package as it is (save_pretrained copies the same files)
        shutil.copyfile(MODEL_PACKAGE / name, staging / name)
    if "auto_map" not in (read_json(staging / "config.json", strict=True) or {}):
        raise RuntimeError(
            "save_pretrained did not write the remote code (auto_map missing): "
            "LTMForCausalLM must be registered with register_for_auto_class (done by `import modeling_ltm`)."
        )
    tokenizer_object.save_pretrained(staging)
    card.save(staging / "README.md")


def _export_locked(
    checkpoint: Path, output_dir: Path, *, tokenizer, lm_eval_results, repo_id, model_name, datasets,
    eval_dataset_name, license, overwrite,
) -> Path:  # fmt: skip
    """`export_for_hub` once its arguments are checked and the folder's `ExportLock` is held."""
    pause_for_fault_injection("export-locked")  # crash-safety tests hold the lock here
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"{output_dir} is not empty; pass --overwrite (overwrite=True) to replace the files an export writes "
            "there (other files are kept), or choose an empty folder."
        )
    # Every tensor from the files: a missing one would be newly initialised (random) and shipped.
    model = load_checked_model(checkpoint, "exporting", LTMForCausalLM, use_safetensors=True).eval()
    check_finite_weights(model, "exporting", source=str(checkpoint))
    model.generation_config = hub_generation_config(model)
    tokenizer_object = _load_tokenizer(checkpoint, tokenizer, model.config.max_position_embeddings)
    if len(tokenizer_object) > model.config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer_object)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)."
        )

    card = _export_card(model, checkpoint, lm_eval_results=lm_eval_results, repo_id=repo_id, model_name=model_name,
                        datasets=datasets, eval_dataset_name=eval_dataset_name, license=license)  # fmt: skip

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output_dir)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(output_dir)}{os.getpid()}-", dir=output_dir.parent))
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise _unwritable(output_dir, error) from error
        raise
    try:
        _write_staging(staging, model, tokenizer_object, card)
        try:
            if output_dir.exists():
                _replace_export_files(staging, output_dir)
            else:
                staging.rename(output_dir)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise _unwritable(output_dir, error) from error
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"Exported {checkpoint} to {output_dir}")
    return output_dir


__all__ = [
    "EXPORT_FILE_PATTERNS",
    "REMOTE_CODE_FILES",
    "export_for_hub",
    "hub_generation_config",
    "read_pickled_training_args",
    "read_trainer_eval_metrics",
    "read_training_data",
    "read_training_hyperparameters",
]

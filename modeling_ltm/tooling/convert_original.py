"""`ltm convert-original`: a checkpoint of the authors' Latent-Thought-LM code (`ckpt_{iter}.pt`) as a
`save_pretrained` folder that `AutoModelForCausalLM.from_pretrained` loads.

    ltm convert-original out/ckpt_60000.pt runs/ltm-paper --tokenizer gpt2

In the style of transformers' `convert_llama_weights_to_hf.py`. The authors' `train_ltm.py` saves
`torch.save({"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config", "rng_state"})`; only `model`
(the state dict), `model_args` (the architecture) and `config` (the training settings: the fast loop's `num_steps` and
`fast_lr`) are read. The file is opened with `torch.load(weights_only=True)` only: a file that needs more (numpy
values, custom classes) is refused, never unpickled.

Weights map one to one: `tok_embeddings` (tied to `output`) -> `model.embed_tokens` (tied `lm_head`); per layer
`attention.{wq,wk,wv,wo}` -> `self_attn.{q,k,v,o}_proj`, `cross_attention.*` -> `cross_attn.*`, `feed_forward`'s
Liger `{gate,up,down}_proj` or plain `{w1,w3,w2}` -> `mlp.{gate,up,down}_proj`, `attention_norm` /
`cross_attention_norm` / `ffn_norm` -> `input_layernorm` / `cross_attn_layernorm` / `post_attention_layernorm`;
`norm` -> `model.norm`. `_orig_mod.` (torch.compile, also inside a key) and `module.` (DDP) are dropped. The rows of
every `wq` / `wk` are permuted from the authors' interleaved RoPE pairs to transformers' rotate-half layout, as the
Llama converter does. The config takes `latent_position_spacing="all_latents"` (the authors' latent positions) and
the paper's fast loop (`PAPER_FAST_LOOP`). `to_original_state_dict` is the inverse mapping (tests, parity scripts).

Tooling only: not one of the remote-code files a Hub folder ships.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers.utils import logging

from ..configuration_ltm import LTMConfig
from .cli_errors import CLIError, run_cli


logger = logging.get_logger(__name__)

# The authors' `LTMConfig` dataclass defaults (model.py), for `model_args` keys their `train_ltm.py` does not save.
ORIGINAL_MODEL_ARGS_DEFAULTS = {
    "n_kv_heads": None,
    "hidden_dim": None,
    "multiple_of": 256,
    "norm_eps": 1e-5,
    "window_size": 256,
    "dropout": 0.0,
    "use_liger": True,
    "use_z_pos_emb": True,
}
REQUIRED_MODEL_ARGS = ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "max_z_len")
# The authors' config.py values, used when the checkpoint's training `config` does not say.
ORIGINAL_NUM_STEPS = 16
ORIGINAL_FAST_LR = 0.34
# The authors' fast loop (optimizer.py): AdamW (weight decay 0.01), mu from 0.01 N(0, 1), logvar from -5 + 0.1 N(0, 1),
# one eps for all steps, lr cosine over s / T down towards lr / 10, one summed loss.
PAPER_FAST_LOOP = {
    "posterior_init_mu_noise": 0.01,
    "inference_weight_decay": 0.01,
    "inference_lr_schedule": "cosine_t",
    "inference_loss_reduction": "sum",
    "posterior_init_logvar": -5.0,
    "posterior_init_logvar_noise": 0.1,
    "posterior_fixed_noise": True,
    "inference_lr_min_ratio": 0.1,
}
# (the authors' name after `layers.{i}.`, ours after `model.layers.{i}.`), without `.weight`. Feed-forward: the Liger
# names first, then the plain `FeedForward`'s (w1 = gate, w3 = up, w2 = down).
LAYER_WEIGHTS = (
    ("attention.wq", "self_attn.q_proj"),
    ("attention.wk", "self_attn.k_proj"),
    ("attention.wv", "self_attn.v_proj"),
    ("attention.wo", "self_attn.o_proj"),
    ("cross_attention.wq", "cross_attn.q_proj"),
    ("cross_attention.wk", "cross_attn.k_proj"),
    ("cross_attention.wv", "cross_attn.v_proj"),
    ("cross_attention.wo", "cross_attn.o_proj"),
    ("feed_forward.gate_proj", "mlp.gate_proj"),
    ("feed_forward.up_proj", "mlp.up_proj"),
    ("feed_forward.down_proj", "mlp.down_proj"),
    ("feed_forward.w1", "mlp.gate_proj"),
    ("feed_forward.w3", "mlp.up_proj"),
    ("feed_forward.w2", "mlp.down_proj"),
    ("attention_norm", "input_layernorm"),
    ("cross_attention_norm", "cross_attn_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
)
GLOBAL_WEIGHTS = (("tok_embeddings", "model.embed_tokens"), ("norm", "model.norm"), ("output", "lm_head"))
LIGER_FEED_FORWARD = ("gate_proj", "up_proj", "down_proj")
LAYER_RENAMES = dict(LAYER_WEIGHTS)
GLOBAL_RENAMES = dict(GLOBAL_WEIGHTS)


# ---------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------


def permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The authors' `wq` / `wk` rows (interleaved RoPE pairs `(2i, 2i+1)` per head) in transformers' rotate-half
    order (pairs `(i, i + head_dim / 2)`), as `convert_llama_weights_to_hf.py` permutes them.

    `weight`: `(n_heads * head_dim, d_in)` -> same shape.
    """
    rows, d_in = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, d_in).transpose(1, 2).reshape(rows, d_in)


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_rotary`: rotate-half rows back to interleaved pairs. `(rows, d_in)` -> same shape."""
    rows, d_in = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, d_in).transpose(1, 2).reshape(rows, d_in)


def canonical_key(key: str) -> str:
    """An authors' state-dict key without DDP's leading `module.` and every `_orig_mod.` part (torch.compile wraps
    the whole model or each attention module): `module._orig_mod.layers.0.attention._orig_mod.wq.weight` ->
    `layers.0.attention.wq.weight`."""
    parts = [part for part in key.split(".") if part != "_orig_mod"]
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def rename_key(key: str) -> str | None:
    """Our name for an authors' (canonical) key, or None for a key the authors' model does not have."""
    match = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", key)
    if match and match[2] in LAYER_RENAMES:
        return f"model.layers.{match[1]}.{LAYER_RENAMES[match[2]]}.weight"
    match = re.fullmatch(r"(\w+)\.weight", key)
    if match and match[1] in GLOBAL_RENAMES:
        return f"{GLOBAL_RENAMES[match[1]]}.weight"
    return None


def rename_state_dict(original: dict, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The authors' state dict under our names (not yet permuted), and for each of our names the authors' key.

    `CLIError` naming `source` for a key the authors' model does not have, a value that is not a tensor, or two keys
    for one weight (e.g. both `w1` and `gate_proj`)."""
    renamed, origin = {}, {}
    unexpected = [key for key in original if not isinstance(key, str) or rename_key(canonical_key(key)) is None]
    if unexpected:
        raise CLIError(
            f"{source}: the state dict holds {len(unexpected)} key(s) the authors' LatentThoughtModel does not have "
            f"({', '.join(map(repr, unexpected[:3]))}{', ...' if len(unexpected) > 3 else ''}); pass a checkpoint "
            "saved by their train_ltm.py (its 'model' entry)."
        )
    for key, value in original.items():
        ours = rename_key(canonical_key(key))
        if not isinstance(value, torch.Tensor):
            raise CLIError(f"{source}: {key!r} is a {type(value).__name__}, not a tensor; re-save the checkpoint.")
        if ours in renamed:
            raise CLIError(
                f"{source}: {origin[ours]!r} and {key!r} are the same weight ({ours}); keep one of them and re-save."
            )
        renamed[ours], origin[ours] = value, key
    return renamed, origin


def tie_embeddings(renamed: dict[str, torch.Tensor], origin: dict[str, str], source: str) -> None:
    """Fill in the tied twin of `tok_embeddings` / `output` (the authors' model ties them); `CLIError` when both are
    present and differ (an untied head cannot be represented) or neither is."""
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    if embed in renamed and head in renamed:
        if renamed[embed].shape != renamed[head].shape or not torch.equal(renamed[embed], renamed[head]):
            raise CLIError(
                f"{source}: {origin[embed]!r} and {origin[head]!r} differ, but the authors' model ties them (and so "
                "does ours); pass a checkpoint of their tied LatentThoughtModel."
            )
    elif embed in renamed or head in renamed:
        present = embed if embed in renamed else head
        renamed[embed] = renamed[head] = renamed[present]


def original_name(ours: str) -> str:
    """The authors' key (Liger names) for one of our weight names, as an error message names it."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", ours)
    if match:
        names = [theirs for theirs, mine in LAYER_WEIGHTS if mine == match[2]]
        return " or ".join(f"layers.{match[1]}.{name}.weight" for name in names)
    return next(f"{theirs}.weight" for theirs, mine in GLOBAL_WEIGHTS if f"{mine}.weight" == ours)


def convert_state_dict(original: dict, config: LTMConfig, expected: dict, source: str) -> dict[str, torch.Tensor]:
    """The authors' state dict -> ours (q/k rows permuted), checked against `expected` (our names -> shapes).

    `CLIError` naming `source` for unexpected, duplicated or missing keys and for shapes that disagree with
    `model_args`."""
    renamed, origin = rename_state_dict(original, source)
    tie_embeddings(renamed, origin, source)
    missing = [name for name in expected if name not in renamed]
    if missing:
        raise CLIError(
            f"{source}: the state dict has no {original_name(missing[0])}"
            f"{f' (and {len(missing) - 1} more missing weights)' if len(missing) > 1 else ''}; it is not a complete "
            f"checkpoint of the authors' model with these model_args (n_layers={config.num_hidden_layers}): pass "
            "the 'model' state dict their train_ltm.py saved."
        )
    for name, shape in expected.items():
        if tuple(renamed[name].shape) != tuple(shape):
            raise CLIError(
                f"{source}: {origin.get(name, original_name(name))!r} has shape {tuple(renamed[name].shape)}, but "
                f"model_args ({describe_shapes(config)}) give {tuple(shape)}; the weights and model_args of the file "
                "disagree: pass a checkpoint saved with its own model_args."
            )
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    converted = {}
    for name, tensor in renamed.items():
        projection = name.split(".")[-2]
        converted[name] = permute_rotary(tensor, heads[projection]) if projection in heads else tensor
    return converted


def describe_shapes(config: LTMConfig) -> str:
    return (
        f"dim={config.hidden_size}, n_layers={config.num_hidden_layers}, n_heads={config.num_attention_heads}, "
        f"n_kv_heads={config.num_key_value_heads}, hidden={config.intermediate_size}, vocab_size={config.vocab_size}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


def feed_forward_width(dim: int, hidden_dim: int | None, multiple_of: int) -> int:
    """The authors' SwiGLU width: `hidden_dim`, or `multiple_of * ceil(int(2 * 4 * dim / 3) / multiple_of)`."""
    if hidden_dim is not None:
        return hidden_dim
    return multiple_of * -(-int(2 * 4 * dim / 3) // multiple_of)


def fast_loop_settings(training_config, source: str) -> dict:
    """Our config's training fast-loop fields from the authors' training `config` (config.py's globals): `num_steps`
    -> `num_inference_steps`, the constant peak `fast_lr` -> `inference_lr`, plus `PAPER_FAST_LOOP`."""
    training_config = training_config if isinstance(training_config, dict) else {}
    defaults = {"num_steps": ORIGINAL_NUM_STEPS, "fast_lr": ORIGINAL_FAST_LR}
    absent = [name for name in defaults if name not in training_config]
    if absent:
        logger.warning(
            f"{source} records no {' / '.join(absent)} in its training 'config'; using the authors' config.py values "
            f"({', '.join(f'{name}={defaults[name]}' for name in absent)})."
        )
    settings = {**defaults, **{name: training_config[name] for name in defaults if name in training_config}}
    return {"num_inference_steps": settings["num_steps"], "inference_lr": settings["fast_lr"], **PAPER_FAST_LOOP}


def config_from_original(model_args, training_config, source: str = "the checkpoint") -> LTMConfig:
    """Our `LTMConfig` for the authors' `model_args` (model.py's `LTMConfig` fields) and training `config`.

    `CLIError` naming `source` for missing or invalid `model_args`, or `use_z_pos_emb=False` (latents without RoPE
    positions: not representable)."""
    if not isinstance(model_args, dict):
        raise CLIError(f"{source}: 'model_args' is a {type(model_args).__name__}, not a dict; re-save the checkpoint.")
    args = {**ORIGINAL_MODEL_ARGS_DEFAULTS, **{k: v for k, v in model_args.items() if v is not None}}
    missing = [name for name in REQUIRED_MODEL_ARGS if args.get(name) is None]
    if missing:
        raise CLIError(f"{source}: 'model_args' has no {', '.join(missing)}; re-save it with the model's model_args.")
    bad = [f"{name}={args[name]!r}" for name in REQUIRED_MODEL_ARGS if type(args[name]) is not int or args[name] < 1]
    if bad:
        raise CLIError(f"{source}: 'model_args' has {', '.join(bad)}, not a positive integer; fix model_args.")
    if not args["use_z_pos_emb"]:
        raise CLIError(f"{source}: use_z_pos_emb=False (latents without RoPE positions) is not supported by LTM.")
    if args["max_z_len"] % args["n_layers"]:
        raise CLIError(
            f"{source}: max_z_len={args['max_z_len']} is not a multiple of n_layers={args['n_layers']} (the authors' "
            "model splits the latents evenly over the layers); fix model_args."
        )
    try:
        return LTMConfig(
            vocab_size=args["vocab_size"],
            pad_vocab_size_to_multiple_of=1,
            hidden_size=args["dim"],
            intermediate_size=feed_forward_width(args["dim"], args["hidden_dim"], args["multiple_of"]),
            num_hidden_layers=args["n_layers"],
            num_attention_heads=args["n_heads"],
            num_key_value_heads=args["n_kv_heads"] or args["n_heads"],
            max_position_embeddings=args["max_seq_len"],
            rms_norm_eps=args["norm_eps"],
            sliding_window=args["window_size"],
            n_latents_per_layer=args["max_z_len"] // args["n_layers"],
            latent_position_spacing="all_latents",
            latent_dim=args["dim"],
            tie_word_embeddings=True,
            dropout=args["dropout"],
            **fast_loop_settings(training_config, source),
        )
    except (ValueError, TypeError, StrictDataclassError) as error:  # LTMConfig's strict validation
        raise CLIError(f"{source}: its model_args / config give an invalid model ({error}); fix them.") from error


# ---------------------------------------------------------------------------------------------------------------
# The inverse: one of our models in the authors' layout
# ---------------------------------------------------------------------------------------------------------------


def original_model_args(config: LTMConfig, liger: bool = True) -> dict:
    """The authors' `model_args` for `config`; `ValueError` for a model their code cannot express."""
    problems = {
        "latent_position_spacing must be 'all_latents'": config.latent_position_spacing != "all_latents",
        "latent_dim must equal hidden_size": config.latent_dim != config.hidden_size,
        "the vocabulary must not be padded": config.padded_vocab_size != config.vocab_size,
        "the embeddings must be tied": not config.tie_word_embeddings,
        "the prior must be N(0, I)": config.prior_type != "standard_normal",
        "no posterior encoder": config.posterior_encoder_size != 0,
        "RoPE must be the default with theta 10000": config.rope_parameters.get("rope_type", "default") != "default"
        or config.rope_parameters.get("rope_theta") != 10000.0,
    }
    failed = [text for text, bad in problems.items() if bad]
    if failed:
        raise ValueError(f"the authors' model cannot express this LTM: {'; '.join(failed)}.")
    multiple_of = 32  # the authors' config.py
    width = config.intermediate_size
    return {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "hidden_dim": None if feed_forward_width(config.hidden_size, None, multiple_of) == width else width,
        "multiple_of": multiple_of,
        "norm_eps": config.rms_norm_eps,
        "max_seq_len": config.max_position_embeddings,
        "dropout": config.dropout,
        "n_prior_layers": 0,
        "n_cls_tokens": 0,
        "window_size": config.sliding_window or config.max_position_embeddings,
        "use_liger": liger,
        "max_z_len": config.num_hidden_layers * config.n_latents_per_layer,
        "use_z_pos_emb": True,
    }


def to_original_state_dict(model, liger: bool = True, compiled: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """One of our `LTMForCausalLM`s as the authors' `(state_dict, model_args)`: their names (feed-forward Liger
    `{gate,up,down}_proj` with `liger`, else `{w1,w3,w2}`; `attention._orig_mod.` with `compiled`), q/k rows back in
    interleaved RoPE order, `output.weight` tied to `tok_embeddings.weight`. Tensors keep their shapes, `(out, in)`."""
    config = model.config
    model_args = original_model_args(config, liger)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    renames = {
        mine: theirs
        for theirs, mine in LAYER_WEIGHTS
        if not theirs.startswith("feed_forward.") or theirs.endswith(LIGER_FEED_FORWARD) == liger
    }
    state_dict = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().clone()
        layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
        if layer is None:
            theirs = next(t for t, mine in GLOBAL_WEIGHTS if f"{mine}.weight" == name)
            state_dict[f"{theirs}.weight"] = tensor
            continue
        theirs = renames[layer[2]]
        if compiled and theirs.startswith(("attention.", "cross_attention.")):
            module, projection = theirs.split(".")
            theirs = f"{module}._orig_mod.{projection}"
        projection = layer[2].split(".")[-1]
        if projection in heads:
            tensor = unpermute_rotary(tensor, heads[projection])
        state_dict[f"layers.{layer[1]}.{theirs}.weight"] = tensor
    state_dict["output.weight"] = state_dict["tok_embeddings.weight"]  # tied, as the authors' state_dict() has both
    return state_dict, model_args


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint file and the output folder
# ---------------------------------------------------------------------------------------------------------------


def load_original_checkpoint(path: Path) -> dict:
    """`torch.load(path, map_location="cpu", weights_only=True)`, checked to hold `model` and `model_args`.

    `CLIError` naming `path` for a missing file, a file torch cannot read, one that needs more than
    `weights_only=True` allows (refused, not unpickled) or one without the authors' entries."""
    if not path.is_file():
        raise CLIError(f"{path} is not a file; pass a checkpoint saved by the authors' train_ltm.py (ckpt_N.pt).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        text = str(error)
        if "Weights only load failed" in text or "WeightsUnpickler" in text:
            found = re.search(r"Unsupported global: GLOBAL \S+", text)
            found = found or re.search(r"WeightsUnpickler error: [^.]+", text)
            what = f" ({found[0].rstrip('.')})" if found else ""
            raise CLIError(
                # (no "weights_only" in the text: `message_for` would replace it by its own pickle message)
                f"{path} holds more than tensors and plain values and needs more than torch.load's weights-only "
                f"loader allows{what}; it was not unpickled (unpickling can run code): where you trust it, re-save "
                "only plain values: torch.save({'model': <state dict>, 'model_args': <dict>, 'config': <dict of "
                "numbers and strings>}, 'ckpt_plain.pt')."
            ) from None
        reason = f"{type(error).__name__}: {text.splitlines()[0][:120]}" if text.strip() else "empty or truncated"
        raise CLIError(
            f"{path} is not a torch checkpoint torch.load can read ({reason}); pass the ckpt_N.pt file the authors' "
            "train_ltm.py saved (copy it again if it is truncated)."
        ) from None
    if not isinstance(checkpoint, dict) or not {"model", "model_args"} <= set(checkpoint):
        held = sorted(map(str, checkpoint))[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CLIError(
            f"{path} is not a checkpoint of the authors' train_ltm.py (no 'model' and 'model_args' entries; it holds "
            f"{held}); pass their ckpt_N.pt, or torch.save({{'model': ..., 'model_args': ..., 'config': ...}})."
        )
    if not isinstance(checkpoint["model"], dict):
        raise CLIError(f"{path}: 'model' is a {type(checkpoint['model']).__name__}, not a state dict; re-save it.")
    return checkpoint


def check_output_dir(output_dir: Path, checkpoint_path: Path) -> None:
    """`CLIError` unless `output_dir` is absent or an empty folder (nothing is ever overwritten)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise CLIError(f"{output_dir} exists and is not a folder; choose a new output folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise CLIError(
            f"{output_dir} is not empty; choose a new (or empty) output folder for the conversion of "
            f"{checkpoint_path} (nothing is overwritten)."
        )


def load_tokenizer(name_or_path: str, max_length: int):
    """`AutoTokenizer.from_pretrained(name_or_path)` (input names as `ltm export` saves them), its `model_max_length`
    capped at the model's context; `CLIError` when it cannot be loaded."""
    from transformers import AutoTokenizer

    from hub_cards.export import TOKENIZER_INPUT_NAMES

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), model_input_names=TOKENIZER_INPUT_NAMES)
    except (OSError, ValueError, TypeError) as error:
        raise CLIError(
            f"--tokenizer {name_or_path!r} could not be loaded ({str(error).splitlines()[0][:160]}); pass a "
            "tokenizer folder or Hub id (the authors trained with GPT-2's)."
        ) from error
    if tokenizer.model_max_length > max_length:
        tokenizer.model_max_length = max_length
        tokenizer.init_kwargs["model_max_length"] = max_length
    return tokenizer


def write_folder(model, tokenizer, output_dir: Path) -> Path:
    """`model.save_pretrained` (+ `tokenizer.save_pretrained`) into a temporary sibling `.<name>.tmp-<pid>-*`, renamed
    to `output_dir` at the end: a failed conversion leaves nothing behind."""
    from hub_cards.export import remove_stale_staging

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-{os.getpid()}-", dir=output_dir.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the folder gets the usual mode
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if output_dir.exists():
            output_dir.rmdir()  # empty: checked before
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def convert_original_checkpoint(checkpoint_path, output_dir, tokenizer=None) -> Path:
    """Convert the authors' `ckpt_{iter}.pt` into a `save_pretrained` folder; returns the folder.

    Args:
        checkpoint_path: the file `train_ltm.py` saved (read with `torch.load(weights_only=True)` only).
        output_dir: the folder to write; must be absent or empty.
        tokenizer: a tokenizer folder or Hub id to save with the model (optional).

    Raises:
        CLIError: a file that is not such a checkpoint, needs unpickling, lacks or has extra weights, shapes that
            disagree with its `model_args`, a non-empty `output_dir`, a tokenizer that cannot be loaded.
    """
    from .. import LTMForCausalLM
    from ..generation_ltm import LTMGenerationConfig
    from ..weight_checks import check_finite_weights

    checkpoint_path = Path(checkpoint_path).expanduser()
    output_dir = Path(output_dir).expanduser().resolve()
    check_output_dir(output_dir, checkpoint_path)
    checkpoint = load_original_checkpoint(checkpoint_path)
    config = config_from_original(checkpoint["model_args"], checkpoint.get("config"), str(checkpoint_path))
    tokenizer_object = None if tokenizer is None else load_tokenizer(tokenizer, config.max_position_embeddings)
    if tokenizer_object is not None and len(tokenizer_object) > config.vocab_size:
        raise CLIError(
            f"--tokenizer {tokenizer!r} has {len(tokenizer_object)} tokens but {checkpoint_path}'s vocab_size is "
            f"{config.vocab_size}; pass the tokenizer the model was trained with."
        )
    model = LTMForCausalLM(config).eval()
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    state_dict = convert_state_dict(checkpoint["model"], config, expected, str(checkpoint_path))
    model.load_state_dict(state_dict, strict=True)
    check_finite_weights(model, "converting", source=str(checkpoint_path))
    model.generation_config = LTMGenerationConfig.from_model_config(model.config)
    return write_folder(model, tokenizer_object, output_dir)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltm convert-original",
        description=(
            "Convert a checkpoint of the authors' Latent-Thought-LM code (ckpt_N.pt from train_ltm.py) into a "
            "save_pretrained folder (config, generation config with their fast-loop settings, weights)."
        ),
    )
    parser.add_argument("checkpoint", help="the authors' checkpoint file, e.g. out/ckpt_60000.pt")
    parser.add_argument("output_dir", help="folder to write (must be absent or empty)")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id to save with the model, e.g. gpt2")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`ltm convert-original`; errors are printed as one line (exit code 2) by `cli_errors.run_cli`."""
    return run_cli("ltm convert-original", _main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    folder = convert_original_checkpoint(args.checkpoint, args.output_dir, tokenizer=args.tokenizer)
    print(
        f"Converted {args.checkpoint} to {folder}. Load it with `import modeling_ltm` and "
        f"AutoModelForCausalLM.from_pretrained({str(folder)!r})."
    )
    return 0


__all__ = [
    "PAPER_FAST_LOOP",
    "config_from_original",
    "convert_original_checkpoint",
    "convert_state_dict",
    "main",
    "permute_rotary",
    "to_original_state_dict",
    "unpermute_rotary",
]

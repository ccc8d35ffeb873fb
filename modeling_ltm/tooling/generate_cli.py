"""`ltm generate`: text in, text out, with the latents fitted on each prompt (or drawn from the prior).

    ltm generate runs/ltm-tiny --prompt "ROMEO:" --max-new-tokens 64
    ltm generate runs/ltm-tiny --prompt "ROMEO:" --prompt "JULIET:" --do-sample --top-p 0.9 --seed 0
    ltm generate runs/ltm-tiny --prompts-file prompts.txt --num-beams 4
    ltm generate runs/ltm-tiny --unconditional --num-samples 3 --do-sample

One prompt (greedy or sampling) streams its tokens to the terminal as they are decoded; several prompts (or beam
search, or several return sequences) print each completion when the batch is done. Prompts longer than the context
minus `--max-new-tokens` are truncated from the left, with a notice on stderr.
"""

import argparse
import math
import sys
from pathlib import Path

from .budgets import check_inference_steps, check_memory
from .cli_errors import CLIError, check_model_folder, load_checked_model, resolve_device, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltm generate",
        description="Generate text with an LTM: fit the latent thoughts z on each prompt, then decode.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model_path", help="folder written by save_pretrained (model + tokenizer), e.g. runs/ltm-tiny")
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    prompts.add_argument("--prompts-file", type=Path, default=None, help="a file with one prompt per line")
    prompts.add_argument(
        "--unconditional",
        action="store_true",
        help="draw z from the prior N(0, I) instead of fitting it; without prompts, start from the BOS token",
    )
    prompts.add_argument("--num-samples", type=int, default=1, help="with --unconditional and no prompt: samples")
    decoding = parser.add_argument_group("decoding (transformers generate)")
    decoding.add_argument("--max-new-tokens", type=int, default=64)
    decoding.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam decoding")
    decoding.add_argument("--temperature", type=float, default=None)
    decoding.add_argument("--top-k", type=int, default=None)
    decoding.add_argument("--top-p", type=float, default=None)
    decoding.add_argument("--num-beams", type=int, default=1)
    decoding.add_argument("--num-return-sequences", type=int, default=1)
    decoding.add_argument("--repetition-penalty", type=float, default=None)
    decoding.add_argument("--stop-string", action="append", default=None, help="stop when this text is produced")
    decoding.add_argument("--seed", type=int, default=None, help="seeds sampling and the latents' noise")
    latents = parser.add_argument_group("latent thoughts")
    latents.add_argument("--num-inference-steps", type=int, default=None, help="fast steps (default: the model's)")
    latents.add_argument("--inference-lr", type=float, default=None, help="fast learning rate (default: the model's)")
    latents.add_argument("--latent-temperature", type=float, default=None, help="std of prior samples")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if available)")
    parser.add_argument(
        "--no-stream", action="store_true", help="print the completion at the end even for a single prompt"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise CLIError(f"--prompts-file {args.prompts_file} does not exist; give a file with one prompt per line.")
        try:
            text = args.prompts_file.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of a prompt
        except UnicodeDecodeError as error:
            raise CLIError(
                f"--prompts-file {args.prompts_file} is not UTF-8 text (byte {error.object[error.start]:#04x} at "
                f"position {error.start}): give a text file with one prompt per line."
            ) from None
        from_file = [line for line in text.splitlines() if line.strip()]
        if not from_file:
            raise CLIError(
                f"--prompts-file {args.prompts_file} holds no prompt (it is empty or only blank lines); write one "
                "prompt per line, or leave the flag out."
            )
        prompts += from_file
    if not prompts and not args.unconditional:
        raise CLIError("give --prompt (repeatable) or --prompts-file, or --unconditional to sample without a prompt.")
    return prompts


def check_decoding_flags(args) -> None:
    """Raise `CLIError` for decoding flags transformers would reject late (or with a ZeroDivisionError)."""
    for flag, value in (
        ("--max-new-tokens", args.max_new_tokens),
        ("--num-samples", args.num_samples),
        ("--num-beams", args.num_beams),
        ("--num-return-sequences", args.num_return_sequences),
    ):
        if value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}.")
    if args.num_return_sequences > args.num_beams and not args.do_sample:
        raise CLIError(
            f"--num-return-sequences {args.num_return_sequences} needs --do-sample or --num-beams >= "
            f"{args.num_return_sequences} (greedy decoding returns one sequence per prompt)."
        )
    check_inference_steps("--num-inference-steps", args.num_inference_steps)
    for flag, value in (
        ("--inference-lr", args.inference_lr),
        ("--temperature", args.temperature),
        ("--repetition-penalty", args.repetition_penalty),
    ):
        if value is not None and not 0 < value < math.inf:
            raise CLIError(f"{flag} must be a finite number > 0, got {value}.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1] (the probability mass kept), got {args.top_p}.")
    if args.top_k is not None and args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0 (0 keeps every token), got {args.top_k}.")
    if args.latent_temperature is not None and not 0 <= args.latent_temperature < math.inf:
        raise CLIError(f"--latent-temperature must be a finite number >= 0, got {args.latent_temperature}.")
    if args.stop_string is not None and any(stop == "" for stop in args.stop_string):
        raise CLIError('--stop-string "" would stop before the first token; give a non-empty text to stop at.')


def main(argv: list[str] | None = None) -> int:
    return run_cli("ltm generate", _main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = read_prompts(args)
    check_decoding_flags(args)
    model_path = check_model_folder(args.model_path, "model_path", model_type="ltm")
    device = resolve_device(args.device)

    from transformers import set_seed

    import modeling_ltm  # noqa: F401  (registers "ltm" with the Auto classes)

    tokenizer, config = load_tokenizer_and_config(model_path)
    model = load_model(args, model_path, config, prompts, device)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.seed is not None:
        set_seed(args.seed)
    generate_kwargs = build_generate_kwargs(args, tokenizer)
    inputs = model_inputs(args, prompts, tokenizer, config.max_position_embeddings, device, generate_kwargs)

    batch_size = inputs["input_ids"].shape[0]
    stream = batch_size == 1 and args.num_beams == 1 and args.num_return_sequences == 1 and not args.no_stream
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_special_tokens=True)
        model.generate(**inputs, streamer=streamer, **generate_kwargs)
        return 0
    outputs = model.generate(**inputs, **generate_kwargs)
    print_texts(tokenizer.batch_decode(outputs, skip_special_tokens=True), batch_size, bool(prompts))
    return 0


def load_tokenizer_and_config(model_path: Path):
    """The tokenizer and config of `model_path`; a tokenizer that cannot pad or stop, or that has ids the model has
    no embedding for, is a `CLIError`."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise CLIError(
            f"no tokenizer could be loaded from {model_path} ({error}); save one next to the model."
        ) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is None:
        missing = "" if (model_path / "tokenizer_config.json").is_file() else " (no tokenizer_config.json there)"
        raise CLIError(
            f"the tokenizer of {model_path} has no end-of-text (EOS) or padding token{missing}, and ltm generate pads "
            "prompts with one and stops at EOS; save the tokenizer the model was trained with next to it "
            f"(`tokenizer.save_pretrained('{model_path}')` writes tokenizer_config.json)."
        )
    config = AutoConfig.from_pretrained(model_path)
    if len(tokenizer) > config.vocab_size:
        raise CLIError(
            f"the tokenizer of {model_path} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{config.vocab_size} ({model_path / 'config.json'}): ids from {config.vocab_size} on have no embedding. "
            "Save the tokenizer the model was trained with next to it."
        )
    return tokenizer, config


def load_model(args: argparse.Namespace, model_path: Path, config, prompts: list[str], device):
    """The checked model on `device`, in eval mode, once the context, the memory budget, its weights and its default
    number of inference steps allow the generation asked for."""
    from transformers import AutoModelForCausalLM

    from ..weight_checks import check_finite_weights

    context = config.max_position_embeddings
    if args.max_new_tokens >= context:
        raise CLIError(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt: the context is {context}."
        )
    rows = (len(prompts) or args.num_samples) * max(args.num_return_sequences, args.num_beams)
    if prompts:  # the posterior fit on the prompts takes a backward pass; a prompt may fill the context
        check_memory("--prompt/--prompts-file", f"({len(prompts):,} prompts)", config, rows, context, device)
    else:
        check_memory("--num-samples", args.num_samples, config, rows, 1 + args.max_new_tokens, device, backward=False)

    model = load_checked_model(
        model_path, "generating", AutoModelForCausalLM, config=config, use_safetensors=True
    ).to(device).eval()
    check_finite_weights(model, "generating", source=str(model_path))
    if args.num_inference_steps is None and not args.unconditional:
        default = getattr(model.generation_config, "num_inference_steps", None)
        check_inference_steps(
            f"the default num_inference_steps of {model_path} (generation_config.json / config.json; override with "
            "--num-inference-steps)",
            config.num_inference_steps if default is None else default,
        )
    return model


def build_generate_kwargs(args: argparse.Namespace, tokenizer) -> dict:
    """`model.generate`'s keyword arguments from the flags (those left unset are left to the generation config)."""
    generate_kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        num_beams=args.num_beams,
        num_return_sequences=args.num_return_sequences,
        pad_token_id=tokenizer.pad_token_id,
        num_inference_steps=args.num_inference_steps,
        inference_lr=args.inference_lr,
        latent_temperature=args.latent_temperature,
        inference_seed=args.seed,
    )
    optional = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "stop_strings": args.stop_string,
    }
    generate_kwargs.update({k: v for k, v in optional.items() if v is not None})
    if args.stop_string:
        generate_kwargs["tokenizer"] = tokenizer
    if args.unconditional:
        generate_kwargs["latents"] = "prior"
    return generate_kwargs


def model_inputs(args, prompts: list[str], tokenizer, context: int, device, generate_kwargs: dict) -> dict:
    """The prompts, left-padded and cut to their last tokens that leave room for the new ones; without prompts,
    `--num-samples` rows of the BOS token (set as `generate_kwargs["bos_token_id"]`)."""
    import torch

    if prompts:
        max_prompt_tokens = context - args.max_new_tokens
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_tokens)
        lengths = [len(ids) for ids in tokenizer(prompts).input_ids]
        if max(lengths) > max_prompt_tokens:
            print(
                f"ltm generate: prompts longer than {max_prompt_tokens} tokens (context {context} - "
                f"{args.max_new_tokens} new) keep their last {max_prompt_tokens} tokens.",
                file=sys.stderr,
            )
        return {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
    bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos_token_id is None:
        raise CLIError("the tokenizer has no BOS/EOS token to start unconditional generation from; give --prompt.")
    generate_kwargs["bos_token_id"] = bos_token_id
    return {"input_ids": torch.full((args.num_samples, 1), bos_token_id, dtype=torch.long, device=device)}


def print_texts(texts: list[str], batch_size: int, from_prompts: bool) -> None:
    per_prompt = len(texts) // batch_size
    for i, text in enumerate(texts):
        label = f"prompt {i // per_prompt + 1}" if from_prompts else f"sample {i // per_prompt + 1}"
        if per_prompt > 1:
            label += f", sequence {i % per_prompt + 1}"
        print(f"=== {label} ===\n{text}\n")

if __name__ == "__main__":
    sys.exit(main())

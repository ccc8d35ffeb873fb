"""Where a cached decoding step's time goes: the LTM, the LTM with its cross-attention sublayers skipped, and Llama.

    .venv/bin/python bench/decode_step.py --json bench/results/decode_step.json

The models are `bench/generate.py`'s (same flags: hidden 256, 4 layers, vocabulary 8192, random weights). After a
prefill of `--prompt-length` tokens, one step is one forward of one token per row with the cache (the LTM's latents
already in its cross-attention cache), timed over `--steps` steps per round; the cache is cropped back after every
step, so each one attends over the same length. The three variants take turns within a round, in reversed order
every other round, and each ratio is the median of the rounds' own ratios (the machine's speed drifts between
rounds, not within one).

`ltm_without_cross_attention` replaces `LTMCrossAttention.forward` by a pass-through for the timing: its outputs are
wrong, only its time counts. It is the LTM's step without the sublayer Llama lacks (the cross-attention's norm and
residual stay), so `llama / ltm_without_cross_attention` says whether the rest of the LTM's step is as lean as Llama's,
and the difference to `ltm` is what the cross-attention sublayers cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.common import load_bench, resolve_device, run_metadata, save_json  # noqa: E402
from modeling_ltm.modeling_ltm import LTMCrossAttention  # noqa: E402


generate_bench = load_bench("generate")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="decoding steps per variant per round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    # Every other flag is bench/generate.py's: the model's shape, --batch-sizes, --prompt-length, --threads,
    # --device, --dtype.
    known, rest = parser.parse_known_args(argv)
    args = generate_bench.parse_args(rest)
    vars(args).update(vars(known))
    return args


@contextmanager
def cross_attention_skipped():
    """`LTMCrossAttention.forward` as a pass-through (the timing of the step without the sublayer's work)."""
    forward = LTMCrossAttention.forward
    LTMCrossAttention.forward = lambda self, hidden_states, *args, **kwargs: (hidden_states, None)
    try:
        yield
    finally:
        LTMCrossAttention.forward = forward


def decoding_step(model, prompt: torch.Tensor, **model_kwargs):
    """A callable running one cached decoding step after `prompt` (the cache cropped back after it)."""
    with torch.no_grad():
        cache = model(prompt, use_cache=True, **model_kwargs).cache
    mask = torch.ones(prompt.shape[0], prompt.shape[1] + 1, dtype=torch.long, device=prompt.device)
    token = prompt[:, -1:]

    def step():
        with torch.no_grad():
            model(token, attention_mask=mask, use_cache=True, cache=cache, **model_kwargs)
        cache.crop(-1)

    return step


def many_steps(step, count: int, skip_cross_attention: bool = False):
    """A callable running `step` `count` times; with `skip_cross_attention`, patched out once around all of them (so
    the patching itself stays out of the per-step time)."""

    def run():
        with cross_attention_skipped() if skip_cross_attention else nullcontext():
            for _ in range(count):
                step()

    return run


def main(argv=None) -> int:
    args = parse_args(argv)
    started, load_before = time.time(), os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device, args.dtype)
    ltm, llama = (model.to(device=device, dtype=dtype) for model in generate_bench.build_models(args))
    rows = []
    for batch_size in args.batch_sizes:
        prompt = generate_bench.random_prompt(args, batch_size, device)
        latents = ltm.infer_latents(prompt, num_steps=1, seed=0).z
        ltm_step = decoding_step(ltm, prompt, latents=latents)
        llama_step = decoding_step(llama, prompt)

        warm_up = max(args.steps // 5, 1)
        for skip in (False, True):
            many_steps(ltm_step, warm_up, skip)()
        many_steps(llama_step, warm_up)()
        variants = {
            "ltm": many_steps(ltm_step, args.steps),
            "ltm_without_cross_attention": many_steps(ltm_step, args.steps, skip_cross_attention=True),
            "llama": many_steps(llama_step, args.steps),
        }
        wall, _, _ = generate_bench.timed(variants, args.rounds, str(device))
        microseconds = {name: [t / args.steps * 1e6 for t in times] for name, times in wall.items()}
        row = {"batch_size": batch_size, "steps_per_round": args.steps, "rounds": args.rounds}
        for name, values in microseconds.items():
            row[f"{name}_us_per_step"] = statistics.median(values)
        for name in ("ltm", "ltm_without_cross_attention"):
            ratios = generate_bench.round_ratios(microseconds, "llama", name)
            row[f"llama_over_{name}"] = statistics.median(ratios)
            row[f"llama_over_{name}_rounds"] = ratios
        row["cross_attention_share_of_ltm_step"] = 1 - statistics.median(
            generate_bench.round_ratios(microseconds, "ltm_without_cross_attention", "ltm")
        )
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_rounds")}), flush=True)

    print(
        "\n| batch | LTM step (us) | LTM step without cross-attention (us) | Llama step (us) | Llama / LTM "
        "(= LTM / Llama tok/s) | Llama / LTM without cross-attention | cross-attention share of the LTM step |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['batch_size']} | {row['ltm_us_per_step']:.0f} | {row['ltm_without_cross_attention_us_per_step']:.0f} "
            f"| {row['llama_us_per_step']:.0f} | {row['llama_over_ltm']:.3f} | "
            f"{row['llama_over_ltm_without_cross_attention']:.3f} | {row['cross_attention_share_of_ltm_step']:.1%} |"
        )
    meta = run_metadata("decode_step.py", argv, args, load_before, started)
    meta.update(device=str(device), dtype=args.dtype)
    save_json(args.json, {"meta": meta, "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

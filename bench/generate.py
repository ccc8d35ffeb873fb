"""Decode speed of `LTMForCausalLM.generate` (with and without cache) vs a same-size `LlamaForCausalLM.generate`.

One run, one process, random weights (speed does not depend on training): for each batch size, a ~32-token prompt,
greedy decoding of exactly `--new-tokens` tokens (`min_new_tokens = max_new_tokens`, so every model produces the same
number of tokens). The LTM's posterior on the prompt is fitted first and timed on its own; the decode timings then
pass the fitted `latents` to `generate`, so they measure prefill + decoding only, as Llama's do.

    .venv/bin/python bench/generate.py                      # hidden 256, 4 layers, vocab 8192, batch 1 and 8
    .venv/bin/python bench/generate.py --json runs/bench_generate.json
    python bench/generate.py --device cuda --dtype bf16     # GPU defaults: the LTM-S preset, 128 new tokens, batch 1,
                                                            # static cache (compiled decoding) for both models

`--cache-implementation static` gives both models transformers' static cache, whose decoding step `generate` compiles
(`torch.compile`, CUDA graphs) on a GPU; the LTM's cross-attention cache is a static one too.

Prints a Markdown table (for docs/benchmarks.md) with decode tokens/s = batch * new_tokens / time of `generate`,
the median over `--repeats` rounds (the cache-less LTM runs once at batch > 1: it is slow by design), by two clocks:
`cpu` (this process's CPU time: with `--threads 1`, the cost of the code, which other processes sharing the cores
do not inflate) and `wall`. `LTM / Llama` is the median over the rounds of each round's ratio (the two models run
back to back in every round, their order reversed every other round), which a drift of the machine's speed
between rounds does not move; the per-round ratios are in the JSON (`*_ltm_vs_llama_rounds`).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaForCausalLM


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.common import add_device_arguments, portable, resolve_device, synchronize  # noqa: E402
from modeling_ltm import LTMConfig, LTMForCausalLM  # noqa: E402
from modeling_ltm.tooling.train_cli import llama_peer_config  # noqa: E402


GPU_DEFAULTS = dict(preset="configuration/ltm-s.json", new_tokens=128, batch_sizes=[1], cache_implementation="static")
CPU_DEFAULTS = dict(preset=None, new_tokens=256, batch_sizes=[1, 8], cache_implementation=None)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="an LTM preset JSON (GPU default: LTM-S); else the sizes below")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-position-embeddings", type=int, default=512)
    parser.add_argument("--n-latents-per-layer", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 256 on a CPU, 128 on a GPU")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 8 on a CPU, 1 on a GPU")
    parser.add_argument("--cache-implementation", default=None, help="e.g. static (the GPU default)")
    parser.add_argument("--num-inference-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cache-repeats", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; 1 makes the cpu clock the code's own cost on a shared machine (0: torch's choice)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def build_models(args):
    if args.preset:
        path = Path(args.preset)
        ltm_config = LTMConfig.from_json_file(path if path.is_absolute() else REPO_ROOT / path)
        ltm_config.num_inference_steps = args.num_inference_steps
        ltm_config.bos_token_id, ltm_config.eos_token_id = 1, 2
        args.vocab_size = ltm_config.vocab_size
        torch.manual_seed(0)
        return LTMForCausalLM(ltm_config).eval(), LlamaForCausalLM(llama_peer_config(ltm_config)).eval()
    ltm_config = LTMConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        max_position_embeddings=args.max_position_embeddings,
        n_latents_per_layer=args.n_latents_per_layer,
        num_inference_steps=args.num_inference_steps,
        # Llama's special tokens, so both models pay for the same EOS stopping checks and logits processors.
        bos_token_id=1,
        eos_token_id=2,
    )
    llama_config = llama_peer_config(ltm_config)
    torch.manual_seed(0)
    ltm = LTMForCausalLM(ltm_config).eval()
    llama = LlamaForCausalLM(llama_config).eval()
    return ltm, llama


def random_prompt(args, batch_size: int, device) -> torch.Tensor:
    """`(batch_size, --prompt-length)` token ids, the same for every run (seeded on the CPU, then moved)."""
    shape = (batch_size, args.prompt_length)
    return torch.randint(0, args.vocab_size, shape, generator=torch.Generator().manual_seed(1)).to(device)


def timed(fns: dict, repeats: int, device: str = "cpu") -> tuple[dict, dict, dict]:
    """Wall times and CPU times (this process, all its threads) in seconds of each callable, one per round over
    `repeats` rounds, and each one's last result.

    The callables take turns within a round, in reversed order every other round (A B, B A, ...), so a drift of the
    machine's speed hits them alike. With one torch thread the CPU time is the time the code actually ran, which
    other processes sharing the cores do not inflate. On CUDA the clocks stop after the device's queued work
    (`synchronize`)."""
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    results = {}
    for round_index in range(repeats):
        order = list(fns.items()) if round_index % 2 == 0 else list(fns.items())[::-1]
        for name, fn in order:
            synchronize(device)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            results[name] = fn()
            synchronize(device)
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu, results


def median_times(times: dict) -> dict:
    return {name: statistics.median(values) for name, values in times.items()}


def round_ratios(times: dict, numerator: str, denominator: str) -> list[float]:
    """`times[numerator][i] / times[denominator][i]` for each round: each round's two runs were adjacent in time, so
    the machine's speed changes between rounds (seen here: 2x on this VM within minutes) cancel out of the median."""
    return [a / b for a, b in zip(times[numerator], times[denominator])]


def ops_per_decoding_step(model, prompt: torch.Tensor, **model_kwargs) -> int:
    """Top-level ATen operators (kernel launches on a GPU, dispatcher calls on a CPU) of one cached decoding step
    after `prompt`, counted with `torch.profiler`: a machine-independent measure of the per-token overhead."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        out = model(prompt, use_cache=True, **model_kwargs)
        mask = torch.ones(prompt.shape[0], prompt.shape[1] + 1, dtype=torch.long, device=prompt.device)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(prompt[:, -1:], attention_mask=mask, use_cache=True, cache=out.cache)
    return sum(
        1
        for event in prof.events()
        if event.name.startswith("aten::") and not (event.cpu_parent and event.cpu_parent.name.startswith("aten::"))
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device, args.dtype)
    ltm, llama = (model.to(device=device, dtype=dtype) for model in build_models(args))
    decode = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    cached = dict(decode, cache_implementation=args.cache_implementation) if args.cache_implementation else decode
    load_before = os.getloadavg()
    results = []
    for batch_size in args.batch_sizes:
        prompt = random_prompt(args, batch_size, device)
        # Warm-up (allocator, SDPA dispatch; with a static cache, the compilation of the decoding step) on a
        # generation of each model as long as the timed ones (the static cache's shape, so no recompilation).
        z = ltm.infer_latents(prompt, num_steps=1, seed=0).z
        ltm.generate(prompt, latents=z, **cached)
        llama.generate(prompt, **cached)

        load = os.getloadavg()[0]
        fit_wall, fit_cpu, fitted = timed({"fit": lambda: ltm.infer_latents(prompt, seed=0)}, args.repeats, device)
        z = fitted["fit"].z
        wall, cpu, out = timed(
            {
                "ltm": lambda: ltm.generate(prompt, latents=z, **cached),
                "llama": lambda: llama.generate(prompt, **cached),
            },
            args.repeats,
            device,
        )
        no_cache_repeats = args.no_cache_repeats if batch_size > 1 else max(args.no_cache_repeats, args.repeats)
        # Llama without its cache too: the cache speed-up a same-size transformers model gets on this machine.
        no_cache_wall, no_cache_cpu, no_cache_out = timed(
            {
                "ltm": lambda: ltm.generate(prompt, latents=z, use_cache=False, **decode),
                "llama": lambda: llama.generate(prompt, use_cache=False, **decode),
            },
            no_cache_repeats,
            device,
        )
        assert out["ltm"].shape == out["llama"].shape == (batch_size, args.prompt_length + args.new_tokens)
        same_tokens = torch.equal(out["ltm"], no_cache_out["ltm"])
        # In bf16 the cached and the full forward round differently, and a near-tie may flip one greedy token.
        assert same_tokens or dtype != torch.float32, "LTM greedy output differs with and without cache"
        tokens = batch_size * args.new_tokens
        row = {"batch_size": batch_size, "num_inference_steps": args.num_inference_steps, "load_average_1min": load,
               "cache_implementation": args.cache_implementation or "dynamic"}  # fmt: skip
        row["cache_matches_no_cache"] = same_tokens
        row["ltm_ops_per_decoding_step"] = ops_per_decoding_step(ltm, prompt, latents=z)
        row["llama_ops_per_decoding_step"] = ops_per_decoding_step(llama, prompt)
        for clock, fit_rounds, rounds, no_cache_rounds in (
            ("cpu", fit_cpu, cpu, no_cache_cpu),
            ("wall", fit_wall, wall, no_cache_wall),
        ):
            fit_s, times, no_cache_s = median_times(fit_rounds), median_times(rounds), median_times(no_cache_rounds)
            row[f"{clock}_posterior_fit_s"] = fit_s["fit"]
            row[f"{clock}_ltm_cache_tok_s"] = tokens / times["ltm"]
            row[f"{clock}_ltm_no_cache_tok_s"] = tokens / no_cache_s["ltm"]
            row[f"{clock}_llama_tok_s"] = tokens / times["llama"]
            ratios = round_ratios(rounds, "llama", "ltm")
            row[f"{clock}_ltm_vs_llama"] = statistics.median(ratios)
            row[f"{clock}_ltm_vs_llama_rounds"] = ratios
            row[f"{clock}_cache_speedup"] = no_cache_s["ltm"] / times["ltm"]
            row[f"{clock}_llama_no_cache_tok_s"] = tokens / no_cache_s["llama"]
            row[f"{clock}_llama_cache_speedup"] = no_cache_s["llama"] / times["llama"]
        results.append(row)
        print(json.dumps(row), flush=True)
    load_after = os.getloadavg()

    params = {
        "ltm": sum(p.numel() for p in ltm.parameters()),
        "llama": sum(p.numel() for p in llama.parameters()),
    }
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "device": str(device),
        "dtype": args.dtype,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "parameters": params,
        "args": portable(vars(args)),
    }
    print()
    print(
        f"hidden {args.hidden_size}, {args.num_layers} layers, {args.num_heads} heads, vocab {args.vocab_size}, "
        f"prompt {args.prompt_length} tokens, {args.new_tokens} new tokens (greedy), LTM {params['ltm'] / 1e6:.2f}M / "
        f"Llama {params['llama'] / 1e6:.2f}M parameters; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {meta['machine']}; load average before {load_before[0]:.2f}, after "
        f"{load_after[0]:.2f}"
    )
    print()
    print(
        "| batch | clock | LTM + cache (tok/s) | LTM, no cache (tok/s) | Llama + cache (tok/s) | LTM / Llama "
        "| LTM cache speed-up | Llama, no cache (tok/s) | Llama cache speed-up | posterior fit on the prompt (s) "
        "| ATen ops per decoding step, LTM / Llama | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        for clock in ("cpu", "wall"):
            print(
                f"| {row['batch_size']} | {clock} | {row[f'{clock}_ltm_cache_tok_s']:.1f} | "
                f"{row[f'{clock}_ltm_no_cache_tok_s']:.1f} | {row[f'{clock}_llama_tok_s']:.1f} | "
                f"{row[f'{clock}_ltm_vs_llama']:.2f}x | {row[f'{clock}_cache_speedup']:.1f}x | "
                f"{row[f'{clock}_llama_no_cache_tok_s']:.1f} | {row[f'{clock}_llama_cache_speedup']:.1f}x | "
                f"{row[f'{clock}_posterior_fit_s']:.2f} ({row['num_inference_steps']} steps) | "
                f"{row['ltm_ops_per_decoding_step']} / {row['llama_ops_per_decoding_step']} | "
                f"{row['load_average_1min']:.1f} |"
            )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What `torch.compile` gains on the LTM's hot paths, with a same-size `LlamaForCausalLM` compiled in the same run.

Two paths, each eager and compiled (`torch.compile(model, mode=--mode)`, inductor), models taking turns in each
round, median of `--repeats` rounds after the compilation (whose time is reported on its own):

- fast step: one step of the evaluation fit's inner loop as `modeling_ltm.inference` runs it: the batch's
  latent-independent prefix computed once (`model.model.compute_prefix`), then `negative_elbo` on it and
  `torch.autograd.grad` with respect to `(mu, logvar)` (no weight gradient). Peer: Llama's forward + backward with
  `labels` (weight gradients; it has no latents), eager and compiled alike.
- cached decoding: `--new-tokens` one-token steps (greedy) after a `--prompt-length` prompt, batch 1 and 8, on the
  self-attention cache and the latents' cross-attention cache; the compiled forward takes `dynamic=True` (the cache
  grows every step). Peer: Llama with its `DynamicCache`, the same loop.

    .venv/bin/python bench/compile.py                                  # CPU, hidden 256, 4 layers, vocab 8192
    .venv/bin/python bench/compile.py --device cuda --dtype bf16 --mode reduce-overhead   # CUDA graphs on a GPU

`tests/test_modeling.py::test_forward_compiles_without_graph_breaks` asserts that these forwards trace as one graph
(`fullgraph=True`); this script measures what that buys.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.common import add_device_arguments, load_bench, resolve_device, run_metadata, save_json, synchronize  # noqa: E402
from modeling_ltm.inference import negative_elbo, next_token_targets  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--n-latents-per-layer", type=int, default=8)
    p.add_argument("--fit-batch", type=int, default=8, help="sequences in the fast-step batch")
    p.add_argument("--seq-length", type=int, default=128, help="tokens per sequence in the fast-step batch")
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="decoding batch sizes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mode", default="default", help="torch.compile mode (e.g. reduce-overhead on a GPU)")
    add_device_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.max_position_embeddings = max(args.seq_length, args.prompt_length + args.new_tokens)
    args.num_inference_steps = 1
    return args


def median_seconds(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Median wall time of each callable, the callables taking turns within each round."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def first_call_seconds(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def fast_step_fns(ltm, llama, args, dtype):
    """`{name: callable}` running one fast step of the LTM (eager/compiled) and one forward+backward of Llama."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, args.vocab_size, (args.fit_batch, args.seq_length), generator=generator)
    input_ids = input_ids.to(args.device)
    targets = next_token_targets(input_ids, None)
    shape = (args.fit_batch, *ltm.config.latent_shape)
    mu = torch.zeros(shape, device=args.device, requires_grad=True)
    logvar = torch.zeros(shape, device=args.device, requires_grad=True)
    noise = torch.randn(shape, generator=generator).to(args.device)
    autocast = torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        prefix = ltm.model.compute_prefix(input_ids)
    compiled_ltm = torch.compile(ltm, mode=args.mode)
    compiled_llama = torch.compile(llama, mode=args.mode)

    def ltm_step(model):
        with autocast:
            loss, *_ = negative_elbo(model, input_ids, targets, mu, logvar, noise, prefix=prefix)
        return torch.autograd.grad(loss, [mu, logvar])

    def llama_step(model):
        llama.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()

    return {
        "ltm eager": lambda: ltm_step(ltm),
        "ltm compiled": lambda: ltm_step(compiled_ltm),
        "llama eager": lambda: llama_step(llama),
        "llama compiled": lambda: llama_step(compiled_llama),
    }


def decode_fns(ltm, llama, args, batch_size, dtype):
    """`{name: callable}` decoding `args.new_tokens` greedy tokens one step at a time after a cached prompt."""
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab_size, (batch_size, args.prompt_length), generator=generator).to(args.device)
    latents = torch.randn(batch_size, *ltm.config.latent_shape, generator=generator).to(args.device)
    compiled = {
        "ltm": torch.compile(ltm, mode=args.mode, dynamic=True),
        "llama": torch.compile(llama, mode=args.mode, dynamic=True),
    }
    autocast = torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)

    def decode(name, model):
        extra = {"latents": latents} if name == "ltm" else {}
        with torch.inference_mode(), autocast:
            out = (ltm if name == "ltm" else llama)(prompt, use_cache=True, **extra)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            for step in range(args.new_tokens):
                positions = torch.full((batch_size, 1), args.prompt_length + step, device=args.device)
                out = model(input_ids=token, position_ids=positions, use_cache=True, cache=cache)
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        return token

    fns = {}
    for name, module in (("ltm", ltm), ("llama", llama)):
        fns[f"{name} eager"] = lambda n=name, m=module: decode(n, m)
        fns[f"{name} compiled"] = lambda n=name: decode(n, compiled[n])
    return fns


def measure(fns: dict, args) -> dict:
    """Compilation (first call) seconds of the compiled callables, then the medians of all."""
    compile_seconds = {name: first_call_seconds(fn, args.device) for name, fn in fns.items() if "compiled" in name}
    for name, fn in fns.items():  # a second warm-up call each (allocator, recompilation for dynamic shapes)
        if "compiled" not in name:
            fn()
        fn()
    seconds = median_seconds(fns, args.repeats, args.device)
    return {"seconds": seconds, "compile_seconds": compile_seconds}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _, dtype = resolve_device(args.device, args.dtype)
    ltm, llama = load_bench("generate").build_models(args)  # same shapes, same peer
    ltm, llama = ltm.to(args.device), llama.to(args.device)
    started, load_before = time.time(), os.getloadavg()
    results = {"fast step": measure(fast_step_fns(ltm, llama, args, dtype), args)}
    for batch_size in args.batch_sizes:
        results[f"decode, batch {batch_size}"] = measure(decode_fns(ltm, llama, args, batch_size, dtype), args)

    lines = [
        "| path | LTM eager (ms) | LTM compiled (ms) | LTM gain | Llama eager (ms) | Llama compiled (ms) | Llama gain "
        "| compile time LTM / Llama (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path, result in results.items():
        s, c = result["seconds"], result["compile_seconds"]
        per = 1 if path == "fast step" else args.new_tokens  # decode: per token step
        ms = {name: 1000 * value / per for name, value in s.items()}
        lines.append(
            f"| {path}{'' if path == 'fast step' else ' (per token)'} | {ms['ltm eager']:.2f} | "
            f"{ms['ltm compiled']:.2f} | {s['ltm eager'] / s['ltm compiled']:.2f}x | {ms['llama eager']:.2f} | "
            f"{ms['llama compiled']:.2f} | {s['llama eager'] / s['llama compiled']:.2f}x | "
            f"{c['ltm compiled']:.1f} / {c['llama compiled']:.1f} |"
        )
    meta = run_metadata("compile.py", argv, args, load_before, started)
    meta.update(
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        threads=torch.get_num_threads(),
    )
    print("\n".join(lines))
    print(json.dumps(meta))
    save_json(args.json, {"results": results, "meta": meta})
    return 0


if __name__ == "__main__":
    sys.exit(main())

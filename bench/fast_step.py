"""Cost of one fast (posterior) step vs a full forward+backward, for one batch, measured in one run.

Four measurements on the same batch, interleaved round-robin (so a change of machine load hits them all alike), each
the median wall time of `--repeats` runs after `--warmup` runs:

- fast step: the real code path of `fit_posterior`'s inner loop: `inference.negative_elbo` at
  `z = mu + exp(logvar / 2) * eps`, `torch.autograd.grad(loss, [mu, logvar])`, one Adam step on `(mu, logvar)`.
  No weight gradient is computed.
- full step: `model(input_ids, latents=z, labels=input_ids).loss.backward()` with every weight requiring grad (what
  the decoder's slow update costs, without the optimizer).
- reference-style fast step: as the paper's public code does it: the same ELBO loss, but `loss.backward()` with the
  decoder weights still requiring grad (weight gradients computed and accumulated), then the Adam step.
- peer: `LlamaForCausalLM` of the same size (hidden, MLP width, layers, heads, vocabulary, tied embeddings), full
  forward+backward with `labels`.

    .venv/bin/python bench/fast_step.py                              # hidden 256, 4 layers, vocab 8192, 8 x 256
    .venv/bin/python bench/fast_step.py --batch-size 4 --seq-length 128 --json runs/bench_fast_step.json
    .venv/bin/python bench/fast_step.py --memory                     # + peak RSS, one subprocess per measurement

Targets (ARCHITECTURE.md section 4): fast / full <= 0.8 and reference / fast >= 1.25.

`--memory` runs each measurement alone in a fresh subprocess (build the models, run the measured step 3 times) and
reports that process's peak resident set size (`VmHWM` on Linux, else `ru_maxrss`): whole-process memory,
interpreter, torch and every model built included, so compare the rows with each other, not with parameter sizes.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaForCausalLM


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_device_arguments, resolve_device, synchronize  # noqa: E402
from modeling_ltm import LTMConfig, LTMForCausalLM  # noqa: E402
from modeling_ltm.inference import negative_elbo, next_token_targets  # noqa: E402
from modeling_ltm.tooling.train_cli import llama_peer_config  # noqa: E402


MEASUREMENTS = ("fast", "full", "reference", "llama")
LABELS = {
    "fast": "LTM fast step (autograd.grad w.r.t. mu, logvar + Adam)",
    "full": "LTM full forward+backward (weight grads)",
    "reference": "LTM reference-style fast step (loss.backward(), weights require grad)",
    "llama": "LlamaForCausalLM full forward+backward (peer)",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=None, help="default: --num-heads")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--n-latents-per-layer", type=int, default=8)
    parser.add_argument("--latent-dim", type=int, default=None, help="default: --hidden-size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS, one subprocess each")
    parser.add_argument("--only", choices=MEASUREMENTS, default=None, help=argparse.SUPPRESS)  # --memory's child
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_device_arguments(parser)  # bf16: every step under bf16 autocast (mixed precision, fp32 weights)
    return parser.parse_args(argv)


def build(args):
    """The LTM, its same-size Llama peer, and one batch (token ids, posterior parameters, noise)."""
    ltm_config = LTMConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.seq_length,
        n_latents_per_layer=args.n_latents_per_layer,
        latent_dim=args.latent_dim,
    )
    llama_config = llama_peer_config(ltm_config)
    torch.manual_seed(0)
    device, _ = resolve_device(args.device, args.dtype)
    ltm = LTMForCausalLM(ltm_config).train().to(device)  # dropout is 0: train mode only matters for flags
    llama = LlamaForCausalLM(llama_config).train().to(device)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_length), generator=generator)
    shape = (args.batch_size, *ltm_config.latent_shape)
    batch = {
        "input_ids": input_ids.to(device),
        "targets": next_token_targets(input_ids, None).to(device),
        "mu": (0.1 * torch.randn(shape, generator=generator)).to(device).requires_grad_(True),
        "logvar": (-5.0 + 0.1 * torch.randn(shape, generator=generator)).to(device).requires_grad_(True),
        "noise": torch.randn(shape, generator=generator).to(device),
    }
    return ltm, llama, batch


def make_steps(ltm, llama, batch, dtype=torch.float32):
    """One callable per measurement; each runs exactly one step on the batch (forwards under bf16 autocast when
    `dtype` is bf16)."""
    mu, logvar, noise = batch["mu"], batch["logvar"], batch["noise"]
    input_ids, targets = batch["input_ids"], batch["targets"]
    fast_optimizer = torch.optim.Adam([mu, logvar], lr=1e-3)  # tiny lr: the batch stays where it was
    reference_optimizer = torch.optim.Adam([mu, logvar], lr=1e-3)

    def autocast():
        return torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def fast():
        with autocast():
            loss, *_ = negative_elbo(ltm, input_ids, targets, mu, logvar, noise)
        mu.grad, logvar.grad = torch.autograd.grad(loss, [mu, logvar])
        fast_optimizer.step()

    def full():
        ltm.zero_grad(set_to_none=True)
        z = (mu + torch.exp(0.5 * logvar) * noise).detach()
        with autocast():
            loss = ltm(input_ids, latents=z, labels=input_ids, use_cache=False).loss
        loss.backward()

    def reference():
        # As in the paper's code: weight gradients are computed (and accumulated) at every fast step.
        reference_optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss, *_ = negative_elbo(ltm, input_ids, targets, mu, logvar, noise)
        loss.backward()
        reference_optimizer.step()

    def peer():
        llama.zero_grad(set_to_none=True)
        with autocast():
            loss = llama(input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()

    return {"fast": fast, "full": full, "reference": reference, "llama": peer}


def time_steps(steps, warmup: int, repeats: int, device="cpu") -> dict[str, list[float]]:
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():  # round-robin: load drift hits every measurement alike
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB.

    Linux: `VmHWM` of /proc/self/status (`ru_maxrss` would not do: Linux carries it across `execve`, so a child
    would report its parent's peak). Elsewhere: `ru_maxrss` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def measure_memory(argv) -> dict[str, float]:
    """Peak RSS of a fresh process that builds the models and runs one measurement 3 times ("idle": none)."""
    peaks = {}
    for name in ("idle", *MEASUREMENTS):
        child = [a for a in argv if a not in ("--memory",)]
        # Later flags win: 3 runs of the measurement, or none at all for "idle".
        only, runs = ("fast", "0") if name == "idle" else (name, "3")
        child += ["--only", only, "--warmup", "0", "--repeats", runs]
        out = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True, check=True).stdout
        peaks[name] = json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]
    return peaks


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device, args.dtype)
    ltm, llama, batch = build(args)
    steps = make_steps(ltm, llama, batch, dtype)

    if args.only is not None:  # a --memory child: run one measurement, report this process's peak RSS
        for _ in range(args.warmup + args.repeats):
            steps[args.only]()
        print(json.dumps({"peak_rss_mib": peak_rss_mib()}))
        return 0

    load_before = os.getloadavg()
    times = time_steps(steps, args.warmup, args.repeats, device)
    load_after = os.getloadavg()
    medians = {name: statistics.median(values) for name, values in times.items()}
    results = {
        "config": {k: v for k, v in vars(args).items() if k not in ("only", "json", "memory")},
        "ltm_parameters": count_parameters(ltm),
        "llama_parameters": count_parameters(llama),
        "median_s": medians,
        "min_s": {name: min(values) for name, values in times.items()},
        "ratios": {
            "fast/full": medians["fast"] / medians["full"],
            "reference/fast": medians["reference"] / medians["fast"],
            "full/llama": medians["full"] / medians["llama"],
        },
        # Ratios within each round-robin round, then the median: robust to load that drifts between rounds.
        "paired_ratios": {
            "fast/full": paired_ratio(times, "fast", "full"),
            "reference/fast": paired_ratio(times, "reference", "fast"),
            "full/llama": paired_ratio(times, "full", "llama"),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
    }
    print(
        f"batch {args.batch_size} x {args.seq_length} tokens; LTM {results['ltm_parameters'] / 1e6:.2f}M parameters "
        f"(hidden {args.hidden_size}, {args.num_layers} layers, {ltm.config.n_latents_per_layer} latents x "
        f"{ltm.config.latent_dim} per layer), Llama {results['llama_parameters'] / 1e6:.2f}M; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"median of {args.repeats} after {args.warmup} warm-up"
    )
    print()
    print("| measurement | median (ms) | min (ms) |")
    print("|---|---:|---:|")
    for name in MEASUREMENTS:
        print(f"| {LABELS[name]} | {1e3 * medians[name]:.1f} | {1e3 * results['min_s'][name]:.1f} |")
    print()
    ratios, paired = results["ratios"], results["paired_ratios"]
    print("ratio of medians (median of per-round ratios)")
    print(f"fast / full      = {ratios['fast/full']:.2f} ({paired['fast/full']:.2f})  target <= 0.8")
    print(f"reference / fast = {ratios['reference/fast']:.2f} ({paired['reference/fast']:.2f})  target >= 1.25")
    print(f"full / llama     = {ratios['full/llama']:.2f} ({paired['full/llama']:.2f})  LTM full vs same-size Llama")
    sys.stdout.flush()

    if args.memory:
        results["peak_rss_mib"] = peaks = measure_memory(argv)
        print()
        print("| process (fresh, builds both models, runs 3 steps of ...) | peak RSS (MiB) |")
        print("|---|---:|")
        print(f"| nothing (baseline) | {peaks['idle']:.0f} |")
        for name in MEASUREMENTS:
            print(f"| {LABELS[name]} | {peaks[name]:.0f} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

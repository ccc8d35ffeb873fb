"""Training throughput of an LTM preset against a Llama of equal size: tokens/s, peak memory and MFU, one run.

Both models train through transformers' `Trainer` on the same random token blocks with the same optimizer settings:
the LTM with `LTMTrainer` (per micro-batch: `T` fast steps fitting the posterior, then one decoder step), the peer
`LlamaForCausalLM` (built by `train_cli.llama_peer_config`: same vocabulary, width, depth, heads, MLP) with plain
`Trainer`. The first `--warmup-steps` optimizer steps are not timed.

    .venv/bin/python bench/train_throughput.py --device cuda --dtype bf16                  # LTM-S, 8 x 1024 tokens
    .venv/bin/python bench/train_throughput.py --device cuda --dtype bf16 --compile        # both models compiled
    .venv/bin/python bench/train_throughput.py --seq-length 128 --batch-size 4 --steps 4   # a CPU smoke run

`--compile` sets `TrainingArguments(torch_compile=True)` for both models: Trainer compiles the wrapped forward (for
the LTM, the decoder's slow step; its fast loop runs on the bare module, replayed from CUDA graphs on a GPU).
`--profile FILE` also profiles one timed LTM step with `torch.profiler` and writes the kernel counts, CPU and CUDA
totals and the top kernels by CUDA time to FILE (JSON).

Figures:
- `tokens_per_second`: training tokens per second of wall time over the timed optimizer steps.
- `peak_memory_mib`: CUDA `max_memory_allocated` on a GPU; on CPU, the process's peak RSS (whole process).
- `model_tflops_per_second` and `mfu`: model FLOPs per token, `2 N` for a forward and `4 N` for a backward, with `N` the
  parameters that take part in matrix products (the tied embedding counted once, as the LM head). Llama: `6 N`.
  LTM: `6 N` for the decoder step plus `T x 4 N` for the fast steps (forward, and a backward with respect to the
  activations only: no weight gradients) plus `2 N` for scoring the fitted posterior. Attention's sequence-length
  term is left out of both. `mfu` needs `--peak-tflops` (the device's dense peak at `--dtype`, e.g. 989 for an H100
  SXM in bf16); it is left out otherwise.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.common import add_device_arguments, portable, precision_arguments  # noqa: E402
from modeling_ltm import LTMConfig, LTMForCausalLM, LTMTrainer, LTMTrainingArguments  # noqa: E402
from modeling_ltm.tooling.train_cli import llama_peer_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=str(REPO_ROOT / "configuration" / "ltm-s.json"))
    add_device_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=None, help="default: the preset's context")
    parser.add_argument("--num-inference-steps", type=int, default=None, help="fast steps T; default: the preset's")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per model")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (dense, at --dtype)")
    parser.add_argument("--models", default="llama,ltm")
    parser.add_argument("--compile", action="store_true", help="torch_compile=True for both models (Trainer)")
    parser.add_argument(
        "--compile-layers",
        action="store_true",
        help="also compile each LTM decoder layer in place (`layer.compile()`), which the fast loop runs too",
    )
    parser.add_argument("--profile", default=None, help="profile one LTM step; write the summary to this JSON file")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def matmul_parameters(model) -> int:
    """Parameters in matrix products per token: every weight of 2+ dimensions, the tied embedding once."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.dim() >= 2 and id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


def flops_per_token(model, fast_steps: int | None) -> float:
    """Model FLOPs per training token (see the module docstring); `fast_steps=None` for an autoregressive model."""
    n = matmul_parameters(model)
    if fast_steps is None:
        return 6.0 * n
    return 6.0 * n + fast_steps * 4.0 * n + 2.0 * n


class StepProfiler(TrainerCallback):
    """Profiles optimizer step `step` (CPU and CUDA activity) and writes a summary: kernel launches, total CPU and CUDA
    time, and the 25 kernels with the most CUDA time."""

    def __init__(self, step: int, path: str):
        self.step, self.path, self.profiler = step, path, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        events = self.profiler.key_averages()
        kernels = [e for e in events if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)]
        device_time = lambda e: getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))  # noqa: E731
        top = sorted(kernels, key=device_time, reverse=True)[:25]
        summary = {
            "kernel_launches": int(sum(e.count for e in kernels)),
            "cuda_time_ms": sum(device_time(e) for e in kernels) / 1e3,
            "cpu_time_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
            "top_kernels": [{"name": e.key[:120], "calls": e.count, "cuda_ms": device_time(e) / 1e3} for e in top],
            "top_cpu_ops": [
                {"name": e.key[:80], "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
            ],
        }
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).write_text(json.dumps(summary, indent=1))
        print(f"profile of step {self.step}: {summary['kernel_launches']} kernels, CUDA {summary['cuda_time_ms']:.1f} "
              f"ms, CPU {summary['cpu_time_ms']:.1f} ms; top: " + "; ".join(
                  f"{k['name'][:50]} {k['cuda_ms']:.1f}ms" for k in summary["top_kernels"][:6]), flush=True)  # fmt: skip
        self.profiler = None


class StepTimer(TrainerCallback):
    """Wall-clock time of each optimizer step (synchronising CUDA so queued kernels are counted)."""

    def __init__(self):
        self.times = []

    def _now(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(self._now() - self._start)


def peak_memory_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    return float("nan")


def run_model(name: str, config: LTMConfig, args, blocks: Dataset, workdir: Path) -> dict:
    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    common = dict(
        output_dir=str(workdir / name),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup_steps + args.steps,
        learning_rate=4e-4,
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=1.0,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        dataloader_pin_memory=args.device.startswith("cuda"),
        seed=0,
        torch_compile=args.compile,
        **precision_arguments(args.device, args.dtype),
    )
    timer = StepTimer()
    callbacks = [timer]
    if name == "ltm" and args.profile:
        callbacks.append(StepProfiler(args.warmup_steps + 1, args.profile))
    if name == "ltm":
        model = LTMForCausalLM(config)
        if args.compile_layers:
            for layer in model.model.layers:
                layer.compile()
        fast_steps = config.num_inference_steps if args.num_inference_steps is None else args.num_inference_steps
        training_args = LTMTrainingArguments(**common, num_inference_steps=fast_steps)
        trainer = LTMTrainer(model=model, args=training_args, train_dataset=blocks, callbacks=callbacks)
    else:
        model = LlamaForCausalLM(llama_peer_config(config))
        fast_steps = None
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=blocks, callbacks=[timer])
    trainer.train()
    timed = timer.times[args.warmup_steps :]
    tokens = args.batch_size * blocks[0]["input_ids"].__len__() * len(timed)
    seconds = sum(timed)
    tflops = flops_per_token(model, fast_steps) * tokens / seconds / 1e12
    result = {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "matmul_parameters": matmul_parameters(model),
        "fast_steps": fast_steps,
        "timed_steps": len(timed),
        "tokens_per_second": tokens / seconds,
        "step_seconds_median": sorted(timed)[len(timed) // 2],
        "peak_memory_mib": peak_memory_mib(args.device),
        "model_tflops_per_second": tflops,
        "compiled": args.compile,
        "compiled_layers": bool(args.compile_layers and name == "ltm"),
        "cuda_graphs": os.environ.get("LTM_CUDA_GRAPHS", "1") != "0",
        "token_nll": os.environ.get("LTM_TOKEN_NLL", "auto"),
    }
    if args.peak_tflops:
        result["mfu"] = tflops / args.peak_tflops
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    config = LTMConfig.from_json_file(args.preset)
    if args.seq_length is not None:
        config.max_position_embeddings = args.seq_length
        if config.sliding_window is not None:
            config.sliding_window = min(config.sliding_window, args.seq_length)
    seq_length = config.max_position_embeddings
    generator = torch.Generator().manual_seed(0)
    num_blocks = args.batch_size * (args.warmup_steps + args.steps)
    ids = torch.randint(0, config.vocab_size, (num_blocks, seq_length), generator=generator)
    blocks = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")
    workdir = REPO_ROOT / "runs" / "bench-train-throughput"
    results = [run_model(name, config, args, blocks, workdir) for name in args.models.split(",")]
    meta = {
        "command": portable("python bench/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)),
        "args": portable(vars(args)),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokens_per_step": args.batch_size * seq_length,
    }
    report = {"meta": meta, "results": results}
    for row in results:
        mfu = f", MFU {row['mfu']:.1%}" if "mfu" in row else ""
        print(
            f"{row['model']:>5}: {row['tokens_per_second']:,.0f} tokens/s, peak {row['peak_memory_mib']:,.0f} MiB, "
            f"{row['model_tflops_per_second']:.3f} model TFLOP/s{mfu} ({row['parameters']:,} parameters)"
        )
    by_name = {row["model"]: row for row in results}
    if {"ltm", "llama"} <= by_name.keys():
        print(f"ltm/llama tokens/s: {by_name['ltm']['tokens_per_second'] / by_name['llama']['tokens_per_second']:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

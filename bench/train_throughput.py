"""Training throughput of an LTM preset against a Llama of equal size: tokens/s, peak memory and MFU, one run.

Both models train through transformers' `Trainer` on the same random token blocks with the same optimizer settings:
the LTM with `LTMTrainer` (per micro-batch: `T` fast steps fitting the posterior, then one decoder step), the peer
`LlamaForCausalLM` (built by `train_cli.llama_peer_config`: same vocabulary, width, depth, heads, MLP) with plain
`Trainer`. The first `--warmup-steps` optimizer steps are not timed.

    .venv/bin/python bench/train_throughput.py --device cuda --dtype bf16                  # LTM-S, 8 x 1024 tokens
    .venv/bin/python bench/train_throughput.py --seq-length 128 --batch-size 4 --steps 4   # a CPU smoke run

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

from bench.common import add_device_arguments, precision_arguments  # noqa: E402
from modeling_ltm import LTMConfig, LTMForCausalLM, LTMTrainer, LTMTrainingArguments  # noqa: E402
from modeling_ltm.train_cli import llama_peer_config  # noqa: E402


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
        **precision_arguments(args.device, args.dtype),
    )
    timer = StepTimer()
    if name == "ltm":
        model = LTMForCausalLM(config)
        fast_steps = config.num_inference_steps if args.num_inference_steps is None else args.num_inference_steps
        training_args = LTMTrainingArguments(**common, num_inference_steps=fast_steps)
        trainer = LTMTrainer(model=model, args=training_args, train_dataset=blocks, callbacks=[timer])
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
        "command": "python bench/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
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

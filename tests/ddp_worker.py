"""Train a tiny LTM with LTMTrainer for a few steps; run by tests/test_ddp.py under `torchrun --nproc_per_node 2`
(gloo, CPU) and imported by it for the single-process reference run.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUTPUT_DIR --per-device-batch 2 --accumulation 2

Each rank writes its final decoder weights to `OUTPUT_DIR/rank{rank}.pt`; rank 0 also writes `log_history.json`.
With `--evaluate`, no training: `LTMTrainer.evaluate` on held-out blocks, each rank writing its metrics to
`OUTPUT_DIR/eval_rank{rank}.json` (`run_evaluation`, also the single-process reference).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import corpus_text, tiny_config  # noqa: E402
from datasets import Dataset  # noqa: E402

from modeling_ltm import LTMForCausalLM, LTMTrainer, LTMTrainingArguments  # noqa: E402


BLOCK_SIZE, NUM_BLOCKS = 32, 48


def run_training(
    output_dir: str, per_device_batch: int, accumulation: int, max_steps: int = 3, posterior_encoder: str = "none"
) -> LTMTrainer:
    """Same model, data order and seeds whatever the process layout: only the split of the global batch changes.
    `posterior_encoder`: "none"; "warm-start", an encoder that starts the fast loop and trains alongside the decoder;
    "idle", an encoder that this run does not train."""
    text_bytes = corpus_text(BLOCK_SIZE * NUM_BLOCKS).encode()[: BLOCK_SIZE * NUM_BLOCKS]
    ids = torch.tensor(list(text_bytes)).view(NUM_BLOCKS, BLOCK_SIZE)
    torch.manual_seed(0)
    model = LTMForCausalLM(
        tiny_config(vocab_size=256, posterior_encoder_size=0 if posterior_encoder == "none" else 32)
    )
    on_gpu = os.environ.get("LTM_WORKER_DEVICE", "cpu") == "cuda"  # tests/test_cuda.py: a 1-process NCCL launch
    distributed = "WORLD_SIZE" in os.environ
    args = LTMTrainingArguments(
        output_dir=output_dir,
        use_cpu=not on_gpu,
        # gloo only when launched as several processes: a backend without a process group breaks a plain run.
        ddp_backend=("nccl" if on_gpu else "gloo") if distributed else None,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        # Plain SGD without clipping: the weights then show any error in the gradient's scale (Adam would hide it).
        optim="sgd",
        learning_rate=0.1,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        seed=0,
        num_inference_steps=2,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        train_sampling_strategy="sequential",
        posterior_warm_start=posterior_encoder == "warm-start",
    )
    trainer = LTMTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids.tolist()}))
    trainer.train()
    return trainer


EVAL_BLOCKS = 7  # odd: with 2 processes x 2 rows the last global batch is padded, and gather_for_metrics drops it


def run_evaluation(output_dir: str, per_device_batch: int) -> dict:
    """`LTMTrainer.evaluate` of a fixed model (z-sensitive: init 0.2) on `EVAL_BLOCKS` held-out blocks, with the
    importance-weighted bound and the reconstruction on; the same numbers whatever the process layout."""
    text_bytes = corpus_text(BLOCK_SIZE * EVAL_BLOCKS).encode()[: BLOCK_SIZE * EVAL_BLOCKS]
    ids = torch.tensor(list(text_bytes)).view(EVAL_BLOCKS, BLOCK_SIZE)
    torch.manual_seed(0)
    model = LTMForCausalLM(tiny_config(vocab_size=256, initializer_range=0.2))
    args = LTMTrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        per_device_eval_batch_size=per_device_batch,
        eval_inference_steps=4,
        eval_iw_samples=2,
        eval_reconstruction=True,
    )
    trainer = LTMTrainer(model=model, args=args, eval_dataset=Dataset.from_dict({"input_ids": ids.tolist()}))
    metrics = trainer.evaluate()
    trainer.accelerator.wait_for_everyone()
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--posterior-encoder", choices=["none", "warm-start", "idle"], default="none")
    parser.add_argument("--evaluate", action="store_true", help="evaluate only (run_evaluation), no training")
    cli = parser.parse_args()
    if cli.evaluate:
        metrics = run_evaluation(cli.output_dir, cli.per_device_batch)
        rank = int(os.environ.get("RANK", 0))
        Path(cli.output_dir, f"eval_rank{rank}.json").write_text(json.dumps(metrics))
        return
    trainer = run_training(
        cli.output_dir, cli.per_device_batch, cli.accumulation, cli.max_steps, cli.posterior_encoder
    )
    rank = int(os.environ.get("RANK", 0))
    torch.save(trainer.accelerator.unwrap_model(trainer.model).state_dict(), Path(cli.output_dir) / f"rank{rank}.pt")
    if rank == 0:
        (Path(cli.output_dir) / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    # End together, as `ltm train` does: a process that tears down while the other still talks to it over gloo can
    # hang or abort the launch.
    trainer.accelerator.wait_for_everyone()
    trainer.end()


if __name__ == "__main__":
    main()

"""Evaluate a saved LTM on the local tasks with lm-eval model `ltm`; run by tests/test_eval_harness.py under
`torchrun --nproc_per_node 2` (gloo, CPU) and imported by it for the single-process reference run.

    torchrun --standalone --nproc_per_node 2 tests/lmeval_worker.py CHECKPOINT OUTPUT_DIR --metadata '{...}'

Each rank writes `OUTPUT_DIR/rank{rank}.json` (its rank, world size and how many requests of each type it was
given); rank 0 also writes `OUTPUT_DIR/results.json` (lm-eval's results, per-sample responses included).
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval_harness  # noqa: E402
from eval_harness import LTMLM  # noqa: E402


TASKS = ["wikitext2_local", "lambada_local", "arithmetic_local"]


def evaluate_local(checkpoint: str, output_dir: str, metadata: dict, num_inference_steps: int = 2) -> dict | None:
    """lm-eval's `simple_evaluate` on `TASKS` (3 documents each, zero-shot: lm-eval draws few-shot examples from one
    random stream per process, so few-shot prompts depend on the number of processes); returns rank 0's results
    (None on other ranks) after writing the files described in the module docstring."""
    lm = LTMLM(pretrained=checkpoint, num_inference_steps=num_inference_steps, batch_size=2, device="cpu")
    given = Counter()
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(lm, name)

        def counted(requests, *args, _method=method, _name=name, **kwargs):
            given[_name] += len(requests)
            return _method(requests, *args, **kwargs)

        setattr(lm, name, counted)
    task_manager = TaskManager(include_path=str(eval_harness.TASKS_DIR), include_defaults=False, metadata=metadata)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=TASKS, limit=3, num_fewshot=0, task_manager=task_manager, bootstrap_iters=0, log_samples=True
    )
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    summary = {"rank": lm.rank, "world_size": lm.world_size, "requests": dict(given)}
    (output / f"rank{lm.rank}.json").write_text(json.dumps(summary))
    if results is not None:
        (output / "results.json").write_text(json.dumps(results, default=str))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("output_dir")
    parser.add_argument("--metadata", type=json.loads, default={})
    args = parser.parse_args()
    evaluate_local(args.checkpoint, args.output_dir, args.metadata)
    eval_harness.finish_processes()

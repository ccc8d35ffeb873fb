"""lm-evaluation-harness integration for Latent-Thought LMs: model `ltm`, local tasks, an `evaluate` metric.

`import eval_harness` registers the lm-eval model name "ltm" (`LTMLM`, a subclass of lm-eval's `HFLM`), after which
`lm_eval.simple_evaluate(model="ltm", model_args={"pretrained": path}, tasks=[...])` works. The command line is
`python -m eval_harness ...` or `ltm eval ...` (lm-eval's own flags). Local tasks live in `TASKS_DIR`
(`--include_path eval_harness/tasks`).
"""

from pathlib import Path

from .lm import LTMLM, MODEL_ARGS, content_seed, finish_processes


TASKS_DIR = Path(__file__).resolve().parent / "tasks"
METRICS_DIR = Path(__file__).resolve().parent / "metrics"

__all__ = ["LTMLM", "MODEL_ARGS", "METRICS_DIR", "TASKS_DIR", "content_seed", "finish_processes"]

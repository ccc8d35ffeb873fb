"""A user's clone stands on its own (issue 30, item 1).

The repository's files (`git ls-files --cached --others --exclude-standard`: what a clone holds, plus files not yet
committed) are copied to a temporary folder with no `../shared` beside it, and run there in fresh processes, offline
(`HF_HUB_OFFLINE=1`, `HF_DATASETS_OFFLINE=1`, no package index, empty caches): `ltm eval` on every packaged task
without `--include_path`, on data this test makes and names through the documented variable / `--metadata` key; the
one-line error naming them when the default data cannot be had offline; `bench/quality.py --help`, a tiny run of it
on data named by `--dataset` / `--wikitext`, and its one-line error offline without data; `ltm export` and the
exported card's own usage code.
"""

import json
import re
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, corpus_text, small_tokenizer, tiny_config

from modeling_ltm import LTMForCausalLM


pytestmark = pytest.mark.slow  # ~1 min on 2 cores: several fresh interpreters that import torch and lm-eval

WIKITEXT_SAMPLE = """ = Robert Boulter = 
 Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role in 2000 .
 = = Career = = 
 In 2006 , Boulter starred alongside Whishaw in the play Citizenship .
 = Du Fu = 
 Du Fu was a prominent Chinese poet of the Tang dynasty .
"""  # noqa: W291  (WikiText-2's raw headings keep their trailing space)
LAMBADA_ITEMS = [
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. JULIET: Romeo",
    "HAMLET: To be, or not to be, that is the question: whether tis nobler in the mind to suffer, or to be",
]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository's files copied to `<tmp>/clone`, whose parent holds nothing else (no `shared`)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    root = tmp_path_factory.mktemp("users-clone") / "clone"
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not part of the clone
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    assert sorted(path.name for path in root.parent.iterdir()) == ["clone"]
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The user's own folder: the model, the data files, outputs and empty caches (outside the clone)."""
    path = tmp_path_factory.mktemp("user")
    tokenizer = small_tokenizer(num_chars=8000, vocab_size=320)
    tokenizer.save_pretrained(path / "model")
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    LTMForCausalLM(config).eval().save_pretrained(path / "model")
    (path / "wiki.test.raw").write_text(WIKITEXT_SAMPLE, encoding="utf-8")
    (path / "items.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA_ITEMS))
    (path / "corpus.txt").write_text(corpus_text(60_000), encoding="utf-8")
    return path


def user_env(clone: Path, work: Path, **extra: str) -> dict:
    """A user's environment: the clone's packages first, offline, fresh caches, none of the suite's overrides."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LTM_", "HF_", "PIP_", "XDG_CACHE")) and key not in ("PYTHONPATH", "TRANSFORMERS_CACHE")
    }
    env.update(
        PYTHONPATH=str(clone),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(work / "hf-home"),  # nothing of the Hub or `datasets` cached
        LTM_HF_CACHE=str(work / "ltm-cache"),  # the embedded corpus not cached
        PIP_NO_INDEX="1",  # ... and not downloadable
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def ltm_eval(clone: Path, work: Path, tasks: str, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "modeling_ltm.tooling.cli", "eval",
        "--model", "ltm",
        "--model_args", f"pretrained={work / 'model'},num_inference_steps=2",
        "--tasks", tasks,
        "--batch_size", "2",
        "--device", "cpu",
        *flags,
    ]  # fmt: skip


def assert_one_line_error(completed: subprocess.CompletedProcess, prefix: str, *names: str) -> None:
    assert completed.returncode not in (0, None), completed.stdout[-2000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    errors = [line for line in completed.stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, completed.stderr[-3000:]
    for name in names:
        assert name in errors[0], errors[0]


def test_the_clone_imports_its_own_code(clone, work):
    completed = subprocess.run(
        [sys.executable, "-c", "import modeling_ltm, sys; print(modeling_ltm.__file__)"],
        cwd=work,
        env=user_env(clone, work),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert Path(completed.stdout.strip()).parent == clone / "modeling_ltm"


def test_ltm_eval_runs_every_packaged_task_without_include_path(clone, work):
    output = work / "eval-out"
    command = ltm_eval(
        clone, work, "ltm_local",
        "--metadata", json.dumps({"lambada_path": str(work / "items.jsonl")}),
        "--num_fewshot", "1", "--limit", "2", "--output_path", str(output),
    )  # fmt: skip
    env = user_env(clone, work, LTM_EVAL_WIKITEXT=str(work / "wiki.test.raw"))
    completed = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (result_file,) = output.rglob("results_*.json")
    results = json.loads(result_file.read_text())["results"]
    expected = {
        "wikitext2_local": {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"},
        "lambada_local": {"perplexity,none", "acc,none"},
        "arithmetic_local": {"exact_match,first-integer"},
    }
    for task, metrics in expected.items():
        values = {key: value for key, value in results[task].items() if key in metrics}
        assert set(values) == metrics, results[task]
        assert all(math.isfinite(value) for value in values.values()), values
    assert results["wikitext2_local"]["sample_len"] == 2  # the two articles of the test's own file
    assert results["lambada_local"]["sample_len"] == len(LAMBADA_ITEMS)


def test_without_data_offline_each_command_names_its_flag_in_one_line(clone, work):
    """Offline with nothing cached and no local file: one line naming the variable / flag that supplies one."""
    env = user_env(clone, work)
    runs = {
        "wikitext": ltm_eval(clone, work, "wikitext2_local", "--limit", "1"),
        "lambada": ltm_eval(clone, work, "lambada_local", "--limit", "1"),
        "quality": [sys.executable, "bench/quality.py", "--models", "ltm_T2", "--workdir", str(work / "q-none")],
    }
    processes = {
        name: subprocess.Popen(
            command, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # two at a time would do on 2 cores; these mostly import and fail
        for name, command in runs.items()
    }
    done = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(runs[name], process.returncode, stdout, stderr)
    assert_one_line_error(done["wikitext"], "ltm eval: error:", "$LTM_EVAL_WIKITEXT", '"wikitext_path"')
    assert_one_line_error(
        done["lambada"], "ltm eval: error:", "$LTM_EVAL_LAMBADA=", "$LTM_EVAL_LAMBADA_SOURCE", '"lambada_path"'
    )
    assert_one_line_error(done["quality"], "bench/quality.py:", "--dataset")


def test_quality_bench_help_and_a_tiny_run_on_named_data(clone, work):
    env = user_env(clone, work)
    shown = subprocess.run(
        [sys.executable, "bench/quality.py", "--help"], cwd=clone, env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "--dataset" in shown.stdout and "--wikitext" in shown.stdout

    out = work / "quality.json"
    command = [
        sys.executable, "bench/quality.py",
        "--dataset", str(work / "corpus.txt"), "--wikitext", str(work / "wiki.test.raw"),
        "--models", "ltm_T2", "--jobs", "1", "--train-tokens", "512", "--block", "32", "--batch", "4", "--vocab", "300",
        "--max-eval-blocks", "2", "--wikitext-blocks", "2", "--eval-fit-steps", "2", "--iw-samples", "2",
        "--eval-select-samples", "0", "--workdir", str(work / "quality-run"), "--out", str(out),
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    saved = json.loads(out.read_text())
    (result,) = saved["results"]
    assert result["model"] == "ltm_T2"
    assert math.isfinite(result["held_out"]["iw_ppl"]) and math.isfinite(result["wikitext"]["iw_ppl"])
    # The recorded command and arguments name no folder of this machine.
    recorded = json.dumps(saved["meta"]["command"]) + json.dumps(saved["meta"]["args"])
    assert str(work) not in recorded and str(clone) not in recorded, recorded
    assert saved["meta"]["args"]["dataset"] == ["corpus.txt"] and saved["meta"]["args"]["img_dir"] == "docs/img"


def test_ltm_export_and_the_cards_own_usage_code_run_from_the_clone(clone, work):
    """`ltm export` from the clone, then the card's Python block as a user copies it (the placeholder repo id replaced
    by the exported folder), in a fresh process without the clone on its path: only the exported remote code."""
    exported = work / "export"
    completed = subprocess.run(
        [sys.executable, "-m", "modeling_ltm.tooling.cli", "export", str(work / "model"), str(exported)],
        cwd=work,
        env=user_env(clone, work),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    card = (exported / "README.md").read_text(encoding="utf-8")
    assert str(work) not in card and str(clone) not in card  # no local path on a card meant for the Hub
    (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    from hub_cards.card import PLACEHOLDER_NOTE, REPO_ID_PLACEHOLDER

    code = code.replace(PLACEHOLDER_NOTE, "").replace(REPO_ID_PLACEHOLDER, str(exported))
    env = user_env(clone, work, HF_MODULES_CACHE=str(work / "modules"))
    env.pop("PYTHONPATH")
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ELBO perplexity bound:" in run.stdout

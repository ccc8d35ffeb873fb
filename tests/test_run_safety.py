"""Issue 21: a finished run is never lost under kills, concurrency and resume; every resource is bounded.

The kill and lock tests run real `ltm train` processes: `LTM_TEST_PAUSE_AT=<moment>` makes one stop at a named moment
of its final save (it says so on stderr), where the test kills it with SIGKILL or runs a second `ltm train` against it.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import small_tokenizer, tiny_config
from safetensors.torch import load_file
from test_faults import assert_one_line_error, error_lines
from test_train_cli import FAST_FLAGS, setup  # noqa: F401  (`setup`: the tiny preset and corpus fixture)
from transformers import AutoTokenizer

from modeling_ltm import LTMForCausalLM
from modeling_ltm.tooling.budgets import MAX_INFERENCE_STEPS, MAX_IW_SAMPLES
from modeling_ltm.tooling.cli import main as ltm_main
from modeling_ltm.tooling.cli_errors import EXIT_CODE
from modeling_ltm.tooling.run_folder import LOCK_NAME, RUN_RECORD_NAME, RunLock, run_id_of
from modeling_ltm.tooling.train_cli import TrainingClockCallback, tokens_per_second


REPO_ROOT = Path(__file__).resolve().parent.parent
SAVE_EVERY_STEP = ["--save_strategy", "steps", "--save_steps", "1", "--sample_max_new_tokens", "0"]


def train_argv(setup, *extra) -> list[str]:
    preset, corpus, tmp_path = setup
    return ["train", "--config", str(preset), "--dataset", str(corpus), "--cache_dir", str(tmp_path / "hf"),
            *FAST_FLAGS, "--eval_iw_samples", "0", *extra]  # fmt: skip


def train(setup, *extra) -> int:
    return ltm_main(train_argv(setup, *extra))


def model_is_consistent(folder: Path) -> int:
    """Config, weights and tokenizer of `folder` agree (the model loads, the embedding has vocab_size rows, the
    tokenizer fits in it); returns the vocabulary size."""
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    embedding = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    assert embedding.shape[0] == config["vocab_size"]
    assert len(AutoTokenizer.from_pretrained(folder)) == config["vocab_size"]
    LTMForCausalLM.from_pretrained(folder)
    return config["vocab_size"]


def tiny_model_folder(folder: Path) -> Path:
    """A saved tiny LTM with a 300-token BPE tokenizer."""
    tokenizer = small_tokenizer(5_000, 300)
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    LTMForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def subprocess_env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}  # fmt: skip


def start_paused_train(argv: list[str], moment: str) -> subprocess.Popen:
    """A real `ltm train` that stops at `moment` of its final save (returns once it has stopped there)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "modeling_ltm.tooling.cli", *argv],
        cwd=REPO_ROOT,
        env=subprocess_env(LTM_TEST_PAUSE_AT=moment),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 240
    for line in process.stderr:
        lines.append(line)
        if line.startswith(f"ltm-test-paused-at {moment}"):
            return process
        if time.monotonic() > deadline:
            break
    process.kill()
    raise AssertionError("the run did not reach the pause:\n" + "".join(lines[-40:]))


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()


# ------------------------------------------------------------------------------------------------ 1. run ids


def test_overwrite_removes_the_older_runs_checkpoints_and_resume_continues_only_this_run(setup, capsys):
    out = setup[2] / "run"
    assert train(setup, "--output_dir", str(out), "--max_steps", "3", *SAVE_EVERY_STEP) == 0
    old_id = run_id_of(out)
    assert old_id and run_id_of(out / "checkpoint-3") == old_id
    capsys.readouterr()

    # A new run over it, with another vocabulary: the older run's checkpoints go, with a notice.
    assert train(setup, "--output_dir", str(out), "--overwrite_output_dir", "--vocab_size", "280",
                 "--max_steps", "2", *SAVE_EVERY_STEP) == 0  # fmt: skip
    assert "removing the 3 checkpoint(s) of the run previously" in capsys.readouterr().err
    new_id = run_id_of(out)
    assert new_id != old_id
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert all(run_id_of(p) == new_id for p in out.glob("checkpoint-*"))

    # A checkpoint of another run dropped into the folder is never resumed: skipped with a warning, refused by name.
    foreign = out / "checkpoint-9"
    shutil.copytree(out / "checkpoint-2", foreign)
    (foreign / RUN_RECORD_NAME).write_text(json.dumps({"run_id": old_id}))
    assert train(setup, "--output_dir", str(out), "--resume_from_checkpoint", str(foreign), "--max_steps", "4",
                 *SAVE_EVERY_STEP) == EXIT_CODE  # fmt: skip
    assert_one_line_error(capsys, "ltm train", "another run", old_id, new_id)
    assert train(setup, "--output_dir", str(out), "--resume_from_checkpoint", "True", "--max_steps", "4",
                 *SAVE_EVERY_STEP) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert f"skipping checkpoint(s) {foreign} of another run" in err
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert model_is_consistent(out) == 280  # this run's vocabulary: the older run was never continued
    assert run_id_of(out / "checkpoint-4") == new_id


# ------------------------------------------------------------------------------------------------ 2 + 3. kills, lock


def test_a_kill_before_the_swap_keeps_the_old_model_and_a_second_writer_is_refused(setup, capsys):
    out = setup[2] / "run"
    assert train(setup, "--output_dir", str(out), "--max_steps", "1", "--sample_max_new_tokens", "0") == 0
    before = (out / "model.safetensors").read_bytes()

    writer = start_paused_train(
        train_argv(setup, "--output_dir", str(out), "--overwrite_output_dir", "--vocab_size", "280"),
        "final-save-staged",
    )
    try:
        # A second `ltm train` into the same folder while the first holds it: one line naming the holder.
        capsys.readouterr()
        assert train(setup, "--output_dir", str(out), "--overwrite_output_dir") == EXIT_CODE
        assert_one_line_error(capsys, "ltm train", "is in use by another `ltm train`", f"pid {writer.pid}", LOCK_NAME)
        assert (out / "model.safetensors").read_bytes() == before
    finally:
        kill(writer)

    # Killed with its new model fully written beside the folder: the folder still holds the old complete model.
    assert (out / "model.safetensors").read_bytes() == before
    assert model_is_consistent(out) == 300
    from modeling_ltm.tooling.generate_cli import main as generate_main

    assert generate_main([str(out), "--prompt", "ROMEO:", "--max-new-tokens", "2"]) == 0
    # The dead writer's lock is taken over with a warning; its leftovers are removed.
    assert (out / LOCK_NAME).exists()
    capsys.readouterr()
    assert train(setup, "--output_dir", str(out), "--overwrite_output_dir", "--vocab_size", "280") == 0
    assert f"pid {writer.pid}" in capsys.readouterr().err
    assert model_is_consistent(out) == 280
    assert not (out / LOCK_NAME).exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".run.")]


def test_a_kill_after_the_swap_leaves_the_new_complete_model(setup):
    out = setup[2] / "run"
    assert train(setup, "--output_dir", str(out), "--max_steps", "1", "--sample_max_new_tokens", "0") == 0
    (out / "notes.txt").write_text("mine")
    writer = start_paused_train(
        train_argv(setup, "--output_dir", str(out), "--overwrite_output_dir", "--vocab_size", "280"),
        "final-save-swapped",
    )
    kill(writer)
    assert model_is_consistent(out) == 280
    assert (out / "notes.txt").read_text() == "mine"  # other files of the folder are kept
    assert json.loads((out / "train_results.json").read_text())["train_tokens"] > 0
    assert not (out / "eval_results.json").exists()  # the older run's evaluation is not attributed to this model


def test_two_processes_cannot_hold_the_lock_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from modeling_ltm.tooling.run_folder import RunLock; "
         f"RunLock({str(folder)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"in use by another `ltm train` \\(pid {holder.pid} on"):
            RunLock(folder).acquire()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with RunLock(folder):
        pass
    assert f"pid {holder.pid}" in capsys.readouterr().err and not (folder / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------ 4. finished runs


def test_resuming_a_finished_run_does_nothing_and_says_so(setup, capsys):
    out = setup[2] / "run"
    assert train(setup, "--output_dir", str(out), "--max_steps", "2", *SAVE_EVERY_STEP) == 0
    weights = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert train(setup, "--output_dir", str(out), "--max_steps", "2", "--resume_from_checkpoint", "True",
                 *SAVE_EVERY_STEP) == 0  # fmt: skip
    assert "already reached step 2 of --max_steps 2: nothing to train" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "model.safetensors").read_bytes() == weights

    # Continuing it one step: the rate counts this session's step and time only.
    assert train(setup, "--output_dir", str(out), "--max_steps", "3", "--resume_from_checkpoint", "True",
                 *SAVE_EVERY_STEP) == 0  # fmt: skip
    results = json.loads((out / "train_results.json").read_text())
    assert results["train_steps_this_session"] == 1 and results["train_tokens"] == 3 * 4 * 32
    rate = results["train_tokens_per_second"]
    assert rate is None or rate < 1e7
    assert "1 of them in this session" in capsys.readouterr().out


def test_no_tokens_per_second_from_zero_time():
    assert tokens_per_second(14_336, 1e-9) is None and tokens_per_second(0, 10.0) is None
    assert tokens_per_second(1000, 2.0) == 500.0
    assert TrainingClockCallback().seconds() == 0.0


# ------------------------------------------------------------------------------------------------ 5. network


class BlackHole:
    """A local server that accepts connections and never answers."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.connections.append(self.server.accept()[0])
            except OSError:
                return

    def close(self):
        for connection in self.connections:
            connection.close()
        self.server.close()


@pytest.fixture
def black_hole():
    hole = BlackHole()
    yield hole
    hole.close()


def hub_env(black_hole) -> dict:
    return subprocess_env(HF_ENDPOINT=black_hole.url, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0",
                          LTM_HUB_TIMEOUT="2", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")  # fmt: skip


@pytest.mark.parametrize("flags", [["--tokenizer", "someone/tokenizer"], ["--dataset", "someone/corpus"]],
                         ids=["tokenizer", "dataset"])  # fmt: skip
def test_a_hub_that_never_answers_ends_the_command_within_the_timeout(setup, black_hole, flags):
    preset, corpus, tmp_path = setup
    argv = ["train", "--config", str(preset), "--dataset", str(corpus), "--output_dir", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "hf"), *flags]  # fmt: skip
    start = time.monotonic()
    completed = subprocess.run([sys.executable, "-m", "modeling_ltm.tooling.cli", *argv], cwd=REPO_ROOT,
                               env=hub_env(black_hole), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert time.monotonic() - start < 60
    assert completed.returncode == EXIT_CODE, completed.stderr[-3000:]
    lines = error_lines(completed.stderr)
    assert len(lines) == 1 and black_hole.url in lines[0] and "LTM_HUB_TIMEOUT" in lines[0], completed.stderr[-3000:]


def test_push_to_a_hub_that_never_answers_names_the_endpoint(black_hole, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from hub_cards import export_for_hub
    from hub_cards.cli import push_main

    exported = export_for_hub(tiny_model_folder(tmp_path / "model"), tmp_path / "hub")
    monkeypatch.setattr(constants, "ENDPOINT", black_hole.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("LTM_HUB_TIMEOUT", "2")
    start = time.monotonic()
    assert push_main([str(exported), "someone/ltm", "--token", "hf_x"]) == EXIT_CODE
    assert time.monotonic() - start < 30
    assert_one_line_error(capsys, "ltm push", black_hole.url)


# ------------------------------------------------------------------------------------------------ 6. budgets


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (
            ["--num_inference_steps", "1000000000"],
            f"--num_inference_steps 1000000000 is outside [0, {MAX_INFERENCE_STEPS:,}]",
        ),
        (["--eval_iw_samples", "100000000"], f"--eval_iw_samples 100000000 is outside [0, {MAX_IW_SAMPLES:,}]"),
        (["--per_device_train_batch_size", "10000000"], "--per_device_train_batch_size 10000000"),
    ],
    ids=["fast-steps", "iw-samples", "batch-size"],
)
def test_train_flags_beyond_their_budget_are_refused_before_any_work(setup, capsys, flags, fragment):
    out = setup[2] / "out"
    assert train(setup, "--output_dir", str(out), *flags) == EXIT_CODE
    assert_one_line_error(capsys, "ltm train", fragment)
    assert not out.exists()


def test_max_train_minutes_stops_inside_one_huge_step(setup, capsys):
    out = setup[2] / "run"
    start = time.monotonic()
    code = train(setup, "--output_dir", str(out), "--num_inference_steps", str(MAX_INFERENCE_STEPS),
                 "--max_train_minutes", "0.02", "--sample_max_new_tokens", "0",
                 "--eval_reconstruction", "false")  # fmt: skip
    assert code == 0 and time.monotonic() - start < 30
    results = json.loads((out / "train_results.json").read_text())
    assert results["stopped_by_fit_deadline"] is True and results["stopped_by_time_budget"] is True
    assert 0 < results["stopped_at_fast_step"] < MAX_INFERENCE_STEPS
    assert "the time budget ran out inside step 1" in capsys.readouterr().out
    model_is_consistent(out)


def test_generate_and_eval_budgets(tmp_path, capsys):
    from eval_harness.__main__ import main as eval_main
    from modeling_ltm.tooling.generate_cli import main as generate_main

    folder = tiny_model_folder(tmp_path / "model")
    assert generate_main([str(folder), "--prompt", "x", "--num-inference-steps", "1000000000"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm generate", "--num-inference-steps", f"{MAX_INFERENCE_STEPS:,}")
    assert (
        generate_main([str(folder), "--unconditional", "--num-samples", "2000000", "--max-new-tokens", "8"])
        == EXIT_CODE
    )
    assert_one_line_error(capsys, "ltm generate", "--num-samples 2000000", "GB", "LTM_MEMORY_BUDGET_GB")
    for model_args, fragment in (("num_inference_steps=1000000000", "num_inference_steps"),
                                 ("iw_samples=100000000", "iw_samples")):  # fmt: skip
        argv = ["run", "--model", "ltm", "--model_args", f"pretrained={folder},{model_args}", "--tasks", "x"]
        assert eval_main(argv) == EXIT_CODE
        assert_one_line_error(capsys, "ltm eval", fragment, "is outside [0,")
    assert eval_main(["run", "--model", "ltm", "--model_args", f"pretrained={folder}", "--tasks", "x",
                      "--batch_size", "0"]) == EXIT_CODE  # fmt: skip
    assert_one_line_error(capsys, "ltm eval", "--batch_size must be an integer >= 1")


def test_ltmlm_checks_its_arguments_against_the_budget(tmp_path):
    from eval_harness.lm import LTMLM

    folder = tiny_model_folder(tmp_path / "model")
    with pytest.raises(ValueError, match="num_inference_steps"):
        LTMLM(pretrained=str(folder), num_inference_steps=10**9, device="cpu")
    with pytest.raises(ValueError, match="iw_samples"):
        LTMLM(pretrained=str(folder), iw_samples=10**8, device="cpu")
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1"):
        LTMLM(pretrained=str(folder), batch_size=0, device="cpu")
    with open(folder / "model.safetensors", "r+b") as f:  # a truncated file is named by path
        f.truncate(1000)
    with pytest.raises(ValueError, match=str(folder / "model.safetensors")):
        LTMLM(pretrained=str(folder), device="cpu")


def test_every_test_named_in_the_guarantees_exists():
    import re

    text = (REPO_ROOT / "docs" / "guarantees.md").read_text()
    named = set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", text))
    assert len(named) > 30
    missing = [
        f"{file}::{name}"
        for file, name in sorted(named)
        if not re.search(rf"^def {name}\(", (REPO_ROOT / "tests" / file).read_text(), re.MULTILINE)
    ]
    assert not missing, missing

"""Issue 31, the train side: `ltm train` and `LTMTrainer` either do the right thing or stop with one line (exit code
2) naming the problem, the flag or file, and the fix. Cases are numbered as in the issue; where a process or a disk
is involved (case 6: the working directory; case 8: a full disk) a real `ltm train` process runs."""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_faults import assert_one_line_error
from test_run_safety import REPO_ROOT, subprocess_env, tiny_model_folder
from test_train_cli import setup  # noqa: F401  (`setup`: the tiny preset and corpus fixture)

from modeling_ltm import LTMForCausalLM, LTMTrainer, LTMTrainingArguments
from modeling_ltm.tooling.cli import main as ltm_main
from modeling_ltm.tooling.cli_errors import EXIT_CODE
from modeling_ltm.tooling.run_folder import LOCK_NAME


# FAST_FLAGS of test_train_cli without a save strategy (case 5 sets it through a recipe), and fewer steps.
QUICK = [
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
    "--learning_rate", "3e-3", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
    "--eval_inference_steps", "2", "--eval_iw_samples", "0", "--max_eval_blocks", "2",
    "--sample_max_new_tokens", "0", "--dataloader_num_workers", "0",
]  # fmt: skip


def argv_of(setup, *extra, save: str | None = "no") -> list[str]:
    preset, corpus, tmp_path = setup
    strategy = ["--save_strategy", save] if save else []
    return ["train", "--config", str(preset), "--dataset", str(corpus), "--cache_dir", str(tmp_path / "hf"),
            *QUICK, *strategy, *extra]  # fmt: skip


def run_train(argv: list[str], cwd: Path, preexec_fn=None) -> subprocess.CompletedProcess:
    """A real `ltm train` process in `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", "modeling_ltm.tooling.cli", *argv],
        cwd=cwd,
        env=subprocess_env(PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec_fn,
    )


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if ": error:" in line or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("ltm train: error:"), stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------ 2. no step to train


@pytest.mark.parametrize("epochs", ["0", "-2"])
def test_max_steps_minus_one_with_no_epochs_is_refused_naming_both_flags(setup, capsys, epochs):
    out = setup[2] / "out"
    argv = argv_of(setup, "--output_dir", str(out), "--max_steps", "-1", "--num_train_epochs", epochs)
    assert ltm_main(argv) == EXIT_CODE
    assert_one_line_error(capsys, "ltm train", "--max_steps -1", f"--num_train_epochs {epochs}", "trains no step")
    assert not out.exists()  # refused before anything was written


# ------------------------------------------------------------------------------ 6. --output_dir . (real processes)


def test_output_dir_that_is_or_holds_the_working_directory_keeps_its_results(setup):
    run = setup[2] / "run"
    run.mkdir()
    first = run_train(argv_of(setup, "--output_dir", "."), cwd=run)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ltm train: summary" in first.stdout and "the working directory was in" in first.stdout
    for name in ("model.safetensors", "train_results.json", "eval_results.json", "all_results.json"):
        assert (run / name).is_file(), name
    assert not (run / LOCK_NAME).exists()
    assert sorted(p.name for p in setup[2].iterdir() if p.name.startswith(".run")) == []  # no staging sibling
    old_model = (run / "model.safetensors").stat().st_ino

    # An output folder that holds the working directory, replacing the model there.
    sub = run / "sub"
    sub.mkdir()
    (sub / "notes.txt").write_text("mine")
    second = run_train(argv_of(setup, "--output_dir", "..", "--overwrite_output_dir", "--seed", "7"), cwd=sub)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "ltm train: summary" in second.stdout
    assert (run / "model.safetensors").stat().st_ino != old_model  # the new model
    assert json.loads((run / "eval_results.json").read_text())["eval_blocks"] == 2
    assert json.loads((run / "training_args.json").read_text())["seed"] == 7
    assert (sub / "notes.txt").read_text() == "mine" and not (run / LOCK_NAME).exists()


# ------------------------------------------------------------------------------ 8. full disk while checkpointing


def test_a_checkpoint_that_does_not_fit_on_the_disk_is_one_line_naming_it(setup):
    # The tiny preset's model.safetensors is ~186 kB and optimizer.pt (Adam's two moments) ~370 kB: a file-size limit
    # between them lets the model of checkpoint-1 be written and cuts torch.save of the optimizer short, as a full
    # disk does (`RuntimeError: [enforce fail at inline_container.cc] . unexpected pos`).
    limit = 300_000

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = setup[2] / "run"
    argv = argv_of(setup, "--output_dir", str(out), "--save_steps", "1", save="steps")
    result = run_train(argv, cwd=REPO_ROOT, preexec_fn=limit_file_size)
    assert result.returncode == EXIT_CODE, result.stderr[-3000:]
    line = one_error_line(result.stderr)
    assert f"saving the checkpoint {out / 'checkpoint-1'}" in line, line
    assert "the disk is full" in line and "Free some space" in line and "--output_dir" in line
    assert "Traceback" not in result.stderr
    assert not (out / "checkpoint-1").exists() and not (out / LOCK_NAME).exists()  # partial one removed, no lock


# ------------------------------------------------------------------------------ 12. --bf16 on a CPU


def test_bf16_without_a_gpu_trains_on_the_cpu_in_bfloat16(setup, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: --bf16 runs on it")
    out = setup[2] / "bf16"
    assert ltm_main(argv_of(setup, "--output_dir", str(out), "--max_steps", "1", "--bf16")) == 0
    assert "--bf16 without a GPU: training on the CPU with bfloat16 autocast" in capsys.readouterr().out
    recorded = json.loads((out / "training_args.json").read_text())
    assert recorded["bf16"] is True and recorded["use_cpu"] is True
    assert (out / "eval_results.json").is_file()


# ------------------------------------------------------------------------------ 13. data of the wrong kind


def test_token_data_of_the_wrong_kind_is_named_with_its_column_and_fix(setup, capsys):
    from datasets import Dataset

    # The CLI: integer values in the (default) text column.
    data = setup[2] / "ints.jsonl"
    data.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(50)))
    argv = argv_of(setup, "--output_dir", str(setup[2] / "ints"))
    argv[argv.index("--dataset") : argv.index("--dataset") + 2] = ["--train_file", str(data)]
    assert ltm_main(argv) == EXIT_CODE
    assert_one_line_error(capsys, "ltm train", "--text_column 'text' of ints.jsonl holds int64 values, not text")

    # The Python API: LTMTrainer names the dataset, the column and the fix.
    torch.manual_seed(0)
    model = LTMForCausalLM(tiny_config())
    args = LTMTrainingArguments(str(setup[2] / "api"), report_to="none", max_steps=1, use_cpu=True)
    cases = [
        (Dataset.from_dict({"input_ids": [[1.0, 2.0, 3.0]] * 4}), TypeError, "column `input_ids` holds double"),
        ([{"input_ids": [1.0, 2.0, 3.0]}] * 4, TypeError, "row 0, column `input_ids` holds float32"),
        (
            Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5, 6]] * 4, "labels": [[1, 2]] * 4}),
            ValueError,
            "row 0 has 2 values in column `labels` but 6 tokens in `input_ids`",
        ),
        ([torch.tensor([1, 2, 3, 4])] * 4, TypeError, "`train_dataset` row 0 is a Tensor, not a dict of columns"),
    ]
    for dataset, kind, message in cases:
        with pytest.raises(kind, match=message.replace("(", r"\(")) as raised:
            LTMTrainer(model=model, args=args, train_dataset=dataset)
        assert "train_dataset" in str(raised.value)
    with pytest.raises(TypeError, match=r"`eval_dataset` column `input_ids` holds double"):
        LTMTrainer(model=model, args=args, eval_dataset=Dataset.from_dict({"input_ids": [[1.5, 2.5]] * 2}))


# ------------------------------------------------------------------------------ 14. flags and folders


def _read_only_statvfs(folder: Path):
    real = os.statvfs

    class ReadOnly:
        def __init__(self, result):
            self.result = result

        def __getattr__(self, name):
            value = getattr(self.result, name)
            return value | os.ST_RDONLY if name == "f_flag" else value

    def statvfs(path):
        result = real(path)
        return ReadOnly(result) if Path(path) == folder else result

    return statvfs


@pytest.mark.parametrize(
    "case", ["seed", "learning-rate-nan", "recipe-value", "a-file", "under-a-file", "read-only", "long-name"]
)
def test_bad_flags_recipes_and_output_folders_are_one_line_naming_them(setup, capsys, monkeypatch, case):
    tmp_path = setup[2]
    out = tmp_path / "out"
    extra, fragments = [], []
    if case == "seed":
        extra, fragments = ["--seed", "-1"], ["--seed must be in [0, 2**32 - 1]", "got -1"]
    elif case == "learning-rate-nan":
        extra, fragments = ["--learning_rate", "nan"], ["--learning_rate is nan"]
    elif case == "recipe-value":
        recipe = tmp_path / "recipe.json"
        recipe.write_text(json.dumps({"max_steps": "ten"}))
        argv = ["train", "--config", str(setup[0]), "--recipe", str(recipe), "--output_dir", str(out)]
        assert ltm_main(argv) == EXIT_CODE
        fragment = '"max_steps": "ten" is not a valid int for --max_steps'
        assert_one_line_error(capsys, "ltm train", str(recipe), fragment)
        return
    elif case == "a-file":
        out.write_text("not a folder")
        fragments = [f"--output_dir {out} exists and is a file", "choose another --output_dir"]
    elif case == "under-a-file":
        (tmp_path / "file").write_text("not a folder")
        out = tmp_path / "file" / "run"
        fragments = [f"--output_dir {out} cannot be created: {tmp_path / 'file'} is a file"]
    elif case == "read-only":
        disk = tmp_path / "ro"
        disk.mkdir()
        out = disk / "run"
        monkeypatch.setattr(os, "statvfs", _read_only_statvfs(disk))
        fragments = [f"--output_dir {out} cannot be written", "read-only file system", "writable --output_dir"]
    elif case == "long-name":
        out = tmp_path / ("x" * 300)
        fragments = ["--output_dir has a folder name of 300 bytes", "choose a shorter --output_dir"]
    assert ltm_main(argv_of(setup, "--output_dir", str(out), *extra)) == EXIT_CODE
    line = assert_one_line_error(capsys, "ltm train", *fragments)
    assert "Errno" not in line
    assert case == "a-file" or not os.path.isdir(out)


# ------------------------------------------------------------------------------ 5. flags that did nothing


def test_save_steps_given_under_a_recipe_that_turns_saving_off_saves_checkpoints(setup, capsys):
    recipe = setup[2] / "recipe.json"
    recipe.write_text(json.dumps({"save_strategy": "no", "learning_rate": 3e-3}))
    out = setup[2] / "run"
    argv = argv_of(setup, "--recipe", str(recipe), "--save_steps", "1", "--output_dir", str(out), save=None)
    assert ltm_main(argv) == 0
    assert "--save_steps given: saving a checkpoint every 1 steps (--save_strategy steps" in capsys.readouterr().out
    assert (out / "checkpoint-1" / "model.safetensors").is_file() and (out / "checkpoint-2").is_dir()


def test_vocab_size_is_refused_where_the_tokenizer_is_not_trained(setup, capsys):
    trained = tiny_model_folder(setup[2] / "trained")  # a 300-token tokenizer
    out = setup[2] / "more"
    argv = argv_of(setup, "--output_dir", str(out), "--vocab_size", "200")
    argv[argv.index("--config") + 1] = str(trained)
    assert ltm_main(argv) == EXIT_CODE
    assert_one_line_error(
        capsys, "ltm train", "--vocab_size 200", f"300-token tokenizer of --config {trained}", "leave --vocab_size out"
    )
    assert not out.exists()
    argv = argv_of(setup, "--output_dir", str(out), "--vocab_size", "200", "--tokenizer", str(trained))
    assert ltm_main(argv) == EXIT_CODE
    assert_one_line_error(capsys, "ltm train", "--vocab_size 200", f"of --tokenizer {trained}")


def test_rows_with_nothing_to_predict_are_refused(tmp_path):
    from datasets import Dataset

    torch.manual_seed(0)
    model = LTMForCausalLM(tiny_config())
    args = LTMTrainingArguments(str(tmp_path / "api"), report_to="none", max_steps=1, use_cpu=True)
    for one_token_rows in (Dataset.from_dict({"input_ids": [[5]] * 4}), [{"input_ids": [5]}] * 4):
        with pytest.raises(ValueError, match=r"`train_dataset`: no row has more than 1 token.*loss 0"):
            LTMTrainer(model=model, args=args, train_dataset=one_token_rows)
    LTMTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": [[5, 6]] * 4}))  # 1 target each

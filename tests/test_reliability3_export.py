"""Issue 31, the loading / generate / eval / export side: weights with missing tensors are never loaded (and never
exported), one `ltm export` per folder, an export's tokenizer works, every memory budget counts the importance samples,
and the last raw library errors of these commands are one line naming the flag or file and the fix."""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from safetensors.torch import load_file, save_file
from test_faults import assert_one_line_error, copy_model, fresh_lm_eval_logging, saved_model  # noqa: F401 (fixtures)

from hub_cards import export_for_hub
from hub_cards.cli import export_main
from modeling_ltm import LTMForCausalLM
from modeling_ltm.tooling.budgets import MEMORY_BUDGET_ENV, estimate_bytes, memory_budget_bytes
from modeling_ltm.tooling.cli_errors import EXIT_CODE
from modeling_ltm.tooling.generate_cli import main as generate_main


def eval_argv(model_args: str, *extra: str) -> list[str]:
    return ["run", "--model", "ltm", "--model_args", model_args, "--tasks", "arithmetic_local",
            "--include_path", str(REPO_ROOT / "eval_harness" / "tasks"), "--device", "cpu", *extra]  # fmt: skip


# ------------------------------------------------------------------------------------------------ 1. missing tensors


@pytest.mark.usefixtures("fresh_lm_eval_logging")
def test_weights_with_missing_or_unexpected_tensors_are_refused_by_generate_eval_and_export(
    saved_model, tmp_path, capsys
):
    from eval_harness.__main__ import main as eval_main

    bad = copy_model(saved_model, tmp_path / "missing")
    weights = load_file(bad / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layers.1.mlp." not in k}, bad / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    assert generate_main([str(bad), "--prompt", "ROMEO:", "--max-new-tokens", "2"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm generate", str(bad), "model.layers.1.mlp.down_proj.weight", "missing",
                          "re-save")  # fmt: skip
    assert eval_main(eval_argv(f"pretrained={bad},num_inference_steps=1", "--limit", "1")) == EXIT_CODE
    assert_one_line_error(capsys, "ltm eval", str(bad), "model.layers.1.mlp.gate_proj.weight", "missing")
    hub = tmp_path / "hub"
    assert export_main([str(bad), str(hub)]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm export", str(bad), "model.layers.1.mlp.up_proj.weight", "missing")
    assert not hub.exists() and not list(tmp_path.glob(".hub*"))  # nothing written, no random layer shipped

    extra = copy_model(saved_model, tmp_path / "unexpected")
    weights = {**load_file(saved_model / "model.safetensors"), "model.extra.weight": torch.zeros(2)}
    weights["model.norm.weight"] = torch.ones(3)  # another shape
    save_file(weights, extra / "model.safetensors", metadata={"format": "pt"})
    assert export_main([str(extra), str(hub)]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm export", "model.extra.weight", "not part of this model", "model.norm.weight",
                          "of another shape")  # fmt: skip
    assert not hub.exists()


# ------------------------------------------------------------------------------------------------ 3. export lock


def test_two_exports_into_one_folder_started_together_one_is_refused(saved_model, tmp_path):
    """Two real `ltm export` processes started together into one new folder: the one that takes the folder's lock
    first holds it (paused there by `LTM_TEST_PAUSE_AT`), the other is refused in one line; the holder, killed, leaves
    no folder, and the next export takes the lock over and writes a complete one."""
    hub = tmp_path / "hub"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "LTM_TEST_PAUSE_AT": "export-locked"}  # fmt: skip
    processes = [
        subprocess.Popen([sys.executable, "-m", "modeling_ltm.tooling.cli", "export", str(saved_model), str(hub)],
                         cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        refused = [p for p in processes if p.poll() is not None]
        assert len(refused) == 1, "neither export ended"
        out, err = refused[0].communicate()
        assert refused[0].returncode == EXIT_CODE and "Exported to" not in out, (out, err[-2000:])
        lines = [line for line in err.splitlines() if ": error:" in line or "Traceback" in line]
        assert len(lines) == 1 and lines[0].startswith("ltm export: error:"), err[-2000:]
        assert "another `ltm export`" in lines[0] and str(hub) in lines[0]
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.communicate(timeout=30)
    assert not hub.exists()
    export_for_hub(saved_model, hub)  # the dead holder's lock is taken over
    assert (hub / "model.safetensors").is_file() and not list(tmp_path.glob(".hub.*"))


# ------------------------------------------------------------------------------------------------ 4, 11. tokenizers


def test_export_refuses_a_tokenizer_without_eos_and_names_the_fix(saved_model, tmp_path, capsys):
    """No `tokenizer_config.json`: the tokenizer loads without its special tokens; the export would be refused by
    `ltm generate` and `ltm eval`, so `ltm export` refuses it and says how to pass the right one; `--tokenizer`
    with the trained tokenizer exports a working one."""
    run = copy_model(saved_model, tmp_path / "run")
    (run / "tokenizer_config.json").unlink()
    hub = tmp_path / "hub"
    assert export_main([str(run), str(hub)]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm export", str(run), "no end-of-text (EOS) token", "tokenizer_config.json",
                          "--tokenizer")  # fmt: skip
    assert not hub.exists()
    assert export_main([str(run), str(hub), "--tokenizer", str(saved_model)]) == 0
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(hub).eos_token is not None


def test_generate_names_a_tokenizer_without_special_tokens(saved_model, tmp_path, capsys):
    folder = copy_model(saved_model, tmp_path / "no-config")
    (folder / "tokenizer_config.json").unlink()
    assert generate_main([str(folder), "--prompt", "ROMEO:", "--max-new-tokens", "2"]) == EXIT_CODE
    line = assert_one_line_error(capsys, "ltm generate", str(folder), "no end-of-text (EOS) or padding token",
                                 "tokenizer_config.json", "save_pretrained")  # fmt: skip
    assert "Asking to pad" not in line


# ------------------------------------------------------------------------------------------------ 5. minor


def test_bom_prompts_garbage_generation_config_bad_repo_id_and_weights_mode(saved_model, tmp_path, capsys):
    from modeling_ltm.tooling.generate_cli import build_parser, read_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffROMEO:\nJULIET:\n".encode())
    assert read_prompts(build_parser().parse_args([str(saved_model), "--prompts-file", str(prompts)])) == [
        "ROMEO:",
        "JULIET:",
    ]

    garbage = copy_model(saved_model, tmp_path / "garbage")
    (garbage / "generation_config.json").write_text("garbage{")
    assert generate_main([str(garbage), "--prompt", "ROMEO:"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm generate", str(garbage / "generation_config.json"), "not valid JSON")
    assert export_main([str(garbage), str(tmp_path / "hub-garbage")]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm export", str(garbage / "generation_config.json"))

    assert export_main([str(saved_model), str(tmp_path / "hub-id"), "--repo-id", "bad id with spaces"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm export", "--repo-id 'bad id with spaces'", "user/name")
    assert not (tmp_path / "hub-id").exists()

    old_umask = os.umask(0o022)
    try:
        hub = export_for_hub(saved_model, tmp_path / "hub")
    finally:
        os.umask(old_umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in hub.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes


def test_the_run_folders_final_save_gives_weights_the_usual_mode(tmp_path):
    from modeling_ltm.tooling.run_folder import replace_final_files

    folder = tmp_path / "run"
    folder.mkdir()
    model = LTMForCausalLM(tiny_config())
    old_umask = os.umask(0o022)
    try:
        replace_final_files(folder, lambda staging: model.save_pretrained(staging), ("*.safetensors",), {})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((folder / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((folder / "config.json").stat().st_mode) == 0o644

    from types import SimpleNamespace

    from modeling_ltm.tooling.train_cli import DataRecordCallback

    checkpoint = folder / "checkpoint-1"  # what Trainer's checkpoint save leaves: the weights 0600
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"x")
    (checkpoint / "model.safetensors").chmod(0o600)
    state = SimpleNamespace(is_world_process_zero=True, global_step=1)
    args = SimpleNamespace(output_dir=str(folder), to_json_string=lambda: "{}")
    old_umask = os.umask(0o022)
    try:
        DataRecordCallback({}).on_save(args, state, None)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((checkpoint / "model.safetensors").stat().st_mode) == 0o644


# ------------------------------------------------------------------------------------------------ 7, 9. budgets


@pytest.mark.usefixtures("fresh_lm_eval_logging")
def test_the_eval_memory_estimate_counts_importance_samples_and_is_checked_before_loading(
    saved_model, monkeypatch, capsys
):
    from eval_harness.__main__ import main as eval_main

    config = tiny_config(n_latents_per_layer=8, latent_dim=512)
    estimates = [estimate_bytes(config, 16, 64, iw_samples=k) for k in (0, 16, 4096)]
    assert estimates[0] < estimates[1] < estimates[2]
    # the 4096 x 16 latent draws alone: 65,536 x 2 x 8 x 512 float32 values
    assert estimates[2] - estimates[0] >= 4096 * 16 * 2 * 8 * 512 * 4

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the budget check")

    monkeypatch.setattr("modeling_ltm.tooling.cli_errors.load_checked_model", no_loading)
    monkeypatch.setattr("eval_harness.lm.load_checked_model", no_loading)
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "0.01")
    assert eval_main(eval_argv(f"pretrained={saved_model},iw_samples=4096", "--batch_size", "16")) == EXIT_CODE
    assert_one_line_error(capsys, "ltm eval", "--batch_size 16", "--model_args iw_samples=4096", MEMORY_BUDGET_ENV)
    # the same batch without importance samples fits
    monkeypatch.setenv(MEMORY_BUDGET_ENV, str(estimate_bytes_gb(saved_model, 16, 0) * 1.01))
    assert eval_main(eval_argv(f"pretrained={saved_model},iw_samples=4096", "--batch_size", "16")) == EXIT_CODE
    assert_one_line_error(capsys, "ltm eval", "--model_args iw_samples=4096")


def estimate_bytes_gb(folder: Path, rows: int, samples: int) -> float:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    return estimate_bytes(config, rows, config.max_position_embeddings, iw_samples=samples) / 2**30


def test_the_memory_budget_variable_inf_means_no_budget_and_nan_or_negative_is_named(saved_model, monkeypatch,
                                                                                       capsys):  # fmt: skip
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "inf")
    assert memory_budget_bytes("cpu")[0] == float("inf")
    assert generate_main([str(saved_model), "--prompt", "ROMEO:", "--max-new-tokens", "2",
                          "--num-inference-steps", "1", "--no-stream"]) == 0  # fmt: skip
    capsys.readouterr()
    for value in ("nan", "-1", "0"):
        monkeypatch.setenv(MEMORY_BUDGET_ENV, value)
        assert generate_main([str(saved_model), "--prompt", "ROMEO:", "--max-new-tokens", "2"]) == EXIT_CODE
        assert_one_line_error(capsys, "ltm generate", f"{MEMORY_BUDGET_ENV}='{value}'", "inf for no memory budget")


# ------------------------------------------------------------------------------------------------ 10. local paths


@pytest.mark.usefixtures("fresh_lm_eval_logging")
def test_a_mistyped_relative_folder_is_no_such_folder_not_a_hub_error(saved_model, tmp_path, monkeypatch, capsys):
    from eval_harness.__main__ import main as eval_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    copy_model(saved_model, tmp_path / "runs" / "ltm-tiny")
    assert eval_main(eval_argv("pretrained=runs/ltm-tiy")) == EXIT_CODE
    line = assert_one_line_error(capsys, "ltm eval", "runs/ltm-tiy", "no such folder", str(tmp_path), "ltm-tiny")
    assert "huggingface.co" not in line
    assert generate_main(["runs/ltm-tiy", "--prompt", "x"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm generate", "runs/ltm-tiy", "no such folder", str(tmp_path))
    assert export_main(["runs/ltm-tiy", "hub"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm export", "runs/ltm-tiy", "no such folder", str(tmp_path))
    from modeling_ltm.tooling.cli_errors import looks_like_a_local_path

    assert looks_like_a_local_path("runs/ltm-tiy") and looks_like_a_local_path("my model")
    assert not looks_like_a_local_path("gpt2") and not looks_like_a_local_path("some-user/some-model")


# ------------------------------------------------------------------------------------------------ 14. one line


@pytest.mark.usefixtures("fresh_lm_eval_logging")
def test_empty_prompts_file_limit_zero_and_a_read_only_export_folder_are_one_line(
    saved_model, tmp_path, monkeypatch, capsys
):
    import errno
    import tempfile

    from eval_harness.__main__ import main as eval_main

    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    assert generate_main([str(saved_model), "--prompts-file", str(empty)]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm generate", f"--prompts-file {empty}", "holds no prompt", "one prompt per line")

    for limit in ("0", "-1", "nan"):
        assert eval_main(eval_argv(f"pretrained={saved_model}", "--limit", limit)) == EXIT_CODE
        assert_one_line_error(capsys, "ltm eval", f"--limit {limit}", "evaluates no document", ">= 1")

    read_only = tmp_path / "read-only"
    read_only.mkdir()

    def refused(*args, dir=None, prefix="", **kwargs):  # what mkdtemp raises in a read-only folder
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / f"{prefix}x1y2"))

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    assert export_main([str(saved_model), str(read_only / "hub")]) == EXIT_CODE
    line = assert_one_line_error(capsys, "ltm export", f"cannot write the export folder {read_only / 'hub'}",
                                 "choose a folder you can write to")  # fmt: skip
    assert ".tmp-" not in line and not (read_only / "hub").exists()
    monkeypatch.undo()
    if os.geteuid() != 0:  # root writes anywhere: the real permission check only for a user
        read_only.chmod(0o555)
        try:
            assert export_main([str(saved_model), str(read_only / "hub")]) == EXIT_CODE
            line = assert_one_line_error(capsys, "ltm export", f"cannot write the export folder {read_only / 'hub'}")
            assert ".tmp-" not in line
        finally:
            read_only.chmod(0o755)

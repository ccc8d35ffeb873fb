"""Fault tests (issue 11): a user's work is never lost, a checkpoint's code never runs, NaN never passes silently, and
every CLI reports a problem in one line (exit code 2) naming the problem, the file and the fix."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, small_tokenizer, tiny_config
from safetensors.torch import load_file, save_file
from test_train_cli import FAST_FLAGS, TINY_PRESET

from hub_cards import export_for_hub
from hub_cards.cli import export_main, push_main
from hub_cards.push import check_export_folder
from modeling_ltm import LTMForCausalLM, NonFiniteELBOError
from modeling_ltm.cli import main as ltm_main
from modeling_ltm.cli_errors import EXIT_CODE
from modeling_ltm.generate_cli import main as generate_main
from modeling_ltm.generation_ltm import NonFiniteWeightsError
from modeling_ltm.train_cli import (
    TrainCLIError,
    load_preset,
    parse_args,
    resolve_resume_checkpoint,
)


BAD_PARAMETER = "model.layers.1.mlp.down_proj.weight"


def error_lines(err: str) -> list[str]:
    """The lines of stderr that report an error (progress bars and warnings left out)."""
    return [line for line in err.splitlines() if ": error:" in line or "Traceback" in line]


def assert_one_line_error(capsys, command: str, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error:"), err[-3000:]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A saved tiny LTM with its tokenizer (byte-level BPE of 300 tokens)."""
    folder = tmp_path_factory.mktemp("faults") / "model"
    tokenizer = small_tokenizer(20_000, 300)
    config = tiny_config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LTMForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def copy_model(saved_model: Path, dest: Path) -> Path:
    shutil.copytree(saved_model, dest)
    return dest


def nan_model(saved_model: Path, dest: Path) -> Path:
    """A copy of the saved model with one NaN in `BAD_PARAMETER`."""
    folder = copy_model(saved_model, dest)
    weights = load_file(folder / "model.safetensors")
    weights[BAD_PARAMETER][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def truncated_model(saved_model: Path, dest: Path) -> Path:
    folder = copy_model(saved_model, dest)
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return folder


@pytest.fixture
def train_setup(tmp_path, tiny_shakespeare_path):
    preset = tmp_path / "ltm-test.json"
    preset.write_text(json.dumps(TINY_PRESET))
    corpus = tmp_path / "slice.txt"
    corpus.write_text(tiny_shakespeare_path.read_text(encoding="utf-8")[:30_000])
    return preset, corpus, tmp_path


def train(setup, *extra) -> int:
    preset, corpus, tmp_path = setup
    argv = ["train", "--config", str(preset), "--dataset", str(corpus), "--cache_dir", str(tmp_path / "hf"),
            *FAST_FLAGS, *extra]  # fmt: skip
    return ltm_main(argv)


# ------------------------------------------------------------------------------------------------ output folders


def test_train_refuses_a_non_empty_output_dir_unless_overwrite(train_setup, capsys):
    out = train_setup[2] / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the main job's model")
    assert train(train_setup, "--output_dir", str(out)) == EXIT_CODE
    assert_one_line_error(capsys, "ltm train", str(out), "--overwrite_output_dir", "--resume_from_checkpoint")
    assert (out / "model.safetensors").read_bytes() == b"the main job's model"  # untouched

    assert train(train_setup, "--output_dir", str(out), "--overwrite_output_dir", "--max_steps", "1") == 0
    assert LTMForCausalLM.from_pretrained(out).config.vocab_size == 300


def test_no_recipe_names_an_output_folder_and_the_default_is_fresh(tmp_path, monkeypatch):
    for recipe in (REPO_ROOT / "configuration" / "recipes").glob("*.json"):
        assert "output_dir" not in json.loads(recipe.read_text()), recipe
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "ltm-tiny").mkdir(parents=True)  # e.g. the main job's model
    _, _, args = parse_args(["--config", str(REPO_ROOT / "configuration" / "ltm-tiny.json")])
    assert re.fullmatch(r"runs/ltm-tiny-\d{8}-\d{6}(-\d+)?", args.output_dir), args.output_dir
    assert not Path(args.output_dir).exists()


def test_export_overwrite_replaces_only_the_files_an_export_writes(saved_model, tmp_path):
    target = tmp_path / "hub"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    (target / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an earlier export")
    (target / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--overwrite"):
        export_for_hub(saved_model, target)
    export_for_hub(saved_model, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "my notes"
    assert not (target / "model-00001-of-00002.safetensors").exists()
    assert json.loads((target / "config.json").read_text())["model_type"] == "ltm"
    assert LTMForCausalLM.from_pretrained(target).config.vocab_size == 300
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hub.tmp")]


# ------------------------------------------------------------------------------------------------ no pickle


class _Payload:
    """Unpickling this runs `os.system(command)`."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_crafted_training_args_pickle_is_never_executed(saved_model, tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = copy_model(saved_model, tmp_path / "run" / "checkpoint-5")
    torch.save(_Payload(f"touch {marker}"), checkpoint / "training_args.bin")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": []}))
    folder = export_for_hub(checkpoint, tmp_path / "hub")
    assert not marker.exists()
    assert (folder / "README.md").is_file()  # the card just omits the training arguments


def test_a_genuine_training_args_bin_is_read_without_unpickling_code(tmp_path):
    from transformers import TrainingArguments

    from hub_cards.export import read_pickled_training_args
    from modeling_ltm import LTMTrainingArguments

    for cls in (TrainingArguments, LTMTrainingArguments):
        args = cls(output_dir=str(tmp_path), learning_rate=4e-4, lr_scheduler_type="cosine", report_to="none")
        torch.save(args, tmp_path / "training_args.bin")
        fields = read_pickled_training_args(tmp_path / "training_args.bin")
        assert fields["learning_rate"] == 4e-4 and fields["lr_scheduler_type"] == "cosine"


def test_no_unsafe_deserialization_in_the_package():
    offenders = []
    for package in ("modeling_ltm", "eval_harness", "hub_cards"):
        for path in (REPO_ROOT / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for pattern in ("weights_only=False", "pickle.load"):
                if pattern in text:
                    offenders.append(f"{path.relative_to(REPO_ROOT)}: {pattern}")
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------------ non-finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_forward_and_generate_reject_non_finite_latents(model, bad):
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    latents = torch.randn(2, *model.config.latent_shape)
    latents[1, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="`latents` contains NaN or inf"):
        model(ids, latents=latents)
    with pytest.raises(ValueError, match="`latents` contains NaN or inf"):
        model.generate(ids, latents=latents, max_new_tokens=2, pad_token_id=0)


def test_generate_refuses_non_finite_weights_naming_the_parameter(model):
    with torch.no_grad():
        model.get_parameter(BAD_PARAMETER)[3, 1] = float("nan")
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    latents = torch.zeros(1, *model.config.latent_shape)
    for kwargs in ({"latents": latents}, {"latents": "prior"}, {}):
        with pytest.raises(NonFiniteWeightsError, match=re.escape(f"`{BAD_PARAMETER}` holds 1 NaN/inf")):
            model.generate(ids, max_new_tokens=2, pad_token_id=0, **kwargs)
    with pytest.raises(NonFiniteELBOError, match=re.escape(BAD_PARAMETER)):  # the fast loop names it too
        model.infer_latents(ids, num_steps=2)


def test_weight_check_passes_finite_weights_whose_sum_overflows_and_counts_inf_minus_inf():
    from modeling_ltm.generation_ltm import check_finite_weights

    check_finite_weights([("huge", torch.full((4,), 3e38)), ("half", torch.full((3,), 6e4, dtype=torch.float16))])
    with pytest.raises(NonFiniteWeightsError, match=re.escape("`both` holds 2 NaN/inf values of 3")):
        check_finite_weights([("fine", torch.ones(2)), ("both", torch.tensor([float("inf"), 1.0, -float("inf")]))])


def test_export_and_push_refuse_non_finite_weights(saved_model, tmp_path, capsys):
    bad = nan_model(saved_model, tmp_path / "nan")
    with pytest.raises(NonFiniteWeightsError, match=re.escape(BAD_PARAMETER)):
        export_for_hub(bad, tmp_path / "hub")
    assert not (tmp_path / "hub").exists()
    assert export_main([str(bad), str(tmp_path / "hub")]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm export", BAD_PARAMETER, str(bad))

    exported = export_for_hub(saved_model, tmp_path / "good-hub")
    nan_weights = load_file(exported / "model.safetensors")
    nan_weights[BAD_PARAMETER][0, 0] = float("inf")
    save_file(nan_weights, exported / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightsError, match=re.escape(BAD_PARAMETER)):
        check_export_folder(exported)
    assert push_main([str(exported), "someone/ltm", "--token", "x"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm push", BAD_PARAMETER, "model.safetensors")


def test_generate_unconditional_with_a_nan_model_exits_non_zero_with_one_line(saved_model, tmp_path, capsys):
    bad = nan_model(saved_model, tmp_path / "nan")
    assert generate_main([str(bad), "--unconditional", "--max-new-tokens", "4"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm generate", BAD_PARAMETER, str(bad))
    assert capsys.readouterr().out == ""  # no blank sample


# ------------------------------------------------------------------------------------------------ resume


def _complete_checkpoint(folder: Path, step: int) -> Path:
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (checkpoint / name).write_text("{}")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return checkpoint


def test_resume_last_skips_partial_checkpoints_with_a_warning(tmp_path, capsys):
    good = _complete_checkpoint(tmp_path, 20)
    _complete_checkpoint(tmp_path, 10)
    partial = tmp_path / "checkpoint-30"
    partial.mkdir()
    (partial / "modeling_ltm.py").write_text("# only the remote code was written before the kill")
    for value in ("True", "last", "latest"):
        assert resolve_resume_checkpoint(value, str(tmp_path)) == good
        assert str(partial) in capsys.readouterr().err
    with pytest.raises(TrainCLIError, match=f"partial checkpoint.*resume from {re.escape(str(good))}"):
        resolve_resume_checkpoint(str(partial), str(tmp_path))
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
    with pytest.raises(TrainCLIError, match="no complete checkpoint"):
        resolve_resume_checkpoint("True", str(tmp_path / "checkpoint-30"))


def test_resume_true_continues_the_newest_complete_checkpoint_with_its_tokenizer(train_setup, tmp_path, capsys):
    out = tmp_path / "run"
    save = ["--save_strategy", "steps", "--save_steps", "1", "--sample_max_new_tokens", "0"]
    assert train(train_setup, "--output_dir", str(out), "--max_steps", "2", *save) == 0
    assert (out / "checkpoint-2" / "training_args.json").is_file()  # export reads JSON, never the pickle
    partial = out / "checkpoint-3"
    partial.mkdir()
    for name in ("modeling_ltm.py", "inference.py"):
        shutil.copy(out / name, partial / name)
    capsys.readouterr()

    other = tmp_path / "other.txt"  # other text: a retrained BPE would give other token ids
    other.write_text(train_setup[1].read_text()[::-1])
    preset = train_setup[0]
    argv = ["train", "--config", str(preset), "--dataset", str(other), "--cache_dir", str(tmp_path / "hf"),
            *FAST_FLAGS, "--output_dir", str(out), "--max_steps", "4", *save,
            "--resume_from_checkpoint", "True"]  # fmt: skip
    assert ltm_main(argv) == 0
    err = capsys.readouterr().err
    assert f"skipping partial checkpoint(s) {partial}" in err and f"resuming from {out / 'checkpoint-2'}" in err
    assert "other training data" in err and "tokenizer is kept" in err
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "tokenizer.json").read_bytes() == (out / "checkpoint-2" / "tokenizer.json").read_bytes()

    other_tokenizer = tmp_path / "other-tokenizer"
    small_tokenizer(5_000, 280).save_pretrained(other_tokenizer)
    assert ltm_main([*argv, "--tokenizer", str(other_tokenizer)]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm train", "--tokenizer", "differs from the tokenizer")


# ------------------------------------------------------------------------------------------------ strict presets


@pytest.mark.parametrize(
    "key, suggestion", [("n_latent_per_layer", "n_latents_per_layer"), ("num_layers", "num_hidden_layers")]
)
def test_a_misspelled_preset_key_is_an_error_with_a_suggestion(tmp_path, key, suggestion):
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({**TINY_PRESET, key: 3}))
    with pytest.raises(TrainCLIError, match=f"'{key}' \\(did you mean '{suggestion}'\\?\\)"):
        load_preset(preset)


def test_a_preset_that_is_a_json_list_is_a_clear_error(tmp_path, capsys):
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps([TINY_PRESET]))
    assert ltm_main(["train", "--config", str(preset), "--output_dir", str(tmp_path / "out")]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm train", str(preset), "JSON list", "object")


# ------------------------------------------------------------------------------------------------ one-line CLI errors


def test_a_truncated_safetensors_file_is_named_by_every_cli(saved_model, tmp_path, capsys):
    from eval_harness.__main__ import main as eval_main

    bad = truncated_model(saved_model, tmp_path / "truncated")
    weights = str(bad / "model.safetensors")
    assert generate_main([str(bad), "--prompt", "ROMEO:"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm generate", weights, "truncated")
    assert export_main([str(bad), str(tmp_path / "hub")]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm export", weights, "truncated")
    assert eval_main(["run", "--model", "ltm", "--model_args", f"pretrained={bad}", "--tasks", "x"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm eval", weights, "truncated")


def test_a_garbage_config_json_is_blamed_not_the_tokenizer(saved_model, tmp_path, capsys):
    bad = copy_model(saved_model, tmp_path / "garbage")
    (bad / "config.json").write_text("garbage{")
    assert generate_main([str(bad), "--prompt", "ROMEO:"]) == EXIT_CODE
    line = assert_one_line_error(capsys, "ltm generate", str(bad / "config.json"), "not valid JSON")
    assert "tokenizer" not in line


def test_device_cuda_without_cuda_is_one_line(saved_model, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generate_main([str(saved_model), "--prompt", "ROMEO:", "--device", "cuda"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm generate", "--device cuda", "CUDA is not available", "--device cpu")


def test_num_beams_zero_is_one_line_and_debug_shows_the_traceback(saved_model, capsys):
    assert generate_main([str(saved_model), "--prompt", "ROMEO:", "--num-beams", "0"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm generate", "--num-beams must be >= 1")
    with pytest.raises(ValueError, match="--num-beams"):
        generate_main([str(saved_model), "--prompt", "ROMEO:", "--num-beams", "0", "--debug"])


def test_an_invalid_json_data_file_is_named(train_setup, capsys):
    bad = train_setup[2] / "corpus.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    preset, _, tmp_path = train_setup
    argv = ["train", "--config", str(preset), "--dataset", "json", "--data_files", str(bad),
            "--cache_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "out"), *FAST_FLAGS]  # fmt: skip
    assert ltm_main(argv) == EXIT_CODE
    assert_one_line_error(capsys, "ltm train", str(bad), "JSON")


def test_max_steps_zero_is_refused(train_setup, capsys):
    assert train(train_setup, "--output_dir", str(train_setup[2] / "out"), "--max_steps", "0") == EXIT_CODE
    assert_one_line_error(capsys, "ltm train", "--max_steps must be >= 1")
    assert not (train_setup[2] / "out").exists()


@pytest.mark.parametrize(
    "flags, blamed, not_blamed",
    [
        (["--learning_rate", "1e30"], "--learning_rate", "--inference_lr"),
        (["--inference_lr", "1e30"], "--inference_lr", "--learning_rate"),
    ],
    ids=["slow", "fast"],
)
def test_divergence_names_the_learning_rate_that_diverged(train_setup, capsys, flags, blamed, not_blamed):
    out = train_setup[2] / "out"
    assert train(train_setup, "--output_dir", str(out), *flags) == EXIT_CODE
    line = assert_one_line_error(capsys, "ltm train", "diverged", f"Lower {blamed}")
    assert f"Lower {not_blamed}" not in line
    assert not (out / "model.safetensors").exists()  # the diverged model is not saved over anything


def test_latents_on_another_device_name_the_argument(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    latents = torch.zeros(1, *model.config.latent_shape, device="meta")
    with pytest.raises(ValueError, match="`latents` is on meta but the model is on cpu.*latents.to"):
        model(ids, latents=latents)


def test_a_batch_of_zero_rows_is_a_clear_error(model):
    empty = torch.zeros(0, 5, dtype=torch.long)
    for call in (lambda: model(empty), lambda: model.infer_latents(empty), lambda: model.generate(empty)):
        with pytest.raises(ValueError, match="`input_ids` has 0 rows"):
            call()


def test_a_sequence_without_scored_tokens_has_no_per_token_gain(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 4))
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1]])  # row 1: a single real token, nothing to predict
    posterior = model.infer_latents(ids, attention_mask=mask, num_steps=2, seed=0)
    assert posterior.num_tokens.tolist() == [3, 0]
    assert torch.isfinite(posterior.elbo_gain[0]) and torch.isnan(posterior.elbo_gain[1])

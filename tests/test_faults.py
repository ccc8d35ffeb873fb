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
from modeling_ltm.tooling.cli import main as ltm_main
from modeling_ltm.tooling.cli_errors import EXIT_CODE
from modeling_ltm.tooling.generate_cli import main as generate_main
from modeling_ltm.generation_ltm import NonFiniteWeightsError
from modeling_ltm.tooling.train_cli import (
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
    assert ltm_main([*argv, "--max_steps", "6", "--tokenizer", str(other_tokenizer)]) == EXIT_CODE
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


# ------------------------------------------------------------------------------------------------ issue 21: silently
# wrong before, now refused (one line, exit code 2) or done right


def test_generate_refuses_a_folder_whose_config_is_not_an_ltm(saved_model, tmp_path, capsys):
    from transformers import GPT2Config

    bad = copy_model(saved_model, tmp_path / "gpt2-config")
    GPT2Config(vocab_size=300).save_pretrained(bad)  # LTM weights, a GPT-2 config.json
    assert generate_main([str(bad), "--prompt", "ROMEO:"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm generate", str(bad / "config.json"), "'gpt2'", "not 'ltm'")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--top-p", "2"], "--top-p must be in (0, 1]"),
        (["--top-p", "nan"], "--top-p must be in (0, 1]"),
        (["--stop-string", ""], '--stop-string ""'),
        (["--temperature", "inf"], "--temperature must be a finite number > 0"),
        (["--device", "meta"], "--device meta: the meta device"),
    ],
    ids=["top-p-2", "top-p-nan", "empty-stop-string", "temperature-inf", "device-meta"],
)
def test_generate_flags_out_of_range_are_one_line(saved_model, capsys, flags, fragment):
    assert generate_main([str(saved_model), "--prompt", "ROMEO:", *flags]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm generate", fragment)


def test_a_binary_prompts_file_is_named(saved_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.png"
    prompts.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert generate_main([str(saved_model), "--prompts-file", str(prompts)]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm generate", str(prompts), "not UTF-8 text", "one prompt per line")


@pytest.fixture
def fresh_lm_eval_logging():
    """lm-eval binds its log handler to the `sys.stderr` of the first command in the process (here an earlier test's
    captured stream, closed since): drop it before and after a test that runs lm-eval's command line."""
    import logging

    import lm_eval.utils

    def reset():
        logger = logging.getLogger("lm_eval")
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        lm_eval.utils._LOGGING_CONFIGURED = False

    reset()
    yield
    reset()


@pytest.mark.usefixtures("fresh_lm_eval_logging")
def test_a_tokenizer_larger_than_the_vocabulary_is_one_line(saved_model, tmp_path, capsys):
    from eval_harness.__main__ import main as eval_main

    bad = copy_model(saved_model, tmp_path / "big-tokenizer")
    small_tokenizer(20_000, 400).save_pretrained(bad)  # 400 tokens for a model of 300
    assert generate_main([str(bad), "--prompt", "ROMEO:"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm generate", "400 tokens", "vocab_size is 300", str(bad))
    argv = ["run", "--model", "ltm", "--model_args", f"pretrained={bad}", "--tasks", "arithmetic_local",
            "--include_path", str(REPO_ROOT / "eval_harness" / "tasks"), "--limit", "1"]  # fmt: skip
    assert eval_main(argv) == EXIT_CODE
    assert_one_line_error(capsys, "ltm eval", "400 tokens", "vocab_size is 300")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--block_size", "0"], "--block_size must be >= 2"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
        (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be >= 1"),
        (["--fp16"], "--fp16 needs a GPU"),
        (["--report_to", "wandb"], "--report_to wandb"),
    ],
    ids=["block-size-0", "accumulation-0", "eval-batch-0", "fp16-on-cpu", "wandb-missing"],
)
def test_train_flags_the_machine_cannot_honour_are_one_line(train_setup, capsys, flags, fragment):
    if flags == ["--fp16"] and torch.cuda.is_available():
        pytest.skip("fp16 runs on this machine's GPU")
    if flags[:2] == ["--report_to", "wandb"]:
        import importlib.util

        if importlib.util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed")
    out = train_setup[2] / "out"
    assert train(train_setup, "--output_dir", str(out), *flags) == EXIT_CODE
    assert_one_line_error(capsys, "ltm train", fragment)
    assert not out.exists()


def _raise_disk_full(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


def test_a_full_disk_is_reported_as_a_full_disk(saved_model, train_setup, monkeypatch, capsys):
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _raise_disk_full)
    out = train_setup[2] / "run"
    assert train(train_setup, "--output_dir", str(out), "--sample_max_new_tokens", "0") == EXIT_CODE
    line = assert_one_line_error(capsys, "ltm train", "the disk is full", "free some space")
    assert "truncated" not in line and "corrupt" not in line
    assert not (out / "model.safetensors").exists()
    hub = train_setup[2] / "hub"
    assert export_main([str(saved_model), str(hub)]) == EXIT_CODE
    line = assert_one_line_error(capsys, "ltm export", "the disk is full")
    assert "truncated" not in line
    assert not hub.exists() and not [p for p in hub.parent.iterdir() if p.name.startswith(".hub.tmp")]


def test_a_full_disk_oserror_names_the_file():
    import errno

    from modeling_ltm.tooling.cli_errors import message_for

    message = message_for(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/tokenizer.json"))
    assert message.startswith("the disk is full writing /data/run/tokenizer.json")


def test_resume_names_no_other_data_for_the_same_file_and_no_version_warning(train_setup, monkeypatch, capsys):
    preset, corpus, tmp_path = train_setup
    monkeypatch.chdir(corpus.parent)
    out = tmp_path / "run"
    save = ["--save_strategy", "steps", "--save_steps", "1", "--sample_max_new_tokens", "0"]
    argv = ["train", "--config", str(preset), "--cache_dir", str(tmp_path / "hf"), *FAST_FLAGS, *save,
            "--output_dir", str(out)]  # fmt: skip
    assert ltm_main([*argv, "--dataset", corpus.name, "--max_steps", "2"]) == 0  # a relative path
    capsys.readouterr()
    assert ltm_main([*argv, "--dataset", str(corpus), "--max_steps", "3", "--resume_from_checkpoint", "True"]) == 0
    err = capsys.readouterr().err
    assert "other training data" not in err
    assert "current version is" not in err and "trained with" not in err  # transformers' version warning


def test_a_killed_export_leaves_no_staging_folder_and_exports_get_the_usual_mode(saved_model, tmp_path):
    import stat

    stale = tmp_path / ".hub.tmp-999999999-x1y2"  # what an export killed midway left (its pid is gone)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    old_umask = os.umask(0o022)
    try:
        export_for_hub(saved_model, tmp_path / "hub")
    finally:
        os.umask(old_umask)
    assert not stale.exists()
    assert stat.S_IMODE((tmp_path / "hub").stat().st_mode) == 0o755


def test_ltm_trainer_refuses_empty_ragged_and_out_of_vocabulary_datasets(model, tmp_path):
    from datasets import Dataset

    from modeling_ltm import LTMTrainer, LTMTrainingArguments

    args = LTMTrainingArguments(str(tmp_path / "out"), report_to="none", max_steps=1, per_device_eval_batch_size=2)
    good = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 4})
    empty = {"input_ids": []}
    ragged = {"input_ids": [[1, 2, 3, 4]] * 2 + [[5, 6, 7]]}
    out_of_vocabulary = {"input_ids": [[1, 2, 3, 4], [1, 500, 3, 4]]}
    cases = [
        (empty, r"`train_dataset` has no rows"),
        (ragged, r"`train_dataset` row 2 has 3 tokens in column `input_ids`"),
        (out_of_vocabulary, r"`train_dataset` row 1, column `input_ids`, holds token id 500"),
    ]
    for columns, message in cases:
        with pytest.raises(ValueError, match=message):
            LTMTrainer(model=model, args=args, train_dataset=Dataset.from_dict(columns))
    trainer = LTMTrainer(model=model, args=args, train_dataset=good, eval_dataset=good)
    with pytest.raises(ValueError, match="`eval_dataset` has no rows"):
        trainer.evaluate(eval_dataset=Dataset.from_dict({"input_ids": []}))


def test_pickled_weights_are_refused_by_name_and_never_unpickled(saved_model, tmp_path, capsys):
    from eval_harness.__main__ import main as eval_main

    marker = tmp_path / "pwned"
    folder = copy_model(saved_model, tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    torch.save(_Payload(f"touch {marker}"), folder / "pytorch_model.bin")
    weights = str(folder / "pytorch_model.bin")
    assert generate_main([str(folder), "--prompt", "ROMEO:"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm generate", weights, "never unpickles", "safetensors")
    assert export_main([str(folder), str(tmp_path / "hub")]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm export", weights, "safetensors")
    assert eval_main(["run", "--model", "ltm", "--model_args", f"pretrained={folder}", "--tasks", "x"]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm eval", weights, "safetensors")
    assert ltm_main(["train", "--config", str(folder), "--output_dir", str(tmp_path / "out")]) == EXIT_CODE
    line = assert_one_line_error(capsys, "ltm train", weights, "safetensors")
    assert "weights_only" not in line
    assert not marker.exists()


@pytest.mark.usefixtures("fresh_lm_eval_logging")
def test_eval_exits_non_zero_when_its_results_cannot_be_saved(saved_model, tmp_path, monkeypatch, capsys):
    from lm_eval.loggers.evaluation_tracker import EvaluationTracker

    from eval_harness.__main__ import main as eval_main

    in_the_way = tmp_path / "results"
    in_the_way.write_text("an existing file")
    argv = ["run", "--model", "ltm", "--model_args", f"pretrained={saved_model},num_inference_steps=1",
            "--tasks", "arithmetic_local", "--include_path", str(REPO_ROOT / "eval_harness" / "tasks"),
            "--limit", "1", "--num_fewshot", "0", "--device", "cpu"]  # fmt: skip
    assert eval_main([*argv, "--output_path", str(in_the_way)]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm eval", "--output_path", "is a file")

    def fails(self, results, samples=None):  # as lm-eval does when the write fails: a warning, no file
        pass

    monkeypatch.setattr(EvaluationTracker, "save_results_aggregated", fails)
    assert eval_main([*argv, "--output_path", str(tmp_path / "out")]) == EXIT_CODE
    assert_one_line_error(capsys, "ltm eval", "could not save its results", str(tmp_path / "out"))


def test_from_pretrained_on_a_truncated_safetensors_names_the_folder(tmp_path):
    from conftest import tiny_config

    from modeling_ltm import LTMForCausalLM

    LTMForCausalLM(tiny_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=str(tmp_path)):
        LTMForCausalLM.from_pretrained(tmp_path)

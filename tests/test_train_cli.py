"""`ltm train` end to end on a slice of Tiny Shakespeare with a tiny preset, the Llama baseline, recipes, errors."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_ltm import LTMForCausalLM, data
from modeling_ltm.cli import main as ltm_main
from modeling_ltm.train_cli import parse_args


TINY_PRESET = {
    "model_type": "ltm",
    "vocab_size": 300,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
    "n_latents_per_layer": 2,
    "latent_dim": 16,
    "num_inference_steps": 2,
}

FAST_FLAGS = [
    "--max_steps", "3", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
    "--learning_rate", "3e-3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
    "--disable_tqdm", "true", "--eval_inference_steps", "2", "--eval_iw_samples", "2", "--max_eval_blocks", "2",
    "--sample_max_new_tokens", "4", "--dataloader_num_workers", "0",
]  # fmt: skip


@pytest.fixture
def setup(tmp_path, tiny_shakespeare_path):
    """A tiny preset JSON and a 30k-character slice of Tiny Shakespeare, as files."""
    preset = tmp_path / "ltm-test.json"
    preset.write_text(json.dumps(TINY_PRESET))
    corpus = tmp_path / "slice.txt"
    corpus.write_text(tiny_shakespeare_path.read_text(encoding="utf-8")[:30_000])
    return preset, corpus, tmp_path


def _train(setup, *extra):
    preset, corpus, tmp_path = setup
    argv = ["train", "--config", str(preset), "--dataset", str(corpus), "--cache_dir", str(tmp_path / "hf"),
            *FAST_FLAGS, *extra]  # fmt: skip
    return ltm_main(argv)


def test_ltm_train_writes_model_tokenizer_and_results(setup, capsys):
    out = setup[2] / "run"
    assert _train(setup, "--output_dir", str(out)) == 0
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "train_results.json",
        "eval_results.json",
        "training_args.json",
        "trainer_state.json",
        "modeling_ltm.py",
    ):
        assert (out / name).is_file(), name
    train_results = json.loads((out / "train_results.json").read_text())
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert train_results["train_tokens"] == 3 * 4 * 32 and train_results["train_tokens_per_second"] > 0
    for key in ("eval_nll_per_token", "eval_kl_per_token", "eval_elbo_ppl", "eval_iw_ppl"):
        assert key in eval_results
    assert eval_results["eval_iw_ppl"] <= eval_results["eval_elbo_ppl"] * 1.05  # K=2 IW bound, single-sample ELBO

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, LTMForCausalLM)
    assert model.config.vocab_size == len(tokenizer) == 300  # the preset's vocab_size sized the trained BPE
    assert model.config.eos_token_id == tokenizer.eos_token_id and model.config.pad_token_id == tokenizer.pad_token_id

    assert eval_results["eval_reconstruction_ppl"] > 1 and eval_results["eval_posterior_init_logvar"] == 0.0

    printed = capsys.readouterr().out
    assert "ELBO perplexity bound" in printed and "KL" in printed and "importance-weighted bound" in printed
    # The bound's fit, the reconstruction perplexity under its own name with the caveat, and the peer.
    assert "evaluation fit: T=2, lr 0.1 -> 0.01 (cosine), start at the prior (q = p(z))" in printed
    assert "reconstruction perplexity" in printed
    assert "not a bound on perplexity; not comparable with an autoregressive model's perplexity" in printed
    assert "Llama peer" in printed and "--baseline llama" in printed
    assert "training tokens/s" in printed and "wall time" in printed
    assert "sample" in printed


def test_ltm_train_continues_from_a_trained_folder_with_its_tokenizer(setup):
    first = setup[2] / "first"
    assert _train(setup, "--output_dir", str(first), "--max_steps", "1", "--sample_max_new_tokens", "0") == 0
    preset, corpus, tmp_path = setup
    second = tmp_path / "second"
    argv = [
        "train",
        "--config",
        str(first),
        "--dataset",
        str(corpus),
        "--cache_dir",
        str(tmp_path / "hf"),
        *FAST_FLAGS,
        "--max_steps",
        "1",
        "--sample_max_new_tokens",
        "0",
        "--output_dir",
        str(second),
    ]
    assert ltm_main(argv) == 0
    assert AutoTokenizer.from_pretrained(second).get_vocab() == AutoTokenizer.from_pretrained(first).get_vocab()


def test_max_train_minutes_stops_training_early(setup):
    out = setup[2] / "budget"
    code = _train(setup, "--output_dir", str(out), "--max_steps", "1000", "--max_train_minutes", "0.0001",
                  "--sample_max_new_tokens", "0")  # fmt: skip
    assert code == 0
    train_results = json.loads((out / "train_results.json").read_text())
    assert train_results["stopped_by_time_budget"] is True
    assert train_results["train_tokens"] <= 1 * 4 * 32  # stopped inside or after the first step


def test_baseline_llama_trains_the_peer_on_the_same_blocks(setup):
    out = setup[2] / "llama"
    assert _train(setup, "--baseline", "llama", "--output_dir", str(out)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    for key, value in (
        ("hidden_size", 32),
        ("num_hidden_layers", 2),
        ("num_attention_heads", 2),
        ("num_key_value_heads", 1),
        ("vocab_size", 300),
        ("tie_word_embeddings", True),
    ):
        assert config[key] == value, key
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["eval_perplexity"] == pytest.approx(2.718281828 ** eval_results["eval_loss"], rel=1e-6)


def test_recipe_supplies_defaults_that_flags_override(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps(TINY_PRESET))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"max_steps": 7, "learning_rate": 0.01, "num_inference_steps": 3, "block_size": 16}))
    model_args, data_args, training_args = parse_args(
        ["--config", str(preset), "--recipe", str(recipe), "--learning_rate", "0.02", "--output_dir", str(tmp_path)]
    )
    assert training_args.max_steps == 7 and training_args.num_inference_steps == 3 and data_args.block_size == 16
    assert training_args.learning_rate == 0.02


def test_preset_recipe_is_found_next_to_the_preset(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "p.json").write_text(json.dumps(TINY_PRESET))
    (tmp_path / "recipes" / "p.json").write_text(json.dumps({"max_steps": 11}))
    _, _, training_args = parse_args(["--config", str(tmp_path / "p.json"), "--output_dir", str(tmp_path)])
    assert training_args.max_steps == 11


def test_repository_tiny_preset_and_recipe_parse():
    from conftest import REPO_ROOT

    model_args, data_args, training_args = parse_args(["--config", str(REPO_ROOT / "configuration" / "ltm-tiny.json")])
    assert training_args.max_steps > 0 and training_args.eval_iw_samples > 0
    assert data_args.max_eval_blocks is not None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output_dir", "x"], "--config is required"),
        (["--config", "{preset}", "--block_size", "64", "--output_dir", "x"], "--block_size 64"),
        (["--config", "{preset}", "--dataset", "{tmp}/missing.txt", "{tmp}/other.txt"], "--dataset"),
        (["--config", "{tmp}/no-such-model"], "--config"),
        (["--config", "{preset}", "--recipe", "{tmp}/bad-recipe.json"], "unknown flags ['not_a_flag']"),
        (["--config", "{preset}", "--dataset", "{corpus}", "--text_column", "content"], "text_column='content'"),
        (["--config", "{preset}", "--dataset", "{corpus}", "--vocab_size", "100"], "--vocab_size"),
        (["--config", "{preset}", "--dataset", "{corpus}", "--tokenizer", "{tmp}/none"], "--tokenizer"),
        (["--config", "{preset}", "--num_inference_steps", "-1"], "num_inference_steps"),
        (["--config", "{preset}", "--max_train_minutes", "0"], "--max_train_minutes"),
    ],
)
def test_bad_input_gives_a_clear_error(setup, capsys, argv, message):
    preset, corpus, tmp_path = setup
    (tmp_path / "bad-recipe.json").write_text(json.dumps({"not_a_flag": 1}))
    argv = [a.format(preset=preset, corpus=corpus, tmp=tmp_path) for a in argv]
    assert ltm_main(["train", *argv, "--cache_dir", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "ltm train: error:" in err and message in err
    assert "Traceback" not in err


def test_embedded_corpus_offline_without_cache_names_dataset_flag(setup, monkeypatch, capsys):
    def fail(dest_dir):
        raise OSError("no network (test)")

    monkeypatch.setattr(data, "download_embedded_corpus_archive", fail)
    preset, _, tmp_path = setup
    code = ltm_main(["train", "--config", str(preset), "--corpus_cache_dir", str(tmp_path / "empty-cache"),
                     "--output_dir", str(tmp_path / "run")])  # fmt: skip
    assert code == 2
    assert "--dataset" in capsys.readouterr().err


@pytest.mark.slow
def test_ltm_train_under_torchrun_tokenizes_on_the_main_process_first(setup):
    """`torchrun --nproc_per_node 2 ltm train ... --ddp_backend gloo`: the main rank loads and tokenizes the corpus
    while the other waits (`main_process_first`), both train on the same blocks, and one model is saved."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    preset, corpus, tmp_path = setup
    out = tmp_path / "ddp-run"
    ltm = Path(sys.executable).with_name("ltm")
    command = [
        str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", str(ltm), "train",
        "--config", str(preset), "--dataset", str(corpus), "--cache_dir", str(tmp_path / "hf"), *FAST_FLAGS,
        "--output_dir", str(out), "--use_cpu", "true", "--ddp_backend", "gloo",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3

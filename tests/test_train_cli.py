"""`ltm train` end to end on a slice of Tiny Shakespeare with a tiny preset, the Llama baseline, recipes, errors."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_ltm import LTMForCausalLM
from modeling_ltm.tooling import data
from modeling_ltm.tooling.cli import main as ltm_main
from modeling_ltm.tooling.train_cli import parse_args


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
    # What it trained on, for `ltm export`'s card: in words, with the file's name and no local path.
    record = json.loads((out / "ltm_train_data.json").read_text())
    assert (record["corpus"], record["hub_dataset"]) == ("the local file(s) slice.txt", None)
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


# ---- run_clm.py's data options: streaming, train/validation files, builders from extensions, pre-tokenized data --


def _documents(corpus, n: int = 120) -> list[str]:
    """The slice cut into `n` documents (paragraph-sized pieces), for structured files."""
    text = corpus.read_text(encoding="utf-8")
    size = len(text) // n
    return [text[i * size : (i + 1) * size] for i in range(n)]


def test_streaming_trains_a_few_steps_on_a_local_jsonl_through_an_iterable_dataset(setup, monkeypatch, capsys):
    from datasets import IterableDataset

    from modeling_ltm.tooling import train_cli

    preset, corpus, tmp_path = setup
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": doc, "id": i}) for i, doc in enumerate(_documents(corpus))))
    seen = []

    class RecordingTrainer(train_cli.LTMTrainer):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs["train_dataset"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(train_cli, "LTMTrainer", RecordingTrainer)
    out = tmp_path / "streamed"
    argv = ["train", "--config", str(preset), "--dataset_name", str(jsonl), "--streaming", "--cache_dir",
            str(tmp_path / "hf"), *FAST_FLAGS, "--sample_max_new_tokens", "0", "--output_dir", str(out)]  # fmt: skip
    assert ltm_main(argv) == 0
    (train_dataset,) = seen
    assert isinstance(train_dataset, IterableDataset)
    first = next(iter(train_dataset))
    assert list(first) == ["input_ids"] and len(first["input_ids"]) == TINY_PRESET["max_position_embeddings"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    record = json.loads((out / "ltm_train_data.json").read_text())
    assert record["streaming"] is True and record["corpus"] == "the local file(s) corpus.jsonl, streamed"
    assert "a stream of training blocks" in capsys.readouterr().out
    # Streaming has no length: --max_steps is required, as in run_clm.py.
    no_steps = [a for a in argv if a != "--output_dir" and a != str(out)]
    no_steps[no_steps.index("--max_steps") + 1] = "-1"
    assert ltm_main([*no_steps, "--output_dir", str(tmp_path / "no-steps")]) == 2
    assert "--streaming needs --max_steps" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["input_ids_jsonl", "save_to_disk"])
def test_pretokenized_data_trains_on_its_token_ids(setup, form):
    from datasets import Dataset

    preset, corpus, tmp_path = setup
    documents = _documents(corpus)
    tokenizer = data.train_tokenizer(Dataset.from_dict({"text": documents}), vocab_size=300)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    rows = [tokenizer(doc, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for doc in documents]
    if form == "input_ids_jsonl":
        source = tmp_path / "tokens.jsonl"
        source.write_text("\n".join(json.dumps({"input_ids": ids}) for ids in rows))
    else:
        source = tmp_path / "tokens"
        Dataset.from_dict({"input_ids": rows}).save_to_disk(str(source))
    out = tmp_path / "pretokenized"
    argv = ["train", "--config", str(preset), "--dataset", str(source), "--cache_dir", str(tmp_path / "hf"),
            *FAST_FLAGS, "--sample_max_new_tokens", "0", "--output_dir", str(out)]  # fmt: skip
    assert ltm_main(argv) == 2  # token ids need the tokenizer that made them
    assert ltm_main([*argv, "--tokenizer", str(tmp_path / "tokenizer"), "--overwrite_output_dir"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()


def test_jsonl_trains_on_its_text_column_and_a_non_text_column_is_a_one_line_error(setup, capsys):
    preset, corpus, tmp_path = setup
    documents = _documents(corpus)
    train, held_out = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("\n".join(json.dumps({"content": doc, "id": i}) for i, doc in enumerate(documents[:100])))
    held_out.write_text("\n".join(json.dumps({"content": doc, "id": i}) for i, doc in enumerate(documents[100:])))
    out = tmp_path / "files"
    argv = ["train", "--config", str(preset), "--train_file", str(train), "--validation_file", str(held_out),
            "--text_column", "content", "--cache_dir", str(tmp_path / "hf"), *FAST_FLAGS, "--max_steps", "1",
            "--sample_max_new_tokens", "0"]  # fmt: skip
    assert ltm_main([*argv, "--output_dir", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    # The BPE was trained on the text, not on the raw JSON lines: no token of the JSON syntax around it.
    assert not any('"content"' in token or '{"' in token for token in tokenizer.get_vocab())
    record = json.loads((out / "ltm_train_data.json").read_text())
    assert record["corpus"] == "the local file train.jsonl (json), column 'content', held out: dev.jsonl"
    capsys.readouterr()

    assert ltm_main([*argv, "--text_column", "id", "--output_dir", str(tmp_path / "ids")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--text_column 'id' of train.jsonl holds int64 values, not text" in err and "--text_column" in err


def test_continuing_a_trained_run_reuses_its_recorded_recipe_unless_flags_override(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(TINY_PRESET))
    recorded = {"learning_rate": 0.002, "lr_scheduler_type": "cosine", "weight_decay": 0.1, "warmup_steps": 20,
                "max_steps": 400, "num_inference_steps": 8, "inference_lr": 0.3, "output_dir": "/elsewhere",
                "logging_dir": "/elsewhere/logs"}  # fmt: skip
    (run / "training_args.json").write_text(json.dumps(recorded))
    (run / "ltm_train_data.json").write_text(json.dumps({"block_size": 16}))
    _, data_args, training_args = parse_args(
        ["--config", str(run), "--max_steps", "5", "--output_dir", str(tmp_path / "next")]
    )
    assert training_args.learning_rate == 0.002 and training_args.weight_decay == 0.1
    assert training_args.lr_scheduler_type == "cosine" and training_args.warmup_steps == 20
    assert training_args.num_inference_steps == 8 and training_args.inference_lr == 0.3
    assert data_args.block_size == 16
    assert training_args.max_steps == 5 and training_args.output_dir == str(tmp_path / "next")  # flags win
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "recorded recipe" in line]
    assert "learning_rate=0.002" in line and "block_size=16" in line and "max_steps" in line.split("instead:")[1]
    # A preset (not a run folder) has no recorded recipe: transformers' defaults, as before.
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps(TINY_PRESET))
    _, _, plain = parse_args(["--config", str(preset), "--output_dir", str(tmp_path / "p")])
    assert plain.learning_rate == 5e-5

"""Hub export, model card and push (hub_cards/): the exported folder loads without our package, the card is valid
Hub metadata, and the push uploads exactly the folder — all offline."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO_ROOT, corpus_text, tiny_config
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast, TrainingArguments

from hub_cards import HubPushError, export_for_hub, push_folder
from hub_cards.card import (
    CITATION,
    PLACEHOLDER_NOTE,
    REPO_ID_PLACEHOLDER,
    fill_in_repo_id,
    lm_eval_command,
    lm_eval_results,
    load_lm_eval_results,
    trainer_eval_results,
    usage_snippet,
)
from hub_cards.cli import export_main, push_main
from hub_cards.export import REMOTE_CODE_FILES, read_training_hyperparameters
from modeling_ltm import LTMForCausalLM, PosteriorFitSettings
from modeling_ltm.configuration_ltm import MIN_TRANSFORMERS_VERSION
from modeling_ltm.inference import RECONSTRUCTION_CAVEAT


TRAINER_METRICS = {
    "eval_loss": 4.61,
    "eval_inference_steps": 4,
    "eval_elbo_ppl": 101.5,
    "eval_iw_ppl": 99.25,
    "eval_nll_per_token": 4.5,
    "eval_kl_per_token": 0.125,
}
LM_EVAL_RESULTS = {
    "results": {
        "wikitext": {
            "alias": "wikitext",
            "word_perplexity,none": 55.5,
            "word_perplexity_stderr,none": "N/A",
            "bits_per_byte,none": 1.25,
        },
        "lambada_openai": {"alias": "lambada_openai", "acc,none": 0.25, "acc_stderr,none": 0.01},
    },
    "configs": {
        "wikitext": {
            "dataset_path": "EleutherAI/wikitext_document_level",
            "dataset_name": "wikitext-2-raw-v1",
            "test_split": "test",
        }
    },
    "n-shot": {"wikitext": 0, "lambada_openai": 0},
    # What eval_harness's model "ltm" records about its rolling bound.
    "config": {
        "model": "ltm",
        "ltm_num_inference_steps": 4,
        "ltm_rolling_bound": "elbo",
        "ltm_rolling_kl_per_token": 0.75,
    },
}
DATASET = "karpathy/tiny_shakespeare"
TRAINING_DATA = {"corpus": f"`{DATASET}`, column 'text'", "hub_dataset": DATASET, "block_size": 64}
PROMPT_IDS = [[5, 17, 33, 2, 9, 41, 7, 12]]


def _train_tokenizer() -> PreTrainedTokenizerFast:
    """A 128-token BPE tokenizer trained on the start of tiny Shakespeare (or a fixed text if it is absent)."""
    text = corpus_text(20000)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>", bos_token="<eos>")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A Trainer-like output folder: model, tokenizer, results JSONs, trainer state, pickled training arguments."""
    run = tmp_path_factory.mktemp("run") / "ltm-tiny"
    torch.manual_seed(0)
    LTMForCausalLM(tiny_config(bos_token_id=1, eos_token_id=1)).save_pretrained(run)
    _train_tokenizer().save_pretrained(run)
    (run / "eval_results.json").write_text(json.dumps({**TRAINER_METRICS, "epoch": 1.0}))
    (run / "train_results.json").write_text(json.dumps({"train_loss": 4.75, "epoch": 1.0}))
    log_history = [{"step": 10, "loss": 5.25}, {"step": 20, "loss": 4.25}, {"step": 20, "train_loss": 4.75}]
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": log_history}))
    (run / "ltm_train_data.json").write_text(json.dumps(TRAINING_DATA))  # what `ltm train` records
    args = TrainingArguments(output_dir=str(run), learning_rate=4e-4, max_steps=20, weight_decay=0.1, report_to="none")
    torch.save(args, run / "training_args.bin")
    (run / "lm_eval_results.json").write_text(json.dumps(LM_EVAL_RESULTS))
    return run


@pytest.fixture(scope="module")
def exported(run_dir) -> Path:
    return export_for_hub(
        run_dir, run_dir / "hub", lm_eval_results=[run_dir / "lm_eval_results.json"], datasets=[DATASET]
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------- export


def test_export_writes_a_loadable_hub_folder(exported):
    names = {p.name for p in exported.iterdir()}
    expected = {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json"}
    assert expected | set(REMOTE_CODE_FILES) <= names
    assert not any(name.startswith(".") for name in names)
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".hub.tmp")]  # staging folder removed
    for name in REMOTE_CODE_FILES:  # the remote code is our package's code, byte for byte
        assert (exported / name).read_bytes() == (REPO_ROOT / "modeling_ltm" / name).read_bytes()
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_ltm.LTMConfig",
        "AutoModelForCausalLM": "modeling_ltm.LTMForCausalLM",
    }
    # Custom generation attributes survive GenerationConfig's own save/load.
    generation_config = GenerationConfig.from_pretrained(exported)
    assert generation_config.num_inference_steps == 4
    assert generation_config.inference_lr == pytest.approx(0.3)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.model_max_length == 64
    assert set(tokenizer("ROMEO:")) == {"input_ids", "attention_mask"}


@pytest.mark.slow
def test_fresh_process_loads_remote_code_and_matches_original(exported, run_dir, tmp_path):
    """Without our packages importable, the folder loads with trust_remote_code; logits, greedy generation with
    given latents, and the card's usage snippet (posterior fit + greedy generation) match the original model."""
    snippet = usage_snippet(str(exported), num_inference_steps=4)
    latents = torch.randn(1, *tiny_config().latent_shape, generator=torch.Generator().manual_seed(1))
    torch.save({"input_ids": torch.tensor(PROMPT_IDS), "latents": latents}, tmp_path / "inputs.pt")
    child = textwrap.dedent(
        f"""
        import importlib.abc, importlib.util, sys
        BLOCKED = ("modeling_ltm", "eval_harness", "hub_cards")
        # Drop the editable install's finder and the checkout from sys.path: the package is then absent...
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
        sys.path[:] = [p for p in sys.path if p not in ("", {str(REPO_ROOT)!r})]
        assert all(importlib.util.find_spec(name) is None for name in BLOCKED), "package still importable"

        class Blocker(importlib.abc.MetaPathFinder):  # ...and stays absent, whatever imports it later.
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"{{name}} is blocked in this test")

        sys.meta_path.insert(0, Blocker())

        import torch
        from transformers import AutoModelForCausalLM

        # The card's usage snippet, verbatim:
        {textwrap.indent(snippet, "        ").lstrip()}

        data = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            logits_prior = model(data["input_ids"]).logits
            logits_z = model(data["input_ids"], latents=data["latents"]).logits
        greedy = model.generate(data["input_ids"], latents=data["latents"], max_new_tokens=8, do_sample=False)
        torch.save(
            dict(
                model_class=type(model).__module__,
                logits_prior=logits_prior,
                logits_z=logits_z,
                greedy=greedy,
                snippet_output_ids=output_ids,
                snippet_elbo=bounds.elbo,
            ),
            {str(tmp_path / "outputs.pt")!r},
        )
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-c", child], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = torch.load(tmp_path / "outputs.pt")
    assert out["model_class"].startswith("transformers_modules")  # really the remote code, not our package

    original = LTMForCausalLM.from_pretrained(run_dir).eval()
    data = torch.load(tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.testing.assert_close(out["logits_prior"], original(data["input_ids"]).logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            out["logits_z"], original(data["input_ids"], latents=data["latents"]).logits, rtol=0, atol=1e-6
        )
    greedy = original.generate(data["input_ids"], latents=data["latents"], max_new_tokens=8, do_sample=False)
    assert torch.equal(out["greedy"], greedy)

    # The snippet's steps on the original model, with no global seed: the same greedy continuation (its fit is seeded
    # from the prompt) and the same bound (seed=0).
    tokenizer = AutoTokenizer.from_pretrained(exported)
    inputs = tokenizer("ROMEO:", return_tensors="pt")
    torch.manual_seed(12345)
    output_ids = original.generate(**inputs, max_new_tokens=32, do_sample=False, num_inference_steps=4)
    bounds = original.evaluate_posterior(inputs["input_ids"], inputs["attention_mask"], seed=0)
    assert torch.equal(out["snippet_output_ids"], output_ids)
    torch.testing.assert_close(out["snippet_elbo"], bounds.elbo)


def test_export_of_a_checkpoint_n_folder_reads_state_and_parent_tokenizer(run_dir, tmp_path):
    checkpoint = tmp_path / "ltm-tiny" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "generation_config.json", "training_args.bin"):
        (checkpoint / name).write_bytes((run_dir / name).read_bytes())
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tokenizer only in the run folder
        (checkpoint.parent / name).write_bytes((run_dir / name).read_bytes())
    log_history = [
        {"step": 5, "loss": 5.0},
        {"step": 5, "eval_loss": 4.9, "eval_elbo_ppl": 140.0},
        {"step": 5, "eval_kl_per_token": 0.5},
    ]
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": log_history}))
    folder = export_for_hub(checkpoint, tmp_path / "hub", repo_id="someone/ltm-tiny")
    card = ModelCard.load(folder / "README.md")
    assert card.data.model_name == "ltm-tiny"
    values = {(r.metric_type, r.metric_value) for r in card.data.eval_results}
    assert values == {("perplexity", 140.0), ("kl", 0.5)}
    assert "| trained_steps | 5 |" in card.text
    assert "| learning_rate | 0.0004 |" in card.text
    assert 'from_pretrained("someone/ltm-tiny"' in card.text


def test_export_errors_are_clear_and_leave_nothing_behind(run_dir, exported, tmp_path, capsys):
    with pytest.raises(ValueError, match="no config.json"):
        export_for_hub(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="--overwrite"):
        export_for_hub(run_dir, exported)
    with pytest.raises(ValueError, match="would contain"):
        export_for_hub(run_dir, run_dir.parent, overwrite=True)
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((run_dir / name).read_bytes())
    assert export_main([str(no_tokenizer), str(tmp_path / "out")]) == 2  # one-line error, exit code 2 (cli_errors)
    assert "--tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


# ----------------------------------------------------------------------------------------------------- card


def test_card_metadata_validates_and_matches_the_inputs(exported):
    card = ModelCard.load(exported / "README.md")
    data = ModelCardData(**card.data.to_dict())  # re-validates the parsed metadata, model-index included
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert {"ltm", "latent-thought", "custom_code"} <= set(data.tags)
    assert data.license == "apache-2.0"
    assert data.datasets == [DATASET]

    expected = trainer_eval_results(TRAINER_METRICS, dataset_name=DATASET) + lm_eval_results(LM_EVAL_RESULTS)
    # 4 LTM metrics (eval_loss skipped), 3 lm-eval metrics (stderr, alias skipped) and the rolling bound's KL.
    assert len(expected) == 4 + 3 + 1

    def key(result):
        return (result.task_name, result.dataset_name, result.metric_type, result.metric_name, result.metric_value)

    assert sorted(map(key, data.eval_results)) == sorted(map(key, expected))
    wikitext = next(r for r in data.eval_results if r.metric_type == "word_perplexity")
    assert (wikitext.dataset_type, wikitext.dataset_config, wikitext.dataset_split) == (
        "EleutherAI/wikitext_document_level",
        "wikitext-2-raw-v1",
        "test",
    )
    assert wikitext.metric_name == "word_perplexity (elbo bound, T=4)"  # says which bound
    kl = [r for r in data.eval_results if r.task_name == "wikitext" and r.metric_type == "kl"]
    assert [r.metric_value for r in kl] == [0.75]
    elbo = next(r for r in data.eval_results if r.metric_type == "perplexity" and "ELBO" in r.metric_name)
    assert elbo.metric_name.endswith("T=4")


def test_trainer_results_name_their_fits_and_the_reconstruction_perplexity():
    metrics = {
        **TRAINER_METRICS,
        "eval_inference_lr": 0.1,
        "eval_posterior_init_logvar": 0.0,
        "eval_posterior_fixed_noise": False,
        "eval_iw_samples": 8,
        "eval_reconstruction_ppl": 52.7,
        "eval_reconstruction_inference_steps": 16,
        "eval_reconstruction_inference_lr": 0.3,
        "eval_reconstruction_init_logvar": -5.0,
    }
    results = {r.metric_name.split(",")[0]: r for r in trainer_eval_results(metrics, dataset_name=DATASET)}
    elbo = results["ELBO perplexity bound exp(-ELBO/token)"]
    assert elbo.metric_name.endswith("T=4, lr=0.1, start at the prior, eps redrawn")
    assert results["importance-weighted perplexity bound"].metric_name.endswith("eps redrawn, K=8")
    (reconstruction,) = [r for r in results.values() if "reconstruction" in r.metric_name]
    # Never typed or named as a perplexity of the model: its own type, the caveat and the training fit's settings.
    assert reconstruction.metric_type == "reconstruction_perplexity" and reconstruction.metric_value == 52.7
    assert reconstruction.task_name == "Language modeling (reconstruction, not a bound)"
    assert "not a bound on perplexity; not comparable with an autoregressive model's perplexity" in (
        reconstruction.metric_name
    )
    assert reconstruction.metric_name.endswith("T=16, lr=0.3, start logvar=-5, one fixed eps")
    # A model with a posterior encoder evaluates from its proposal: the names say so, not "start at the prior".
    warm = {**metrics, "eval_inference_steps": 8, "eval_inference_lr": 0.03, "eval_posterior_warm_start": True}
    names = [r.metric_name for r in trainer_eval_results(warm, dataset_name=DATASET)]
    elbo_name = next(n for n in names if n.startswith("ELBO perplexity bound"))
    assert elbo_name.endswith("T=8, lr=0.03, warm start from the posterior encoder, eps redrawn")
    assert not any("start at the prior" in n for n in names)
    assert next(n for n in names if "reconstruction" in n).endswith("start logvar=-5, one fixed eps")


def test_lm_eval_results_folder_keeps_the_newest_run(tmp_path):
    run = tmp_path / "lm_eval" / "ltm-tiny"
    run.mkdir(parents=True)
    old, new = json.loads(json.dumps(LM_EVAL_RESULTS)), json.loads(json.dumps(LM_EVAL_RESULTS))
    new["results"]["wikitext"]["word_perplexity,none"] = 44.0
    (run / "results_2025-01-01.json").write_text(json.dumps(old))
    (run / "results_2025-01-02.json").write_text(json.dumps(new))
    os.utime(run / "results_2025-01-01.json", (1, 1))
    results = load_lm_eval_results([tmp_path / "lm_eval"])
    assert len(results) == 4
    assert next(r.metric_value for r in results if r.metric_type == "word_perplexity") == 44.0
    with pytest.raises(ValueError, match="'results' section"):
        lm_eval_results({"wikitext": {}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No lm-eval results"):
        load_lm_eval_results([tmp_path / "empty"])
    with pytest.raises(ValueError, match="do not exist"):
        load_lm_eval_results([tmp_path / "missing.json"])


def test_card_body_has_usage_architecture_bounds_and_citation(exported):
    text = ModelCard.load(exported / "README.md").text
    assert usage_snippet(None, num_inference_steps=4) in text  # exported without --repo-id: the placeholder
    assert f'pip install "transformers>={MIN_TRANSFORMERS_VERSION}"' in text  # the lowest it runs on
    assert lm_eval_command(None) in text
    num_parameters = LTMForCausalLM(tiny_config()).num_parameters()
    assert f"| parameters | {num_parameters:,} (" in text
    assert "| latent vectors per layer | 4 |" in text
    assert "| inference steps `T` (default) | 4 |" in text
    assert "KL" in text and "Importance-weighted bound" in text and "ELBO bound" in text
    evaluation = PosteriorFitSettings.evaluation(tiny_config()).describe()
    assert f"| evaluation fit (every bound below) | {evaluation} |" in text
    assert "reconstruction perplexity" in text and RECONSTRUCTION_CAVEAT in text
    assert "| learning_rate | 0.0004 |" in text
    # The last logged training loss under its name, the run's mean under its own.
    assert "| final_train_loss | 4.25 |" in text and "| final_train_loss_step | 20 |" in text
    assert "| mean_train_loss | 4.75 |" in text
    assert CITATION in text and "arXiv" in text


# ----------------------------------------------------------------------------------------------------- push


class RecordingHfApi(HfApi):
    """An HfApi whose network calls are recorded instead of sent: `upload_folder` itself runs for real (file
    collection, README checks) up to the commit, whose operations are captured with their bytes."""

    def __init__(self, fail_with: Exception | None = None):
        super().__init__(token="hf_recording")
        self.calls, self.uploaded, self.fail_with = [], {}, fail_with

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail_with is not None:
            raise self.fail_with
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def _validate_yaml(self, content, repo_type=None, token=None):  # the Hub's validation endpoint
        self.calls.append(("validate_yaml", ModelCard(content).data.model_name))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, kwargs))
        for op in operations:
            self.uploaded[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")


@pytest.fixture
def online(monkeypatch):
    """Leave offline mode for the push logic while the recording API makes sure nothing reaches the network;
    `hf_xet`'s streamed upload is turned off so `upload_folder` ends in `create_commit`."""
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)


def test_push_uploads_exactly_the_export_folder(exported, online, tmp_path):
    exported = Path(shutil.copytree(exported, tmp_path / "hub"))  # the push writes the repo id into its card
    before = _snapshot(exported)
    api = RecordingHfApi()
    url = push_folder(
        exported, "someone/ltm-tiny", private=True, revision="v1", commit_message="first", token="hf_x", api=api
    )
    assert url == "https://huggingface.co/someone/ltm-tiny/commit/0"
    after = _snapshot(exported)
    assert api.uploaded == after  # same file list, same bytes as the folder
    # Only the card changed: the repository id in place of the marked placeholder.
    assert {name for name in before if before[name] != after[name]} == {"README.md"}
    assert after["README.md"].decode() == fill_in_repo_id(before["README.md"].decode(), "someone/ltm-tiny")
    (create_repo, create_branch, validate, commit) = api.calls
    assert create_repo == ("create_repo", "someone/ltm-tiny", {**create_repo[2], "private": True, "token": "hf_x"})
    assert create_branch[2]["branch"] == "v1"
    assert validate[0] == "validate_yaml"
    assert commit[2]["revision"] == "v1" and commit[2]["commit_message"] == "first"


def test_push_without_token_says_what_to_set(exported, monkeypatch, tmp_path, capsys):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))  # no cached token
    before = _snapshot(exported)
    api = RecordingHfApi()
    with pytest.raises(HubPushError, match="HF_TOKEN.*hf auth login"):
        push_folder(exported, "someone/ltm-tiny", api=api)
    assert api.calls == []
    assert push_main([str(exported), "someone/ltm-tiny"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err
    assert _snapshot(exported) == before


def test_push_offline_or_unreachable_fails_cleanly(exported, online, monkeypatch):
    before = _snapshot(exported)
    with pytest.raises(HubPushError, match="Pushing .* failed"):
        push_folder(exported, "someone/ltm-tiny", token="hf_x", api=RecordingHfApi(ConnectionError("no route")))
    monkeypatch.setattr(constants, "is_offline_mode", lambda: True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE"):
        push_folder(exported, "someone/ltm-tiny", token="hf_x", api=RecordingHfApi())
    with pytest.raises(ValueError, match="ltm export"):
        push_folder(exported.parent / "nowhere", "someone/ltm-tiny", token="hf_x")
    with pytest.raises(ValueError, match="repo_id"):
        push_folder(exported, "not a repo id", token="hf_x")
    assert _snapshot(exported) == before


def test_transformers_push_to_hub_uploads_the_same_files(exported, online, monkeypatch):
    """`model.push_to_hub` (transformers' own) on the exported model uploads the export's bytes, and keeps the card
    already on the Hub (the one `ltm push` uploaded)."""
    api = RecordingHfApi()
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: api.create_repo(repo_id, **kw))
    monkeypatch.setattr(
        HfApi, "create_commit", lambda self, repo_id, operations, **kw: api.create_commit(repo_id, operations, **kw)
    )
    load_card = ModelCard.load
    monkeypatch.setattr(ModelCard, "load", classmethod(lambda cls, repo_id, **kw: load_card(exported / "README.md")))
    model = LTMForCausalLM.from_pretrained(exported)
    model.push_to_hub("someone/ltm-tiny", token="hf_x")
    export_files = _snapshot(exported)
    model_files = {"config.json", "generation_config.json", "model.safetensors", "README.md", *REMOTE_CODE_FILES}
    assert set(api.uploaded) == model_files
    for name in model_files - set(REMOTE_CODE_FILES):
        assert api.uploaded[name] == export_files[name], name
    for name in REMOTE_CODE_FILES:  # both copy the package's source (compared to it: it may change mid-run here)
        assert api.uploaded[name] == (REPO_ROOT / "modeling_ltm" / name).read_bytes(), name


def test_the_card_lists_the_fast_steps_ramp_only_for_a_ramped_run(tmp_path):
    """A run whose fast steps T were ramped (`num_inference_steps_end`) shows the ramp and its window; a constant-T
    run shows neither (the window's defaults would say nothing about it)."""
    base = {"learning_rate": 3e-3, "max_steps": 10, "num_inference_steps": 0}
    window = {"num_inference_steps_ramp_start": 0.51, "num_inference_steps_ramp_stop": 1.0}
    runs = {
        "ramped": {**base, "num_inference_steps_end": 16, **window},
        "constant": {**base, "num_inference_steps_end": None, **window},
    }
    for name, args in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "training_args.json").write_text(json.dumps(args))
    ramped = read_training_hyperparameters(tmp_path / "ramped")
    assert (ramped["num_inference_steps"], ramped["num_inference_steps_end"]) == (0, 16)
    assert (ramped["num_inference_steps_ramp_start"], ramped["num_inference_steps_ramp_stop"]) == (0.51, 1.0)
    constant = read_training_hyperparameters(tmp_path / "constant")
    assert constant["num_inference_steps"] == 0
    assert not {"num_inference_steps_end", "num_inference_steps_ramp_start", "num_inference_steps_ramp_stop"} & set(
        constant
    )


# ------------------------------------------------------------------------------------- the card is right for the Hub


def test_exported_card_names_no_local_path_only_a_marked_placeholder(exported, run_dir):
    text = (exported / "README.md").read_text()
    for local in (str(exported), str(run_dir), str(run_dir.parent), os.path.expanduser("~")):
        assert local not in text
    assert PLACEHOLDER_NOTE in text  # says what to replace, right above the code that loads it
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID_PLACEHOLDER}", trust_remote_code=True)' in text
    assert f"pretrained={REPO_ID_PLACEHOLDER}" in text  # the lm-eval command too


@pytest.mark.parametrize("prior_type", ["standard_normal", "diagonal_gaussian"])
def test_card_facts_are_generated_from_the_config(tmp_path, prior_type):
    from modeling_ltm.priors import PRIOR_DESCRIPTIONS

    run = tmp_path / "run"
    torch.manual_seed(0)
    LTMForCausalLM(tiny_config(bos_token_id=1, eos_token_id=1, prior_type=prior_type)).save_pretrained(run)
    _train_tokenizer().save_pretrained(run)
    text = (export_for_hub(run, tmp_path / "hub") / "README.md").read_text()
    description = PRIOR_DESCRIPTIONS[prior_type]
    assert f"| prior `p(z)` | {description} |" in text
    limitation = next(line for line in text.splitlines() if line.startswith("- The prior p(z)"))
    assert description in limitation and "isotropic" not in text
    assert ("trained with the decoder" in limitation) == (prior_type != "standard_normal")
    assert ("and the prior on `KL(q(z|x) || p(z))`" in text) == (prior_type != "standard_normal")
    assert "Data: not recorded in the checkpoint." in text  # nothing recorded, nothing claimed
    assert ModelCard.load(tmp_path / "hub" / "README.md").data.datasets is None


def test_recorded_corpus_becomes_the_card_data_line_and_datasets_metadata(run_dir, tmp_path):
    folder = export_for_hub(run_dir, tmp_path / "hub")  # no --dataset: what `ltm train` recorded
    card = ModelCard.load(folder / "README.md")
    assert card.data.datasets == [DATASET]
    assert f"Data: {TRAINING_DATA['corpus']}." in card.text
    assert "not recorded" not in card.text


def test_push_writes_the_repo_id_into_the_card_or_refuses(exported, online, tmp_path, capsys):
    folder = Path(shutil.copytree(exported, tmp_path / "hub"))
    api = RecordingHfApi()
    push_folder(folder, "someone/ltm-tiny", token="hf_x", api=api)
    text = (folder / "README.md").read_text()
    assert REPO_ID_PLACEHOLDER not in text and "PLACEHOLDER" not in text
    assert 'AutoTokenizer.from_pretrained("someone/ltm-tiny", trust_remote_code=True)' in text
    assert api.uploaded["README.md"] == text.encode()
    # The card now names someone/ltm-tiny: pushing it to another repository is refused, in one line, before any call.
    other = RecordingHfApi()
    with pytest.raises(ValueError, match="exported for another repository.*--repo-id someone/other"):
        push_folder(folder, "someone/other", token="hf_x", api=other)
    assert other.calls == []
    assert push_main([str(folder), "someone/other", "--token", "hf_x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--repo-id someone/other" in err
    push_folder(folder, "someone/ltm-tiny", token="hf_x", api=RecordingHfApi())  # its own repository: fine


def test_the_cards_usage_code_runs_against_the_exported_folder_without_a_prompt(exported, tmp_path):
    """The card's Python block, verbatim except that the repo id is the exported folder, in a fresh process with no
    stdin: it must neither hang on transformers' "run the custom code? [y/N]" prompt nor fail."""
    text = (exported / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    code = code.replace(PLACEHOLDER_NOTE, "").replace(REPO_ID_PLACEHOLDER, str(exported))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    assert "ELBO perplexity bound:" in result.stdout

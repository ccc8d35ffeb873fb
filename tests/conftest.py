"""Shared fixtures: a tiny LTM (2 layers, hidden 64) built fresh per test, and paths to the shared real text."""

import logging
import math
import os
from pathlib import Path


# No Hub here: any stray network call must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import modeling_ltm  # noqa: F401  (registers the Auto classes)
from modeling_ltm import LTMConfig, LTMForCausalLM


REPO_ROOT = Path(__file__).resolve().parent.parent
# The real text beside the checkout (never copied into the repo); LTM_TEST_SHARED_DATA points elsewhere, e.g. at a
# missing folder to check that the suite still runs everything but the real-data tests without it.
SHARED_DATA = Path(os.environ.get("LTM_TEST_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
TINY_SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
WIKITEXT2_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
# Tests that need *some* text (training, CLI, evaluation) run on Tiny Shakespeare when it is there and on the
# generated stand-in of tests/text_fixture.py otherwise, so a checkout without ../shared/data still runs them.
GENERATED_CORPUS_CHARS = 300_000


def corpus_text(num_chars: int | None = None) -> str:
    """The first `num_chars` characters of Tiny Shakespeare, or of the generated corpus when it is absent."""
    if TINY_SHAKESPEARE.exists():
        text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
        return text if num_chars is None else text[:num_chars]
    from text_fixture import generated_corpus

    return generated_corpus(GENERATED_CORPUS_CHARS if num_chars is None else num_chars)


def tiny_config(**overrides) -> LTMConfig:
    """The shape-test model: 2 layers, hidden 64, 4 heads (2 kv heads), 4 latents of width 32 per layer."""
    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        n_latents_per_layer=4,
        latent_dim=32,
        num_inference_steps=4,
    )
    kwargs.update(overrides)
    return LTMConfig(**kwargs)


def training_arguments(cls, output_dir, **overrides):
    """`cls` (TrainingArguments or LTMTrainingArguments) for a quiet CPU test run: no saving, no reporting, no
    progress bar, a log every step, batches of 4; `overrides` replace or add fields."""
    kwargs = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def small_tokenizer(num_chars: int, vocab_size: int):
    """The project's byte-level BPE (`modeling_ltm.tooling.data.train_tokenizer`) trained on `corpus_text(num_chars)`."""
    from datasets import Dataset

    from modeling_ltm.tooling.data import train_tokenizer

    return train_tokenizer(Dataset.from_dict({"text": [corpus_text(num_chars)]}), vocab_size=vocab_size)


def save_tiny_ltm_with_tokenizer(path: Path, vocab_size: int) -> Path:
    """Saves into `path` a tiny LTM (`tiny_config`, seed 0) and `small_tokenizer(8000, vocab_size)`; returns `path`."""
    tokenizer = small_tokenizer(num_chars=8000, vocab_size=vocab_size)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    LTMForCausalLM(config).eval().save_pretrained(path)
    return path


@pytest.fixture
def config() -> LTMConfig:
    return tiny_config()


@pytest.fixture
def model(config) -> LTMForCausalLM:
    torch.manual_seed(0)
    return LTMForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_shakespeare_path(tmp_path_factory) -> Path:
    """Tiny Shakespeare's file, or a file of the generated corpus when the shared data is absent."""
    if TINY_SHAKESPEARE.exists():
        return TINY_SHAKESPEARE
    path = tmp_path_factory.mktemp("corpus") / "generated_corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Every model in the suite is tiny: a second intra-op thread only adds synchronisation, and on a shared 2-core
    machine a descheduled OpenMP thread stalls each small op (tests ran ~10x slower under load). Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _DeprecationLogRecorder(logging.Handler):
    """Collects the deprecation notices that transformers logs (`logger.warning_once("... deprecated ...")`) instead
    of raising a `DeprecationWarning`, e.g. 5.24's "`past_key_values`/`cache_params` are deprecated"."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "deprecat" in message.lower():
            self.messages.append(f"{record.name}: {message}")


_DEPRECATION_LOG = _DeprecationLogRecorder()
logging.getLogger("transformers").addHandler(_DEPRECATION_LOG)


@pytest.fixture(autouse=True)
def fail_on_logged_deprecations():
    """A deprecation notice logged by transformers during a test fails it, like a `DeprecationWarning` does (see
    `filterwarnings` in pyproject.toml): the next rename is seen while the old name still works."""
    _DEPRECATION_LOG.messages.clear()
    yield
    if _DEPRECATION_LOG.messages:
        pytest.fail("transformers logged a deprecation about our calls:\n" + "\n".join(_DEPRECATION_LOG.messages))


def finite_metrics(results, task):
    """The metrics of `task` in lm-eval's results (`name,filter` keys, no stderr), asserted present and finite."""
    values = {k: v for k, v in results["results"][task].items() if "," in k and "stderr" not in k}
    assert values, results["results"][task]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values.values()), values
    return values

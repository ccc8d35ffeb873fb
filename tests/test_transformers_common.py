"""transformers' own common model and configuration tests (`ModelTesterMixin`, `ConfigTester`) run against `LTMModel`
and `LTMForCausalLM`, as a third-party model author would run them, with a tester written like transformers'
`LlamaModelTester`.

The test sources are not in the installed wheel, nor copied into this repository: they come once from the transformers
source distribution of the installed version (the lock's under `make test`, the newest release under
`make test-latest`: the test files import that release's own `testing_utils`), `pip download --no-deps --no-binary :all:
transformers==<version>`, into `~/.cache/ltm-hf/transformers-tests-<version>/` (`LTM_TRANSFORMERS_TESTS_CACHE` moves
it). The whole module is skipped, saying so, only when the package index cannot be reached.

The distribution ships `tests/test_modeling_common.py` and `tests/test_configuration_common.py` but not three modules
they import: `tests/generation/test_utils.py` (`GenerationTesterMixin`), `tests/exporters/test_export.py`
(`ExportTesterMixin`, the base of `ModelTesterMixin`) and `tests/utils/test_configuration_utils.py`
(`config_common_kwargs`). They are stood in for in memory (`_install_stand_ins`): the generation tests are run by hand
from transformers' repository (docs/transformers_contract.md), the export tests are not run, and
`config_common_kwargs` holds a non-default value for each field of 5.24's `PreTrainedConfig`.

Every test that cannot apply to an LTM is skipped below with its reason (`SKIPS`); docs/transformers_contract.md lists
the contracts an LTM keeps and the ones it cannot, with the test that shows each.
"""

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from modeling_ltm import LTMConfig, LTMForCausalLM, LTMModel


REPO_ROOT = Path(__file__).resolve().parent.parent
# The package the extracted test files become (their relative imports need one).
PACKAGE = "transformers_common_tests"
# The files taken from the source distribution's tests/ folder.
TEST_FILES = ("test_modeling_common.py", "test_configuration_common.py")


def installed_transformers_version() -> str:
    """The installed transformers' version: its common tests import its own `testing_utils`, so the test files must be
    those of the release that runs them (the lock's under `make test`, the newest under `make test-latest`)."""
    import transformers

    return transformers.__version__


def transformers_tests_folder(version: str) -> Path:
    """The folder holding transformers' common test files of `version` as the package `PACKAGE`, downloaded and
    extracted on the first call (a file lock keeps concurrent sessions from racing). Skips the calling module when the
    package index cannot be reached; any other failure of pip raises."""
    cache_root = Path(os.environ.get("LTM_TRANSFORMERS_TESTS_CACHE", Path.home() / ".cache" / "ltm-hf"))
    folder = cache_root / f"transformers-tests-{version}"
    package = folder / PACKAGE
    if all((package / name).exists() for name in TEST_FILES):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if all((package / name).exists() for name in TEST_FILES):
            return folder
        with tempfile.TemporaryDirectory() as download:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest",
                       download, f"transformers=={version}"]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            archives = list(Path(download).glob("transformers-*.tar.gz"))
            if result.returncode != 0 or not archives:
                output = (result.stdout + result.stderr).strip()
                if "No matching distribution" in output or "Could not find a version" in output:
                    raise RuntimeError(f"pip found no source distribution of transformers=={version}:\n{output}")
                pytest.skip(
                    f"transformers' common tests need the transformers=={version} source distribution, and the "
                    f"package index could not be reached ({' '.join(command)} failed: {output.splitlines()[-1:]})",
                    allow_module_level=True,
                )
            staging = Path(tempfile.mkdtemp(dir=folder))
            with tarfile.open(archives[0]) as archive:
                for name in TEST_FILES:
                    member = archive.getmember(f"transformers-{version}/tests/{name}")
                    (staging / name).write_bytes(archive.extractfile(member).read())
            (staging / "__init__.py").write_text("")
            staging.rename(package)
    return folder


def _install_stand_ins() -> None:
    """In-memory modules for the three imports of the test files that the source distribution does not ship."""

    def module(name, **attributes):
        stand_in = types.ModuleType(f"{PACKAGE}.{name}")
        stand_in.__dict__.update(attributes)
        if "." not in name:
            stand_in.__path__ = []  # a package, for its submodule
        sys.modules[stand_in.__name__] = stand_in

    class GenerationTesterMixin:
        """Stand-in: transformers' generation tests are run by hand (docs/transformers_contract.md)."""

    class ExportTesterMixin:
        """Stand-in: transformers' export tests (`tests/exporters/`) are not in the source distribution."""

    module("generation")
    module("generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
    module("exporters")
    module("exporters.test_export", ExportTesterMixin=ExportTesterMixin)
    module("utils")
    # A value other than the default for every field of `PreTrainedConfig` (transformers 5.24), as transformers' own
    # `config_common_kwargs` holds (tests/utils/test_configuration_utils.py, not in the source distribution).
    config_common_kwargs = {
        "return_dict": False,
        "output_hidden_states": True,
        "output_attentions": True,
        "dtype": "float16",
        "chunk_size_feed_forward": 5,
        "architectures": ["BertModel"],
        "id2label": {0: "label"},
        "label2id": {"label": "0"},
        "problem_type": "regression",
    }
    module("utils.test_configuration_utils", config_common_kwargs=config_common_kwargs)


def _import_common_tests():
    sys.path.insert(0, str(transformers_tests_folder(installed_transformers_version())))
    _install_stand_ins()
    modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    return modeling, configuration


_modeling_common, _configuration_common = _import_common_tests()
ModelTesterMixin = _modeling_common.ModelTesterMixin
ConfigTester = _configuration_common.ConfigTester
ids_tensor = _modeling_common.ids_tensor
random_attention_mask = _modeling_common.random_attention_mask


class LTMModelTester:
    """Builds the tiny configs and inputs of the common tests, as transformers' `LlamaModelTester` does."""

    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        use_labels=True,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        hidden_act="silu",
        max_position_embeddings=512,
        n_latents_per_layer=4,
        latent_dim=16,
        initializer_range=0.02,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.n_latents_per_layer = n_latents_per_layer
        self.latent_dim = latent_dim
        self.initializer_range = initializer_range
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def get_config(self) -> LTMConfig:
        return LTMConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            n_latents_per_layer=self.n_latents_per_layer,
            latent_dim=self.latent_dim,
            initializer_range=self.initializer_range,
            num_inference_steps=2,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        token_labels = ids_tensor([self.batch_size, self.seq_length], self.vocab_size) if self.use_labels else None
        return self.get_config(), input_ids, input_mask, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, input_mask, token_labels):
        model = LTMModel(config).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))

    def create_and_check_causal_lm(self, config, input_ids, input_mask, token_labels):
        model = LTMForCausalLM(config).eval()
        latents = torch.randn(self.batch_size, *config.latent_shape)
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask, latents=latents, labels=token_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        self.parent.assertTrue(torch.isfinite(result.loss))


# The common tests that cannot apply to an LTM, with the reason (transformers' own model tests skip the same way, with
# `@unittest.skip(reason=...)` on an override). Tests needing hardware or packages this machine lacks (a GPU,
# flash-attn, deepspeed, bitsandbytes, kernels, several accelerators) are skipped by transformers' own decorators.
SKIPS = {
    "test_generation_tester_mixin_inheritance": (
        "GenerationTesterMixin is not in transformers' source distribution: the generation tests are run by hand "
        "from transformers' repository (docs/transformers_contract.md)"
    ),
}


def _skipping(reasons):
    """A class decorator: each named inherited test replaced by one skipped with its reason."""

    def decorate(cls):
        for name, reason in reasons.items():

            @unittest.skip(reason=reason)
            def skipped(self):
                pass

            skipped.__name__ = name
            setattr(cls, name, skipped)
        return cls

    return decorate


@_skipping(SKIPS)
class LTMModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (LTMModel, LTMForCausalLM)
    # Resizing the embeddings rounds up to `pad_vocab_size_to_multiple_of` and keeps `config.vocab_size` the
    # tokenizer's size (LTMForCausalLM.resize_token_embeddings): with the tester's multiple of 1 it is transformers'.
    test_resize_embeddings = True

    def setUp(self):
        self.model_tester = LTMModelTester(self)
        self.config_tester = ConfigTester(self, config_class=LTMConfig, hidden_size=48, num_attention_heads=4)

    def test_config(self):
        self.config_tester.run_common_tests()

    # pyproject.toml turns FutureWarnings into errors (the next rename is seen while the old name works); this test
    # checks that the old cache name warns, so it needs to see the warning instead.
    @pytest.mark.filterwarnings("always:`past_key_values` is deprecated:FutureWarning")
    def test_bc_cache_name_forward(self):
        super().test_bc_cache_name_forward()

    def test_model_rope_scaling_frequencies(self):
        """transformers' test checks the default, linear, then dynamic-NTK frequencies: LTM keeps the first two and
        refuses "dynamic" when its rotary module is built (its frequencies would change with the input's length, so
        the latents' keys cached at the prefill would not match later tokens), which ends the test."""
        with self.assertRaisesRegex(ValueError, '"dynamic" is not supported'):
            super().test_model_rope_scaling_frequencies()

    def test_model_rope_scaling_from_config_1_dynamic(self):
        """LTM refuses `rope_type="dynamic"` (see `test_model_rope_scaling_frequencies`), also when assigned after the
        config was built, as transformers' test does."""
        with self.assertRaisesRegex(ValueError, '"dynamic" is not supported'):
            super().test_model_rope_scaling_from_config_1_dynamic()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_causal_lm(self):
        self.model_tester.create_and_check_causal_lm(*self.model_tester.prepare_config_and_inputs())

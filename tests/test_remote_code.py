"""Remote code: a saved folder loads with `trust_remote_code=True` on a machine where `modeling_ltm` is not installed.

The package is installed editable into the venv, so a plain subprocess could still import it and would hide an
absolute import of our own package in the copied code files. The child process below first removes every way of
importing `modeling_ltm` (the editable-install finder on `sys.meta_path`, `sys.path` entries holding the package),
checks `importlib.util.find_spec("modeling_ltm") is None`, and only then imports transformers, with a fresh
`HF_MODULES_CACHE`.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from conftest import REPO_ROOT, tiny_config
from safetensors.torch import load_file, save_file

from hub_cards.export import REMOTE_CODE_FILES
from modeling_ltm import LTMForCausalLM
from modeling_ltm.configuration_ltm import MIN_TRANSFORMERS_VERSION


# The remote-code files as the export computes them (transformers' get_relative_import_files); at least these four.
CODE_FILES = REMOTE_CODE_FILES
assert {"configuration_ltm.py", "modeling_ltm.py", "inference.py", "generation_ltm.py"} <= set(CODE_FILES)
OUR_PACKAGES = ("modeling_ltm", "eval_harness", "hub_cards")

CHILD = textwrap.dedent(
    """
    import importlib.util, os, sys

    OUR_PACKAGES = {our_packages!r}

    def provides_ours(finder):
        try:
            return any(finder.find_spec(name, None) is not None for name in OUR_PACKAGES)
        except Exception:
            return False

    # A clean machine: no editable-install finder, no path entry holding our packages.
    sys.meta_path[:] = [f for f in sys.meta_path if not provides_ours(f)]
    sys.path[:] = [
        p for p in sys.path
        if not any(os.path.exists(os.path.join(p or os.getcwd(), name)) for name in OUR_PACKAGES)
    ]
    sys.path_importer_cache.clear()
    for name in OUR_PACKAGES:
        assert importlib.util.find_spec(name) is None, f"{{name}} is still importable"

    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder, tensors_in, tensors_out, expected_version = sys.argv[1:5]
    assert transformers.__version__ == expected_version, (transformers.__version__, expected_version)
    inputs = load_file(tensors_in)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert type(model).__name__ == "LTMForCausalLM"
    import logging
    logged = []
    class Keep(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())
    logging.getLogger(type(model).__module__).addHandler(Keep())
    logits = model(inputs["input_ids"], latents=inputs["latents"]).logits
    posterior = model.infer_latents(inputs["input_ids"], num_steps=2, seed=[0, 1])
    warm = model.evaluate_posterior(inputs["input_ids"], seed=[0, 1]).posterior  # from the posterior encoder
    greedy = model.generate(inputs["input_ids"], latents=inputs["latents"], max_new_tokens=8, do_sample=False)
    model.generate(inputs["input_ids"], max_new_tokens=2)  # z fitted on the prompt
    assert not [m for m in logged if "latents" in m], logged  # our own calls fit z or pass it: no warning
    model(inputs["input_ids"]); model(inputs["input_ids"])  # what lm-eval's `--model hf` calls: no latents
    warned = [m for m in logged if "got no `latents`" in m]
    assert len(warned) == 1 and "`ltm eval`" in warned[0] and "LTMTrainer" in warned[0], logged
    assert not any(name.split(".")[0] in OUR_PACKAGES for name in sys.modules), "our package got imported"
    save_file(
        {{"logits": logits.contiguous(), "mu": posterior.mu.contiguous(), "warm_mu": warm.mu.contiguous(),
          "greedy": greedy.contiguous()}},
        tensors_out,
    )
    """
).format(our_packages=OUR_PACKAGES)


# The transformers builds the exported code must load under: the installed one (the lock's, or the newest release in
# CI's drift canary) and the lowest that pyproject.toml declares, which `make test` puts in a folder of its own
# (`pip install --no-deps --target`) and names in LTM_TRANSFORMERS_MIN_SITE.
TRANSFORMERS_BUILDS = ["installed", "lowest"]


def lowest_declared_transformers() -> str:
    """The lower bound of `transformers>=X` in pyproject.toml."""
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    return re.search(r'"transformers>=([0-9.]+)', pyproject).group(1)


def transformers_build(build: str) -> tuple[str, str]:
    """`(extra PYTHONPATH, expected transformers.__version__)` of a build in TRANSFORMERS_BUILDS."""
    import transformers

    if build == "installed":
        return "", transformers.__version__
    site = os.environ.get("LTM_TRANSFORMERS_MIN_SITE")
    if not site:
        pytest.skip("the lowest declared transformers is prepared by `make test` (LTM_TRANSFORMERS_MIN_SITE unset)")
    version = lowest_declared_transformers()
    assert (Path(site) / f"transformers-{version}.dist-info").is_dir(), (
        f"{site} does not hold transformers {version}: rerun `make test`, which installs it there"
    )
    return site, version


def run_clean_child(folder, tmp_path, tensors_in, build="installed"):
    """Load `folder` in a fresh interpreter where our packages are not importable, under the transformers `build`;
    return (process, outputs)."""
    site, version = transformers_build(build)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    tensors_out = tmp_path / "child_outputs.safetensors"
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": site,
        "OMP_NUM_THREADS": "1",
    }
    process = subprocess.run(
        [sys.executable, str(script), str(folder), str(tensors_in), str(tensors_out), version],
        cwd=tmp_path,  # not the repository: its root holds the packages
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    outputs = load_file(tensors_out) if process.returncode == 0 else None
    return process, outputs


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    # With a posterior encoder whose output layer is not at its zero init, so a loader that re-initialised it (or
    # dropped it) would change the warm-started fit; and a padded vocabulary (120 tokens in 128 rows).
    model = LTMForCausalLM(
        tiny_config(
            vocab_size=120,
            pad_vocab_size_to_multiple_of=64,
            sliding_window=8,
            posterior_encoder_size=16,
            posterior_encoder_fit="evaluation",
            eval_warm_start_steps=2,
        )
    ).eval()
    torch.nn.init.normal_(model.model.posterior_encoder.fc_out.weight, std=0.1)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    latents = torch.randn(2, *model.config.latent_shape, generator=torch.Generator().manual_seed(1))
    tensors_in = tmp_path / "inputs.safetensors"
    save_file({"input_ids": input_ids, "latents": latents}, tensors_in)
    return model, folder, tensors_in


def test_save_pretrained_writes_code_files_and_auto_map(saved):
    _, folder, _ = saved
    for name in CODE_FILES:
        assert (folder / name).is_file(), name
    config_json = json.loads((folder / "config.json").read_text())
    # config.json records the release that wrote it (as transformers does); the lowest release the remote code runs
    # on is pyproject's lower bound, which the model card states.
    assert config_json["transformers_version"] == transformers.__version__
    assert MIN_TRANSFORMERS_VERSION == lowest_declared_transformers()
    auto_map = config_json["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_ltm.LTMConfig"
    assert auto_map["AutoModelForCausalLM"] == "modeling_ltm.LTMForCausalLM"
    # The copies are the package's own files, unchanged.
    for name in CODE_FILES:
        assert (folder / name).read_text() == (REPO_ROOT / "modeling_ltm" / name).read_text(), name


def test_code_files_import_only_torch_transformers_and_siblings():
    import ast

    # huggingface_hub: transformers' own hard dependency (the strict config dataclass, as transformers' configs use).
    # safetensors and huggingface_hub are transformers' own dependencies: present wherever transformers loads.
    allowed_roots = {"torch", "transformers", "huggingface_hub", "safetensors"} | set(sys.stdlib_module_names)
    for name in CODE_FILES:
        tree = ast.parse((REPO_ROOT / "modeling_ltm" / name).read_text())
        # transformers' own check of remote code (`check_imports`) skips imports inside try/except blocks: an
        # optional package with a fallback (accelerate's unwrapping in weight_checks.py).
        optional = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.Try) for stmt in node.body
                    for inner in ast.walk(stmt)}  # fmt: skip
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    assert node.module and "." not in node.module, f"{name}: only flat `from .x import y` is copied"
                    continue
                assert node.level == 0, f"{name}: `from ..x` breaks remote code"
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed_roots, f"{name} imports {roots - allowed_roots}: not available to remote code"


@pytest.mark.slow
@pytest.mark.parametrize("build", TRANSFORMERS_BUILDS)
def test_remote_code_loads_without_the_package(saved, tmp_path, build):
    """Logits, posterior and greedy generation of the remote code equal the package's, under the installed and the
    lowest declared transformers (both sides of 5.24's `past_key_values` -> `cache` rename); the remote code warns once
    when `forward` gets no latents (lm-eval's `--model hf`), never on its own fits and generation (in the child)."""
    model, folder, tensors_in = saved
    process, outputs = run_clean_child(folder, tmp_path, tensors_in, build)
    assert process.returncode == 0, process.stderr[-4000:]
    inputs = load_file(tensors_in)
    expected = model(inputs["input_ids"], latents=inputs["latents"]).logits
    assert torch.equal(outputs["logits"], expected)
    posterior = model.infer_latents(inputs["input_ids"], num_steps=2, seed=[0, 1])
    torch.testing.assert_close(outputs["mu"], posterior.mu)
    evaluation = model.evaluate_posterior(inputs["input_ids"], seed=[0, 1])
    assert evaluation.settings.warm_start
    warm = evaluation.posterior
    torch.testing.assert_close(outputs["warm_mu"], warm.mu)
    greedy = model.generate(inputs["input_ids"], latents=inputs["latents"], max_new_tokens=8, do_sample=False)
    assert torch.equal(outputs["greedy"], greedy)
    assert (tmp_path / "hf_modules" / "transformers_modules").is_dir()  # the code came from the temporary cache


@pytest.mark.slow
def test_the_clean_child_catches_an_absolute_import_of_our_package(saved, tmp_path):
    """The isolation is real: code that imports `modeling_ltm` absolutely (works here) fails in the child."""
    _, folder, tensors_in = saved
    inference = folder / "inference.py"
    inference.write_text("import modeling_ltm  # noqa\n" + inference.read_text())
    process, _ = run_clean_child(folder, tmp_path, tensors_in)
    assert process.returncode != 0
    assert re.search(r"No module named 'modeling_ltm'|packages that were not found.*modeling_ltm", process.stderr)

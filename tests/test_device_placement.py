"""Device placement, checked on the CPU (issue 20 item 1): tensors enter the model's device where they enter the
library (`generate`, the end-of-training sample), and library code makes no tensor on the CPU by accident (a tensor
factory without `device=` lands on the CPU, and float64 does not exist on every accelerator)."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_config

import modeling_ltm.generation_ltm as generation_ltm
from modeling_ltm import LTMForCausalLM
from modeling_ltm.tooling.train_cli import generate_sample


class Stop(Exception):
    pass


def model_on(monkeypatch, device: str) -> LTMForCausalLM:
    """A CPU model that reports `device` as its device (what `generate` moves inputs to)."""
    torch.manual_seed(0)
    model = LTMForCausalLM(tiny_config()).eval()
    monkeypatch.setattr(LTMForCausalLM, "device", property(lambda self: torch.device(device)))
    return model


@pytest.mark.parametrize("prompt_as", ["inputs", "input_ids"])
def test_generate_moves_the_prompt_and_mask_to_the_model_device(monkeypatch, prompt_as):
    model = model_on(monkeypatch, "meta")
    seen = {}

    def fit(model, prompt, attention_mask, **kwargs):
        seen.update(prompt=prompt.device, mask=attention_mask.device)
        raise Stop

    monkeypatch.setattr(generation_ltm, "fit_posterior", fit)
    prompt = torch.randint(0, 128, (1, 5))
    inputs = {prompt_as: prompt} if prompt_as == "input_ids" else {"inputs": prompt}
    with pytest.raises(Stop):
        # An explicit seed: greedy decoding would otherwise read the prompt's tokens (on "meta": none) for its seed.
        model.generate(**inputs, attention_mask=torch.ones_like(prompt), max_new_tokens=2, inference_seed=0)
    assert seen == {"prompt": torch.device("meta"), "mask": torch.device("meta")}


def test_end_of_training_sample_builds_its_mask_on_the_model_device(monkeypatch):
    model = model_on(monkeypatch, "meta")
    seen = {}

    def generate(input_ids, attention_mask=None, **kwargs):
        seen.update(prompt=input_ids.device, mask=attention_mask.device)
        raise Stop

    monkeypatch.setattr(model, "generate", generate)
    with pytest.raises(Stop):
        generate_sample(model, tokenizer=type("T", (), {"pad_token_id": 0}), prompt_ids=torch.ones(1, 3, dtype=torch.long),
                        max_new_tokens=2, seed=0)  # fmt: skip
    assert seen == {"prompt": torch.device("meta"), "mask": torch.device("meta")}


# Tensor factories that land on the CPU without `device=`, and why each site below is meant to be there.
FACTORIES = {"zeros", "ones", "full", "empty", "randn", "rand", "randint", "arange", "tensor", "eye", "linspace"}
ON_PURPOSE = {
    ("modeling_ltm/tooling/amortized.py", "randint"): "row sampling with a CPU generator; the rows index a CPU or "
    "device tensor",
    ("modeling_ltm/tooling/data.py", "tensor"): "the data collator builds CPU batches; Trainer moves them",
    ("modeling_ltm/fast_loop.py", "tensor"): "a Python bool for the adaptive loop's host-side check",
    ("modeling_ltm/generation_ltm.py", "randint"): "a seed drawn from the global CPU RNG, read as an int",
    ("modeling_ltm/modeling_ltm.py", "ones"): "parameter creation; the model is moved as a whole",
    ("modeling_ltm/priors.py", "zeros"): "parameter creation; the prior is moved with the model",
    ("modeling_ltm/priors.py", "empty"): "parameter creation; the prior is moved with the model",
    ("modeling_ltm/modeling_ltm.py", "arange"): "the RoPE table at construction; a buffer moved with the model",
    ("modeling_ltm/tooling/train_cli.py", "tensor"): "the sample's prompt; generate() moves it to the model's device",
    ("eval_harness/lm.py", "zeros"): "host-side float64 running sums, moved (as float32 on MPS) only to be gathered",
    ("eval_harness/lm.py", "tensor"): "host-side float64 running sums",
}


def test_library_code_makes_no_tensor_on_the_cpu_by_accident():
    found = set()
    for folder in ("modeling_ltm", "modeling_ltm/tooling", "eval_harness", "hub_cards"):
        for path in sorted((REPO_ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                func = getattr(node, "func", None)
                if (
                    isinstance(node, ast.Call)
                    and isinstance(func, ast.Attribute)
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "torch"
                    and func.attr in FACTORIES
                    and not any(keyword.arg == "device" for keyword in node.keywords)
                ):
                    found.add((str(Path(path).relative_to(REPO_ROOT)), func.attr))
    assert found <= set(ON_PURPOSE), f"tensor factories without device=: {sorted(found - set(ON_PURPOSE))}"

"""LoRA fine-tuning of an LTM with PEFT through `LTMTrainer`: only the adapter trains; the adapter saves, loads,
merges and generates (the `peft` extra)."""

import math

import pytest
import torch
from conftest import tiny_config
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model

from modeling_ltm import LTMForCausalLM, LTMTrainer, LTMTrainingArguments


# Every linear layer of the attention blocks: self-attention and the cross-attention to the latents.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_model(base: LTMForCausalLM):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def token_blocks(num_rows: int = 8, seq_length: int = 16, seed: int = 0) -> Dataset:
    ids = torch.randint(0, 128, (num_rows, seq_length), generator=torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"input_ids": ids.tolist()})


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """A tiny LTM saved as the base, a LoRA adapter trained on it for a few LTMTrainer steps, and the results."""
    folder = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    base = LTMForCausalLM(tiny_config())
    base.save_pretrained(folder / "base")
    base_weights = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = lora_model(base)
    args = LTMTrainingArguments(
        str(folder / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        num_inference_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = LTMTrainer(model=model, args=args, train_dataset=token_blocks(), eval_dataset=token_blocks(4, seed=1))
    trainer.train()
    metrics = trainer.evaluate()
    model.save_pretrained(folder / "adapter")
    return dict(folder=folder, model=model.eval(), base_weights=base_weights, trainer=trainer, metrics=metrics)


def test_lora_training_changes_only_the_adapter(fine_tuned):
    model, base_weights = fine_tuned["model"], fine_tuned["base_weights"]
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    # LoRA wraps each target as `<name>.base_layer`; every base weight is exactly as before training.
    base_now = {
        name.replace(".base_layer", ""): tensor
        for name, tensor in model.get_base_model().state_dict().items()
        if "lora_" not in name
    }
    assert base_now.keys() == base_weights.keys()
    for name, tensor in base_weights.items():
        assert torch.equal(base_now[name], tensor), name
    # Each adapter's B starts at zero: a non-zero B everywhere means every targeted layer was trained, the
    # cross-attention to the latents included.
    lora_b = {name: parameter for name, parameter in model.named_parameters() if "lora_B" in name}
    assert len(lora_b) == len(LORA_TARGETS) * 2 * model.config.num_hidden_layers  # self- and cross-attention
    assert all(parameter.abs().sum() > 0 for parameter in lora_b.values())
    assert any(".cross_attn.k_proj." in name for name in lora_b)

    logs = [entry for entry in fine_tuned["trainer"].state.log_history if "loss" in entry]
    assert len(logs) == 4 and all(math.isfinite(entry["loss"]) and entry["kl_per_token"] > 0 for entry in logs)
    assert math.isfinite(fine_tuned["metrics"]["eval_elbo_ppl"])


def test_adapter_saves_loads_and_generates(fine_tuned):
    folder, model = fine_tuned["folder"], fine_tuned["model"]
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert not (folder / "adapter" / "model.safetensors").exists()  # the adapter only, not the decoder

    loaded = PeftModel.from_pretrained(LTMForCausalLM.from_pretrained(folder / "base"), folder / "adapter").eval()
    plain_base = LTMForCausalLM.from_pretrained(folder / "base").eval()
    prompt = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    latents = torch.randn(2, *model.config.latent_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        trained_logits = model(input_ids=prompt, latents=latents).logits
        torch.testing.assert_close(loaded(input_ids=prompt, latents=latents).logits, trained_logits)
        assert not torch.allclose(plain_base(input_ids=prompt, latents=latents).logits, trained_logits)

    # generate() through the PeftModel: given latents, and latents fitted on the prompt (decoder + adapter).
    given = dict(latents=latents, max_new_tokens=5, do_sample=False)
    fitted = dict(num_inference_steps=2, inference_seed=0, max_new_tokens=5, do_sample=False)
    expected_given = model.generate(input_ids=prompt, **given)
    expected_fitted = model.generate(input_ids=prompt, **fitted)
    assert expected_given.shape == (2, 11)
    assert torch.equal(loaded.generate(input_ids=prompt, **given), expected_given)
    assert torch.equal(loaded.generate(input_ids=prompt, **fitted), expected_fitted)

    # Merged into the decoder, it is a plain LTMForCausalLM that generates the same tokens.
    merged = loaded.merge_and_unload()
    assert type(merged) is LTMForCausalLM
    assert torch.equal(merged.generate(prompt, **given), expected_given)
    assert torch.equal(merged.generate(prompt, **fitted), expected_fitted)


def test_cached_decoding_through_the_adapter_equals_the_full_forward(fine_tuned):
    """Decoding steps read the latents' values already taken through the cross-attention's `o_proj` (computed once
    per sequence): with an unmerged LoRA adapter on `o_proj`, the adapter must be in them too."""

    model = fine_tuned["model"]
    cross_o_proj = model.base_model.model.model.layers[0].cross_attn.o_proj
    assert cross_o_proj.lora_B["default"].weight.abs().sum() > 0  # the adapter's update is not zero
    input_ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    latents = torch.randn(2, *model.config.latent_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(input_ids=input_ids, latents=latents).logits
        out = model(input_ids=input_ids[:, :4], latents=latents, use_cache=True)
        steps = [out.logits]
        for t in range(4, 10):
            out = model(input_ids=input_ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_lora_checkpoint_resumes_exactly(tmp_path):
    """Trainer's checkpoints of a PEFT model hold the adapter (no decoder weights); resuming from one ends at the
    adapter weights of the uninterrupted run."""

    def train(output_dir, resume_from_checkpoint=None):
        torch.manual_seed(0)
        model = lora_model(LTMForCausalLM(tiny_config()))
        args = LTMTrainingArguments(
            str(output_dir),
            max_steps=4,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            num_inference_steps=2,
            save_strategy="steps",
            save_steps=2,
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            seed=0,
        )
        LTMTrainer(model=model, args=args, train_dataset=token_blocks()).train(resume_from_checkpoint)
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    uninterrupted = train(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    resumed = train(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint))
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)

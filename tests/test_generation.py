"""`LTMForCausalLM.generate`: latents settled on the prompt, then transformers' own decoding; caches; pipeline; CLI."""

import inspect
import json

import pytest
import torch
from conftest import small_tokenizer, tiny_config
from transformers import AutoModelForCausalLM, GenerationConfig, pipeline
from transformers.generation.streamers import BaseStreamer

import modeling_ltm.generation_ltm as generation_ltm
from modeling_ltm import LTMForCausalLM
from modeling_ltm.tooling.generate_cli import main as generate_main
from modeling_ltm.generation_ltm import LTMGenerationConfig
from modeling_ltm.modeling_ltm import LTMCrossAttention
from modeling_ltm.randomness import content_seed


# A larger init than the default 0.02 so greedy decoding of a random model does not repeat one token: equality
# tests then compare varied sequences.
SPREAD_INIT = 0.3


def make_model(**overrides) -> LTMForCausalLM:
    torch.manual_seed(0)
    return LTMForCausalLM(tiny_config(initializer_range=SPREAD_INIT, **overrides)).eval()


def random_prompt(length: int, batch: int = 1, seed: int = 0, vocab: int = 128) -> torch.LongTensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_pad(prompts: list[torch.LongTensor], pad_id: int = 0) -> tuple[torch.LongTensor, torch.LongTensor]:
    width = max(p.shape[1] for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - prompt.shape[1] :] = prompt[0]
        attention_mask[row, width - prompt.shape[1] :] = 1
    return input_ids, attention_mask


class ForwardRecorder:
    """Records the `latents` kwarg of every forward call of `model` (a hook: `generate` inspects `forward`'s
    signature, so `forward` itself must stay untouched)."""

    def __init__(self, model):
        self.latents = []
        model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.latents.append(kwargs.get("latents"))


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE (300 tokens) trained on the first 20 KB of tiny_shakespeare."""
    tokenizer = small_tokenizer(num_chars=20_000, vocab_size=300)
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture
def text_model(tokenizer) -> LTMForCausalLM:
    """A tiny LTM whose vocabulary matches the `tokenizer` fixture."""
    return make_model(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# --- caches ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sliding_window", [None, 8])
@pytest.mark.parametrize("prompt_length", [5, 20])
def test_greedy_with_cache_equals_without_cache(sliding_window, prompt_length):
    model = make_model(sliding_window=sliding_window)
    prompt = random_prompt(prompt_length)
    kwargs = dict(max_new_tokens=24, do_sample=False, inference_seed=0)
    with_cache = model.generate(prompt, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (1, prompt_length + 24)
    assert torch.equal(with_cache, without_cache)
    assert len(set(with_cache[0, prompt_length:].tolist())) > 3  # a varied continuation, not one repeated token


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("sliding_window", [None, 8])
def test_left_padded_batch_equals_each_prompt_alone(use_cache, sliding_window):
    model = make_model(sliding_window=sliding_window)
    prompts = [random_prompt(6, seed=1), random_prompt(13, seed=2)]
    input_ids, attention_mask = left_pad(prompts)
    kwargs = dict(max_new_tokens=16, do_sample=False, inference_seed=3, use_cache=use_cache, pad_token_id=0)
    batch = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt, **kwargs)
        assert torch.equal(batch[row, input_ids.shape[1] :], alone[0, prompt.shape[1] :])


def count_projections(monkeypatch) -> list[int]:
    calls = []
    original = LTMCrossAttention.project_latents

    def project_latents(self, latents, latent_position_embeddings):
        calls.append(latents.shape[0])
        return original(self, latents, latent_position_embeddings)

    monkeypatch.setattr(LTMCrossAttention, "project_latents", project_latents)
    return calls


@pytest.mark.parametrize("decoding", [dict(), dict(num_beams=3), dict(do_sample=True, num_return_sequences=2)])
def test_cross_attention_keys_values_projected_once_per_sequence(monkeypatch, decoding):
    model = make_model()
    prompt = random_prompt(7, batch=2)
    latents = model.infer_latents(prompt, seed=0).z  # fitted beforehand: only decoding is counted
    calls = count_projections(monkeypatch)
    model.generate(prompt, latents=latents, max_new_tokens=10, min_new_tokens=10, **decoding)
    # One projection per layer, on the prefill, for the whole (expanded) batch; never again while decoding.
    expanded = 2 * max(decoding.get("num_beams", 1), decoding.get("num_return_sequences", 1))
    assert calls == [expanded] * model.config.num_hidden_layers
    calls.clear()
    model.generate(prompt, latents=latents, max_new_tokens=10, min_new_tokens=10, use_cache=False)
    assert len(calls) == 10 * model.config.num_hidden_layers  # without a cache: every step, every layer


# --- how the latents are chosen ------------------------------------------------------------------------------------


def test_posterior_is_fitted_on_the_prompt():
    model = make_model()
    prompt = random_prompt(9, batch=2)
    recorder = ForwardRecorder(model)
    model.generate(prompt, max_new_tokens=3, num_inference_steps=5, inference_lr=0.2, inference_seed=4)
    used = recorder.latents[-1]
    fitted = model.infer_latents(prompt, num_steps=5, lr=0.2, seed=[4, 4])
    torch.testing.assert_close(used, fitted.z)
    # Against the same call with no fast step: generate's latents are the fit's, not its start's (a skipped fit gives
    # these), and the fit raised each prompt's ELBO by far more than noise (~80 nats here).
    model.generate(prompt, max_new_tokens=3, num_inference_steps=0, inference_lr=0.2, inference_seed=4)
    unfitted = recorder.latents[-1]
    torch.testing.assert_close(unfitted, model.infer_latents(prompt, num_steps=0, lr=0.2, seed=[4, 4]).z)
    assert (used - unfitted).abs().amax(dim=tuple(range(1, used.dim()))).min() > 0.1  # every row moved
    assert (fitted.elbo_trace[-1] - fitted.elbo_trace[0]).min() > 10.0


def test_given_latents_and_posterior_are_used_as_given():
    model = make_model()
    prompt = random_prompt(9, batch=2)
    posterior = model.infer_latents(prompt, seed=0)
    recorder = ForwardRecorder(model)
    model.generate(prompt, latents=posterior, max_new_tokens=2)
    assert torch.equal(recorder.latents[0], posterior.z)
    latents = torch.randn(2, *model.config.latent_shape)
    model.generate(prompt, latents=latents, max_new_tokens=2)
    assert torch.equal(recorder.latents[-1], latents)


@pytest.mark.parametrize("num_beams, num_return_sequences", [(1, 3), (4, 1), (4, 2)])
def test_latents_expanded_for_beams_and_return_sequences(num_beams, num_return_sequences):
    model = make_model()
    prompt = random_prompt(6, batch=2)
    latents = torch.randn(2, *model.config.latent_shape)
    recorder = ForwardRecorder(model)
    out = model.generate(
        prompt,
        latents=latents,
        max_new_tokens=4,
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        do_sample=num_beams == 1,
    )
    assert out.shape[0] == 2 * num_return_sequences
    expand = max(num_beams, num_return_sequences)
    for seen in recorder.latents:
        assert torch.equal(seen, latents.repeat_interleave(expand, dim=0))


def test_beam_search_matches_with_and_without_cache():
    model = make_model()
    prompt = random_prompt(8, batch=2)
    kwargs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, inference_seed=0)
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_unconditional_generation_from_the_prior():
    model = make_model(bos_token_id=1)
    recorder = ForwardRecorder(model)
    out = model.generate(max_new_tokens=6, do_sample=True, inference_seed=0)  # no prompt: BOS + z ~ N(0, I)
    assert out.shape == (1, 7) and out[0, 0].item() == 1
    prior = recorder.latents[0]
    expected = torch.randn(model.config.latent_shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prior[0], expected)

    empty = model.generate(torch.zeros(3, 0, dtype=torch.long), max_new_tokens=4, do_sample=True)
    assert empty.shape == (3, 5)
    assert not torch.equal(recorder.latents[-1][0], recorder.latents[-1][1])  # one prior draw per row

    prompt = random_prompt(5)
    model.generate(prompt, latents="prior", latent_temperature=0.5, inference_seed=0, max_new_tokens=2)
    torch.testing.assert_close(recorder.latents[-1][0], 0.5 * expected)
    cold = model.generate(prompt, latents="prior", latent_temperature=0.0, max_new_tokens=6)
    zeros = torch.zeros(1, *model.config.latent_shape)
    assert torch.equal(cold, model.generate(prompt, latents=zeros, max_new_tokens=6))


def test_fixed_seed_gives_the_same_sample():
    model = make_model()
    prompt = random_prompt(6, batch=2)
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.3)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(prompt, **kwargs))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(124)
    assert not torch.equal(runs[0], model.generate(prompt, **kwargs))


# --- deterministic decoding by default (issue 30, item 3) -----------------------------------------------------------


@pytest.mark.parametrize("decoding", [dict(), dict(num_beams=3)])
def test_greedy_decoding_is_the_same_on_every_call(decoding):
    """No seed given: `do_sample=False` seeds the fit from the prompt's tokens, not from torch's global RNG, so two
    calls (with the global RNG anywhere) give the same latents and the same text."""
    model = make_model()
    prompt = random_prompt(8, batch=2)
    recorder = ForwardRecorder(model)
    runs, decoded = [], []
    for global_seed in (1, 2):
        recorder.latents.clear()
        torch.manual_seed(global_seed)
        runs.append(model.generate(prompt, max_new_tokens=12, do_sample=False, **decoding))
        decoded.append(recorder.latents[-1])  # a decoding step's latents: the fitted z, expanded for beams
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(decoded[0], decoded[1])
    # The seed is a hash of each row's tokens, as `ltm eval` seeds its fits (one helper, `randomness.content_seed`).
    seeds = [
        content_seed(generation_ltm.GENERATE_CONTENT_SEED, row.tolist(), generation_ltm.GENERATE_SEED_PURPOSE)
        for row in prompt
    ]
    torch.testing.assert_close(decoded[0][:: decoding.get("num_beams", 1)], model.infer_latents(prompt, seed=seeds).z)


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_equals_its_rows_without_a_seed(use_cache):
    """Each row's content seed comes from its unpadded tokens: a left-padded batch gives every row the text that row
    gives alone."""
    model = make_model()
    prompts = [random_prompt(5, seed=11), random_prompt(12, seed=12), random_prompt(9, seed=13)]
    input_ids, attention_mask = left_pad(prompts)
    kwargs = dict(max_new_tokens=14, do_sample=False, use_cache=use_cache, pad_token_id=0)
    batch = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt, **kwargs)
        assert torch.equal(batch[row, input_ids.shape[1] :], alone[0, prompt.shape[1] :])


def test_an_explicit_seed_or_generator_wins_over_the_content_seed():
    model = make_model()
    prompt = random_prompt(8)
    recorder = ForwardRecorder(model)

    def fitted(**seeding):
        recorder.latents.clear()
        model.generate(prompt, max_new_tokens=2, do_sample=False, **seeding)
        return recorder.latents[-1]

    by_content = fitted()
    assert not torch.equal(fitted(inference_seed=7), by_content)
    torch.testing.assert_close(fitted(inference_seed=7), model.infer_latents(prompt, seed=[7]).z)
    generated = fitted(inference_generator=torch.Generator().manual_seed(7))
    assert not torch.equal(generated, by_content)
    torch.testing.assert_close(generated, model.infer_latents(prompt, generator=torch.Generator().manual_seed(7)).z)


def test_sampling_draws_the_fit_from_the_global_rng():
    """`do_sample=True` keeps transformers' rule: the whole call (fit noise and tokens) follows torch's global RNG,
    so two sampled calls differ in `z` too, and `torch.manual_seed` reproduces a call."""
    model = make_model()
    prompt = random_prompt(8)
    recorder = ForwardRecorder(model)
    fits = []
    for global_seed in (5, 6, 5):
        recorder.latents.clear()
        torch.manual_seed(global_seed)
        model.generate(prompt, max_new_tokens=2, do_sample=True)
        fits.append(recorder.latents[-1])
    assert not torch.equal(fits[0], fits[1])
    assert torch.equal(fits[0], fits[2])


def test_text_generation_pipeline_greedy_is_deterministic(text_model, tokenizer):
    generator = pipeline("text-generation", model=text_model, tokenizer=tokenizer)
    prompts = ["ROMEO:", "Shall I compare thee to a summer's day?"]
    kwargs = dict(max_new_tokens=8, do_sample=False, num_inference_steps=3, return_full_text=False)
    torch.manual_seed(1)
    first = generator(prompts, batch_size=2, **kwargs)
    torch.manual_seed(2)
    second = generator(prompts, batch_size=2, **kwargs)
    assert first == second
    alone = [generator(prompt, **kwargs) for prompt in prompts]  # batched (left-padded) = one prompt at a time
    assert first == alone


def test_generation_config_defaults_for_inference(monkeypatch, tmp_path):
    """The latents' defaults live in `LTMGenerationConfig` (the model's `generation_config_class`): built from the
    model config, kept in generation_config.json by plain save_pretrained / from_pretrained, used by generate(),
    with generate()'s arguments first."""
    model = make_model()
    seen = []
    original = generation_ltm.fit_posterior

    def fit_posterior(model, input_ids, attention_mask=None, **kwargs):
        seen.append((kwargs["num_steps"], kwargs["lr"], kwargs["lr_min_ratio"]))
        return original(model, input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(generation_ltm, "fit_posterior", fit_posterior)
    config = model.config
    assert isinstance(model.generation_config, LTMGenerationConfig)
    assert model.generation_config.num_inference_steps == config.num_inference_steps  # from the model config
    assert model.generation_config.inference_lr == config.inference_lr
    prompt = random_prompt(5)
    model.generate(prompt, max_new_tokens=2)
    assert seen[-1] == (config.num_inference_steps, config.inference_lr, config.inference_lr_min_ratio)

    # Set by hand on a fresh model (a config derived from the model config): nothing else to call.
    model.generation_config.num_inference_steps = 2
    model.generation_config.inference_lr = 0.05
    model.generation_config.inference_lr_min_ratio = 0.5
    model.generation_config.latent_temperature = 0.7
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert {name: saved[name] for name in LTMGenerationConfig.inference_fields} == {
        "num_inference_steps": 2,
        "inference_lr": 0.05,
        "inference_lr_min_ratio": 0.5,
        "latent_temperature": 0.7,
    }
    for loaded in (
        LTMForCausalLM.from_pretrained(tmp_path).generation_config,
        AutoModelForCausalLM.from_pretrained(tmp_path).generation_config,
        LTMGenerationConfig.from_pretrained(tmp_path),
    ):
        assert isinstance(loaded, LTMGenerationConfig)
        assert [getattr(loaded, name) for name in LTMGenerationConfig.inference_fields] == [2, 0.05, 0.5, 0.7]
    # A plain GenerationConfig reads the file too (e.g. tools that do not know the class).
    assert GenerationConfig.from_pretrained(tmp_path).num_inference_steps == 2

    model.generate(prompt, max_new_tokens=2)
    assert seen[-1] == (2, 0.05, 0.5)  # model.generation_config before the model config
    model.generate(prompt, generation_config=GenerationConfig(num_inference_steps=1, max_new_tokens=2))
    assert seen[-1] == (1, 0.05, 0.5)  # an explicit generation_config first, then model.generation_config
    model.generate(prompt, generation_config=LTMGenerationConfig(inference_lr=0.2, max_new_tokens=2))
    assert seen[-1] == (2, 0.2, 0.5)  # its unset (None) fields fall back to model.generation_config
    model.generate(prompt, max_new_tokens=2, num_inference_steps=3, inference_lr=0.1, inference_lr_min_ratio=1.0)
    assert seen[-1] == (3, 0.1, 1.0)  # generate() arguments first


def test_latent_temperature_default_scales_prior_samples():
    model = make_model()
    prior = []
    original = model._sample_prior_latents

    def record(batch_size, temperature, seed, generator):
        prior.append(temperature)
        return original(batch_size, temperature, seed, generator)

    model._sample_prior_latents = record
    model.generate(latents="prior", max_new_tokens=1, bos_token_id=1, inference_seed=0)
    assert prior[-1] == 1.0  # unset: N(0, I)
    model.generation_config.latent_temperature = 0.5
    model.generate(latents="prior", max_new_tokens=1, bos_token_id=1, inference_seed=0)
    assert prior[-1] == 0.5
    model.generate(latents="prior", max_new_tokens=1, bos_token_id=1, inference_seed=0, latent_temperature=0.0)
    assert prior[-1] == 0.0


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_inference_steps", -1),
        ("num_inference_steps", 2.5),
        ("inference_lr", 0.0),
        ("inference_lr_min_ratio", 1.5),
        ("latent_temperature", -0.1),
        ("latent_temperature", "hot"),
    ],
)
def test_generation_config_rejects_bad_inference_fields(field, value):
    with pytest.raises(ValueError, match=field):
        LTMGenerationConfig(**{field: value})


# --- transformers features -----------------------------------------------------------------------------------------


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_streamer_stop_strings_and_max_new_tokens(text_model, tokenizer):
    prompt = tokenizer(["ROMEO:"], return_tensors="pt")
    streamer = CollectingStreamer()
    out = text_model.generate(**prompt, max_new_tokens=7, min_new_tokens=7, streamer=streamer, inference_seed=0)
    assert out.shape[1] == prompt.input_ids.shape[1] + 7
    assert streamer.ended and sum(streamer.chunks[1:], []) == out[0, prompt.input_ids.shape[1] :].tolist()

    free = text_model.generate(**prompt, max_new_tokens=20, min_new_tokens=20, inference_seed=0)
    new_tokens = free[0, prompt.input_ids.shape[1] :].tolist()
    stop = next(text for text in map(tokenizer.decode, new_tokens[8:]) if text.strip() and text.isascii())
    stopped = text_model.generate(
        **prompt, max_new_tokens=20, stop_strings=[stop], tokenizer=tokenizer, inference_seed=0
    )
    assert stopped.shape[1] < free.shape[1] and torch.equal(stopped[0], free[0, : stopped.shape[1]])
    assert stop in tokenizer.decode(stopped[0, prompt.input_ids.shape[1] :])


def test_text_generation_pipeline(text_model, tokenizer, monkeypatch):
    steps = []
    original = generation_ltm.fit_posterior

    def fit_posterior(*args, **kwargs):
        steps.append(kwargs["num_steps"])
        return original(*args, **kwargs)

    monkeypatch.setattr(generation_ltm, "fit_posterior", fit_posterior)
    generator = pipeline("text-generation", model=text_model, tokenizer=tokenizer)
    outputs = generator(
        ["ROMEO:", "Shall I compare thee"], max_new_tokens=6, num_inference_steps=2, inference_seed=0, batch_size=2
    )
    assert steps == [2]  # one fit for the (left-padded) batch of two prompts
    assert outputs[0][0]["generated_text"].startswith("ROMEO:")
    assert outputs[1][0]["generated_text"].startswith("Shall I compare thee")
    sampled = generator("ROMEO:", max_new_tokens=4, do_sample=True, num_return_sequences=2, return_full_text=False)
    assert len(sampled) == 2
    unconditional = generator("", max_new_tokens=4, do_sample=True)  # empty prompt: z from the prior, from BOS
    assert len(steps) == 2 and isinstance(unconditional[0]["generated_text"], str)


REMOTE_CHILD = """
import importlib.util, sys
import torch
from safetensors.torch import load_file, save_file

def provides_ours(finder):
    try:
        return finder.find_spec("modeling_ltm", None) is not None
    except Exception:
        return False

sys.meta_path[:] = [f for f in sys.meta_path if not provides_ours(f)]  # as on a machine without our package
assert importlib.util.find_spec("modeling_ltm") is None
from transformers import AutoModelForCausalLM

folder, tensors_in, tensors_out = sys.argv[1:4]
inputs = load_file(tensors_in)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules.")
assert type(model.generation_config).__name__ == "LTMGenerationConfig", type(model.generation_config)
assert model.generation_config.num_inference_steps == 2  # from generation_config.json
fitted = model.generate(inputs["input_ids"], max_new_tokens=6, inference_seed=0)  # num_inference_steps: saved default
beams = model.generate(inputs["input_ids"], latents=inputs["latents"], max_new_tokens=6, num_beams=2)
save_file({"fitted": fitted.contiguous(), "beams": beams.contiguous()}, tensors_out)
"""


@pytest.mark.slow  # a fresh interpreter importing transformers: ~10-25 s on 2 shared cores
def test_generate_with_remote_code(tmp_path):
    """The copied generation_ltm.py works where `modeling_ltm` is not installed, and gives the same tokens."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    model = make_model()
    model.generation_config.num_inference_steps = 2
    model.save_pretrained(tmp_path / "model")
    input_ids = random_prompt(6, batch=2)
    latents = torch.randn(2, *model.config.latent_shape)
    save_file({"input_ids": input_ids, "latents": latents}, tmp_path / "inputs.safetensors")
    (tmp_path / "child.py").write_text(REMOTE_CHILD)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [sys.executable, "child.py", str(tmp_path / "model"), "inputs.safetensors", "outputs.safetensors"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    outputs = load_file(tmp_path / "outputs.safetensors")
    assert torch.equal(outputs["fitted"], model.generate(input_ids, max_new_tokens=6, inference_seed=0))
    assert torch.equal(outputs["beams"], model.generate(input_ids, latents=latents, max_new_tokens=6, num_beams=2))


def test_forward_signature_is_the_real_one():
    """`generate` reads `forward`'s signature at every step for a remote-code class, `Trainer` to pick its columns:
    through the decorators, both see the arguments of the function itself."""
    assert inspect.signature(LTMForCausalLM.forward) == inspect.signature(inspect.unwrap(LTMForCausalLM.forward))
    assert "latents" in inspect.signature(make_model().forward).parameters


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.fixture
def no_fitting(monkeypatch):
    """Fails the test if posterior fitting starts: length errors must come before any work."""

    def fit_posterior(*args, **kwargs):
        raise AssertionError("fit_posterior ran before the input was validated")

    monkeypatch.setattr(generation_ltm, "fit_posterior", fit_posterior)


def test_prompt_longer_than_context_is_rejected(no_fitting):
    model = make_model()
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model.generate(random_prompt(65), max_new_tokens=1)


@pytest.mark.parametrize("lengths", [dict(max_new_tokens=60), dict(max_length=65)])
def test_new_tokens_beyond_context_are_rejected_before_any_work(no_fitting, lengths):
    model = make_model()
    with pytest.raises(ValueError, match="exceeds the model's context, max_position_embeddings=64"):
        model.generate(random_prompt(10), **lengths)
    model.generate(random_prompt(10), latents="prior", max_new_tokens=54)  # exactly fills the context


def test_latents_of_the_wrong_shape_are_rejected():
    model = make_model()
    prompt = random_prompt(5, batch=2)
    with pytest.raises(ValueError, match=r"expected \(2, 2, 4, 32\)"):
        model.generate(prompt, latents=torch.zeros(3, *model.config.latent_shape), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"expected \(2, 2, 4, 32\)"):
        model.generate(prompt, latents=torch.zeros(2, 2, 4, 16), max_new_tokens=2)
    with pytest.raises(ValueError, match='"prior"'):
        model.generate(prompt, latents="posterior", max_new_tokens=2)
    with pytest.raises(ValueError, match="one per row"):
        model.generate(prompt, inference_seed=[1, 2, 3], max_new_tokens=2)


def test_other_bad_inputs():
    model = make_model()
    with pytest.raises(ValueError, match="unsqueeze"):
        model.generate(torch.arange(5), max_new_tokens=2)
    with pytest.raises(ValueError, match="bos_token_id"):
        model.generate(max_new_tokens=2)
    with pytest.raises(ValueError, match="needs token ids"):
        model.generate(inputs_embeds=torch.randn(1, 4, 64), max_new_tokens=2)
    embeds = model.generate(inputs_embeds=torch.randn(1, 4, 64), latents="prior", max_new_tokens=2)
    assert embeds.shape == (1, 2)


# --- ltm generate --------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_model(text_model, tokenizer, tmp_path):
    text_model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_cli_streams_one_prompt(saved_model, capsys):
    assert generate_main([str(saved_model), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and "===" not in out


def test_cli_prints_each_completion(saved_model, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("JULIET:\n\nShall I\n")
    argv = [str(saved_model), "--prompt", "ROMEO:", "--prompts-file", str(prompts_file), "--max-new-tokens", "4"]
    argv += ["--do-sample", "--temperature", "0.8", "--top-k", "10", "--top-p", "0.9", "--repetition-penalty", "1.2"]
    argv += ["--seed", "1", "--num-inference-steps", "2", "--inference-lr", "0.1"]
    assert generate_main(argv) == 0
    out = capsys.readouterr().out
    for i, prompt in enumerate(["ROMEO:", "JULIET:", "Shall I"], start=1):
        assert f"=== prompt {i} ===\n{prompt}" in out

    argv = [str(saved_model), "--prompt", "ROMEO:", "--num-beams", "2", "--num-return-sequences", "2"]
    assert generate_main(argv + ["--max-new-tokens", "3"]) == 0
    assert "=== prompt 1, sequence 2 ===" in capsys.readouterr().out


def test_cli_unconditional_and_errors(saved_model, capsys):
    argv = [str(saved_model), "--unconditional", "--num-samples", "2", "--do-sample", "--max-new-tokens", "3"]
    assert generate_main(argv) == 0
    assert "=== sample 2 ===" in capsys.readouterr().out
    # Bad input: one line on stderr naming the problem, exit code 2 (modeling_ltm.tooling.cli_errors).
    for argv, message in (
        ([str(saved_model)], "--prompt"),  # no prompt
        ([str(saved_model), "--prompt", "x", "--max-new-tokens", "64"], "no room for a prompt"),
        ([str(saved_model / "missing"), "--prompt", "x"], "no such folder"),
    ):
        assert generate_main(argv) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("ltm generate: error:") and message in errors[0], errors
    long_prompt = "ROMEO: " * 100
    assert generate_main([str(saved_model), "--prompt", long_prompt, "--max-new-tokens", "4", "--no-stream"]) == 0
    assert "keep their last 60 tokens" in capsys.readouterr().err


def test_cli_is_dispatched_by_ltm(saved_model, capsys):
    from modeling_ltm.tooling.cli import main as ltm_main

    assert ltm_main(["generate", str(saved_model), "--prompt", "ROMEO:", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")

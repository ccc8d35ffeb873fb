"""The device suite: every user path on a GPU (issue 20 item 1). Runs whenever torch sees a CUDA device and is
skipped, with that reason, where it does not; `make test-gpu` runs it alone (docs/gpu.md says how on a machine
without internet).

`LTM_DEVICE_SUITE=cpu` runs the device-agnostic part of it on the CPU (how its logic is checked without a GPU, and
`bench/gpu_check.sh --cpu`); the CUDA-only checks (graphs, compiled kernels, host syncs, NCCL) skip there.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, corpus_text, finite_metrics, small_tokenizer, tiny_config

from modeling_ltm import LTMForCausalLM, PosteriorFitSettings, evaluate_posterior, fast_loop, fit_posterior


DEVICE = os.environ.get("LTM_DEVICE_SUITE", "cuda")
ON_CUDA = DEVICE == "cuda"
NO_DEVICE = ON_CUDA and not torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        NO_DEVICE,
        reason="no CUDA device visible to torch: the device suite runs on a GPU (make test-gpu; docs/gpu.md)",
    ),
]
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA-only check (LTM_DEVICE_SUITE=cpu runs the rest)")
BF16 = torch.bfloat16


def make_model(**overrides) -> LTMForCausalLM:
    torch.manual_seed(0)
    return LTMForCausalLM(tiny_config(initializer_range=0.3, **overrides)).eval().to(DEVICE)


def ids(batch=2, length=12, seed=0, vocab=128):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def fresh_cuda_state():
    yield
    if ON_CUDA and torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- the CLI's main job -----------------------------------------------------------------------------------------


# The main job's own preset and recipe (`make main`: ltm-tiny, the learned diagonal prior), shortened to 4 steps with
# a checkpoint every 2, the evaluation cut to 4 blocks; bf16 mixed precision on CUDA as a GPU user runs it.
MAIN_JOB_PRESET = REPO_ROOT / "configuration" / "ltm-tiny.json"
SHORT_RUN = [
    "--max_steps", "4", "--warmup_steps", "0", "--save_strategy", "steps", "--save_steps", "2",
    "--eval_on_start", "false", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
    "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--eval_inference_steps", "4",
    "--eval_iw_samples", "2", "--max_eval_blocks", "4", "--sample_max_new_tokens", "8", "--dataloader_num_workers", "0",
    *(["--bf16", "true"] if ON_CUDA else ["--use_cpu", "true"]),
]  # fmt: skip


def ltm_train(root: Path, output_dir: Path, *flags: str) -> int:
    from modeling_ltm.tooling.cli import main as ltm_main

    argv = ["train", "--config", str(MAIN_JOB_PRESET), "--dataset", str(root / "corpus.txt"), "--output_dir",
            str(output_dir), "--cache_dir", str(root / "hf"), *SHORT_RUN, *flags]  # fmt: skip
    return ltm_main(argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`ltm train` of the main job's preset on the device, as `make main` runs it: exit 0, then its folder."""
    root = tmp_path_factory.mktemp("cuda-train")
    (root / "corpus.txt").write_text(corpus_text(60_000))
    assert ltm_train(root, root / "run") == 0
    return root / "run"


def test_ltm_train_runs_to_its_summary_and_sample(trained):
    results = json.loads((trained / "eval_results.json").read_text())
    nll, kl = results["eval_nll_per_token"], results["eval_kl_per_token"]
    assert kl > 0 and results["eval_loss"] == pytest.approx(nll + kl, rel=1e-6)  # the bound holds its KL term
    assert results["eval_elbo_ppl"] == pytest.approx(float(torch.tensor(nll + kl).exp()), rel=1e-5)
    assert 1 < results["eval_iw_ppl"] < 1.5 * results["eval_elbo_ppl"]
    assert (trained / "model.safetensors").is_file() and (trained / "tokenizer.json").is_file()
    assert LTMForCausalLM.from_pretrained(trained).config.prior_type == "diagonal_gaussian"  # the main job's prior


def test_trained_models_bound_on_the_device_equals_the_cpus(trained):
    """The trained model's fit and bound on the device against a CPU reference computed here: the same eps (drawn by
    one CPU generator, copied to the device), so fp32 gives the CPU's numbers to float tolerance. The tolerance (1e-3
    of the NLL) is far below the KL of this fit (asserted), so a device path that lost or mis-signed the KL fails."""
    on_device = LTMForCausalLM.from_pretrained(trained, dtype=torch.float32).eval().to(DEVICE)
    cpu = LTMForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    input_ids = ids(4, 16, vocab=on_device.config.vocab_size)
    fits = [
        fit_posterior(model, input_ids.to(device), num_steps=4, generator=torch.Generator().manual_seed(0))
        for model, device in ((on_device, DEVICE), (cpu, "cpu"))
    ]
    device_fit, cpu_fit = fits
    tolerance = 1e-3 * float(cpu_fit.nll.abs().max())
    assert float(cpu_fit.kl.min()) > 20 * tolerance  # the KL is visible at this tolerance
    for name in ("nll", "kl", "elbo"):
        torch.testing.assert_close(getattr(device_fit, name).cpu(), getattr(cpu_fit, name), atol=tolerance, rtol=0)


def test_resume_from_checkpoint_on_the_device(trained, tmp_path):
    """A real `--resume_from_checkpoint`: a copy of the run resumed from its checkpoint-2 to step 4 ends at the
    uninterrupted run's weights, to within a tenth of what steps 3 and 4 moved them, so the weights, the optimizer's
    moments, the schedule and the data order all came back on the device (a restart from scratch, or from the
    weights alone, lands far outside; 1e-5 of a tensor's norm allows the float noise of GPU atomics)."""
    from safetensors.torch import load_file

    resumed = tmp_path / "run"
    shutil.copytree(trained, resumed)
    assert ltm_train(trained.parent, resumed, "--resume_from_checkpoint", str(resumed / "checkpoint-2")) == 0
    assert json.loads((resumed / "trainer_state.json").read_text())["global_step"] == 4
    weights = {name: load_file(folder / "model.safetensors") for name, folder in
               (("at 2", trained / "checkpoint-2"), ("at 4", trained), ("resumed", resumed))}  # fmt: skip
    for key, at_4 in weights["at 4"].items():
        moved = (at_4.float() - weights["at 2"][key].float()).norm()
        off = (weights["resumed"][key].float() - at_4.float()).norm()
        assert off <= 0.1 * moved + 1e-5 * at_4.float().norm(), f"{key}: {off:.3g} off, steps 3-4 moved it {moved:.3g}"


@pytest.mark.parametrize(
    "flags",
    [[], ["--num-beams", "2", "--do-sample"], ["--unconditional", "--num-samples", "2"]],
    ids=["greedy", "beams-sampling", "unconditional"],
)
def test_ltm_generate(trained, flags, capsys):
    from modeling_ltm.tooling.generate_cli import main as generate_main

    prompt = [] if "--unconditional" in flags else ["--prompt", "ROMEO:"]
    assert generate_main([str(trained), *prompt, "--max-new-tokens", "8", "--device", DEVICE, *flags]) == 0
    assert capsys.readouterr().out.strip()


def test_ltm_export_and_remote_code_on_the_device(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from hub_cards.export import export_for_hub

    hub = tmp_path / "hub"
    export_for_hub(trained, hub)
    model = AutoModelForCausalLM.from_pretrained(hub, trust_remote_code=True).to(DEVICE).eval()
    prompt = ids(1, 6, vocab=300).to(DEVICE)
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, num_inference_steps=2, inference_seed=0)
    assert out.shape == (1, 10)


def test_pipeline_on_the_device(trained):
    from transformers import AutoTokenizer, pipeline

    model = LTMForCausalLM.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device=torch.device(DEVICE))
    text = generator("ROMEO:", max_new_tokens=6, num_inference_steps=2, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:")


# ---- the library's paths ------------------------------------------------------------------------------------------


def test_generate_from_cpu_prompt_and_mask():
    """The end-of-training sample's call: a prompt and a mask made on the CPU reach the model's device."""
    model = make_model()
    prompt = ids(1, 5)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, inference_seed=0)
    assert out.device.type == torch.device(DEVICE).type and out.shape == (1, 9)


def test_left_padded_batch_equals_rows_alone():
    model = make_model()
    long, short = ids(1, 8, seed=1), ids(1, 5, seed=2)
    batch = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    batch[0], mask[0] = long[0], 1
    batch[1, 3:], mask[1, 3:] = short[0], 1
    kwargs = dict(max_new_tokens=5, do_sample=False, inference_seed=3, pad_token_id=0)
    together = model.generate(batch.to(DEVICE), attention_mask=mask.to(DEVICE), **kwargs)
    alone = [model.generate(row.to(DEVICE), **kwargs)[0, -5:] for row in (long, short)]
    assert torch.equal(together[0, -5:], alone[0]) and torch.equal(together[1, -5:], alone[1])


@pytest.fixture
def noise_drawn_on_the_cpu(monkeypatch):
    """Every seeded draw of a fit and of its bounds made by CPU generators and copied to the device, so a device
    run sees the CPU run's noise (the library draws on the device that uses it, whose streams differ)."""
    from modeling_ltm import fast_loop, inference, randomness, selection

    def on_the_cpu(seed, generator, batch_size, device="cpu"):
        return randomness.row_generators(seed, generator, batch_size, "cpu")

    for module in (inference, selection, fast_loop):
        monkeypatch.setattr(module, "row_generators", on_the_cpu)


def test_posterior_and_bounds_match_the_cpu(trained, noise_drawn_on_the_cpu):
    """The trained model's evaluation (fit, ELBO, importance-weighted bound, reconstruction) in fp32 on the device
    equals the CPU's on the same noise to 1e-3 of the NLL per token, far below the KL per token (asserted; the fit
    starts where training's does, log-variance -5, so its KL is large): a device path that lost or mis-signed the
    KL, or scored other tokens, fails."""
    on_device_model = LTMForCausalLM.from_pretrained(trained, dtype=torch.float32).eval().to(DEVICE)
    cpu = LTMForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    input_ids = ids(4, 16, vocab=cpu.config.vocab_size)
    settings = PosteriorFitSettings.training(cpu.config, num_steps=8)
    kwargs = dict(settings=settings, iw_samples=8, reconstruction=True, seed=[0, 1, 2, 3])
    on_device = evaluate_posterior(on_device_model, input_ids.to(DEVICE), **kwargs)
    on_cpu = evaluate_posterior(cpu, input_ids, **kwargs)
    per_token = on_cpu.num_tokens.float()
    tolerance = 1e-3 * float((on_cpu.nll / per_token).abs().max())
    assert float((on_cpu.kl / per_token).min()) > 10 * tolerance  # the KL is visible at this tolerance
    for name in ("nll", "kl", "elbo", "iw", "reconstruction_nll"):
        device_value = getattr(on_device, name).cpu() / per_token
        torch.testing.assert_close(device_value, getattr(on_cpu, name) / per_token, atol=tolerance, rtol=0)
    posterior = on_device_model.infer_latents(input_ids.to(DEVICE), num_steps=4, seed=0)
    assert posterior.z.device.type == torch.device(DEVICE).type


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_weights_in_reduced_precision(dtype):
    if dtype == BF16 and not ON_CUDA:
        pytest.skip("bf16 weights: checked on the GPU")
    model = make_model().to(dtype)
    input_ids = ids(2, 10).to(DEVICE)
    result = evaluate_posterior(model, input_ids, settings=PosteriorFitSettings.evaluation(model.config, num_steps=4),
                                iw_samples=2, seed=[0, 1])  # fmt: skip
    assert torch.isfinite(result.elbo).all() and torch.isfinite(result.iw).all()
    assert model.generate(input_ids, max_new_tokens=3, inference_seed=0).shape == (2, 13)


def test_posterior_encoder_trains_on_the_device():
    from modeling_ltm.tooling.amortized import fit_posterior_encoder

    model = make_model(posterior_encoder_size=32)
    history = fit_posterior_encoder(model, ids(8, 12).to(DEVICE), num_steps=4, batch_size=4)
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(history)))


@pytest.mark.parametrize("prior_type", ["standard_normal", "flow"])
def test_trainer_mixed_precision_accumulation_evaluate(tmp_path, prior_type):
    """LTMTrainer on the device (bf16 on CUDA, gradient accumulation, the evaluation's bounds), with the paper's
    prior and with the learned flow prior, whose parameters train with the decoder."""
    from datasets import Dataset

    from modeling_ltm import LTMTrainer, LTMTrainingArguments

    model = make_model(prior_type=prior_type)
    prior = model.model.latent_prior  # None for the standard normal: nothing to learn
    prior_before = [p.detach().clone() for p in prior.parameters()] if prior is not None else []
    data = Dataset.from_dict({"input_ids": ids(16, 16).tolist()})
    args = LTMTrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        per_device_eval_batch_size=4, num_inference_steps=4, eval_inference_steps=4, eval_iw_samples=2,
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=not ON_CUDA, bf16=ON_CUDA,
    )  # fmt: skip
    trainer = LTMTrainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(4)))
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_elbo_ppl"] > 1 and metrics["eval_iw_ppl"] > 1
    assert math.isfinite(metrics["eval_kl_per_token"])
    if prior is not None:
        assert any(not torch.equal(p.detach(), before) for p, before in zip(prior.parameters(), prior_before))


def test_compiled_forward_equals_eager():
    model = make_model()
    input_ids, latents = ids(2, 12).to(DEVICE), torch.randn(2, *model.config.latent_shape).to(DEVICE)
    eager = model(input_ids, latents=latents).logits
    backend = "inductor" if ON_CUDA else "eager"
    compiled = torch.compile(model, backend=backend, fullgraph=True)(input_ids, latents=latents).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


def test_static_cache_decoding_equals_dynamic():
    model = make_model(sliding_window=8)
    prompt, latents = ids(2, 6).to(DEVICE), torch.randn(2, *model.config.latent_shape).to(DEVICE)
    kwargs = dict(max_new_tokens=12, do_sample=False, latents=latents, pad_token_id=0)
    dynamic = model.generate(prompt, **kwargs)
    static = model.generate(prompt, cache_implementation="static", **kwargs)  # compiled on a GPU by transformers
    assert torch.equal(static, dynamic)


def test_lm_eval_ltm_model_on_the_device(tmp_path, noise_drawn_on_the_cpu):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed here")
    from lm_eval.tasks import TaskManager

    import eval_harness
    from eval_harness import LTMLM

    tokenizer = small_tokenizer(num_chars=8000, vocab_size=320)
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    LTMForCausalLM(config).save_pretrained(tmp_path)
    wikitext = tmp_path / "wiki.raw"
    wikitext.write_text(" = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor .\n")
    task_manager = TaskManager(include_path=str(eval_harness.TASKS_DIR), include_defaults=False,
                               metadata={"wikitext_path": str(wikitext)})  # fmt: skip

    def word_perplexity(device: str) -> float:
        lm = LTMLM(pretrained=str(tmp_path), num_inference_steps=2, batch_size=4, device=device)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=["wikitext2_local"], limit=2, task_manager=task_manager, bootstrap_iters=0
        )
        return results["results"]["wikitext2_local"]["word_perplexity,none"]

    # A CPU reference computed here: the same fits on the same noise (drawn on the CPU), so equal to float tolerance.
    # (This untrained model's KL is ~0 after a 2-step fit from the prior: the KL's presence on the device is checked
    # by the trained model's tests above.)
    on_device, on_cpu = word_perplexity(DEVICE), word_perplexity("cpu")
    assert on_device > 1 and math.log(on_device) == pytest.approx(math.log(on_cpu), rel=1e-3)


def test_ltm_eval_loglikelihood_and_generation_tasks_on_the_device(trained, tmp_path):
    """`ltm eval run` (lm-eval's CLI, model `ltm`) on the trained model on the device: a loglikelihood task
    (`lambada_local`), a generation task (`arithmetic_local`, greedy `generate_until`) and a rolling one, each with
    finite metrics, and the results file records the `ltm` model and its rolling bound."""
    output = tmp_path / "out"
    wikitext = tmp_path / "wiki.raw"
    wikitext.write_text(" = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor .\n")
    metadata = {"wikitext_path": str(wikitext), "lambada_source": str(trained.parent / "corpus.txt")}
    command = [
        sys.executable, "-m", "modeling_ltm.tooling.cli", "eval", "run", "--model", "ltm",
        "--model_args", f"pretrained={trained},num_inference_steps=2", "--device", DEVICE,
        "--tasks", "lambada_local,arithmetic_local,wikitext2_local", "--include_path", "eval_harness/tasks",
        "--metadata", json.dumps(metadata), "--num_fewshot", "1", "--limit", "2", "--batch_size", "2",
        "--output_path", str(output),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    (result_file,) = output.rglob("results_*.json")
    results = json.loads(result_file.read_text())
    for task in ("lambada_local", "arithmetic_local", "wikitext2_local"):
        finite_metrics(results, task)
    assert results["config"]["model"] == "ltm" and results["config"]["ltm_rolling_bound"] == "elbo"


# ---- what only a GPU shows ----------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("autocast", [None, BF16])
def test_graphed_fast_loop_equals_the_eager_loop(monkeypatch, autocast):
    """The CUDA-graph fast loop (one capture per batch shape, reused) equals the eager loop: fp32 to float
    tolerance, bf16 autocast to bf16 tolerance."""
    model = make_model()
    input_ids, mask = ids(3, 16).to(DEVICE), torch.ones(3, 16, dtype=torch.long, device=DEVICE)
    mask[1, :5] = 0
    fits = []
    for graphs in ("1", "0"):
        monkeypatch.setenv(fast_loop.CUDA_GRAPHS_ENV, graphs)
        with torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None):
            fits.append([fit_posterior(model, input_ids, mask, seed=[s, s + 1, s + 2], num_steps=8) for s in (0, 5)])
    assert len(fast_loop.FitCache.of(model).graphs) == 1  # captured once, replayed by both fits
    tolerance = dict(rtol=1e-4, atol=1e-4) if autocast is None else dict(rtol=2e-2, atol=2e-2)
    for graphed, eager in zip(*fits):
        for name in ("mu", "logvar", "elbo", "elbo_trace"):
            torch.testing.assert_close(getattr(graphed, name), getattr(eager, name), **tolerance)


@cuda_only
def test_graph_cache_keeps_the_most_recently_used_shapes(monkeypatch):
    """`MAX_CACHED_GRAPHS` graphs per model, least recently used evicted first; a hit replays the same graph, and a
    shape captured again after its eviction fits as the eager loop does."""
    model = make_model()
    graphs = fast_loop.FitCache.of(model).graphs
    graphs.clear()
    lengths = list(range(8, 8 + fast_loop.MAX_CACHED_GRAPHS + 1))

    def fit(length, seed=0):
        input_ids = ids(2, length).to(DEVICE)
        return fit_posterior(model, input_ids, seed=[seed, seed + 1], num_steps=fast_loop.MIN_GRAPHED_STEPS)

    captured = {}
    for length in lengths:
        before = set(map(id, graphs.values()))
        fit(length)
        (captured[length],) = [g for g in graphs.values() if id(g) not in before]
    assert len(graphs) == fast_loop.MAX_CACHED_GRAPHS
    assert all(g is not captured[lengths[0]] for g in graphs.values())  # the oldest went
    fit(lengths[1])  # a hit: no capture, and it becomes the most recently used
    assert len(graphs) == fast_loop.MAX_CACHED_GRAPHS and list(graphs.values())[-1] is captured[lengths[1]]
    recaptured = fit(lengths[0], seed=3)  # captured again: evicts the least recently used, lengths[2]
    assert all(g is not captured[lengths[2]] for g in graphs.values()) and len(graphs) == fast_loop.MAX_CACHED_GRAPHS
    monkeypatch.setenv(fast_loop.CUDA_GRAPHS_ENV, "0")
    eager = fit(lengths[0], seed=3)
    for name in ("mu", "logvar", "elbo"):
        torch.testing.assert_close(getattr(recaptured, name), getattr(eager, name), rtol=1e-4, atol=1e-4)


@cuda_only
def test_fast_loop_does_not_synchronise_with_the_host():
    """Inside the loop, no operation waits for the GPU (torch's sync debug mode raises on one)."""
    model = make_model()
    input_ids = ids(4, 16).to(DEVICE)
    fit_posterior(model, input_ids, seed=[0, 1, 2, 3], num_steps=8)  # capture outside the checked region
    batch = fast_loop.FitBatch.prepare(model, input_ids, None)
    settings = PosteriorFitSettings.training(model.config, num_steps=8)
    graph = fast_loop.FastStepGraph.for_fit(model, model, batch, settings)
    assert graph is not None
    generators = [torch.Generator(device=DEVICE).manual_seed(s) for s in range(4)]
    shape = (4, *model.config.latent_shape)
    noise = fast_loop.NoiseStream(shape, generators, DEVICE, num_draws=9)
    trace = torch.empty(8, 4, device=DEVICE)
    finite = torch.ones(8, dtype=torch.bool, device=DEVICE)
    mu = torch.zeros(shape, device=DEVICE)
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph.run(batch, mu, mu - 5, noise.next(), noise, settings, trace, finite, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(finite.all())


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_compiled_token_nll_equals_cross_entropy(dtype):
    from modeling_ltm import scoring

    logits = (torch.randn(64, 1000, device=DEVICE) * 3).to(dtype)
    logits[:, 990:] = float("-inf")
    targets = torch.randint(0, 990, (64,), device=DEVICE)
    targets[::7] = -100
    fused_logits = logits.clone().requires_grad_(True)
    native_logits = logits.float().requires_grad_(True)
    fused = scoring._TokenNLL.apply(fused_logits, targets)
    native = torch.nn.functional.cross_entropy(native_logits, targets, ignore_index=-100, reduction="none")
    torch.testing.assert_close(fused, native, rtol=1e-4, atol=1e-4)
    fused.sum().backward()
    native.sum().backward()
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused_logits.grad.float(), native_logits.grad, **tolerance)


@cuda_only
@pytest.mark.parametrize("worker", ["ddp", "fsdp2"])
def test_single_process_distributed_launch(tmp_path, worker):
    """`torchrun --nproc_per_node 1` (NCCL) of the DDP and FSDP2 workers of tests/test_ddp.py, on the GPU."""
    script = {"ddp": "ddp_worker.py", "fsdp2": "fsdp2_worker.py"}[worker]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(Path(__file__).resolve().parent / script)] + ([str(tmp_path)] if worker == "ddp" else [])  # fmt: skip
    env = {**os.environ, "LTM_WORKER_DEVICE": "cuda", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

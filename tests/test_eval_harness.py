"""lm-eval model "ltm", its CLI, the local tasks and the `evaluate` metric, on a tiny LTM with a real BPE tokenizer."""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
import transformers
from conftest import REPO_ROOT, finite_metrics, save_tiny_ltm_with_tokenizer
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

import eval_harness
from eval_harness import LTMLM
from modeling_ltm import LTMForCausalLM, PosteriorFitSettings
from modeling_ltm.inference import RECONSTRUCTION_CAVEAT


WORKER = Path(__file__).resolve().parent / "lmeval_worker.py"
STEPS = 2  # fast steps per posterior fit: enough to exercise the loop, cheap on 2 CPU cores

WIKITEXT_SAMPLE = """ = Robert Boulter = 
 Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role in 2000 .
 = = Career = = 
 In 2006 , Boulter starred alongside Whishaw in the play Citizenship .
 = Du Fu = 
 Du Fu was a prominent Chinese poet of the Tang dynasty .
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny LTM (context 64 tokens) and a byte-level BPE tokenizer trained on 8 KB of Tiny Shakespeare."""
    return save_tiny_ltm_with_tokenizer(tmp_path_factory.mktemp("ltm-eval"), vocab_size=320)


@pytest.fixture(scope="module")
def lm(checkpoint):
    return LTMLM(pretrained=str(checkpoint), num_inference_steps=STEPS, batch_size=4, device="cpu")


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


# --------------------------------------------------------------------------------------- lm-eval end to end


def test_simple_evaluate_runs_every_local_task(checkpoint, tmp_path, tiny_shakespeare_path):
    wikitext = tmp_path / "wiki.raw"
    wikitext.write_text(WIKITEXT_SAMPLE)
    # lambada_local's source is named, so a checkout without ../shared/data runs on the generated stand-in.
    metadata = {"wikitext_path": str(wikitext), "lambada_source": str(tiny_shakespeare_path)}
    task_manager = TaskManager(include_path=str(eval_harness.TASKS_DIR), include_defaults=False, metadata=metadata)
    results = lm_eval.simple_evaluate(
        model="ltm",
        model_args={"pretrained": str(checkpoint), "num_inference_steps": STEPS, "batch_size": "4", "device": "cpu"},
        tasks=["wikitext2_local", "lambada_local", "arithmetic_local"],
        limit=3,
        num_fewshot=2,
        task_manager=task_manager,
        bootstrap_iters=0,
    )
    assert set(finite_metrics(results, "wikitext2_local")) == {
        "word_perplexity,none",
        "byte_perplexity,none",
        "bits_per_byte,none",
    }
    assert set(finite_metrics(results, "lambada_local")) == {"perplexity,none", "acc,none"}
    assert set(finite_metrics(results, "arithmetic_local")) == {"exact_match,first-integer"}
    assert results["results"]["wikitext2_local"]["sample_len"] == 2  # two articles in the sample file
    config = results["config"]
    assert config["ltm_rolling_bound"] == "elbo" and config["ltm_rolling_kl_per_token"] >= 0
    assert math.isclose(
        config["ltm_rolling_neg_bound_per_token"],
        config["ltm_rolling_nll_per_token"] + config["ltm_rolling_kl_per_token"],
        rel_tol=1e-6,
    )


@pytest.mark.slow
def test_cli_writes_results_json(checkpoint, tmp_path, tiny_shakespeare_path):
    output = tmp_path / "out"
    wikitext = tmp_path / "wiki.raw"
    wikitext.write_text(WIKITEXT_SAMPLE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "eval_harness",
        "--model", "ltm",
        "--model_args", f"pretrained={checkpoint},num_inference_steps={STEPS}",
        "--tasks", "wikitext2_local,lambada_local,arithmetic_local",
        "--include_path", "eval_harness/tasks",
        "--metadata", json.dumps({"wikitext_path": str(wikitext), "lambada_source": str(tiny_shakespeare_path)}),
        "--num_fewshot", "1",
        "--limit", "2",
        "--batch_size", "2",
        "--output_path", str(output),
        "--log_samples",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result_files = list(output.rglob("results_*.json"))
    assert len(result_files) == 1, list(output.rglob("*"))
    results = json.loads(result_files[0].read_text())
    finite_metrics(results, "wikitext2_local")
    finite_metrics(results, "lambada_local")
    finite_metrics(results, "arithmetic_local")
    assert results["config"]["model"] == "ltm" and results["config"]["ltm_rolling_bound"] == "elbo"
    assert len(list(output.rglob("samples_*.jsonl"))) == 3


def test_ltm_eval_dispatches_to_lm_eval_cli(capsys):
    from modeling_ltm.tooling.cli import main

    assert main(["eval", "run", "--help"]) == 0
    assert "--include_path" in capsys.readouterr().out


def test_double_import_does_not_reregister():
    import lm_eval.api.registry as registry

    importlib.reload(importlib.import_module("eval_harness.lm"))
    assert registry.get_model("ltm").__name__ == "LTMLM"
    assert registry.get_model("hf").__name__ == "HFLM"  # built-in names still resolve


# ---------------------------------------------------------------------------------------------- loglikelihood


def capture_forward_calls(model):
    """Record `(input_ids, latents)` of every forward call of `model`."""
    calls = []

    def hook(module, args, kwargs):
        latents = kwargs.get("latents")
        calls.append((kwargs["input_ids"].clone(), None if latents is None else latents.detach().clone()))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_latents_never_see_the_continuation(lm):
    context = "ROMEO: But soft, what light"
    runs = []
    for continuation in (" is that?", " through yonder window breaks?"):
        calls, handle = capture_forward_calls(lm.model)
        try:
            lm.loglikelihood([request("loglikelihood", context, continuation)], disable_tqdm=True)
        finally:
            handle.remove()
        runs.append(calls)
    (*fit_a, score_a), (*fit_b, score_b) = runs
    assert len(fit_a) == len(fit_b) == STEPS + 1  # the fast loop, then its final evaluation
    context_ids = torch.tensor([lm.tok_encode(context)])
    for (ids_a, _), (ids_b, _) in zip(fit_a, fit_b, strict=True):
        assert torch.equal(ids_a, context_ids) and torch.equal(ids_b, context_ids)
    torch.testing.assert_close(score_a[1], score_b[1], rtol=0, atol=0)
    assert score_a[1].abs().sum() > 0


def loglikelihood_requests():
    contexts = ["ROMEO:", "JULIET: O Romeo, Romeo!", "First Citizen: Before we proceed any further, hear me"]
    continuations = [" speak.", " wherefore art thou", " Romeo?", " and"]
    return [request("loglikelihood", c, x) for c in contexts for x in continuations]


def test_loglikelihood_is_deterministic_and_independent_of_batch_size(checkpoint, lm):
    requests = loglikelihood_requests()
    reference = lm.loglikelihood(requests, disable_tqdm=True)
    assert lm.loglikelihood(requests, disable_tqdm=True) == reference
    single = LTMLM(pretrained=str(checkpoint), num_inference_steps=STEPS, batch_size=1, device="cpu")
    eight = LTMLM(pretrained=str(checkpoint), num_inference_steps=STEPS, batch_size="8", device="cpu")
    for other in (single, eight):
        results = other.loglikelihood(requests, disable_tqdm=True)
        assert [greedy for _, greedy in results] == [greedy for _, greedy in reference]
        torch.testing.assert_close(
            torch.tensor([lp for lp, _ in results]), torch.tensor([lp for lp, _ in reference]), rtol=1e-4, atol=1e-4
        )
    assert all(math.isfinite(lp) and lp < 0 for lp, _ in reference)


def test_loglikelihood_equals_scoring_with_the_context_posterior(lm):
    context, continuation = "JULIET: O Romeo, Romeo!", " wherefore art thou"
    ((logprob, _),) = lm.loglikelihood([request("loglikelihood", context, continuation)], disable_tqdm=True)
    context_ids, continuation_ids = lm._encode_pair(context, continuation)
    z = lm.fit_context_latents([context_ids])
    with torch.no_grad():
        logits = lm.model(torch.tensor([context_ids + continuation_ids[:-1]]), latents=z).logits
    expected = torch.log_softmax(logits[0, -len(continuation_ids) :], -1).gather(
        -1, torch.tensor(continuation_ids)[:, None]
    )
    assert logprob == pytest.approx(float(expected.sum()), abs=1e-4)


def test_empty_context_uses_the_prior_mean(lm):
    calls, handle = capture_forward_calls(lm.model)
    try:
        ((logprob, _),) = lm.loglikelihood([request("loglikelihood", "", "ROMEO: speak")], disable_tqdm=True)
    finally:
        handle.remove()
    assert len(calls) == 1  # no posterior fit: nothing to fit on
    assert calls[0][0][0, 0].item() == lm.prefix_token_id
    assert torch.count_nonzero(calls[0][1]) == 0
    assert math.isfinite(logprob)


def test_long_context_is_left_truncated(lm):
    """A context longer than the model keeps its last tokens (as HFLM does): the score equals that of the request
    made of exactly those tokens, and no forward (fit or scoring) sees more than `max_length` tokens."""
    long_context = "ROMEO: " + "speak, " * 200
    context_ids, continuation_ids = lm._encode_pair(long_context, " again")
    assert len(context_ids) + len(continuation_ids) > lm.max_length + 1
    calls, handle = capture_forward_calls(lm.model)
    try:
        ((logprob, _),) = lm.loglikelihood([request("loglikelihood", long_context, " again")], disable_tqdm=True)
    finally:
        handle.remove()
    assert calls and all(input_ids.shape[1] <= lm.max_length for input_ids, _ in calls)
    kept_context = (context_ids + continuation_ids)[-(lm.max_length + 1) :][: -len(continuation_ids)]
    ((expected, _),) = lm._loglikelihood_tokens([(None, kept_context, continuation_ids)], disable_tqdm=True)
    assert math.isfinite(logprob) and logprob == pytest.approx(expected, abs=1e-5)


def test_bad_inputs_get_clear_errors(checkpoint, lm, monkeypatch):
    with pytest.raises(ValueError, match="empty continuation"):
        lm.loglikelihood([request("loglikelihood", "ROMEO:", "")], disable_tqdm=True)
    with pytest.raises(ValueError, match=r"Unknown model_args.*\['num_inference_step'\].*num_inference_steps"):
        LTMLM(pretrained=str(checkpoint), num_inference_step=16)
    with pytest.raises(ValueError, match="max_length=65 exceeds the model's max_position_embeddings"):
        LTMLM(pretrained=str(checkpoint), max_length=65)
    with pytest.raises(ValueError, match="`backend` must be 'causal'"):
        LTMLM(pretrained=str(checkpoint), backend="seq2seq")
    with monkeypatch.context() as patch:  # torchrun on CPU without ACCELERATE_USE_CPU: accelerate sees 1 process
        patch.setenv("WORLD_SIZE", "2")
        with pytest.raises(ValueError, match="WORLD_SIZE=2.*set ACCELERATE_USE_CPU=1"):
            LTMLM(pretrained=str(checkpoint), device="cpu")
    with pytest.raises(ValueError, match="batch_size='auto' is not supported"):
        LTMLM(pretrained=str(checkpoint), batch_size="auto")
    with pytest.raises(ValueError, match="`iw_samples` must be an integer >= 0"):
        LTMLM(pretrained=str(checkpoint), iw_samples=-1)
    with pytest.raises(ValueError, match="continuation of 70 tokens is longer than the model's context"):
        lm._loglikelihood_tokens([(None, [1], [5] * 70)], disable_tqdm=True)


def test_hflm_model_args_apply(checkpoint):
    """model_args are lm-eval's `hf` model's (HFLM), forwarded to `from_pretrained` when HFLM does not know them."""
    short = LTMLM(pretrained=str(checkpoint), max_length=32, eval_inference_steps=3, device="cpu")
    assert short.max_length == 32 and short.fit_settings.num_steps == 3  # a config field, through from_pretrained
    assert all(len(c) + len(p) <= 32 for c, p in short.rolling_windows("ROMEO: " + "speak, " * 40))
    calls, handle = capture_forward_calls(short.model)
    try:
        short.loglikelihood([request("loglikelihood", "ROMEO: " + "speak, " * 40, " again")], disable_tqdm=True)
    finally:
        handle.remove()
    assert calls and all(input_ids.shape[1] <= 32 for input_ids, _ in calls)


def test_model_instance_and_non_ltm_models(lm):
    same = LTMLM(pretrained=lm.model, tokenizer=lm.tokenizer, num_inference_steps=STEPS, batch_size=4)
    requests = loglikelihood_requests()[:4]
    assert same.loglikelihood(requests, disable_tqdm=True) == lm.loglikelihood(requests, disable_tqdm=True)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(lm.tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2,
        )
    )  # fmt: skip
    with pytest.raises(TypeError, match="LlamaForCausalLM, not a Latent-Thought LM.*--model hf"):
        LTMLM(pretrained=llama, tokenizer=lm.tokenizer)


# ------------------------------------------------------------------------------------- loglikelihood_rolling


def test_every_fit_uses_the_evaluation_settings(checkpoint, lm):
    config = lm.model.config
    assert lm.fit_settings == PosteriorFitSettings.evaluation(config, num_steps=STEPS)
    default = LTMLM(pretrained=str(checkpoint), device="cpu")
    assert default.fit_settings == PosteriorFitSettings.evaluation(config)  # not the training fast loop's
    assert default.fit_settings.init_logvar == 0.0 and not default.fit_settings.fixed_noise
    assert lm.get_model_info()["ltm_fit_settings"] == lm.fit_settings.describe()


def test_rolling_is_the_elbo_of_evaluate_posterior(lm):
    text = "ROMEO: But soft, what light"
    (window,) = lm.rolling_windows(text)
    (bound,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
    result = lm.model.evaluate_posterior(
        torch.tensor([window[0] + window[1]]), settings=lm.fit_settings, seed=[lm.window_seed(window)]
    )
    assert bound == pytest.approx(float(result.elbo), rel=1e-5)
    # The evaluation's selection rule may keep the fit's start (q = p(z), KL 0) when the fit ends looser.
    assert result.kl.item() >= 0 and result.num_tokens.item() == len(lm.tok_encode(text))


def test_rolling_windows_score_every_token_once_and_sum(lm):
    text = " ".join(["Now is the winter of our discontent made glorious summer by this sun of York;"] * 6)
    windows = lm.rolling_windows(text)
    assert len(windows) > 1
    assert [t for _, predicted in windows for t in predicted] == lm.tok_encode(text)
    assert all(len(c) + len(p) <= lm.max_length for c, p in windows)
    whole, empty = lm.loglikelihood_rolling(
        [request("loglikelihood_rolling", text), request("loglikelihood_rolling", "")], disable_tqdm=True
    )
    assert empty == 0.0 and math.isfinite(whole) and whole < 0


def test_rolling_importance_weighted_bound(checkpoint):
    lm_iw = LTMLM(pretrained=str(checkpoint), num_inference_steps=STEPS, iw_samples=4, device="cpu")
    (bound,) = lm_iw.loglikelihood_rolling([request("loglikelihood_rolling", "ROMEO: But soft")], disable_tqdm=True)
    assert math.isfinite(bound) and bound < 0
    assert lm_iw.get_model_info()["ltm_rolling_bound"] == "importance_weighted(K=4)"


# --------------------------------------------------------------------------------------------- generate_until


def test_generate_until_stops_at_until(lm):
    requests = [
        request("generate_until", "ROMEO:", {"until": ["\n", "e"], "max_gen_toks": 6}),
        request("generate_until", "", {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}),
    ]
    outputs = lm.generate_until(requests, disable_tqdm=True)
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)
    assert "\n" not in outputs[0] and "e" not in outputs[0]
    # An empty context is conditioned on the prefix token (z: the prior mean), alone or padded beside another.
    kwargs = {"until": ["QQQ"], "max_gen_toks": 4, "min_new_tokens": 4}  # gen_kwargs go on to generate()
    (alone,) = lm.generate_until([request("generate_until", "", kwargs)], disable_tqdm=True)
    together = lm.generate_until(
        [request("generate_until", "", kwargs), request("generate_until", "ROMEO: But soft", kwargs)],
        disable_tqdm=True,
    )
    prefix = torch.tensor([[lm.prefix_token_id]])
    with torch.no_grad():
        expected = lm.model.generate(
            prefix, latents=lm.fit_context_latents([[]]), max_new_tokens=4, min_new_tokens=4, do_sample=False
        )
    assert together[0] == alone == lm.tok_decode(expected[0, 1:].tolist()) and len(alone) > 0
    with pytest.raises(ValueError, match="max_gen_toks=64 leaves no room"):
        lm.generate_until([request("generate_until", "ROMEO:", {"until": ["\n"], "max_gen_toks": 64})])


def test_generate_until_fits_latents_on_the_truncated_context(lm):
    """HFLM's generate_until truncates the context to `max_length - max_gen_toks` tokens; z is fitted on exactly
    those tokens and passed to every forward of `generate`."""
    context, max_gen_toks = "ROMEO: " + "speak, " * 40, 8
    kept = lm.tok_encode(context)[-(lm.max_length - max_gen_toks) :]
    calls, handle = capture_forward_calls(lm.model)
    try:
        (text,) = lm.generate_until(
            [request("generate_until", context, {"until": ["QQQ"], "max_gen_toks": max_gen_toks})], disable_tqdm=True
        )
    finally:
        handle.remove()
    fit, generation = calls[: STEPS + 1], calls[STEPS + 1 :]
    assert all(torch.equal(ids, torch.tensor([kept])) for ids, _ in fit)
    assert torch.equal(generation[0][0], torch.tensor([kept])) and 1 <= len(generation) <= max_gen_toks
    expected = lm.fit_context_latents([kept])
    assert all(torch.equal(latents, expected) for _, latents in generation)
    assert isinstance(text, str)


def flatten(value) -> list:
    """The leaves of nested lists/tuples, in order."""
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in flatten(item)]
    return [value]


@pytest.mark.slow
def test_two_processes_give_the_single_process_results(checkpoint, tmp_path, tiny_shakespeare_path):
    """`torchrun --nproc_per_node 2` (gloo, CPU) through HFLM's accelerate support: each process evaluates part of
    every task, and lm-eval's gathered results equal one process's (tests/lmeval_worker.py). Three documents per task
    over two processes, so lm-eval pads one process's share with a repeated request, which the rolling totals count
    once."""
    from lmeval_worker import evaluate_local

    wikitext = tmp_path / "wiki.raw"
    wikitext.write_text(WIKITEXT_SAMPLE + " = Li Bai = \n Li Bai was a Chinese poet of the Tang dynasty .\n")
    metadata = {"wikitext_path": str(wikitext), "lambada_source": str(tiny_shakespeare_path)}
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
        str(WORKER), str(checkpoint), str(tmp_path / "two"), "--metadata", json.dumps(metadata),
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = json.loads(json.dumps(evaluate_local(str(checkpoint), str(tmp_path / "one"), metadata), default=str))
    finally:
        torch.set_num_threads(threads)

    shares = [json.loads((tmp_path / "two" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert single["world_size"] == 1 and single["requests"] == {
        "loglikelihood_rolling": 3,
        "loglikelihood": 3,  # lambada_local: one request per document
        "generate_until": 3,
    }
    for rank, share in enumerate(shares):
        assert share["rank"] == rank and share["world_size"] == 2
        assert share["requests"] == {kind: 2 for kind in single["requests"]}  # 2 of 3, one of them repeated
    for task in one["results"]:
        assert one["results"][task]["sample_len"] == two["results"][task]["sample_len"] == 3
        metrics = finite_metrics(one, task)
        assert metrics == pytest.approx(finite_metrics(two, task), rel=1e-5), task
        samples_one = sorted(one["samples"][task], key=lambda sample: sample["doc_id"])
        samples_two = sorted(two["samples"][task], key=lambda sample: sample["doc_id"])
        assert [s["doc_id"] for s in samples_two] == [0, 1, 2]
        for a, b in zip(samples_one, samples_two, strict=True):
            assert a["arguments"] == b["arguments"]
            values_a, values_b = flatten(a["filtered_resps"]), flatten(b["filtered_resps"])
            assert [type(v) for v in values_a] == [type(v) for v in values_b], task
            for x, y in zip(values_a, values_b, strict=True):
                assert x == (pytest.approx(y, rel=1e-5) if type(x) is float else y), task
    for key in ("ltm_rolling_tokens", "ltm_rolling_nll_per_token", "ltm_rolling_kl_per_token"):
        assert one["config"][key] == pytest.approx(two["config"][key], rel=1e-5), key


# ------------------------------------------------------------------------------------------------- tasks, metric


def test_task_data_is_configurable_and_deterministic(tmp_path, monkeypatch, tiny_shakespeare_path):
    sys.path.insert(0, str(eval_harness.TASKS_DIR))
    try:
        import arithmetic_local
        import lambada_local
        import wikitext_local
    finally:
        sys.path.remove(str(eval_harness.TASKS_DIR))
    wikitext = tmp_path / "wiki.raw"
    wikitext.write_text(WIKITEXT_SAMPLE)
    monkeypatch.setenv("LTM_EVAL_WIKITEXT", str(wikitext))
    pages = wikitext_local.load_documents(version=1.0)["test"]["page"]
    assert len(pages) == 2 and pages[1].startswith(" = Du Fu = ")
    monkeypatch.setenv("LTM_EVAL_WIKITEXT", str(tmp_path / "missing.raw"))
    with pytest.raises(FileNotFoundError, match="LTM_EVAL_WIKITEXT"):
        wikitext_local.load_documents()

    items = tmp_path / "items.jsonl"
    monkeypatch.setenv("LTM_EVAL_LAMBADA_SOURCE", str(tiny_shakespeare_path))  # the default, or the stand-in
    assert lambada_local.main(["--source", str(tiny_shakespeare_path), "--output", str(items)]) == 0
    texts = [json.loads(line)["text"] for line in items.read_text().splitlines()]
    assert (
        texts
        == lambada_local.load_items()["test"]["text"]
        == lambada_local.load_items(lambada_path=str(items))["test"]["text"]
    )
    for text in texts:
        *prefix, target = text.split(" ")
        assert target.isalpha() and target.lower() in " ".join(prefix).lower()

    problems = arithmetic_local.load_problems()
    assert problems["test"][:3] == arithmetic_local.load_problems()["test"][:3]
    assert not set(problems["test"]["question"][:20]) & set(problems["train"]["question"])
    for row in problems["test"]:
        a, op, b = row["question"].removeprefix("What is ").rstrip("?").split(" ")
        assert int(row["answer"]) == (int(a) + int(b) if op == "plus" else int(a) - int(b))


def test_evaluate_metric_loads_and_computes(checkpoint):
    import evaluate

    metric = evaluate.load(str(eval_harness.METRICS_DIR / "elbo_perplexity"))
    texts = ["ROMEO: But soft, what light", "JULIET: O Romeo, Romeo! wherefore art thou Romeo?"]
    results = metric.compute(predictions=texts, model_id=str(checkpoint), num_inference_steps=STEPS, batch_size=2)
    assert results["bound"] == "elbo" and len(results["perplexities"]) == 2
    for ppl, nll, kl in zip(results["perplexities"], results["nll_per_token"], results["kl_per_token"], strict=True):
        assert ppl == pytest.approx(math.exp(nll + kl), rel=1e-4) and kl >= 0
    alone = metric.compute(predictions=texts[1:], model_id=str(checkpoint), num_inference_steps=STEPS)
    assert alone["perplexities"][0] == pytest.approx(results["perplexities"][1], rel=1e-4)
    # The evaluation fit's settings, and the reconstruction perplexity beside the bounds under its own name.
    config = LTMForCausalLM.config_class.from_pretrained(checkpoint)
    assert results["fit_settings"] == PosteriorFitSettings.evaluation(config, num_steps=STEPS).describe()
    assert len(results["reconstruction_perplexities"]) == 2
    assert all(math.isfinite(ppl) and ppl > 1 for ppl in results["reconstruction_perplexities"])
    assert RECONSTRUCTION_CAVEAT in results["reconstruction_note"] and "T=4" in results["reconstruction_note"]
    assert "reconstruction_perplexities" not in metric.compute(
        predictions=texts, model_id=str(checkpoint), num_inference_steps=STEPS, reconstruction=False
    )

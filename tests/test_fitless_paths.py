"""Paths that do not fit `z` say so, once (issue 30, item 2): `forward` without latents (what lm-eval's `--model hf`
scores) and plain `transformers.Trainer` (which trains at the prior's mean). Our own paths (generate, the fits,
`LTMTrainer`, `ltm eval`'s scoring, a forward with `latents=model.prior_mean_latents(...)`) never warn."""

import pytest
import torch
from conftest import save_tiny_ltm_with_tokenizer, tiny_config, training_arguments
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from modeling_ltm import LTMForCausalLM, LTMTrainer, LTMTrainingArguments
from modeling_ltm.modeling_ltm import NO_LATENTS_WARNING, TRAINING_WITHOUT_LATENTS_WARNING


MODEL_LOGGER = logging.get_logger("modeling_ltm.modeling_ltm")


@pytest.fixture(autouse=True)
def fresh_warning_once():
    """`logger.warning_once` remembers a message for the whole process (an lru_cache): forget earlier tests'."""
    logging.warning_once.cache_clear()
    yield
    logging.warning_once.cache_clear()


def captured_logs():
    return CaptureLogger(MODEL_LOGGER)


def make_model(**overrides) -> LTMForCausalLM:
    torch.manual_seed(0)
    return LTMForCausalLM(tiny_config(**overrides)).eval()


def blocks(num: int = 8, length: int = 16, vocab: int = 128) -> Dataset:
    ids = torch.randint(1, vocab, (num, length), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


@pytest.mark.parametrize("prior_type", ["standard_normal", "diagonal_gaussian"])
def test_forward_without_latents_warns_once_naming_the_scoring_paths(prior_type):
    model = make_model(prior_type=prior_type)
    input_ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with captured_logs() as logs:
        without = model(input_ids).logits
        model(input_ids, labels=input_ids)  # eval mode: the scoring message, not the training one
    assert logs.out.count(NO_LATENTS_WARNING) == 1, logs.out
    assert TRAINING_WITHOUT_LATENTS_WARNING not in logs.out
    for named in ("`ltm eval`", "--model ltm", "LTMTrainer", "--model hf"):
        assert named in NO_LATENTS_WARNING
    # The prior's mean on purpose: the same numbers, no warning.
    logging.warning_once.cache_clear()
    with captured_logs() as logs:
        explicit = model(input_ids, latents=model.prior_mean_latents(2)).logits
    assert logs.out == ""
    assert torch.equal(explicit, without)


def test_our_own_paths_do_not_warn():
    """generate (fit on the prompt, prior samples, given latents, beams, no cache), the fits and the bounds."""
    model = make_model()
    prompt = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with captured_logs() as logs:
        model.generate(prompt, max_new_tokens=4, do_sample=False)
        model.generate(prompt, max_new_tokens=4, num_beams=2)
        model.generate(prompt, max_new_tokens=4, use_cache=False)
        model.generate(prompt, max_new_tokens=4, latents="prior", do_sample=True)
        model.generate(max_new_tokens=4, do_sample=True, bos_token_id=1)
        posterior = model.infer_latents(prompt, num_steps=2, seed=0)
        model.generate(prompt, latents=posterior, max_new_tokens=4)
        model.evaluate_posterior(prompt, iw_samples=2, reconstruction=True, seed=[0, 1])
        model(prompt, latents=posterior.z, labels=prompt)
    assert logs.out == "", logs.out


def test_plain_trainer_warns_once_naming_ltm_trainer(tmp_path):
    model = make_model()
    trainer = Trainer(
        model=model,
        args=training_arguments(TrainingArguments, tmp_path, max_steps=2),
        train_dataset=blocks(),
        eval_dataset=blocks(4),
    )
    with captured_logs() as logs:
        trainer.train()
    assert logs.out.count(TRAINING_WITHOUT_LATENTS_WARNING) == 1, logs.out
    assert NO_LATENTS_WARNING not in logs.out  # one message for this path
    assert "LTMTrainer" in TRAINING_WITHOUT_LATENTS_WARNING
    with captured_logs() as logs:
        trainer.evaluate()  # eval mode, no latents: the scoring message (not a bound)
    assert logs.out.count(NO_LATENTS_WARNING) == 1, logs.out


def test_ltm_trainer_does_not_warn(tmp_path):
    trainer = LTMTrainer(
        model=make_model(),
        args=training_arguments(
            LTMTrainingArguments, tmp_path, max_steps=2, num_inference_steps=2, eval_inference_steps=2
        ),
        train_dataset=blocks(),
        eval_dataset=blocks(4),
    )
    with captured_logs() as logs:
        trainer.train()
        trainer.evaluate(iw_samples=2)
        trainer.predict(blocks(4))  # logits given the evaluation fit's z
    assert logs.out == "", logs.out


@pytest.fixture(scope="module")
def saved_with_tokenizer(tmp_path_factory):
    return save_tiny_ltm_with_tokenizer(tmp_path_factory.mktemp("fitless"), vocab_size=300)


def requests(kind, *args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=0)]


def test_ltm_eval_scoring_does_not_warn(saved_with_tokenizer):
    """`--model ltm`: fitted contexts, a 1-token context at the prior's mean (passed explicitly), rolling bounds,
    generation."""
    from eval_harness.lm import LTMLM

    lm = LTMLM(pretrained=str(saved_with_tokenizer), num_inference_steps=2, batch_size=2, device="cpu")
    with captured_logs() as logs:
        lm.loglikelihood(requests("loglikelihood", "ROMEO: good", " morrow"), disable_tqdm=True)
        lm.loglikelihood(requests("loglikelihood", "", "ROMEO: speak"), disable_tqdm=True)  # empty context
        lm.loglikelihood_rolling(requests("loglikelihood_rolling", "To be, or not to be."), disable_tqdm=True)
        lm.generate_until(requests("generate_until", "ROMEO:", {"max_gen_toks": 4, "until": ["\n\n"]}))
    assert logs.out == "", logs.out


def test_lm_eval_hf_model_warns_once(saved_with_tokenizer):
    """lm-eval's own `hf` model scores `forward()` without latents: the number is not a bound, and the log says so."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(saved_with_tokenizer), batch_size=2, device="cpu")
    with captured_logs() as logs:
        lm.loglikelihood(requests("loglikelihood", "ROMEO: good", " morrow"), disable_tqdm=True)
        lm.loglikelihood(requests("loglikelihood", "JULIET: good", " night"), disable_tqdm=True)
    assert logs.out.count(NO_LATENTS_WARNING) == 1, logs.out

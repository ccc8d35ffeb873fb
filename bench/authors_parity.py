"""Side by side with the authors' code (github.com/mingluzhao/Latent-Thought-LM: `model.py`, `optimizer.py`), run
from a local clone named by `--authors-code` (never copied into this repository):

1. **Checkpoints.** A tiny model of theirs (random weights, perturbed away from the initialisation so every weight
   matters) is saved as their `train_ltm.py` saves it (`torch.save({"model", "optimizer", "model_args", ...})`),
   converted by `ltm convert-original`, loaded with `AutoModelForCausalLM.from_pretrained`: max |logit difference|
   for the same random `z` (and at `z = 0`), with Liger and plain module names; and with the library's default
   latent positions (`latent_position_spacing="per_layer"`), what that difference changes.
2. **The fast loop.** From the same start (`mu`, `logvar`) and the same `eps`, their `PosteriorOptimizer` (T fast
   steps, their training objective) against ours with the training fast loop of `configuration/ltm-s.json` (the
   paper preset): max |difference| of `mu` and `logvar` after T steps; then with each of the preset's paper fields
   set back to this library's default, one at a time (and `mu` started at 0), to measure what each changes.
3. **The slow step.** Their decoder loss at `z = mu_T + eps sigma_T` (the fast loop's own `eps`) against ours
   (`LTMTrainingArguments.slow_step_noise="fast_loop"`: `PosteriorOutput.fit_sample`).

Their `model.py` imports `liger_module` (GPU kernels): a stand-in in plain torch, written here from the formulas,
replaces it; their attention modules are `torch.compile`d under `use_liger=True`, which runs eagerly here
(`torch._dynamo` disabled: the state-dict names keep `_orig_mod.`). Float32 on the CPU.

    python bench/authors_parity.py --authors-code path/to/Latent-Thought-LM --out bench/results/authors_parity.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import run_metadata, save_json  # noqa: E402
from modeling_ltm import LTMConfig  # noqa: E402
from modeling_ltm.tooling.convert_original import main as convert_main  # noqa: E402
from modeling_ltm.inference import PosteriorFitSettings, fit_posterior  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
# The preset whose fast loop is compared (its fields, not its sizes: the model is the tiny one below).
PRESET = REPO / "configuration" / "ltm-s.json"
# The tiny model: 2 layers of width 64, 4 heads, 8 latents per layer (16 in all), context 64, window 16.
TINY_ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=300, multiple_of=32, max_seq_len=64,
                 window_size=16, max_z_len=16, use_z_pos_emb=True, dropout=0.0)  # fmt: skip
# The preset's fields where the authors' code differs from this library's defaults (docs/fidelity.md, section 7).
PAPER_FIELDS = {
    "weight_decay": 0.0,  # AdamW's default 0.01 -> Adam
    "lr": 0.3,  # constant peak 0.34 -> the library's 0.3
    "lr_schedule": "cosine_t_minus_1",  # cos(pi s / T) -> cos(pi s / (T - 1))
    "loss_reduction": "per_token",  # summed objective -> per-token objective
}


def liger_stand_in() -> types.ModuleType:
    """A `liger_module` in plain torch: RMSNorm computed in float32 and cast back before the scale ("llama" casting),
    SwiGLU with `gate_proj` / `up_proj` / `down_proj`, and torch's cross-entropy."""

    class LigerRMSNorm(nn.Module):
        def __init__(self, hidden_size, eps=1e-6, **_):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden_size))
            self.variance_epsilon = eps

        def forward(self, x):
            x32 = x.float()
            return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(
                x.dtype
            )

    class LigerSwiGLUMLP(nn.Module):
        def __init__(self, dim, hidden_dim, multiple_of, dropout):
            super().__init__()
            if hidden_dim is None:
                hidden_dim = multiple_of * ((int(2 * 4 * dim / 3) + multiple_of - 1) // multiple_of)
            self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
            self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
            self.up_proj = nn.Linear(dim, hidden_dim, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    module = types.ModuleType("liger_module")
    module.LigerRMSNorm, module.LigerSwiGLUMLP = LigerRMSNorm, LigerSwiGLUMLP
    module.LigerCrossEntropyLoss, module.LigerLayerNorm = nn.CrossEntropyLoss, nn.LayerNorm
    module.liger_rotary_pos_emb = None  # imported by their model.py, never called
    return module


def load_authors(path: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """Their `model.py` and `optimizer.py` as modules (`liger_module` replaced by the stand-in)."""
    sys.modules.setdefault("liger_module", liger_stand_in())
    modules = []
    for name in ("model", "optimizer"):
        spec = importlib.util.spec_from_file_location(f"authors_{name}", path / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


def authors_checkpoint(authors_model, use_liger: bool, folder: Path, seed: int) -> tuple[nn.Module, Path]:
    """Their model with random weights (their initialisation plus N(0, 0.05) everywhere), saved as their
    `train_ltm.py` saves a checkpoint; returns the model and the file."""
    torch.manual_seed(seed)
    model_args = dict(TINY_ARGS, use_liger=use_liger)
    model = authors_model.LatentThoughtModel(authors_model.LTMConfig(**model_args))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95))
    config = {"num_steps": 4, "fast_lr": 0.34, "initial_fast_lr": 0.3, "final_fast_lr": 0.34, "max_z_len": 16,
              "z_dim": 64, "batch_size": 2, "max_seq_len": 64, "learning_rate": 4e-4}  # fmt: skip
    path = folder / f"ckpt_1000_{'liger' if use_liger else 'plain'}.pt"
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
         "iter_num": 1000, "best_val_loss": torch.tensor(5.0), "config": config,
         "rng_state": torch.random.get_rng_state()},
        path,
    )  # fmt: skip
    return model.eval(), path


def compare_logits(theirs: nn.Module, ours, seed: int) -> dict:
    """Max |logit difference| on 2 random rows of 48 tokens, at random `z ~ N(0, I)` and at `z = 0`."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY_ARGS["vocab_size"], (2, 48), generator=generator)
    z = torch.randn((2, *ours.config.latent_shape), generator=generator)
    result = {}
    with torch.no_grad():
        for name, latents in (("random_z", z), ("zero_z", torch.zeros_like(z))):
            expected = theirs.output(theirs.decoder_forward(tokens, latents.flatten(1, 2)))
            actual = ours(input_ids=tokens, latents=latents).logits[..., : TINY_ARGS["vocab_size"]]
            result[name] = (expected - actual).abs().max().item()
    return result


@contextlib.contextmanager
def recording_adamw(authors_optimizer):
    """Their `torch.optim.AdamW` replaced by a subclass that keeps each instance (its params are `mu`, `logvar`)."""
    made = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    original = authors_optimizer.torch.optim.AdamW
    authors_optimizer.torch.optim.AdamW = RecordingAdamW
    try:
        yield made
    finally:
        authors_optimizer.torch.optim.AdamW = original


def authors_fit(authors_optimizer, theirs, tokens, mu0, num_steps: int, seed: int) -> dict:
    """Their fast loop (training objective) on `tokens[:, :-1] -> tokens[:, 1:]` from `mu0`; `logvar` and `eps`
    drawn after `torch.manual_seed(seed)`, as their `step(seed=...)` does. Returns `mu`, `logvar`, `z`, slow loss."""
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    fitter = authors_optimizer.PosteriorOptimizer(
        theirs, inference_method="adamVI", num_steps=num_steps, max_z_len=TINY_ARGS["max_z_len"],
        z_dim=TINY_ARGS["dim"], lr=0.34, eval_mode=False,
    )  # fmt: skip
    with recording_adamw(authors_optimizer) as made, contextlib.redirect_stdout(open(os.devnull, "w")):
        z, *_ = fitter.step([x, y, mu0.flatten(1, 2).clone()], contextlib.nullcontext(), None, num_steps, seed, 0.34)
    mu, logvar = made[-1].param_groups[0]["params"]
    with torch.no_grad():
        theirs(x, z, y)
    return {"mu": mu.detach(), "logvar": logvar.detach(), "z": z, "slow_loss": theirs.last_loss.item()}


def our_fit(ours, tokens, mu0, settings, seed: int) -> dict:
    """Our fast loop with `settings` from `mu0`, drawing `logvar`'s jitter and `eps` from a generator seeded as theirs
    (the same numbers in the same order); the slow step's loss at the fast loop's own `eps` (`fit_sample`)."""
    posterior = fit_posterior(
        ours, tokens, settings=settings, generator=torch.Generator().manual_seed(seed), init_mu=mu0
    )
    with torch.no_grad():
        loss = ours(input_ids=tokens, latents=posterior.fit_sample, labels=tokens).loss.item()
    shape = (tokens.shape[0], -1, ours.config.latent_dim)
    return {"mu": posterior.mu.view(shape), "logvar": posterior.logvar.view(shape),
            "z": posterior.fit_sample.view(shape), "slow_loss": loss}  # fmt: skip


def compare_fits(authors_optimizer, theirs, ours, num_steps: int, seed: int) -> dict:
    """Max |difference| of `mu`, `logvar`, `z` after `num_steps` and of the slow loss: the preset's fast loop, then
    each paper field set back to the library default (what that difference changes), then all of them."""
    generator = torch.Generator().manual_seed(seed)
    # 33 tokens: theirs reads 32 inputs and 32 targets (a 33-token window), ours scores the same 32 predictions.
    tokens = torch.randint(0, TINY_ARGS["vocab_size"], (2, 33), generator=generator)
    mu0 = 0.01 * torch.randn((2, *ours.config.latent_shape), generator=generator)  # their start: 0.01 N(0, 1)
    reference = authors_fit(authors_optimizer, theirs, tokens, mu0, num_steps, seed)
    # `init_mu` is the start here, so the preset's own mu jitter is not drawn (the eps stream then matches theirs).
    preset = PosteriorFitSettings.training(LTMConfig.from_json_file(PRESET), num_steps=num_steps, init_mu_noise=0.0)
    variants = {"paper preset (configuration/ltm-s.json)": preset}
    variants.update({f"{name} = {value!r} (library default)": preset.replace(**{name: value})
                     for name, value in PAPER_FIELDS.items()})  # fmt: skip
    variants["all four library defaults"] = preset.replace(**PAPER_FIELDS)
    variants["posterior_init_mu_noise = 0.0 (library default: mu starts at 0)"] = preset
    rows = {}
    for name, settings in variants.items():
        start = torch.zeros_like(mu0) if name.startswith("posterior_init_mu_noise") else mu0
        result = our_fit(ours, tokens, start, settings, seed)
        rows[name] = {key: (result[key] - reference[key]).abs().max().item() for key in ("mu", "logvar", "z")}
        rows[name]["slow_loss"] = abs(result["slow_loss"] - reference["slow_loss"])
    # The library's default slow step decodes at a fresh eps: its loss against theirs at the same fitted q.
    fresh = our_fit(ours, tokens, mu0, preset, seed)
    fresh_noise = torch.randn(fresh["mu"].shape, generator=torch.Generator().manual_seed(seed + 1))
    z_fresh = (fresh["mu"] + torch.exp(0.5 * fresh["logvar"]) * fresh_noise).view(2, *ours.config.latent_shape)
    with torch.no_grad():
        fresh_loss = ours(input_ids=tokens, latents=z_fresh, labels=tokens).loss.item()
    rows["slow_step_noise = 'fresh' (library default)"] = {"slow_loss": abs(fresh_loss - reference["slow_loss"])}
    rows["their slow loss"] = {"slow_loss": reference["slow_loss"]}
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors-code", required=True, type=Path, help="a clone of mingluzhao/Latent-Thought-LM")
    parser.add_argument("--fast-steps", type=int, default=4, help="T of the fast-loop comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="where to write the results (JSON)")
    args = parser.parse_args(argv)
    if not (args.authors_code / "model.py").is_file():
        parser.error(f"--authors-code {args.authors_code}: no model.py there; give a clone of the authors' repository")
    started, load_before = time.time(), os.getloadavg()
    torch._dynamo.config.disable = True  # their use_liger=True compiles each attention module: run it eagerly
    authors_model, authors_optimizer = load_authors(args.authors_code)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    results = {"checkpoints": {}, "fast_loop": None}
    with tempfile.TemporaryDirectory() as folder:
        for use_liger in (True, False):
            theirs, checkpoint = authors_checkpoint(authors_model, use_liger, Path(folder), args.seed)
            output = Path(folder) / f"converted_{use_liger}"
            with contextlib.redirect_stdout(open(os.devnull, "w")):
                convert_main([str(checkpoint), str(output)])
            ours = AutoModelForCausalLM.from_pretrained(output).eval()
            results["checkpoints"]["liger names" if use_liger else "plain names"] = compare_logits(theirs, ours, 1)
        per_layer = AutoModelForCausalLM.from_pretrained(output, latent_position_spacing="per_layer").eval()
        results["checkpoints"]["latent_position_spacing = 'per_layer' (library default)"] = compare_logits(
            theirs, per_layer, 1
        )
        results["fast_loop"] = compare_fits(authors_optimizer, theirs, ours, args.fast_steps, args.seed)
    results["metadata"] = run_metadata("authors_parity.py", argv, args, load_before, started)
    clone = "path/to/Latent-Thought-LM"  # the machine's path of the clone is not recorded
    results["metadata"]["args"]["authors_code"] = clone
    results["metadata"]["command"] = results["metadata"]["command"].replace(str(args.authors_code), clone)
    for section in ("checkpoints", "fast_loop"):
        for name, row in results[section].items():
            print(f"{section:11s} {name:58s} " + "  ".join(f"{k} {v:.2e}" for k, v in row.items()))
    save_json(args.out, results)
    return results


if __name__ == "__main__":
    main()

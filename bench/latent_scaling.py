"""The paper's scaling claim under bounds: held-out bound at equal training tokens and at equal training FLOPs, for
LTMs trained with T fast steps, against the Llama peer of the same run (issue 33).

    python bench/latent_scaling.py bench/results/study33-scaling-s1337.json \
        bench/results/study33-scaling-s1337-matched-llama.json --img-dir docs/img

Reads `bench/quality.py` result JSONs of one workdir (runs with `--curve-points`), prints one markdown table and writes two figures,
`<stem>-bound-vs-tokens.png` and `<stem>-bound-vs-flops.png`: every LTM's IW bound on the curve's held-out blocks
(the first `--curve-blocks` of the held-out set, evaluation fit from the prior) and the Llama's exact perplexity on
the same blocks, against training tokens and against training FLOPs.

Training FLOPs per token, with N the model's parameters (embeddings included, as `bench/quality.py` counts them):
Llama `6N` (forward + backward); LTM `(6 + 4T + 2)N`: the decoder step (6N), T fast steps (a forward and a backward
to the latents only, ~4N each), one forward of the fit's final scoring (2N); T is the run's mean fast steps per
training sequence (`mean_fast_steps`: an aggressive phase or a ramp counts as run), plus the aggressive phase's
held-out checks (`check_fit_row_steps`, 4N per row-step of a check's fit, spread over the training tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent


def flops_per_token(result: dict, block: int) -> float:
    """Training FLOPs per training token of one `bench/quality.py` result (see the module docstring)."""
    parameters = result["parameters"]
    if result["model"].startswith("llama"):  # the peer, or `llama_ff<int>` (another MLP width)
        return 6.0 * parameters
    fast_steps = result.get("mean_fast_steps", result["training_fast_loop"]["T"])
    checks = result.get("check_fit_row_steps", 0) * block * 4.0 * parameters / max(result["train_tokens"], 1)
    return (6.0 + 4.0 * fast_steps + 2.0) * parameters + checks


def table(results: list[dict], block: int) -> str:
    llama = next(r for r in results if r["model"] == "llama")
    peer = llama["held_out"]["perplexity"]
    wiki_peer = llama.get("wikitext", {}).get("perplexity")
    lines = [
        "| model | mean training T | FLOPs / token (x Llama) | held-out IW bound | / Llama | ELBO bound (KL/token) "
        "| WikiText-2 IW / Llama |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = flops_per_token(r, block) / flops_per_token(llama, block)
        if r["model"].startswith("llama"):
            w = r.get("wikitext", {}).get("perplexity")
            wiki = f"{w:.1f} ({w / wiki_peer:.3f}, exact)" if w and wiki_peer else "-"
            p = r["held_out"]["perplexity"]
            lines.append(f"| {r['model']} | - | 6N ({ratio:.1f}) | {p:.2f} (exact) | {p / peer:.3f} | - | {wiki} |")
            continue
        h, w = r["held_out"], r.get("wikitext")
        wiki = f"{w['iw_ppl']:.1f} ({w['iw_ppl'] / wiki_peer:.3f})" if w and wiki_peer else "-"
        lines.append(
            f"| {r['model']} | {r.get('mean_fast_steps', r['training_fast_loop']['T']):.1f} | "
            f"{flops_per_token(r, block) / r['parameters']:.0f}N ({ratio:.1f}) | {h['iw_ppl']:.2f} | "
            f"{h['iw_ppl'] / peer:.3f} | {h['elbo_ppl']:.2f} ({h['kl_per_token']:.3f}) | {wiki} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], block: int, stem: str, img_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis, label in (("tokens", "training tokens"), ("flops", "training FLOPs")):
        fig, ax = plt.subplots(figsize=(8.5, 4.4), dpi=90)
        for i, r in enumerate(results):
            points = [c for c in r.get("curve", []) if c["train_tokens"] > 0]
            if not points:
                continue
            scale = 1.0 if axis == "tokens" else flops_per_token(r, block)
            x = [c["train_tokens"] * scale for c in points]
            if r["model"].startswith("llama"):
                style = "k-o" if r["model"] == "llama" else "k:^"
                ax.plot(x, [c["perplexity"] for c in points], style, label=f"{r['model']}: exact ppl", zorder=3)
            else:
                ax.plot(x, [c["iw_ppl"] for c in points], "s-", color=f"C{i}", label=f"{r['model']}: IW bound")
        ax.set_xscale("log" if axis == "flops" else "linear")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(label)
        curve_blocks = next(r["curve_blocks"] for r in results if r.get("curve"))
        ax.set_ylabel(f"held-out ppl / bound (first {curve_blocks} blocks)")
        ax.set_title(f"Held-out bound vs {label} (IW bound: evaluation fit from the prior)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        out = img_dir / f"{stem}-bound-vs-{axis}.png"
        fig.savefig(out)
        plt.close(fig)
        written.append(str(out))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "results", nargs="+", help="bench/quality.py result JSONs of one workdir (one has the Llama peer)"
    )
    parser.add_argument("--img-dir", default=str(REPO_ROOT / "docs" / "img"))
    args = parser.parse_args(argv)
    img_dir = Path(args.img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    # Several files are runs on the same workdir (same data, seed and peer), e.g. a peer of another width trained
    # after the first run: one table and one pair of figures, named after the first file.
    runs = [json.loads(Path(path).read_text()) for path in args.results]
    blocks = {run["meta"]["args"]["block"] for run in runs}
    if len(blocks) != 1:
        raise SystemExit(f"bench/latent_scaling.py: the files hold runs of different block sizes {sorted(blocks)}.")
    block = blocks.pop()
    results = [result for run in runs for result in run["results"]]
    print(f"{', '.join(args.results)}:\n\n{table(results, block)}\n")
    for written in plot(results, block, Path(args.results[0]).stem, img_dir):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())

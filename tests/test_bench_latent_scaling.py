"""bench/latent_scaling.py's FLOPs accounting (the issue's (6 + 4T + 2)N per token, the aggressive phase's checks
included), its table and its two figures, on a synthetic result file."""

import importlib.util
import json

from conftest import REPO_ROOT


spec = importlib.util.spec_from_file_location("latent_scaling", REPO_ROOT / "bench" / "latent_scaling.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def result(model, parameters, perplexity=None, iw=None, fast_steps=None, checks=0):
    curve = [{"train_tokens": 0}, {"train_tokens": 500, "perplexity": perplexity, "iw_ppl": iw},
             {"train_tokens": 1000, "perplexity": perplexity, "iw_ppl": iw}]  # fmt: skip
    out = {"model": model, "parameters": parameters, "train_tokens": 1000, "curve": curve, "curve_blocks": 4}
    if model == "llama":
        out["held_out"] = {"perplexity": perplexity}
    else:
        out.update(mean_fast_steps=fast_steps, check_fit_row_steps=checks, training_fast_loop={"T": fast_steps})
        out["held_out"] = {"iw_ppl": iw, "elbo_ppl": iw + 1, "kl_per_token": 0.05}
    return out


def test_flops_count_the_mean_fast_steps_and_the_checks():
    assert bench.flops_per_token(result("llama", 100, perplexity=50.0), block=8) == 600
    assert bench.flops_per_token(result("ltm_T4", 100, iw=51.0, fast_steps=4), block=8) == (6 + 16 + 2) * 100
    # 10 row-steps of 8-token rows at 4N per token, over 1,000 training tokens: 0.32N per training token
    with_checks = bench.flops_per_token(result("ltm_T4_agg8", 100, iw=51.0, fast_steps=4, checks=10), block=8)
    assert with_checks == (6 + 16 + 2) * 100 + 10 * 8 * 4 * 100 / 1000


def test_table_and_figures(tmp_path):
    results = [result("llama", 100, perplexity=50.0), result("ltm_T4", 110, iw=49.0, fast_steps=4.0)]
    text = bench.table(results, block=8)
    assert "| ltm_T4 | 4.0 | 24N (4.4) | 49.00 | 0.980 |" in text
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"meta": {"args": {"block": 8}}, "results": results}))
    assert bench.main([str(path), "--img-dir", str(tmp_path / "img")]) == 0
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["run-bound-vs-flops.png", "run-bound-vs-tokens.png"]

"""`ltm compare`: an LTM run against its Llama peer in one table (issue 34): the runs' own held-out numbers, one
outside text scored the same way for both, training speed and FLOPs; runs that were not trained alike are refused."""

import json
import math

from test_train_cli import _train, setup  # noqa: F401  (`setup`: the tiny preset and corpus fixture)

from modeling_ltm.tooling.cli import main as ltm_main
from modeling_ltm.tooling.compare_cli import flops_per_token


def test_compare_puts_the_bounds_beside_the_peers_exact_perplexity(setup, capsys):
    ltm, peer = setup[2] / "ltm", setup[2] / "peer"
    assert _train(setup, "--output_dir", str(ltm)) == 0
    assert _train(setup, "--output_dir", str(peer), "--baseline", "llama", "--tokenizer", str(ltm)) == 0
    outside = setup[2] / "outside.txt"
    outside.write_text("The quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    capsys.readouterr()
    assert ltm_main(["compare", str(ltm), str(peer), "--outside", str(outside), "--outside-blocks", "2"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((ltm / "comparison.json").read_text())
    held_out, other = result["rows"]["held_out"], result["rows"]["outside"]
    ltm_eval = json.loads((ltm / "eval_results.json").read_text())
    assert held_out["ltm"]["iw_ppl"] == ltm_eval["eval_iw_ppl"]
    assert held_out["peer_perplexity"] == json.loads((peer / "eval_results.json").read_text())["eval_perplexity"]
    assert "outside.txt, 2 blocks" in other["text"]
    for row in (held_out, other):
        bounds = row["ltm"]
        assert math.isclose(bounds["elbo_ppl"], math.exp(bounds["nll_per_token"] + bounds["kl_per_token"]), rel_tol=1e-6)
        assert math.isclose(row["ratio"], bounds["iw_ppl"] / row["peer_perplexity"])
    training = result["training"]
    assert training["ltm"]["flops_per_token"] == (4 * 2 + 8) * training["ltm"]["num_parameters"]
    assert training["peer"]["flops_per_token"] == 6 * training["peer"]["num_parameters"]
    assert "Llama: exact" in printed and "ratio" in printed and "an upper bound against an exact number" in printed


def test_compare_refuses_a_peer_trained_on_other_blocks(setup, capsys):
    ltm, peer = setup[2] / "ltm", setup[2] / "peer"
    assert _train(setup, "--output_dir", str(ltm)) == 0
    assert _train(setup, "--output_dir", str(peer), "--baseline", "llama", "--block_size", "16") == 0
    capsys.readouterr()
    assert ltm_main(["compare", str(ltm), str(peer), "--outside", "none"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "was not trained like" in error[0] and "--baseline llama --tokenizer" in error[0]


def test_flops_per_token():
    assert flops_per_token(10, None) == 60 and flops_per_token(10, 0) == 80 and flops_per_token(10, 16) == 720

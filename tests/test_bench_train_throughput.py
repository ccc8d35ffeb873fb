"""bench/train_throughput.py's device/dtype logic and FLOP accounting, on CPU (its CUDA branch with CUDA faked)."""

import importlib.util

from conftest import REPO_ROOT, tiny_config
from transformers import LlamaForCausalLM

from modeling_ltm import LTMForCausalLM
from modeling_ltm.tooling.train_cli import llama_peer_config


spec = importlib.util.spec_from_file_location("train_throughput", REPO_ROOT / "bench" / "train_throughput.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_flops_per_token_counts_fast_steps_and_the_tied_embedding_once():
    config = tiny_config()
    ltm = LTMForCausalLM(config)
    llama = LlamaForCausalLM(llama_peer_config(config))
    n_ltm = bench.matmul_parameters(ltm)
    assert n_ltm == sum(p.numel() for p in ltm.parameters() if p.dim() >= 2)  # tied: lm_head is embed_tokens
    assert bench.flops_per_token(llama, None) == 6 * bench.matmul_parameters(llama)
    assert bench.flops_per_token(ltm, 0) == 8 * n_ltm
    assert bench.flops_per_token(ltm, 16) == (6 + 16 * 4 + 2) * n_ltm

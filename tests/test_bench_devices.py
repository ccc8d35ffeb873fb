"""Every bench takes `--device` and `--dtype` (issue 13's GPU path). Without a GPU here: the CUDA branch's device and
dtype logic with CUDA faked (`bench/common.py`), every bench's flags, and a bf16 run of the decode and fast-step
benches on the CPU."""

import json

import pytest
import torch

from bench.common import load_bench, precision_arguments, resolve_device


BENCHES = (
    "compile",
    "decode_step",
    "fast_step",
    "fit_rules",
    "generate",
    "inference_efficiency",
    "quality",
    "train_throughput",
)


def test_resolve_device_and_precision_arguments_on_cpu_and_faked_cuda(monkeypatch):
    assert resolve_device("cpu", "fp32") == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert precision_arguments("cpu", "fp32") == {"use_cpu": True, "bf16": False}
    assert precision_arguments("cpu", "bf16") == {"use_cpu": True, "bf16": True}
    for device, dtype, match in (("tpu", "fp32", "--device 'tpu'"), ("cpu", "fp16", "--dtype 'fp16'")):
        with pytest.raises(ValueError, match=match):
            resolve_device(device, dtype)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        precision_arguments("cuda", "bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_device("cuda:1", "bf16") == (torch.device("cuda", 1), torch.bfloat16)
    assert precision_arguments("cuda", "bf16") == {"use_cpu": False, "bf16": True}
    assert precision_arguments("cuda", "fp32") == {"use_cpu": False, "bf16": False}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="no bf16 support"):
        resolve_device("cuda", "bf16")


@pytest.mark.parametrize("name", BENCHES)
def test_every_bench_takes_device_and_dtype(name):
    args = load_bench(name).parse_args(["--device", "cuda:0", "--dtype", "bf16"])
    assert (args.device, args.dtype) == ("cuda:0", "bf16")


def test_decode_and_fast_step_benches_run_in_bf16_on_cpu(tmp_path, capsys):
    tiny = ["--hidden-size", "32", "--num-layers", "2", "--vocab-size", "128", "--dtype", "bf16"]
    out = tmp_path / "generate.json"
    generate = tiny + ["--new-tokens", "4", "--batch-sizes", "1", "--repeats", "1", "--num-inference-steps", "1"]
    assert load_bench("generate").main([*generate, "--json", str(out)]) == 0
    meta = json.loads(out.read_text())["meta"]
    assert (meta["device"], meta["dtype"]) == ("cpu", "bf16")
    step = tiny + ["--batch-sizes", "1", "--steps", "2", "--rounds", "1", "--json", str(tmp_path / "step.json")]
    assert load_bench("decode_step").main(step) == 0
    step_result = json.loads((tmp_path / "step.json").read_text())
    assert step_result["meta"]["dtype"] == "bf16" and step_result["results"][0]["llama_us_per_step"] > 0
    fast_step = tiny + ["--seq-length", "8", "--batch-size", "2", "--repeats", "1", "--warmup", "0"]
    assert load_bench("fast_step").main([*fast_step, "--json", str(tmp_path / "fast_step.json")]) == 0
    assert json.loads((tmp_path / "fast_step.json").read_text())["config"]["dtype"] == "bf16"

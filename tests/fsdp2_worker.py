"""The fast loop on an FSDP2-sharded LTM, run by tests/test_ddp.py under `torchrun --nproc_per_node 2` (gloo, CPU).

    torchrun --standalone --nproc_per_node 2 tests/fsdp2_worker.py

`LTMTrainer` calls `fit_posterior` on `accelerator.unwrap_model(model)`; under FSDP2 that is the sharded module
itself, whose own hooks all-gather the weights. Checked here without Trainer (accelerate runs FSDP on GPUs only):
the fast loop leaves every `.grad` untouched, gives each rank's rows the posterior an unsharded model gives them,
and the one decoder backward afterwards yields the single-process full-batch gradient. Exits non-zero otherwise.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_config  # noqa: E402

from modeling_ltm import LTMForCausalLM, fit_posterior  # noqa: E402


def main() -> None:
    device = os.environ.get("LTM_WORKER_DEVICE", "cpu")  # tests/test_cuda.py: a 1-process NCCL launch on a GPU
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(rank)
    torch.manual_seed(0)
    reference = LTMForCausalLM(tiny_config(vocab_size=256)).to(device)
    torch.manual_seed(0)
    model = LTMForCausalLM(tiny_config(vocab_size=256)).to(device)
    mesh = init_device_mesh(device, (world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    rows = 4
    input_ids = torch.randint(0, 256, (rows * world_size, 32), generator=torch.Generator().manual_seed(0)).to(device)
    mine = slice(rank * rows, (rank + 1) * rows)
    posterior = fit_posterior(model, input_ids[mine], num_steps=2, seed=list(range(mine.start, mine.stop)))
    assert all(p.grad is None for p in model.parameters()), "the fast loop wrote a weight gradient"
    model(input_ids[mine], latents=posterior.z, labels=input_ids[mine], use_cache=False).loss.backward()

    full = fit_posterior(reference, input_ids, num_steps=2, seed=list(range(len(input_ids))))
    torch.testing.assert_close(posterior.z, full.z[mine], rtol=1e-4, atol=1e-5)
    reference(input_ids, latents=full.z, labels=input_ids, use_cache=False).loss.backward()
    for (name, param), (_, ref_param) in zip(model.named_parameters(), reference.named_parameters()):
        # FSDP2 averages the ranks' gradients; equal token counts per rank make that the full-batch mean.
        torch.testing.assert_close(param.grad.full_tensor(), ref_param.grad, rtol=1e-3, atol=1e-5, msg=name)
    print(f"rank {rank}: FSDP2 fast loop OK")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

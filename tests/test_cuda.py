"""Checks that need a CUDA device (skipped without one; `make gpu-check` runs them on a GPU)."""
import pytest
import torch

from keel import actor
from keel.modeling import LeanForward, build_embedded
from keel.tasks import TASK_ALPHABET

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def batch(device):
    gen = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7, 8]] * 4 + [[9, 10, 11]] * 4
    responses = [torch.randint(3, 40, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(8)]
    return actor.pack(prompts, responses, 0, device)


def test_packed_forward_on_cuda_equals_cpu():
    model, _ = build_embedded(TASK_ALPHABET, seed=0)
    cpu = actor.compute_logprobs(model, LeanForward(model), batch("cpu"), 1.0, 4096, with_entropy=True)
    model.cuda()
    gpu = actor.compute_logprobs(model, LeanForward(model), batch("cuda"), 1.0, 4096, with_entropy=True)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)


def test_micro_batches_and_checkpointing_on_cuda_bf16():
    micro_batches_and_checkpointing_bf16("cuda")


def micro_batches_and_checkpointing_bf16(device: str):
    """bf16 autocast: micro-batches of 1 row + checkpointing give the whole-batch gradient."""
    grads = []
    for micro, ckpt in ((0, False), (1, True)):
        model, _ = build_embedded(TASK_ALPHABET, seed=0)
        model.to(device)
        lean = LeanForward(model)
        actor.train_module(lean).checkpointing = ckpt
        packed = batch(device)
        adv = torch.linspace(-1, 1, 8, device=device)
        lc = actor.LossConfig(0.2, 0.28, 3.0, "token-mean", 0.01, 0.0, "low_var_kl", False, 1.0, 4096)
        rows = torch.arange(8)
        plan = actor.micro_batches(packed, micro)
        place = rows.to(device) if micro else None
        lengths = packed.mask.sum(1).long() if micro else None
        with torch.autocast(device, dtype=torch.bfloat16):
            actor.backward_mini_batch(model, lean, packed, adv, None, None, lc, micro=plan, place_rows=place,
                                      lengths=lengths)
        grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=2e-3)  # bf16 matmuls

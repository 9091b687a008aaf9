"""`torchrun --nproc_per_node 1 scripts/gpu_nccl_check.py`: Keel's FSDP2 engine over NCCL on one GPU.

A one-rank NCCL process group: an all-reduce, then two ppo_update steps (2 mini-batches, micro-batches of
3 rows, checkpointing) through keel.distributed.wrap(strategy=fsdp2) must give the weights of the same
update without any engine, within fp32 rounding. Prints one line; exit 0 = PASS.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from keel import actor, distributed  # noqa: E402
from keel.distributed import Dist  # noqa: E402
from keel.modeling import LeanForward, build_embedded  # noqa: E402
from keel.tasks import TASK_ALPHABET  # noqa: E402
from keel.trainer import ppo_update  # noqa: E402

G, B = 4, 4
BACKEND = os.environ.get("KEEL_CHECK_BACKEND", "nccl")  # gloo: rehearse this script on a CPU
DEVICE = "cuda" if BACKEND == "nccl" else "cpu"


class OneRankGroup(Dist):
    """Rank 0 of a real 1-rank process group: collectives and the engine run (Dist skips them for 1 process)."""

    @property
    def enabled(self) -> bool:
        return True


def update(d: Dist) -> dict:
    model, _ = build_embedded(TASK_ALPHABET, seed=0)
    model.to(DEVICE)
    lean = LeanForward(model)
    actor.train_module(lean).checkpointing = True
    lean.module = distributed.wrap(lean.module, "fsdp2", d)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 40, (5,), generator=gen).tolist() for _ in range(B) for _ in range(G)]
    responses = [torch.randint(3, 40, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(B * G)]
    adv = torch.randn(B * G, generator=gen).to(DEVICE)
    packed = actor.pack(prompts, responses, 0, DEVICE)
    old = actor.compute_logprobs(model, lean, packed, 1.0, 4096, micro_batch=3)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4)
    lc = actor.LossConfig(0.2, 0.28, 3.0, "token-mean", 0.01, 0.0, "low_var_kl", False, 1.0, 4096)
    for step in (1, 2):
        _, ok = ppo_update(model, lean, opt, packed, adv, old, None, lc, group_ids=list(range(B)), n_groups=B,
                           group_size=G, mini_batch_groups=2, ppo_epochs=1, seed=(3, step), lr=1e-3, grad_clip=1.0,
                           d=d, micro_batch_size=3)
        assert all(ok)
    return {k: v.detach().float().cpu().clone() for k, v in distributed.full_state_dict(model).items()}


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group(BACKEND)
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    t = torch.ones(4, device=DEVICE)
    dist.all_reduce(t)
    assert float(t.sum()) == 4.0 * dist.get_world_size()
    engine = update(OneRankGroup(dist.get_rank(), dist.get_world_size()))
    dist.destroy_process_group()
    plain = update(Dist())
    gap = max((engine[k] - plain[k]).abs().max().item() for k in plain)
    print(f"{BACKEND} all-reduce ok; fsdp2 update vs no engine: max |dw| = {gap:.2e} (limit 1e-4)")
    return 0 if gap < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())

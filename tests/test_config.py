import pytest

from conftest import run_keel
from keel.config import load_config
from keel.errors import KeelError


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("actor_rollout_ref:\n  actor:\n    entropy_coeff: 0.01\n")
    cfg = load_config(path, ["actor_rollout_ref.actor.kl_loss_coef=0.05", "actor_rollout_ref.actor.optim.lr=1e-5"])
    assert cfg.actor.entropy_coeff == 0.01
    assert cfg.actor.kl_loss_coef == 0.05
    assert cfg.actor.optim.lr == 1e-5
    assert cfg.rollout.n == 8


@pytest.mark.parametrize("override, message", [
    ("actor_rollout_ref.actor.entropy_coef=0.1", "config key 'actor_rollout_ref.actor.entropy_coef' is unknown (did you mean 'entropy_coeff'?)"),
    ("actor_rollout_ref.rollout.n=1", "config key 'actor_rollout_ref.rollout.n' must be >= 2"),
    ("actor_rollout_ref.actor.kl_loss_coef=-0.1", "config key 'actor_rollout_ref.actor.kl_loss_coef' must be >= 0"),
    ("actor_rollout_ref.actor.entropy_coeff=-1", "config key 'actor_rollout_ref.actor.entropy_coeff' must be >= 0"),
    ("actor_rollout_ref.rollout.n=two", "config key 'actor_rollout_ref.rollout.n' must be an integer, got 'two'"),
    ("trainer.logger=[console,foo]", "unknown logger(s) ['foo']"),
    ("data.train_batch_size=10", "must be a multiple of 'actor_rollout_ref.actor.ppo_mini_batch_size'"),
    ("actor_rollout_ref.rollout.val_kwargs.n=0", "config key 'actor_rollout_ref.rollout.val_kwargs.n' must be >= 1"),
    ("actor_rollout_ref.rollout.val_kwargs.temperature=0", "val_kwargs.temperature' must be > 0 (greedy: do_sample=false)"),
    ("actor_rollout_ref.rollout.val_kwargs.do_sampl=false", "is unknown (did you mean 'do_sample'?)"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(KeelError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_val_kwargs_follow_verl_and_default_to_the_rollout_sampling():
    cfg = load_config(None, ["actor_rollout_ref.rollout.temperature=0.7", "actor_rollout_ref.rollout.top_p=0.9"])
    assert cfg.rollout.val_sampling() == (0.7, 0.9, 1)  # Keel's default: sampled like the rollout
    cfg = load_config(None, ["actor_rollout_ref.rollout.val_kwargs.do_sample=false",
                             "actor_rollout_ref.rollout.val_kwargs.temperature=0.5"])
    assert cfg.rollout.val_sampling() == (0.0, 1.0, 1)  # verl's default: greedy, temperature ignored
    cfg = load_config(None, ["actor_rollout_ref.rollout.val_kwargs={temperature: 0.6, top_p: 0.95, n: 4}"])
    assert cfg.rollout.val_sampling() == (0.6, 0.95, 4)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  seed: [1, 2\n")
    with pytest.raises(KeelError, match=r"bad.yaml' line \d+: malformed YAML"):
        load_config(path)


@pytest.mark.parametrize("args, expected", [
    (["train", "configs/demo.yaml", "actor_rollout_ref.actor.entropy_coef=0.1"], "did you mean 'entropy_coeff'"),
    (["train", "configs/demo.yaml", "actor_rollout_ref.rollout.n=1"], "must be >= 2"),
    (["train", "configs/demo.yaml", "actor_rollout_ref.actor.kl_loss_coef=-1"], "must be >= 0"),
    (["train", "configs/demo.yaml", "actor_rollout_ref.model.path=/nonexistent/model"], "model directory '/nonexistent/model' does not exist"),
    (["train", "no_such_config.yaml"], "config file 'no_such_config.yaml' does not exist"),
    (["eval", "/nonexistent/model", "--temperature", "-1"], "--temperature must be >= 0 (0 = greedy), got -1.0"),
    (["eval", "/nonexistent/model", "--k", "0"], "--k must be >= 1, got 0"),
])
def test_cli_bad_input_is_one_line_exit_2(args, expected):
    code, out, err = run_keel(args, timeout=120)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keel: error: ") and expected in lines[0], err


def test_cli_malformed_yaml_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {train_batch_size: 4\n")
    code, _, err = run_keel(["train", str(path)], timeout=120)
    assert code == 2 and "malformed YAML" in err and len(err.strip().splitlines()) == 1


def test_micro_batch_keys_follow_verl():
    from keel.config import load_config

    cfg = load_config(None, ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                             "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=3"])
    arr = cfg.actor_rollout_ref
    assert arr.update_batching() == (2, 0)
    assert arr.log_prob_batching("ref") == (3, 0) and arr.log_prob_batching("rollout") == (0, 0)
    cfg = load_config(None, ["actor_rollout_ref.actor.use_dynamic_bsz=true",
                             "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=900",
                             "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=1200"])
    arr = cfg.actor_rollout_ref
    assert arr.update_batching() == (0, 900)
    assert arr.log_prob_batching("rollout") == (0, 1200) and arr.log_prob_batching("ref") == (0, 900)
    with pytest.raises(KeelError, match=r"^config key 'actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu' "
                                        r"must be >= 1, got 0$"):
        load_config(None, ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=0"])
    with pytest.raises(KeelError, match=r"^config key 'actor_rollout_ref.actor.strategy' must be ddp or fsdp2, "
                                        r"got 'fsdp'$"):
        load_config(None, ["actor_rollout_ref.actor.strategy=fsdp"])

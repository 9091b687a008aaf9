"""Bad input of every kind ends as ONE line ``keel: error: ...`` that names the file / key / row and what
is wrong, with exit code 2 and no traceback (``--debug`` shows it). The table below is the list of cases.

A reward function that raises on some samples is not bad input: those samples score
``reward.error_score`` and are counted in ``reward/errors``; the run goes on. One that fails on every
sample of ``reward.max_failed_batches`` batches in a row is broken: one line, exit 2.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import REPO
from keel import cli
from keel.checkpoint import save_checkpoint
from keel.errors import EXIT_BAD_INPUT, KeelError
from keel.modeling import build_embedded
from keel.tasks import TASK_ALPHABET

TINY = dict(hidden=16, layers=1, heads=2, mlp=32)  # a ~2k-parameter Qwen3: loading and one step take ms

REWARDS = '''
def wrong_len(prompts, completions, **kwargs):
    return [0.0]

def not_a_list(prompts, completions, **kwargs):
    return 1.0

def two_args(x, y):
    return [0.0]

not_callable = 3

def digit_share(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]

def always_raises(prompts, completions, **kwargs):
    """a typo'd column name: fails on every sample of every batch"""
    return [float(kwargs["solutoin"]) for _ in completions]

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl style; the grader 'crashes' on the problem whose answer is 13."""
    if ground_truth == "13":
        raise RuntimeError("grader crashed")
    return sum(ch.isdigit() for ch in solution_str) / max(1, len(solution_str))
'''


def _jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def _model_variant(w: Path, name: str, edit) -> None:
    shutil.copytree(w / "model", w / name)
    edit(w / name)


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> Path:
    """Every broken file / directory of the table, built once."""
    w = tmp_path_factory.mktemp("bad_input")
    model, tok = build_embedded(TASK_ALPHABET, seed=0, **TINY)
    model.save_pretrained(w / "model")
    tok.save_pretrained(w / "model")
    config = json.loads((w / "model" / "config.json").read_text())
    tok_config = json.loads((w / "model" / "tokenizer_config.json").read_text())

    _model_variant(w, "no_config", lambda d: (d / "config.json").unlink())
    _model_variant(w, "bad_config", lambda d: (d / "config.json").write_text("{oops"))
    _model_variant(w, "no_weights", lambda d: (d / "model.safetensors").unlink())
    _model_variant(w, "bad_weights", lambda d: (d / "model.safetensors").write_bytes(b"garbage"))
    edited = json.dumps({**config, "vocab_size": 5})  # the weights still have 49 rows
    _model_variant(w, "edited_config", lambda d: (d / "config.json").write_text(edited))
    _model_variant(w, "bad_tokenizer", lambda d: (d / "tokenizer.json").write_text("{"))
    no_eos = {k: v for k, v in tok_config.items() if k != "eos_token"}
    _model_variant(w, "no_eos", lambda d: (d / "tokenizer_config.json").write_text(json.dumps(no_eos)))

    def grow_tokenizer(d: Path) -> None:  # 40 added tokens the model's embedding has no rows for
        big = AutoTokenizer.from_pretrained(str(d))
        big.add_tokens([f"<extra_{i}>" for i in range(40)])
        big.save_pretrained(str(d))

    _model_variant(w, "big_tokenizer", grow_tokenizer)

    gsm = ({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(10, 14))
    (w / "gsm.jsonl").write_text(_jsonl(*gsm))
    (w / "table.csv").write_text("question,answer\n")
    (w / "bad_json.jsonl").write_text(_jsonl({"question": "q", "answer": "#### 1"}, "{'question': 'q'}"))
    (w / "missing_field.jsonl").write_text(_jsonl({"question": "q", "answer": "#### 1"}, {"question": "q2"}))
    (w / "no_hashes.jsonl").write_text(_jsonl({"question": "q", "answer": "the answer is 4"}))
    (w / "columns.jsonl").write_text(_jsonl({"text": "hello"}))
    (w / "empty.jsonl").write_text("")
    (w / "not_object.jsonl").write_text(_jsonl({"question": "q", "answer": "#### 1"}, "[1, 2]"))
    (w / "broken.parquet").write_bytes(b"not parquet at all")
    (w / "rewards.py").write_text(REWARDS)
    (w / "raises_on_import.py").write_text("raise RuntimeError('cannot reach the grading server')\n")
    (w / "bad.yaml").write_text("trainer:\n  seed: 1\n   experiment_name: x\n")  # line 3 over-indented
    (w / "rules.yaml").write_text("- metric: actor/entropy\n  treshold: 3\n")

    # a run directory whose checkpoint was written by a different (bigger) model
    other, _ = build_embedded(TASK_ALPHABET, seed=0, hidden=32, layers=1, heads=2, mlp=32)
    save_checkpoint(w / "other_run", 2, other, None, {"trainer": {"step": 2}})
    return w


def argv(w: Path, run_dir: Path, config: str, overrides: list[str]) -> list[str]:
    base = [f"actor_rollout_ref.model.path={w}/model", f"data.train_files={w}/gsm.jsonl",
            f"data.val_files={w}/gsm.jsonl", f"trainer.run_dir={run_dir}", "trainer.logger=[jsonl]",
            "trainer.total_training_steps=1", "trainer.val_before_train=false", "data.val_size=2",
            "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
            "actor_rollout_ref.rollout.n=2", "data.max_response_length=4"]
    return ["train", config.format(w=w), *base, *(o.format(w=w) for o in overrides)]


DEMO = "configs/demo.yaml"

# (case, config file, overrides, what the one error line must contain); {w} = the fixture's directory
CASES = [
    # ---- configs
    ("config file missing", "no/such.yaml", [], "config file 'no/such.yaml' does not exist"),
    ("config malformed YAML", "{w}/bad.yaml", [],
     "config file '{w}/bad.yaml' line 3: malformed YAML (mapping values are not allowed here)"),
    ("config unknown key", DEMO, ["trainer.sav_freq=2"],
     "config key 'trainer.sav_freq' is unknown (did you mean 'save_freq'?)"),
    ("config wrong type", DEMO, ["trainer.total_training_steps=ten"],
     "config key 'trainer.total_training_steps' must be an integer, got 'ten'"),
    ("config override without =", DEMO, ["trainer.seed"], "override 'trainer.seed' must look like key.path=value"),
    ("config unknown loss name", DEMO, ["actor_rollout_ref.actor.loss_agg_mode=token-avg"],
     "unknown actor_rollout_ref.actor.loss_agg_mode 'token-avg' (valid: token-mean,"),
    ("config batch > prompts", DEMO, ["data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=8"],
     "config key 'data.train_batch_size' (8) exceeds the 4 training prompts"),
    ("config rules file missing", DEMO, ["monitor.rules=no/rules.yaml"],
     "monitor rules 'no/rules.yaml' is neither a built-in rule set"),
    ("config rules file bad field", DEMO, ["monitor.rules={w}/rules.yaml"],
     "rules file '{w}/rules.yaml' entry 1 (actor/entropy): unknown field 'treshold'"),
    # ---- data files
    ("data file missing", DEMO, ["data.train_files=no/train.jsonl"], "data file 'no/train.jsonl' does not exist"),
    ("data val file missing", DEMO, ["data.val_files=no/val.jsonl"], "data file 'no/val.jsonl' does not exist"),
    ("data unknown extension", DEMO, ["data.train_files={w}/table.csv"],
     "data file '{w}/table.csv' has unknown extension '.csv'"),
    ("data row not JSON", DEMO, ["data.train_files={w}/bad_json.jsonl"],
     "data file '{w}/bad_json.jsonl' row 2: not valid JSON"),
    ("data row missing field", DEMO, ["data.train_files={w}/missing_field.jsonl"],
     "data file '{w}/missing_field.jsonl' row 2: missing 'answer'"),
    ("data row no #### gold", DEMO, ["data.train_files={w}/no_hashes.jsonl"],
     "data file '{w}/no_hashes.jsonl' row 1: 'answer' has no '#### <gold>' line"),
    ("data row not an object", DEMO, ["data.train_files={w}/not_object.jsonl"],
     "data file '{w}/not_object.jsonl' row 2: must be an object with named fields, got list"),
    ("data unknown columns", DEMO, ["data.train_files={w}/columns.jsonl"],
     "data file '{w}/columns.jsonl': cannot tell the row format from columns ['text']"),
    ("data empty file", DEMO, ["data.train_files={w}/empty.jsonl"], "data file '{w}/empty.jsonl' is empty (no rows)"),
    ("data broken parquet", DEMO, ["data.train_files={w}/broken.parquet"],
     "data file '{w}/broken.parquet' is not a readable Parquet file"),
    ("data every prompt too long", DEMO, ["data.max_prompt_length=3"],
     "data.train_files '{w}/gsm.jsonl': no usable prompts (all 4 are longer than data.max_prompt_length=3 tokens)"),
    # ---- model directories
    ("model dir missing", DEMO, ["actor_rollout_ref.model.path=no/model"], "model directory 'no/model' does not exist"),
    ("model no config.json", DEMO, ["actor_rollout_ref.model.path={w}/no_config"],
     "model directory '{w}/no_config' has no config.json"),
    ("model config.json not JSON", DEMO, ["actor_rollout_ref.model.path={w}/bad_config"],
     "model directory '{w}/bad_config': config.json is not valid JSON"),
    ("model no weights", DEMO, ["actor_rollout_ref.model.path={w}/no_weights"],
     "model directory '{w}/no_weights' has no weights (*.safetensors or *.bin)"),
    ("model weights garbage", DEMO, ["actor_rollout_ref.model.path={w}/bad_weights"],
     "model in '{w}/bad_weights' could not be loaded: Error while deserializing header"),
    ("model config vs weights", DEMO, ["actor_rollout_ref.model.path={w}/edited_config"],
     "model in '{w}/edited_config' could not be loaded: the weights' tensor shapes do not match config.json"),
    # ---- tokenizers
    ("tokenizer dir missing", DEMO, ["actor_rollout_ref.model.tokenizer_path=no/tok"],
     "tokenizer directory 'no/tok' does not exist (config key 'actor_rollout_ref.model.tokenizer_path')"),
    ("tokenizer unreadable", DEMO, ["actor_rollout_ref.model.path={w}/bad_tokenizer"],
     "tokenizer in '{w}/bad_tokenizer' could not be loaded"),
    ("tokenizer without eos", DEMO, ["actor_rollout_ref.model.path={w}/no_eos"],
     "tokenizer in '{w}/no_eos' has no eos token (generation could never stop)"),
    ("tokenizer bigger than vocab", DEMO, ["actor_rollout_ref.model.path={w}/big_tokenizer"],
     "model in '{w}/big_tokenizer' has vocab_size 49 but its tokenizer has 89 tokens"),
    # ---- reward functions
    ("reward unknown built-in", DEMO, ["reward.functions=[math_verfy]"],
     "reward function 'math_verfy' is unknown (built-ins: arithmetic, auto, format, math_verify;"),
    ("reward file missing", DEMO, ["reward.functions=[{{name: 'no/r.py:f'}}]"],
     "reward function 'no/r.py:f': file 'no/r.py' does not exist"),
    ("reward file raises on import", DEMO, ["reward.functions=[{{name: '{w}/raises_on_import.py:f'}}]"],
     "importing '{w}/raises_on_import.py' failed (RuntimeError: cannot reach the grading server)"),
    ("reward function missing", DEMO, ["reward.functions=[{{name: '{w}/rewards.py:nothere'}}]"],
     "'{w}/rewards.py' has no function 'nothere'"),
    ("reward not callable", DEMO, ["reward.functions=[{{name: '{w}/rewards.py:not_callable'}}]"],
     "reward function '{w}/rewards.py:not_callable': 'not_callable' is not callable"),
    ("reward wrong signature", DEMO, ["reward.functions=[{{name: '{w}/rewards.py:two_args'}}]"],
     "reward function '{w}/rewards.py:two_args' has signature (x, y); expected TRL's"),
    ("reward wrong length", DEMO, ["reward.functions=[{{name: '{w}/rewards.py:wrong_len'}}]"],
     "reward function 'wrong_len' returned 1 scores for 4 completions"),
    ("reward not a list", DEMO, ["reward.functions=[{{name: '{w}/rewards.py:not_a_list'}}]"],
     "reward function 'not_a_list' must return a list of floats, got float"),
    ("reward fails on every sample", DEMO, ["reward.functions=[{{name: '{w}/rewards.py:always_raises'}}]",
                                            "trainer.total_training_steps=5", "reward.max_failed_batches=3"],
     "reward function 'always_raises' failed on every sample of 3 batches in a row (last error KeyError: "
     "'solutoin'); fix it or remove it from reward.functions (reward.max_failed_batches=3)"),
    ("verl custom_reward_function missing", DEMO, ["custom_reward_function.path=no/score.py"],
     "reward function 'no/score.py': file 'no/score.py' does not exist"),
    # ---- checkpoints
    ("resume from another model's checkpoint", DEMO, ["trainer.run_dir={w}/other_run", "trainer.resume=auto"],
     "checkpoint {w}/other_run/checkpoints/step_000002: 'model.embed_tokens.weight' is torch.float32 (49, 32) "
     "but the model has torch.float32 (49, 16)"),
]


@pytest.mark.parametrize("case, config, overrides, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(w, tmp_path, capsys, case, config, overrides, expected):
    code = cli.main(argv(w, tmp_path / "run", config, overrides))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == EXIT_BAD_INPUT == 2, err
    assert len(lines) == 1 and lines[0].startswith("keel: error: "), err
    assert expected.format(w=w) in lines[0]


def test_debug_raises_instead(w, tmp_path):
    """--debug: main() re-raises, so the interpreter prints the full traceback."""
    with pytest.raises(KeelError, match="row 2: missing 'answer'"):
        cli.main(["--debug", *argv(w, tmp_path / "run", DEMO, ["data.train_files={w}/missing_field.jsonl"])])


def test_real_process_exit_code_2_and_no_traceback(w, tmp_path):
    """The same through a real `python -m keel` process: exit status 2, stderr is the one line."""
    args = argv(w, tmp_path / "run", DEMO, ["data.train_files={w}/missing_field.jsonl"])
    proc = subprocess.run([sys.executable, "-m", "keel", *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"keel: error: data file '{w}/missing_field.jsonl' row 2: missing 'answer' (or set data.skip_invalid: true)"]


def test_reward_raising_on_some_samples_is_counted_not_fatal(w, tmp_path, caplog):
    """4 prompts x n=2 every step; the grader raises on the 2 completions of the prompt whose answer is 13."""
    run_dir = tmp_path / "run"
    code = cli.main(argv(w, run_dir, DEMO, [
        "custom_reward_function.path={w}/rewards.py", "custom_reward_function.name=compute_score",
        "reward.error_score=-1.0", "data.train_batch_size=4", "trainer.total_training_steps=2"]))
    assert code == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/errors"] for r in rows] == [2.0, 2.0]
    assert [r["critic/score/min"] for r in rows] == [-1.0, -1.0]  # error_score; the others are in [0, 1]
    warnings = [r.getMessage() for r in caplog.records if r.name == "keel.rewards"]
    assert warnings == ["reward function 'compute_score' failed on a sample (RuntimeError: grader crashed); "
                        "scored -1.0"]  # warned once; the count is in reward/errors every step


# --------------------------------------------------------------------------- issue 14: hostile inputs a new user tried
# Each ends in one line and exit 2 before the first step, and leaves no run directory behind.


def _rehash_manifest(ckpt: Path) -> None:
    """What a careful hand-editor does after changing a file: recompute its size and sha256 in the manifest."""
    import hashlib

    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _edited_run(w: Path, name: str, edit) -> None:
    shutil.copytree(w / "good_run", w / name)
    ckpt = w / name / "checkpoints" / "step_000001"
    state = json.loads((ckpt / "state.json").read_text())
    edit(state)
    (ckpt / "state.json").write_text(json.dumps(state))
    _rehash_manifest(ckpt)
    (w / name / "metrics.jsonl").unlink()  # so only the checkpoint's contents can stop the resume


@pytest.fixture(scope="module")
def h(w) -> Path:
    """Issue 14's hostile files, next to the table's (same directory)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from keel.checkpoint import verify_checkpoint

    (w / "latin1.yaml").write_bytes(b"trainer:\n  experiment_name: caf\xe9\n")
    (w / "latin1.jsonl").write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "caf\xe9", "answer": "#### 2"}\n')
    (w / "empty.yaml").write_text("")
    (w / "comments.yaml").write_text("# nothing set here yet\n")
    (w / "aime_q.jsonl").write_text(_jsonl({"question": "Find x.", "answer": "204"}, {"question": "Find y.", "answer": 7}))
    _model_variant(w, "latin1_config", lambda d: (d / "config.json").write_bytes(b'{"model_type": "qwen3\xff"}'))
    _model_variant(w, "list_config", lambda d: (d / "config.json").write_text("[1, 2]"))
    _model_variant(w, "no_tokenizer", lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")
                                                 if (d / f).exists()])

    def poison(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / "model.safetensors")
        tensors["model.norm.weight"][0] = float("nan")
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})

    _model_variant(w, "nan_weights", poison)
    # a BERT directory: loads through AutoModelForCausalLM (BertLMHeadModel) but attends both ways
    bert = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=64))
    bert.save_pretrained(w / "bert")
    for f in (w / "model").glob("*token*"):
        shutil.copy(f, w / "bert" / f.name)
    # a real 1-step run whose checkpoint is then hand-edited (the manifest hash recomputed)
    assert cli.main(argv(w, w / "good_run", DEMO, ["trainer.seed=3"])) == 0
    assert verify_checkpoint(w / "good_run" / "checkpoints" / "step_000001") == []
    _edited_run(w, "edited_step", lambda s: s["trainer"].update(step="1"))
    _edited_run(w, "edited_counter", lambda s: s["trainer"].update(nonfinite_in_row=-7))
    _edited_run(w, "edited_monitor", lambda s: s["monitor"].update(overall="great"))
    assert torch.isfinite(torch.zeros(1)).all()
    return w


RUN = "trainer.resume=auto"
HOSTILE = [
    # ---- config files
    ("config not UTF-8", "{w}/latin1.yaml", [], "config file '{w}/latin1.yaml' is not UTF-8 text (byte 31: invalid continuation byte)"),
    ("config empty", "{w}/empty.yaml", [], "config file '{w}/empty.yaml' is empty (no settings)"),
    ("config only comments", "{w}/comments.yaml", [], "config file '{w}/comments.yaml' is empty (no settings)"),
    ("config is a directory", "{w}", [], "config file '{w}' is a directory, not a YAML file"),
    # ---- values checked before the first step
    ("device tpu", DEMO, ["trainer.device=tpu"],
     "config key 'trainer.device' must be cpu, cuda, cuda:<index> or auto, got 'tpu'"),
    ("betas out of range", DEMO, ["actor_rollout_ref.actor.optim.betas=[2,3]"],
     "config key 'actor_rollout_ref.actor.optim.betas' must be two numbers in [0, 1), got [2, 3]"),
    ("negative weight decay", DEMO, ["actor_rollout_ref.actor.optim.weight_decay=-5"],
     "config key 'actor_rollout_ref.actor.optim.weight_decay' must be >= 0, got -5.0"),
    ("entropy chunk 0", DEMO, ["actor_rollout_ref.actor.entropy_chunk_size=0"],
     "config key 'actor_rollout_ref.actor.entropy_chunk_size' must be >= 1, got 0"),
    ("keep 0 checkpoints", DEMO, ["trainer.max_ckpt_to_keep=0"], "config key 'trainer.max_ckpt_to_keep' must be >= 1, got 0"),
    ("temperature inf", DEMO, ["actor_rollout_ref.rollout.temperature=.inf"],
     "config key 'actor_rollout_ref.rollout.temperature' must be a finite number, got inf"),
    ("kl coef inf", DEMO, ["actor_rollout_ref.actor.kl_loss_coef=.inf"],
     "config key 'actor_rollout_ref.actor.kl_loss_coef' must be a finite number, got inf"),
    ("lr inf", DEMO, ["actor_rollout_ref.actor.optim.lr=.inf"],
     "config key 'actor_rollout_ref.actor.optim.lr' must be a finite number, got inf"),
    ("lr nan", DEMO, ["actor_rollout_ref.actor.optim.lr=.nan"],
     "config key 'actor_rollout_ref.actor.optim.lr' must be a finite number, got nan"),
    ("val_size negative", DEMO, ["data.val_size=-3"], "config key 'data.val_size' must be >= 0, got -3"),
    ("batch timeout 0", DEMO, ["reward.batch_timeout_s=0"], "config key 'reward.batch_timeout_s' must be > 0, got 0.0"),
    ("run_dir is a file", DEMO, ["trainer.run_dir={w}/gsm.jsonl"],
     "config key 'trainer.run_dir' ('{w}/gsm.jsonl') is an existing file, not a directory"),
    ("vllm not installed", DEMO, ["actor_rollout_ref.rollout.name=vllm"], "rollout name 'vllm' needs the vllm extra"),
    # ---- data
    ("data not UTF-8", DEMO, ["data.train_files={w}/latin1.jsonl"],
     "data file '{w}/latin1.jsonl' row 2: not UTF-8 text (byte 55: invalid continuation byte)"),
    ("data is a directory", DEMO, ["data.train_files={w}/model"],
     "data file '{w}/model' is a directory; name the .jsonl / .json / .parquet file(s) in it"),
    ("data AIME-style question + answer", DEMO, ["data.train_files={w}/aime_q.jsonl"],
     "data file '{w}/aime_q.jsonl': columns question + answer look like GSM8K, but no 'answer' has a '#### <gold>' "
     "line; for plain answers (AIME style) name the question column 'problem'"),
    # ---- model directories
    ("model path is a file", DEMO, ["actor_rollout_ref.model.path={w}/model/config.json"],
     "model path '{w}/model/config.json' is a file, not a model directory"),
    ("model config.json not UTF-8", DEMO, ["actor_rollout_ref.model.path={w}/latin1_config"],
     "model directory '{w}/latin1_config': config.json is not UTF-8 text (byte 21: invalid start byte)"),
    ("model config.json a list", DEMO, ["actor_rollout_ref.model.path={w}/list_config"],
     "model directory '{w}/list_config': config.json must hold a JSON object of settings, got list"),
    ("model tokenizer files deleted", DEMO, ["actor_rollout_ref.model.path={w}/no_tokenizer"],
     "tokenizer in '{w}/no_tokenizer' turns text into no tokens (tokenizer files missing?"),
    ("model NaN weights", DEMO, ["actor_rollout_ref.model.path={w}/nan_weights"],
     "model in '{w}/nan_weights' has non-finite weights (NaN or inf in 'model.norm.weight')"),
    ("model is BERT", DEMO, ["actor_rollout_ref.model.path={w}/bert"],
     "model in '{w}/bert' is not a causal language model: its prediction at a position depends on later tokens "
     "(model_type 'bert'"),
    # ---- checkpoints edited by hand, manifest recomputed
    ("checkpoint step edited", DEMO, ["trainer.seed=3", RUN, "trainer.run_dir={w}/edited_step"],
     "checkpoint {w}/edited_step/checkpoints/step_000001: state.json 'trainer.step' is '1' but the checkpoint is of "
     "step 1; was it edited?"),
    ("checkpoint counter edited", DEMO, ["trainer.seed=3", RUN, "trainer.run_dir={w}/edited_counter"],
     "state.json 'trainer.nonfinite_in_row' must be an integer >= 0, got -7; was it edited?"),
    ("checkpoint monitor edited", DEMO, ["trainer.seed=3", RUN, "trainer.run_dir={w}/edited_monitor"],
     "state.json 'monitor' holds verdicts other than good/watch/bad or negative streaks; was it edited?"),
]


@pytest.mark.parametrize("case, config, overrides, expected", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_input_is_one_line_exit_2_and_no_run_dir(h, tmp_path, capsys, case, config, overrides, expected):
    run_dir = tmp_path / "run"
    code = cli.main(argv(h, run_dir, config, overrides))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == EXIT_BAD_INPUT, err
    assert len(lines) == 1 and lines[0].startswith("keel: error: "), err
    assert expected.format(w=h) in lines[0]
    assert not run_dir.exists()  # nothing half-made


def test_edited_checkpoints_leave_their_run_dir_as_it_was(h):
    """The refused resume wrote nothing into the run directory (no metrics, no config, no STOPPED)."""
    assert sorted(p.name for p in (h / "edited_step").iterdir()) == sorted(
        p.name for p in (h / "good_run").iterdir() if p.name != "metrics.jsonl")


@pytest.mark.parametrize("flags, expected", [
    (["--heads", "3"], "keel tiny-model --hidden 64 must be an even multiple of --heads 3"),
    (["--layers", "0"], "keel tiny-model --layers must be >= 1, got 0"),
    (["--hidden", "48", "--heads", "16"], "keel tiny-model --hidden 48 must be an even multiple of --heads 16"),
])
def test_tiny_model_bad_sizes(w, tmp_path, capsys, flags, expected):
    out = tmp_path / "tiny"
    code = cli.main(["tiny-model", str(out), "--data", str(w / "gsm.jsonl"), *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT and len(lines) == 1 and lines[0].startswith("keel: error: ")
    assert expected in lines[0]
    assert not out.exists()


def test_tiny_model_default_head_dim_runs_under_every_backend(w, tmp_path):
    """head_dim 32 (64 / 2): vLLM's CPU attention has kernels for it (not for the old default's 16)."""
    out = tmp_path / "tiny"
    assert cli.main(["tiny-model", str(out), "--data", str(w / "gsm.jsonl")]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["head_dim"]) == (64, 2, 32)


def test_vllm_start_failure_is_one_line_naming_cause_and_fix():
    """vLLM's own error text for the old tiny-model (raised inside the engine at start-up) -> one line."""
    from keel.rollout_vllm import engine_start_error

    vllm_text = "Unsupported CPU attention configuration: head_dim=16 isa=1\n  (and 40 lines of traceback)"
    err = engine_start_error(RuntimeError(vllm_text), "runs/tiny", "actor_rollout_ref.rollout.kv_cache_memory_bytes=1")
    assert str(err) == (
        "vLLM could not start on 'runs/tiny': Unsupported CPU attention configuration: head_dim=16 isa=1 (vLLM has no "
        "attention kernel for this model's head_dim = hidden_size / num_attention_heads here; use one it supports, "
        "e.g. 32, 64 or 128: `keel tiny-model` makes 64 / 2 heads = 32; or use Keel's own sampler: "
        "actor_rollout_ref.rollout.name=hf)")
    other = engine_start_error(OSError("libnuma.so: cannot open shared object"), "m", "k=1")
    assert str(other).endswith("(OSError while building the engine; or use Keel's own sampler: "
                               "actor_rollout_ref.rollout.name=hf)")
    sized = engine_start_error(ValueError("No available memory for the cache blocks."), "m",
                               "actor_rollout_ref.rollout.kv_cache_memory_bytes=65536")
    assert str(sized) == ("vLLM could not start on 'm': No available memory for the cache blocks. (Keel sizes its KV "
                          "cache with actor_rollout_ref.rollout.kv_cache_memory_bytes=65536)")


def test_eval_reads_aime_style_problem_answer_rows(w, tmp_path, capsys):
    """`keel eval --data` on (problem, answer) rows with integer answers: the golds are the answers as written."""
    data = tmp_path / "aime.jsonl"
    data.write_text(_jsonl({"id": 1, "problem": "Find x if x + 1 = 205.", "answer": 204},
                           {"id": 2, "problem": "Compute 5 * 5.", "answer": "025"}))
    out = tmp_path / "per_problem.jsonl"
    code = cli.main(["eval", str(w / "model"), "--data", str(data), "--out", str(out), "data.max_response_length=2"])
    assert code == 0, capsys.readouterr().err
    assert [json.loads(line)["ground_truth"] for line in out.read_text().splitlines()] == ["204", "025"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 2


@pytest.mark.parametrize("lines, overall, reason", [
    (['{"step": 1, "actor/entropy": NaN}', '{"step": 2, "actor/entropy": NaN, "actor/kl_loss": 0.001}'],
     "bad", "actor/entropy is nan (non-finite) since step 1"),
    (['{"step": 1, "actor/entropy": 0.5}', '{"step": 2, "actor/entropy": Infinity}'],
     "bad", "actor/entropy is inf (non-finite) since step 2"),
    (['{"step": 1, "actor/entropy": "-inf"}'], "bad", "actor/entropy is '-inf' (non-finite) since step 1"),
    (['{"step": 1, "actor/entropy": "high", "actor/kl_loss": "n/a"}', '{"step": 2, "actor/entropy": null}'],
     None, "no usable values: the watched metrics (actor/entropy, actor/kl_loss, critic/score/mean, "
           "response_length/pos/mean, token/logical_connectives, val/accuracy) are missing or not numbers in every step"),
])
def test_monitor_never_calls_non_finite_or_unusable_metrics_good(tmp_path, capsys, lines, overall, reason):
    """`keel monitor` on a file whose watched metrics are NaN / Infinity / strings: not GOOD."""
    from keel.monitor import monitor_main

    f = tmp_path / "metrics.jsonl"
    f.write_text("\n".join(lines) + "\n")
    assert monitor_main([str(f), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["overall"], summary["reason"]) == (overall, reason)
    assert monitor_main([str(f)]) == 0
    table = capsys.readouterr().out
    assert ("BAD" if overall else "no usable values") in table and "GOOD" not in table


MID_RUN = '''
import sys, time

def sleeps(prompts, completions, **kwargs):
    time.sleep(40)
    return [1.0] * len(completions)

def exits(prompts, completions, **kwargs):
    sys.exit(0)
'''


@pytest.mark.parametrize("name, expected", [
    ("sleeps", "reward function 'sleeps' timed out on every sample of 2 batches in a row (reward.batch_timeout_s=0.5)"),
    ("exits", "reward function 'exits' failed on every sample of 2 batches in a row (last error RewardExit: raised "
              "SystemExit(0))"),
])
def test_a_hanging_or_exiting_reward_function_stops_the_run_with_one_line(w, tmp_path, capsys, name, expected):
    """Before: a 40 s sleep hung the trainer; sys.exit(0) ended the run with exit 0, no message, no checkpoint."""
    (tmp_path / "mid_run.py").write_text(MID_RUN)
    t0 = __import__("time").monotonic()
    code = cli.main(argv(w, tmp_path / "run", DEMO, [f"reward.functions=[{{{{name: '{tmp_path}/mid_run.py:{name}'}}}}]",
                                                     "reward.batch_timeout_s=0.5", "reward.max_failed_batches=2",
                                                     "trainer.total_training_steps=4"]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT and len(lines) == 1 and lines[0].startswith("keel: error: "), lines
    assert expected in lines[0]
    assert __import__("time").monotonic() - t0 < 30

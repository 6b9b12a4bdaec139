"""Checking a diffusers model folder before any weights load.

Everything here reads only `model_index.json`, component `config.json` files and safetensors headers
(a few KB each), so a broken or incomplete download is reported in milliseconds with a precise
message, and the component sizes for automatic placement are known without loading anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..utils.errors import QwenEditError

REQUIRED_COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer", "processor", "scheduler")
#: The only (library, class) each component of QwenImageEditPlusPipeline may name in model_index.json:
#: diffusers imports whatever a model folder names, so anything else is refused before it runs.
ALLOWED_CLASSES: dict[str, tuple[tuple[str, str], ...]] = {
    "transformer": (("diffusers", "QwenImageTransformer2DModel"),),
    "text_encoder": (("transformers", "Qwen2_5_VLForConditionalGeneration"),),
    "vae": (("diffusers", "AutoencoderKLQwenImage"),),
    "tokenizer": (("transformers", "Qwen2Tokenizer"), ("transformers", "Qwen2TokenizerFast")),
    "processor": (("transformers", "Qwen2VLProcessor"), ("transformers", "Qwen2_5_VLProcessor")),
    "scheduler": (("diffusers", "FlowMatchEulerDiscreteScheduler"),),
}
WEIGHT_COMPONENTS = ("transformer", "text_encoder", "vae")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: Bytes per element of each floating-point precision the loader offers.
BYTES_PER_PARAM = {"bfloat16": 2, "float16": 2, "float32": 4}

#: Bits per element of each dtype safetensors (0.8) stores, by its name in the header. A dtype missing
#: here is refused by `tensor_bytes`, never guessed: sizes decide placement and offload.
DTYPE_BITS = {
    "F64": 64, "I64": 64, "U64": 64, "C64": 64, "F32": 32, "I32": 32, "U32": 32, "F16": 16, "BF16": 16,
    "I16": 16, "U16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I8": 8, "U8": 8, "BOOL": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}


class ModelFolderError(QwenEditError, ValueError):
    """The model folder is missing, incomplete, corrupt or unsafe to load."""


@dataclass
class ComponentInfo:
    name: str
    path: Path
    weight_bytes: int = 0
    params: int = 0
    pre_quantized: str | None = None


@dataclass
class ModelFolder:
    path: Path
    pipeline_class: str
    components: dict[str, ComponentInfo]
    zero_cond_t: bool

    def bytes_at(self, bytes_per_param: float, name: str) -> int:
        """Size of a component once loaded at `bytes_per_param` (its stored size if pre-quantized)."""
        info = self.components[name]
        if info.pre_quantized:
            return info.weight_bytes
        return int(info.params * bytes_per_param)


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors header says: each tensor's dtype name (as `DTYPE_BITS` spells it) and shape."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str]


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """One safetensors file's header, read and validated by `safetensors.safe_open` without reading a tensor.

    safe_open maps the file and checks the header (offsets, sizes, dtypes) before any data is touched, so a
    20 GB file answers in well under a millisecond. A file it refuses gets a message that says what is wrong
    (truncated, corrupt, not safetensors) and to download it again.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {}
            for key in f.keys():
                piece = f.get_slice(key)
                tensors[key] = (str(piece.get_dtype()), tuple(int(d) for d in piece.get_shape()))
            metadata = dict(f.metadata() or {})
    except SafetensorError as exc:
        raise ModelFolderError(_header_problem(Path(path), str(exc))) from None
    return SafetensorsHeader(tensors, metadata)


def _header_problem(path: Path, reason: str) -> str:
    """Words for a header safe_open refused: the file's size against what its header (if readable) describes."""
    reason = reason.removeprefix("Error while deserializing header: ")
    size = path.stat().st_size
    if size < 8:
        return f"{path} is truncated ({size} bytes). Download it again."
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = None
        if 0 < length <= min(size - 8, 100 * 2**20):
            try:
                header = json.loads(f.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass
    if not isinstance(header, dict):
        return f"{path} is not a valid safetensors file ({reason}). Download it again."
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        entry_end = _entry_end(entry)
        if entry_end is None:
            return (f"{path} has a corrupt safetensors header: the entry {key!r} lacks a valid shape, dtype or "
                    "offsets. Download it again.")
        if entry["dtype"] not in DTYPE_BITS:
            return (f"{path} stores {key!r} as {entry['dtype']!r}, a dtype this pack does not know ({reason}). It "
                    "is corrupt or from a newer safetensors; download it again, or use a bf16/fp8 file.")
        end = max(end, entry_end)
    expected = 8 + length + end
    if size != expected:
        return (f"{path} is {'truncated' if size < expected else 'corrupt'}: {size} bytes on disk, the header "
                f"describes {expected}. The download was probably interrupted; download it again.")
    return f"{path} has a corrupt safetensors header ({reason}). Download it again."


def _entry_end(entry: object) -> int | None:
    """Where a header entry's data ends; None when it lacks a valid dtype, shape or offsets."""
    try:
        if not isinstance(entry["dtype"], str) or any(int(d) < 0 for d in entry["shape"]):  # type: ignore[index]
            return None
        return int(entry["data_offsets"][1])  # type: ignore[index]
    except (KeyError, TypeError, IndexError, ValueError):
        return None


def tensor_bytes(path: Path, key: str, dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes one tensor of `path` takes as stored; an unknown dtype is refused, naming the file and tensor."""
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        raise ModelFolderError(
            f"{Path(path).name} stores {key!r} as {dtype!r}, a dtype this pack cannot size. Use a bf16, fp16, fp32 "
            "or fp8 file (or update the pack if a newer safetensors added this dtype)."
        )
    count = 1
    for dim in shape:
        count *= dim
    return (count * bits + 7) // 8


def _component_info(name: str, path: Path) -> ComponentInfo:
    info = ComponentInfo(name, path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise ModelFolderError(
                f"{path} holds only pickle weights ({', '.join(pickles)}). Pickle files can run code when "
                "loaded, so this pack loads safetensors only. Download the safetensors release of the model."
            )
        raise ModelFolderError(f"{path} has no .safetensors weights. The download is incomplete: download it again.")
    index = next(path.glob("*.safetensors.index.json"), None)
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            wanted = set(weight_map.values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ModelFolderError(f"{index} is corrupt: it needs a 'weight_map' object of weight -> file. "
                                   "Download it again.") from None
        missing = sorted(wanted - {p.name for p in files})
        if missing:
            raise ModelFolderError(
                f"{path} is missing {len(missing)} weight shard(s), e.g. {missing[0]}. Download the model again."
            )
    for file in files:
        for key, (dtype, shape) in read_safetensors_header(file).tensors.items():
            count = 1
            for dim in shape:
                count *= dim
            info.params += count
            info.weight_bytes += tensor_bytes(file, key, dtype, shape)
    config = path / "config.json"
    if config.is_file():
        try:
            quant = json.loads(config.read_text()).get("quantization_config")
        except json.JSONDecodeError:
            raise ModelFolderError(f"{config} is corrupt. Download it again.") from None
        if quant:
            info.pre_quantized = quant.get("quant_method", "quantized")
            if quant.get("load_in_4bit"):
                info.pre_quantized = "nf4" if quant.get("bnb_4bit_quant_type", "nf4") == "nf4" else "fp4"
            elif quant.get("load_in_8bit"):
                info.pre_quantized = "8bit"
    return info


def _check_component_classes(index_file: Path, index: dict) -> None:
    """Every component must name the class this pipeline uses; refuse anything else before diffusers imports it."""
    for name, value in index.items():
        if name.startswith("_"):
            continue
        allowed = ALLOWED_CLASSES.get(name)
        if allowed is None or not isinstance(value, list) or tuple(value) not in allowed:
            expected = " or ".join(f"[{lib!r}, {cls!r}]" for lib, cls in allowed) if allowed else "no such component"
            raise ModelFolderError(
                f"{index_file} names {value!r} for '{name}' ({expected} expected). This pack loads only "
                "Qwen-Image-Edit's own components and never imports a module a model folder names. "
                "Download the model again from Qwen/Qwen-Image-Edit-2511."
            )


def inspect_model_folder(path: Path) -> ModelFolder:
    """Validate a diffusers Qwen-Image-Edit folder and read its component sizes from the headers."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(
            f"Model folder not found: {path}. Put the model under ComfyUI/models/diffusers/ or give the path "
            "of a folder that holds model_index.json."
        )
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelFolderError(f"{path} is not a diffusers model folder: it has no model_index.json.")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError:
        raise ModelFolderError(f"{index_file} is corrupt. Download the model again.") from None
    if not isinstance(index, dict):
        raise ModelFolderError(f"{index_file} is corrupt: it must be a JSON object. Download the model again.")
    pipeline_class = index.get("_class_name", "")
    if not isinstance(pipeline_class, str):
        raise ModelFolderError(f"{index_file} is corrupt: _class_name must be a string. Download the model again.")
    if not pipeline_class.startswith("QwenImageEdit"):
        raise ModelFolderError(
            f"{path} holds a {pipeline_class or 'unknown'} model, not Qwen-Image-Edit. Choose a "
            "Qwen-Image-Edit-2511 or -2509 folder."
        )
    missing = [c for c in REQUIRED_COMPONENTS if not index.get(c) or not (path / c).is_dir()]
    if missing:
        raise ModelFolderError(
            f"{path} is missing the component(s) {', '.join(missing)}. The download is incomplete: "
            "download the whole model again."
        )
    if pipeline_class == "QwenImageEditPlusPipeline":
        _check_component_classes(index_file, index)
    components = {name: _component_info(name, path / name) for name in WEIGHT_COMPONENTS}
    zero_cond_t = False
    tconfig = path / "transformer" / "config.json"
    if tconfig.is_file():
        try:
            zero_cond_t = bool(json.loads(tconfig.read_text()).get("zero_cond_t", False))
        except json.JSONDecodeError:
            raise ModelFolderError(f"{tconfig} is corrupt. Download the model again.") from None
    return ModelFolder(path, pipeline_class, components, zero_cond_t)

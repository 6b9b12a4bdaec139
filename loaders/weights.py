"""Checking a diffusers model folder before any weights load.

Everything here reads only `model_index.json`, component `config.json` files and safetensors headers
(a few KB each), so a broken or incomplete download is reported in milliseconds with a precise
message, and the component sizes for automatic placement are known without loading anything.
"""

from __future__ import annotations

import json
import struct
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

DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
    "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1,
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


def read_safetensors_header(path: Path) -> dict:
    """Parse and sanity-check one safetensors header; raise ModelFolderError on truncation/corruption."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelFolderError(f"{path} is truncated ({size} bytes). Download it again.")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len <= 0 or header_len > min(size - 8, 100 * 2**20):
            raise ModelFolderError(f"{path} is not a valid safetensors file (bad header). Download it again.")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelFolderError(f"{path} has a corrupt safetensors header. Download it again.") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{path} has a corrupt safetensors header. Download it again.")
    end = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(meta["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise ModelFolderError(f"{path} has a corrupt safetensors header. Download it again.") from None
    expected = 8 + header_len + end
    if size != expected:
        raise ModelFolderError(
            f"{path} is {'truncated' if size < expected else 'corrupt'}: {size} bytes on disk, the header "
            f"describes {expected}. The download was probably interrupted; download it again."
        )
    return header


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
        for key, meta in read_safetensors_header(file).items():
            if key == "__metadata__":
                continue
            try:
                count = 1
                for dim in meta["shape"]:
                    count *= int(dim)
                size = DTYPE_BYTES[meta["dtype"]]
            except (KeyError, TypeError, ValueError):
                raise ModelFolderError(
                    f"{file} has a corrupt safetensors header: the entry {key!r} lacks a valid shape or dtype. "
                    "Download it again."
                ) from None
            info.params += count
            info.weight_bytes += count * size
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

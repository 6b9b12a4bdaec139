"""Loading QwenImageEditPlusPipeline and keeping exactly one alive between queue runs.

The cache holds one pipeline keyed by the settings the user chose (with `auto` unresolved, so a
warm cache is never missed because free memory changed). A different key releases the old pipeline
and its memory before the new one loads. Nodes pass around a `PipeHandle` (settings only), never the
pipeline itself, so ComfyUI's node-output cache cannot keep a released pipeline alive.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..utils import comfy
from ..utils.errors import QwenEditError
from . import compat, from_files
from .placement import Placement, plan_placement
from .weights import BYTES_PER_PARAM, ModelFolder, ModelFolderError, inspect_model_folder

if TYPE_CHECKING:  # lora and speed import this module
    from .lora import LoraSpec, LoraState
    from .speed import SpeedOptions, SpeedState

log = logging.getLogger("qwen_image_edit")
T = TypeVar("T")

HUB_MODELS = ("Qwen/Qwen-Image-Edit-2511", "Qwen/Qwen-Image-Edit-2509")
PRECISIONS = ("bfloat16", "float16", "float32")
VAE_PRECISIONS = ("same", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "none", "nf4", "8bit")
QUANTIZE_COMPONENTS = ("transformer+text_encoder", "transformer", "text_encoder")
DEVICES = ("auto", "cuda", "cpu", "mps", "xpu")
OFFLOADS = ("auto", "none", "model", "sequential", "group")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class LoadError(QwenEditError, RuntimeError):
    """A load failed; the message says what was wrong and what to do. The cache is left empty."""


@dataclass(frozen=True)
class LoadSettings:
    """Everything that decides which pipeline is loaded: the cache key."""

    model: str
    precision: str = "bfloat16"
    vae_precision: str = "same"
    quantization: str = "auto"
    quantize: str = "transformer+text_encoder"
    device: str = "auto"
    offload: str = "auto"
    # ComfyUI single files: `model` is then the diffusion model file, these the other two.
    text_encoder: str = ""
    vae: str = ""

    @property
    def from_files(self) -> bool:
        return bool(self.text_encoder or self.vae)

    def __post_init__(self) -> None:
        for name, allowed in (
            ("precision", PRECISIONS), ("vae_precision", VAE_PRECISIONS), ("quantization", QUANTIZATIONS),
            ("quantize", QUANTIZE_COMPONENTS), ("offload", OFFLOADS),
        ):
            if getattr(self, name) not in allowed:
                raise LoadError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}.")
        if not self.model or not str(self.model).strip():
            raise LoadError("No model given: choose a folder under ComfyUI/models/diffusers or a hub id.")
        problem = device_problem(self.device)
        if problem:
            raise LoadError(problem)
        if self.from_files and not (self.text_encoder and self.vae):
            raise LoadError("Loading ComfyUI files needs all three: a diffusion model, a text encoder and a VAE.")


def device_problem(device: Any) -> str | None:
    """Why `device` is not a device setting ('auto', 'cpu', 'mps', 'cuda', 'xpu', or 'cuda:N' / 'xpu:N'), or None."""
    if not isinstance(device, str):
        return f"device must be a string such as 'auto', 'cpu' or 'cuda:0', not {device!r}."
    kind, colon, index = device.partition(":")
    if kind in DEVICES and (not colon or (kind in ("cuda", "xpu") and index.isdigit())):
        return None
    return f"device must be one of {', '.join(DEVICES)}, or cuda:N / xpu:N for one GPU of several, not {device!r}."


@dataclass(frozen=True)
class PipeHandle:
    """What flows along a QWEN_IMAGE_EDIT_PIPE link: the load settings plus the LoRAs to apply (in chain
    order) and the speed options (None: all off). `loaders.edit` applies both just before each edit."""

    settings: LoadSettings
    loras: tuple[LoraSpec, ...] = ()
    speed: SpeedOptions | None = None


@dataclass
class LoadedPipeline:
    pipe: Any
    settings: LoadSettings
    folder: ModelFolder
    device: str
    placement: Placement
    load_seconds: float
    lora: LoraState | None = None  # the adapters the transformer carries now (loaders.lora)
    speed: SpeedState | None = None  # the speed options applied now (loaders.speed)
    edits_done: int = 0

    @property
    def is_2511(self) -> bool:
        return self.folder.zero_cond_t


_lock = threading.RLock()
_loaded: LoadedPipeline | None = None


def pipeline_lock() -> threading.RLock:
    """Held for a whole edit (`loaders.edit`) and around every load and release."""
    return _lock


def current_pipeline() -> LoadedPipeline | None:
    return _loaded


def get_pipeline(settings: LoadSettings) -> LoadedPipeline:
    """The cached pipeline for `settings`, loading it (after releasing any other) on a miss."""
    global _loaded
    hit = _loaded
    if hit is not None and hit.settings == settings:
        return hit
    del hit  # a local reference would keep the old pipeline alive through the new load
    with _lock:
        if _loaded is not None and _loaded.settings == settings:
            return _loaded
        _warn_if_alternating(settings)
        release_pipeline()
        _loaded = _load(settings)
        return _loaded


_recent_loads: list[LoadSettings] = []


def _warn_if_alternating(settings: LoadSettings) -> None:
    """Two loader nodes with different settings in one workflow reload the model twice per run: say so."""
    _recent_loads.append(settings)
    del _recent_loads[:-3]
    if len(_recent_loads) == 3 and _recent_loads[0] == settings and _recent_loads[1] != settings:
        other = _recent_loads[1]
        differ = ", ".join(f"{f.name} {getattr(settings, f.name)!r} vs {getattr(other, f.name)!r}"
                           for f in dataclasses.fields(LoadSettings) if getattr(settings, f.name) != getattr(other, f.name))
        log.warning("Qwen-Image-Edit: two loaders with different settings take turns (%s), so the model is loaded "
                    "again for each. Use one loader node, or give both the same settings.", differ)


def run_on(loaded: LoadedPipeline, run: Callable[[], T]) -> T:
    """Run one edit on `loaded`. A pipeline whose first edit fails for a reason of its own (a kernel that
    cannot run these settings, say) is released, so the next run loads afresh instead of failing the same
    way; bad input (EditError) and a cancel leave it cached."""
    try:
        result = run()
    except BaseException as exc:
        if loaded.edits_done == 0 and not _is_input_or_cancel(exc):
            log.warning("Qwen-Image-Edit: the first edit with these settings failed (%s); unloading the pipeline so "
                        "the next run starts clean.", type(exc).__name__)
            traceback.clear_frames(exc.__traceback__)
            if _loaded is loaded:
                release_pipeline()
        raise
    loaded.edits_done += 1
    return result


def _is_input_or_cancel(exc: BaseException) -> bool:
    from ..utils.sampling import EditError

    return isinstance(exc, (EditError, comfy.Cancelled, KeyboardInterrupt)) or type(exc).__name__ == \
        "InterruptProcessingException"


def release_pipeline() -> bool:
    """Drop the cached pipeline and free its memory. Returns whether one was loaded."""
    global _loaded
    with _lock:
        loaded, _loaded = _loaded, None
        if loaded is None:
            return False
        try:
            loaded.pipe.remove_all_hooks()
        except Exception:  # noqa: BLE001 - hooks are best effort; the references go either way
            pass
        log.info("Qwen-Image-Edit: released %s", loaded.settings.model)
        del loaded
        comfy.empty_cache()
        compat.empty_host_cache()  # pinned host memory of group offload (a no-op without CUDA)
        comfy.trim_host_memory()
        return True


def release_for_comfy(memory_required: float, device: Any) -> bool:
    """ComfyUI needs `memory_required` bytes on `device` (a native model load, or "Unload models"):
    give back our pipeline if it lives there and that much is not free already."""
    import torch

    loaded = _loaded
    if loaded is None or torch.device(loaded.device).type != torch.device(device).type:
        return False
    free = comfy.free_device_memory(str(device))
    if free is not None and free >= memory_required:
        return False
    return release_pipeline()


_smart_memory_noted = False


def _note_smart_memory() -> None:
    global _smart_memory_noted
    if comfy.smart_memory_disabled() and not _smart_memory_noted:
        _smart_memory_noted = True
        log.warning("Qwen-Image-Edit: ComfyUI runs with --disable-smart-memory, which unloads every model after "
                    "each prompt, so this pipeline is loaded again for every run. Start ComfyUI without that flag "
                    "to keep it loaded.")


class _DropOptionalKernelWarning(logging.Filter):
    """bitsandbytes warns at import that it cannot download an optional CPU kernel (`kernels` package);
    the pack never downloads and its CPU NF4 works without it, so the line is only noise in every log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelWarning())


def install_comfy_hooks() -> None:
    """Let ComfyUI's memory manager (model loads, "Unload models", POST /free) evict our pipeline. Idempotent."""
    comfy.on_comfy_free_memory(release_for_comfy)


install_comfy_hooks()


# -- model sources ---------------------------------------------------------------------------------


def list_models() -> list[str]:
    """Combo values: diffusers folders under ComfyUI's models/diffusers paths, then the hub ids."""
    names: list[str] = []
    for root in comfy.diffusers_model_dirs():
        if not root.is_dir():
            continue
        for index in sorted(root.glob("*/model_index.json")) + sorted(root.glob("*/*/model_index.json")):
            name = index.parent.relative_to(root).as_posix()
            if name not in names:
                names.append(name)
    return names + [m for m in HUB_MODELS if m not in names]


DIFFUSION_MODEL_FOLDERS = ("diffusion_models", "unet")
TEXT_ENCODER_FOLDERS = ("text_encoders", "clip")
VAE_FOLDERS = ("vae",)
FILE_FOLDERS = {"transformer": DIFFUSION_MODEL_FOLDERS, "text_encoder": TEXT_ENCODER_FOLDERS, "vae": VAE_FOLDERS}
_FILE_LABELS = {"transformer": "Diffusion model", "text_encoder": "Text encoder", "vae": "VAE"}


def list_files(role: str) -> list[str]:
    """Combo values for a ComfyUI model file of `role`: the files of its folders that the pack can load,
    Qwen-named ones first."""
    from .comfy_files import SUFFIXES

    names = [n for n in comfy.model_files(*FILE_FOLDERS[role]) if n.lower().endswith(SUFFIXES[role])]
    return sorted(names, key=lambda n: "qwen" not in n.lower())


def resolve_file(role: str, name: str) -> Path:
    """A combo value or path to the file; a missing one is refused naming the folder it belongs in."""
    path = comfy.model_file_path(FILE_FOLDERS[role], name)
    if not path.is_file():
        folders = comfy.model_folder_paths(FILE_FOLDERS[role][0]) or [f"ComfyUI/models/{FILE_FOLDERS[role][0]}"]
        raise LoadError(f"{_FILE_LABELS[role]} file not found: {name}. Put it in {folders[0]} (or give its full path).")
    return path


def download_command(repo_id: str) -> str:
    """The download that puts `repo_id` where the loader looks: ComfyUI's models/diffusers (an absolute path,
    right from any folder) inside ComfyUI, the Hugging Face cache elsewhere (the command line)."""
    dirs = comfy.diffusers_model_dirs()
    if not dirs:
        return f"hf download {repo_id}"
    return f'hf download {repo_id} --local-dir "{dirs[0] / repo_id.split("/")[-1]}"'


def resolve_model_path(model: str) -> Path:
    """A combo value, path or hub id to a local folder. Never downloads."""
    for root in comfy.diffusers_model_dirs():
        # A hub id also finds the folder its download command creates: models/diffusers/<name>.
        for name in dict.fromkeys((model, model.rstrip("/").split("/")[-1] if _HUB_ID.match(model) else model)):
            if (root / name / "model_index.json").is_file():
                return root / name
    path = Path(model).expanduser()
    if path.exists() or not _HUB_ID.match(model):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here means "not in the local cache"
        raise LoadError(
            f"{model} is neither a folder under ComfyUI/models/diffusers nor in the Hugging Face cache, and "
            f"this pack never downloads ~58 GB inside a queue run. Download it first:\n  {download_command(model)}\n"
            + ("then refresh ComfyUI (press R) and pick it in the model list." if comfy.in_comfyui() else
               "then run the command again.")
        ) from None


# -- loading ---------------------------------------------------------------------------------------


def device_choices() -> list[str]:
    """The device combo: the fixed choices plus cuda:N when there are several GPUs.

    Only asks torch when it is already imported (ComfyUI imports it long before it lists node inputs),
    so `python cli.py --help` answers without loading it.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return list(DEVICES)

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return list(DEVICES) + ([f"cuda:{i}" for i in range(count)] if count > 1 else [])


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return comfy.default_device()
    kind = device.split(":")[0]
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "xpu": hasattr(torch, "xpu") and torch.xpu.is_available(),
    }[kind]
    if not available:
        raise LoadError(f"device={device!r} is not available on this machine. Choose 'auto' or 'cpu'.")
    return device


def _torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def dtype_kwarg() -> str:
    """diffusers 0.40 renamed `torch_dtype` to `dtype` (the old name warns); 0.37-0.39 know only the old."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"


def quantized_components(settings: LoadSettings) -> tuple[str, ...]:
    return tuple(settings.quantize.split("+"))


def check_quantization_supported(quantization: str, components: tuple[str, ...], device: str) -> None:
    """Refuse, before loading anything, a quantization this machine cannot do."""
    if quantization == "none":
        return
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoadError(
            f"quantization={quantization!r} needs bitsandbytes, which is not installed. Run "
            "`pip install bitsandbytes` in ComfyUI's Python, or choose quantization 'none'."
        )
    kind = device.split(":")[0]
    if kind == "mps":
        raise LoadError("bitsandbytes does not run on Apple MPS. Choose quantization 'none'.")
    if "transformer" in components and not (kind == "cuda" and torch.cuda.is_available()):
        raise LoadError(
            f"diffusers quantizes the transformer with bitsandbytes only on a CUDA GPU, and this run is on "
            f"{device}. Choose quantization 'none', or quantize only the text_encoder (which also works on CPU)."
        )


BITSANDBYTES_FORMATS = ("nf4", "fp4", "8bit", "bitsandbytes")


def check_offload_supported(offload: str, device: str) -> None:
    """Refuse, before any weights are read, an offload that cannot run on `device`."""
    if offload in ("model", "sequential") and device.split(":")[0] in ("cpu", "mps"):
        raise LoadError(
            f"offload={offload!r} moves weights between the CPU and a GPU, so it needs a GPU (CUDA or XPU), and this "
            f"run is on {device}. Choose offload 'none' (or 'auto')."
        )


def check_prequantized_supported(folder: ModelFolder, device: str) -> None:
    """diffusers loads a bitsandbytes-quantized transformer only on a CUDA GPU: say so before reading it."""
    info = folder.components.get("transformer")
    if info is not None and info.pre_quantized in BITSANDBYTES_FORMATS and device.split(":")[0] != "cuda":
        raise LoadError(
            f"{folder.path} holds a transformer already quantized with bitsandbytes ({info.pre_quantized}), which "
            f"diffusers loads only on an NVIDIA GPU, and this run is on {device}. Use the bf16 release of the model "
            "(or a GGUF / fp8 file with the ComfyUI files loader) here."
        )


def quantization_config(quantization: str, components: tuple[str, ...], compute_dtype: Any) -> Any:
    """diffusers' PipelineQuantizationConfig for bitsandbytes NF4 or 8-bit on `components`."""
    mapping = quantization_mapping(quantization, components, compute_dtype)
    if not mapping:
        return None
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping=mapping)


def quantization_mapping(quantization: str, components: tuple[str, ...], compute_dtype: Any) -> dict[str, Any]:
    """Each component's bitsandbytes config (diffusers' for the transformer, transformers' for the text encoder)."""
    if quantization == "none" or not components:
        return {}
    from diffusers import BitsAndBytesConfig as DiffusersBnb
    from transformers import BitsAndBytesConfig as TransformersBnb

    if quantization == "nf4":
        kwargs = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    else:
        kwargs = dict(load_in_8bit=True)
    mapping = {}
    if "transformer" in components:
        # The first block's image modulation is tiny and quality-sensitive; common practice keeps it.
        mapping["transformer"] = DiffusersBnb(**kwargs, llm_int8_skip_modules=["transformer_blocks.0.img_mod"])
    if "text_encoder" in components:
        # Only the language model: bitsandbytes' CPU kernels cannot take the vision tower's widths (its MLP
        # is 3420 wide), and common practice keeps the small vision tower (0.67B) in full precision anyway.
        mapping["text_encoder"] = TransformersBnb(**kwargs, llm_int8_skip_modules=["model.visual", "visual", "lm_head"])
    return mapping


def check_zero_cond_t(folder: ModelFolder, transformer: Any = None) -> None:
    """Fail loudly where the installed diffusers would silently run Edit-2511 without zero_cond_t."""
    if not folder.zero_cond_t:
        return
    import inspect

    import diffusers
    from diffusers import QwenImageTransformer2DModel

    supported = "zero_cond_t" in inspect.signature(QwenImageTransformer2DModel.__init__).parameters
    honoured = transformer is None or bool(getattr(transformer.config, "zero_cond_t", False))
    if not (supported and honoured):
        raise LoadError(
            f"{folder.path} is Qwen-Image-Edit-2511 (zero_cond_t), but diffusers "
            f"{diffusers.__version__} ignores that setting and would silently produce wrong edits. Upgrade: "
            "pip install -U 'diffusers>=0.37'"
        )


def _plan(settings: LoadSettings, folder: ModelFolder, device: str) -> Placement:
    per_param = BYTES_PER_PARAM[settings.precision]
    sizes = {name: folder.bytes_at(per_param, name) for name in folder.components}
    kind = device.split(":")[0]
    if kind in ("cuda", "xpu"):
        can_quantize = kind == "cuda" and _has_bitsandbytes()
        free = comfy.free_device_memory(device)
    else:
        can_quantize, free = False, None
    components = quantized_components(settings)
    already = {n for n, c in folder.components.items() if c.pre_quantized}
    if already:
        # A pre-quantized checkpoint is what it is: its size already reflects the quantization.
        components = tuple(c for c in components if c not in already)
    return plan_placement(sizes, free, kind, settings.quantization, settings.offload, components, can_quantize)


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _apply_offload(pipe: Any, offload: str, device: str) -> None:
    import torch

    kind = device.split(":")[0]
    if offload == "none":
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif offload == "group":
        pipe.enable_group_offload(
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=kind == "cuda",
            exclude_modules=["vae"],
        )


def drop_unused_lm_head(pipe: Any) -> None:
    """Replace the text encoder's lm_head, which the pipeline never uses, with an identity.

    The pipeline reads only the last hidden state; the 152k-vocabulary head (1.1 GB in bf16, and a
    logits matmul over every prompt token) is dead weight. Unless its weight is tied to the input
    embedding, dropping it frees that memory and changes no output.
    """
    import torch

    encoder = pipe.text_encoder
    head = getattr(encoder, "lm_head", None)
    if head is None or isinstance(head, torch.nn.Identity):
        return
    embeddings = encoder.get_input_embeddings()
    if embeddings is not None and getattr(head, "weight", None) is getattr(embeddings, "weight", None):
        return
    encoder.lm_head = torch.nn.Identity()


def bridge_vae_dtype(pipe: Any, compute_dtype: Any) -> None:
    """Let a VAE kept in its own precision (vae_precision) encode and decode in it.

    The pipeline hands `vae.encode` images in the pipeline's dtype and uses the latents it gets back in
    that dtype; it already casts latents to `vae.dtype` before decoding. So the encoder casts its input
    to the VAE's dtype, and the latent distribution leaves in the pipeline's dtype.
    """
    vae = pipe.vae
    vae_dtype = vae.dtype
    if vae_dtype == compute_dtype:
        return
    vae.encoder.register_forward_pre_hook(lambda _m, args: tuple(
        a.to(vae_dtype) if hasattr(a, "is_floating_point") and a.is_floating_point() else a for a in args))
    vae.quant_conv.register_forward_hook(lambda _m, _args, out: out.to(compute_dtype))


def _oom_message(settings: LoadSettings, placement: Placement, device: str) -> str:
    free = comfy.free_device_memory(device)
    free_txt = f"{free / 2**30:.1f} GiB free" if free is not None else "free memory unknown"
    return (
        f"Out of memory on {device} while loading {settings.model} (quantization={placement.quantization}, "
        f"offload={placement.offload}, needs ~{placement.needed_bytes / 2**30:.1f} GiB; {free_txt}). "
        "Choose quantization 'nf4' and offload 'model' (16-24 GB cards) or 'group' (8-12 GB cards), "
        "or leave both on 'auto'; close other programs using the GPU."
    )


def _load(settings: LoadSettings) -> LoadedPipeline:
    import torch

    start = time.perf_counter()
    pipe = None
    device, placement = settings.device, Placement("unplanned", "unplanned", "", 0)
    try:
        device = resolve_device(settings.device)
        files = None
        if settings.from_files:
            folder, files = from_files.inspect_files(
                resolve_file("transformer", settings.model), resolve_file("text_encoder", settings.text_encoder),
                resolve_file("vae", settings.vae))
            source = from_files.find_config_source("Edit-2511" if folder.zero_cond_t else "Edit-2509")
        else:
            folder = inspect_model_folder(resolve_model_path(settings.model))
        if folder.pipeline_class != "QwenImageEditPlusPipeline":
            raise LoadError(
                f"{folder.path} is a {folder.pipeline_class}; this pack runs QwenImageEditPlusPipeline "
                "models (Qwen-Image-Edit-2509 and -2511)."
            )
        check_zero_cond_t(folder)
        check_prequantized_supported(folder, device)
        placement = _plan(settings, folder, device)
        components = tuple(c for c in quantized_components(settings) if not folder.components[c].pre_quantized)
        if placement.quantization != "none":
            for name in set(quantized_components(settings)) - set(components):
                log.info("Qwen-Image-Edit: %s is already %s; %s is not applied on top", name,
                         folder.components[name].pre_quantized, placement.quantization)
        check_quantization_supported(placement.quantization, components, device)
        check_offload_supported(placement.offload, device)
        log.info("Qwen-Image-Edit: loading %s on %s: %s", folder.path, device, placement.reason)
        _note_smart_memory()
        # Only now, with the source checked: a typo must not unload the user's other models for nothing.
        comfy.free_comfy_memory(placement.needed_bytes or sum(folder.bytes_at(BYTES_PER_PARAM[settings.precision], n)
                                                              for n in folder.components), device)

        from diffusers import QwenImageEditPlusPipeline

        dtype = _torch_dtype(settings.precision)
        dtypes: Any = dtype
        if settings.vae_precision not in ("same", settings.precision):
            dtypes = {"default": dtype, "vae": _torch_dtype(settings.vae_precision)}
        if files is not None:
            vae_dtype = dtype if settings.vae_precision == "same" else _torch_dtype(settings.vae_precision)
            pipe = from_files.build_pipeline(files, source, dtype, vae_dtype,
                                             quantization_mapping(placement.quantization, components, dtype))
        else:
            kwargs: dict[str, Any] = {dtype_kwarg(): dtypes, "use_safetensors": True, "local_files_only": True}
            qconfig = quantization_config(placement.quantization, components, dtype)
            if qconfig is not None:
                kwargs["quantization_config"] = qconfig
            pipe = QwenImageEditPlusPipeline.from_pretrained(str(folder.path), **kwargs)
        check_zero_cond_t(folder, pipe.transformer)
        drop_unused_lm_head(pipe)
        bridge_vae_dtype(pipe, dtype)
        _apply_offload(pipe, placement.offload, device)
        pipe.set_progress_bar_config(disable=True)
        seconds = time.perf_counter() - start
        log.info("Qwen-Image-Edit: loaded in %.1f s", seconds)
        return LoadedPipeline(pipe, settings, folder, device, placement, seconds)
    except BaseException as exc:  # noqa: BLE001 - also KeyboardInterrupt/cancel: never keep a partial pipeline
        pipe = None
        traceback.clear_frames(exc.__traceback__)
        comfy.empty_cache()
        if isinstance(exc, torch.OutOfMemoryError):
            raise LoadError(_oom_message(settings, placement, device)) from None
        if isinstance(exc, ModelFolderError):
            raise LoadError(str(exc)) from None
        if isinstance(exc, (LoadError, KeyboardInterrupt, SystemExit)) or not isinstance(exc, Exception):
            raise
        raise LoadError(f"Loading {settings.model} failed: {type(exc).__name__}: {exc}") from exc


__all__ = [
    "LoadError", "LoadSettings", "LoadedPipeline", "PipeHandle", "get_pipeline", "release_pipeline",
    "current_pipeline", "list_files", "list_models", "resolve_file", "resolve_model_path",
]

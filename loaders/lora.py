"""LoRAs on the cached pipeline, and the scheduler the Lightning LoRAs need.

The LoRA node never touches the pipeline: it appends a `LoraSpec` to the `PipeHandle`. Just before
an edit, `apply_loras` makes the pipeline's adapters exactly the handle's list, with diffusers' public
LoRA API (`lora_state_dict` to check a file, `load_lora_weights`, `set_adapters` / `delete_adapters` /
`unload_lora_weights`):

* an adapter already loaded is reused, so changing a strength or the order costs a `set_adapters`;
* an adapter no longer on the handle is deleted, so nothing leaks from one run into the next;
* with no LoRA (or only strength-0 ones) the PEFT layers are removed altogether and the transformer
  is the base model again, bit for bit;
* a file is checked against the transformer (every weight must name one of its layers, with the
  layer's shape) before anything is loaded, and a failure restores the previous adapters.

The base model is never reloaded: the pipeline cache is keyed by `LoadSettings` only.

Lightning LoRAs (lightx2v, 4 and 8 steps) were distilled with a fixed shift of 3 and no terminal
shift, so while one is active the pipeline runs `FlowMatchEulerDiscreteScheduler` with
`LIGHTNING_SCHEDULER_OVERRIDES` (the config from the diffusers Qwen-Image docs); otherwise the
model's own scheduler object is put back.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..utils import comfy
from ..utils.errors import QwenEditError
from .weights import PICKLE_SUFFIXES, ModelFolderError, read_safetensors_header

if TYPE_CHECKING:
    from .pipeline import LoadedPipeline

log = logging.getLogger("qwen_image_edit")

LIGHTNING_CHOICES = ("auto", "off", "4-step", "8-step")
LORA_SUFFIX = ".safetensors"

#: Lightning's scheduler, from the diffusers Qwen-Image docs / lightx2v model card ("we use shift=3 in
#: distillation"): a constant exponential shift of log(3) whatever the image size, no terminal stretch.
LIGHTNING_SCHEDULER_OVERRIDES: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

_LIGHTNING_WORD = re.compile(r"lightning", re.IGNORECASE)
_STEP_COUNT = re.compile(r"(?<![0-9])([0-9]{1,2})[-_ ]?steps?(?![a-z])", re.IGNORECASE)
# A LoRA weight key (after diffusers' conversion): "<module path>.<lora part>[.weight|.bias]".
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up|lora_magnitude_vector|lokr_\w+)(?:\.|$)")
_PREFIX = "transformer."


class LoraError(QwenEditError, ValueError):
    """A LoRA file cannot be used; the message names the file and says what to do."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA on a pipe link: which file, how strong, whether it is a Lightning LoRA.

    `identity` (size and modification time when the node ran) makes a replaced file a different spec,
    so ComfyUI re-runs the sampler and the adapter is reloaded.
    """

    path: str
    strength: float = 1.0
    lightning: str = "auto"
    identity: str = ""

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def lightning_steps(self) -> int | None:
        """4 or 8 for a Lightning LoRA (chosen, or recognised from the file name), else None."""
        if self.lightning == "off":
            return None
        if self.lightning != "auto":
            return int(self.lightning.split("-")[0])
        return lightning_steps_from_name(self.name)


@dataclass(frozen=True)
class AppliedLoras:
    """What `apply_loras` left active: adapter names with their weights, and the Lightning step count."""

    adapters: tuple[tuple[str, float], ...] = ()
    lightning_steps: int | None = None
    lightning_name: str | None = None


@dataclass
class LoraState:
    """Kept in `LoadedPipeline.lora`: what the pipeline's transformer carries right now."""

    loaded: dict[str, LoraSpec] = field(default_factory=dict)  # adapter name -> spec it was loaded from
    active: tuple[tuple[str, float], ...] = ()
    base_scheduler: Any = None  # the model's own scheduler while a Lightning one is swapped in


# -- specs -----------------------------------------------------------------------------------------


def lightning_steps_from_name(name: str) -> int | None:
    """The step count of a Lightning LoRA recognised by its file name, e.g.
    'Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors' -> 4; None when it is not one."""
    if not _LIGHTNING_WORD.search(name):
        return None
    match = _STEP_COUNT.search(name)
    if match is None:
        log.warning("Qwen-Image-Edit: %s looks like a Lightning LoRA but its name gives no step count; choose "
                    "lightning '4-step' or '8-step' on the LoRA node to use the Lightning scheduler.", name)
        return None
    return int(match.group(1))


def list_lora_files() -> list[str]:
    """Combo values: the .safetensors files in ComfyUI's loras folders (other formats are refused)."""
    return [name for name in comfy.lora_files() if name.lower().endswith(LORA_SUFFIX)]


def file_identity(path: str | os.PathLike) -> str:
    """Size and modification time: changes when the file is replaced, costs one stat."""
    st = os.stat(path)
    return f"{st.st_size}-{st.st_mtime_ns}"


def resolve_lora_path(name: str) -> Path:
    """A combo value (ComfyUI's loras folders) or a path to an existing .safetensors LoRA file."""
    if not name or not str(name).strip():
        raise LoraError("No LoRA chosen. Put .safetensors LoRA files in ComfyUI/models/loras and pick one.")
    path = comfy.lora_path(str(name))
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise LoraError(
            f"{path.name} is a {suffix} file. Only .safetensors LoRAs are loaded: pickled formats can run code "
            "when they are opened. Download the .safetensors version of this LoRA."
        )
    if suffix != LORA_SUFFIX:
        raise LoraError(f"{path.name} is not a .safetensors file; LoRAs must be .safetensors files.")
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {name} (looked in ComfyUI/models/loras and as a path).")
    return path.resolve()


def read_header(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its header only."""
    try:
        return list(read_safetensors_header(path).tensors)
    except (OSError, ModelFolderError) as exc:
        raise LoraError(f"{path.name} is not a valid safetensors file ({exc}). Re-download it.") from None


def _refuse_lokr(name: str, keys: Any) -> None:
    if any(".lokr_" in k for k in keys):
        raise LoraError(f"{name} is a LoKr (LyCORIS) adapter; diffusers' Qwen-Image loader takes only LoRA weights "
                        "(lora_A/lora_B or lora_down/lora_up). Choose a LoRA version of it.")


def make_spec(name: str, strength: float = 1.0, lightning: str = "auto") -> LoraSpec:
    """Check a LoRA file cheaply (path, format, that it holds LoRA weights) and describe it for the pipe."""
    if lightning not in LIGHTNING_CHOICES:
        raise LoraError(f"lightning must be one of {', '.join(LIGHTNING_CHOICES)}, not {lightning!r}.")
    if not math.isfinite(strength):
        raise LoraError("The LoRA strength must be a finite number (1.0 is the LoRA as trained).")
    path = resolve_lora_path(name)
    keys = read_header(path)
    _refuse_lokr(path.name, keys)
    if not any(("lora" in k or "lokr" in k) for k in keys):
        raise LoraError(
            f"{path.name} holds no LoRA weights ({len(keys)} tensors, none named lora_A/lora_B/lora_down/lora_up): "
            "it is probably a full model checkpoint, not a LoRA."
        )
    return LoraSpec(str(path), float(strength), lightning, file_identity(path))


def adapter_name(path: str, identity: str) -> str:
    """A stable PEFT adapter name for one version of one file (PEFT names cannot hold dots)."""
    digest = hashlib.sha1(f"{os.path.normcase(path)}|{identity}".encode()).hexdigest()[:12]
    return f"lora_{digest}"


# -- applying to a pipeline ------------------------------------------------------------------------


def _state(loaded: LoadedPipeline) -> LoraState:
    if loaded.lora is None:
        loaded.lora = LoraState()
    return loaded.lora


def _wanted(loras: Sequence[LoraSpec]) -> dict[str, tuple[LoraSpec, float]]:
    """Adapter name -> (spec, weight) in chain order. Strength 0 drops a LoRA; the same file twice adds up."""
    wanted: dict[str, tuple[LoraSpec, float]] = {}
    for spec in loras:
        try:
            identity = file_identity(spec.path)
        except OSError:
            raise LoraError(f"LoRA file not found: {spec.path}. Was it moved or deleted?") from None
        name = adapter_name(spec.path, identity)
        weight = wanted[name][1] + spec.strength if name in wanted else spec.strength
        wanted[name] = (spec, weight)
    return {name: (spec, weight) for name, (spec, weight) in wanted.items() if weight != 0}


def _require_peft() -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise LoraError("LoRAs need the peft package, which is not installed. Run `pip install peft` in ComfyUI's "
                        "Python, then restart ComfyUI.")


def read_lora(pipe: Any, spec: LoraSpec) -> tuple[dict[str, Any], dict | None]:
    """The file's weights in diffusers' key format, checked against the pipeline's transformer.

    diffusers' `lora_state_dict` converts the non-diffusers formats (ComfyUI `diffusion_model.`,
    kohya `lora_unet_`, lightx2v `lora_down`/`lora_up` with `.alpha`). Raises `LoraError` naming the file
    when any weight is for a layer this transformer does not have or has another shape.
    """
    try:
        state_dict, metadata = pipe.lora_state_dict(
            spec.path, return_lora_metadata=True, use_safetensors=True, local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001 - any failure to read or convert means "not a usable LoRA"
        detail = str(exc) if len(str(exc)) <= 300 else str(exc)[:300] + "..."
        raise LoraError(f"{spec.name} could not be read as a Qwen-Image LoRA ({type(exc).__name__}: {detail}). It is "
                        "probably a LoRA for another model; choose one made for Qwen-Image-Edit (or Qwen-Image).") from None
    if not state_dict:
        raise LoraError(f"{spec.name} holds no LoRA weights for the Qwen-Image transformer.")
    modules = dict(pipe.transformer.named_modules())
    if not any(k.startswith(_PREFIX) for k in state_dict):
        # A bare PEFT state dict (get_peft_model_state_dict saved as is): diffusers would skip every key
        # silently because it keeps only "transformer."-prefixed ones. Add the prefix; check_matches below
        # still refuses the file unless every name is a layer of this transformer.
        state_dict = {_PREFIX + k: v for k, v in state_dict.items()}
    _refuse_lokr(spec.name, state_dict)
    check_matches(state_dict, modules, spec.name, read_header(Path(spec.path)))
    return state_dict, metadata


def check_matches(state_dict: dict[str, Any], modules: dict[str, Any], file_name: str,
                  file_keys: list[str] | None = None) -> None:
    """Refuse a LoRA with any weight for a layer the transformer lacks, or of the wrong shape.

    `file_keys` (the file's own names) are what a refusal cites when diffusers' conversion renamed them:
    a converter for another model's names can turn them into nonsense.
    """
    unknown: list[str] = []
    misfit: list[str] = []
    for key, value in state_dict.items():
        match = _LORA_KEY.match(key[len(_PREFIX):]) if key.startswith(_PREFIX) else None
        module = modules.get(match["module"]) if match else None
        if module is None:
            unknown.append(key)
            continue
        shape = tuple(getattr(value, "shape", ()))
        if match["part"] in ("lora_A", "lora_down", "lora_B", "lora_up") and len(shape) != 2:
            misfit.append(f"{match['module']} gets a {len(shape)}-D weight {list(shape)} where a LoRA has a matrix")
            continue
        if match["part"] in ("lora_A", "lora_down"):
            expected, got, what = getattr(module, "in_features", None), shape[1], "inputs"
        elif match["part"] in ("lora_B", "lora_up"):
            expected, got, what = getattr(module, "out_features", None), shape[0], "outputs"
        else:
            continue
        if expected is not None and expected != got:
            misfit.append(f"{match['module']} has {expected} {what}, the LoRA {got}")
    if unknown:
        cited = [k.removeprefix(_PREFIX) for k in unknown]
        if file_keys and not any(c in k for c in cited[:3] for k in file_keys):
            cited = file_keys
        examples = ", ".join(cited[:3])
        raise LoraError(
            f"{file_name} is not a Qwen-Image LoRA: {len(unknown)} of its {len(state_dict)} weights are for layers "
            f"the Qwen-Image transformer does not have (e.g. {examples}). It is probably for another model; "
            "choose a LoRA made for Qwen-Image-Edit (or Qwen-Image)."
        )
    if misfit:
        raise LoraError(
            f"{file_name} does not fit this model's layer sizes ({'; '.join(misfit[:3])}). It was made for a model "
            "of another size; choose a LoRA made for Qwen-Image-Edit (or Qwen-Image)."
        )


def _load_adapter(pipe: Any, spec: LoraSpec, name: str) -> None:
    """diffusers' `load_lora_weights`, given what `read_lora` checked.

    A file with diffusers' LoRA config in its header (alpha, target modules: what diffusers' own
    `save_lora_weights` writes) is given by path, read a second time: that config travels only with the
    file, and a state dict passed in memory would load at scale 1 instead of alpha / r. Any other file
    (ComfyUI, kohya, lightx2v, bare PEFT) is given as the checked state dict, already converted and
    prefixed, so it is read once.
    """
    state_dict, metadata = read_lora(pipe, spec)
    own_format = metadata is not None and all(k.startswith(_PREFIX) for k in read_header(Path(spec.path)))
    source: str | dict[str, Any] = spec.path if own_format else state_dict
    if metadata is not None and not own_format:
        log.warning("Qwen-Image-Edit: %s has diffusers' LoRA config in its header but not diffusers' key names; "
                    "loading it without that config.", spec.name)
    del state_dict
    with warnings.catch_warnings():
        # PEFT warns on every adapter after the first that "multiple adapters" are present: here that is the point.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        pipe.load_lora_weights(source, adapter_name=name, use_safetensors=True, local_files_only=True)


def _has_peft_layers(transformer: Any) -> bool:
    return bool(getattr(transformer, "peft_config", None)) or any(
        hasattr(m, "base_layer") and hasattr(m, "lora_A") for m in transformer.modules()
    )


def _activate(pipe: Any, state: LoraState, active: tuple[tuple[str, float], ...]) -> None:
    if active:
        pipe.set_adapters([n for n, _ in active], [w for _, w in active])
    elif state.loaded or _has_peft_layers(pipe.transformer):
        # unload_lora_weights removes the PEFT wrapper layers too: the transformer is the base model again.
        pipe.unload_lora_weights()
        state.loaded.clear()
    state.active = active


def apply_loras(loaded: Any, loras: Sequence[LoraSpec]) -> AppliedLoras:
    """Make `loaded.pipe` carry exactly `loras` (in order, with their strengths) and pick the scheduler.

    Loads only adapters not already loaded, deletes those no longer wanted, never reloads the base model.
    On any failure the adapters and scheduler are left exactly as they were.
    """
    pipe = loaded.pipe
    state = _state(loaded)
    wanted = _wanted(tuple(loras))
    active = tuple((name, float(weight)) for name, (_, weight) in wanted.items())
    if active != state.active or set(state.loaded) != set(wanted):
        if wanted:
            _require_peft()
        newly: list[str] = []
        try:
            for name, (spec, _) in wanted.items():
                if name not in state.loaded:
                    log.info("Qwen-Image-Edit: loading LoRA %s", spec.name)
                    _load_adapter(pipe, spec, name)
                    newly.append(name)
                    state.loaded[name] = spec
        except BaseException:
            if newly:
                pipe.delete_adapters(newly)
                for name in newly:
                    state.loaded.pop(name, None)
            _activate(pipe, state, state.active)
            raise
        stale = [name for name in state.loaded if name not in wanted]
        if stale and wanted:
            pipe.delete_adapters(stale)
            for name in stale:
                del state.loaded[name]
        _activate(pipe, state, active)
        if active:
            log.info("Qwen-Image-Edit: LoRAs %s", ", ".join(f"{wanted[n][0].name} x{w:g}" for n, w in active))
    lightning = [(spec.lightning_steps, spec.name) for spec, _ in wanted.values() if spec.lightning_steps]
    if len({steps for steps, _ in lightning}) > 1:
        log.warning("Qwen-Image-Edit: several Lightning LoRAs (%s); using %s's step count.",
                    ", ".join(n for _, n in lightning), lightning[0][1])
    steps, name = lightning[0] if lightning else (None, None)
    use_lightning_scheduler(loaded, steps is not None)
    return AppliedLoras(active, steps, name)


# -- scheduler -------------------------------------------------------------------------------------


def lightning_scheduler(base: Any) -> Any:
    """A FlowMatchEulerDiscreteScheduler with the model's config plus Lightning's shift settings."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config({**dict(base.config), **LIGHTNING_SCHEDULER_OVERRIDES})


def use_lightning_scheduler(loaded: Any, on: bool) -> None:
    """Swap Lightning's scheduler in, or put the model's own scheduler object back."""
    state = _state(loaded)
    pipe = loaded.pipe
    if on and state.base_scheduler is None:
        state.base_scheduler = pipe.scheduler
        pipe.scheduler = lightning_scheduler(pipe.scheduler)
        log.info("Qwen-Image-Edit: Lightning LoRA active: using the Lightning scheduler (shift 3, exponential)")
    elif not on and state.base_scheduler is not None:
        pipe.scheduler = state.base_scheduler
        state.base_scheduler = None


def loaded_adapters(loaded: Any) -> dict[str, LoraSpec]:
    """Adapter name -> spec of the LoRAs the pipeline carries now (for tests and diagnostics)."""
    return dict(_state(loaded).loaded)


__all__ = [
    "AppliedLoras", "LIGHTNING_CHOICES", "LIGHTNING_SCHEDULER_OVERRIDES", "LoraError", "LoraSpec", "adapter_name",
    "apply_loras", "check_matches", "file_identity", "lightning_scheduler", "lightning_steps_from_name",
    "list_lora_files", "loaded_adapters", "make_spec", "read_header", "read_lora", "resolve_lora_path",
    "use_lightning_scheduler",
]

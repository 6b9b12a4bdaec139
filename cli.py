#!/usr/bin/env python3
"""Qwen-Image-Edit from the terminal, through the pack's own ComfyUI nodes.

    python cli.py edit --image in.png --prompt "Replace the sky with a sunset" --output out.png
    python cli.py batch --manifest edits.csv --output out/ [--gpus all | --workers N | --ray]
    python cli.py doctor [--json] [--model PATH_OR_HUB_ID] [--comfyui PATH]
    python cli.py selftest

Run it with a Python that has the pack's requirements (ComfyUI's own Python has them once the pack is
installed). `edit` loads the pack exactly as ComfyUI does and runs the same loader and sampler code with
the same defaults: every option and its default is read from the nodes' INPUT_TYPES, so the command
line cannot drift from the nodes. Nothing is ever downloaded: `--model` is a local diffusers folder, a
folder name under ComfyUI/models/diffusers (when the pack sits in ComfyUI/custom_nodes), or a hub id
already in the Hugging Face cache.

Only argparse and the pack's light modules load at start; torch, diffusers and bitsandbytes are
imported by the command that needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent
#: The package name the pack is imported under (ComfyUI uses the folder name; any name works). The
#: test suite uses the same one, so in-process tests and the command line share one pipeline cache.
PACK_NAME = "qwen_edit_pack"
#: The Hugging Face libraries' offline switches, set by every application beside the pack (this CLI, the
#: tests, the benchmarks) before those libraries are imported: nothing may ever be downloaded.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TELEMETRY": "1",
}
LOADER_NODE = "QwenImageEditLoader"
FILES_LOADER_NODE = "QwenImageEditFilesLoader"
SAMPLER_NODE = "QwenImageEditSampler"
SELFTEST_PROMPT = "Make the sky purple"

log = logging.getLogger("qwen_image_edit")


class CliError(Exception):
    """A problem the user can fix; printed as one message, without a traceback."""


# --------------------------------------------------------------------------------------------------
# The pack, imported the way ComfyUI imports a custom node folder
# --------------------------------------------------------------------------------------------------


def load_pack(name: str = PACK_NAME) -> types.ModuleType:
    """Import this folder's ``__init__.py`` as package `name`, as ComfyUI's nodes.load_custom_node does.

    The one implementation: the test suite and the benchmarks import the pack through it too.
    """
    existing = sys.modules.get(name)
    if existing is not None:
        return existing
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec: the pack's relative imports look it up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def submodule(pack: types.ModuleType, name: str) -> types.ModuleType:
    return importlib.import_module(f"{pack.__name__}.{name}")


def node_inputs(node: type) -> dict[str, tuple[Any, dict]]:
    """A node's inputs, required then optional, as name -> (type, options), in INPUT_TYPES order."""
    spec = node.INPUT_TYPES()
    out: dict[str, tuple[Any, dict]] = {}
    for category in ("required", "optional"):
        for name, entry in spec.get(category, {}).items():
            out[name] = (entry[0], entry[1] if len(entry) > 1 else {})
    return out


def is_widget(kind: Any) -> bool:
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")


def node_defaults(node: type) -> dict[str, Any]:
    """Each widget input's default, as ComfyUI's frontend fills a freshly added node."""
    defaults = {}
    for name, (kind, options) in node_inputs(node).items():
        if is_widget(kind):
            defaults[name] = options.get("default", kind[0] if isinstance(kind, list) else None)
    return defaults


# --------------------------------------------------------------------------------------------------
# Options generated from the nodes
# --------------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _ranged(kind: str, name: str, options: dict) -> Callable[[str], Any]:
    cast = int if kind == "INT" else float
    low, high = options.get("min"), options.get("max")

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_flag(name)} takes {'an integer' if cast is int else 'a number'}, "
                                             f"not {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{_flag(name)} must be between {low} and {high}, not {text}")
        return value

    return parse


def _help(options: dict, extra: str = "") -> str:
    text = (options.get("tooltip") or "").replace("%", "%%")
    default = options.get("default")
    if default is not None and default != "":
        shown = repr(str(default).replace("%", "%%")) if isinstance(default, str) else default
        text += f" (default: {shown})"
    return (text + extra).strip()


def add_node_options(parser: argparse.ArgumentParser, node: type, skip: tuple[str, ...] = (),
                     overrides: dict[str, dict] | None = None) -> list[str]:
    """One option per widget input of `node`, with its type, range, choices and default. Returns the names."""
    overrides = overrides or {}
    names = []
    for name, (kind, options) in node_inputs(node).items():
        if name in skip or not is_widget(kind):
            continue
        kwargs: dict[str, Any] = {"dest": name, "default": options.get("default"), "help": _help(options)}
        if isinstance(kind, list):
            kwargs["choices"] = list(kind)
            kwargs.setdefault("default", kind[0])
        elif kind in ("INT", "FLOAT"):
            kwargs["type"] = _ranged(kind, name, options)
            kwargs["metavar"] = kind
        elif kind == "BOOLEAN":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = "TEXT"
        kwargs.update(overrides.get(name, {}))
        parser.add_argument(_flag(name), **kwargs)
        names.append(name)
    return names


def _device_type(node: type) -> Callable[[str], str]:
    """--device accepts what the loader's VALIDATE_INPUTS accepts (auto, cuda, cuda:1, cpu, ...)."""

    def parse(text: str) -> str:
        verdict = node.VALIDATE_INPUTS(device=text)
        if verdict is not True:
            raise argparse.ArgumentTypeError(str(verdict))
        return text

    return parse


def add_model_options(parser: argparse.ArgumentParser, pack: types.ModuleType) -> None:
    """The loader node's options and the ComfyUI-files options, shared by `edit` and `batch`."""
    loader_node = pack.NODE_CLASS_MAPPINGS[LOADER_NODE]
    model_help = ("a diffusers folder, a folder name under ComfyUI/models/diffusers, or a hub id already in the "
                  "Hugging Face cache. Nothing is downloaded.")
    load = parser.add_argument_group("model (the loader node's settings)")
    add_node_options(load, loader_node, overrides={
        "model": {"choices": None, "metavar": "PATH_OR_HUB_ID", "help": model_help + " (default: %(default)s)"},
        "device": {"choices": None, "type": _device_type(loader_node), "metavar": "DEVICE",
                   "help": _help(node_inputs(loader_node)["device"][1])},
    })
    files = parser.add_argument_group(
        "ComfyUI model files (instead of a diffusers folder: give --model the diffusion model file)")
    files.add_argument("--text-encoder", type=Path, metavar="PATH",
                       help="the Qwen2.5-VL text encoder file, e.g. models/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors")
    files.add_argument("--vae", type=Path, metavar="PATH",
                       help="the Qwen-Image VAE file, e.g. models/vae/qwen_image_vae.safetensors")


def build_parser(pack: types.ModuleType) -> argparse.ArgumentParser:
    loader_node = pack.NODE_CLASS_MAPPINGS[LOADER_NODE]
    sampler_node = pack.NODE_CLASS_MAPPINGS[SAMPLER_NODE]
    parser = argparse.ArgumentParser(
        prog="python cli.py",
        description="Qwen-Image-Edit (diffusers) from the terminal, with the same nodes and defaults as in ComfyUI.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{edit,batch,doctor,selftest}")

    edit = commands.add_parser(
        "edit", help="edit an image (the loader and sampler nodes, run from the terminal)",
        description="Edit one to three images with a text instruction. Options and defaults are the nodes' own; "
                    "Ctrl-C cancels at the end of the current step.",
    )
    images = edit.add_argument_group("images")
    for name, (kind, options) in node_inputs(sampler_node).items():
        if kind == "IMAGE":
            required = name in sampler_node.INPUT_TYPES().get("required", {})
            images.add_argument(_flag(name), dest=name, required=required, type=Path, metavar="PATH",
                                help=(options.get("tooltip") or "") + " (any image file Pillow reads)")
    if "mask" in node_inputs(sampler_node):
        images.add_argument("--mask", type=Path, metavar="PATH",
                            help="edit only where this mask is white (a grayscale image the size or shape of "
                                 "--image; an image with alpha: transparent = edit, as ComfyUI's Load Image). "
                                 "Every pixel outside it stays the input's; see --grow, --feather, --context")
    images.add_argument("--output", "-o", required=True, type=Path, metavar="PATH",
                        help="where to write the result (PNG; several results are numbered: out_1.png, out_2.png, ...)")
    add_model_options(edit, pack)
    sample = edit.add_argument_group("edit (the sampler node's settings)")
    add_node_options(sample, sampler_node, overrides={"prompt": {"required": True, "default": None}})

    batch = commands.add_parser(
        "batch", help="edit many images from a manifest (CSV/JSONL) or a folder; resumable; several GPUs or Ray",
        description="One edit per manifest row (or per image in --input-dir, with --prompt), one PNG per row with its "
                    "settings in the PNG text, and a results JSONL. A re-run skips rows already done with the same "
                    "settings; a bad row is recorded as failed and the rest go on. Ctrl-C stops after the current "
                    "step; finished rows are kept.",
    )
    batch_module().add_arguments(batch, pack)

    doctor = commands.add_parser(
        "doctor", help="what this machine can do and the loader settings it needs",
        description="Versions, zero_cond_t support, GPUs and free memory, whether NF4/8-bit work here, the "
                    "Qwen-Image-Edit single files in ComfyUI's model folders (storage, variant, size), and the "
                    "loader settings recommended for this machine with the memory each needs (from those files' "
                    "real sizes when a full set is found).",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--model", metavar="PATH_OR_HUB_ID",
                        help="read the component sizes from this local diffusers folder (instead of the ComfyUI files "
                             "found, or Edit-2511's published sizes)")
    precision = node_inputs(loader_node)["precision"]
    doctor.add_argument("--precision", choices=list(precision[0]), default=precision[1].get("default"),
                        help="weight precision to plan for (default: %(default)s)")
    doctor.add_argument("--no-quantization-check", dest="check_quantization", action="store_false",
                        help="skip quantizing a test layer with bitsandbytes")
    doctor.add_argument("--comfyui", metavar="PATH", type=Path,
                        help="a ComfyUI install (or its models folder) whose diffusion_models, text_encoders and vae "
                             "files to list (default: the ComfyUI this pack sits in, if any)")

    selftest = commands.add_parser(
        "selftest", help="prove the install: load and edit with a tiny random model built on the spot",
        description="Builds a tiny random-weight Qwen-Image-Edit-2511 (real diffusers/transformers classes, ~2 MB, "
                    "nothing downloaded), loads it through the loader node and edits through the sampler node. "
                    "The output is noise; a pass proves that loading, the text encoder, the transformer and the "
                    "VAE all run here. Loader options can be given to test e.g. NF4 or offload on a GPU.",
    )
    test_load = selftest.add_argument_group("loader settings to test")
    add_node_options(test_load, loader_node, skip=("model",), overrides={
        "device": {"choices": None, "type": _device_type(loader_node), "metavar": "DEVICE",
                   "help": _help(node_inputs(loader_node)["device"][1])},
    })
    selftest.add_argument("--steps", type=_ranged("INT", "steps", {"min": 2, "max": 50}), default=2,
                          help="denoising steps (default: %(default)s)")
    selftest.add_argument("--keep", type=Path, metavar="DIR",
                          help="keep the tiny model (DIR/Qwen-Image-Edit-2511-tiny, a diffusers folder) and write "
                               "input.png and output.png there: link the folder into ComfyUI/models/diffusers to try "
                               "the whole flow in ComfyUI without the 58 GB model")
    return parser


# --------------------------------------------------------------------------------------------------
# Images in and out, as ComfyUI's LoadImage and SaveImage do it
# --------------------------------------------------------------------------------------------------


def load_image(path: Path) -> Any:
    """An image file as a ComfyUI IMAGE `[1, H, W, 3]` float32, exactly as ComfyUI 0.8.0's LoadImage.

    LoadImage applies the EXIF orientation, converts to RGB (alpha is dropped, not composited) and divides
    by 255. Multi-frame files give their first frame.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise CliError(f"image not found: {path}")
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode == "I":
                image = image.point(lambda v: v * (1 / 255))
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CliError(f"cannot read {path} as an image: {exc}") from None
    return torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None]


def load_mask(path: Path) -> Any:
    """A mask file as a ComfyUI MASK `[1, H, W]` float32, 1 = edit (`edit --mask` and batch's `mask` column).

    A grayscale (or RGB) image: white = edit (RGB is converted to grayscale). An image with an alpha
    channel: 1 - alpha, as ComfyUI's Load Image makes its MASK output (transparent = edit).
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise CliError(f"mask not found: {path}")
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if "A" in image.getbands():
                mask = 1.0 - np.array(image.getchannel("A")).astype(np.float32) / 255.0
            elif image.mode == "P" and "transparency" in image.info:
                mask = 1.0 - np.array(image.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0
            else:
                mask = np.array(image.convert("L")).astype(np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise CliError(f"cannot read the mask {path} as an image: {exc}") from None
    return torch.from_numpy(mask)[None]


def output_paths(output: Path, count: int) -> list[Path]:
    """`out.png` for one result; `out_1.png`, `out_2.png`, ... for several (zero-padded past 9)."""
    if count == 1:
        return [output]
    width = len(str(count))
    return [output.with_name(f"{output.stem}_{i:0{width}d}{output.suffix}") for i in range(1, count + 1)]


def image_array(image: Any) -> Any:
    """One IMAGE `[H, W, 3]` as uint8, converted as ComfyUI's SaveImage does (`clip(255 * x)`)."""
    import numpy as np

    return np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)


def save_images(images: Any, output: Path, prompt: dict | None = None) -> list[Path]:
    """IMAGE `[N, H, W, 3]` to files, converted as ComfyUI's SaveImage does (`clip(255 * x)` to uint8).

    PNGs carry the API-format prompt in their "prompt" text chunk, as SaveImage writes it: dropping the
    file on ComfyUI opens the same loader and sampler settings as a workflow.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    output.parent.mkdir(parents=True, exist_ok=True)
    paths = output_paths(output, images.shape[0])
    for image, path in zip(images, paths):
        pil = Image.fromarray(image_array(image))
        if path.suffix.lower() == ".png" or not path.suffix:
            info = PngInfo()
            if prompt is not None:
                info.add_text("prompt", json.dumps(prompt))
            pil.save(path, format="PNG", pnginfo=info, compress_level=4)
        else:
            pil.save(path)
    return paths


def api_prompt(loader_kwargs: dict[str, Any], sampler_kwargs: dict[str, Any], image_names: dict[str, str],
               loader_node: str = LOADER_NODE) -> dict:
    """The API-format prompt (`POST /prompt`) of what `edit` ran: LoadImage(s) -> loader -> sampler -> SaveImage."""
    prompt: dict[str, dict] = {}
    for index, filename in enumerate(image_names.values(), start=1):
        prompt[str(index)] = {"inputs": {"image": filename}, "class_type": "LoadImage",
                              "_meta": {"title": f"Picture {index}"}}
    title = "Load Qwen-Image-Edit (ComfyUI files)" if loader_node == FILES_LOADER_NODE else \
        "Load Qwen-Image-Edit (diffusers)"
    prompt["10"] = {"inputs": dict(loader_kwargs), "class_type": loader_node, "_meta": {"title": title}}
    inputs: dict[str, Any] = {"pipe": ["10", 0]}
    for index, name in enumerate(image_names, start=1):
        inputs[name] = [str(index), 0]
    inputs.update(sampler_kwargs)
    prompt["11"] = {"inputs": inputs, "class_type": SAMPLER_NODE, "_meta": {"title": "Qwen-Image-Edit"}}
    prompt["12"] = {"inputs": {"images": ["11", 0], "filename_prefix": "qwen-image-edit"}, "class_type": "SaveImage",
                    "_meta": {"title": "Save Image"}}
    return prompt


# --------------------------------------------------------------------------------------------------
# Running the nodes
# --------------------------------------------------------------------------------------------------


def comfyui_diffusers_dirs() -> list[Path]:
    """ComfyUI/models/diffusers when this pack sits in ComfyUI/custom_nodes/<pack>/."""
    if REPO.parent.name == "custom_nodes":
        return [REPO.parent.parent / "models" / "diffusers"]
    return []


def resolve_model(model: str) -> str:
    """A path as given, or the ComfyUI models/diffusers folder a name or hub id refers to.

    `Qwen/Qwen-Image-Edit-2511` also finds ComfyUI/models/diffusers/Qwen-Image-Edit-2511, where the
    README's download command puts it. Anything else goes to the loader unchanged (a hub id is then
    looked up in the Hugging Face cache only).
    """
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    for root in comfyui_diffusers_dirs():
        for name in dict.fromkeys((model, model.rstrip("/").split("/")[-1])):
            if (root / name / "model_index.json").is_file():
                return str(root / name)
    return model


def run_sampler(pack: types.ModuleType, kwargs: dict[str, Any],
                printer: Callable[[int, int], None] | None = None) -> Any:
    """`QwenImageEditSampler().edit(**kwargs)`, with its progress shown by `printer`."""
    node = pack.NODE_CLASS_MAPPINGS[SAMPLER_NODE]()
    if printer is None:
        return node.edit(**kwargs)[0]
    with submodule(pack, "utils.comfy").progress_printer(printer):
        return node.edit(**kwargs)[0]


class ProgressBar:
    """A tqdm bar on stderr fed by the sampler's `printer(value, total)` calls."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: Any = None

    def __call__(self, value: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.description, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(value - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def ctrl_c_cancels(bridge: types.ModuleType) -> Iterator[None]:
    """First Ctrl-C: cancel at the end of the current step (the sampler raises `Cancelled`, no decode).

    A second Ctrl-C stops at once with KeyboardInterrupt. Outside this block Ctrl-C interrupts as usual
    (loading a model cannot be cancelled step by step).
    """
    pending = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal pending
        if pending:
            raise KeyboardInterrupt
        pending = True
        bridge.request_cancel()
        print("\nCancelling at the end of this step (Ctrl-C again to stop at once)...", file=sys.stderr, flush=True)

    bridge.clear_cancel()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        bridge.clear_cancel()


def _load(pack: types.ModuleType, loader_kwargs: dict[str, Any], node_name: str = LOADER_NODE) -> tuple[Any, Any]:
    """Run the loader node; return its PipeHandle and the loaded pipeline's record."""
    loader = submodule(pack, "loaders.pipeline")
    node = pack.NODE_CLASS_MAPPINGS[node_name]()
    (handle,) = node.load(**loader_kwargs)
    return handle, loader.current_pipeline()


def loader_settings(pack: types.ModuleType, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The loader node's inputs from `add_model_options`' options, and which loader node takes them."""
    loader_node = pack.NODE_CLASS_MAPPINGS[LOADER_NODE]
    loader_kwargs = {name: getattr(args, name) for name in node_defaults(loader_node)}
    node_name = LOADER_NODE
    if args.text_encoder or args.vae:
        if not (args.text_encoder and args.vae):
            raise CliError("ComfyUI model files need all three: --model (the diffusion model file), --text-encoder "
                           "and --vae.")
        node_name = FILES_LOADER_NODE
        loader_kwargs = {"diffusion_model": str(Path(loader_kwargs.pop("model")).expanduser().resolve()),
                         "text_encoder": str(args.text_encoder.expanduser().resolve()),
                         "vae": str(args.vae.expanduser().resolve()), **loader_kwargs}
    else:
        loader_kwargs["model"] = resolve_model(loader_kwargs["model"])
    return loader_kwargs, node_name


def batch_module() -> types.ModuleType:
    """batch.py (beside this file), imported by name so its worker processes and Ray actors import it too."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("batch")


def cmd_batch(pack: types.ModuleType, args: argparse.Namespace) -> int:
    batch = batch_module()
    try:
        return batch.run(pack, args)
    except batch.BatchError as exc:
        raise CliError(str(exc)) from None


def cmd_edit(pack: types.ModuleType, args: argparse.Namespace) -> int:
    sampler_node = pack.NODE_CLASS_MAPPINGS[SAMPLER_NODE]
    bridge = submodule(pack, "utils.comfy")
    sampling = submodule(pack, "utils.sampling")

    loader_kwargs, node_name = loader_settings(pack, args)
    sampler_kwargs = {name: getattr(args, name) for name in node_defaults(sampler_node)}
    image_args = {name: getattr(args, name) for name, (kind, _) in node_inputs(sampler_node).items()
                  if kind == "IMAGE" and getattr(args, name) is not None}
    images = {name: load_image(path) for name, path in image_args.items()}
    mask_path = getattr(args, "mask", None)
    if mask_path is not None:
        images["mask"] = load_mask(mask_path)

    # Refuse a bad request before loading ~58 GB (the node checks first too).
    fields = sampling.EditRequest.__dataclass_fields__
    probe = sampling.EditRequest(**{k: v for k, v in sampler_kwargs.items() if k in fields})
    present = [images.get("image"), images.get("image2"), images.get("image3")]
    sampling.validate(probe, present, masked=mask_path is not None)
    if mask_path is not None:
        first = images["image"]
        submodule(pack, "utils.mask").check_masks(images["mask"], first.shape[0], first.shape[-2], first.shape[-3])

    handle, _ = _load(pack, loader_kwargs, node_name)  # the loader logs where it loads and why

    bar = ProgressBar("Editing")
    start = time.perf_counter()
    try:
        with ctrl_c_cancels(bridge):
            result = run_sampler(pack, {"pipe": handle, **images, **sampler_kwargs}, printer=bar)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    prompt = api_prompt(loader_kwargs, sampler_kwargs, {n: p.name for n, p in image_args.items()}, node_name)
    paths = save_images(result, args.output, prompt)
    print(f"Edited in {seconds:.1f} s: {result.shape[2]}x{result.shape[1]}", file=sys.stderr)
    for path in paths:
        print(path)
    return 0


def comfyui_models_dir(comfyui: Path | None = None) -> Path | None:
    """ComfyUI's models folder: `comfyui` (an install or its models folder) if given, else the one of the
    ComfyUI this pack sits in (found as `comfyui_diffusers_dirs` finds models/diffusers), else None."""
    if comfyui is not None:
        comfyui = comfyui.expanduser().resolve()
        if not comfyui.is_dir():
            raise CliError(f"--comfyui: no such folder: {comfyui}")
        return comfyui / "models" if (comfyui / "models").is_dir() else comfyui
    dirs = comfyui_diffusers_dirs()
    return dirs[0].parent if dirs else None


def cmd_doctor(pack: types.ModuleType, args: argparse.Namespace) -> int:
    doctor = submodule(pack, "doctor")
    model = resolve_model(args.model) if args.model else None
    report = doctor.diagnose(model, args.precision, args.check_quantization,
                             comfy_models=comfyui_models_dir(args.comfyui))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(doctor.format_report(report))
    return 0 if report["ok"] else 1


def load_tiny_kit() -> types.ModuleType:
    """tinykit/tiny_pipeline.py (plain module, no test framework), loaded by path so any cwd works."""
    path = REPO / "tinykit" / "tiny_pipeline.py"
    if not path.is_file():
        raise CliError(f"selftest needs {path}, which is missing from this install. Reinstall the pack.")
    name = "qwen_edit_tiny_pipeline"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cmd_selftest(pack: types.ModuleType, args: argparse.Namespace) -> int:
    import torch

    loader = submodule(pack, "loaders.pipeline")
    image_utils = submodule(pack, "utils.image")
    loader_node = pack.NODE_CLASS_MAPPINGS[LOADER_NODE]
    sampler_node = pack.NODE_CLASS_MAPPINGS[SAMPLER_NODE]
    for library in ("transformers", "diffusers"):
        with contextlib.suppress(Exception):
            importlib.import_module(f"{library}.utils.logging").disable_progress_bar()

    total = time.perf_counter()
    step = time.perf_counter()
    kit = load_tiny_kit()
    with contextlib.ExitStack() as stack:
        tmp = args.keep.expanduser().resolve() if args.keep else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="qwen-edit-selftest-")))
        folder = kit.save_tiny_pipeline(tmp / "Qwen-Image-Edit-2511-tiny", zero_cond_t=True)
        print(f"built a tiny random Qwen-Image-Edit-2511 in {time.perf_counter() - step:.1f} s: {folder}")

        step = time.perf_counter()
        loader_kwargs = {**{n: getattr(args, n) for n in node_defaults(loader_node) if n != "model"},
                         "model": str(folder)}
        handle, loaded = _load(pack, loader_kwargs)
        try:
            if not loaded.is_2511 or not getattr(loaded.pipe.transformer.config, "zero_cond_t", False):
                raise CliError("the loaded transformer has no zero_cond_t: this diffusers runs Edit-2511 wrongly")
            print(f"loaded through {LOADER_NODE} in {time.perf_counter() - step:.1f} s on {loaded.device} "
                  f"({loaded.placement.reason}); zero_cond_t honoured")

            step = time.perf_counter()
            image = image_utils.pil_to_tensor(kit.make_test_image(64, 64))
            # 'custom' 64x64, not 'match': the pipeline re-encodes any input at ~1 MP, and 'match' would warn so.
            sampler_kwargs = {**node_defaults(sampler_node), "prompt": SELFTEST_PROMPT, "steps": args.steps,
                              "size_mode": "custom", "width": 64, "height": 64}
            (result,) = sampler_node().edit(handle, image, **sampler_kwargs)
            seconds = time.perf_counter() - step
        finally:
            loader.release_pipeline()
        if args.keep:
            kit.make_test_image(64, 64).save(tmp / "input.png")
            save_images(result, tmp / "output.png")
            print(f"kept: {folder} (link it into ComfyUI/models/diffusers to run the example workflows on it), "
                  f"{tmp / 'input.png'}, {tmp / 'output.png'}")
    problems = []
    if tuple(result.shape) != (1, 64, 64, 3):
        problems.append(f"output shape {tuple(result.shape)}, expected (1, 64, 64, 3)")
    if result.dtype != torch.float32:
        problems.append(f"output dtype {result.dtype}, expected float32")
    if not torch.isfinite(result).all():
        problems.append("output has NaN/inf values")
    elif result.min() < 0 or result.max() > 1:
        problems.append(f"output outside 0..1 ({float(result.min()):.3f}..{float(result.max()):.3f})")
    if problems:
        raise CliError("selftest failed: " + "; ".join(problems))
    print(f"edited 64x64 through {SAMPLER_NODE} ({args.steps} steps, true CFG) in {seconds:.1f} s: "
          f"shape {tuple(result.shape)}, values {float(result.min()):.2f}..{float(result.max()):.2f}, all finite")
    print(f"OK - the output is noise from a random tiny model; this only proves the install works "
          f"({time.perf_counter() - total:.1f} s in all)")
    return 0


COMMANDS = {"edit": cmd_edit, "batch": cmd_batch, "doctor": cmd_doctor, "selftest": cmd_selftest}


def _setup_logging() -> None:
    if any(getattr(h, "_qwen_cli", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._qwen_cli = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    # Never reach the network: the pack loads local files only, and this keeps every library offline too.
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    pack = load_pack()
    args = build_parser(pack).parse_args(argv)
    _setup_logging()
    errors = submodule(pack, "utils.errors")
    bridge = submodule(pack, "utils.comfy")
    try:
        return COMMANDS[args.command](pack, args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except errors.QwenEditError as exc:
        # The pack's own errors (all under one root) already say what is wrong and what to do.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except bridge.Cancelled:
        print("Cancelled: nothing was written.", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nInterrupted: nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

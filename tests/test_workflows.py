"""Saved workflows keep working: the example workflows checked the way ComfyUI checks them.

Users save workflows that name this pack's nodes, their inputs and their widget values by position.
Renaming, reordering or removing an input, changing a combo list or tightening a range silently breaks
every saved workflow. These tests load each file in ``example_workflows/`` and check it against the
pack's *current* ``NODE_CLASS_MAPPINGS``:

* the UI-format file (what the template browser opens) the way ComfyUI's frontend reads it: every
  node type exists, ``widgets_values`` line up with the widgets the node has now (same count, same
  order, each value valid for its input), every link joins an output and an input of the same type;
* its API-format twin in ``example_workflows/api/`` (what scripts ``POST /prompt``) is exactly what
  the frontend would send for the UI file, and it passes a re-implementation of ComfyUI 0.8.0's
  ``execution.validate_prompt`` / ``validate_inputs``: class exists, an output node exists, required
  inputs present, linked types match, literals coerce (int/float/str/bool), min/max, combo
  membership, and the node's own ``VALIDATE_INPUTS``.

ComfyUI cannot be imported in CI, so the three core nodes the workflows use are described by literal
tables copied from ComfyUI 0.8.0's ``nodes.py``. ``tests/test_comfyui_real.py`` posts the same API
files to a real ComfyUI when ``COMFYUI_PATH`` is set.

Where these checks are stricter than ComfyUI, it is on purpose: ComfyUI skips min/max and combo checks
for inputs that a node's ``VALIDATE_INPUTS`` takes (the loader's takes ``**kwargs``, so all of its
inputs) and silently ignores inputs a node does not have, which is exactly how a renamed optional input
(``image2``) would drop a user's second image without an error.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "example_workflows"
API_DIR = WORKFLOWS / "api"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
THUMBNAIL_SIZE = (512, 384)

#: Widget types of ComfyUI's frontend (a list is a COMBO). Every other input type is a link slot.
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
#: Values of the extra widget the frontend adds after an INT named seed / noise_seed.
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
#: Frontend-only nodes: one text widget, no slots, never part of an API prompt.
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote"})

#: Core nodes, copied from ComfyUI 0.8.0 nodes.py (LoadImage, SaveImage, PreviewImage and
#: NODE_DISPLAY_NAME_MAPPINGS). LoadImage's combo lists the files in ComfyUI's input/ folder; a fresh
#: install holds "example.png" there, which is what the example workflows load.
CORE_NODES: dict[str, dict[str, Any]] = {
    "LoadImage": {
        "input": {"required": {"image": (["example.png"], {"image_upload": True})}},
        "return_types": ("IMAGE", "MASK"),
        "output_node": False,
        "display_name": "Load Image",
    },
    "SaveImage": {
        "input": {
            "required": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        },
        "return_types": (),
        "output_node": True,
        "display_name": "Save Image",
    },
    "PreviewImage": {
        "input": {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}},
        "return_types": (),
        "output_node": True,
        "display_name": "Preview Image",
    },
}


# --------------------------------------------------------------------------------------------------
# Node specs: the pack's real classes plus the core tables
# --------------------------------------------------------------------------------------------------


@dataclass
class NodeSpec:
    name: str
    input_types: dict[str, dict[str, tuple]]
    return_types: tuple[str, ...]
    return_names: tuple[str, ...]
    output_node: bool
    display_name: str
    core: bool
    validate_inputs: Callable[..., Any] | None = None
    inputs: dict[str, tuple[str, Any, dict]] = field(default_factory=dict)  # name -> (category, type, options)

    def __post_init__(self) -> None:
        for category in ("required", "optional"):
            for name, entry in self.input_types.get(category, {}).items():
                options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                self.inputs[name] = (category, entry[0], options)

    def is_widget(self, name: str) -> bool:
        _, kind, options = self.inputs[name]
        return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")

    def link_inputs(self) -> list[tuple[str, str, str]]:
        """(name, type, category) of the slots, in the order the frontend creates them."""
        return [(n, k, c) for n, (c, k, _) in self.inputs.items() if not self.is_widget(n)]

    def widgets(self) -> list[tuple[str, str]]:
        """(input name, kind) per saved widget value, in the frontend's order (ComfyUI frontend 1.35).

        kind is "input" for an input's own value, "control_after_generate" for the extra widget an INT
        named seed/noise_seed (or one with control_after_generate) gets, "upload" for LoadImage's
        upload button (saved as "image").
        """
        out = []
        for name, (_, kind, options) in self.inputs.items():
            if not self.is_widget(name):
                continue
            out.append((name, "input"))
            if kind == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
                out.append((name, "control_after_generate"))
            elif options.get("control_after_generate"):
                out.append((name, "control_after_generate"))
            if isinstance(kind, list) and options.get("image_upload"):
                out.append((name, "upload"))
        return out


def node_specs(pack: types.ModuleType) -> dict[str, NodeSpec]:
    """Specs of the pack's nodes (from the live classes) and of the core nodes (from the tables)."""
    specs: dict[str, NodeSpec] = {}
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        returns = tuple(cls.RETURN_TYPES)
        specs[name] = NodeSpec(
            name, cls.INPUT_TYPES(), returns, tuple(getattr(cls, "RETURN_NAMES", None) or returns),
            bool(getattr(cls, "OUTPUT_NODE", False)), pack.NODE_DISPLAY_NAME_MAPPINGS.get(name, name), False,
            getattr(cls, "VALIDATE_INPUTS", None),
        )
    for name, table in CORE_NODES.items():
        returns = table["return_types"]
        specs[name] = NodeSpec(name, table["input"], returns, returns, table["output_node"], table["display_name"],
                               True)
    return specs


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def types_compatible(received: Any, wanted: Any) -> bool:
    """ComfyUI 0.8.0 comfy_execution/validation.validate_node_input (non-strict)."""
    if received == wanted or "*" in (received, wanted):
        return True
    if not isinstance(received, str) or not isinstance(wanted, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in wanted.split(",")}
    return "*" in got or "*" in want or bool(got & want)


def check_value(spec: NodeSpec, name: str, value: Any) -> str | None:
    """Why `value` does not fit input `name` (type, min/max, combo list), or None when it does."""
    _, kind, options = spec.inputs[name]
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        if value not in choices:
            shown = choices if len(choices) <= 20 else f"a list of {len(choices)}"
            return f"{name}: {value!r} is not in {shown}"
        return None
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{name}: {value!r} is not an INT"
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{name}: {value!r} is not a FLOAT"
    if kind == "STRING" and not isinstance(value, str):
        return f"{name}: {value!r} is not a STRING"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{name}: {value!r} is not a BOOLEAN"
    if "min" in options and value < options["min"]:
        return f"{name}: {value!r} is smaller than min {options['min']}"
    if "max" in options and value > options["max"]:
        return f"{name}: {value!r} is bigger than max {options['max']}"
    return None


def saved_widget_names(twin: dict[str, dict]) -> dict[int, list[str]]:
    """Per node id, the names of the widget values in save order, read from the API twin.

    A UI file stores widget values by position only; the twin, saved from the same graph, names them
    (in input order, as the frontend writes them). That turns "value 5 of the sampler" back into
    "true_cfg_scale", so a rename or a reorder is caught even where the shifted values still fit.
    """
    return {int(node_id): [k for k, v in node["inputs"].items() if not isinstance(v, list)]
            for node_id, node in twin.items()}


def check_ui(workflow: dict, specs: dict[str, NodeSpec], twin: dict[str, dict] | None = None) -> list[str]:
    """Every way a saved UI-format workflow no longer fits the nodes; empty when it loads as saved.

    What a saved workflow survives, as the frontend loads it: new *trailing* slots and widgets (the
    frontend gives the widgets their defaults; new required ones are caught by `validate_prompt` on the
    twin). What it does not: a slot or widget renamed, reordered, retyped or removed, or a new one
    inserted before saved ones (every later value would land in the wrong widget).
    """
    names_by_node = saved_widget_names(twin) if twin is not None else {}
    errors: list[str] = []
    if workflow.get("version") != 0.4:
        errors.append(f"version is {workflow.get('version')!r}, not 0.4 (ComfyUI's workflow format)")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    if len(nodes) != len(workflow["nodes"]):
        errors.append("two nodes share an id")
    links = {}
    for link in workflow["links"]:
        if len(link) != 6:
            errors.append(f"link {link} is not [id, from_node, from_slot, to_node, to_slot, type]")
            continue
        if link[0] in links:
            errors.append(f"two links have id {link[0]}")
        links[link[0]] = link
    if nodes and workflow.get("last_node_id", -1) < max(nodes):
        errors.append("last_node_id is below the largest node id: the frontend would reuse an id")
    if links and workflow.get("last_link_id", -1) < max(links):
        errors.append("last_link_id is below the largest link id: the frontend would reuse an id")

    for node_id, node in nodes.items():
        where = f"node {node_id} ({node['type']})"
        if node.get("mode", 0) != 0:
            errors.append(f"{where}: mode {node['mode']} (muted/bypassed) in an example")
        if node["type"] in FRONTEND_ONLY:
            if node.get("inputs") or node.get("outputs"):
                errors.append(f"{where}: a note has no slots")
            values = node.get("widgets_values", [])
            if len(values) != 1 or not isinstance(values[0], str):
                errors.append(f"{where}: a note saves exactly one text value")
            continue
        spec = specs.get(node["type"])
        if spec is None:
            errors.append(f"{where}: node type {node['type']!r} does not exist (not one of the pack's nodes "
                          "nor a core node this test knows)")
            continue

        slots = [i for i in node.get("inputs", []) if "widget" not in i]
        converted = [i for i in node.get("inputs", []) if "widget" in i]
        want = spec.link_inputs()
        have = [(i["name"], i["type"]) for i in slots]
        if have != [(n, k) for n, k, _ in want[: len(have)]]:
            errors.append(f"{where}: input slots {have} but the node now has {[(n, k) for n, k, _ in want]} "
                          "(an input was renamed, reordered, retyped, inserted or removed)")
        for name, kind, category in want[len(have):]:
            if category == "required":
                errors.append(f"{where}: the node has a new required input {name} ({kind}) the saved workflow lacks")
        for entry in converted:
            name = entry["widget"].get("name")
            if name not in spec.inputs or not spec.is_widget(name):
                errors.append(f"{where}: converted widget input {name!r} is not a widget of the node")
        for index, entry in enumerate(node.get("inputs", [])):
            link_id = entry.get("link")
            if link_id is None:
                if "widget" not in entry and spec.inputs.get(entry["name"], ("optional",))[0] == "required":
                    errors.append(f"{where}: required input {entry['name']!r} is not connected")
                continue
            link = links.get(link_id)
            if link is None or link[3] != node_id or link[4] != index:
                errors.append(f"{where}: input {entry['name']!r} names link {link_id}, which does not end here")

        outputs = [(o["name"], o["type"]) for o in node.get("outputs", [])]
        want_out = list(zip(spec.return_names, spec.return_types))
        if outputs != want_out:
            errors.append(f"{where}: outputs {outputs} but the node now returns {want_out}")
        for slot, output in enumerate(node.get("outputs", [])):
            saved = set(output.get("links") or [])
            actual = {lid for lid, link in links.items() if link[1] == node_id and link[2] == slot}
            if saved != actual:
                errors.append(f"{where}: output {slot} lists links {sorted(saved)} but links {sorted(actual)} leave it")

        widgets = spec.widgets()
        values = node.get("widgets_values", [])
        listed = ", ".join(n if k == "input" else f"{n}:{k}" for n, k in widgets)
        if len(values) > len(widgets):
            errors.append(f"{where}: {len(values)} widget values saved, but the node now has only {len(widgets)} "
                          f"widgets ({listed}): a widget was removed or turned into a link")
            continue
        saved_names = names_by_node.get(node_id)
        current_names = [n for n, k in widgets[: len(values)] if k == "input"]
        if saved_names is not None and current_names != saved_names:
            errors.append(f"{where}: widgets saved as {saved_names} now read as {current_names}: an input was "
                          "renamed, reordered or inserted, and saved values would land in the wrong widget")
        for (name, kind), value in zip(widgets, values):
            if kind == "control_after_generate":
                problem = (None if value in CONTROL_VALUES
                           else f"{name} control_after_generate: {value!r} not in {CONTROL_VALUES}")
            elif kind == "upload":
                problem = None if value == "image" else f"{name} upload widget: {value!r} is not 'image'"
            else:
                problem = check_value(spec, name, value)
            if problem:
                errors.append(f"{where}: widget {problem} (saved values are matched to widgets by position)")

    for link_id, (_, src, src_slot, dst, dst_slot, kind) in links.items():
        where = f"link {link_id}"
        if src not in nodes or dst not in nodes:
            errors.append(f"{where}: joins a node that does not exist")
            continue
        src_outputs = nodes[src].get("outputs", [])
        dst_inputs = nodes[dst].get("inputs", [])
        if src_slot >= len(src_outputs) or dst_slot >= len(dst_inputs):
            errors.append(f"{where}: slot out of range")
            continue
        out_type, in_type = src_outputs[src_slot]["type"], dst_inputs[dst_slot]["type"]
        if not (out_type == kind == in_type or (types_compatible(out_type, in_type) and kind == out_type)):
            errors.append(f"{where}: joins {out_type} to {in_type} (link says {kind})")
        if dst_inputs[dst_slot].get("link") != link_id:
            errors.append(f"{where}: its target input does not name it")
        src_spec, dst_spec = specs.get(nodes[src]["type"]), specs.get(nodes[dst]["type"])
        if src_spec and dst_spec and src_slot < len(src_spec.return_types):
            name = dst_inputs[dst_slot]["name"]
            produced = src_spec.return_types[src_slot]
            if name in dst_spec.inputs and not types_compatible(produced, dst_spec.inputs[name][1]):
                errors.append(f"{where}: {nodes[src]['type']} output {src_slot} is {src_spec.return_types[src_slot]}, "
                              f"{nodes[dst]['type']}.{name} takes {dst_spec.inputs[name][1]}")
    if not any(specs.get(n["type"]) and specs[n["type"]].output_node for n in nodes.values()):
        errors.append("no output node (SaveImage/PreviewImage): ComfyUI refuses a prompt without one")
    return errors


def ui_to_api(workflow: dict, specs: dict[str, NodeSpec]) -> dict[str, dict]:
    """What ComfyUI's frontend sends to /prompt for a UI workflow (its graphToPrompt, for plain nodes)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        spec = specs.get(node["type"])
        if spec is None:  # FRONTEND_ONLY, or unknown (check_ui reports it)
            continue
        values = dict(zip(spec.widgets(), node["widgets_values"]))
        inputs: dict[str, Any] = {}
        for name in spec.inputs:
            if spec.is_widget(name) and (name, "input") in values:
                inputs[name] = values[(name, "input")]
        for entry in node["inputs"]:
            if entry.get("link") is not None:
                link = links[entry["link"]]
                inputs[entry.get("widget", {}).get("name", entry["name"])] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {
            "inputs": inputs, "class_type": node["type"],
            "_meta": {"title": node.get("title") or spec.display_name},
        }
    return prompt


def validate_prompt(prompt: dict[str, dict], specs: dict[str, NodeSpec]) -> list[str]:
    """ComfyUI 0.8.0 execution.validate_prompt + validate_inputs, for every node of an API prompt."""
    errors: list[str] = []
    if not any(specs.get(n.get("class_type")) and specs[n["class_type"]].output_node for n in prompt.values()):
        errors.append("prompt_no_outputs: the prompt has no output node")
    for node_id, node in prompt.items():
        where = f"node {node_id}"
        if "class_type" not in node:
            errors.append(f"{where}: no class_type")
            continue
        spec = specs.get(node["class_type"])
        if spec is None:
            errors.append(f"{where}: node {node['class_type']} does not exist")
            continue
        where = f"node {node_id} ({spec.name})"
        inputs = node.get("inputs", {})
        literals: dict[str, Any] = {}
        for name in sorted(set(inputs) - set(spec.inputs)):
            errors.append(f"{where}: input {name!r} is not an input of the node (ComfyUI would silently drop it)")
        for name, (category, kind, _) in spec.inputs.items():
            if name not in inputs:
                if category == "required":
                    errors.append(f"{where}: required_input_missing: {name}")
                continue
            value = inputs[name]
            if isinstance(value, list):
                if len(value) != 2 or not isinstance(value[0], str) or value[0] not in prompt:
                    errors.append(f"{where}: bad_linked_input: {name} = {value!r}")
                    continue
                source = specs.get(prompt[value[0]].get("class_type"))
                if source is None or not isinstance(value[1], int) or not 0 <= value[1] < len(source.return_types):
                    errors.append(f"{where}: {name} links to a missing output {value!r}")
                    continue
                received = source.return_types[value[1]]
                if not types_compatible(received, kind):
                    errors.append(f"{where}: return_type_mismatch: {name} received {received}, takes {kind}")
                continue
            try:
                casts = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
                coerce = casts.get(kind) if isinstance(kind, str) else None
                value = coerce(value) if coerce else value
            except (TypeError, ValueError) as exc:
                errors.append(f"{where}: invalid_input_type: {name} = {value!r} ({exc})")
                continue
            if not spec.is_widget(name):
                errors.append(f"{where}: {name} is a {kind} link input but has the literal {value!r}")
                continue
            literals[name] = value
            problem = check_value(spec, name, value)
            if problem:
                errors.append(f"{where}: {problem}")
        if spec.validate_inputs is not None:
            wanted = inspect.signature(spec.validate_inputs).parameters
            takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in wanted.values())
            given = {k: v for k, v in literals.items() if takes_all or k in wanted}
            result = spec.validate_inputs(**given)
            if result is not True:
                errors.append(f"{where}: custom_validation_failed: {result}")
    return errors


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


#: Qwen-Image-Edit as ComfyUI's own single files, by the model folder they sit in: the names ComfyUI
#: distributes them under (README, "Already have the ComfyUI files?"). The files loader's combos list what
#: these folders hold, so the fixture below puts (empty) files of these names there.
COMFYUI_FILES: dict[str, tuple[str, ...]] = {
    "diffusion_models": ("qwen_image_edit_2511_bf16.safetensors", "qwen_image_edit_2511_fp8mixed.safetensors",
                         "qwen_image_edit_2509_fp8_e4m3fn.safetensors"),
    "unet": ("Qwen-Image-Edit-2511-Q4_K_M.gguf",),
    "text_encoders": ("qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_2.5_vl_7b.safetensors"),
    "vae": ("qwen_image_vae.safetensors",),
}


@pytest.fixture
def comfy_models(pack: types.ModuleType, comfyui: dict, tmp_path: Path) -> Path:
    """A ComfyUI (stand-in) whose model folders hold what the README tells users to put there.

    models/diffusers gets the folders the diffusers loader's own download command creates; the
    diffusion_models / unet / text_encoders / vae folders get ComfyUI's single files (`COMFYUI_FILES`,
    empty: only their names are listed here, never read). The loaders' combos list what is present, so
    the examples' model and file values are checked against the lists such a user sees. Returns
    models/diffusers.
    """
    loader = importlib.import_module(f"{pack.__name__}.loaders.pipeline")
    folder_paths = comfyui["folder_paths"]
    root = Path(folder_paths.get_folder_paths("diffusers")[0])
    for repo_id in loader.HUB_MODELS:
        folder = Path(loader.download_command(repo_id).split("--local-dir", 1)[1].strip().strip('"'))
        assert folder.parent == root, folder  # the command names ComfyUI's own models/diffusers, absolute
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text('{"_class_name": "QwenImageEditPlusPipeline"}')
    for kind, names in COMFYUI_FILES.items():
        folder = Path(folder_paths.get_folder_paths(kind)[0])
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / name).touch()
    return root


@pytest.fixture
def specs(pack: types.ModuleType, comfy_models: Path) -> dict[str, NodeSpec]:
    return node_specs(pack)


def _ids(path: Path) -> str:
    return path.stem


# --------------------------------------------------------------------------------------------------
# The example workflows
# --------------------------------------------------------------------------------------------------


def test_the_examples_exist():
    names = {p.stem for p in UI_FILES}
    assert len(names) >= 4, f"expected the four example workflows in {WORKFLOWS}, found {sorted(names)}"


@pytest.mark.parametrize("path", UI_FILES, ids=_ids)
def test_ui_workflow_fits_the_nodes(path: Path, specs: dict[str, NodeSpec]):
    assert check_ui(_load(path), specs, _load(API_DIR / path.name)) == []


@pytest.mark.parametrize("path", UI_FILES, ids=_ids)
def test_api_twin_is_what_the_frontend_sends(path: Path, specs: dict[str, NodeSpec]):
    twin = API_DIR / path.name
    assert twin.is_file(), f"{path.name} has no API-format twin at {twin.relative_to(REPO)}"
    assert _load(twin) == ui_to_api(_load(path), specs)


@pytest.mark.parametrize("path", UI_FILES, ids=_ids)
def test_api_twin_passes_prompt_validation(path: Path, specs: dict[str, NodeSpec]):
    assert validate_prompt(_load(API_DIR / path.name), specs) == []


@pytest.mark.parametrize("path", UI_FILES, ids=_ids)
def test_thumbnail_for_the_template_browser(path: Path):
    from PIL import Image

    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{path.name} has no thumbnail {thumbnail.name} (the template browser shows it)"
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG"
        assert image.size == THUMBNAIL_SIZE


@pytest.mark.parametrize("path", UI_FILES, ids=_ids)
def test_every_wire_is_visible_in_the_thumbnail(path: Path):
    """No wire runs behind a node (ComfyUI draws wires underneath, so the picture would mislead, as the
    loader wire behind Image Scale once did); tools/workflow_thumbnail.py refuses such a layout."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("workflow_thumbnail", REPO / "tools" / "workflow_thumbnail.py")
    thumbnail = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(thumbnail)
    thumbnail.render(_load(path))  # raises ValueError naming the hidden wires


def test_only_ui_workflows_sit_where_the_template_browser_looks():
    """ComfyUI lists every example_workflows/*.json as a template; API twins live in api/ below it."""
    for path in UI_FILES:
        data = _load(path)
        assert isinstance(data, dict) and "nodes" in data and "links" in data, f"{path.name} is not UI format"
    for twin in API_DIR.glob("*.json"):
        assert (WORKFLOWS / twin.name).is_file(), f"{twin.name} is an API twin without a UI workflow"
    for extra in WORKFLOWS.iterdir():
        assert extra.suffix in (".json", ".jpg") or extra.name in ("api", "__pycache__"), f"unexpected {extra.name}"


def test_pack_nodes_carry_the_registry_id(pack: types.ModuleType):
    """The frontend and ComfyUI-Manager find the pack for a missing node through properties.cnr_id."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"]
    for path in UI_FILES:
        for node in _load(path)["nodes"]:
            if node["type"] in pack.NODE_CLASS_MAPPINGS:
                assert node["properties"].get("cnr_id") == project, f"{path.name} node {node['id']}"
            elif node["type"] in CORE_NODES:
                assert node["properties"].get("cnr_id") == "comfy-core", f"{path.name} node {node['id']}"


def _nodes_of(name: str, kind: str) -> list[dict]:
    return [n for n in _load(WORKFLOWS / f"{name}.json")["nodes"] if n["type"] == kind]


def _api_of(name: str, kind: str) -> list[dict]:
    return [n for n in _load(API_DIR / f"{name}.json").values() if n["class_type"] == kind]


def test_the_three_setups_the_issue_asks_for(pack: types.ModuleType):
    """Single image, two images (Picture 1 / Picture 2), low memory (NF4 + offload), core nodes around."""
    for path in UI_FILES:
        kinds = {n["type"] for n in _load(path)["nodes"]}
        assert {"LoadImage", "QwenImageEditSampler"} <= kinds, path.name
        assert len(kinds & {"QwenImageEditLoader", "QwenImageEditFilesLoader"}) == 1, path.name
        assert kinds & {"SaveImage", "PreviewImage"}, path.name

    [single] = _api_of("qwen_image_edit_2511_single_image", "QwenImageEditSampler")
    assert "image2" not in single["inputs"] and len(_nodes_of("qwen_image_edit_2511_single_image", "LoadImage")) == 1

    [two] = _api_of("qwen_image_edit_2511_two_images", "QwenImageEditSampler")
    assert isinstance(two["inputs"]["image2"], list), "the two-image workflow must feed image2"
    titles = sorted(n.get("title") for n in _nodes_of("qwen_image_edit_2511_two_images", "LoadImage"))
    assert titles == ["Picture 1", "Picture 2"]
    assert "Picture 1" in two["inputs"]["prompt"] and "Picture 2" in two["inputs"]["prompt"]

    [low] = _api_of("qwen_image_edit_2511_low_memory_nf4", "QwenImageEditLoader")
    assert low["inputs"]["quantization"] == "nf4" and low["inputs"]["offload"] != "none"


FILES = WORKFLOWS / "qwen_image_edit_2511_comfyui_files.json"


def test_the_comfyui_files_setup(pack: types.ModuleType):
    """ComfyUI's fp8 files through the files loader; every other loader setting at the node's default."""
    [loader] = _api_of(FILES.stem, "QwenImageEditFilesLoader")
    inputs = loader["inputs"]
    assert (inputs["diffusion_model"], inputs["text_encoder"], inputs["vae"]) == (
        "qwen_image_edit_2511_fp8mixed.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors",
        "qwen_image_vae.safetensors")
    for name in ("diffusion_model", "text_encoder", "vae"):
        assert any(inputs[name] in names for names in COMFYUI_FILES.values()), name
    required = pack.NODE_CLASS_MAPPINGS["QwenImageEditFilesLoader"].INPUT_TYPES()["required"]
    defaults = {k: v[1]["default"] for k, v in required.items() if k not in ("diffusion_model", "text_encoder", "vae")}
    assert {k: inputs[k] for k in defaults} == defaults
    prompt = _load(API_DIR / FILES.name)
    loader_id = next(k for k, v in prompt.items() if v["class_type"] == "QwenImageEditFilesLoader")
    [sampler] = _api_of(FILES.stem, "QwenImageEditSampler")
    assert sampler["inputs"]["pipe"] == [loader_id, 0], "the files loader feeds the sampler directly"


def test_examples_use_the_model_card_sampling():
    """40 steps, true CFG 4.0 with a one-space negative prompt (see the sampler's description)."""
    for path in UI_FILES:
        [sampler] = _api_of(path.stem, "QwenImageEditSampler")
        inputs = sampler["inputs"]
        assert (inputs["steps"], inputs["true_cfg_scale"], inputs["negative_prompt"]) == (40, 4.0, " "), path.name
        if "mask" in inputs:  # the window around the mask is edited at ~1 MP; the photo keeps its size
            assert inputs["size_mode"] == "auto", path.name
        else:
            assert inputs["size_mode"] == "match", "the examples scale the input and keep its framing"


MASKED = WORKFLOWS / "qwen_image_edit_2511_masked_edit.json"


def test_the_masked_edit_setup():
    """Load Image's mask (painted in the MaskEditor) feeds the sampler, with the photo unscaled."""
    prompt = _load(API_DIR / MASKED.name)
    [load_id] = [k for k, v in prompt.items() if v["class_type"] == "LoadImage"]
    [sampler] = _api_of(MASKED.stem, "QwenImageEditSampler")
    assert sampler["inputs"]["image"] == [load_id, 0] and sampler["inputs"]["mask"] == [load_id, 1]
    assert not _api_of(MASKED.stem, "QwenImageEditImageScale")
    assert (sampler["inputs"]["grow"], sampler["inputs"]["feather"], sampler["inputs"]["context"]) == (0, 8, 2.0)


# --------------------------------------------------------------------------------------------------
# The guard fails when a node changes under a saved workflow
# --------------------------------------------------------------------------------------------------


def _patched_specs(pack: types.ModuleType, monkeypatch: pytest.MonkeyPatch, node: str,
                   change: Callable[[dict], dict]) -> dict[str, NodeSpec]:
    """Specs after replacing `node`'s INPUT_TYPES with `change(original)` on the live class."""
    cls = pack.NODE_CLASS_MAPPINGS[node]
    original = cls.INPUT_TYPES()
    changed = change(copy.deepcopy(original))
    monkeypatch.setattr(cls, "INPUT_TYPES", classmethod(lambda _cls: changed))
    return node_specs(pack)


def _reorder(section: dict, first: str, second: str) -> dict:
    keys = list(section)
    i, j = keys.index(first), keys.index(second)
    keys[i], keys[j] = keys[j], keys[i]
    return {k: section[k] for k in keys}


def _rename(section: dict, old: str, new: str) -> dict:
    return {(new if k == old else k): v for k, v in section.items()}


SINGLE = WORKFLOWS / "qwen_image_edit_2511_single_image.json"
TWO = WORKFLOWS / "qwen_image_edit_2511_two_images.json"
LOW = WORKFLOWS / "qwen_image_edit_2511_low_memory_nf4.json"


def _all_errors(path: Path, specs: dict[str, NodeSpec]) -> tuple[list[str], list[str]]:
    """UI-file errors (with the twin-vs-UI agreement) and API-twin validation errors."""
    ui, twin = _load(path), _load(API_DIR / path.name)
    ui_errors = check_ui(ui, specs, twin)
    if ui_to_api(ui, specs) != twin:
        ui_errors.append("the UI file no longer converts to its API twin")
    return ui_errors, validate_prompt(twin, specs)


def test_reordering_sampler_widgets_breaks_the_guard(pack, comfy_models, monkeypatch):
    specs = _patched_specs(pack, monkeypatch, "QwenImageEditSampler",
                           lambda t: {**t, "required": _reorder(t["required"], "steps", "true_cfg_scale")})
    ui_errors, _ = _all_errors(SINGLE, specs)
    assert any("QwenImageEditSampler" in e and "widget" in e for e in ui_errors), ui_errors


def test_renaming_a_widget_input_breaks_the_guard(pack, comfy_models, monkeypatch):
    specs = _patched_specs(pack, monkeypatch, "QwenImageEditSampler",
                           lambda t: {**t, "required": _rename(t["required"], "true_cfg_scale", "cfg")})
    _, api_errors = _all_errors(SINGLE, specs)
    assert any("required_input_missing: cfg" in e for e in api_errors), api_errors
    assert any("'true_cfg_scale' is not an input" in e for e in api_errors), api_errors


def test_renaming_an_optional_image_input_breaks_the_guard(pack, comfy_models, monkeypatch):
    """ComfyUI itself would silently drop the second image here; the guard must not."""
    specs = _patched_specs(pack, monkeypatch, "QwenImageEditSampler",
                           lambda t: {**t, "optional": _rename(t["optional"], "image2", "picture2")})
    ui_errors, api_errors = _all_errors(TWO, specs)
    assert any("input slots" in e for e in ui_errors), ui_errors
    assert any("'image2' is not an input" in e for e in api_errors), api_errors


def test_adding_a_widget_in_the_middle_breaks_the_guard(pack, comfy_models, monkeypatch):
    def add(t: dict) -> dict:
        items = list(t["required"].items())
        items.insert(2, ("sampler_name", (["euler"], {"default": "euler"})))
        return {**t, "required": dict(items)}

    specs = _patched_specs(pack, monkeypatch, "QwenImageEditLoader", add)
    ui_errors, api_errors = _all_errors(SINGLE, specs)
    assert any("now read as" in e for e in ui_errors), ui_errors
    assert any("required_input_missing: sampler_name" in e for e in api_errors), api_errors


def test_removing_a_widget_breaks_the_guard(pack, comfy_models, monkeypatch):
    specs = _patched_specs(pack, monkeypatch, "QwenImageEditSampler",
                           lambda t: {**t, "required": {k: v for k, v in t["required"].items() if k != "height"}})
    ui_errors, api_errors = _all_errors(SINGLE, specs)
    # The saved values shift onto the widgets after it (the optional grow/feather/context at the end).
    assert any("by position" in e or "now has only" in e for e in ui_errors), ui_errors
    assert any("'height' is not an input" in e for e in api_errors), api_errors


def test_a_swap_that_still_type_checks_is_caught(pack, comfy_models, monkeypatch):
    """width and height are both INT 16..4096: only the names tell the swap apart."""
    specs = _patched_specs(pack, monkeypatch, "QwenImageEditSampler",
                           lambda t: {**t, "required": _reorder(t["required"], "width", "height")})
    ui_errors, _ = _all_errors(SINGLE, specs)
    assert any("now read as" in e for e in ui_errors), ui_errors


def test_appending_optional_inputs_keeps_saved_workflows(pack, comfy_models, monkeypatch):
    """A new optional widget or slot after the saved ones is how a node grows without breaking anyone."""
    def grow(t: dict) -> dict:
        optional = dict(t.get("optional", {}))
        optional["image4"] = ("IMAGE", {"tooltip": "new"})
        optional["detail"] = ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0})
        return {**t, "optional": optional}

    specs = _patched_specs(pack, monkeypatch, "QwenImageEditSampler", grow)
    for path in UI_FILES:
        assert _all_errors(path, specs) == ([], []), path.name


def test_a_new_required_input_is_caught(pack, comfy_models, monkeypatch):
    def grow(t: dict) -> dict:
        return {**t, "required": {**t["required"], "region": ("MASK", {})}}

    specs = _patched_specs(pack, monkeypatch, "QwenImageEditSampler", grow)
    ui_errors, api_errors = _all_errors(SINGLE, specs)
    assert any("input slots" in e and "'region'" in e for e in ui_errors), ui_errors  # lands before image2
    assert any("required_input_missing: region" in e for e in api_errors), api_errors


def test_a_new_required_input_at_the_end_is_caught(pack, comfy_models, monkeypatch):
    specs = _patched_specs(pack, monkeypatch, "QwenImageEditImageScale",
                           lambda t: {**t, "required": {**t["required"], "mask": ("MASK", {})}})
    ui_errors, api_errors = _all_errors(SINGLE, specs)
    assert any("new required input mask" in e for e in ui_errors), ui_errors
    assert any("required_input_missing: mask" in e for e in api_errors), api_errors


def test_dropping_a_combo_choice_breaks_the_guard(pack, comfy_models, monkeypatch):
    def drop_nf4(t: dict) -> dict:
        choices, options = t["required"]["quantization"]
        t["required"]["quantization"] = ([c for c in choices if c != "nf4"], options)
        return t

    specs = _patched_specs(pack, monkeypatch, "QwenImageEditLoader", drop_nf4)
    ui_errors, api_errors = _all_errors(LOW, specs)
    assert any("'nf4' is not in" in e for e in ui_errors), ui_errors
    assert any("'nf4' is not in" in e for e in api_errors), api_errors


def test_a_model_file_that_is_not_there_breaks_the_guard(pack, comfy_models, comfyui):
    """The file combos list the files present: without the fp8 diffusion model the example is refused."""
    assert _all_errors(FILES, node_specs(pack)) == ([], [])
    folder = Path(comfyui["folder_paths"].get_folder_paths("diffusion_models")[0])
    (folder / "qwen_image_edit_2511_fp8mixed.safetensors").unlink()
    ui_errors, api_errors = _all_errors(FILES, node_specs(pack))
    assert any("diffusion_model: 'qwen_image_edit_2511_fp8mixed.safetensors' is not in" in e for e in ui_errors), \
        ui_errors
    assert any("'qwen_image_edit_2511_fp8mixed.safetensors' is not in" in e for e in api_errors), api_errors


def test_tightening_a_range_breaks_the_guard(pack, comfy_models, monkeypatch):
    def cap_steps(t: dict) -> dict:
        kind, options = t["required"]["steps"]
        t["required"]["steps"] = (kind, {**options, "max": 30})
        return t

    specs = _patched_specs(pack, monkeypatch, "QwenImageEditSampler", cap_steps)
    ui_errors, api_errors = _all_errors(SINGLE, specs)
    assert any("bigger than max 30" in e for e in ui_errors), ui_errors
    assert any("bigger than max 30" in e for e in api_errors), api_errors


def test_changing_a_link_type_breaks_the_guard(pack, comfy_models, monkeypatch):
    def retype(t: dict) -> dict:
        t["required"]["pipe"] = ("QWEN_IMAGE_EDIT_PIPELINE", t["required"]["pipe"][1])
        return t

    specs = _patched_specs(pack, monkeypatch, "QwenImageEditSampler", retype)
    ui_errors, api_errors = _all_errors(SINGLE, specs)
    assert any("QWEN_IMAGE_EDIT_PIPELINE" in e for e in ui_errors), ui_errors
    assert any("return_type_mismatch: pipe" in e for e in api_errors), api_errors


def test_renaming_a_node_breaks_the_guard(pack, comfy_models, monkeypatch):
    cls = pack.NODE_CLASS_MAPPINGS["QwenImageEditSampler"]
    monkeypatch.delitem(pack.NODE_CLASS_MAPPINGS, "QwenImageEditSampler")
    monkeypatch.setitem(pack.NODE_CLASS_MAPPINGS, "QwenImageEditSamplerV2", cls)
    ui_errors, api_errors = _all_errors(SINGLE, node_specs(pack))
    assert any("'QwenImageEditSampler' does not exist" in e for e in ui_errors), ui_errors
    assert any("QwenImageEditSampler does not exist" in e for e in api_errors), api_errors


def test_the_node_own_validation_runs(pack, comfy_models):
    """VALIDATE_INPUTS is called as ComfyUI calls it (the loader accepts cuda:N, refuses nonsense)."""
    specs = node_specs(pack)
    prompt = _load(API_DIR / SINGLE.name)
    loader_id = next(k for k, v in prompt.items() if v["class_type"] == "QwenImageEditLoader")
    prompt[loader_id]["inputs"]["device"] = "cuda:1"
    assert not [e for e in validate_prompt(prompt, specs) if "custom_validation" in e]
    prompt[loader_id]["inputs"]["device"] = "tpu"
    assert any("custom_validation_failed" in e for e in validate_prompt(prompt, specs))


# --------------------------------------------------------------------------------------------------
# The checker itself, on hand-made graphs
# --------------------------------------------------------------------------------------------------


def test_checker_catches_broken_graphs(specs):
    workflow = _load(SINGLE)
    broken = copy.deepcopy(workflow)
    link = next(link for link in broken["links"] if link[5] == "QWEN_IMAGE_EDIT_PIPE")
    link[5] = "IMAGE"
    assert any("link" in e and "IMAGE" in e for e in check_ui(broken, specs))

    broken = copy.deepcopy(workflow)
    broken["nodes"] = [n for n in broken["nodes"] if n["type"] not in ("SaveImage", "PreviewImage")]
    kept = {n["id"] for n in broken["nodes"]}
    broken["links"] = [link for link in broken["links"] if link[5] != "IMAGE" or link[3] in kept]
    assert any("no output node" in e for e in check_ui(broken, specs))

    prompt = _load(API_DIR / SINGLE.name)
    sampler = next(v for v in prompt.values() if v["class_type"] == "QwenImageEditSampler")
    sampler["inputs"]["steps"] = "forty"
    sampler["inputs"]["seed"] = -1
    errors = validate_prompt(prompt, specs)
    assert any("invalid_input_type: steps" in e for e in errors) and any("smaller than min" in e for e in errors)


def test_checker_accepts_preview_image(specs):
    prompt = _load(API_DIR / SINGLE.name)
    save = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    prompt[save] = {"inputs": {"images": prompt[save]["inputs"]["images"]}, "class_type": "PreviewImage",
                    "_meta": {"title": "Preview Image"}}
    assert validate_prompt(prompt, specs) == []

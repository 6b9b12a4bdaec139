"""Draw the template-browser thumbnail of an example workflow: its nodes and wires, from the JSON.

    python tools/workflow_thumbnail.py example_workflows/qwen_image_edit_2511_comfyui_files.json

writes the `.jpg` beside the workflow (512x384, the size tests/test_workflows.py checks). The picture
follows the workflow's own node positions, sizes and links, in the look of the other thumbnails (dark
canvas with a 24 px grid, title and description from `extra.info`, pack nodes with a violet header, wires
as ComfyUI draws them). Notes are left out. Wires are drawn under the nodes, as in ComfyUI, so the script
refuses a layout where a wire would pass behind a node: move the nodes in the workflow until every wire
is visible. Needs only Pillow and the DejaVu fonts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = (512, 384)
SUPERSAMPLE = 4
AREA = (14, 52, 498, 370)  # left, top, right, bottom of the node area, in thumbnail pixels
TITLE_BAR = 30  # ComfyUI's node title height, canvas units (drawn at least 11 px high)
SLOT_HEIGHT = 20  # litegraph's NODE_SLOT_HEIGHT

BACKGROUND, GRID = (29, 29, 29), (35, 35, 35)
BODY, BORDER = (53, 53, 53), (84, 84, 84)
HEADER = {"pack": (60, 49, 89), "core": (34, 34, 34)}
TITLE_TEXT, DESCRIPTION_TEXT, HEADER_TEXT, BODY_TEXT = (235, 235, 235), (170, 170, 170), (235, 235, 235), (140, 140, 140)
TYPE_COLORS = {"IMAGE": (100, 181, 246), "MASK": (129, 199, 132), "INT": (170, 190, 120),
               "QWEN_IMAGE_EDIT_PIPE": (190, 120, 200)}
DEFAULT_COLOR = (160, 170, 160)
CORE_NODES = {"LoadImage": "Load Image", "SaveImage": "Save Image", "PreviewImage": "Preview Image"}
NOTES = ("Note", "MarkdownNote")
FONTS = Path("/usr/share/fonts/truetype/dejavu")


def _font(bold: bool, size: float) -> ImageFont.FreeTypeFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(FONTS / name), round(size * SUPERSAMPLE))


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """`text`, cut with '...' to fit `width` (supersampled pixels)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "..."


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0] if name.endswith((".safetensors", ".gguf")) else name


def summary(node: dict) -> list[str]:
    """The few lines of settings shown inside a node."""
    values = node.get("widgets_values", [])
    kind = node["type"]
    if kind == "LoadImage":
        return [values[0]]
    if kind == "QwenImageEditImageScale":
        return [f"{values[0]:.1f} MP, x{values[1]}", values[2]]
    if kind == "QwenImageEditSampler":
        return [values[0], f"steps {values[4]}, cfg {values[5]:.1f}", f"size: {values[6]}"]
    if kind in ("SaveImage", "PreviewImage"):
        return [f"prefix: {values[0]}"] if values else []
    if kind == "QwenImageEditLoader":
        return [values[0], f"quantization: {values[3]}", f"offload: {values[6]}"]
    if kind == "QwenImageEditFilesLoader":
        return [_stem(values[0]), _stem(values[1]), _stem(values[2]), f"quantization: {values[5]}",
                f"offload: {values[8]}"]
    return []


def _display_name(node: dict) -> str:
    if node.get("title"):
        return node["title"]
    if node["type"] in CORE_NODES:
        return CORE_NODES[node["type"]]
    return {"QwenImageEditImageScale": "Image Scale", "QwenImageEditSampler": "Qwen-Image-Edit",
            "QwenImageEditLoader": "Load Qwen-Image-Edit (diffusers)",
            "QwenImageEditFilesLoader": "Load Qwen-Image-Edit (ComfyUI files)"}.get(node["type"], node["type"])


def _bezier(a: tuple[float, float], b: tuple[float, float], steps: int = 64) -> list[tuple[float, float]]:
    """litegraph's link spline: control points a quarter of the distance out, horizontally."""
    dist = ((b[0] - a[0]) ** 2 + (b[1] - a[1]) ** 2) ** 0.5 * 0.25
    p1, p2 = (a[0] + dist, a[1]), (b[0] - dist, b[1])
    points = []
    for i in range(steps + 1):
        t = i / steps
        u = 1 - t
        points.append((u**3 * a[0] + 3 * u * u * t * p1[0] + 3 * u * t * t * p2[0] + t**3 * b[0],
                       u**3 * a[1] + 3 * u * u * t * p1[1] + 3 * u * t * t * p2[1] + t**3 * b[1]))
    return points


def render(workflow: dict, check_wires: bool = True) -> Image.Image:
    nodes = [n for n in workflow["nodes"] if n["type"] not in NOTES]
    by_id = {n["id"]: n for n in nodes}

    def rect(node: dict) -> tuple[float, float, float, float]:  # canvas units, title bar included
        (x, y), (w, h) = node["pos"], node["size"]
        return x, y - TITLE_BAR, x + w, y + h

    def slot(node: dict, index: int, output: bool) -> tuple[float, float]:
        (x, y), (w, _) = node["pos"], node["size"]
        return (x + w if output else x), y + (index + 0.7) * SLOT_HEIGHT

    # Every wire must stay clear of every node but its own two ends (ComfyUI draws wires underneath).
    hidden = []
    for link_id, src, src_slot, dst, dst_slot, _ in workflow["links"]:
        points = _bezier(slot(by_id[src], src_slot, True), slot(by_id[dst], dst_slot, False))
        for node in nodes:
            x0, y0, x1, y1 = rect(node)
            inner = [p for p in points[2:-2] if x0 + 2 < p[0] < x1 - 2 and y0 < p[1] < y1]
            if inner:
                hidden.append(f"link {link_id} passes behind node {node['id']} ({node['type']}) near "
                              f"({inner[0][0]:.0f}, {inner[0][1]:.0f})")
    if hidden and check_wires:
        raise ValueError("wires hidden behind nodes; move the nodes:\n  " + "\n  ".join(hidden))

    boxes = [rect(n) for n in nodes]
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    right, bottom = max(b[2] for b in boxes), max(b[3] for b in boxes)
    scale = min((AREA[2] - AREA[0]) / (right - left), (AREA[3] - AREA[1]) / (bottom - top))
    off_x = (AREA[0] + AREA[2]) / 2 - (left + right) / 2 * scale
    off_y = (AREA[1] + AREA[3]) / 2 - (top + bottom) / 2 * scale
    k = SUPERSAMPLE

    def px(point: tuple[float, float]) -> tuple[float, float]:
        return (off_x + point[0] * scale) * k, (off_y + point[1] * scale) * k

    image = Image.new("RGB", (SIZE[0] * k, SIZE[1] * k), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for x in range(24, SIZE[0], 24):
        draw.line([(x * k, 0), (x * k, SIZE[1] * k)], fill=GRID, width=k)
    for y in range(24, SIZE[1], 24):
        draw.line([(0, y * k), (SIZE[0] * k, y * k)], fill=GRID, width=k)

    info = workflow.get("extra", {}).get("info", {})
    draw.text((14 * k, 10 * k), info.get("name", ""), font=_font(True, 15), fill=TITLE_TEXT)
    draw.text((14 * k, 32 * k), info.get("description", ""), font=_font(False, 10), fill=DESCRIPTION_TEXT)

    linked = set()
    for _, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        linked |= {(src, src_slot, True), (dst, dst_slot, False)}
        points = [px(p) for p in _bezier(slot(by_id[src], src_slot, True), slot(by_id[dst], dst_slot, False))]
        draw.line(points, fill=TYPE_COLORS.get(kind, DEFAULT_COLOR), width=3 * k, joint="curve")

    title_font, body_font = _font(True, 10), _font(False, 8)
    header = max(11, TITLE_BAR * scale) * k
    radius = 4 * k
    for node in nodes:
        x0, _, x1, y1 = rect(node)
        (bx0, by0), (bx1, by1) = px((x0, node["pos"][1])), px((x1, y1))
        pack = node["type"] not in CORE_NODES
        draw.rounded_rectangle((bx0, by0 - header, bx1, by1), radius, fill=HEADER["pack" if pack else "core"])
        draw.rounded_rectangle((bx0, by0, bx1, by1), radius, fill=BODY, outline=BORDER, width=k,
                               corners=(False, False, True, True))
        name = _fit(draw, _display_name(node), title_font, bx1 - bx0 - 10 * k)
        draw.text((bx0 + 5 * k, by0 - header / 2), name, font=title_font, fill=HEADER_TEXT, anchor="lm")
        rows = max(len(node.get("inputs", [])), len(node.get("outputs", [])))
        line_y = by0 + rows * SLOT_HEIGHT * scale * k + 11 * k
        for line in summary(node):
            if line_y > by1 - 6 * k:
                break
            draw.text((bx0 + 5 * k, line_y), _fit(draw, str(line), body_font, bx1 - bx0 - 10 * k), font=body_font,
                      fill=BODY_TEXT, anchor="lm")
            line_y += 11 * k

    for node in nodes:
        for output, entries in ((False, node.get("inputs", [])), (True, node.get("outputs", []))):
            for index, entry in enumerate(entries):
                if "widget" in entry:
                    continue
                cx, cy = px(slot(node, index, output))
                color = TYPE_COLORS.get(entry["type"], DEFAULT_COLOR)
                r = 3.5 * k
                if (node["id"], index, output) in linked:
                    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
                else:
                    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=color, width=k)
    return image.resize(SIZE, Image.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflows", nargs="+", type=Path, help="UI-format workflow JSON files")
    args = parser.parse_args(argv)
    for path in args.workflows:
        try:
            image = render(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return 1
        target = path.with_suffix(".jpg")
        image.save(target, "JPEG", quality=90)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

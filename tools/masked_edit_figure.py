"""Draw the README's masked-edit picture: input, mask, output and where the pixels changed.

    python tools/masked_edit_figure.py            # writes docs/masked_edit.jpg

Runs a real masked edit through the loader and sampler nodes on the tiny random-weight kit (offline,
~1 min on 2 cores), so the edit itself is noise; the picture is about *where* it lands: the difference
panel is computed from the output, and is black wherever the mask is not.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PANEL = (300, 200)
LABEL_HEIGHT = 26


def main() -> int:
    import os

    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFont

    from cli import OFFLINE_ENV, load_pack
    from tinykit.tiny_pipeline import make_test_image, save_tiny_pipeline

    os.environ.update(OFFLINE_ENV)
    width, height = 900, 600
    photo = torch.from_numpy(np.asarray(make_test_image(width, height, seed=4), dtype=np.float32) / 255)[None]
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    mask = ((((xs - 600) / 130) ** 2 + ((ys - 330) / 95) ** 2) <= 1).float()
    with tempfile.TemporaryDirectory() as tmp:
        pack = load_pack()
        folder = save_tiny_pipeline(Path(tmp) / "tiny")
        pipe = pack.NODE_CLASS_MAPPINGS["QwenImageEditLoader"]().load(
            str(folder), "float32", "same", "none", "transformer+text_encoder", "cpu", "none")[0]
        out = pack.NODE_CLASS_MAPPINGS["QwenImageEditSampler"]().edit(
            pipe, photo, "Replace the masked area with a pond", " ", 0, 4, 1.0, "custom", 256, 256, 1,
            mask=mask, grow=0, feather=12, context=2.0)[0]
    changed = (out[0] - photo[0]).abs().amax(dim=-1)
    assert bool((changed[mask == 0] == 0).all()), "a pixel outside the mask changed"
    overlay = photo[0].clone()
    overlay[mask > 0] = overlay[mask > 0] * 0.4 + torch.tensor([0.9, 0.1, 0.1]) * 0.6
    difference = (changed > 0).float()[..., None].expand(-1, -1, 3)
    panels = [("input", photo[0]), ("mask (painted in MaskEditor)", overlay), ("output", out[0]),
              ("pixels that changed (white)", difference)]
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 15)
    sheet = Image.new("RGB", (PANEL[0] * len(panels), PANEL[1] + LABEL_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (label, tensor) in enumerate(panels):
        image = Image.fromarray((tensor.clamp(0, 1).numpy() * 255).round().astype(np.uint8))
        sheet.paste(image.resize(PANEL, Image.LANCZOS), (i * PANEL[0], LABEL_HEIGHT))
        draw.text((i * PANEL[0] + 8, 4), label, fill=(30, 30, 30), font=font)
    destination = REPO / "docs" / "masked_edit.jpg"
    destination.parent.mkdir(exist_ok=True)
    sheet.save(destination, quality=85)
    print(f"wrote {destination.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

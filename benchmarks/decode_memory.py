"""Peak memory of decoding one uploaded image, in bytes per pixel, by format: what the
docs/commands.md's memory bound for `shitu serve` (--max-megapixels-in-flight) multiplies by.

Each format is decoded in a fresh process by the decoder every reader uses
(`shitu.inference.preprocess.decode_rgb`), from a photo-like image (smooth gradients and
noise) of --megapixels; the peak resident memory while it decodes (VmHWM, reset first),
less the memory resident with the encoded bytes already read, is divided by the pixel
count. Linux only.

    python benchmarks/decode_memory.py --megapixels 20
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from arguments import benchmark_parser, positive_number
from PIL import Image, ImageCms

# A colour profile as editors embed one: OpenCV is given a PNG with one without it (a copy).
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()

# (row name, Pillow format, mode, save options)
FORMATS = [
    ("JPEG", "JPEG", "RGB", {"quality": 90}),
    ("PNG 8-bit RGB", "PNG", "RGB", {"compress_level": 1}),
    ("PNG 8-bit RGB, colour profile", "PNG", "RGB", {"compress_level": 1, "icc_profile": SRGB}),
    ("PNG 16-bit grey", "PNG", "I;16", {"compress_level": 1}),
    ("PNG with alpha", "PNG", "RGBA", {"compress_level": 1}),
    ("WebP with alpha", "WEBP", "RGBA", {"quality": 90}),
]

# Run in the child: read the file, reset the peak to the memory now resident (Linux's
# clear_refs 5), decode, and compare the new peak (VmHWM) with that (VmRSS), in KiB.
CHILD = """
import sys
from shitu.inference.preprocess import decode_rgb
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
data = open(sys.argv[1], "rb").read()
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")
before = status("VmRSS")
image = decode_rgb(data)
print(before, status("VmHWM"), image.shape[0] * image.shape[1])
"""


def photo_like(width: int, height: int, mode: str) -> Image.Image:
    """Gradients plus noise: compresses like a photo, not like one flat colour."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    base = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = Image.fromarray(np.clip(x + y, 0, 255).astype(np.uint8) // 2 + 100)
        image.putalpha(alpha)
    elif mode == "I;16":
        grey = (pixels[..., 0].astype(np.uint16) * 257).astype(np.uint16)
        image = Image.fromarray(grey)  # 16-bit grey ("I;16")
    return image


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--megapixels", type=positive_number, default=20.0, help="size of each image"
    )
    args = parser.parse_args()
    side = int((args.megapixels * 1e6) ** 0.5)
    print("| format | encoded MB | peak MB | bytes/pixel |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, mode, options in FORMATS:
            encoded = io.BytesIO()
            photo_like(side, side, mode).save(encoded, kind, **options)
            path = Path(tmp) / "image"
            path.write_bytes(encoded.getvalue())
            child = subprocess.run(
                [sys.executable, "-c", CHILD, str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            before_kb, after_kb, pixels = map(int, child.stdout.split())
            peak = (after_kb - before_kb) * 1024
            print(
                f"| {name} | {len(encoded.getvalue()) / 1e6:.1f} | {peak / 1e6:.0f} "
                f"| {peak / pixels:.1f} |"
            )


if __name__ == "__main__":
    main()

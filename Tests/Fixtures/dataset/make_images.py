#!/usr/bin/env python3
"""Tiny test images for Tests/DatasetTests/ImageTests.swift (run from anywhere; needs Pillow).

Each covers one decoding path of ImageIO (libvips): 8-bit RGB, 16-bit RGB and grey, palette, grey,
grey+alpha, RGBA with transparent pixels, JPEG with EXIF orientation 6, lossless WebP; plus a smooth
gradient and Pillow's own Lanczos downscale of it (the reference the libvips resize is compared with:
kohya resizes with PIL LANCZOS / cv2, and libvips's Lanczos3 differs from both by a few levels).
"""
import os, struct, zlib
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images")
os.makedirs(OUT, exist_ok=True)
p = lambda name: os.path.join(OUT, name)


def png16(path, w, h, channels, pixel):
    """Pillow cannot write 16-bit RGB, so this writes the PNG chunks directly (big-endian samples)."""
    colour_type = {1: 0, 3: 2}[channels]
    raw = b"".join(b"\0" + b"".join(struct.pack(">%dH" % channels, *pixel(x, y)) for x in range(w)) for y in range(h))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


# 8-bit RGB: pixel (x, y) = (10x, 20y, 100).
im = Image.new("RGB", (12, 8))
im.putdata([(10 * x, 20 * y, 100) for y in range(8) for x in range(12)])
im.save(p("rgb8.png"))

# 16-bit: samples 257 * v, so the exact 8-bit value is v (and 0xFFFF -> 255).
png16(p("rgb16.png"), 12, 8, 3, lambda x, y: (257 * (10 * x), 257 * (20 * y), 0xFFFF))
png16(p("grey16.png"), 12, 8, 1, lambda x, y: (257 * (20 * x),))

# Palette: left half palette index 0 = (200, 30, 40), right half index 1 = (10, 220, 90).
im = Image.new("P", (12, 8))
im.putpalette([200, 30, 40, 10, 220, 90] + [0] * (256 * 3 - 6))
im.putdata([0 if x < 6 else 1 for y in range(8) for x in range(12)])
im.save(p("palette.png"))

# Grey: value 20x.
im = Image.new("L", (12, 8))
im.putdata([20 * x for y in range(8) for x in range(12)])
im.save(p("grey.png"))

# Grey + alpha: left half transparent black (-> white), right half opaque 60.
im = Image.new("LA", (12, 8))
im.putdata([(0, 0) if x < 6 else (60, 255) for y in range(8) for x in range(12)])
im.save(p("greyalpha.png"))

# RGBA: left half fully transparent red (-> white), right half opaque blue.
im = Image.new("RGBA", (12, 8))
im.putdata([(255, 0, 0, 0) if x < 6 else (0, 0, 255, 255) for y in range(8) for x in range(12)])
im.save(p("rgba.png"))

# JPEG stored 24x16 (left half red, right half blue) with EXIF orientation 6 (display = rotate 90° clockwise):
# displayed 16x24, top half red, bottom half blue.
im = Image.new("RGB", (24, 16))
im.putdata([(255, 0, 0) if x < 12 else (0, 0, 255) for y in range(16) for x in range(24)])
exif = Image.Exif()
exif[0x0112] = 6
im.save(p("exif6.jpg"), quality=95, exif=exif.tobytes())

# Lossless WebP: pixel (x, y) = (10x, 20y, 50).
im = Image.new("RGB", (12, 8))
im.putdata([(10 * x, 20 * y, 50) for y in range(8) for x in range(12)])
im.save(p("rgb.webp"), lossless=True)

# Smooth gradient 64x48 and Pillow's Lanczos downscale to 32x24.
im = Image.new("RGB", (64, 48))
im.putdata([(4 * x, 5 * y, (2 * x + 3 * y) // 2) for y in range(48) for x in range(64)])
im.save(p("gradient.png"))
im.resize((32, 24), Image.LANCZOS).save(p("gradient_pil_lanczos_32x24.png"))

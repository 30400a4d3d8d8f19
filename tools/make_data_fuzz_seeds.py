"""Writes seed inputs for the `image` and `idx` fuzz targets (standard library only):
  python3 tools/make_data_fuzz_seeds.py
fuzz/corpus/image: `[mode 0][seed: 8 bytes][image file]` for 3 of the benchmark JPEGs
(../shared/bench/photos), tiny PNGs (RGB, gray, gray+alpha, palette, RGBA, 16-bit) and BMPs
(24-bit, 8-bit gray palette), and `[mode 1][parameters + pixels]` inputs for the direct op calls.
fuzz/corpus/idx: `[flags][labels length: u16 LE][labels file][images file]` for plain and
gzipped, labelled and unlabelled, file- and folder-opened IDX sets (see fuzz/fuzz_targets/*.rs).
"""
import os
import random
import struct
import zlib

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
img_dir = os.path.join(root, "fuzz/corpus/image")
idx_dir = os.path.join(root, "fuzz/corpus/idx")
os.makedirs(img_dir, exist_ok=True)
os.makedirs(idx_dir, exist_ok=True)
rng = random.Random(0)


def put(d, name, data):
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def image_seed(name, file_bytes, seed):
    put(img_dir, name, b"\0" + struct.pack("<Q", seed) + file_bytes)


def png(w, h, color_type, bit_depth, raw_rows, plte=None, trns=None):
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
    if plte is not None:
        out += chunk(b"PLTE", plte)
    if trns is not None:
        out += chunk(b"tRNS", trns)
    data = b"".join(b"\0" + r for r in raw_rows)  # filter 0 per row
    return out + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def bmp24(w, h, px):
    stride = (w * 3 + 3) // 4 * 4
    rows = b""
    for y in reversed(range(h)):
        row = b"".join(bytes(px(x, y)[::-1]) for x in range(w))
        rows += row + b"\0" * (stride - len(row))
    header = struct.pack("<2sIHHI", b"BM", 54 + len(rows), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(rows), 2835, 2835, 0, 0)
    return header + info + rows


def bmp8_gray(w, h, px):
    stride = (w + 3) // 4 * 4
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    rows = b""
    for y in reversed(range(h)):
        row = bytes(px(x, y) for x in range(w))
        rows += row + b"\0" * (stride - len(row))
    off = 54 + len(palette)
    header = struct.pack("<2sIHHI", b"BM", off + len(rows), 0, 0, off)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 0, len(rows), 2835, 2835, 256, 0)
    return header + info + palette + rows


# Three of the benchmark photos (the smallest files: the fuzzer's inputs stay short).
photos_root = os.path.join(root, "../shared/bench/photos")
photos = sorted(
    (os.path.getsize(os.path.join(dp, f)), os.path.join(dp, f))
    for dp, _, fs in os.walk(photos_root) for f in fs
)[:3]
for i, (_, p) in enumerate(photos):
    with open(p, "rb") as f:
        image_seed(f"photo{i}.jpg.bin", f.read(), i)

w, h = 13, 9
rgb = lambda x, y: (x * 19 % 256, y * 28 % 256, (x * y * 7) % 256)
image_seed("rgb.png.bin", png(w, h, 2, 8, [b"".join(bytes(rgb(x, y)) for x in range(w)) for y in range(h)]), 1)
image_seed("gray.png.bin", png(w, h, 0, 8, [bytes((x * 20 + y) % 256 for x in range(w)) for y in range(h)]), 2)
image_seed("gray_alpha.png.bin", png(w, h, 4, 8, [bytes(v for x in range(w) for v in ((x * 20) % 256, y * 25)) for y in range(h)]), 3)
image_seed("rgba.png.bin", png(w, h, 6, 8, [b"".join(bytes(rgb(x, y) + (200,)) for x in range(w)) for y in range(h)]), 4)
image_seed("rgb16.png.bin", png(w, h, 2, 16, [b"".join(struct.pack(">HHH", *(c * 257 for c in rgb(x, y))) for x in range(w)) for y in range(h)]), 5)
pal = b"".join(bytes(rgb(i, i)) for i in range(16))
image_seed("palette.png.bin", png(w, h, 3, 4, [bytes(((2 * x) % 16) << 4 | ((2 * x + 1) % 16) for x in range((w + 1) // 2)) for y in range(h)], plte=pal, trns=b"\x80" * 4), 6)
image_seed("one_pixel.png.bin", png(1, 1, 2, 8, [b"\x10\x20\x30"]), 7)
image_seed("rgb24.bmp.bin", bmp24(w, h, rgb), 8)
image_seed("gray8.bmp.bin", bmp8_gray(7, 5, lambda x, y: x * 30 + y), 9)

# Direct op calls: a mode byte 1 and random parameter bytes (the target reads what it needs).
for i in range(8):
    put(img_dir, f"ops{i}.bin", b"\x01" + bytes(rng.randrange(256) for _ in range(120 + 40 * i)))


def idx_images(n, hh, ww):
    return struct.pack(">IIII", 0x0803, n, hh, ww) + bytes(rng.randrange(256) for _ in range(n * hh * ww))


def idx_labels(n, nclass=10):
    return struct.pack(">II", 0x0801, n) + bytes(rng.randrange(nclass) for _ in range(n))


def idx_seed(name, flags, labels, images):
    put(idx_dir, name, bytes([flags]) + struct.pack("<H", len(labels)) + labels + images)


idx_seed("plain.bin", 0, idx_labels(5), idx_images(5, 6, 6))
idx_seed("gz.bin", 1 | 2, idx_labels(4), idx_images(4, 5, 7))
idx_seed("gz_images_only.bin", 1, idx_labels(3, 3), idx_images(3, 8, 4))
idx_seed("no_labels.bin", 4, b"", idx_images(6, 4, 4))
idx_seed("by_dir.bin", 16, idx_labels(2), idx_images(2, 28, 28))
idx_seed("by_dir_gz.bin", 16 | 1 | 2, idx_labels(3), idx_images(3, 3, 9))
idx_seed("damaged_gz.bin", 1 | 8, idx_labels(2), idx_images(2, 4, 4))
idx_seed("one_by_one.bin", 0, idx_labels(1, 1), idx_images(1, 1, 1))
print("seeds in", img_dir, "and", idx_dir)

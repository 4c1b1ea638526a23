#!/usr/bin/env python3
"""Milliseconds per 12-megapixel photo for all variants, against naive Pillow in the same run.

It generates a photo-like 4000x3000 JPEG at quality 92 (smooth colour fields from upscaled
noise at three scales, shapes with hard outlines, thin bright lines, film grain: about 5 MB,
like a phone camera's) and makes the default variants (widths 320, 640, 1280 x AVIF, WebP,
progressive JPEG) three ways, interleaved over ``--rounds`` rounds:

- **ours**: ``transcode.images.run`` (JPEG decoded at reduced DCT scale with ``draft``, each
  width resized from the smallest image already made that is at least twice as wide);
- **naive**: for each width x format, ``Image.open`` + ``convert("RGB")`` + LANCZOS ``resize``
  from full size + save: what a straightforward script does;
- **naive-once**: a stronger baseline: open and convert once, then per width one LANCZOS
  resize from full size, saved in the three formats.

All three use the same encoder settings (``ImageSettings`` defaults), so the difference is
decode and resize work only. It also times decode + the three resizes alone (no encoding),
ours against naive-once, which is what ``draft`` changes. The goal is ours <= 0.55x naive.
Ratios are of the best round of each, in wall time and in CPU time (all threads of the
process: steadier when other work shares the machine); absolute times move from run to run.
It prints the bytes of each format at each width and writes ``bench/results/images.json``.

    .venv/bin/python bench/images.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import PIL  # noqa: E402
from PIL import Image, ImageChops, ImageDraw, ImageFilter  # noqa: E402

from transcode.images import (  # noqa: E402
    ImageSettings,
    decode,
    display_size,
    encoder_options,
    open_image,
    plan_variants,
    resize,
    run,
)

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "images.json"
GOAL_RATIO = 0.55
SETTINGS = ImageSettings()


def _octave(size: tuple[int, int], cell_px: int, sigma: float) -> Image.Image:
    small = (max(2, size[0] // cell_px), max(2, size[1] // cell_px))
    return Image.effect_noise(small, sigma).resize(size, Image.Resampling.BICUBIC)


def make_photo(path: Path, size: tuple[int, int] = (4000, 3000), seed: int = 7) -> None:
    rnd = random.Random(seed)  # noqa: S311 - a reproducible test picture
    w, h = size
    luma = Image.blend(_octave(size, 500, 60), _octave(size, 80, 50), 0.35)
    luma = Image.blend(luma, _octave(size, 12, 40), 0.2)
    chroma = [_octave(size, 700, 25), _octave(size, 600, 25)]
    im = Image.merge("YCbCr", [luma, *chroma]).convert("RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(40):
        x, y, r = rnd.randrange(w), rnd.randrange(h), rnd.randrange(40, 500)
        fill = (rnd.randrange(40, 220), rnd.randrange(40, 220), rnd.randrange(40, 220))
        shape = draw.ellipse if rnd.random() < 0.5 else draw.rectangle
        shape((x, y, x + r, y + r * 0.6), fill=fill, outline=(20, 20, 20), width=3)
    for y in range(0, h, 37):
        draw.line((rnd.randrange(w), y, rnd.randrange(w), y + rnd.randrange(-30, 30)), (240,) * 3)
    im = im.filter(ImageFilter.GaussianBlur(0.8))
    grain = Image.effect_noise(size, 10)
    im = ImageChops.add(im, Image.merge("RGB", [grain] * 3), 1.0, -128)
    im.save(path, quality=92)


def naive(source: Path, out_dir: Path) -> None:
    for width in SETTINGS.widths:
        for fmt in SETTINGS.formats:
            with Image.open(source) as im:
                rgb = im.convert("RGB")
            height = round(rgb.height * width / rgb.width)
            variant = rgb.resize((width, height), Image.Resampling.LANCZOS)
            variant.save(out_dir / f"w{width}.{fmt}", **encoder_options(fmt, SETTINGS))


def naive_once(source: Path, out_dir: Path) -> None:
    with Image.open(source) as im:
        rgb = im.convert("RGB")
    for width in SETTINGS.widths:
        height = round(rgb.height * width / rgb.width)
        variant = rgb.resize((width, height), Image.Resampling.LANCZOS)
        for fmt in SETTINGS.formats:
            variant.save(out_dir / f"w{width}.{fmt}", **encoder_options(fmt, SETTINGS))


def ours(source: Path, out_dir: Path) -> None:
    run(source, out_dir, SETTINGS)


def decode_resize_naive(source: Path, _out_dir: Path) -> None:
    with Image.open(source) as im:
        rgb = im.convert("RGB")
    for width in SETTINGS.widths:
        rgb.resize((width, round(rgb.height * width / rgb.width)), Image.Resampling.LANCZOS)


def decode_resize_ours(source: Path, _out_dir: Path) -> None:
    with open_image(source, SETTINGS.max_pixels) as im:
        plan = plan_variants(display_size(im), SETTINGS)
        decode(im, plan, SETTINGS.max_pixels)
        current: Image.Image = im
        for width in reversed(plan.widths):
            current = resize(current, (width, round(current.height * width / current.width)))


def timed_ms(method: Callable[[Path, Path], None], source: Path) -> tuple[float, float]:
    """(wall, CPU) milliseconds; CPU counts every thread of this process (AVIF uses two)."""
    with tempfile.TemporaryDirectory() as out:
        start, start_cpu = time.perf_counter(), time.process_time()
        method(source, Path(out))
        return (time.perf_counter() - start) * 1000, (time.process_time() - start_cpu) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()

    methods: dict[str, Callable[[Path, Path], None]] = {
        "ours": ours,
        "naive": naive,
        "naive-once": naive_once,
        "decode+resize ours": decode_resize_ours,
        "decode+resize naive": decode_resize_naive,
    }
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "photo.jpg"
        make_photo(source)
        source_bytes = source.stat().st_size
        runs: dict[str, list[float]] = {name: [] for name in methods}
        cpu_runs: dict[str, list[float]] = {name: [] for name in methods}
        timed_ms(ours, source)  # warm-up: imports, codec initialisation, page cache
        for _ in range(args.rounds):
            for name, method in methods.items():
                wall_ms, cpu_ms = timed_ms(method, source)
                runs[name].append(wall_ms)
                cpu_runs[name].append(cpu_ms)
        out_dir = Path(work) / "out"
        out_dir.mkdir()
        outputs = run(source, out_dir, SETTINGS)

    best = {name: min(times) for name, times in runs.items()}
    best_cpu = {name: min(times) for name, times in cpu_runs.items()}
    pairs = {
        "ours/naive": ("ours", "naive"),
        "ours/naive-once": ("ours", "naive-once"),
        "decode+resize ours/naive": ("decode+resize ours", "decode+resize naive"),
    }
    ratios = {label: best[a] / best[b] for label, (a, b) in pairs.items()}
    cpu_ratios = {label: best_cpu[a] / best_cpu[b] for label, (a, b) in pairs.items()}
    print(f"source: 4000x3000 JPEG q92, {source_bytes:,} bytes; {args.rounds} rounds\n")
    print(f"{'method':<22}{'best ms':>10}{'median ms':>11}{'best CPU ms':>13}")
    for name, times in runs.items():
        median = statistics.median(times)
        print(f"{name:<22}{best[name]:>10.0f}{median:>11.0f}{best_cpu[name]:>13.0f}")
    print(f"\n{'ratio (best of each)':<28}{'wall':>7}{'CPU':>7}")
    for name, ratio in ratios.items():
        verdict = ""
        if name == "ours/naive":
            verdict = "  (goal <= 0.55: " + ("met)" if ratio <= GOAL_RATIO else "NOT met)")
        print(f"{name:<28}{ratio:6.2f}x{cpu_ratios[name]:6.2f}x{verdict}")

    variants = outputs.details["variants"]
    print(f"\n{'width':>6}{'height':>8}{'avif':>10}{'webp':>10}{'jpeg':>10}   bytes")
    for width in outputs.details["widths"]:
        row = {v["format"]: v for v in variants if v["width"] == width}
        height = row["jpeg"]["height"]
        cells = "".join(f"{row[fmt]['bytes']:>10,}" for fmt in ("avif", "webp", "jpeg"))
        print(f"{width:>6}{height:>8}{cells}")
    decoded = outputs.details["source"]["decoded"]
    print(f"\nours decoded the JPEG at {decoded[0]}x{decoded[1]} (draft)")

    result: dict[str, Any] = {
        "source": {"width": 4000, "height": 3000, "jpeg_quality": 92, "bytes": source_bytes},
        "settings": {
            "widths": list(SETTINGS.widths),
            "avif": {"quality": SETTINGS.avif_quality, "speed": SETTINGS.avif_speed},
            "webp": {"quality": SETTINGS.webp_quality, "method": SETTINGS.webp_method},
            "jpeg": {"quality": SETTINGS.jpeg_quality, "progressive": True, "optimize": True},
        },
        "rounds": args.rounds,
        "runs_ms": runs,
        "cpu_runs_ms": cpu_runs,
        "best_ms": best,
        "best_cpu_ms": best_cpu,
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,
        "goal": {"ours/naive": GOAL_RATIO, "met": ratios["ours/naive"] <= GOAL_RATIO},
        "variants": variants,
        "decoded": decoded,
        "machine": {"python": platform.python_version(), "pillow": PIL.__version__},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

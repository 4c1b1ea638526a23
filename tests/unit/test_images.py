"""Images → variants: orientation, metadata, colour, alpha, widths, bombs and bad input.

Sources are made with Pillow in tmp_path. Most cases use small widths so that AVIF encoding
stays quick; one case runs the default widths.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import ExifTags, Image, ImageCms, ImageDraw, ImageFile

from transcode.base import PermanentFault
from transcode.images import (
    ImageSettings,
    draft_request,
    plan_variants,
    plan_widths,
    run,
)

SMALL = ImageSettings(widths=(64, 128, 256))
RED = (220, 30, 30)


def run_ok(source: Path, out: Path, settings: ImageSettings = SMALL) -> Any:
    out.mkdir()
    reports: list[tuple[str, float]] = []
    outputs = run(source, out, settings, lambda stage, f: reports.append((stage, f)))
    assert {f.name for f in outputs.files} == {v["name"] for v in outputs.details["variants"]}
    fractions = [f for _, f in reports]
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)
    assert sum(stage == "encode" for stage, _ in reports) == len(outputs.files)
    return outputs


def opened(path: Path) -> Image.Image:
    im = Image.open(path)
    im.load()
    return im


def assert_no_metadata(im: Image.Image) -> None:
    assert not im.getexif(), im.getexif()
    for key in ("exif", "xmp", "XML:com.adobe.xmp", "icc_profile", "comment"):
        assert not im.info.get(key), (key, im.info.get(key))


def pixel_at(im: Image.Image, xy: tuple[int, int], mode: str = "RGB") -> tuple[int, ...]:
    pixel = im.convert(mode).getpixel(xy)
    assert isinstance(pixel, tuple)
    return pixel


def close(a: tuple[int, ...], b: tuple[int, ...], tolerance: int = 10) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


# ---- pure planning --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source_width", "widths", "expected"),
    [
        (2000, (320, 640, 1280), (320, 640, 1280)),
        (1280, (320, 640, 1280), (320, 640, 1280)),
        (1000, (320, 640, 1280), (320, 640, 1000)),
        (500, (320, 640, 1280), (320, 500)),
        (640, (320, 640, 1280), (320, 640)),
        (200, (320, 640, 1280), (200,)),
        (1, (320, 640, 1280), (1,)),
        (900, (1280, 320), (320, 900)),
    ],
)
def test_widths_are_never_upscaled(
    source_width: int, widths: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    assert plan_widths(source_width, widths) == expected


@pytest.mark.parametrize(
    ("display", "primary", "names"),
    [
        ((2000, 1500), "w640.jpg", ["w1280.avif", "w1280.webp", "w1280.jpg", "w640.avif"]),
        ((500, 400), "w500.jpg", ["w500.avif", "w500.webp", "w500.jpg", "w320.avif"]),
        ((200, 100), "w200.jpg", ["w200.avif", "w200.webp", "w200.jpg"]),
    ],
)
def test_plan_names_and_primary(display: tuple[int, int], primary: str, names: list[str]) -> None:
    plan = plan_variants(display, ImageSettings())
    assert plan.primary == primary
    assert [v.name for v in plan.variants][: len(names)] == names


@pytest.mark.parametrize(
    ("stored", "orientation", "largest", "expected"),
    [
        ((4000, 3000), 1, (1280, 960), (1280, 960)),
        ((4000, 3000), 6, (1280, 1707), (1707, 1280)),
        ((4000, 3000), 3, (1280, 960), (1280, 960)),
        ((1000, 800), 1, (1280, 1024), (1000, 800)),
    ],
)
def test_draft_request_is_in_stored_orientation(
    stored: tuple[int, int], orientation: int, largest: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert draft_request(stored, orientation, largest) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"widths": ()},
        {"widths": (0, 320)},
        {"widths": (320, 320)},
        {"formats": ("avif", "webp")},
        {"avif_quality": 101},
        {"webp_method": 7},
        {"max_pixels": 10**12},
    ],
)
def test_settings_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each message names its field
        ImageSettings(**kwargs)


# ---- the pipeline ---------------------------------------------------------------------------


def test_exif_orientation_applied_and_metadata_stripped(tmp_path: Path) -> None:
    # Stored landscape 2000x1500 with a red corner at the stored top-left; orientation 6 means
    # "rotate 90 degrees clockwise to display": displayed portrait, red corner at the top-right.
    im = Image.new("RGB", (2000, 1500), (40, 90, 160))
    ImageDraw.Draw(im).rectangle((0, 0, 399, 299), fill=RED)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "PhoneCo"
    exif[ExifTags.Base.Model] = "Budget 5G"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (26.0, 51.0, 0.0)
    source = tmp_path / "rotated.jpg"
    im.save(source, quality=90, exif=exif, comment=b"taken in Kota")
    assert Image.open(source).getexif().get_ifd(ExifTags.IFD.GPSInfo)  # the source has GPS

    outputs = run_ok(source, tmp_path / "out")

    assert outputs.details["source"]["orientation"] == 6
    assert outputs.details["widths"] == [64, 128, 256]
    for f in outputs.files:
        out = opened(f.path)
        width = int(f.name[1:].split(".")[0])
        assert out.size == (width, round(2000 * width / 1500)), f.name
        assert out.mode == "RGB"
        assert_no_metadata(out)
        corner, other = pixel_at(out, (out.width - 3, 2)), pixel_at(out, (2, 2))
        assert close(corner, RED, 40), (f.name, corner)
        assert not close(other, RED, 60), (f.name, other)


def test_default_widths_formats_and_details(tmp_path: Path) -> None:
    source = tmp_path / "wide.png"
    Image.linear_gradient("L").resize((1600, 900)).convert("RGB").save(source)
    outputs = run_ok(source, tmp_path / "out", ImageSettings())

    assert outputs.primary == "w640.jpg"
    assert sorted(f.name for f in outputs.files) == sorted(
        f"w{w}.{ext}" for w in (320, 640, 1280) for ext in ("avif", "webp", "jpg")
    )
    by_name = {f.name: f for f in outputs.files}
    for detail in outputs.details["variants"]:
        f = by_name[detail["name"]]
        assert detail["bytes"] == f.path.stat().st_size > 0
        out = opened(f.path)
        assert out.size == (detail["width"], detail["height"])
        assert out.format == {"avif": "AVIF", "webp": "WEBP", "jpeg": "JPEG"}[detail["format"]]
        assert f.content_type == Image.MIME[out.format]
        if out.format == "JPEG":
            assert out.info.get("progressive")
            assert out.info.get("progression")
    assert outputs.details["source"]["decoded"] == [1600, 900]  # not a JPEG: no draft


def test_narrow_image_is_not_upscaled(tmp_path: Path) -> None:
    source = tmp_path / "narrow.png"
    Image.new("RGB", (500, 300), (10, 200, 10)).save(source)
    outputs = run_ok(source, tmp_path / "out", ImageSettings())
    assert outputs.details["widths"] == [320, 500]
    assert sorted(f.name for f in outputs.files) == sorted(
        f"w{w}.{ext}" for w in (320, 500) for ext in ("avif", "webp", "jpg")
    )
    assert outputs.primary == "w500.jpg"
    assert opened(tmp_path / "out" / "w500.webp").size == (500, 300)


def test_alpha_kept_in_avif_and_webp_and_flattened_onto_white_in_jpeg(tmp_path: Path) -> None:
    im = Image.new("RGBA", (300, 200), (0, 0, 255, 0))  # fully transparent …
    ImageDraw.Draw(im).rectangle((100, 50, 199, 149), fill=(0, 0, 255, 255))  # … opaque blue
    source = tmp_path / "logo.png"
    im.save(source)
    outputs = run_ok(source, tmp_path / "out", ImageSettings(widths=(150,)))
    assert outputs.details["alpha"] is True

    for name in ("w150.avif", "w150.webp"):
        out = opened(tmp_path / "out" / name)
        assert out.mode == "RGBA", name
        assert pixel_at(out, (2, 2), "RGBA")[3] < 10, name
        assert pixel_at(out, (75, 50), "RGBA")[3] > 245, name
    jpeg = opened(tmp_path / "out" / "w150.jpg")
    assert jpeg.mode == "RGB"
    assert close(pixel_at(jpeg, (2, 2)), (255, 255, 255), 8)
    assert close(pixel_at(jpeg, (75, 50)), (0, 0, 255), 12)


def test_palette_with_transparency_and_opaque_rgba(tmp_path: Path) -> None:
    pal = Image.new("P", (80, 80), 0)
    pal.putpalette([255, 255, 0, 0, 0, 0])
    ImageDraw.Draw(pal).rectangle((0, 0, 39, 79), fill=1)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "pal.gif", transparency=1)
    opaque = Image.new("RGBA", (80, 80), (9, 9, 9, 255))
    opaque.save(tmp_path / "opaque.png")

    pal_out = run_ok(tmp_path / "pal.gif", tmp_path / "p", ImageSettings(widths=(80,)))
    assert pal_out.details["alpha"] is True
    assert opened(tmp_path / "p" / "w80.webp").mode == "RGBA"
    opaque_out = run_ok(tmp_path / "opaque.png", tmp_path / "o", ImageSettings(widths=(80,)))
    assert opaque_out.details["alpha"] is False  # an all-opaque alpha channel is dropped
    assert opened(tmp_path / "o" / "w80.webp").mode == "RGB"


def test_multi_picture_jpeg_uses_its_first_picture(tmp_path: Path) -> None:
    source = tmp_path / "stereo.jpg"  # MPO: what many phone cameras write
    first, second = Image.new("RGB", (200, 100), RED), Image.new("RGB", (200, 100), (0, 200, 0))
    first.save(source, format="MPO", save_all=True, append_images=[second])
    outputs = run_ok(source, tmp_path / "out", ImageSettings(widths=(100,)))
    assert outputs.details["source"]["format"] == "MPO"
    assert close(pixel_at(opened(tmp_path / "out" / "w100.jpg"), (50, 25)), RED, 12)


# -- colour: a hand-built ICC v2 matrix/TRC profile with Adobe RGB (1998) primaries ----------


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + bytes(4) + _s15(x) + _s15(y) + _s15(z)


def adobe_rgb_like_profile() -> bytes:
    desc = b"Kshipra test Adobe RGB\0"
    curv = b"curv" + bytes(4) + struct.pack(">IH", 1, round(2.2 * 256)) + bytes(2)
    tags = [
        (b"desc", b"desc" + bytes(4) + struct.pack(">I", len(desc)) + desc + bytes(8 + 3 + 67)),
        (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", _xyz(0.6097, 0.3111, 0.0195)),
        (b"gXYZ", _xyz(0.2053, 0.6257, 0.0609)),
        (b"bXYZ", _xyz(0.1492, 0.0632, 0.7446)),
        (b"rTRC", curv),
        (b"gTRC", curv),
        (b"bTRC", curv),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        padded = body + bytes(-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(padded))
        data += padded
    header = (
        struct.pack(">I", offset + len(data))
        + b"none"
        + bytes([2, 0x10, 0, 0])
        + b"mntrRGB XYZ "
        + bytes(12)
        + b"acsp"
        + bytes(24)
        + bytes(4)
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)
        + bytes(48)
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def test_embedded_non_srgb_profile_is_converted_to_srgb(tmp_path: Path) -> None:
    icc = adobe_rgb_like_profile()
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    assert "Adobe" in ImageCms.getProfileDescription(profile)
    # (200, 50, 50) in Adobe RGB is a more saturated red than (200, 50, 50) in sRGB: about
    # (232, 46, 46) once converted; grey stays grey.
    im = Image.new("RGB", (96, 64), (200, 50, 50))
    ImageDraw.Draw(im).rectangle((0, 0, 95, 15), fill=(128, 128, 128))
    source = tmp_path / "adobe.png"
    im.save(source, icc_profile=icc)

    outputs = run_ok(source, tmp_path / "out", ImageSettings(widths=(96,)))

    assert outputs.details["source"]["colour"] == "icc"
    for f in outputs.files:
        out = opened(f.path)
        assert out.mode == "RGB"
        assert "icc_profile" not in out.info
        red, grey = pixel_at(out, (48, 48)), pixel_at(out, (48, 4))
        assert close(red, (232, 46, 46), 8), (f.name, red)
        assert close(grey, (129, 129, 129), 6), (f.name, grey)


def test_srgb_profile_is_left_alone(tmp_path: Path) -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = tmp_path / "srgb.jpg"
    Image.new("RGB", (64, 64), (200, 50, 50)).save(source, icc_profile=srgb, quality=95)
    outputs = run_ok(source, tmp_path / "out", ImageSettings(widths=(64,)))
    assert outputs.details["source"]["colour"] == "srgb"
    out = opened(tmp_path / "out" / "w64.jpg")
    assert close(pixel_at(out, (32, 32)), (200, 50, 50), 8)
    assert "icc_profile" not in out.info


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    source = tmp_path / "print.jpg"
    Image.new("CMYK", (120, 80), (0, 255, 255, 0)).save(source, quality=95)  # pure red ink
    assert Image.open(source).mode == "CMYK"
    outputs = run_ok(source, tmp_path / "out", ImageSettings(widths=(120,)))
    assert outputs.details["source"]["colour"] == "cmyk"
    for f in outputs.files:
        out = opened(f.path)
        assert out.mode == "RGB", f.name
        assert close(pixel_at(out, (60, 40)), (255, 0, 0), 12), f.name


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path: Path) -> None:
    # 2600x1950 → largest variant 1280x960: libjpeg can decode at 1/2 scale (1300x975).
    im = Image.linear_gradient("L").resize((2600, 1950)).convert("RGB")
    source = tmp_path / "big.jpg"
    im.save(source, quality=90)
    outputs = run_ok(source, tmp_path / "out", ImageSettings(widths=(320, 1280)))
    assert outputs.details["source"]["decoded"] == [1300, 975]
    out = opened(tmp_path / "out" / "w1280.jpg")
    assert out.size == (1280, 960)
    top, bottom = pixel_at(out, (640, 5)), pixel_at(out, (640, 954))  # a top-to-bottom ramp
    assert top[0] < 15
    assert bottom[0] > 240


# ---- refusals -------------------------------------------------------------------------------


def huge_png(path: Path, width: int, height: int) -> Path:
    """A real, all-black 1-bit PNG of width x height: tiny on disk, huge decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    row = bytes(1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize(
    ("width", "height", "max_pixels", "limit_text"),
    [
        (20_000, 20_000, 50_000_000, "50,000,000"),  # over twice Pillow's limit: its error
        (10_000, 10_000, 50_000_000, "50,000,000"),  # over Pillow's limit: its warning
        (8_000, 8_000, 50_000_000, "50,000,000"),  # under Pillow's, over ours
        (1_200, 1_000, 1_000_000, "1,000,000"),  # a lower configured limit
    ],
)
def test_decompression_bombs_are_refused(
    tmp_path: Path, width: int, height: int, max_pixels: int, limit_text: str
) -> None:
    source = huge_png(tmp_path / "bomb.png", width, height)
    assert source.stat().st_size < 200_000
    filters_before = list(warnings.filters)
    (tmp_path / "out").mkdir()
    with pytest.raises(PermanentFault, match=f"limit of {limit_text} pixels"):
        run(source, tmp_path / "out", ImageSettings(max_pixels=max_pixels))
    assert warnings.filters == filters_before  # the warning filter was local
    assert list((tmp_path / "out").iterdir()) == []


def test_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    whole = tmp_path / "whole.jpg"
    Image.linear_gradient("L").resize((600, 400)).convert("RGB").save(whole, quality=90)
    source = tmp_path / "truncated.jpg"
    source.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (tmp_path / "out").mkdir()
    with pytest.raises(PermanentFault, match="truncated"):
        run(source, tmp_path / "out", SMALL)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.txt", b"Kinematics: v = u + at\n"),
        ("empty.jpg", b""),
        ("fake.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
        ("bundle.json", b'{"bundle": "x", "questions": []}'),
    ],
)
def test_not_an_image_is_refused(tmp_path: Path, name: str, content: bytes) -> None:
    source = tmp_path / name
    source.write_bytes(content)
    (tmp_path / "out").mkdir()
    with pytest.raises(PermanentFault):
        run(source, tmp_path / "out", SMALL)


def test_refuses_to_run_if_truncated_loading_was_switched_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    source = tmp_path / "ok.png"
    Image.new("RGB", (10, 10)).save(source)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        run(source, tmp_path, SMALL)


def test_missing_source_is_not_a_permanent_fault(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run(tmp_path / "gone.jpg", tmp_path, SMALL)

"""Images → width x format variants for small phones.

One uploaded image becomes ``w{width}.{avif,webp,jpg}`` for each planned width. The pipeline
is an ordered list of small steps; each is a function below, in this order:

1. :func:`open_image` — identify the file among the formats the origin accepts (JPEG, PNG,
   GIF, WebP, AVIF) and refuse decompression bombs from the header alone;
2. :func:`plan_variants` (pure) — widths never upscaled, names, primary;
3. :func:`decode` — a JPEG is decoded at reduced DCT scale (``Image.draft``) when the largest
   variant needs at most half, a third … of its pixels; truncated data is refused;
4. :func:`orient` — the EXIF orientation applied;
5. :func:`to_working_mode` and :func:`to_srgb` — P/LA/1/16-bit modes to RGB(A), CMYK and
   embedded ICC profiles to sRGB;
6. :func:`strip_metadata` — EXIF, XMP, ICC, comments and text chunks dropped: every output is
   plain sRGB and carries nothing about the camera or where it was;
7. :func:`resize` (per width, largest first) and :func:`encode` (per format).

Encoder settings (:class:`ImageSettings` defaults) and why:

* AVIF quality 50, speed 8 (libaom): on a 1280-px photo speed 8 is ~3.5x faster than speed 7
  and no bigger; quality 50 is visually clean at phone sizes;
* WebP quality 75, method 4: libwebp's own default trade-off;
* JPEG quality 80, progressive, optimised Huffman tables, 4:2:0: the most compatible format,
  and progressive so a slow 2G download shows a whole (blurry) picture early.

Alpha is kept in AVIF and WebP (and dropped when fully opaque); JPEG gets it flattened onto
white. Animated images keep their first frame.

Plain blocking code: the worker runs :func:`run` in an executor.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from transcode.base import OutputFile, Outputs, PermanentFault, Progress, no_progress

ImageFormat = Literal["avif", "webp", "jpeg"]

ACCEPTED_SOURCE_FORMATS: Final = ("JPEG", "PNG", "GIF", "WEBP", "AVIF")
"""Pillow plugins allowed to open an upload: what the origin accepts as an image. Others are
never tried. (The JPEG plugin also opens the multi-picture JPEGs, MPO, many phones write.)"""

_EXTENSION: Final[dict[ImageFormat, str]] = {"avif": "avif", "webp": "webp", "jpeg": "jpg"}
_CONTENT_TYPE: Final[dict[ImageFormat, str]] = {
    "avif": "image/avif",
    "webp": "image/webp",
    "jpeg": "image/jpeg",
}
_WHITE: Final = (255, 255, 255)
_SRGB: Final = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_ROTATED_ORIENTATIONS: Final = frozenset({5, 6, 7, 8})
"""EXIF orientations that swap width and height when applied."""
_EXIF_ORIENTATION_TAG: Final = 0x0112

Colour = Literal["srgb", "icc", "cmyk", "icc-ignored"]
"""How the source's colours reached sRGB: already sRGB (no profile, or an sRGB one);
converted from its embedded ICC profile; CMYK without a profile converted by formula; or a
profile that could not be read or does not fit the pixels, ignored (pixels taken as sRGB)."""


# ---- settings -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageSettings:
    widths: tuple[int, ...] = (320, 640, 1280)
    """Target widths in pixels. Never upscaled: a width at or above the source's becomes one
    variant at the source width. The middle one's JPEG is the primary output."""
    formats: tuple[ImageFormat, ...] = ("avif", "webp", "jpeg")
    avif_quality: int = 50
    avif_speed: int = 8
    webp_quality: int = 75
    webp_method: int = 4
    jpeg_quality: int = 80
    max_pixels: int = 50_000_000
    """Larger images (width x height, from the header) are refused as decompression bombs.
    Must not exceed Pillow's ``Image.MAX_IMAGE_PIXELS``, above which Pillow's own warning
    (turned into an error here) refuses them anyway."""

    def __post_init__(self) -> None:
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive and not empty: {self.widths!r}")
        if len(set(self.widths)) != len(self.widths):
            raise ValueError(f"widths must be distinct: {self.widths!r}")
        if "jpeg" not in self.formats or len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats must be distinct and include jpeg: {self.formats!r}")
        for name, value, low, high in (
            ("avif_quality", self.avif_quality, 0, 100),
            ("avif_speed", self.avif_speed, 0, 10),
            ("webp_quality", self.webp_quality, 0, 100),
            ("webp_method", self.webp_method, 0, 6),
            ("jpeg_quality", self.jpeg_quality, 1, 95),
        ):
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}]: {value}")
        pillow_limit = Image.MAX_IMAGE_PIXELS
        if self.max_pixels < 1 or (pillow_limit is not None and self.max_pixels > pillow_limit):
            raise ValueError(
                f"max_pixels must be in [1, {pillow_limit}] (Pillow's own limit): {self.max_pixels}"
            )


# ---- the plan (pure) ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Variant:
    width: int
    height: int
    format: ImageFormat

    @property
    def name(self) -> str:
        return f"w{self.width}.{_EXTENSION[self.format]}"

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPE[self.format]


@dataclass(frozen=True, slots=True)
class Plan:
    widths: tuple[int, ...]
    """Output widths, ascending."""
    variants: tuple[Variant, ...]
    """In encoding order: largest width first, formats in settings order."""
    primary: str


def plan_widths(source_width: int, widths: tuple[int, ...]) -> tuple[int, ...]:
    """The widths to make, ascending: each configured width, capped at the source's width.

    >>> plan_widths(2000, (320, 640, 1280)), plan_widths(500, (320, 640, 1280))
    ((320, 640, 1280), (320, 500))
    """
    return tuple(sorted({min(w, source_width) for w in widths}))


def scaled_height(source_size: tuple[int, int], width: int) -> int:
    source_width, source_height = source_size
    return max(1, round(source_height * width / source_width))


def plan_variants(display_size: tuple[int, int], settings: ImageSettings) -> Plan:
    """What to make from an image of ``display_size`` (after orientation)."""
    widths = plan_widths(display_size[0], settings.widths)
    variants = tuple(
        Variant(w, scaled_height(display_size, w), fmt)
        for w in reversed(widths)
        for fmt in settings.formats
    )
    configured = sorted(settings.widths)
    primary_width = min(configured[len(configured) // 2], display_size[0])
    return Plan(widths, variants, f"w{primary_width}.{_EXTENSION['jpeg']}")


def draft_request(
    stored_size: tuple[int, int], orientation: int, largest: tuple[int, int]
) -> tuple[int, int]:
    """The size to ask ``Image.draft`` for, in the file's stored orientation, so that the
    decoded image is at least ``largest`` (a display-orientation size) in both directions."""
    if orientation in _ROTATED_ORIENTATIONS:
        largest = (largest[1], largest[0])
    return (min(largest[0], stored_size[0]), min(largest[1], stored_size[1]))


# ---- the steps ------------------------------------------------------------------------------


def _require_strict_loading() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: truncated uploads "
            "would be published padded with grey; something set it, and it must stay False"
        )


@contextmanager
def _bombs_refused() -> Iterator[None]:
    """Pillow's ``DecompressionBombWarning`` raised as an error, for this block only.

    ``warnings.catch_warnings`` swaps process-wide state and is not thread-safe before
    Python 3.14; if a concurrent thread's block restores the filters under us, the warning
    is merely printed and :func:`open_image`'s own, lower, limit still refuses the image.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _refuse_bomb(exc: Exception, max_pixels: int) -> PermanentFault:
    return PermanentFault(f"image refused: more than the limit of {max_pixels:,} pixels ({exc})")


def _is_decode_error(exc: BaseException) -> bool:
    """Errors Pillow raises for bad data, as opposed to a failing disk (an OSError with an
    errno), which stays a transient fault."""
    if isinstance(exc, OSError):
        return exc.errno is None
    return isinstance(exc, SyntaxError | ValueError | EOFError | IndexError)


def open_image(source: Path, max_pixels: int) -> ImageFile.ImageFile:
    """Identify ``source`` and read its header; refuse bombs before decoding anything."""
    try:
        im = Image.open(source, formats=ACCEPTED_SOURCE_FORMATS)
    except UnidentifiedImageError as exc:
        raise PermanentFault(
            "not an image in an accepted format (JPEG, PNG, GIF, WebP, AVIF)"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _refuse_bomb(exc, max_pixels) from exc
    except Exception as exc:
        if _is_decode_error(exc):
            raise PermanentFault(f"unreadable {source.suffix or 'image'} header: {exc}") from exc
        raise
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise PermanentFault(
            f"image refused: {width}x{height} = {width * height:,} pixels is more than the "
            f"limit of {max_pixels:,} pixels"
        )
    return im


def orientation_of(im: Image.Image) -> int:
    value = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def display_size(im: Image.Image) -> tuple[int, int]:
    width, height = im.size
    return (height, width) if orientation_of(im) in _ROTATED_ORIENTATIONS else (width, height)


def decode(im: ImageFile.ImageFile, plan: Plan, max_pixels: int) -> tuple[int, int]:
    """Decode the pixels, a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that still covers
    the largest planned variant. Returns the decoded size."""
    if isinstance(im, JpegImageFile):
        largest = plan.variants[0]
        im.draft("RGB", draft_request(im.size, orientation_of(im), (largest.width, largest.height)))
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _refuse_bomb(exc, max_pixels) from exc
    except Exception as exc:
        if _is_decode_error(exc):
            raise PermanentFault(f"corrupt or truncated {im.format} image: {exc}") from exc
        raise
    return im.size


def orient(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation to the pixels (the tag itself goes with the metadata)."""
    ImageOps.exif_transpose(im, in_place=True)
    return im


def to_working_mode(im: Image.Image) -> Image.Image:
    """RGB, RGBA, L or CMYK: the modes the colour step and the encoders take."""
    mode = im.mode
    if "transparency" in im.info and mode in ("P", "L", "RGB"):
        return im.convert("RGBA")
    if mode in ("RGB", "RGBA", "L", "CMYK"):
        return im
    if mode in ("LA", "La", "PA", "RGBa"):
        return im.convert("RGBA")
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I"):  # 16-bit greyscale PNG: scale, don't clip, to 8 bits
        return im.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    return im.convert("RGB")


def _is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    return "srgb" in ImageCms.getProfileDescription(profile).lower()


def to_srgb(im: Image.Image) -> tuple[Image.Image, Colour]:
    """Convert to sRGB: from the embedded ICC profile when there is one that fits the pixels,
    CMYK without one by formula. Leaves RGB, RGBA or L."""
    icc = im.info.get("icc_profile")
    profile: ImageCms.ImageCmsProfile | None = None
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        except (OSError, ImageCms.PyCMSError):
            profile = None
    if profile is None:
        if im.mode == "CMYK":
            return im.convert("RGB"), "cmyk"
        return im, "icc-ignored" if icc else "srgb"
    space = profile.profile.xcolor_space.strip()
    fits = (space == "RGB" and im.mode in ("RGB", "RGBA")) or (
        space == "CMYK" and im.mode == "CMYK"
    )
    if not fits:
        return (im.convert("RGB") if im.mode == "CMYK" else im), "icc-ignored"
    if _is_srgb(profile):
        return im, "srgb"
    out_mode = "RGB" if im.mode == "CMYK" else im.mode
    try:
        converted = ImageCms.profileToProfile(im, profile, _SRGB, outputMode=out_mode)
    except ImageCms.PyCMSError:
        return (im.convert("RGB") if im.mode == "CMYK" else im), "icc-ignored"
    assert converted is not None  # inPlace=False returns the new image
    return converted, "icc"


def to_rgb_family(im: Image.Image) -> Image.Image:
    """RGB, or RGBA when some pixel is not fully opaque."""
    if im.mode == "RGBA":
        alpha_min, _ = im.getchannel("A").getextrema()
        return im.convert("RGB") if alpha_min == 255 else im
    return im if im.mode == "RGB" else im.convert("RGB")


def strip_metadata(im: Image.Image) -> Image.Image:
    """Drop everything in ``info`` (EXIF, XMP, ICC, comments, text chunks, dpi …): encoders
    read some of it from there, and resized copies inherit it."""
    im.info = {}
    return im


def resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    if im.size == size:
        return im
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def flatten(im: Image.Image) -> Image.Image:
    """Alpha composited onto white, for JPEG."""
    if im.mode != "RGBA":
        return im
    background = Image.new("RGB", im.size, _WHITE)
    background.paste(im, mask=im.getchannel("A"))
    return background


def encoder_options(fmt: ImageFormat, settings: ImageSettings) -> dict[str, Any]:
    if fmt == "avif":
        return {"format": "AVIF", "quality": settings.avif_quality, "speed": settings.avif_speed}
    if fmt == "webp":
        return {
            "format": "WEBP",
            "quality": settings.webp_quality,
            "method": settings.webp_method,
        }
    return {
        "format": "JPEG",
        "quality": settings.jpeg_quality,
        "progressive": True,
        "optimize": True,
        "subsampling": "4:2:0",
    }


def encode(im: Image.Image, variant: Variant, path: Path, settings: ImageSettings) -> int:
    """Write one variant; returns its size in bytes."""
    if variant.format == "jpeg":
        im = flatten(im)
    im.save(path, **encoder_options(variant.format, settings))
    return path.stat().st_size


# ---- the pipeline ---------------------------------------------------------------------------


def _resize_source(sized: list[Image.Image], decoded: Image.Image, width: int) -> Image.Image:
    """Resize from the smallest image already made that is at least twice as wide (a clean
    2:1-or-more LANCZOS reduction, far cheaper than starting over), else from the decoded one."""
    candidates = [im for im in sized if im.width >= 2 * width]
    return min(candidates, key=lambda im: im.width) if candidates else decoded


def run(
    source: Path,
    out_dir: Path,
    settings: ImageSettings | None = None,
    progress: Progress = no_progress,
) -> Outputs:
    """Make every variant of ``source`` in ``out_dir``; see the module docstring."""
    settings = settings or ImageSettings()
    _require_strict_loading()
    progress("probe", 0.0)
    with _bombs_refused():
        source_im = open_image(source, settings.max_pixels)
        with source_im:
            source_format = source_im.format or "unknown"
            stored_size = source_im.size
            orientation = orientation_of(source_im)
            plan = plan_variants(display_size(source_im), settings)
            decoded_size = decode(source_im, plan, settings.max_pixels)
            progress("decode", 0.1)
            im = orient(source_im)
            im, colour = to_srgb(to_working_mode(im))
            im = strip_metadata(to_rgb_family(im))

    files: list[OutputFile] = []
    variants: list[dict[str, Any]] = []
    sized: list[Image.Image] = []
    current: Image.Image | None = None
    for index, variant in enumerate(plan.variants, start=1):
        if current is None or current.width != variant.width:
            current = resize(
                _resize_source(sized, im, variant.width), (variant.width, variant.height)
            )
            sized.append(current)
        path = out_dir / variant.name
        size_bytes = encode(current, variant, path, settings)
        files.append(OutputFile(variant.name, path, variant.content_type))
        variants.append(
            {
                "name": variant.name,
                "width": variant.width,
                "height": variant.height,
                "format": variant.format,
                "bytes": size_bytes,
            }
        )
        progress("encode", 0.1 + 0.9 * index / len(plan.variants))

    details: dict[str, Any] = {
        "source": {
            "format": source_format,
            "width": stored_size[0],
            "height": stored_size[1],
            "orientation": orientation,
            "decoded": list(decoded_size),
            "colour": colour,
        },
        "alpha": im.mode == "RGBA",
        "widths": list(plan.widths),
        "variants": sorted(variants, key=lambda v: (v["width"], v["format"])),
    }
    return Outputs(files=files, primary=plan.primary, details=details)

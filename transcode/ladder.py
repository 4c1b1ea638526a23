"""HLS ladder planning and ffmpeg argument building: pure functions, no IO.

The ladder is data (:class:`Ladder` of :class:`Rung`), filled by the worker from configuration.
:func:`plan_encode` turns a probed source (:class:`SourceInfo`) and :class:`HlsSettings` into an
:class:`EncodePlan`: the rungs that apply to this source (never upscaled, even dimensions, the
rung's label on the short side so portrait video gets the same pixel budget), the output frame
rate, the GOP and the thumbnail grid. :func:`encode_args` turns a plan into one ffmpeg command
line: a single decode, ``split`` once per distinct output size, one encoder per rung, and the
``hls`` muxer with ``var_stream_map`` writing fMP4 segments with flat names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Literal

from assets.processing import LectureJob
from transcode.base import PermanentFault

VideoCodec = Literal["h264", "hevc"]
HevcPlacement = Literal["shared", "separate"]

AUDIO_NAME = "audio"
"""Variant name of the audio-only rendition: ``audio.m3u8``, ``audio-init.mp4``…"""
POSTER_NAME = "poster.jpg"
SPRITE_NAME = "thumbs.jpg"
SPRITE_VTT_NAME = "thumbs.vtt"
MASTER_NAME = "master.m3u8"

ACCEPTED_CONTAINERS = frozenset({"mov", "mp4", "matroska", "webm", "avi", "mpegts"})
"""Demuxers a lecture may come in: what ``assets.sniff`` accepts. Playlist and reference
formats (hls, concat, image2…) are refused so a crafted upload cannot make ffmpeg read other
files; the CLI is then forced to the same demuxer PyAV probed with."""

_STANDARD_RATES = (
    Fraction(24000, 1001),
    Fraction(24),
    Fraction(25),
    Fraction(30000, 1001),
    Fraction(30),
    Fraction(50),
    Fraction(60000, 1001),
    Fraction(60),
)


@dataclass(frozen=True, slots=True)
class Rung:
    """One rung of a ladder, before it meets a source."""

    height: int
    """The rung's label in pixels (``360`` for "360p"): the short side of the output, so a
    portrait source's 360p rung is 360 wide."""
    crf: int
    maxrate_kbps: int
    """Cap of the capped-CRF rate control (``-maxrate``)."""
    bufsize_kbps: int
    """VBV buffer (``-bufsize``); 2x maxrate lets a slide change spend up to 2 s of budget."""

    def __post_init__(self) -> None:
        if self.height < 2 or self.height % 2:
            raise ValueError(f"rung height {self.height} must be even and at least 2")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf {self.crf} outside 0..51")
        if self.maxrate_kbps <= 0 or self.bufsize_kbps <= 0:
            raise ValueError("maxrate_kbps and bufsize_kbps must be positive")

    @property
    def label(self) -> str:
        return f"{self.height}p"


@dataclass(frozen=True, slots=True)
class Ladder:
    codec: VideoCodec
    rungs: tuple[Rung, ...]
    preset: str
    """x264/x265 ``-preset``."""
    profile: str
    """``high``/``main`` for x264, ``main`` for x265 (8-bit 4:2:0 is forced in the graph)."""

    def __post_init__(self) -> None:
        if not self.rungs:
            raise ValueError("a ladder needs at least one rung")
        heights = [rung.height for rung in self.rungs]
        if heights != sorted(set(heights)):
            raise ValueError(f"rung heights must be strictly ascending, got {heights}")


DEFAULT_H264_LADDER = Ladder(
    codec="h264",
    rungs=(
        Rung(234, crf=27, maxrate_kbps=160, bufsize_kbps=320),
        Rung(360, crf=26, maxrate_kbps=320, bufsize_kbps=640),
        Rung(480, crf=25, maxrate_kbps=550, bufsize_kbps=1100),
        Rung(720, crf=24, maxrate_kbps=1100, bufsize_kbps=2200),
    ),
    preset="medium",
    profile="high",
)
"""Lecture ladder (slides and a speaker): capped CRF. Static slides land far below the caps;
the caps bound slide changes and the webcam inset for 2G/3G/4G."""

DEFAULT_HEVC_LADDER = Ladder(
    codec="hevc",
    rungs=(
        Rung(234, crf=31, maxrate_kbps=110, bufsize_kbps=220),
        Rung(360, crf=30, maxrate_kbps=220, bufsize_kbps=440),
        Rung(480, crf=29, maxrate_kbps=380, bufsize_kbps=760),
        Rung(720, crf=28, maxrate_kbps=750, bufsize_kbps=1500),
    ),
    preset="fast",
    profile="main",
)
"""HEVC (``hvc1``) for phones that decode it: x265's CRF scale sits about 4 above x264's, and the
caps are about two thirds of H.264's. On the generated lecture (bench/transcode_ladder.py) it
saves 6-12 % of the bytes at about 1 dB lower SSIM, for 2.1x the CPU of the H.264 ladder.
Synthetic screen content flatters x264, so check real lectures before tuning further."""


@dataclass(frozen=True, slots=True)
class HlsSettings:
    h264: Ladder = DEFAULT_H264_LADDER
    hevc: Ladder | None = DEFAULT_HEVC_LADDER
    """``None``: H.264 only."""
    hevc_placement: HevcPlacement = "shared"
    """``shared``: the HEVC rungs are encoders in the H.264 process, fed by the same decode
    and the same scalers (measured: 0.86-0.93x the CPU of two processes, same wall time);
    ``separate``: a second ffmpeg process with its own decode."""
    segment_s: int = 6
    keyframe_interval_s: int = 2
    max_fps: Fraction = Fraction(30)
    """Higher source rates are divided by the smallest integer that brings them under this."""
    audio_kbps: int = 32
    audio_channels: int = 1
    audio_sample_rate_hz: int = 24000
    """Speech at 32 kb/s: 24 kHz keeps the ~10 kHz a voice needs and spends fewer bits on
    each frame than 48 kHz."""
    poster_at: float = 0.1
    """Where the poster frame is taken, as a fraction of the duration."""
    jpeg_qscale: int = 4
    """ffmpeg ``-q:v`` for the poster and the sprite (2 best … 31 worst)."""
    thumb_interval_s: float = 10.0
    max_thumbs: int = 180
    """Long lectures space thumbnails wider than ``thumb_interval_s`` to stay under this."""
    thumb_width: int = 160
    thumb_columns: int = 10
    min_duration_s: float = 0.5
    max_duration_s: float = 6 * 3600.0
    max_source_pixels: int = 5120 * 2880
    accepted_containers: frozenset[str] = field(default=ACCEPTED_CONTAINERS)
    ffmpeg: str | None = None
    """Path to ffmpeg; ``None``: the imageio-ffmpeg wheel's binary."""

    def __post_init__(self) -> None:
        if self.h264.codec != "h264":
            raise ValueError("settings.h264 must be an h264 ladder")
        if self.hevc is not None and self.hevc.codec != "hevc":
            raise ValueError("settings.hevc must be an hevc ladder")
        if self.segment_s % self.keyframe_interval_s:
            raise ValueError("segment_s must be a multiple of keyframe_interval_s")


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What the probe learnt about a source."""

    container: str
    """PyAV's demuxer name (``mov,mp4,m4a,3gp,3g2,mj2``, ``matroska,webm``…); its accepted
    short name is forced on the ffmpeg command line."""
    duration_s: float
    width: int
    """Coded width of the video stream, before sample aspect ratio and rotation."""
    height: int
    video_stream: int
    """Absolute stream index in the container."""
    video_codec: str
    frame_rate: Fraction | None
    sample_aspect: Fraction = Fraction(1)
    rotation_deg: int = 0
    """Display rotation (ffmpeg applies it while decoding)."""
    audio_stream: int | None = None

    @property
    def display_size(self) -> tuple[float, float]:
        """Width and height as shown: sample aspect ratio applied to the width, then rotated."""
        width = self.width * float(self.sample_aspect or 1)
        height = float(self.height)
        if abs(self.rotation_deg) % 180 == 90:
            return height, width
        return width, height


@dataclass(frozen=True, slots=True)
class PlannedRung:
    codec: VideoCodec
    width: int
    height: int
    crf: int
    maxrate_kbps: int
    bufsize_kbps: int
    preset: str
    profile: str

    @property
    def short_side(self) -> int:
        return min(self.width, self.height)

    @property
    def name(self) -> str:
        """``h264-360p``: the variant name and the prefix of its files."""
        return f"{self.codec}-{self.short_side}p"

    @property
    def playlist(self) -> str:
        return f"{self.name}.m3u8"

    @property
    def iframe_playlist(self) -> str:
        return f"{self.name}-iframes.m3u8"

    @property
    def init_segment(self) -> str:
        return f"{self.name}-init.mp4"


@dataclass(frozen=True, slots=True)
class ThumbPlan:
    interval_s: float
    count: int
    width: int
    height: int
    columns: int
    rows: int

    def cells(self, duration_s: float) -> list[tuple[float, float, int, int]]:
        """``(start_s, end_s, x, y)`` of each thumbnail in the sprite."""
        out = []
        for index in range(self.count):
            start = index * self.interval_s
            end = min(duration_s, start + self.interval_s)
            column, row = index % self.columns, index // self.columns
            out.append((start, end, column * self.width, row * self.height))
        return out


@dataclass(frozen=True, slots=True)
class EncodePlan:
    rungs: tuple[PlannedRung, ...]
    """H.264 rungs ascending, then HEVC rungs ascending."""
    frame_rate: Fraction
    gop_frames: int
    keyframe_interval_s: int
    duration_s: float
    audio: bool
    thumbs: ThumbPlan
    poster_at_s: float
    poster_size: tuple[int, int]
    processes: tuple[tuple[VideoCodec, ...], ...]
    """Which codecs each ffmpeg process encodes, in the order they run. The first process
    also encodes the audio rendition and the thumbnail sprite."""

    def rungs_of(self, codecs: tuple[VideoCodec, ...]) -> tuple[PlannedRung, ...]:
        return tuple(rung for rung in self.rungs if rung.codec in codecs)


def even(value: float) -> int:
    """The nearest even integer ≥ 2 (encoders need even 4:2:0 dimensions)."""
    return max(2, 2 * round(value / 2))


def even_floor(value: float) -> int:
    return max(2, 2 * math.floor(value / 2))


def plan_rungs(
    display_width: float, display_height: float, ladder: Ladder
) -> tuple[PlannedRung, ...]:
    """The rungs of ``ladder`` for a source shown at ``display_width`` x ``display_height``.

    A rung's height label applies to the short side (portrait sources keep the pixel count,
    hence the bit budget, the rung was tuned for); the long side follows the aspect ratio,
    rounded to even. Rungs above the source's short side are dropped (never upscale); when all
    are, the lowest rung's settings are kept at the source's own size, floored to even.
    """
    if display_width <= 0 or display_height <= 0:
        raise ValueError("display size must be positive")
    short, long_ = sorted((display_width, display_height))
    portrait = display_height > display_width
    kept = [rung for rung in ladder.rungs if rung.height <= short]
    sizes: list[tuple[Rung, int, int]] = []
    if kept:
        sizes = [(rung, rung.height, even(rung.height * long_ / short)) for rung in kept]
    else:
        low = ladder.rungs[0]
        sizes = [(low, even_floor(short), even_floor(long_))]
    planned = []
    for rung, short_px, long_px in sizes:
        width, height = (short_px, long_px) if portrait else (long_px, short_px)
        planned.append(
            PlannedRung(
                codec=ladder.codec,
                width=width,
                height=height,
                crf=rung.crf,
                maxrate_kbps=rung.maxrate_kbps,
                bufsize_kbps=rung.bufsize_kbps,
                preset=ladder.preset,
                profile=ladder.profile,
            )
        )
    return tuple(planned)


def output_frame_rate(source_rate: Fraction | None, max_fps: Fraction) -> Fraction:
    """A constant output rate: the source's (snapped to a standard rate within 1 %), divided by
    the smallest integer that brings it to ``max_fps`` or below. An unknown or absurd rate
    (VFR containers report 1000 or 90000) gives ``max_fps``."""
    if source_rate is None or source_rate <= 0 or source_rate > 240:
        return max_fps
    nearest = min(_STANDARD_RATES, key=lambda standard: abs(source_rate - standard))
    if abs(source_rate - nearest) <= nearest / 100:
        rate = nearest
    else:
        rate = source_rate.limit_denominator(1001)
    divisor = math.ceil(rate / max_fps)
    return rate / divisor


def plan_thumbs(
    duration_s: float, display_width: float, display_height: float, settings: HlsSettings
) -> ThumbPlan:
    interval = max(settings.thumb_interval_s, duration_s / settings.max_thumbs)
    interval = math.ceil(interval * 1000) / 1000
    count = max(1, math.ceil(duration_s / interval - 1e-6))
    width = even(settings.thumb_width)
    height = even(width * display_height / display_width)
    columns = min(settings.thumb_columns, count)
    rows = math.ceil(count / columns)
    return ThumbPlan(interval, count, width, height, columns, rows)


def refusal(source: SourceInfo, settings: HlsSettings) -> str | None:
    """Why this source will never transcode, or ``None``."""
    names = set(source.container.split(","))
    if not names & settings.accepted_containers:
        return f"container format {source.container!r} is not an accepted video format"
    if source.width <= 0 or source.height <= 0:
        return f"video stream has no usable size ({source.width}x{source.height})"
    if source.width * source.height > settings.max_source_pixels:
        return (
            f"video is {source.width}x{source.height}, above the limit of "
            f"{settings.max_source_pixels} pixels"
        )
    if source.duration_s < settings.min_duration_s:
        return f"video lasts {source.duration_s:.2f} s, under {settings.min_duration_s} s"
    if source.duration_s > settings.max_duration_s:
        return f"video lasts {source.duration_s:.0f} s, over {settings.max_duration_s:.0f} s"
    return None


def plan_encode(source: SourceInfo, settings: HlsSettings) -> EncodePlan:
    display_w, display_h = source.display_size
    h264 = plan_rungs(display_w, display_h, settings.h264)
    rungs = h264
    if settings.hevc is not None:
        rungs += plan_rungs(display_w, display_h, settings.hevc)
    rate = output_frame_rate(source.frame_rate, settings.max_fps)
    gop = math.ceil(rate * settings.keyframe_interval_s)
    if settings.hevc is None:
        processes: tuple[tuple[VideoCodec, ...], ...] = (("h264",),)
    elif settings.hevc_placement == "shared":
        processes = (("h264", "hevc"),)
    else:
        processes = (("h264",), ("hevc",))
    top = h264[-1]
    return EncodePlan(
        rungs=rungs,
        frame_rate=rate,
        gop_frames=gop,
        keyframe_interval_s=settings.keyframe_interval_s,
        duration_s=source.duration_s,
        audio=source.audio_stream is not None,
        thumbs=plan_thumbs(source.duration_s, display_w, display_h, settings),
        poster_at_s=round(source.duration_s * settings.poster_at, 3),
        poster_size=(top.width, top.height),
        processes=processes,
    )


def _rate(value: Fraction) -> str:
    return f"{value.numerator}/{value.denominator}" if value.denominator != 1 else str(value)


def filter_graph(
    rungs: tuple[PlannedRung, ...], video_input: str, frame_rate: Fraction, thumbs: ThumbPlan | None
) -> tuple[str, list[str]]:
    """The ``-filter_complex`` graph and the output labels of each rung, in order.

    One decode → ``fps`` (constant rate, also for VFR sources) → 8-bit 4:2:0 → ``split`` once
    per distinct size (and the sprite) → one scaler per size → ``split`` again when both codecs
    use that size."""
    sizes: list[tuple[int, int]] = []
    for rung in rungs:
        if (rung.width, rung.height) not in sizes:
            sizes.append((rung.width, rung.height))
    branches = len(sizes) + (1 if thumbs else 0)
    head = f"[{video_input}]fps={_rate(frame_rate)},format=yuv420p"
    parts = [head + (f",split={branches}" if branches > 1 else "")]
    pads = [f"[s{index}]" for index in range(branches)]
    if branches > 1:
        parts[0] += "".join(pads)
    else:
        parts[0] += pads[0]
    labels = [""] * len(rungs)
    for index, (width, height) in enumerate(sizes):
        users = [i for i, rung in enumerate(rungs) if (rung.width, rung.height) == (width, height)]
        scaled = f"{pads[index]}scale={width}:{height},setsar=1"
        if len(users) == 1:
            parts.append(f"{scaled}[v{users[0]}]")
        else:
            outs = "".join(f"[v{user}]" for user in users)
            parts.append(f"{scaled},split={len(users)}{outs}")
        for user in users:
            labels[user] = f"[v{user}]"
    if thumbs:
        parts.append(
            f"{pads[-1]}select='isnan(prev_selected_t)+gte(t-prev_selected_t\\,"
            f"{thumbs.interval_s:g})',scale={thumbs.width}:{thumbs.height},setsar=1,"
            f"tile={thumbs.columns}x{thumbs.rows},format=yuvj420p[thumbs]"
        )
    return ";".join(parts), labels


def _video_codec_args(index: int, rung: PlannedRung, plan: EncodePlan) -> list[str]:
    s = f":v:{index}"
    keyframes = f"expr:gte(t,n_forced*{plan.keyframe_interval_s})"
    common = [
        f"-preset{s}", rung.preset,
        f"-profile{s}", rung.profile,
        f"-crf{s}", str(rung.crf),
        f"-maxrate{s}", f"{rung.maxrate_kbps}k",
        f"-bufsize{s}", f"{rung.bufsize_kbps}k",
        f"-force_key_frames{s}", keyframes,
        f"-forced-idr{s}", "1",
    ]  # fmt: skip
    if rung.codec == "h264":
        return [
            f"-c{s}", "libx264",
            *common,
            f"-g{s}", str(plan.gop_frames),
            f"-keyint_min{s}", str(plan.gop_frames),
            f"-sc_threshold{s}", "0",
        ]  # fmt: skip
    gop = plan.gop_frames
    x265 = (
        f"keyint={gop}:min-keyint={gop}:scenecut=0:open-gop=0:bframes=3:b-pyramid=1"
        ":info=0:log-level=error"
    )
    return [f"-c{s}", "libx265", f"-tag{s}", "hvc1", *common, f"-x265-params{s}", x265]


def encode_args(  # noqa: PLR0913 - keyword-only options of one encode
    source: str,
    info: SourceInfo,
    plan: EncodePlan,
    settings: HlsSettings,
    codecs: tuple[VideoCodec, ...],
    *,
    with_audio: bool,
    with_thumbs: bool,
) -> list[str]:
    """Arguments (without the ffmpeg binary) of one process encoding the rungs of ``codecs``,
    run with the output directory as its working directory (names are flat and relative, so a
    ``%`` in the directory's path cannot reach ffmpeg's name patterns)."""
    rungs = plan.rungs_of(codecs)
    thumbs = plan.thumbs if with_thumbs else None
    graph, labels = filter_graph(rungs, f"0:{info.video_stream}", plan.frame_rate, thumbs)
    audio = with_audio and info.audio_stream is not None
    demuxer = next(n for n in info.container.split(",") if n in settings.accepted_containers)
    args = [
        "-hide_banner", "-nostdin", "-y", "-loglevel", "error", "-nostats",
        "-progress", "pipe:1",
        "-protocol_whitelist", "file", "-f", demuxer, "-i", source,
        "-filter_complex", graph,
        "-map_metadata", "-1", "-map_chapters", "-1",
    ]  # fmt: skip
    for label in labels:
        args += ["-map", label]
    if audio:
        args += ["-map", f"0:{info.audio_stream}"]
    for index, rung in enumerate(rungs):
        args += _video_codec_args(index, rung, plan)
    stream_map = [f"v:{index},name:{rung.name}" for index, rung in enumerate(rungs)]
    if audio:
        args += [
            "-c:a:0", "aac", "-profile:a:0", "aac_low",
            "-b:a:0", f"{settings.audio_kbps}k",
            "-ac:a:0", str(settings.audio_channels),
            "-ar:a:0", str(settings.audio_sample_rate_hz),
        ]  # fmt: skip
        stream_map.append(f"a:0,name:{AUDIO_NAME}")
    if len(stream_map) == 1:
        # hlsenc substitutes %v in the init segment's name only when there are several variants
        name = stream_map[0].split("name:", 1)[1]
        names = [f"{name}-init.mp4", f"{name}-%05d.m4s", f"{name}.m3u8"]
        variants: list[str] = []
    else:
        names = ["%v-init.mp4", "%v-%05d.m4s", "%v.m3u8"]
        variants = ["-var_stream_map", " ".join(stream_map)]
    args += [
        "-f", "hls",
        "-hls_time", str(settings.segment_s),
        "-hls_playlist_type", "vod",
        "-hls_segment_type", "fmp4",
        "-hls_fmp4_init_filename", names[0],
        "-hls_segment_filename", names[1],
        "-start_number", "1",
        *variants,
        names[2],
    ]  # fmt: skip
    if thumbs:
        args += [
            "-map", "[thumbs]", "-frames:v", "1", "-update", "1",
            "-q:v", str(settings.jpeg_qscale), "-f", "image2", SPRITE_NAME,
        ]  # fmt: skip
    return args


def poster_args(
    source: str, info: SourceInfo, plan: EncodePlan, settings: HlsSettings
) -> list[str]:
    """One frame at ``plan.poster_at_s`` (input seek: decodes from the previous keyframe only),
    scaled to the top H.264 rung."""
    width, height = plan.poster_size
    demuxer = next(n for n in info.container.split(",") if n in settings.accepted_containers)
    return [
        "-hide_banner", "-nostdin", "-y", "-loglevel", "error", "-nostats",
        "-protocol_whitelist", "file", "-ss", f"{plan.poster_at_s:.3f}",
        "-f", demuxer, "-i", source,
        "-map", f"0:{info.video_stream}", "-map_metadata", "-1",
        "-vf", f"scale={width}:{height},setsar=1,format=yuvj420p",
        "-frames:v", "1", "-update", "1", "-q:v", str(settings.jpeg_qscale),
        "-f", "image2", POSTER_NAME,
    ]  # fmt: skip


LADDERS: dict[str, HlsSettings] = {"lecture": HlsSettings()}
"""Named settings a job may ask for (``TranscodeConfig.ladder_name``)."""


def settings_from_job(job: LectureJob) -> HlsSettings:
    """Settings from a lecture job's: the named ladder, with the job's ffmpeg
    (``MediaConfig.ffmpeg_binary``) and ``hevc=False`` for H.264 only."""
    if job.ladder not in LADDERS:
        raise PermanentFault(f"unknown ladder {job.ladder!r}; known: {sorted(LADDERS)}")
    settings = LADDERS[job.ladder]
    if job.ffmpeg:
        settings = replace(settings, ffmpeg=job.ffmpeg)
    if job.hevc is False:
        settings = replace(settings, hevc=None)
    return settings

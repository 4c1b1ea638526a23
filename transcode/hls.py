"""Video → HLS pipeline: one ffmpeg decode feeds an H.264 and an HEVC ladder of fMP4 (CMAF)
rungs, an audio-only AAC-LC rendition, a poster and a thumbnail sprite; then the playlists are
written from what was actually encoded.

The top half is pure: reading ISO-BMFF boxes (codec strings from the init segments, I-frame
byte ranges from the media segments), measuring bit rates, writing playlists and the sprite's
WebVTT map. The bottom half is the IO shell: :func:`probe` (PyAV), :func:`run_ffmpeg` and
:func:`run`, the pipeline entry point (see :mod:`transcode.base`).

Audio is one demuxed rendition (``EXT-X-MEDIA TYPE=AUDIO``, ``audio.m3u8``) that every video
variant references, and that the master also lists as an audio-only variant: encoded once,
stored once, and cached once at the edges whichever video rung a student is on.

Two things ffmpeg's hls muxer decides, measured with this build: it writes one movie fragment
per segment, so the I-frame playlists list the keyframe that opens each 6 s segment, not every
2 s one (``-hls_segment_options movflags=+frag_keyframe`` moves the media into the init
segment). And each rung's muxer starts its timeline where decoding starts, so the first
frame's presentation time is the encoder's B-frame delay (two frames; x264 and x265 are both
set to three B-frames with a pyramid so that delay is the same on every rung).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

import av
import av.error
import av.stream

from assets.processing import LectureJob
from transcode.base import (
    OutputFile,
    Outputs,
    PermanentFault,
    Progress,
    TranscodeError,
    no_progress,
)
from transcode.ladder import (
    AUDIO_NAME,
    MASTER_NAME,
    POSTER_NAME,
    SPRITE_NAME,
    SPRITE_VTT_NAME,
    EncodePlan,
    HlsSettings,
    PlannedRung,
    SourceInfo,
    encode_args,
    plan_encode,
    poster_args,
    refusal,
    settings_from_job,
)

PLAYLIST_VERSION = 7


class FfmpegFailed(TranscodeError):
    """ffmpeg failed for a reason that is not the input's fault (killed, out of disk…): the
    queue retries the job."""


# --- ISO-BMFF boxes ----------------------------------------------------------------------------

_CONTAINER_BOXES = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"mvex", b"moof", b"traf"}


@dataclass(frozen=True, slots=True)
class Box:
    type: bytes
    start: int
    """Offset of the box header in the buffer."""
    payload: int
    """Offset of the payload (after size, type and any large size)."""
    end: int


def iter_boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[Box]:
    """The boxes at one level of ``data[start:end]``; raises ``ValueError`` on a bad size."""
    end = len(data) if end is None else end
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, offset)
        payload = offset + 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, payload)
            payload += 8
        elif size == 0:
            size = end - offset
        if size < payload - offset or offset + size > end:
            raise ValueError(f"box {kind!r} at {offset} has a bad size {size}")
        yield Box(kind, offset, payload, offset + size)
        offset += size


def find_box(data: bytes, path: Sequence[bytes], start: int = 0, end: int | None = None) -> Box:
    """The first box along ``path`` (``[b"moov", b"trak", …]``); ``KeyError`` if absent."""
    box: Box | None = None
    for kind in path:
        box = next((b for b in iter_boxes(data, start, end) if b.type == kind), None)
        if box is None:
            raise KeyError(b"/".join(path).decode())
        start, end = box.payload, box.end
    assert box is not None
    return box


_VISUAL_SAMPLE_ENTRY_BYTES = 78
_AUDIO_SAMPLE_ENTRY_BYTES = 28


def sample_entry(init: bytes) -> tuple[bytes, bytes, int]:
    """``(type, buffer, child_offset)`` of the first track's sample entry in an init segment:
    the entry's four-character code and where its child boxes (avcC, hvcC, esds…) start."""
    stsd = find_box(init, [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd"])
    entry = next(iter_boxes(init, stsd.payload + 8, stsd.end))
    skip = _AUDIO_SAMPLE_ENTRY_BYTES if entry.type == b"mp4a" else _VISUAL_SAMPLE_ENTRY_BYTES
    return entry.type, init[: entry.end], entry.payload + skip


def avc_codec_string(kind: bytes, avcc: bytes) -> str:
    """RFC 6381 ``avc1.PPCCLL`` from an AVCDecoderConfigurationRecord (profile, constraint
    flags and level as the encoded SPS declares them)."""
    return f"{kind.decode()}.{avcc[1]:02x}{avcc[2]:02x}{avcc[3]:02x}"


def _reverse_bits32(value: int) -> int:
    return int(f"{value:032b}"[::-1], 2)


def hevc_codec_string(kind: bytes, hvcc: bytes) -> str:
    """RFC 6381 / ISO/IEC 14496-15 Annex E string from an HEVCDecoderConfigurationRecord:
    ``hvc1.[A-C]<profile>.<compat flags, bit-reversed, hex>.<L|H><level>[.<constraint bytes>]``
    with trailing zero constraint bytes left out (``hvc1.1.6.L93.B0``)."""
    space = ("", "A", "B", "C")[hvcc[1] >> 6]
    tier = "H" if hvcc[1] & 0x20 else "L"
    profile = hvcc[1] & 0x1F
    (compat,) = struct.unpack_from(">I", hvcc, 2)
    constraints = list(hvcc[6:12])
    while constraints and constraints[-1] == 0:
        constraints.pop()
    level = hvcc[12]
    parts = [f"{kind.decode()}.{space}{profile}", f"{_reverse_bits32(compat):X}", f"{tier}{level}"]
    parts += [f"{byte:X}" for byte in constraints]
    return ".".join(parts)


def _descriptor(data: bytes, offset: int) -> tuple[int, int, int]:
    """``(tag, payload_offset, payload_end)`` of an MPEG-4 descriptor."""
    tag = data[offset]
    offset += 1
    length = 0
    for _ in range(4):
        byte = data[offset]
        offset += 1
        length = (length << 7) | (byte & 0x7F)
        if not byte & 0x80:
            break
    return tag, offset, offset + length


def aac_codec_string(esds: bytes) -> str:
    """``mp4a.<objectTypeIndication hex>.<audio object type>`` from an esds payload
    (after its version and flags)."""
    tag, offset, _ = _descriptor(esds, 0)
    if tag != 0x03:
        raise ValueError("esds without an ES_Descriptor")
    flags = esds[offset + 2]
    offset += 3
    if flags & 0x80:
        offset += 2
    if flags & 0x40:
        offset += 1 + esds[offset]
    if flags & 0x20:
        offset += 2
    tag, offset, _ = _descriptor(esds, offset)
    if tag != 0x04:
        raise ValueError("esds without a DecoderConfigDescriptor")
    object_type = esds[offset]
    tag, asc, _ = _descriptor(esds, offset + 13)
    if tag != 0x05 or object_type != 0x40:
        return f"mp4a.{object_type:02x}"
    audio_object_type = esds[asc] >> 3
    if audio_object_type == 31:
        audio_object_type = 32 + (((esds[asc] & 0x07) << 3) | (esds[asc + 1] >> 5))
    return f"mp4a.40.{audio_object_type}"


def codec_string(init: bytes) -> str:
    """The RFC 6381 codec of the (single) track of an fMP4 init segment."""
    kind, data, children = sample_entry(init)
    end = len(data)
    if kind in (b"avc1", b"avc3"):
        box = find_box(data, [b"avcC"], children, end)
        return avc_codec_string(kind, data[box.payload : box.end])
    if kind in (b"hvc1", b"hev1"):
        box = find_box(data, [b"hvcC"], children, end)
        return hevc_codec_string(kind, data[box.payload : box.end])
    if kind == b"mp4a":
        box = find_box(data, [b"esds"], children, end)
        return aac_codec_string(data[box.payload + 4 : box.end])
    raise ValueError(f"unknown sample entry {kind!r}")


@dataclass(frozen=True, slots=True)
class TrackDefaults:
    timescale: int
    sample_duration: int = 0
    sample_size: int = 0
    sample_flags: int = 0


def track_defaults(init: bytes) -> TrackDefaults:
    """The media timescale (mdhd) and the trex defaults of an init segment's track."""
    mdhd = find_box(init, [b"moov", b"trak", b"mdia", b"mdhd"])
    version = init[mdhd.payload]
    (timescale,) = struct.unpack_from(">I", init, mdhd.payload + (20 if version == 1 else 12))
    try:
        trex = find_box(init, [b"moov", b"mvex", b"trex"])
    except KeyError:
        return TrackDefaults(timescale)
    duration, size, flags = struct.unpack_from(">III", init, trex.payload + 12)
    return TrackDefaults(timescale, duration, size, flags)


@dataclass(frozen=True, slots=True)
class Fragment:
    """One moof+mdat of a media segment."""

    offset: int
    """Byte offset of the moof in the segment."""
    first_sample_end: int
    """Byte offset just past the first sample's data: ``[offset, first_sample_end)`` is the
    moof plus the fragment's first frame, an I-frame playlist's byte range."""
    first_is_sync: bool
    duration: int
    """In the track's timescale."""


_SAMPLE_IS_NON_SYNC = 0x00010000


@dataclass(frozen=True, slots=True)
class _FragmentDefaults:
    base: int
    duration: int
    size: int
    flags: int


def _tfhd(data: bytes, tfhd: Box, moof: Box, defaults: TrackDefaults) -> _FragmentDefaults:
    """Base data offset and sample defaults of a track fragment (ISO/IEC 14496-12 8.8.7)."""
    (flags,) = struct.unpack_from(">I", data, tfhd.payload)
    cursor = tfhd.payload + 8
    values = {"base": moof.start, "duration": defaults.sample_duration}
    values |= {"size": defaults.sample_size, "flags": defaults.sample_flags}
    if flags & 0x01:
        (values["base"],) = struct.unpack_from(">Q", data, cursor)
        cursor += 8
    if flags & 0x02:
        cursor += 4
    for bit, key in ((0x08, "duration"), (0x10, "size"), (0x20, "flags")):
        if flags & bit:
            (values[key],) = struct.unpack_from(">I", data, cursor)
            cursor += 4
    return _FragmentDefaults(**values)


def _fragment(data: bytes, moof: Box, defaults: TrackDefaults) -> Fragment:  # noqa: C901 - one branch per fMP4 box kind
    traf = find_box(data, [b"traf"], moof.payload, moof.end)
    tf = _tfhd(data, find_box(data, [b"tfhd"], traf.payload, traf.end), moof, defaults)
    first_end = -1
    first_sync = False
    total = 0
    for trun in (b for b in iter_boxes(data, traf.payload, traf.end) if b.type == b"trun"):
        (tr_flags, count) = struct.unpack_from(">II", data, trun.payload)
        tr_flags &= 0xFFFFFF
        cursor = trun.payload + 8
        data_offset = 0
        first_flags: int | None = None
        if tr_flags & 0x01:
            (data_offset,) = struct.unpack_from(">i", data, cursor)
            cursor += 4
        if tr_flags & 0x04:
            (first_flags,) = struct.unpack_from(">I", data, cursor)
            cursor += 4
        for index in range(count):
            duration, size, flags = tf.duration, tf.size, tf.flags
            if tr_flags & 0x100:
                (duration,) = struct.unpack_from(">I", data, cursor)
                cursor += 4
            if tr_flags & 0x200:
                (size,) = struct.unpack_from(">I", data, cursor)
                cursor += 4
            if tr_flags & 0x400:
                (flags,) = struct.unpack_from(">I", data, cursor)
                cursor += 4
            if tr_flags & 0x800:
                cursor += 4
            if index == 0 and first_flags is not None:
                flags = first_flags
            if first_end < 0:
                first_end = tf.base + data_offset + size
                first_sync = not flags & _SAMPLE_IS_NON_SYNC
            total += duration
    if first_end < 0:
        raise ValueError(f"moof at {moof.start} has no samples")
    return Fragment(moof.start, first_end, first_sync, total)


def fragments(segment: bytes, defaults: TrackDefaults) -> list[Fragment]:
    """The movie fragments of an fMP4 media segment (``styp``/``sidx`` are skipped)."""
    return [_fragment(segment, box, defaults) for box in iter_boxes(segment) if box.type == b"moof"]


# --- Playlists ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    uri: str
    duration_s: float
    size: int
    byte_offset: int | None = None
    """Set for byte-range segments (I-frame playlists)."""


@dataclass(frozen=True, slots=True)
class MediaPlaylist:
    init_uri: str
    segments: tuple[Segment, ...]

    @property
    def duration_s(self) -> float:
        return sum(segment.duration_s for segment in self.segments)


def parse_media_playlist(text: str) -> tuple[str, list[tuple[str, float]]]:
    """``(init_uri, [(segment_uri, duration_s)])`` from an fMP4 media playlist as ffmpeg writes
    it (EXT-X-MAP, EXTINF, URI lines)."""
    init_uri = ""
    pending: float | None = None
    segments: list[tuple[str, float]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#EXT-X-MAP:"):
            init_uri = line.split('URI="', 1)[1].split('"', 1)[0]
        elif line.startswith("#EXTINF:"):
            pending = float(line[len("#EXTINF:") :].split(",", 1)[0])
        elif line and not line.startswith("#") and pending is not None:
            segments.append((line, pending))
            pending = None
    if not init_uri or not segments:
        raise ValueError("not an fMP4 media playlist with segments")
    return init_uri, segments


@dataclass(frozen=True, slots=True)
class Bitrate:
    peak_bps: int
    average_bps: int

    def __add__(self, other: Bitrate) -> Bitrate:
        return Bitrate(self.peak_bps + other.peak_bps, self.average_bps + other.average_bps)


def measure_bitrate(init_size: int, segments: Sequence[Segment], target_s: float) -> Bitrate:
    """Peak and average bit rate of a media playlist from the real sizes (RFC 8216 §4.3.4.2).

    Peak: the highest rate of any run of consecutive segments lasting 0.5 to 1.5 target
    duration; a run that starts at the first segment also carries the init segment, as it
    does on the wire. A stream shorter than half a target duration has one run: all of it.
    Average: every byte, init included, over the whole duration."""
    total_s = sum(segment.duration_s for segment in segments)
    total_bytes = init_size + sum(segment.size for segment in segments)
    if total_s <= 0:
        raise ValueError("playlist has no duration")
    average = total_bytes * 8 / total_s
    peak = 0.0
    for first in range(len(segments)):
        run_s, run_bytes = 0.0, init_size if first == 0 else 0
        for segment in segments[first:]:
            run_s += segment.duration_s
            run_bytes += segment.size
            if run_s > 1.5 * target_s + 1e-6:
                break
            if run_s >= 0.5 * target_s - 1e-6:
                peak = max(peak, run_bytes * 8 / run_s)
    if peak == 0.0:
        peak = average
    return Bitrate(math.ceil(peak), math.ceil(average))


def iframe_bitrate(segments: Sequence[Segment]) -> Bitrate:
    """An I-frame playlist's peak (its largest I-frame over its duration) and average."""
    peak = max(segment.size * 8 / segment.duration_s for segment in segments)
    total_s = sum(segment.duration_s for segment in segments)
    average = sum(segment.size for segment in segments) * 8 / total_s
    return Bitrate(math.ceil(peak), math.ceil(average))


def target_duration(segments: Sequence[Segment]) -> int:
    """EXT-X-TARGETDURATION: every EXTINF rounded to the nearest integer must not exceed it."""
    return max(1, *(math.floor(segment.duration_s + 0.5) for segment in segments))


def media_playlist_text(playlist: MediaPlaylist, *, iframes_only: bool = False) -> str:
    lines = [
        "#EXTM3U",
        f"#EXT-X-VERSION:{PLAYLIST_VERSION}",
        f"#EXT-X-TARGETDURATION:{target_duration(playlist.segments)}",
        "#EXT-X-MEDIA-SEQUENCE:0",
        "#EXT-X-PLAYLIST-TYPE:VOD",
        "#EXT-X-INDEPENDENT-SEGMENTS",
    ]
    if iframes_only:
        lines.append("#EXT-X-I-FRAMES-ONLY")
    lines.append(f'#EXT-X-MAP:URI="{playlist.init_uri}"')
    for segment in playlist.segments:
        lines.append(f"#EXTINF:{segment.duration_s:.6f},")
        if segment.byte_offset is not None:
            lines.append(f"#EXT-X-BYTERANGE:{segment.size}@{segment.byte_offset}")
        lines.append(segment.uri)
    lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class VideoVariant:
    rung: PlannedRung
    codecs: str
    """RFC 6381 string of the video track alone."""
    bitrate: Bitrate
    """The video playlist alone; the master adds the audio rendition's."""
    iframe_bitrate: Bitrate


@dataclass(frozen=True, slots=True)
class AudioRendition:
    codecs: str
    bitrate: Bitrate
    channels: int


Attribute = tuple[str, str | int | None]


def _attributes(pairs: Sequence[Attribute]) -> str:
    return ",".join(f"{key}={value}" for key, value in pairs if value is not None)


def master_playlist_text(
    videos: Sequence[VideoVariant], audio: AudioRendition | None, frame_rate: Fraction
) -> str:
    """The multivariant playlist: the audio group (one rendition, ``audio.m3u8``), every video
    variant in the given order referencing it, the audio-only variant last (hls.js and
    ExoPlayer drop it from a master that has video, so the app opens ``audio.m3u8`` directly
    on 2G), then one I-frame stream per video variant."""
    lines = ["#EXTM3U", f"#EXT-X-VERSION:{PLAYLIST_VERSION}", "#EXT-X-INDEPENDENT-SEGMENTS"]
    group = "audio" if audio else None
    if audio:
        lines.append(
            "#EXT-X-MEDIA:"
            + _attributes(
                [
                    ("TYPE", "AUDIO"),
                    ("GROUP-ID", f'"{group}"'),
                    ("NAME", '"Audio"'),
                    ("DEFAULT", "YES"),
                    ("AUTOSELECT", "YES"),
                    ("CHANNELS", f'"{audio.channels}"'),
                    ("URI", f'"{AUDIO_NAME}.m3u8"'),
                ]
            )
        )
    for video in videos:
        total = video.bitrate + audio.bitrate if audio else video.bitrate
        codecs = f"{video.codecs},{audio.codecs}" if audio else video.codecs
        attributes: list[Attribute] = [
            ("BANDWIDTH", total.peak_bps),
            ("AVERAGE-BANDWIDTH", total.average_bps),
            ("CODECS", f'"{codecs}"'),
            ("RESOLUTION", f"{video.rung.width}x{video.rung.height}"),
            ("FRAME-RATE", f"{float(frame_rate):.3f}"),
            ("AUDIO", f'"{group}"' if group else None),
        ]
        lines += ["#EXT-X-STREAM-INF:" + _attributes(attributes), video.rung.playlist]
    if audio:
        attributes = [
            ("BANDWIDTH", audio.bitrate.peak_bps),
            ("AVERAGE-BANDWIDTH", audio.bitrate.average_bps),
            ("CODECS", f'"{audio.codecs}"'),
        ]
        lines += ["#EXT-X-STREAM-INF:" + _attributes(attributes), f"{AUDIO_NAME}.m3u8"]
    for video in videos:
        iframe: list[Attribute] = [
            ("BANDWIDTH", video.iframe_bitrate.peak_bps),
            ("AVERAGE-BANDWIDTH", video.iframe_bitrate.average_bps),
            ("CODECS", f'"{video.codecs}"'),
            ("RESOLUTION", f"{video.rung.width}x{video.rung.height}"),
            ("URI", f'"{video.rung.iframe_playlist}"'),
        ]
        lines.append("#EXT-X-I-FRAME-STREAM-INF:" + _attributes(iframe))
    return "\n".join(lines) + "\n"


def _vtt_time(seconds: float) -> str:
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}.{rest % 1000:03d}"


def thumbs_vtt_text(plan: EncodePlan, duration_s: float) -> str:
    """WebVTT cues mapping each interval to its cell of the sprite (``thumbs.jpg#xywh=…``)."""
    thumbs = plan.thumbs
    lines = ["WEBVTT", ""]
    for start, end, x, y in thumbs.cells(duration_s):
        if end <= start:
            continue
        lines += [
            f"{_vtt_time(start)} --> {_vtt_time(end)}",
            f"{SPRITE_NAME}#xywh={x},{y},{thumbs.width},{thumbs.height}",
            "",
        ]
    return "\n".join(lines)


# --- IO shell ----------------------------------------------------------------------------------


def _duration_by_demuxing(container: Any, stream: Any) -> float:
    end = 0.0
    for packet in container.demux(stream):
        if packet.pts is not None and packet.time_base is not None:
            end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    return max(0.0, end - start)


def probe(source: Path) -> SourceInfo:
    """Open the source with PyAV, pick its video and audio streams, decode one video frame.

    Raises :class:`PermanentFault` when it is not media, has no video, or does not decode."""
    try:
        container = av.open(str(source), options={"protocol_whitelist": "file"})
    except av.error.FFmpegError as exc:
        raise PermanentFault(f"not a media file ffmpeg can read: {exc.strerror}") from exc
    with container:
        videos = [
            s
            for s in container.streams.video
            if not s.disposition & av.stream.Disposition.attached_pic
        ]
        if not videos:
            raise PermanentFault("the file has no video stream")
        video = max(videos, key=lambda s: s.codec_context.width * s.codec_context.height)
        audios = [s for s in container.streams.audio if s.codec_context.sample_rate]
        audio = audios[0] if audios else None
        if video.duration is not None and video.time_base is not None:
            duration = float(video.duration * video.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        else:
            duration = 0.0
        rate = video.guessed_rate or video.average_rate
        rotation = 0
        try:
            frame = next(container.decode(video))
            rotation = round(frame.rotation or 0)
        except (av.error.FFmpegError, StopIteration) as exc:
            raise PermanentFault("the video stream does not decode") from exc
        if duration <= 0:
            container.seek(0)
            duration = _duration_by_demuxing(container, video)
        sar = video.sample_aspect_ratio
        return SourceInfo(
            container=container.format.name,
            duration_s=duration,
            width=video.codec_context.width,
            height=video.codec_context.height,
            video_stream=video.index,
            video_codec=video.codec_context.name,
            frame_rate=Fraction(rate) if rate else None,
            sample_aspect=Fraction(sar) if sar else Fraction(1),
            rotation_deg=rotation,
            audio_stream=audio.index if audio is not None else None,
        )


_INPUT_FAULTS = (
    "Invalid data found when processing input",
    "moov atom not found",
    "Error while decoding",
    "error reading header",
)


def _drain(stream: IO[bytes], sink: list[bytes]) -> None:
    for chunk in iter(lambda: stream.read(65536), b""):
        sink.append(chunk)


def _read_lines(stream: IO[bytes], lines: queue.SimpleQueue[bytes | None]) -> None:
    """ffmpeg's ``-progress`` lines onto *lines*, then ``None`` at the end of the stream."""
    try:
        for raw in stream:
            lines.put(raw)
    finally:
        lines.put(None)


PROGRESS_POLL_S = 0.25
"""How often :func:`run_ffmpeg` looks for newly written segments between ffmpeg's reports."""


@dataclass(frozen=True, slots=True)
class EncodeWork:
    """What one ffmpeg encode will produce, so that :func:`run_ffmpeg` can tell how far it is.

    Two measures, because ffmpeg's own reports cannot be relied on: ffmpeg writes no
    ``-progress`` report at all until every output file has written its header, and the
    thumbnail sprite (an ``image2`` output fed by ``tile``) gets its one frame only after the
    last thumbnail, so the encode that makes the sprite reports nothing until 80-95 % of the way
    (and older builds report ``out_time_us=N/A`` meanwhile). The segments each rung writes
    (``{name}-00001.m4s``, …) are counted in the meantime."""

    duration_s: float
    frame_rate: Fraction | None = None
    """The output rate (the filter graph's ``fps``), which the ``frame=`` counter counts in."""
    playlists: tuple[str, ...] = ()
    """Names whose ``{name}-NNNNN.m4s`` media segments this process writes."""
    segment_s: float = 0.0

    @property
    def total_frames(self) -> int | None:
        if not self.frame_rate or self.duration_s <= 0:
            return None
        return max(1, math.ceil(self.duration_s * float(self.frame_rate) - 1e-6))

    @property
    def segments_each(self) -> int:
        """Segments per playlist: every one lasts ``segment_s`` but the last."""
        if self.segment_s <= 0 or self.duration_s <= 0:
            return 0
        return max(1, math.ceil(self.duration_s / self.segment_s - 1e-6))


def _clock_seconds(value: str) -> float | None:
    """``HH:MM:SS.ffffff`` (ffmpeg's ``out_time``) in seconds; ``None`` for ``N/A``."""
    parts = value.strip().split(":")
    if len(parts) != 3 or value.startswith("-"):
        return None
    try:
        hours, minutes, seconds = int(parts[0]), int(parts[1]), float(parts[2])
    except ValueError:
        return None
    return hours * 3600 + minutes * 60 + seconds


def report_fraction(report: Mapping[str, str], work: EncodeWork) -> float | None:
    """How far one ``-progress`` report says the encode is, in [0, 1]: the ``frame=`` counter
    (frames of the first video output) over the frames the plan expects; else the output time
    (``out_time_us``, then ``out_time_ms`` — also microseconds, a historical ffmpeg quirk —, then
    ``out_time``) over the duration. ``None`` when the report fills none of them (``N/A``, or a
    frame counter still at 0 while the encoders fill their look-ahead)."""
    total = work.total_frames
    frames = report.get("frame", "").strip()
    if total and frames.isdigit() and int(frames) > 0:
        return min(1.0, int(frames) / total)
    if work.duration_s <= 0:
        return None
    seconds: float | None = None
    for key in ("out_time_us", "out_time_ms"):
        value = report.get(key, "").strip()
        if value.isdigit():
            seconds = int(value) / 1e6
            break
    if seconds is None and "out_time" in report:
        seconds = _clock_seconds(report["out_time"])
    if not seconds or seconds <= 0:
        return None
    return min(1.0, seconds / work.duration_s)


class SegmentCounter:
    """Counts the media segments an encode has written so far (a segment's file appears,
    non-empty, when ffmpeg closes it); a few ``stat`` calls per look, whatever the length."""

    def __init__(self, directory: Path, work: EncodeWork) -> None:
        self._directory = directory
        self._work = work
        self._done = dict.fromkeys(work.playlists, 0)

    def _written(self, name: str, number: int) -> bool:
        try:
            return (self._directory / f"{name}-{number:05d}.m4s").stat().st_size > 0
        except OSError:
            return False

    def fraction(self) -> float | None:
        """Segments written over segments expected; ``None`` when nothing is counted."""
        each = self._work.segments_each
        if not self._done or not each:
            return None
        for name in self._done:
            while self._done[name] < each and self._written(name, self._done[name] + 1):
                self._done[name] += 1
        return sum(self._done.values()) / (each * len(self._done))


def _follow_progress(
    lines: queue.SimpleQueue[bytes | None],
    work: EncodeWork,
    counter: SegmentCounter,
    report: Callable[[float], None],
    poll_s: float,
) -> None:
    """Until ffmpeg's stdout ends: on each ``progress=`` line (the end of one report) and
    whenever *poll_s* passes without one, take the furthest of what the report and the written
    segments say, and *report* it if it moved forward (both only ever lag the encode)."""
    done = 0.0
    fields: dict[str, str] = {}
    next_look = time.monotonic() + poll_s
    while True:
        try:
            raw = lines.get(timeout=max(0.0, next_look - time.monotonic()))
        except queue.Empty:
            raw = b""
        if raw is None:
            return
        measures: list[float | None] = []
        if raw:
            key, _, value = raw.decode("ascii", "replace").strip().partition("=")
            if key != "progress":
                fields[key] = value
                if time.monotonic() < next_look:
                    continue
            else:
                measures.append(report_fraction(fields, work))
                fields = {}
        if raw == b"" or time.monotonic() >= next_look:
            measures.append(counter.fraction())
            next_look = time.monotonic() + poll_s
        best = max((m for m in measures if m is not None), default=None)
        if best is not None and best > done:
            done = best
            report(done)


def run_ffmpeg(  # noqa: PLR0913 - keyword-only options of one ffmpeg run
    ffmpeg: str,
    args: list[str],
    cwd: Path,
    *,
    work: EncodeWork | None = None,
    progress: Progress = no_progress,
    band: tuple[float, float] = (0.0, 1.0),
    poll_s: float | None = None,
) -> None:
    """Run ffmpeg in ``cwd``. With ``work``, report ``progress("encode", …)`` mapped into
    ``band``: at once at the band's start, then as the ``-progress pipe:1`` reports (their
    ``frame=`` counter, else their output time) and the segments written (looked for every
    ``poll_s``, default :data:`PROGRESS_POLL_S`) advance — whichever is further — and the
    band's end when ffmpeg succeeds (see :class:`EncodeWork` for why both). A non-zero exit
    raises :class:`PermanentFault` when ffmpeg blames its input, else :class:`FfmpegFailed`.
    An exception from ``progress`` (a cancelled job) kills ffmpeg and propagates."""
    low, high = band
    poll = PROGRESS_POLL_S if poll_s is None else poll_s
    stderr: list[bytes] = []
    lines: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def report(done: float) -> None:
        progress("encode", low + (high - low) * done)

    with subprocess.Popen(
        [ffmpeg, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # If the worker is SIGKILLed, its ffmpeg must not keep encoding as an orphan while
        # another worker redoes the job. Only async-signal-safe work happens in the child.
        # It also lowers its own CPU priority there, before it runs (see FFMPEG_NICENESS).
        preexec_fn=_before_exec if sys.platform == "linux" else None,  # noqa: PLW1509
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        drainer = threading.Thread(target=_drain, args=(process.stderr, stderr), daemon=True)
        drainer.start()
        reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
        reader.start()
        try:
            if work is not None:
                report(0.0)
                _follow_progress(lines, work, SegmentCounter(cwd, work), report, poll)
            else:
                while lines.get() is not None:
                    pass
        except BaseException:
            process.kill()  # a cancelled job (progress raised) must not wait for ffmpeg
            raise
        code = process.wait()
        reader.join()
        drainer.join()
    if code == 0 and work is not None:
        report(1.0)
    message = b"".join(stderr).decode("utf-8", "replace").strip()
    if code == 0:
        return
    tail = "\n".join(message.splitlines()[-8:])
    if code > 0 and any(fault in message for fault in _INPUT_FAULTS):
        raise PermanentFault(f"ffmpeg could not decode the source: {tail}")
    raise FfmpegFailed(f"ffmpeg exited with {code}: {tail}")


def _read_playlist(out_dir: Path, name: str) -> MediaPlaylist:
    path = out_dir / f"{name}.m3u8"
    if not path.exists():
        raise PermanentFault(f"ffmpeg wrote no {name} rendition: the source did not decode")
    try:
        init_uri, entries = parse_media_playlist(path.read_text())
    except ValueError as exc:
        raise PermanentFault(f"ffmpeg wrote an empty {name} rendition: {exc}") from exc
    segments = tuple(
        Segment(uri, duration, (out_dir / uri).stat().st_size) for uri, duration in entries
    )
    return MediaPlaylist(init_uri, segments)


def _iframe_playlist(out_dir: Path, playlist: MediaPlaylist) -> MediaPlaylist:
    defaults = track_defaults((out_dir / playlist.init_uri).read_bytes())
    entries = []
    for segment in playlist.segments:
        for fragment in fragments((out_dir / segment.uri).read_bytes(), defaults):
            if fragment.first_is_sync and fragment.duration > 0:
                entries.append(
                    Segment(
                        segment.uri,
                        fragment.duration / defaults.timescale,
                        fragment.first_sample_end - fragment.offset,
                        fragment.offset,
                    )
                )
    if not entries:
        raise FfmpegFailed(f"no I-frames found in {playlist.init_uri}")
    return MediaPlaylist(playlist.init_uri, tuple(entries))


TRUNCATION_TOLERANCE = 0.85
"""A source whose video decodes to less than this share of the duration it declares (less a
second) is refused as truncated."""

CONTENT_TYPES = {
    ".m3u8": "application/vnd.apple.mpegurl",
    ".mp4": "video/mp4",
    ".m4s": "video/mp4",
    ".jpg": "image/jpeg",
    ".vtt": "text/vtt",
}


def _output(out_dir: Path, name: str) -> OutputFile:
    content_type = CONTENT_TYPES[Path(name).suffix]
    if name.startswith(f"{AUDIO_NAME}-"):
        content_type = "audio/mp4"
    return OutputFile(name, out_dir / name, content_type)


def run(
    source: Path, out_dir: Path, settings: HlsSettings, progress: Progress = no_progress
) -> Outputs:
    """Transcode ``source`` into an HLS ladder in ``out_dir`` (see the module docstring)."""
    progress("probe", 0.0)
    info = probe(source)
    reason = refusal(info, settings)
    if reason:
        raise PermanentFault(reason)
    plan = plan_encode(info, settings)
    progress("probe", 0.02)
    ffmpeg = settings.ffmpeg or _bundled_ffmpeg()
    src = f"file:{source.resolve()}"
    weights = [
        sum(2.5 if codec == "hevc" else 1.0 for codec in codecs) for codecs in plan.processes
    ]
    position = 0.02
    for index, codecs in enumerate(plan.processes):
        width = 0.9 * weights[index] / sum(weights)
        args = encode_args(
            src, info, plan, settings, codecs, with_audio=index == 0, with_thumbs=index == 0
        )
        playlists = [rung.name for rung in plan.rungs_of(codecs)]
        if index == 0 and plan.audio:
            playlists.append(AUDIO_NAME)
        work = EncodeWork(plan.duration_s, plan.frame_rate, tuple(playlists), settings.segment_s)
        band = (position, position + width)
        run_ffmpeg(ffmpeg, args, out_dir, work=work, progress=progress, band=band)
        position += width
    progress("poster", position)
    run_ffmpeg(ffmpeg, poster_args(src, info, plan, settings), out_dir)
    progress("package", 0.95)
    outputs = package(out_dir, plan)
    progress("package", 1.0)
    return outputs


def run_for_job(
    source: Path, out_dir: Path, settings: LectureJob, progress: Progress = no_progress
) -> Outputs:
    """:func:`run` with a lecture job's settings (see :func:`settings_from_job`)."""
    return run(source, out_dir, settings_from_job(settings), progress)


FFMPEG_NICENESS = 10
"""Lecture encodes run at this CPU niceness: minutes of background work that must not slow a
question bank's or an image's processing beside it on the same worker (their queues are apart,
:class:`assets.processing.TranscodeQueues`, but the cores are shared), nor the origin or edge on
the same machine."""


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
"""Loaded once in the worker, not in each forked child (dlopen between fork and exec is slow
and not async-signal-safe)."""


def _before_exec() -> None:
    """In the forked child, before exec: ask Linux to SIGKILL us when our parent dies, and
    run at :data:`FFMPEG_NICENESS`."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, FFMPEG_NICENESS)


_PR_SET_PDEATHSIG = 1


def _bundled_ffmpeg() -> str:
    import imageio_ffmpeg  # noqa: PLC0415 - only when no ffmpeg is configured

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def package(out_dir: Path, plan: EncodePlan) -> Outputs:
    """Measure what ffmpeg wrote, rewrite the media playlists, write the I-frame playlists,
    the master and the sprite's WebVTT; list every output."""
    names: list[str] = []
    audio: AudioRendition | None = None
    if plan.audio:
        playlist = _read_playlist(out_dir, AUDIO_NAME)
        init = (out_dir / playlist.init_uri).read_bytes()
        bitrate = measure_bitrate(len(init), playlist.segments, target_duration(playlist.segments))
        audio = AudioRendition(codec_string(init), bitrate, _channels(init))
        (out_dir / f"{AUDIO_NAME}.m3u8").write_text(media_playlist_text(playlist))
        names += [f"{AUDIO_NAME}.m3u8", playlist.init_uri, *(s.uri for s in playlist.segments)]
    videos = []
    for rung in plan.rungs:
        playlist = _read_playlist(out_dir, rung.name)
        decoded = playlist.duration_s
        if decoded < TRUNCATION_TOLERANCE * plan.duration_s - 1.0:
            raise PermanentFault(
                f"the source is truncated or corrupt: its video decodes to {decoded:.1f} s "
                f"of the {plan.duration_s:.1f} s it declares"
            )
        init = (out_dir / playlist.init_uri).read_bytes()
        target = target_duration(playlist.segments)
        iframes = _iframe_playlist(out_dir, playlist)
        videos.append(
            VideoVariant(
                rung=rung,
                codecs=codec_string(init),
                bitrate=measure_bitrate(len(init), playlist.segments, target),
                iframe_bitrate=iframe_bitrate(iframes.segments),
            )
        )
        (out_dir / rung.playlist).write_text(media_playlist_text(playlist))
        (out_dir / rung.iframe_playlist).write_text(media_playlist_text(iframes, iframes_only=True))
        names += [rung.playlist, rung.iframe_playlist, playlist.init_uri]
        names += [segment.uri for segment in playlist.segments]
    (out_dir / MASTER_NAME).write_text(master_playlist_text(videos, audio, plan.frame_rate))
    (out_dir / SPRITE_VTT_NAME).write_text(thumbs_vtt_text(plan, plan.duration_s))
    for image in (POSTER_NAME, SPRITE_NAME):
        if not (out_dir / image).is_file():
            raise FfmpegFailed(f"ffmpeg wrote no {image}")
    names += [MASTER_NAME, POSTER_NAME, SPRITE_NAME, SPRITE_VTT_NAME]
    details: dict[str, Any] = {
        "duration_s": round(plan.duration_s, 3),
        "frame_rate": f"{float(plan.frame_rate):.3f}",
        "audio": audio is not None,
        "variants": [
            {
                "name": video.rung.name,
                "codec": video.rung.codec,
                "codecs": video.codecs,
                "width": video.rung.width,
                "height": video.rung.height,
                "playlist": video.rung.playlist,
                "iframes": video.rung.iframe_playlist,
                "peak_bps": video.bitrate.peak_bps,
                "average_bps": video.bitrate.average_bps,
            }
            for video in videos
        ],
        "poster": POSTER_NAME,
        "thumbnails": {
            "sprite": SPRITE_NAME,
            "vtt": SPRITE_VTT_NAME,
            "interval_s": plan.thumbs.interval_s,
            "width": plan.thumbs.width,
            "height": plan.thumbs.height,
        },
    }
    if audio is not None:
        details["audio_rendition"] = {
            "playlist": f"{AUDIO_NAME}.m3u8",
            "codecs": audio.codecs,
            "peak_bps": audio.bitrate.peak_bps,
            "average_bps": audio.bitrate.average_bps,
        }
    return Outputs(
        files=[_output(out_dir, name) for name in names], primary=MASTER_NAME, details=details
    )


def _channels(init: bytes) -> int:
    kind, data, children = sample_entry(init)
    if kind != b"mp4a":
        raise ValueError("not an audio init segment")
    (channels,) = struct.unpack_from(">H", data, children - 12)
    return int(channels)

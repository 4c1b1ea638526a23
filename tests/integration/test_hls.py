"""The video → HLS pipeline: pure tables for ladder planning, argument building, codec strings,
bit rates and playlists; then real ffmpeg runs on tiny generated clips, every output checked with
the m3u8 library, PyAV and Pillow."""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import subprocess
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
import imageio_ffmpeg
import m3u8
import pytest
from PIL import Image

from assets.processing import (
    PIPELINE_VERSION,
    BundleJob,
    ImageJob,
    LectureJob,
    job_json,
    job_settings,
    profile_id,
)
from transcode import hls
from transcode.base import Outputs, PermanentFault
from transcode.hls import (
    AudioRendition,
    Bitrate,
    EncodeWork,
    MediaPlaylist,
    Segment,
    VideoVariant,
    aac_codec_string,
    avc_codec_string,
    hevc_codec_string,
    master_playlist_text,
    measure_bitrate,
    media_playlist_text,
    parse_media_playlist,
    report_fraction,
    run,
    target_duration,
    thumbs_vtt_text,
)
from transcode.ladder import (
    DEFAULT_H264_LADDER,
    DEFAULT_HEVC_LADDER,
    HlsSettings,
    Ladder,
    PlannedRung,
    Rung,
    SourceInfo,
    encode_args,
    filter_graph,
    output_frame_rate,
    plan_encode,
    plan_rungs,
    plan_thumbs,
    poster_args,
    refusal,
    settings_from_job,
)

pytestmark = pytest.mark.integration

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()

SMALL = HlsSettings(
    h264=Ladder(
        "h264",
        (Rung(180, 30, 200, 400), Rung(360, 28, 500, 1000)),
        preset="veryfast",
        profile="high",
    ),
    hevc=Ladder("hevc", (Rung(180, 32, 150, 300),), preset="ultrafast", profile="main"),
    thumb_interval_s=2.0,
)
"""Two H.264 rungs, one HEVC rung, audio: every feature at a fraction of the CPU."""


# --- Pure: ladder planning -----------------------------------------------------------------------


def sizes(rungs: tuple[PlannedRung, ...]) -> list[tuple[int, int]]:
    return [(rung.width, rung.height) for rung in rungs]


@pytest.mark.parametrize(
    ("display", "expected"),
    [
        ((1920, 1080), [(416, 234), (640, 360), (854, 480), (1280, 720)]),
        ((1280, 720), [(416, 234), (640, 360), (854, 480), (1280, 720)]),
        ((854, 480), [(416, 234), (640, 360), (854, 480)]),
        ((640, 360), [(416, 234), (640, 360)]),
        ((700, 400), [(410, 234), (630, 360)]),  # 7:4: long side follows the aspect, even
        ((427, 240), [(416, 234)]),  # odd width: even output
        ((320, 180), [(320, 180)]),  # below every rung: one rung at the source size
        ((321, 181), [(320, 180)]),  # …floored to even, never upscaled
        ((240, 426), [(234, 416)]),  # portrait: the label is the short side
        ((1080, 1920), [(234, 416), (360, 640), (480, 854), (720, 1280)]),
        ((1440, 1080), [(312, 234), (480, 360), (640, 480), (960, 720)]),  # 4:3
        ((720, 720), [(234, 234), (360, 360), (480, 480), (720, 720)]),
    ],
)
def test_plan_rungs(display: tuple[int, int], expected: list[tuple[int, int]]) -> None:
    planned = plan_rungs(*display, DEFAULT_H264_LADDER)
    assert sizes(planned) == expected
    assert all(w % 2 == 0 and h % 2 == 0 for w, h in expected)
    assert all(min(r.width, r.height) <= min(display) for r in planned)


def test_plan_rungs_names_and_rate_control() -> None:
    planned = plan_rungs(1280, 720, DEFAULT_HEVC_LADDER)
    assert [r.name for r in planned] == ["hevc-234p", "hevc-360p", "hevc-480p", "hevc-720p"]
    assert [(r.crf, r.maxrate_kbps, r.bufsize_kbps) for r in planned] == [
        (r.crf, r.maxrate_kbps, r.bufsize_kbps) for r in DEFAULT_HEVC_LADDER.rungs
    ]
    assert planned[1].playlist == "hevc-360p.m3u8"
    assert planned[1].init_segment == "hevc-360p-init.mp4"
    assert planned[1].iframe_playlist == "hevc-360p-iframes.m3u8"
    assert plan_rungs(320, 180, DEFAULT_H264_LADDER)[0].name == "h264-180p"


def source(**changes: object) -> SourceInfo:
    base = SourceInfo(
        container="mov,mp4,m4a,3gp,3g2,mj2",
        duration_s=60.0,
        width=1280,
        height=720,
        video_stream=0,
        video_codec="h264",
        frame_rate=Fraction(30),
        audio_stream=1,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (source(), (1280, 720)),
        (source(width=720, height=576, sample_aspect=Fraction(64, 45)), (1024, 576)),  # PAL 16:9
        (source(rotation_deg=90), (720, 1280)),
        (source(rotation_deg=-90), (720, 1280)),
        (source(rotation_deg=180), (1280, 720)),
    ],
)
def test_display_size(info: SourceInfo, expected: tuple[int, int]) -> None:
    assert info.display_size == expected


def test_rotated_source_is_planned_portrait() -> None:
    plan = plan_encode(source(width=1920, height=1080, rotation_deg=90), SMALL)
    assert sizes(plan.rungs) == [(180, 320), (360, 640), (180, 320)]


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        (None, Fraction(30)),
        (Fraction(30), Fraction(30)),
        (Fraction(30000, 1001), Fraction(30000, 1001)),
        (Fraction(2997, 100), Fraction(30000, 1001)),  # snapped to the standard rate
        (Fraction(25), Fraction(25)),
        (Fraction(24), Fraction(24)),
        (Fraction(50), Fraction(25)),
        (Fraction(60), Fraction(30)),
        (Fraction(60000, 1001), Fraction(30000, 1001)),
        (Fraction(120), Fraction(30)),
        (Fraction(15), Fraction(15)),
        (Fraction(25, 2), Fraction(25, 2)),
        (Fraction(1000), Fraction(30)),  # VFR containers' timebase-like rates
        (Fraction(90000), Fraction(30)),
    ],
)
def test_output_frame_rate(rate: Fraction | None, expected: Fraction) -> None:
    assert output_frame_rate(rate, Fraction(30)) == expected


@pytest.mark.parametrize(
    ("duration", "interval", "count", "columns", "rows"),
    [
        (7.0, 10.0, 1, 1, 1),
        (60.0, 10.0, 6, 6, 1),
        (61.0, 10.0, 7, 7, 1),
        (600.0, 10.0, 60, 10, 6),
        (3600.0, 20.0, 180, 10, 18),  # long lecture: wider spacing, at most 180 thumbnails
    ],
)
def test_plan_thumbs(duration: float, interval: float, count: int, columns: int, rows: int) -> None:
    thumbs = plan_thumbs(duration, 1280, 720, HlsSettings())
    assert (thumbs.interval_s, thumbs.count, thumbs.columns, thumbs.rows) == (
        interval,
        count,
        columns,
        rows,
    )
    assert (thumbs.width, thumbs.height) == (160, 90)
    assert thumbs.columns * thumbs.rows >= thumbs.count


@pytest.mark.parametrize(
    ("info", "reason"),
    [
        (source(), None),
        (source(container="matroska,webm"), None),
        (source(container="hls"), "not an accepted video format"),
        (source(container="concat"), "not an accepted video format"),
        (source(container="image2"), "not an accepted video format"),
        (source(duration_s=0.04), "under 0.5 s"),
        (source(duration_s=7 * 3600.0), "over"),
        (source(width=7680, height=4320), "above the limit"),
        (source(width=0, height=0), "no usable size"),
    ],
)
def test_refusal(info: SourceInfo, reason: str | None) -> None:
    found = refusal(info, HlsSettings())
    if reason is None:
        assert found is None
    else:
        assert found is not None
        assert reason in found


@pytest.mark.parametrize(
    "make",
    [
        lambda: Rung(235, 23, 100, 200),
        lambda: Rung(234, 60, 100, 200),
        lambda: Rung(234, 23, 0, 200),
        lambda: Ladder("h264", (), "fast", "high"),
        lambda: Ladder("h264", (Rung(360, 23, 1, 1), Rung(234, 23, 1, 1)), "fast", "high"),
        lambda: HlsSettings(h264=DEFAULT_HEVC_LADDER),
        lambda: HlsSettings(segment_s=5),
    ],
)
def test_invalid_ladders(make: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        make()  # type: ignore[operator]


def test_settings_from_job() -> None:
    assert settings_from_job(LectureJob(ladder="lecture")) == HlsSettings()
    assert settings_from_job(LectureJob(ladder="lecture", hevc=False)).hevc is None
    assert settings_from_job(LectureJob(ffmpeg="/usr/bin/ffmpeg")).ffmpeg == "/usr/bin/ffmpeg"
    with pytest.raises(PermanentFault, match="unknown ladder"):
        settings_from_job(LectureJob(ladder="cinema"))


@pytest.mark.parametrize(
    ("kind", "document", "expected"),
    [
        ("lecture", {"ladder": "lecture"}, LectureJob()),
        ("image", {"widths": [320, 640]}, ImageJob(widths=(320, 640))),
        (
            "bundle",
            {"asset_id": "b", "version": 2, "previous_versions": 3},
            BundleJob(asset_id="b", version=2, previous_versions=3),
        ),
    ],
)
def test_job_settings_travel_as_json_and_come_back_typed(
    kind: str, document: dict[str, object], expected: object
) -> None:
    settings = job_settings(kind, document)
    assert settings == expected
    assert job_json(settings) == document  # what the job carries, unchanged


@pytest.mark.parametrize(
    ("kind", "document", "problem"),
    [
        ("image", {}, "widths"),
        ("image", {"widths": ["wide"]}, "widths"),
        ("bundle", {"asset_id": "b"}, "version"),
        ("lecture", {"ladder": "lecture", "crf": 18}, "crf"),
        ("video", {}, "kind"),
        ("lecture", ["not", "an", "object"], "JSON object"),
    ],
)
def test_bad_job_settings_name_the_problem(kind: str, document: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        job_settings(kind, document)


def test_profile_ids_are_those_of_the_untyped_settings_before() -> None:
    """Stored outputs are found by profile id: typing the settings must not change them
    (ids from the previous release's untyped dictionaries)."""
    assert profile_id(LectureJob()) == profile_id_of({"kind": "lecture", "ladder": "lecture"})
    assert profile_id(ImageJob(widths=(320, 640))) == profile_id_of(
        {"kind": "image", "widths": [320, 640]}
    )
    bundle = BundleJob(asset_id="b", version=2, previous_versions=3)
    assert profile_id(bundle) == profile_id_of(
        {"kind": "bundle", "asset_id": "b", "version": 2, "previous_versions": 3}
    )


def profile_id_of(untyped: dict[str, object]) -> str:
    blob = json.dumps({**untyped, "v": PIPELINE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --- Pure: ffmpeg arguments ------------------------------------------------------------------


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_encode_args_one_process_both_codecs() -> None:
    info = source(width=640, height=360, video_stream=1, audio_stream=0, duration_s=7.0)
    plan = plan_encode(info, SMALL)
    assert plan.processes == (("h264", "hevc"),)
    assert plan.gop_frames == 60
    args = encode_args(
        "file:/in.mp4", info, plan, SMALL, ("h264", "hevc"), with_audio=True, with_thumbs=True
    )
    assert option(args, "-f") == "mov"  # the probed demuxer, forced
    assert option(args, "-protocol_whitelist") == "file"
    graph = option(args, "-filter_complex")
    # one decode, one split per distinct size (+ the sprite), the 180p scaler shared by codecs
    assert graph.startswith("[0:1]fps=30,format=yuv420p,split=3[s0][s1][s2];")
    assert "[s0]scale=320:180,setsar=1,split=2[v0][v2]" in graph
    assert "[s1]scale=640:360,setsar=1[v1]" in graph
    assert "tile=4x1" in graph
    assert graph.count("scale=") == 3
    assert [args[i + 1] for i, a in enumerate(args) if a == "-map"] == [
        "[v0]", "[v1]", "[v2]", "0:0", "[thumbs]",
    ]  # fmt: skip
    assert option(args, "-c:v:0") == "libx264"
    assert option(args, "-c:v:1") == "libx264"
    assert option(args, "-c:v:2") == "libx265"
    assert option(args, "-tag:v:2") == "hvc1"
    rate_control = [option(args, f"-{name}:v:1") for name in ("crf", "maxrate", "bufsize")]
    assert rate_control == ["28", "500k", "1000k"]
    for index in range(3):
        assert option(args, f"-force_key_frames:v:{index}") == "expr:gte(t,n_forced*2)"
        assert option(args, f"-forced-idr:v:{index}") == "1"
    assert option(args, "-sc_threshold:v:0") == "0"
    assert option(args, "-g:v:0") == "60"
    x265 = option(args, "-x265-params:v:2").split(":")
    assert {"keyint=60", "min-keyint=60", "scenecut=0", "open-gop=0", "bframes=3"} <= set(x265)
    assert (option(args, "-c:a:0"), option(args, "-b:a:0"), option(args, "-ac:a:0")) == (
        "aac", "32k", "1",
    )  # fmt: skip
    assert option(args, "-profile:a:0") == "aac_low"
    assert option(args, "-hls_segment_type") == "fmp4"
    assert option(args, "-hls_time") == "6"
    assert option(args, "-var_stream_map") == (
        "v:0,name:h264-180p v:1,name:h264-360p v:2,name:hevc-180p a:0,name:audio"
    )
    assert option(args, "-hls_segment_filename") == "%v-%05d.m4s"
    assert args[args.index("-var_stream_map") + 2] == "%v.m3u8"
    assert option(args, "-hls_fmp4_init_filename") == "%v-init.mp4"


def test_encode_args_separate_hevc_process_and_no_audio() -> None:
    settings = replace(SMALL, hevc_placement="separate")
    info = source(width=640, height=360, audio_stream=None, frame_rate=Fraction(25))
    plan = plan_encode(info, settings)
    assert plan.processes == (("h264",), ("hevc",))
    assert not plan.audio
    first = encode_args(
        "file:/a", info, plan, settings, ("h264",), with_audio=True, with_thumbs=True
    )
    second = encode_args(
        "file:/a", info, plan, settings, ("hevc",), with_audio=False, with_thumbs=False
    )
    assert option(first, "-var_stream_map") == "v:0,name:h264-180p v:1,name:h264-360p"
    assert "-c:a:0" not in first
    assert option(first, "-g:v:0") == "50"
    graph = option(second, "-filter_complex")
    assert graph == "[0:0]fps=25,format=yuv420p[s0];[s0]scale=320:180,setsar=1[v0]"
    assert option(second, "-c:v:0") == "libx265"
    # one variant: hlsenc would leave %v in the init segment's name, so no var_stream_map
    assert "-var_stream_map" not in second
    assert option(second, "-hls_fmp4_init_filename") == "hevc-180p-init.mp4"
    assert option(second, "-hls_segment_filename") == "hevc-180p-%05d.m4s"
    assert second[second.index("-hls_segment_filename") + 4] == "hevc-180p.m3u8"
    assert "[thumbs]" not in second


def test_filter_graph_single_rung_without_thumbs() -> None:
    rung = plan_rungs(640, 360, SMALL.h264)[0]
    graph, labels = filter_graph((rung,), "0:0", Fraction(30000, 1001), None)
    assert graph == "[0:0]fps=30000/1001,format=yuv420p[s0];[s0]scale=320:180,setsar=1[v0]"
    assert labels == ["[v0]"]


def test_poster_args() -> None:
    info = source()
    plan = plan_encode(info, HlsSettings())
    args = poster_args("file:/in.mp4", info, plan, HlsSettings())
    assert option(args, "-ss") == "6.000"  # 10 % in, an input seek
    assert args.index("-ss") < args.index("-i")
    assert "scale=1280:720" in option(args, "-vf")
    assert args[-1] == "poster.jpg"


# --- Pure: codec strings, bit rates, playlists -------------------------------------------------


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (bytes([1, 0x64, 0x00, 0x1F]), "avc1.64001f"),  # High 3.1
        (bytes([1, 0x42, 0xC0, 0x1E]), "avc1.42c01e"),  # Constrained Baseline 3.0
        (bytes([1, 0x4D, 0x40, 0x28]), "avc1.4d4028"),  # Main 4.0
    ],
)
def test_avc_codec_string(record: bytes, expected: str) -> None:
    assert avc_codec_string(b"avc1", record) == expected


def hvcc(byte1: int, compat: int, constraints: bytes, level: int) -> bytes:
    return bytes([1, byte1]) + struct.pack(">I", compat) + constraints + bytes([level])


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (hvcc(0x01, 0x60000000, bytes([0xB0, 0, 0, 0, 0, 0]), 93), "hvc1.1.6.L93.B0"),
        (hvcc(0x02, 0x20000000, bytes([0xB0, 0, 0, 0, 0, 0]), 120), "hvc1.2.4.L120.B0"),
        (hvcc(0x21, 0x60000000, bytes([0x90, 0, 0, 0, 0, 0]), 150), "hvc1.1.6.H150.90"),
        (hvcc(0x41, 0x60000000, bytes([0xB0, 0x01, 0, 0, 0, 0]), 90), "hvc1.A1.6.L90.B0.1"),
        (hvcc(0x01, 0x60000000, bytes(6), 60), "hvc1.1.6.L60"),
    ],
)
def test_hevc_codec_string(record: bytes, expected: str) -> None:
    assert hevc_codec_string(b"hvc1", record) == expected


def esds(audio_specific_config: bytes) -> bytes:
    dsi = bytes([0x05, len(audio_specific_config)]) + audio_specific_config
    dcd_body = bytes([0x40, 0x15]) + bytes(3) + bytes(8) + dsi
    dcd = bytes([0x04, len(dcd_body)]) + dcd_body
    es_body = bytes([0, 1, 0]) + dcd + bytes([0x06, 1, 2])
    return bytes([0x03, len(es_body)]) + es_body


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (bytes([0x13, 0x08]), "mp4a.40.2"),  # AAC-LC, 24 kHz, mono
        (bytes([0x2B, 0x92, 0x08, 0x00]), "mp4a.40.5"),  # HE-AAC (SBR)
    ],
)
def test_aac_codec_string(config: bytes, expected: str) -> None:
    assert aac_codec_string(esds(config)) == expected


def segs(*pairs: tuple[float, int]) -> list[Segment]:
    return [Segment(f"s{i}.m4s", d, n) for i, (d, n) in enumerate(pairs)]


@pytest.mark.parametrize(
    ("init", "segments", "peak", "average"),
    [
        # runs of 3..9 s: [s0]+init, [s1], [s1,s2]; [s2] alone (1 s) is too short to count
        (1000, segs((6, 75_000), (6, 150_000), (1, 50_000)), 228_572, 169_847),
        (0, segs((6, 60_000), (6, 60_000)), 80_000, 80_000),
        (500, segs((2.0, 10_000)), 42_000, 42_000),  # shorter than half a target: all of it
        (0, segs((6, 30_000), (0.04, 20_000)), 66_226, 66_226),  # a one-frame tail: in a run
    ],
)
def test_measure_bitrate(init: int, segments: list[Segment], peak: int, average: int) -> None:
    assert measure_bitrate(init, segments, 6) == Bitrate(peak, average)


@pytest.mark.parametrize(
    ("durations", "expected"),
    [((6.0, 6.0, 1.0), 6), ((6.006, 2.0), 6), ((6.5,), 7), ((0.2,), 1), ((5.4, 6.49), 6)],
)
def test_target_duration(durations: tuple[float, ...], expected: int) -> None:
    assert target_duration([Segment("x", d, 1) for d in durations]) == expected


def test_media_playlist_round_trip() -> None:
    playlist = MediaPlaylist("h264-360p-init.mp4", tuple(segs((6.0, 10), (6.0, 20), (1.5, 5))))
    text = media_playlist_text(playlist)
    assert parse_media_playlist(text) == (
        "h264-360p-init.mp4",
        [("s0.m4s", 6.0), ("s1.m4s", 6.0), ("s2.m4s", 1.5)],
    )
    parsed = m3u8.loads(text)
    assert parsed.target_duration == 6
    assert parsed.playlist_type == "vod"
    assert parsed.is_endlist
    assert parsed.segment_map[0].uri == "h264-360p-init.mp4"


def test_iframe_playlist_text() -> None:
    iframes = MediaPlaylist("a-init.mp4", (Segment("a-00001.m4s", 6.0, 4000, 76),))
    parsed = m3u8.loads(media_playlist_text(iframes, iframes_only=True))
    assert parsed.is_i_frames_only
    assert parsed.segments[0].byterange == "4000@76"


def variant(codec: str, width: int, height: int, codecs: str, peak: int) -> VideoVariant:
    rung = PlannedRung(codec, width, height, 23, 100, 200, "fast", "main")  # type: ignore[arg-type]
    return VideoVariant(rung, codecs, Bitrate(peak, peak // 2), Bitrate(peak // 4, peak // 10))


def test_master_playlist() -> None:
    videos = [
        variant("h264", 416, 234, "avc1.64000d", 150_000),
        variant("h264", 640, 360, "avc1.64001e", 300_000),
        variant("hevc", 416, 234, "hvc1.1.6.L60.90", 100_000),
    ]
    audio = AudioRendition("mp4a.40.2", Bitrate(34_000, 33_000), 1)
    master = m3u8.loads(master_playlist_text(videos, audio, Fraction(30000, 1001)))
    assert master.is_variant
    assert [p.uri for p in master.playlists] == [
        "h264-234p.m3u8", "h264-360p.m3u8", "hevc-234p.m3u8", "audio.m3u8",
    ]  # fmt: skip
    first = master.playlists[0].stream_info
    assert first.bandwidth == 184_000  # video peak + audio peak
    assert first.average_bandwidth == 75_000 + 33_000
    assert first.codecs == "avc1.64000d,mp4a.40.2"
    assert first.resolution == (416, 234)
    assert first.frame_rate == 29.97
    assert first.audio == "audio"
    assert master.playlists[2].stream_info.codecs == "hvc1.1.6.L60.90,mp4a.40.2"
    audio_only = master.playlists[3].stream_info
    assert (audio_only.codecs, audio_only.bandwidth, audio_only.resolution) == (
        "mp4a.40.2",
        34_000,
        None,
    )
    [media] = master.media
    assert (media.type, media.group_id, media.uri, media.channels) == (
        "AUDIO",
        "audio",
        "audio.m3u8",
        "1",
    )
    assert [i.uri for i in master.iframe_playlists] == [
        "h264-234p-iframes.m3u8", "h264-360p-iframes.m3u8", "hevc-234p-iframes.m3u8",
    ]  # fmt: skip
    assert master.iframe_playlists[0].iframe_stream_info.codecs == "avc1.64000d"


def test_master_playlist_without_audio() -> None:
    videos = [variant("h264", 416, 234, "avc1.64000d", 150_000)]
    master = m3u8.loads(master_playlist_text(videos, None, Fraction(25)))
    assert not master.media
    assert [p.uri for p in master.playlists] == ["h264-234p.m3u8"]
    info = master.playlists[0].stream_info
    assert (info.codecs, info.bandwidth, info.audio) == ("avc1.64000d", 150_000, None)


def test_thumbs_vtt() -> None:
    plan = plan_encode(source(duration_s=25.0), HlsSettings())
    text = thumbs_vtt_text(plan, 25.0)
    assert text.splitlines()[:5] == [
        "WEBVTT",
        "",
        "00:00:00.000 --> 00:00:10.000",
        "thumbs.jpg#xywh=0,0,160,90",
        "",
    ]
    assert "00:00:20.000 --> 00:00:25.000\nthumbs.jpg#xywh=320,0,160,90" in text


# --- Pure: how far an encode is ------------------------------------------------------------------

WORK = EncodeWork(duration_s=10.0, frame_rate=Fraction(30), playlists=("h264-180p",), segment_s=6)


def test_encode_work_totals() -> None:
    assert WORK.total_frames == 300
    assert WORK.segments_each == 2  # 6 s and 4 s
    assert EncodeWork(12.0, Fraction(30000, 1001), segment_s=6).total_frames == 360
    assert EncodeWork(12.0, Fraction(25), segment_s=6).segments_each == 2
    assert EncodeWork(12.0).total_frames is None
    assert EncodeWork(12.0).segments_each == 0


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        pytest.param({"frame": "150", "out_time_us": "N/A"}, 0.5, id="frames-while-time-is-na"),
        pytest.param({"frame": "75", "out_time_us": "9000000"}, 0.25, id="frames-first"),
        pytest.param({"frame": "0", "out_time_us": "2500000"}, 0.25, id="time-while-lookahead"),
        pytest.param({"frame": "N/A", "out_time_ms": "5000000"}, 0.5, id="out-time-ms-is-us"),
        pytest.param({"out_time_us": "N/A", "out_time": "00:00:07.500000"}, 0.75, id="clock"),
        pytest.param({"frame": "900"}, 1.0, id="capped"),
        pytest.param({"frame": "0", "out_time_us": "N/A", "out_time": "N/A"}, None, id="all-na"),
        pytest.param({"out_time": "-00:00:00.040000"}, None, id="negative-start"),
        pytest.param({}, None, id="empty"),
    ],
)
def test_report_fraction(report: dict[str, str], expected: float | None) -> None:
    assert report_fraction(report, WORK) == expected


# --- Real ffmpeg: clips --------------------------------------------------------------------------


def make_clip(
    path: Path,
    *,
    size: str = "426x240",
    seconds: float = 2,
    rate: int = 30,
    audio: str | None = "sine",
    video_filter: str | None = None,
    pix_fmt: str = "yuv420p",
    extra: tuple[str, ...] = (),
) -> Path:
    args = [FFMPEG, "-hide_banner", "-loglevel", "error", "-y"]
    args += ["-f", "lavfi", "-i", f"testsrc2=s={size}:r={rate}:d={seconds}"]
    if audio == "sine":
        args += ["-f", "lavfi", "-i", f"sine=f=330:sample_rate=48000:d={seconds}"]
    elif audio == "silent":
        args += ["-f", "lavfi", "-t", str(seconds), "-i", "anullsrc=r=44100:cl=stereo"]
    if video_filter:
        args += ["-vf", video_filter]
    args += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", pix_fmt]
    if audio:
        args += ["-c:a", "aac", "-shortest"]
    args += [*extra, str(path)]
    subprocess.run(args, check=True)
    return path


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clips")


@dataclass
class Result:
    out: Path
    outputs: Outputs
    progress: list[tuple[str, float]]


def transcode(src: Path, out: Path, settings: HlsSettings = SMALL) -> Result:
    out.mkdir()
    events: list[tuple[str, float]] = []
    outputs = run(src, out, settings, lambda stage, fraction: events.append((stage, fraction)))
    return Result(out, outputs, events)


@pytest.fixture(scope="session")
def main_run(clips: Path) -> Result:
    """7 s at 640x360: two 6 s segments (the second 1 s), keyframes at 0, 2, 4, 6."""
    src = make_clip(clips / "main.mp4", size="640x360", seconds=7)
    return transcode(src, clips / "main-out")


# --- Real ffmpeg: checking every output ----------------------------------------------------------


def concat(out: Path, playlist: m3u8.M3U8) -> bytes:
    data = (out / playlist.segment_map[0].uri).read_bytes()
    return data + b"".join((out / s.uri).read_bytes() for s in playlist.segments)


def rfc_peak(out: Path, playlist: m3u8.M3U8) -> float:
    """Independent reading of RFC 8216 §4.3.4.2 (the first run also carries the init)."""
    target = playlist.target_duration
    items = [(s.duration, (out / s.uri).stat().st_size) for s in playlist.segments]
    init = (out / playlist.segment_map[0].uri).stat().st_size
    runs = []
    for i in range(len(items)):
        for j in range(i + 1, len(items) + 1):
            seconds = sum(d for d, _ in items[i:j])
            size = sum(n for _, n in items[i:j]) + (init if i == 0 else 0)
            if 0.5 * target <= seconds <= 1.5 * target:
                runs.append(size * 8 / seconds)
    if not runs:
        return (init + sum(n for _, n in items)) * 8 / sum(d for d, _ in items)
    return max(runs)


def average(out: Path, playlist: m3u8.M3U8) -> float:
    return len(concat(out, playlist)) * 8 / sum(s.duration for s in playlist.segments)


@dataclass
class Checked:
    resolutions: dict[str, tuple[int, int]]
    keyframes: dict[str, list[float]]
    frame_rate: float
    audio: bool


def check_outputs(result: Result) -> Checked:
    out, outputs = result.out, result.outputs
    listed = {f.name for f in outputs.files}
    assert listed == {p.name for p in out.iterdir()}, "every file written is listed, and only those"
    assert all(f.path.is_file() and f.path.parent == out for f in outputs.files)
    assert outputs.primary == "master.m3u8"

    master = m3u8.load(str(out / "master.m3u8"))
    assert master.is_variant
    audio = next((m for m in master.media if m.type == "AUDIO"), None)
    audio_playlist = m3u8.load(str(out / "audio.m3u8")) if audio else None
    if audio:
        assert audio.uri == "audio.m3u8"
        assert audio_playlist is not None
        assert audio_playlist.target_duration <= 6
        with av.open(io.BytesIO(concat(out, audio_playlist))) as container:
            stream = container.streams.audio[0]
            assert stream.codec_context.name == "aac"
            assert stream.codec_context.layout.nb_channels == 1
            assert sum(f.samples for f in container.decode(stream)) > 0
    else:
        assert "audio.m3u8" not in listed

    resolutions: dict[str, tuple[int, int]] = {}
    keyframes: dict[str, list[float]] = {}
    frame_rates = set()
    for variant_ in master.playlists:
        info = variant_.stream_info
        playlist = m3u8.load(str(out / variant_.uri))
        assert playlist.target_duration <= 6
        assert playlist.is_endlist
        assert playlist.segment_map[0].uri in listed
        assert all(
            s.uri in listed and round(s.duration) <= playlist.target_duration
            for s in playlist.segments
        )
        assert info.bandwidth >= info.average_bandwidth > 0
        if variant_.uri == "audio.m3u8":
            assert audio_playlist is not None
            assert info.codecs == "mp4a.40.2"
            assert info.bandwidth >= rfc_peak(out, audio_playlist)
            continue
        video_codec, *rest = info.codecs.split(",")
        assert rest == (["mp4a.40.2"] if audio else [])
        assert info.audio == (audio.group_id if audio else None)
        audio_peak = rfc_peak(out, audio_playlist) if audio_playlist else 0.0
        audio_avg = average(out, audio_playlist) if audio_playlist else 0.0
        assert info.bandwidth >= rfc_peak(out, playlist) + audio_peak
        assert info.average_bandwidth == pytest.approx(average(out, playlist) + audio_avg, rel=0.01)
        for segment in playlist.segments:  # every full-length segment, on its own
            if segment.duration >= 0.5 * playlist.target_duration:
                size = (out / segment.uri).stat().st_size
                assert info.bandwidth >= size * 8 / segment.duration
        frame_rates.add(info.frame_rate)
        with av.open(io.BytesIO(concat(out, playlist))) as container:
            stream = container.streams.video[0]
            context = stream.codec_context
            expected = {"avc1": "h264", "hvc1": "hevc"}[video_codec.split(".")[0]]
            assert context.name == expected
            assert (context.width, context.height) == info.resolution
            assert context.width % 2 == 0
            assert context.height % 2 == 0
            if expected == "h264":
                assert int(video_codec[-2:], 16) == context.level
                assert video_codec.startswith("avc1.64")  # High
            else:
                assert video_codec.startswith("hvc1.1.6.L")  # Main, hvc1 sample entry
            keys = [
                round(float(p.pts * p.time_base), 2)
                for p in container.demux(stream)
                if p.is_keyframe and p.pts is not None
            ]
        resolutions[variant_.uri.removesuffix(".m3u8")] = info.resolution
        keyframes[variant_.uri.removesuffix(".m3u8")] = keys

    for iframe in master.iframe_playlists:
        playlist = m3u8.load(str(out / iframe.uri))
        assert playlist.is_i_frames_only
        init = (out / playlist.segment_map[0].uri).read_bytes()
        for segment in playlist.segments:
            length, offset = (int(x) for x in segment.byterange.split("@"))
            data = (out / segment.uri).read_bytes()[offset : offset + length]
            assert data[4:8] == b"moof"
            with av.open(io.BytesIO(init + data)) as container:
                frame = next(container.decode(video=0))
                assert frame.key_frame
                assert (frame.width, frame.height) == iframe.iframe_stream_info.resolution
        stream_name = iframe.uri.removesuffix("-iframes.m3u8")
        assert stream_name in resolutions

    with Image.open(out / "poster.jpg") as poster:
        assert poster.format == "JPEG"
        top = max((w, h) for name, (w, h) in resolutions.items() if name.startswith("h264"))
        assert poster.size == top
    with Image.open(out / "thumbs.jpg") as sprite:
        assert sprite.format == "JPEG"
        sprite_size = sprite.size
    cues = (out / "thumbs.vtt").read_text().split("\n\n")
    assert cues[0] == "WEBVTT"
    for cue in filter(None, cues[1:]):
        timing, target = cue.strip().splitlines()
        assert " --> " in timing
        name, xywh = target.split("#xywh=")
        x, y, w, h = (int(v) for v in xywh.split(","))
        assert name == "thumbs.jpg"
        assert x + w <= sprite_size[0]
        assert y + h <= sprite_size[1]

    assert len(frame_rates) == 1
    return Checked(resolutions, keyframes, frame_rates.pop(), audio is not None)


def assert_aligned(checked: Checked, duration: float) -> None:
    """Every rung of both codecs has a keyframe every 2 s, at the same times. The first one
    is at the encoders' B-frame reorder delay (two frames: the hls muxer of each rung shifts
    its timeline so that decoding starts at 0), the same for every rung."""
    lists = list(checked.keyframes.values())
    assert all(keys == lists[0] for keys in lists), checked.keyframes
    first = lists[0][0]
    assert 0 <= first < 0.1
    expected = [round(first + t, 2) for t in range(0, math.ceil(duration - 0.05), 2)]
    assert lists[0] == expected


# --- Real ffmpeg: the pipeline -------------------------------------------------------------------


def test_ladder_outputs(main_run: Result) -> None:
    checked = check_outputs(main_run)
    assert checked.resolutions == {
        "h264-180p": (320, 180),
        "h264-360p": (640, 360),
        "hevc-180p": (320, 180),
    }
    assert checked.audio
    assert checked.frame_rate == 30.0
    assert_aligned(checked, 7.0)
    names = {f.name for f in main_run.outputs.files}
    assert {
        "master.m3u8", "h264-360p.m3u8", "h264-360p-init.mp4", "h264-360p-00001.m4s",
        "h264-360p-00002.m4s", "hevc-180p.m3u8", "audio.m3u8", "audio-init.mp4",
        "h264-360p-iframes.m3u8", "hevc-180p-iframes.m3u8", "poster.jpg", "thumbs.jpg",
        "thumbs.vtt",
    } <= names  # fmt: skip
    types = {f.name: f.content_type for f in main_run.outputs.files}
    assert types["master.m3u8"] == "application/vnd.apple.mpegurl"
    assert types["audio-00001.m4s"] == "audio/mp4"
    assert types["h264-360p-00001.m4s"] == "video/mp4"


def test_segments_and_iframes(main_run: Result) -> None:
    playlist = m3u8.load(str(main_run.out / "h264-360p.m3u8"))
    assert [round(s.duration, 3) for s in playlist.segments] == [6.0, 1.0]
    iframes = m3u8.load(str(main_run.out / "h264-360p-iframes.m3u8"))
    assert [s.uri for s in iframes.segments] == ["h264-360p-00001.m4s", "h264-360p-00002.m4s"]
    assert [round(s.duration, 3) for s in iframes.segments] == [6.0, 1.0]


def test_sprite_and_vtt(main_run: Result) -> None:
    with Image.open(main_run.out / "thumbs.jpg") as sprite:
        assert sprite.size == (4 * 160, 90)  # 7 s every 2 s: 4 thumbnails in a row
    cues = [c for c in (main_run.out / "thumbs.vtt").read_text().split("\n\n")[1:] if c.strip()]
    assert len(cues) == 4
    assert cues[-1].strip() == "00:00:06.000 --> 00:00:07.000\nthumbs.jpg#xywh=480,0,160,90"


def test_progress_and_details(main_run: Result) -> None:
    stages = [stage for stage, _ in main_run.progress]
    fractions = [fraction for _, fraction in main_run.progress]
    assert stages[0] == "probe"
    assert stages[-1] == "package"
    assert "encode" in stages
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    encode = [f for s, f in main_run.progress if s == "encode"]
    assert len(encode) >= 2
    details = main_run.outputs.details
    assert details["audio"] is True
    assert [v["name"] for v in details["variants"]] == ["h264-180p", "h264-360p", "hevc-180p"]
    assert details["audio_rendition"]["codecs"] == "mp4a.40.2"


def test_hevc_in_a_separate_process(clips: Path) -> None:
    src = make_clip(clips / "separate.mp4", seconds=3)
    result = transcode(src, clips / "separate-out", replace(SMALL, hevc_placement="separate"))
    checked = check_outputs(result)
    assert set(checked.resolutions) == {"h264-180p", "hevc-180p"}
    assert_aligned(checked, 3.0)


def test_default_ladder_on_720p(clips: Path) -> None:
    src = make_clip(clips / "hd.mp4", size="1280x720", seconds=2)
    result = transcode(src, clips / "hd-out", HlsSettings())
    checked = check_outputs(result)
    assert checked.resolutions == {
        f"{codec}-{h}p": (w, h)
        for codec in ("h264", "hevc")
        for w, h in ((416, 234), (640, 360), (854, 480), (1280, 720))
    }
    assert_aligned(checked, 2.0)


# --- Real ffmpeg: awkward and bad inputs ---------------------------------------------------------


def test_text_file_named_mp4(clips: Path) -> None:
    src = clips / "notes.mp4"
    src.write_text("Mole concept: 1 mol = 6.022e23 particles\n" * 20)
    with pytest.raises(PermanentFault, match="not a media file"):
        transcode(src, clips / "notes-out")


def test_audio_only_file(clips: Path) -> None:
    src = clips / "voice.m4a"
    subprocess.run(
        [FFMPEG, "-loglevel", "error", "-f", "lavfi", "-i", "sine=d=2", "-c:a", "aac", str(src)],
        check=True,
    )
    with pytest.raises(PermanentFault, match="no video stream"):
        transcode(src, clips / "voice-out")


def test_truncated_mp4_without_index(clips: Path) -> None:
    whole = make_clip(clips / "whole.mp4", seconds=3).read_bytes()
    src = clips / "truncated.mp4"
    src.write_bytes(whole[: len(whole) * 3 // 10])  # moov is at the end: it is gone
    with pytest.raises(PermanentFault, match="not a media file"):
        transcode(src, clips / "truncated-out")


def test_truncated_faststart_mp4(clips: Path) -> None:
    whole = make_clip(clips / "whole-fs.mp4", seconds=3, extra=("-movflags", "+faststart"))
    src = clips / "truncated-fs.mp4"
    data = whole.read_bytes()
    src.write_bytes(data[: len(data) * 3 // 10])  # the index survives, most samples do not
    with pytest.raises(PermanentFault, match="truncated"):
        transcode(src, clips / "truncated-fs-out")


def test_no_audio(clips: Path) -> None:
    src = make_clip(clips / "mute.mp4", audio=None)
    result = transcode(src, clips / "mute-out")
    checked = check_outputs(result)
    assert not checked.audio
    assert result.outputs.details["audio"] is False
    assert_aligned(checked, 2.0)


def test_silent_audio(clips: Path) -> None:
    src = make_clip(clips / "silent.mp4", audio="silent")
    checked = check_outputs(transcode(src, clips / "silent-out"))
    assert checked.audio


def test_odd_width_yuv444(clips: Path) -> None:
    src = make_clip(clips / "odd.mp4", size="427x240", pix_fmt="yuv444p")
    checked = check_outputs(transcode(src, clips / "odd-out"))
    assert checked.resolutions == {"h264-180p": (320, 180), "hevc-180p": (320, 180)}


def test_portrait(clips: Path) -> None:
    src = make_clip(clips / "portrait.mp4", size="240x426")
    checked = check_outputs(transcode(src, clips / "portrait-out"))
    assert checked.resolutions == {"h264-180p": (180, 320), "hevc-180p": (180, 320)}


def test_rotated_phone_video(clips: Path) -> None:
    landscape = make_clip(clips / "landscape.mp4")
    src = clips / "rotated.mp4"
    subprocess.run(
        [
            FFMPEG,
            "-loglevel",
            "error",
            "-display_rotation",
            "90",
            "-i",
            str(landscape),
            "-c",
            "copy",
            str(src),
        ],
        check=True,
    )
    checked = check_outputs(transcode(src, clips / "rotated-out"))
    assert checked.resolutions == {"h264-180p": (180, 320), "hevc-180p": (180, 320)}


def test_variable_frame_rate(clips: Path) -> None:
    # drop frames in irregular runs and keep the timestamps: a VFR stream at a nominal 25 fps
    src = make_clip(
        clips / "vfr.mp4",
        seconds=3,
        rate=25,
        video_filter="select='not(between(mod(n\\,17)\\,3\\,9))'",
        extra=("-fps_mode", "vfr"),
    )
    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate < 25  # really variable
        assert stream.frames < 70
    checked = check_outputs(transcode(src, clips / "vfr-out"))
    assert checked.frame_rate == 25.0
    assert_aligned(checked, 3.0)


def test_progress_moves_throughout_the_encode(clips: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The encode that also makes the thumbnail sprite: ffmpeg prints no report until the
    sprite's one frame comes out near the end, so progress comes from the segments written."""
    monkeypatch.setattr(hls, "PROGRESS_POLL_S", 0.02)
    src = make_clip(clips / "progress.mp4", size="320x180", seconds=12)
    settings = replace(SMALL, segment_s=2)
    result = transcode(src, clips / "progress-out", settings)
    encode = [fraction for stage, fraction in result.progress if stage == "encode"]
    assert encode == sorted(encode)
    assert encode[0] == pytest.approx(0.02)  # the encode stage shows at once
    assert encode[-1] == pytest.approx(0.92)
    inside = sorted({f for f in encode if 0.02 < f < 0.92})
    assert len(inside) >= 3, result.progress
    stages = [stage for stage, _ in result.progress]
    assert stages.index("poster") > stages.index("encode")
    check_outputs(result)


class Cancelled(Exception):
    pass


def test_cancelling_through_progress_stops_ffmpeg(clips: Path) -> None:
    src = make_clip(clips / "cancel.mp4", size="640x360", seconds=3)

    def cancel(stage: str, fraction: float) -> None:
        if stage == "encode":
            raise Cancelled

    out = clips / "cancel-out"
    out.mkdir()
    with pytest.raises(Cancelled):
        run(src, out, SMALL, cancel)
    assert not (out / "master.m3u8").exists()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert str(src).encode() not in cmdline.read_bytes(), "ffmpeg is still running"
        except OSError:
            continue  # the process ended while we looked

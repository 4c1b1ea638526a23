#!/usr/bin/env python
"""Cost and quality of the HLS ladder (transcode/hls.py, transcode/ladder.py) on a generated
lecture: our one-process ladders against the same rungs as one plain ffmpeg process each, the
H.264 and HEVC ladders in one process against two, and our capped-CRF rungs against a
constant-bitrate ladder at the same nominal rates (bytes per minute, SSIM and PSNR).

    .venv/bin/python bench/transcode_ladder.py [--duration 60] [--skip-pipeline] [--keep]

Every measurement runs alone, one after the other. CPU seconds are RUSAGE_CHILDREN deltas
(ffmpeg's user + system time); the real-time factor is media seconds per wall second. Results
go to bench/results/transcode_ladder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import imageio_ffmpeg  # noqa: E402

from transcode.hls import probe, run  # noqa: E402
from transcode.ladder import (  # noqa: E402
    EncodePlan,
    HlsSettings,
    PlannedRung,
    SourceInfo,
    VideoCodec,
    encode_args,
    plan_encode,
)

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
SLIDE_S = 20


# --- The lecture -------------------------------------------------------------------------------


def lecture_graph(duration_s: float) -> str:
    """Slides (a title, then a line of text every 2.5 s, a new slide every 20 s), a red pointer
    moving over them, and a 256x144 "webcam" inset (testsrc2: busier than a real face)."""
    texts = []
    for slide in range(max(1, -(-int(duration_s) // SLIDE_S))):
        start, end = slide * SLIDE_S, (slide + 1) * SLIDE_S
        texts.append(
            f"drawtext=fontfile={FONT}:text='Lecture {slide + 1} - Mole concept and "
            f"stoichiometry':x=80:y=60:fontsize=44:fontcolor=0x1a237e:"
            f"enable='between(t,{start},{end})'"
        )
        for line in range(6):
            at = start + 2 + line * 2.5
            texts.append(
                f"drawtext=fontfile={FONT}:text='{slide + 1}.{line + 1}  n = m / M   with  "
                f"N = n x 6.022e23  particles':x=100:y={170 + line * 70}:fontsize=32:"
                f"fontcolor=0x212121:enable='between(t,{at},{end})'"
            )
    return (
        "[0:v]" + ",".join(texts) + "[slides];"
        "[1:v]format=rgba[dot];"
        "[slides][dot]overlay=x='300+250*sin(t/2.3)':y='330+140*sin(t/1.7)'[pointed];"
        "[2:v]scale=256:144[cam];"
        "[pointed][cam]overlay=x=W-w-24:y=H-h-24,format=yuv420p[v]"
    )


def generate_lecture(path: Path, duration_s: float) -> None:
    """1280x720 at 30 fps, H.264 CRF 16 (a clean screen recording) with a voice-like tone."""
    voice = (
        "aevalsrc='0.25*sin(2*PI*170*t)*(0.55+0.45*sin(2*PI*2.7*t))"
        f"+0.03*sin(2*PI*1300*t)':s=48000:d={duration_s}"
    )
    args = [
        FFMPEG,
        "-hide_banner",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        f"color=c=0xfafaf5:s=1280x720:r=30:d={duration_s}",
        "-f",
        "lavfi",
        "-i",
        f"color=c=red:s=16x16:r=30:d={duration_s}",
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=s=320x180:r=30:d={duration_s}",
        "-f",
        "lavfi",
        "-i",
        voice,
        "-filter_complex",
        lecture_graph(duration_s),
        "-map",
        "[v]",
        "-map",
        "3:a",
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-crf",
        "16",
        "-g",
        "60",
        "-c:a",
        "aac",
        "-b:a",
        "128k",
        "-movflags",
        "+faststart",
        str(path),
    ]
    subprocess.run(args, check=True)


# --- Measuring ---------------------------------------------------------------------------------


@dataclass
class Cost:
    name: str
    processes: int
    wall_s: float
    cpu_s: float
    media_s: float

    @property
    def realtime(self) -> float:
        return self.media_s / self.wall_s

    @property
    def cpu_per_media_s(self) -> float:
        return self.cpu_s / self.media_s


def measure(name: str, media_s: float, processes: int, work: Callable[[], None]) -> Cost:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    work()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cost = Cost(name, processes, wall, cpu, media_s)
    print(
        f"  {name:<28} {processes} proc  wall {wall:7.1f} s  CPU {cpu:7.1f} s  "
        f"{cost.realtime:5.2f}x real time",
        flush=True,
    )
    return cost


def ffmpeg(args: list[str], cwd: Path) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    subprocess.run([FFMPEG, *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def sequential(commands: list[list[str]], out: Path) -> Callable[[], None]:
    def work() -> None:
        for args in commands:
            ffmpeg(args, out)

    return work


def ours(
    src: str,
    info: SourceInfo,
    plan: EncodePlan,
    settings: HlsSettings,
    codecs: tuple[VideoCodec, ...],
    out: Path,
) -> Callable[[], None]:
    """One process: a single decode and split feeding every rung of ``codecs``."""
    args = encode_args(src, info, plan, settings, codecs, with_audio=False, with_thumbs=False)
    return sequential([args], out)


def per_rung_args(
    src: str, info: SourceInfo, plan: EncodePlan, settings: HlsSettings, rung: PlannedRung
) -> list[str]:
    """The plain command for one rung: decode, fps, scale, the same encoder options."""
    single = replace(plan, rungs=(rung,))
    return encode_args(
        src, info, single, settings, (rung.codec,), with_audio=False, with_thumbs=False
    )


def plain(
    src: str,
    info: SourceInfo,
    plan: EncodePlan,
    settings: HlsSettings,
    codec: VideoCodec,
    out: Path,
) -> Callable[[], None]:
    commands = [per_rung_args(src, info, plan, settings, r) for r in plan.rungs_of((codec,))]
    return sequential(commands, out)


def constant_bitrate(args: list[str], rung: PlannedRung) -> list[str]:
    """The same command with CBR at the rung's maxrate instead of capped CRF."""
    out = list(args)
    index = out.index("-crf:v:0")
    del out[index : index + 2]
    rate = f"{rung.maxrate_kbps}k"
    out[index:index] = ["-b:v:0", rate, "-minrate:v:0", rate]
    if rung.codec == "h264":
        out[index:index] = ["-x264-params:v:0", "nal-hrd=cbr:force-cfr=1"]
    else:
        position = out.index("-x265-params:v:0") + 1
        out[position] += ":strict-cbr=1"
    return out


def cbr(
    src: str,
    info: SourceInfo,
    plan: EncodePlan,
    settings: HlsSettings,
    codec: VideoCodec,
    out: Path,
) -> Callable[[], None]:
    commands = [
        constant_bitrate(per_rung_args(src, info, plan, settings, rung), rung)
        for rung in plan.rungs_of((codec,))
    ]
    return sequential(commands, out)


def rung_bytes(out: Path, rung: PlannedRung) -> int:
    files = [out / rung.init_segment, *sorted(out.glob(f"{rung.name}-0*.m4s"))]
    return sum(path.stat().st_size for path in files)


def join_rung(out: Path, rung: PlannedRung, dest: Path) -> Path:
    with dest.open("wb") as sink:
        for path in [out / rung.init_segment, *sorted(out.glob(f"{rung.name}-0*.m4s"))]:
            sink.write(path.read_bytes())
    return dest


_SSIM = re.compile(r"\[ssim@r(\d+) @ [^]]+\] SSIM .*All:([\d.]+) \(([\d.]+|inf)\)")
_PSNR = re.compile(r"\[psnr@r(\d+) @ [^]]+\] PSNR .*average:([\d.]+|inf)")


def quality(
    source: Path, plan: EncodePlan, rungs: tuple[PlannedRung, ...], out: Path, scratch: Path
) -> list[tuple[float, float, float]]:
    """(SSIM, SSIM dB, PSNR dB) of each rung against the source brought to the rung's size and
    frame rate, both timelines starting at zero. One ffmpeg: a single decode of the source."""
    inputs = ["-i", str(source)]
    rate = plan.frame_rate
    graph = [
        f"[0:v]fps={rate.numerator}/{rate.denominator},format=yuv420p,setpts=PTS-STARTPTS,"
        f"split={len(rungs)}" + "".join(f"[src{i}]" for i in range(len(rungs)))
    ]
    maps = []
    for index, rung in enumerate(rungs):
        inputs += ["-i", str(join_rung(out, rung, scratch / f"{out.name}-{rung.name}.mp4"))]
        graph += [
            f"[src{index}]scale={rung.width}:{rung.height},split[ra{index}][rb{index}]",
            f"[{index + 1}:v]setpts=PTS-STARTPTS,format=yuv420p,split[da{index}][db{index}]",
            f"[da{index}][ra{index}]ssim@r{index}[os{index}]",
            f"[db{index}][rb{index}]psnr@r{index}[op{index}]",
        ]
        maps += ["-map", f"[os{index}]", "-map", f"[op{index}]"]
    args = [FFMPEG, "-hide_banner", "-nostats", *inputs, "-filter_complex", ";".join(graph)]
    result = subprocess.run(
        [*args, *maps, "-f", "null", "-"], check=True, capture_output=True, text=True
    )
    ssim = {int(m[1]): (float(m[2]), float(m[3])) for m in _SSIM.finditer(result.stderr)}
    psnr = {int(m[1]): float(m[2]) for m in _PSNR.finditer(result.stderr)}
    return [(*ssim[i], psnr[i]) for i in range(len(rungs))]


# --- Report ------------------------------------------------------------------------------------


def cost_table(pairs: list[tuple[Cost, Cost]]) -> None:
    print("\n| ladder | ours: 1 process, split | plain: 1 process per rung | CPU ours/plain |")
    print("| --- | --- | --- | --- |")
    for our, their in pairs:
        cells = [
            f"{cost.wall_s:.1f} s wall, {cost.cpu_s:.1f} CPU s, {cost.realtime:.2f}x RT"
            for cost in (our, their)
        ]
        ratio = our.cpu_s / their.cpu_s
        print(f"| {our.name} | {cells[0]} | {cells[1]} | **{ratio:.2f}** |")


def placement_table(shared: Cost, h264: Cost, hevc: Cost) -> None:
    wall, cpu = h264.wall_s + hevc.wall_s, h264.cpu_s + hevc.cpu_s
    print("\n| both ladders | wall s | CPU s | x real time |")
    print("| --- | --- | --- | --- |")
    print(f"| one process | {shared.wall_s:.1f} | {shared.cpu_s:.1f} | {shared.realtime:.2f} |")
    print(f"| two processes | {wall:.1f} | {cpu:.1f} | {shared.media_s / wall:.2f} |")
    print(f"| one / two | {shared.wall_s / wall:.2f} | {shared.cpu_s / cpu:.2f} | |")


def quality_table(rows: list[dict[str, float | str]]) -> None:
    print(
        "\n| rung | CRF / cap | ours kB/min | SSIM (dB) | PSNR | "
        "CBR kB/min | CBR SSIM (dB) | CBR PSNR | bytes ours/CBR |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        ours_kb, cbr_kb = float(row["ours_kB_per_min"]), float(row["cbr_kB_per_min"])
        cells = [
            f"{row['rung']} {row['size']}",
            f"{row['crf']} / {row['maxrate_kbps']}k",
            f"{ours_kb:.0f}",
            f"{float(row['ours_ssim']):.4f} ({float(row['ours_ssim_db']):.1f})",
            f"{float(row['ours_psnr_db']):.1f}",
            f"{cbr_kb:.0f}",
            f"{float(row['cbr_ssim']):.4f} ({float(row['cbr_ssim_db']):.1f})",
            f"{float(row['cbr_psnr_db']):.1f}",
            f"{ours_kb / cbr_kb:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")


def quality_rows(
    lecture: Path, plan: EncodePlan, work: Path, media_s: float
) -> list[dict[str, float | str]]:
    rows: list[dict[str, float | str]] = []
    for codec in ("h264", "hevc"):
        rungs = plan.rungs_of((codec,))
        ours_q = quality(lecture, plan, rungs, work / "ours", work)
        cbr_q = quality(lecture, plan, rungs, work / "cbr", work)
        for rung, our, their in zip(rungs, ours_q, cbr_q, strict=True):
            row: dict[str, float | str] = {
                "rung": rung.name,
                "size": f"{rung.width}x{rung.height}",
                "crf": rung.crf,
                "maxrate_kbps": rung.maxrate_kbps,
            }
            for label, out, (ssim, ssim_db, psnr) in (("ours", "ours", our), ("cbr", "cbr", their)):
                row[f"{label}_kB_per_min"] = rung_bytes(work / out, rung) / media_s * 60 / 1000
                row |= {f"{label}_ssim": ssim, f"{label}_ssim_db": ssim_db}
                row[f"{label}_psnr_db"] = psnr
            rows.append(row)
    return rows


def encode_runs(
    lecture: Path,
    info: SourceInfo,
    plan: EncodePlan,
    settings: HlsSettings,
    work: Path,
    *,
    pipeline: bool,
    rounds: int,
) -> dict[str, Cost]:
    src, media_s = f"file:{lecture}", info.duration_s
    steps: list[tuple[str, int, Callable[[], None]]] = [
        ("ours h264", 1, ours(src, info, plan, settings, ("h264",), work / "ours")),
        ("plain h264", 4, plain(src, info, plan, settings, "h264", work / "plain")),
        ("plain hevc", 4, plain(src, info, plan, settings, "hevc", work / "plain")),
        ("ours hevc", 1, ours(src, info, plan, settings, ("hevc",), work / "ours")),
        ("ours h264+hevc", 1, ours(src, info, plan, settings, ("h264", "hevc"), work / "shared")),
        ("CBR h264", 4, cbr(src, info, plan, settings, "h264", work / "cbr")),
        ("CBR hevc", 4, cbr(src, info, plan, settings, "hevc", work / "cbr")),
    ]
    if pipeline:
        out = work / "pipeline"
        out.mkdir()

        def pipeline_run() -> None:
            run(lecture, out, settings)

        steps.append(("pipeline run()", 2, pipeline_run))
    print("encoding (every run alone, one after the other):", flush=True)
    best: dict[str, Cost] = {}
    for round_ in range(rounds):
        if rounds > 1:
            print(f" round {round_ + 1} of {rounds}", flush=True)
        for name, processes, step in steps:
            cost = measure(name, media_s, processes, step)
            if name in best:  # on a shared machine the least disturbed run is the truest
                cost.wall_s = min(cost.wall_s, best[name].wall_s)
                cost.cpu_s = min(cost.cpu_s, best[name].cpu_s)
            best[name] = cost
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="lecture length, s")
    parser.add_argument("--skip-pipeline", action="store_true", help="no full run() timing")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the encodes; keep each one's minimum"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/transcode_ladder.json")
    options = parser.parse_args()

    load_before = Path("/proc/loadavg").read_text().split()[0]
    work = Path(tempfile.mkdtemp(prefix="kshipra-ladder-"))
    started = time.perf_counter()
    try:
        lecture = work / "lecture.mp4"
        print(f"generating a {options.duration:g} s 720p lecture…", flush=True)
        generate_lecture(lecture, options.duration)
        info = probe(lecture)
        settings = HlsSettings()
        assert settings.hevc is not None
        plan = plan_encode(info, settings)
        costs = encode_runs(
            lecture,
            info,
            plan,
            settings,
            work,
            pipeline=not options.skip_pipeline,
            rounds=options.rounds,
        )
        print("measuring quality…", flush=True)
        rows = quality_rows(lecture, plan, work, info.duration_s)
        total_s = time.perf_counter() - started

        print(
            f"\n{info.duration_s:g} s lecture, 1280x720 at {float(plan.frame_rate):g} fps; "
            f"x264 {settings.h264.preset}, x265 {settings.hevc.preset}; "
            f"{platform.machine()}, {os.cpu_count()} CPUs, load average before "
            f"{load_before}; {options.rounds} round(s); the bench took {total_s:.0f} s"
        )
        cost_table(
            [(costs["ours h264"], costs["plain h264"]), (costs["ours hevc"], costs["plain hevc"])]
        )
        placement_table(costs["ours h264+hevc"], costs["ours h264"], costs["ours hevc"])
        if "pipeline run()" in costs:
            whole = costs["pipeline run()"]
            print(
                f"\nfull pipeline run() (both ladders, audio, sprite, poster, playlists): "
                f"{whole.wall_s:.1f} s wall, {whole.cpu_s:.1f} CPU s, {whole.realtime:.2f}x RT"
            )
        quality_table(rows)
        result = {
            "duration_s": info.duration_s,
            "bench_s": total_s,
            "rounds": options.rounds,
            "load_average_before": load_before,
            "presets": {"h264": settings.h264.preset, "hevc": settings.hevc.preset},
            "runs": [asdict(cost) | {"realtime": cost.realtime} for cost in costs.values()],
            "rungs": rows,
        }
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(result, indent=2))
        print(f"\nresults: {options.out}")
    finally:
        if options.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

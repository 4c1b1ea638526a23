"""One entry point for the worker: run the pipeline a job's typed settings name (see
:func:`assets.processing.pipeline_settings`)."""

from __future__ import annotations

from pathlib import Path
from typing import assert_never

from assets.processing import BundleJob, ImageJob, LectureJob
from transcode.base import Outputs, Progress


def run_pipeline(
    source: Path, out_dir: Path, settings: ImageJob | BundleJob | LectureJob, progress: Progress
) -> Outputs:
    """Blocking: the worker calls this in a thread. Each pipeline's module is imported when
    it first runs: a worker loads what it runs."""
    match settings:
        case ImageJob():
            from transcode import images  # noqa: PLC0415

            return images.run(
                source, out_dir, images.ImageSettings(widths=settings.widths), progress
            )
        case BundleJob():
            from transcode import bundles  # noqa: PLC0415

            return bundles.run_for_job(source, out_dir, settings, progress)
        case LectureJob():
            from transcode import hls  # noqa: PLC0415

            return hls.run_for_job(source, out_dir, settings, progress)
        case _:
            assert_never(settings)

"""One entry point for the worker: pick the pipeline for a kind and build its settings from
the job's JSON settings (see :func:`assets.processing.pipeline_settings`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transcode.base import Outputs, PermanentFault, Progress


def run_pipeline(
    kind: str, source: Path, out_dir: Path, settings: dict[str, Any], progress: Progress
) -> Outputs:
    """Blocking: the worker calls this in a thread."""
    if kind == "image":
        from transcode import images  # noqa: PLC0415 - each worker loads what it runs

        return images.run(
            source, out_dir, images.ImageSettings(widths=tuple(settings["widths"])), progress
        )
    if kind == "bundle":
        from transcode import bundles  # noqa: PLC0415

        return bundles.run_for_job(source, out_dir, settings, progress)
    if kind == "lecture":
        from transcode import hls  # noqa: PLC0415

        return hls.run_for_job(source, out_dir, settings, progress)
    raise PermanentFault(f"no pipeline for kind {kind!r}")

"""What every transcoding pipeline takes and returns.

A pipeline is a plain, blocking function — it runs in a worker's executor, never on an event
loop — that reads one local source file and writes its outputs into an empty local directory:

    def run(source: Path, out_dir: Path, settings: <its settings>, progress: Progress) -> Outputs

It raises :class:`PermanentFault` for input that will never process (corrupt, truncated, not
the right kind of media, too large) and lets other exceptions (disk full, a killed ffmpeg)
propagate as transient faults that the queue retries. Output file names are flat (no
directories) and match ``[A-Za-z0-9._-]+``: they become URLs under
``/content/{kind}s/{id}/v{n}/{name}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTPUT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Progress = Callable[[str, float], None]
"""``progress(stage, fraction)``: stage is a short word ("probe", "encode", "package"…),
fraction in [0, 1] of the whole job."""


class TranscodeError(Exception):
    """Root of the pipelines' errors."""


class PermanentFault(TranscodeError):
    """The input can never be processed; the job fails with this message, never retried."""


@dataclass(frozen=True, slots=True)
class OutputFile:
    name: str
    path: Path
    content_type: str

    def __post_init__(self) -> None:
        if not OUTPUT_NAME_RE.match(self.name):
            raise ValueError(f"output name {self.name!r} is not a flat URL-safe name")


@dataclass(frozen=True, slots=True)
class Outputs:
    files: list[OutputFile]
    primary: str
    """The output a ``latest`` URL serves (master playlist, a default image variant, the
    bundle's identity form)."""
    details: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable facts for the manifest (ladder rungs, image sizes, bundle version…)."""


def no_progress(stage: str, fraction: float) -> None:
    """A :data:`Progress` that ignores reports."""

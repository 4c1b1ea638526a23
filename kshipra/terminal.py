"""All CLI output goes through one :class:`Terminal`: rich when a person watches, plain when
piped, one JSON document with ``--json``."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console


class Terminal:
    def __init__(self, *, json_output: bool = False, quiet: bool = False) -> None:
        self.json_output = json_output
        self.quiet = quiet
        # Piped output is read by scripts and logs: don't squeeze tables into 80 columns.
        self.out = Console(
            highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200
        )
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    @property
    def interactive(self) -> bool:
        """A person is watching: progress bars and colour are welcome."""
        return self.err.is_terminal and not self.json_output and not self.quiet

    def info(self, message: str) -> None:
        if not self.quiet and not self.json_output:
            self.err.print(message)

    def progress_line(self, message: str) -> None:
        """One plain progress line on stderr, for a log or a pipe (no bar, no markup, no
        colour), also with ``--json``: stdout keeps its one document."""
        if not self.quiet:
            self.err.print(message, markup=False, highlight=False, emoji=False)

    def error(self, message: str) -> None:
        self.err.print(f"[bold red]error:[/] {message}", markup=True)

    def emit_json(self, document: Any) -> None:
        sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
        sys.stdout.flush()

    def result(self, message: str) -> None:
        """Human-readable final output on stdout."""
        self.out.print(message)

"""No class over 400 lines and no function over 80 in the packages, except where a reason is
written below (issue 12). Run by ./scripts/test; exits 1 naming each new offender, and each
listed exception that no longer needs to be one (so the list only shrinks)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("kshipra", "cdn_config", "common", "assets", "origin", "edge", "transcode")
MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 80

EXCEPTIONS = {
    "edge/flow.py:Edge": "the request flow's IO loop (fetch, store, slices, deliver): the "
    "stages (edge/stages.py) and the transports (edge/app.py, edge/h2.py) are out; fill and "
    "deliver are the next cut",
    "edge/tiers/disk.py:DiskTier": "one tier's index, files and cross-process sync; its "
    "write path is rewritten by issue 19",
    "assets/blobstore/local.py:LocalDirBlobStore": "the BlobStore protocol over a directory: "
    "one method per protocol operation, each small",
    "assets/blobstore/s3.py:S3BlobStore": "the BlobStore protocol over boto3: one method per "
    "protocol operation, each small",
    "origin/ingest.py:Ingest": "uploads: single, resumable sessions and their parts",
    "origin/ingest.py:Ingest._publish_locked": "one upload's publish under its lock, in order",
    "origin/ingest.py:Ingest.create_session": "one branch per session field a client sends",
    "kshipra/dev.py:dev_command": "the dev stack's wiring, top to bottom",
    "kshipra/origin_cli.py:upload_command": "click command: every option, then one upload",
}


def offenders(root: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            _visit(tree, path.relative_to(root).as_posix(), "", found)
    return found


def _visit(node: ast.AST, file: str, prefix: str, found: dict[str, int]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{prefix}{child.name}"
            lines = (child.end_lineno or child.lineno) - child.lineno + 1
            limit = MAX_CLASS_LINES if isinstance(child, ast.ClassDef) else MAX_FUNCTION_LINES
            if lines > limit:
                found[f"{file}:{name}"] = lines
            _visit(child, file, f"{name}.", found)


def main() -> int:
    found = offenders(Path(__file__).resolve().parent.parent)
    problems = [
        f"{where} is {lines} lines (limit {MAX_CLASS_LINES} a class, {MAX_FUNCTION_LINES} a "
        "function): split it, or add it to EXCEPTIONS in scripts/check_sizes.py with a reason"
        for where, lines in found.items()
        if where not in EXCEPTIONS
    ]
    problems += [
        f"{where} is within the limits now: remove it from EXCEPTIONS"
        for where in EXCEPTIONS
        if where not in found
    ]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

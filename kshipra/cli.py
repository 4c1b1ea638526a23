"""The ``kshipra`` command."""

from __future__ import annotations

import click

from kshipra.dev import dev_command
from kshipra.edge_cli import edge_command
from kshipra.origin_cli import jobs_command, origin_command, status_command, upload_command
from kshipra.purge_cli import purge_command, warm_command
from kshipra.worker_cli import worker_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kshipra")
def main() -> None:
    """Kshipra: a CDN and adaptive media server for students on slow, costly networks."""


main.add_command(dev_command)
main.add_command(origin_command)
main.add_command(edge_command)
main.add_command(worker_command)
main.add_command(upload_command)
main.add_command(jobs_command)
main.add_command(status_command)
main.add_command(purge_command)
main.add_command(warm_command)

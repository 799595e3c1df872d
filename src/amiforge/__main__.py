"""`python -m amiforge` is the `amiforge` command."""

from amiforge.cli.app import run

run()

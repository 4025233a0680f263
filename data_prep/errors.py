"""The one exception that data_prep raises for bad inputs."""

from __future__ import annotations


class PrepError(ValueError):
    """An input file, pairing or option is wrong; the message names the file, key or value."""

"""The package version, written into every adapter file."""

__version__ = "0.1.0"

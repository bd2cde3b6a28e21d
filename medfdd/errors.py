"""Typed errors. Every message says what (file/key), the problem (value vs constraint) and the fix."""

from __future__ import annotations


class MedfddError(Exception):
    """Base class of every error medfdd raises on purpose; the CLI prints it without a traceback."""

    def __init__(self, where: str, problem: str, fix: str):
        self.where, self.problem, self.fix = where, problem, fix
        super().__init__(f"{where}: {problem}. Fix: {fix}")


class ConfigError(MedfddError):
    """A site or coordinator config is invalid (unknown key, wrong type, value out of range)."""


class ManifestError(MedfddError):
    """labels.csv cannot be used at all (missing file or column, bad encoding); row problems are quarantined."""


class NoUsableDataError(MedfddError):
    """Every manifest row was quarantined: nothing is left to distill."""


class SourceUnavailableError(MedfddError):
    """A `medfdd prepare` source (dataset) is not installed on this machine."""


class ExportError(MedfddError):
    """A folder-per-class export cannot become a manifest (`medfdd site init`): a folder that is no agreed class, an
    agreed class without scans, a file of unknown format."""


class OutputExistsError(MedfddError):
    """A file a command would write already exists and is kept (rerun with `--force` to replace it)."""

"""One error hierarchy for pgtraj, in the h3-py mould: every error is a ``PgtrajError`` and also the
built-in it behaves like, so callers can catch either. Each carries a ``hint`` saying what to do next."""

from __future__ import annotations


class PgtrajError(Exception):
    """Base class of every pgtraj error."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\nHINT: {self.hint}" if self.hint else self.message


class PgtrajConnectionError(PgtrajError, ConnectionError):
    """The database cannot be reached, or refused the credentials."""


class LocalDatabaseError(PgtrajError, RuntimeError):
    """The local database (``pgtraj db``) cannot be created, started or stopped."""


class PortInUseError(LocalDatabaseError):
    """The port asked for is taken by another program."""


class DataDirectoryError(LocalDatabaseError, PermissionError):
    """The data directory cannot be created, written, or reached by the server's user."""


class DatabaseSetupError(PgtrajError, RuntimeError):
    """The database side is not ready for pgtraj: an extension, a privilege or PL/Python is missing."""


class MissingExtensionError(DatabaseSetupError):
    """A PostgreSQL extension pgtraj needs is not installed on the server, or is too old."""


class NotSuperuserError(DatabaseSetupError, PermissionError):
    """Installing pgtraj needs a superuser (it creates PL/Python functions)."""


class RuntimeImportError(DatabaseSetupError, ImportError):
    """PL/Python inside the server cannot import numpy, onnxruntime, h3 or pgtraj.runtime."""


class MigrationError(PgtrajError, RuntimeError):
    """The recorded schema history does not match the migrations shipped with this version."""


class RegistryError(PgtrajError, LookupError):
    """A model or deployment asked for does not exist, or a registration is invalid."""


class TrajectoryError(PgtrajError, ValueError):
    """A trajectory that cannot be used as it is: no time coordinate, NaN, out-of-range coordinates, ..."""

    def __init__(self, message: str, *, traj_id=None, reason: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.traj_id = traj_id
        self.reason = reason or message  # short, countable: what a read report groups rejections by


class SourceError(PgtrajError, ValueError):
    """A trajectory source (table, columns, query) that cannot be read as described."""


class ConfigError(PgtrajError, ValueError):
    """A configuration (model, training, tokenizer) with unknown keys or impossible values."""


def config_from_dict(cls, d: dict, what: str):
    """``cls(**d)`` for a config dataclass, refusing unknown keys: a typo must not fall back to a default."""
    from dataclasses import fields

    known = sorted(f.name for f in fields(cls))
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"unknown {what} config keys: {unknown}", hint=f"known: {known}")
    return cls(**d)

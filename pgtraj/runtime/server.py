"""What the runtime asks of the PostgreSQL backend it runs in, without running a query (a parallel worker
may not): the data directory, whether this backend is in parallel mode or a hot standby, whether a cancel
or a termination is pending; and how pgtraj's errors become SQL errors.

The server's own variables and functions are read through ctypes: they are exported by the postgres
executable (extensions link against them), and reading a flag or calling a function that only returns a
value cannot unwind the stack under Python's feet.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

from pgtraj.core.errors import PgtrajError


@functools.cache
def _server() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def data_directory() -> str:
    """The data directory of this server (a standby's own, not the primary's)."""
    return ctypes.c_char_p.in_dll(_server(), "DataDir").value.decode()


def in_parallel_mode() -> bool:
    """Whether this backend is inside a parallel operation (a worker, or the leader under Gather)."""
    fn = _server().IsInParallelMode
    fn.restype = ctypes.c_bool
    return bool(fn())


def interrupt_pending() -> bool:
    """A cancel (pg_cancel_backend, statement_timeout) or termination is waiting to be served."""
    lib = _server()
    return bool(ctypes.c_int.in_dll(lib, "QueryCancelPending").value or ctypes.c_int.in_dll(lib, "ProcDiePending").value)


def check_interrupts(plpy) -> None:
    """Serve a pending cancel or termination now, from a long Python loop that would otherwise only see it
    when it next runs a query: outside parallel mode by running one (PostgreSQL raises its own error, with
    its own SQLSTATE), inside it by raising 57014."""
    if plpy is None or not interrupt_pending():
        return
    if in_parallel_mode():
        raise InferenceError("canceling statement: a cancel or termination is pending", sqlstate="57014")
    plpy.execute("SELECT 1")


@contextlib.contextmanager
def advisory_lock(plpy, kind: str, key: str, busy: BaseException):
    """Hold a session-level advisory lock on (kind, key) for the block, across the commits inside it, or
    raise ``busy`` at once when another session holds it."""
    lock = plpy.prepare("SELECT pg_catalog.pg_try_advisory_lock(pg_catalog.hashtext($1), pg_catalog.hashtext($2))"
                        " AS ok", ["text", "text"])
    if not plpy.execute(lock, [kind, key])[0]["ok"]:
        raise busy
    try:
        yield
    finally:
        plpy.execute(plpy.prepare("SELECT pg_catalog.pg_advisory_unlock(pg_catalog.hashtext($1),"
                                  " pg_catalog.hashtext($2))", ["text", "text"]), [kind, key])


class InferenceError(PgtrajError):
    """A call that cannot be served; ``sqlstate`` is what it is reported as in SQL."""

    def __init__(self, message: str, *, sqlstate: str, hint: str | None = None, detail: str | None = None):
        super().__init__(message, hint=hint)
        self.sqlstate, self.detail = sqlstate, detail


@functools.cache
def _sql_error_class(plpy):
    # PL/Python prints an uncaught exception as "<class name>: <str(exc)>", without the module for
    # builtins, and takes SQLSTATE, detail and hint from these attributes of a plpy.Error
    return type("pgtraj", (plpy.Error,), {"__module__": "builtins"})


def sql_error(plpy, exc: BaseException) -> BaseException:
    """The exception a PL/Python body raises for ``exc`` (a pgtraj error, or an SQL error from a query the
    runtime ran): reported as ``pgtraj: <message>`` with its SQLSTATE (22023 for bad input when none is
    given), detail and hint, and no ``plpy.Error:``/``spiexceptions`` prefix."""
    if isinstance(exc, PgtrajError):
        message, sqlstate = exc.message, getattr(exc, "sqlstate", "22023")
        detail, hint = getattr(exc, "detail", None), exc.hint
    else:  # plpy.SPIError or plpy.Error: a query failed, or the server raised during plpy.notice
        message = str(exc.args[0]) if exc.args else str(exc)
        sqlstate = getattr(exc, "sqlstate", None) or "XX000"
        detail, hint = getattr(exc, "detail", None), getattr(exc, "hint", None)
    out = _sql_error_class(plpy)(message.removeprefix("pgtraj: "))
    out.sqlstate = sqlstate
    out.detail, out.hint = detail, hint
    return out


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE an exception carries, whichever layer raised it."""
    return getattr(exc, "sqlstate", None)

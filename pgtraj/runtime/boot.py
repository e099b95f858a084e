"""The code every PL/Python function of pgtraj starts with, and the handler its body runs under. `pgtraj
install` writes it into each function (the ``@BOOT@`` line of sql/*.sql) with the runtime environment's
path; the install probe uses path_setup the same way.

Nothing here is imported inside the server: these functions produce the Python text that runs there.
"""

from __future__ import annotations


def path_setup(python_path: str | None) -> str:
    """Python that puts the runtime environment first on sys.path, ahead of any older numpy in the
    system's site-packages (shared by the install probe and every PL/Python function)."""
    return f"""import site, sys
_path = {python_path!r}
if _path and _path not in sys.path:
    _before = list(sys.path)
    site.addsitedir(_path)
    sys.path[:] = [p for p in sys.path if p not in _before] + _before"""


def boot_snippet(python_path: str | None) -> str:
    """What every PL/Python function of pgtraj runs first: load the runtime into this backend once and bind
    it to the local name ``pgtraj``. The path is written into the function body at install time rather
    than read from a table, because a parallel worker may not run queries from PL/Python (SPI opens a
    subtransaction, which parallel mode forbids) and a setting could be changed by any role."""
    body = "\n".join("    " + line for line in (path_setup(python_path) + """
try:
    import pgtraj.runtime.api
except ImportError as exc:
    plpy.error("pgtraj: PL/Python cannot import the pgtraj runtime: %s" % exc,
               detail="python_path = %r, sys.executable = %r" % (_path, sys.executable),
               hint="re-run `pgtraj install` (it checks and records the runtime environment)",
               sqlstate="58P01")
GD['pgtraj'] = pgtraj.runtime.api""").splitlines())
    return "if 'pgtraj' not in GD:\n" + body + "\npgtraj = GD['pgtraj']"


def plpython_body(python_path: str | None, body: str) -> str:
    """A PL/Python function body as installed: the boot snippet, then the body under a handler that turns
    pgtraj's errors (and SQL errors from queries it ran) into SQL errors with their SQLSTATE, message and
    hint, raised from the body itself so that no traceback of the runtime's frames reaches CONTEXT."""
    indented = "\n".join("    " + line if line.strip() else line for line in body.rstrip().splitlines())
    return (f"{boot_snippet(python_path)}\ntry:\n{indented}\n"
            "except pgtraj.REPORTED as _exc:\n"
            "    raise pgtraj.sql_error(plpy, _exc).with_traceback(None) from None\n")

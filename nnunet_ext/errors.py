"""The one exception type the CLI turns into a single ``nnunet-ext: error: ...`` line, and what feeds it.

Besides ``UserError`` (bad input, with its fix), operating-system errors while writing (a read-only folder, a
full disk, a path below a regular file) become one line too (``os_error_message``; ``replace_text`` writes a file
whole and names it in such an error), and SIGTERM, which cluster
schedulers send at a time limit, is raised as ``Terminated`` so that every ``except BaseException`` cleanup
(the atomic dataset writer's among them) runs as for any other exception.
"""

import errno
import os
import secrets
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


class UserError(Exception):
    """Bad input or missing setup. The message says what is wrong and how to fix it, in one line."""


class Terminated(SystemExit):
    """SIGTERM arrived; a SystemExit (exit status 128 + 15) so that code which catches Exception lets it pass."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


# errno -> how to fix it; anything else gets the generic advice.
_OS_FIXES = {
    errno.EACCES: "no permission to write there: choose a folder you can write to",
    errno.EPERM: "no permission to write there: choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose a folder on a writable disk",
    errno.ENOSPC: "the disk is full: free space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is exceeded: free space or choose a folder on another disk",
    errno.ENOTDIR: "a part of the path is a regular file, not a folder: choose another folder",
    errno.EISDIR: "a folder is in the way of a file: move it or choose another folder",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter folder",
}


def os_error_message(error: OSError) -> str:
    """One line for an OSError: the path, what the system said and how to fix it (for the CLI's error line)."""
    where = error.filename if error.filename is not None else "a file"
    what = error.strerror or " ".join(str(error).split()) or type(error).__name__
    fix = _OS_FIXES.get(error.errno, "check the path and the disk, then run the command again")
    return f"{where}: {what}; {fix}"


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to a new file beside ``path`` and move it over ``path`` (atomic on one file system): readers
    see the old file or the new one, never a part. On any failure the new file is removed; an OSError names
    ``path``, so ``os_error_message`` reports the file the user asked for."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")  # one per writer
    try:
        partial.write_text(text, newline="")
        os.replace(partial, path)
    except BaseException as error:
        with suppress(OSError):  # it may never have been created (e.g. the folder is not there)
            partial.unlink()
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


_outer_handlers = []  # the SIGTERM handler in place before each active sigterm_raises, outermost first


def _default_sigterm_in_child() -> None:
    # A forked child (a multiprocessing pool worker) must die on SIGTERM as before: Pool.terminate() relies on
    # it, and a Python-level handler only runs between bytecodes, so a worker blocked on a lock would hang.
    if _outer_handlers and signal.getsignal(signal.SIGTERM) is _raise_terminated:
        signal.signal(signal.SIGTERM, _outer_handlers[0])
    _outer_handlers.clear()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_default_sigterm_in_child)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises ``Terminated`` in the main thread (signal handlers can only be set there).

    Without it SIGTERM ends Python at once, skipping every cleanup: half-written folders would stay behind.
    The previous handler is restored on exit, and forked children get it back at once; outside the main thread
    this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    _outer_handlers.append(signal.SIG_DFL if previous is None else previous)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, _outer_handlers.pop())

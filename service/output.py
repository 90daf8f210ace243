"""Output files of the ``tritarget`` commands (load-test reports, anchor reports and
pictures): checked before the work that fills them, written whole or not at all.

A file written in place is left truncated by Ctrl-C or a full disk. ``write_atomically``
writes a temporary file in the target's folder and renames it over the target
(``os.replace`` is atomic within a file system), so the target is the old file or the
new one, never part of one. A symbolic link is followed (the file it names is replaced,
keeping its mode), and a device, a pipe or a descriptor (``/dev/null``, ``/dev/stdout``)
is written directly (``written_in_place``): renaming over it would replace the device,
or the file the shell opened for the process.

Stdout and stderr whose reader stops reading (``| head -1``): ``reader_gone`` and
``stdout_flushed`` end a command as a shell's pipe writer (status 141, no message),
``WhileRead`` keeps a progress line from ending the work, and ``ClosedPipe`` tells
another pipe's reader gone (a file not written) from stdout's. Stdout that cannot be
written (a full disk, an I/O error) ends a command with one line naming it, status 1
(``exit_status``), where a traceback did.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable

__all__ = [
    "ClosedPipe",
    "output_file_problem",
    "output_folder_problem",
    "WhileRead",
    "reader_gone",
    "exit_status",
    "stdout_flushed",
    "while_read",
    "write_atomically",
    "written_in_place",
]


def _existing_folder_problem(folder: str) -> str | None:
    """Why files cannot be created under ``folder`` (made with its missing parents), or None."""
    while folder and not os.path.exists(folder):  # the folders write_atomically will create
        folder = os.path.dirname(folder)
    folder = folder or "."
    if not os.path.isdir(folder):
        return f"{folder} is not a folder"
    # A file made and removed: os.access says yes to root everywhere, /proc included.
    probe = os.path.join(folder, f".tritarget-probe-{secrets.token_hex(6)}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        return f"cannot write in {folder} ({exc.strerror})"
    return None


def written_in_place(path: str) -> bool:
    """Whether ``path`` is written directly, not replaced: a device or pipe (``/dev/null``),
    or a descriptor of this process (``/dev/stdout``, ``/dev/fd/N``: replacing the file the
    shell opened, for appending perhaps, would drop what it held)."""
    return os.path.exists(path) and (not os.path.isfile(path) or _descriptor_link(path) is not None)


def _descriptor_link(path: str) -> str | None:
    """The first path on ``path``'s way of links that lies under /proc or /dev/fd, or None."""
    for _ in range(40):  # the kernel's own bound on links followed
        path = os.path.abspath(path)
        if path.startswith(("/proc/", "/dev/fd/")):
            return path
        if not os.path.islink(path):
            return None
        path = os.path.join(os.path.dirname(path), os.readlink(path))
    return None


_DESCRIPTOR = re.compile(r"^/(?:proc/(self|thread-self|\d+)|dev)/fd/(\d+)$")


def _descriptor(path: str) -> int | None:
    """The descriptor of this process that ``path`` names through its links (``/dev/stdout``
    is 1), or None."""
    link = _descriptor_link(path)
    match = None if link is None else _DESCRIPTOR.match(link)
    if match is None or match.group(1) not in (None, "self", "thread-self", str(os.getpid())):
        return None
    return int(match.group(2))


def _followed(path: str) -> str:
    """The file a symbolic link names (renamed over, the link would become a file)."""
    return os.path.realpath(path) if os.path.islink(path) else path


def output_file_problem(path: str) -> str | None:
    """Why ``write_atomically`` cannot write a file at ``path``, in words, or None."""
    if not path:  # the folder of '' is '', which the check below takes for the working one
        return "is empty; give a file name"
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        return "is a folder; give a file name"
    if written_in_place(path):
        return None if os.access(path, os.W_OK) else "cannot be written"
    return _existing_folder_problem(os.path.dirname(_followed(path)))


class ClosedPipe(OSError):
    """A pipe, other than stdout, whose reader stopped reading while a file was written
    into it (``--json >(true)``): that file not written, an error like a full disk.
    Stdout's reader gone stays a ``BrokenPipeError``, which ends a command quietly
    (``reader_gone``)."""


def _append(source: str, path: str) -> None:
    """``source``'s bytes after what ``path`` holds. A descriptor of this process is written
    through itself, after Python's own buffers: opened anew, /dev/stdout would truncate a
    `>>` log, or start at 0 behind a `>` redirect where the table printed before is still
    to come, and a socket cannot be opened at all. A pipe other than stdout whose reader
    has gone raises ``ClosedPipe``."""
    descriptor = _descriptor(path)
    if descriptor is not None:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    try:
        if descriptor is None:
            with open(source, "rb") as data, open(path, "ab") as sink:
                shutil.copyfileobj(data, sink)
        else:
            with open(source, "rb") as data, open(descriptor, "wb", closefd=False) as sink:  # at the shell's offset
                shutil.copyfileobj(data, sink)
    except BrokenPipeError as exc:
        if descriptor == 1:  # stdout
            raise
        raise ClosedPipe(exc.errno, exc.strerror, path) from None


def output_folder_problem(path: str) -> str | None:
    """Why files cannot be written into the folder ``path`` (created if missing), or None."""
    if not path:  # os.path.join('', name) is name: the working folder, unasked
        return "is empty; give a folder (. for the working one)"
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a folder"
    return _existing_folder_problem(path)


def write_atomically(path: str | os.PathLike, write: Callable[[str], object]) -> str:
    """Call ``write(temporary_path)``, then move that file to ``path``; returns ``path``.

    The temporary file sits in the target's folder (created if missing) and ends with the
    target's extension, so writers that pick a format from the name (matplotlib) see it.
    It is removed when ``write`` raises, and the target is left as it was. A target
    ``written_in_place`` gets the whole file appended once ``write`` is done.
    """
    path = os.fspath(path)
    if written_in_place(path):
        with tempfile.TemporaryDirectory() as folder:
            temporary = os.path.join(folder, os.path.basename(path))
            write(temporary)
            _append(temporary, path)
        return path
    target = _followed(path)
    folder = os.path.dirname(target) or "."
    os.makedirs(folder, exist_ok=True)
    stem, extension = os.path.splitext(os.path.basename(target))
    temporary = os.path.join(folder, f".{stem}.{secrets.token_hex(6)}.tmp{extension}")
    # Created here with mode 0o666 (less the umask), as open() would create the target.
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(temporary)
        if os.path.exists(target):  # after writing: the old mode may not let this process write
            os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(temporary, target)
    except BaseException:  # Ctrl-C too: never leave the temporary file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def stdout_flushed() -> bool:
    """Whether stdout, flushed here rather than at exit, reached its reader (or there is no
    stdout: ``>&-``). At exit, a reader gone (``| head -1``) made Python print "Exception
    ignored ... BrokenPipeError" and end with status 120; here stdout then leads to the
    null device (``_to_null``) and the caller picks the status. Another error (a full
    disk) is raised."""
    if sys.stdout is None:
        return True
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _to_null(sys.stdout)
        return False
    return True


def exit_status(command: str, run: Callable[[], int]) -> int:
    """``run()``'s exit status (a command's), with stdout's troubles ended as a shell's tools
    end them: its reader gone (``| head -1``), quietly with 128 + SIGPIPE where the command
    had succeeded; stdout that cannot be written (a full disk, ``> /dev/full``) or another
    OSError no handler took, with one line on stderr and status 1, where a traceback was
    printed (or, at exit, "Exception ignored" and status 120). argparse's exits (--help, a
    usage error) keep their status, except a --help whose stdout fails (1; 141 with its
    reader gone)."""
    try:
        status = run()
    except BrokenPipeError:
        return reader_gone()
    except SystemExit as done:
        failed = _stdout_failure(command)
        if failed is None or done.code:
            raise
        return failed
    except OSError as exc:
        if _stdout_failure(command) != 1:  # not stdout's, as far as a flush tells: named as it is
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"{command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    failed = _stdout_failure(command)
    return status if failed is None else status or failed


def _stdout_failure(command: str) -> int | None:
    """Flushes stdout: None where that worked, 141 where its reader has gone, 1 where it
    cannot be written (named on stderr). In both failures it then leads to the null
    device, whose flush at exit cannot fail again."""
    try:
        return None if stdout_flushed() else 141
    except OSError as exc:
        _to_null(sys.stdout)
        print(f"{command}: cannot write standard output: {exc.strerror or exc}", file=sys.stderr)
        return 1


def while_read(announce: Callable[..., object]) -> Callable[..., None]:
    """``announce`` (print, for a server's status lines), silent once its reader has gone
    (``serve | head -2``) or stdout cannot be written (a full disk: said once, on stderr):
    the status lines are for whoever reads them, and a server stopped by them (before its
    drain, or left running while the interpreter exits, which aborts) serves nobody better.
    Stdout is pointed at the null device, so that the exit's flush does not fail again."""

    def say(*args, **kwargs) -> None:
        try:
            announce(*args, **kwargs)
        except BrokenPipeError:
            reader_gone()
        except OSError as exc:
            _to_null(sys.stdout)
            with contextlib.suppress(OSError):  # stderr on the same full disk
                print(f"status lines stopped: cannot write standard output: {exc.strerror or exc}", file=sys.stderr)

    return say


def reader_gone() -> int:
    """After a ``BrokenPipeError`` on stdout, whose reader stopped reading (``tritarget demo
    | head -1``): points stdout at the null device (``_to_null``) and returns the exit
    status a shell reports for a command its pipe stopped, 128 + SIGPIPE."""
    _to_null(sys.stdout)
    return 141


def _to_null(stream) -> None:
    """Points ``stream``'s descriptor at the null device, its reader gone: Python flushes
    the stream once more at exit, into the same closed pipe (a second error, printed)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


class WhileRead:
    """``stream`` (stderr) for a progress line, silent once its reader has gone (``2>&1 |
    head -1``), or where there is none (``2>&-``: Python's ``sys.stderr`` is None): the
    work goes on, and the files it was asked for are written."""

    def __init__(self, stream) -> None:
        self._stream = open(os.devnull, "w") if stream is None else stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            _to_null(self._stream)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            _to_null(self._stream)

    def __getattr__(self, name: str):  # the rest as the stream's (tqdm reads its encoding and width)
        return getattr(self._stream, name)

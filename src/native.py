"""Small C kernels, compiled on first use with the system's compiler into $TRIADIC_CACHE and checked before use.

Two use it: the panel products (src/panels.py) and the int8 codec's Rice code (src/link/rice.c). Each
says what its library must do (`prepare`: symbols and a check of its results), and each has a path in
torch or numpy for machines where the compiler or the library is missing: a kernel here is a faster
way to the same bits, never the only way.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Sequence

from .checkpoint import cache_dir

COMPILE_SECONDS = 60.0  # a compiler that hangs is killed, with what it started, and the caller keeps its own path


def compiled(source: Path, flag_sets: Sequence[Sequence[str]], prepare: Callable[[ctypes.CDLL], None], label: str,
             log: logging.Logger) -> ctypes.CDLL:
    """`source`'s shared library: from the cache where its recorded sha256 still matches, else built and checked.

    `flag_sets` are tried in turn (e.g. with OpenMP, then without); `prepare` declares the library's
    symbols and raises where it lacks one or computes wrongly. A library enters the cache only after
    `prepare` passed, with its sha256 beside it, so a file that was truncated or replaced (dlopen of a
    truncated file dies of SIGBUS) or one that computes wrongly is never loaded; such a file is built
    again. What is loaded is a private copy of the bytes that were checked: the process's mapping must
    not change if the cached file does later."""
    digest = hashlib.sha256(source.read_bytes() + " ".join(flag_sets[0]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{source.stem}-{digest}.so"
    seal = target.with_name(target.name + ".sha256")
    try:
        data = target.read_bytes()
        if hashlib.sha256(data).hexdigest() == seal.read_text().strip():
            return _loaded(data, target.parent, prepare)
    except OSError:  # not built yet, or unreadable: build it
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:  # built and checked aside, then moved in whole
        built = Path(scratch) / target.name
        _compile(source, built, flag_sets, label, log)
        data = built.read_bytes()
        library = _loaded(data, Path(scratch), prepare)
        (Path(scratch) / seal.name).write_text(hashlib.sha256(data).hexdigest() + "\n")
        os.replace(built, target)  # other processes now find it
        os.replace(Path(scratch) / seal.name, seal)
    return library


def _compile(source: Path, output: Path, flag_sets: Sequence[Sequence[str]], label: str, log: logging.Logger) -> None:
    """`$CC` (default cc; it may carry its own arguments) over `source`, within COMPILE_SECONDS each try, with each
    flag set in turn until one builds."""
    command = shlex.split(os.environ.get("CC") or "cc")
    compiler = shutil.which(command[0]) if command else None
    if compiler is None:
        raise RuntimeError(f"no C compiler: {command[0] if command else 'cc'!r} is not on PATH")
    for number, flags in enumerate(flag_sets):
        process = subprocess.Popen([compiler, *command[1:], *flags, "-o", str(output), str(source)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, errors = process.communicate(timeout=COMPILE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the compiler and whatever it started
            process.wait()
            raise RuntimeError(f"{compiler} ran past {COMPILE_SECONDS:g} s") from None
        last = (errors.strip().splitlines() or ["no message"])[-1]
        if process.returncode == 0:
            return
        if number + 1 < len(flag_sets):
            dropped = " ".join(flag for flag in flags if flag not in flag_sets[number + 1])
            log.warning("the %s does not build with %s (%s): building it without", label, dropped, last)
    raise RuntimeError(f"{compiler} exited with {process.returncode}: {last}")


def _loaded(data: bytes, folder: Path, prepare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL:
    """Load these bytes from a file of their own in `folder`, removed at once (the mapping keeps it), and prepare it."""
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".so") as copy:
        copy.write(data)
        copy.flush()
        library = ctypes.CDLL(copy.name)
    prepare(library)
    return library


class OptionalLibrary:
    """A kernel built on first use, once however many threads ask at once (a server's first sessions come in a burst),
    or None where it cannot be: the reason is logged once, and the caller's own path serves."""

    def __init__(self, source: Path, flags: Sequence[str], prepare: Callable[[ctypes.CDLL], None], label: str,
                 instead: str, log: logging.Logger) -> None:
        self.source, self.flags, self.prepare, self.label, self.instead, self.log = source, flags, prepare, label, instead, log
        self.library: ctypes.CDLL | None = None
        self.problem: str | None = None  # why it could not be built, once tried
        self._lock = threading.Lock()

    def get(self) -> ctypes.CDLL | None:
        if self.library is None and self.problem is None:
            with self._lock:
                if self.library is None and self.problem is None:
                    try:
                        self.library = compiled(self.source, (self.flags,), self.prepare, self.label, self.log)
                    except Exception as error:  # noqa: BLE001 (whatever fails, the caller's path serves and the reason is said)
                        self.problem = f"the {self.label} could not be built: {error}".splitlines()[0]
                        self.log.info("%s; %s", self.problem, self.instead)
        return self.library

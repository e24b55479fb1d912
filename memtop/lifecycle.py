"""Bounded shutdown: every exit path detaches the probes first, and the process is gone soon after.

A tracer that outlives its user keeps slowing every kmalloc on the host. The UI library's own shutdown
can hang (a terminal that went away mid-write leaves its writer thread's queue full, and closing the
driver waits on it forever), so memtop never relies on it to detach:

1. `begin()`, called by `q`, Ctrl+C, SIGTERM, SIGINT, SIGHUP, or an exception escaping any thread,
   starts detaching every probe at once (idempotent, thread-safe) while the UI shuts down beside it, and
   the process leaves (`force_exit`) only once the detaching is done;
2. from then on the next SIGTERM/SIGINT/SIGHUP ends the process at once (it is handled by a plain signal
   handler, which runs even while the main thread waits on a lock), and a watchdog thread ends it after
   `grace_s` whatever the main thread is doing. Both restore the terminal as well as they can first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Leave the alternate screen, stop mouse reporting, show the cursor: what a TUI's own exit would do.
TERMINAL_RESET = b"\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?1015l\x1b[?2004l\x1b[?1049l\x1b[?25h"


def exit_code_for(signum: int) -> int:
    return 128 + signum


class ExitGuard:
    """Detach-first, bounded exit for one memtop process (see the module docstring).

    `detach` is the callable that detaches every probe (LiveSource.close); it is run at most once, from
    whichever thread gets there first. `grace_s` bounds how long the process may live after `begin()`.
    """

    def __init__(self, detach: Callable[[], None], grace_s: float = 3.0) -> None:
        self._detach = detach
        self.grace_s = grace_s
        self.code: int | None = None
        self._begin_lock = threading.Lock()  # taken once, by the first begin(); never released
        self._detach_lock = threading.Lock()  # likewise, by the first detach()
        self._deadline = 0.0  # monotonic time by which the process is gone, once the exit began
        self._detached = threading.Event()
        self._began = threading.Event()
        self._tty_attrs: Any = None
        self._tty_fd: int | None = None
        self._previous_excepthook = threading.excepthook
        self._previous_signals: dict[int, Any] = {}
        # Asked (from a daemon thread, after detaching) to wind the rest down: the UI's exit.
        self.request_stop: Callable[[], None] | None = None

    # -- wiring ---------------------------------------------------------------------------------------

    def save_terminal(self) -> None:
        """Remember the terminal's modes now (before the UI changes them), to restore on a forced exit."""
        try:
            import termios

            fd = sys.__stdin__.fileno() if sys.__stdin__ is not None else -1
            if fd >= 0 and os.isatty(fd):
                self._tty_attrs = termios.tcgetattr(fd)
                self._tty_fd = fd
        except (OSError, ValueError, ImportError, AttributeError):
            self._tty_attrs = None

    def install_thread_hook(self) -> None:
        """An exception escaping any thread begins the exit (after the usual report)."""

        def hook(args: threading.ExceptHookArgs) -> None:
            self._previous_excepthook(args)
            if args.exc_type is not SystemExit:
                self.begin(1)

        threading.excepthook = hook

    def install_signals(self) -> None:
        """SIGTERM, SIGINT and SIGHUP begin the exit. Plain handlers, not the event loop's: they run even
        while the main thread is stuck waiting on a lock (a UI blocked writing to a dead terminal)."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            self.begin(exit_code_for(signum))

        for sig in EXIT_SIGNALS:
            with contextlib.suppress(ValueError, OSError):
                self._previous_signals[sig] = signal.signal(sig, handler)

    def uninstall(self) -> None:
        threading.excepthook = self._previous_excepthook
        for sig, previous in self._previous_signals.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, previous)
        self._previous_signals.clear()

    # -- the exit -------------------------------------------------------------------------------------

    @property
    def began(self) -> bool:
        return self._began.is_set()

    def begin(self, code: int = 0) -> None:
        """Start exiting with `code`: detach now (from a thread of its own, so the UI's shutdown runs
        beside it; `force_exit` waits for it), arm the watchdog and the hard second signal."""
        # Never block here: a signal handler on the main thread may call this while the main thread is
        # itself inside it. The first caller to take the lock begins; the others return.
        if not self._begin_lock.acquire(blocking=False):
            return
        if self._began.is_set():
            return
        self.code = code
        self._deadline = time.monotonic() + self.grace_s
        self._began.set()
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_SIGNALS:
                with contextlib.suppress(ValueError, OSError):
                    signal.signal(sig, self._on_second_signal)
        threading.Thread(target=self._watchdog, name="memtop-exit-watchdog", daemon=True).start()
        threading.Thread(target=self.detach, name="memtop-detach", daemon=True).start()
        if self.request_stop is not None:
            threading.Thread(target=self.request_stop, name="memtop-exit-request", daemon=True).start()

    def detach(self) -> None:
        """Detach every probe, once. Later callers (from any thread, signal handlers too) wait for the
        first to finish, but never past the exit's deadline: they never block on a lock."""
        if not self._detach_lock.acquire(blocking=False):
            self._detached.wait(
                max(0.0, self._deadline - time.monotonic()) if self._began.is_set() else self.grace_s
            )
            return
        try:
            self._detach()
        except Exception as exc:  # detaching is best effort per probe; never let it block the exit
            with contextlib.suppress(Exception):
                sys.stderr.write(f"memtop: detaching: {exc}\n")
        finally:
            self._detached.set()

    def force_exit(self, code: int | None = None) -> None:
        """Detach (if not done), put the terminal back, and end the process now."""
        self.detach()
        self.restore_terminal()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(self.code if code is None and self.code is not None else (code or 0))

    def restore_terminal(self) -> None:
        fd = self._tty_fd
        if fd is None:
            return
        with contextlib.suppress(OSError, ValueError):
            out = sys.__stdout__.fileno() if sys.__stdout__ is not None else fd
            # Non-blocking for the write (a terminal that went away must not block the exit), then put
            # back: the flag belongs to the open file, which the shell shares.
            blocking = os.get_blocking(out)
            os.set_blocking(out, False)
            try:
                os.write(out, TERMINAL_RESET)
            except OSError:
                pass
            finally:
                os.set_blocking(out, blocking)
        if self._tty_attrs is not None:
            with contextlib.suppress(Exception):
                import termios

                termios.tcsetattr(fd, termios.TCSANOW, self._tty_attrs)

    def _on_second_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.force_exit(exit_code_for(signum) if self.code in (None, 0) else self.code)

    def _watchdog(self) -> None:
        # Ends the process if it is still here after the grace period (it is a daemon thread: a normal
        # exit ends it first). The detach may itself take part of the grace.
        threading.Event().wait(self.grace_s)
        self.force_exit()

    def __enter__(self) -> ExitGuard:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach()
        self.uninstall()

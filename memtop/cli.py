"""Command line: argparse -> validated Config; subcommands; preflight checks with one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from memtop import __version__, tracefs
from memtop.config import MAX_DURATION_S, MAX_INTERVAL_S, MAX_SAMPLE_EVERY, MIN_INTERVAL_S, Config
from memtop.errors import MemtopError
from memtop.recording import (
    DEFAULT_DB,
    DEFAULT_INTERVAL_S,
    DEFAULT_MAX_BYTES,
    DEFAULT_RETENTION_S,
    MIN_MAX_BYTES,
    parse_duration,
    parse_size,
    parse_time,
)

if TYPE_CHECKING:
    from memtop.recording import Sink


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _float_in(low: float, high: float, what: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number of seconds, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{what} must be between {low:g} and {high:g} seconds, got {text!r}"
            )
        return value

    return parse


def _int_in(low: int, high: int, what: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be from {low} to {high}, got {text!r}")
        return value

    return parse


def _common(parser: argparse.ArgumentParser, suppress: bool = True, subcommand: bool = True) -> None:
    """The options every collecting command takes. With `suppress` (the parsers main() uses) they have no
    default of their own: an option given before the subcommand must not be overwritten by the
    subcommand's default (`memtop -i 2 record`); parse_args fills in what was not given."""
    first = len(parser._actions)
    _common_arguments(parser)
    if suppress:
        for action in parser._actions[first:]:
            action.default = argparse.SUPPRESS
            if subcommand and isinstance(action, argparse._AppendAction):
                # argparse gives a subcommand a namespace of its own: its list would replace the one
                # given before the subcommand. Kept apart here, added up in parse_args.
                action.dest = _AFTER + action.dest


_AFTER = "after_subcommand_"


# Per-command defaults that differ from _common's own.
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "exporter": {"interval": 5.0},
    "record": {"interval": DEFAULT_INTERVAL_S},
}


def _interval_help(parser: argparse.ArgumentParser, command: str) -> None:
    for action in parser._actions:
        if action.dest == "interval":
            action.help = f"how often the probes are read (default {COMMAND_DEFAULTS[command]['interval']:g})"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """build_parser().parse_args, then the defaults of the common options not given anywhere on the line."""
    args = build_parser().parse_args(argv)
    for key, value in list(vars(args).items()):
        if key.startswith(_AFTER):
            delattr(args, key)
            dest = key.removeprefix(_AFTER)
            setattr(args, dest, [*getattr(args, dest, []), *value])
    template = argparse.ArgumentParser(add_help=False)
    _common(template, suppress=False)
    defaults = {**vars(template.parse_args([])), **COMMAND_DEFAULTS.get(args.command or "", {})}
    for dest, value in defaults.items():
        if not hasattr(args, dest):
            setattr(args, dest, value)
    return args


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-i",
        "--interval",
        type=_float_in(MIN_INTERVAL_S, MAX_INTERVAL_S, "--interval"),
        default=1.0,
        metavar="SECONDS",
        help="refresh interval (default 1)",
    )
    parser.add_argument(
        "--sample",
        type=_int_in(1, MAX_SAMPLE_EVERY, "--sample"),
        default=1,
        metavar="N",
        help="count 1 in N kmallocs per process and scale up (estimates; default 1 = all)",
    )
    parser.add_argument(
        "--max-pids",
        type=_int_in(64, 1 << 20, "--max-pids"),
        default=16384,
        metavar="N",
        help="bound of the kernel's per-process map; overflow is counted as drops",
    )
    parser.add_argument(
        "--tail-min-bytes",
        type=_int_in(0, 1 << 40, "--tail-min-bytes"),
        default=0,
        metavar="BYTES",
        help="drill-down tail shows only kmallocs of at least this size",
    )
    parser.add_argument(
        "--runtime-root",
        type=_runtime_root,
        action="append",
        default=[],
        metavar="RUNTIME=DIR",
        help="another directory where a container runtime keeps its state, searched before the defaults "
        f"(RUNTIME: {', '.join(RUNTIME_ROOT_NAMES)}; repeatable)",
    )
    parser.add_argument(
        "--tcp-slow-ms",
        type=_int_in(0, 3_600_000, "--tcp-slow-ms"),
        default=200,
        metavar="MS",
        help="TCP connects at least this slow, and failed ones, are listed one by one (default 200)",
    )
    parser.add_argument(
        "--tcp-pid",
        type=_int_in(1, 1 << 22, "--tcp-pid"),
        action="append",
        default=[],
        metavar="PID",
        help="trace only these processes' TCP connects, filtered in the kernel (repeatable)",
    )
    parser.add_argument(
        "--leak-sample",
        type=_int_in(1, 1 << 20, "--leak-sample"),
        default=None,
        metavar="N",
        help="track 1 in N kernel allocations for the Leaks panel (default: N adapts to the allocation rate)",
    )
    parser.add_argument(
        "--leak-pages",
        action="store_true",
        help="also track page allocations (kmem:mm_page_alloc/free) as kernel-pages stacks",
    )
    parser.add_argument(
        "--leaks-pid",
        type=_int_in(1, 1 << 22, "--leaks-pid"),
        default=None,
        metavar="PID",
        help="also track this process's user-space allocations (uprobes on its malloc)",
    )
    parser.add_argument(
        "--user-leak-sample",
        type=_int_in(1, 1 << 20, "--user-leak-sample"),
        default=None,
        metavar="N",
        help="track 1 in N of a process's own allocations (m, --leaks-pid; default: N adapts to the rate)",
    )
    parser.add_argument(
        "--older",
        type=_float_in(0, 365 * 86400, "--older"),
        default=0.0,
        metavar="SECONDS",
        help="Leaks panel: hide allocations younger than this (the o key cycles it)",
    )
    parser.add_argument(
        "--containers-only",
        action="store_true",
        help="start with host processes hidden (the c key toggles it)",
    )


RUNTIME_ROOT_NAMES = ("docker", "containerd", "crio", "podman", "lxc")


def _runtime_root(text: str) -> tuple[str, str]:
    name, sep, directory = text.partition("=")
    if not sep or name not in RUNTIME_ROOT_NAMES or not directory:
        raise argparse.ArgumentTypeError(
            f"--runtime-root must be RUNTIME=DIR with RUNTIME one of {', '.join(RUNTIME_ROOT_NAMES)}, "
            f"got {text!r}"
        )
    return name, directory


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memtop", description="A top-like view of kernel memory allocations (eBPF).")
    parser.add_argument("--version", action="version", version=f"memtop {__version__}")
    _common(parser, subcommand=False)
    parser.add_argument(
        "--replay", type=Path, metavar="FILE", help="open a snapshot file or a recording (no root needed)"
    )
    parser.add_argument(
        "--at",
        metavar="TIME",
        help="with --replay of a recording: open the sample at TIME (ISO 8601, HH:MM, '10m ago')",
    )
    parser.add_argument(
        "--record",
        nargs="?",
        const=str(DEFAULT_DB),
        default=None,
        metavar="DB",
        help=f"live TUI: also record every 5 s into DB (default {DEFAULT_DB})",
    )
    parser.add_argument(
        "--dump-bpf", action="store_true", help="print the BPF programs and cflags, then exit"
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.add_parser("tui", help="the live dashboard (the default)")
    snap = sub.add_parser("snapshot", help="collect for a while without the UI and write a JSON snapshot")
    _common(snap)
    snap.add_argument(
        "-d",
        "--duration",
        type=_float_in(0.1, MAX_DURATION_S, "--duration"),
        default=5.0,
        metavar="SECONDS",
        help="how long to collect (default 5)",
    )
    snap.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="where to write")
    snap.add_argument(
        "--pid",
        type=_int_in(1, 1 << 22, "--pid"),
        metavar="PID",
        help="also collect call sites, sizes and a tail for this process",
    )
    sub.add_parser("doctor", help="check this host for everything memtop needs")
    exporter = sub.add_parser(
        "exporter", help="collect without the UI and serve Prometheus metrics on /metrics until stopped"
    )
    _common(exporter)
    _interval_help(exporter, "exporter")
    from memtop.metrics import DEFAULT_LISTEN

    add_metrics_arguments(exporter, default_listen=DEFAULT_LISTEN)
    rec = sub.add_parser("record", help="record a sample every interval into an SQLite database, headless")
    _common(rec)
    _interval_help(rec, "record")
    rec.add_argument("--db", type=Path, default=DEFAULT_DB, metavar="PATH", help=f"default {DEFAULT_DB}")
    rec.add_argument(
        "--retention",
        type=_parsed(parse_duration, "--retention"),
        default=DEFAULT_RETENTION_S,
        metavar="DURATION",
        help="drop samples older than this (like 12h, 3d; default 3d)",
    )
    rec.add_argument(
        "--max-size",
        type=_parsed(parse_size, "--max-size"),
        default=DEFAULT_MAX_BYTES,
        metavar="BYTES",
        help="drop the oldest samples beyond this size (like 500M, 2GiB; default 2GiB)",
    )
    rec.add_argument(
        "--install",
        action="store_true",
        help="write the systemd unit memtop-record.service for these options, then exit",
    )
    add_metrics_arguments(rec, default_listen=None)
    dump = sub.add_parser("dump", help="print a recording's samples as JSON lines or CSV")
    dump.add_argument("--db", type=Path, required=True, metavar="PATH", help="the recording")
    dump.add_argument(
        "--from", dest="start", default=None, metavar="TIME", help="first sample (default: all)"
    )
    dump.add_argument("--to", dest="end", default=None, metavar="TIME", help="last sample (default: newest)")
    dump.add_argument("--format", choices=("json", "csv"), default="json")
    dump.add_argument(
        "--table",
        choices=("processes", "containers"),
        default="processes",
        help="CSV: which table (one row per sample and process or container)",
    )
    return parser


def _listen(text: str) -> str:
    from memtop.metrics import parse_listen

    try:
        parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_metrics_arguments(parser: argparse.ArgumentParser, default_listen: str | None) -> None:
    """--metrics-listen and its companions: for `memtop exporter` (listening by default) and for
    `memtop record` (default_listen=None: no metrics unless asked for)."""
    from memtop.metrics import DEFAULT_GRACE_S, DEFAULT_TOP

    where = f"default {default_listen}: loopback only" if default_listen else "default: no metrics"
    parser.add_argument(
        "--metrics-listen",
        type=_listen,
        default=default_listen,
        metavar="HOST:PORT",
        help=f"serve Prometheus metrics on http://HOST:PORT/metrics ({where}; 0.0.0.0:PORT or [::]:PORT "
        "binds every address; port 0 picks a free one)",
    )
    parser.add_argument(
        "--metrics-top",
        type=_int_in(1, 10_000, "--metrics-top"),
        default=DEFAULT_TOP,
        metavar="N",
        help=f"export the top N host groups, leak frames and TCP ports one by one, the rest as [other] "
        f"(default {DEFAULT_TOP})",
    )
    parser.add_argument(
        "--metrics-grace",
        type=_float_in(0, 86400, "--metrics-grace"),
        default=DEFAULT_GRACE_S,
        metavar="SECONDS",
        help=f"keep exporting what is gone for this long (default {DEFAULT_GRACE_S:g})",
    )
    parser.add_argument(
        "--metrics-dest-addr",
        action="store_true",
        help="label TCP metrics with the destination address too (more series)",
    )


def metrics_options_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from memtop.metrics import MetricsOptions

    return MetricsOptions(top=args.metrics_top, grace_s=args.metrics_grace, dest_addr=args.metrics_dest_addr)


def _parsed(parse, what: str):  # type: ignore[no-untyped-def]
    def wrapped(text: str):  # type: ignore[no-untyped-def]
        try:
            value = parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what}: {exc}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{what} must be more than 0, got {text!r}")
        return value

    return wrapped


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        interval_s=args.interval,
        sample_every=args.sample,
        max_pids=args.max_pids,
        tail_min_bytes=args.tail_min_bytes,
        replay=getattr(args, "replay", None),
        focus_pid=getattr(args, "pid", None),
        duration_s=getattr(args, "duration", 5.0),
        output=getattr(args, "output", None),
        runtime_roots=tuple(args.runtime_root),
        hide_host=args.containers_only,
        tcp_slow_ms=args.tcp_slow_ms,
        tcp_pids=tuple(args.tcp_pid),
        leak_sample=args.leak_sample,
        leak_pages=args.leak_pages,
        leaks_pid=args.leaks_pid,
        user_leak_sample=args.user_leak_sample,
        older_s=args.older,
    )


def preflight_live() -> None:
    """What live mode needs, checked up front so each failure is one clear line."""
    if not tracefs.is_root_or_capable():
        raise MemtopError(
            "live mode needs root (or CAP_BPF and CAP_PERFMON): run `sudo memtop`, "
            "or open a snapshot with `memtop --replay FILE`"
        )
    from memtop.probes.base import import_bcc

    import_bcc()
    if tracefs.tracefs_root() is None:
        raise MemtopError(
            "tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing (or run `make setup`)"
        )
    from memtop.probes import TRACEPOINTS

    for tp in TRACEPOINTS:
        if tp.required and not tracefs.tracepoint_exists(tp.category, tp.event):
            raise MemtopError(
                f"tracepoint {tp.category}:{tp.event} is missing on this kernel "
                f"(needed for {tp.why}); see `memtop doctor`"
            )


class _Terminated(BaseException):
    """SIGTERM: a BaseException so that no `except Exception` on the way (BCC's compile errors are
    plain Exceptions) can swallow it."""


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    raise _Terminated(signum)


def run_snapshot(config: Config) -> int:
    from memtop.export import write_snapshot
    from memtop.sources import LiveSource
    from memtop.store import ProcessKey, whole_window_rates

    assert config.output is not None
    preflight_live()
    source = LiveSource(config)
    previous = {
        sig: signal.signal(sig, _raise_terminated)
        for sig in (signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(sig) is not signal.SIG_IGN  # nohup memtop snapshot ... keeps going
    }
    try:
        source.start()
        if config.focus_pid is not None:
            info = source.procs.read(config.focus_pid)
            if info is None:
                raise MemtopError(f"no process with PID {config.focus_pid}")
            source.set_focus(ProcessKey(config.focus_pid, info.start_time))
        print(f"memtop: collecting for {config.duration_s:g}s", file=sys.stderr, flush=True)
        deadline = time.monotonic() + config.duration_s
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(config.interval_s, left))
            source.tick()
        snapshot = whole_window_rates(source.tick(include_histories=True))
    except _Terminated as exc:
        source.close()
        print("memtop: terminated; probes detached, no snapshot written", file=sys.stderr)
        return 128 + int(exc.args[0])
    finally:
        source.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    path = write_snapshot(config.output, snapshot)
    print(
        f"memtop: wrote {path} ({len(snapshot.processes)} processes over {snapshot.duration_s:.1f}s)",
        file=sys.stderr,
    )
    return 0


def run_exporter(config: Config, listen: str, options: object) -> int:
    """Tick every interval in this thread and serve the latest snapshot's metrics from another; SIGTERM or
    SIGINT stop it within one tick's work, with every probe detached (exit 0: stopping is how it ends).
    A second signal while it detaches is ignored: it must not cut the detaching short."""
    from memtop.metrics import MetricsEndpoint, MetricsOptions
    from memtop.sources import LiveSource

    assert isinstance(options, MetricsOptions)
    preflight_live()
    stops = (signal.SIGTERM, signal.SIGINT)

    def stop(signum: int, _frame: FrameType | None) -> None:
        for sig in stops:
            signal.signal(sig, signal.SIG_IGN)
        raise _Terminated(signum)

    previous = {sig: signal.signal(sig, stop) for sig in stops}
    endpoint = None
    source = LiveSource(config)
    try:
        endpoint = MetricsEndpoint(listen, options)  # bind first: a taken port fails before BPF compiles
        print(f"memtop: serving metrics on {endpoint.server.url}", file=sys.stderr, flush=True)
        source.start()
        print(f"memtop: collecting every {config.interval_s:g}s", file=sys.stderr, flush=True)
        next_tick = time.monotonic()
        while True:
            endpoint.on_snapshot(source.tick())
            next_tick += config.interval_s
            delay = next_tick - time.monotonic()
            if delay < 0:  # a tick took longer than the interval: start counting again from now
                next_tick, delay = time.monotonic(), 0.0
            time.sleep(delay)
    except _Terminated:
        pass
    finally:
        for sig in stops:
            signal.signal(sig, signal.SIG_IGN)
        try:
            source.close(exiting=True)  # exiting: the kernel frees them after
            if endpoint is not None:
                endpoint.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    print("memtop: stopped; probes detached", file=sys.stderr)
    return 0


def _time_arg(text: str, what: str) -> float:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise MemtopError(f"{what}: {exc}", exit_code=2) from None


def run_tui(config: Config, at: str | None = None, record: Path | None = None) -> int:
    from memtop.lifecycle import ExitGuard
    from memtop.sources import LiveSource, Source, open_replay

    source: Source
    sinks: list[Sink] = []
    if config.replay is not None:
        if record is not None:
            raise MemtopError("--record records the live view; it cannot be used with --replay", exit_code=2)
        source = open_replay(config.replay, _time_arg(at, "--at") if at else None)
    else:
        if at is not None:
            raise MemtopError("--at needs --replay of a recording", exit_code=2)
        preflight_live()
        if record is not None:
            from memtop.recording import RecordingSink

            sinks.append(RecordingSink(record, min_interval_s=DEFAULT_INTERVAL_S, report=lambda _m: None))
        source = LiveSource(config)
    # Detach first, then let the UI go; the whole exit is bounded (memtop.lifecycle).
    guard = ExitGuard(lambda: source.close(exiting=True))
    guard.save_terminal()
    guard.install_signals()
    guard.install_thread_hook()
    app = None
    try:
        from memtop.app import MemtopApp

        if isinstance(source, LiveSource):
            source.start_in_background()  # rows from /proc at once; panels fill in as probes attach
        app = MemtopApp(source, config, on_exit=guard.begin, sinks=sinks)

        def stop_ui() -> None:
            with contextlib.suppress(Exception):  # the UI may be gone already
                app.call_from_thread(app.exit, None, guard.code or 0)

        guard.request_stop = stop_ui
        app.run()
    except BaseException:
        # Leaving with an error (a one-line MemtopError, say): detach here, before the interpreter's
        # own shutdown, which could not start the detaching threads any more.
        guard.begin(1)
        guard.detach()
        raise
    finally:
        # A UI that ended on an unhandled exception sets its return code: keep it.
        guard.begin(app.return_code or 0 if app is not None else 0)  # arms the watchdog
        guard.uninstall()
        # also the recordings the R key started; each only flushes what it queued
        for sink in {id(s): s for s in [*sinks, *(app.sinks if app is not None else ())]}.values():
            with contextlib.suppress(Exception):
                sink.close()
    # Detached, and the terminal is restored: leave now rather than wait for the interpreter to tear
    # down modules and join threads (a probe still compiling, the UI library's leftovers).
    code = guard.code or (app.return_code if app is not None else 0) or 0
    guard.force_exit(code)
    return code


def run_record(
    config: Config,
    db: Path,
    retention_s: float,
    max_bytes: int,
    sinks: Sequence[Sink] = (),
) -> int:
    """Headless recorder: one sample per interval into `db` until SIGTERM/SIGINT (exit 0, probes
    detached). Every Snapshot goes to the recorder and then to each of `sinks` (on_snapshot must not
    block: the metrics exporter, for one, subscribes here)."""
    from memtop.recording import RecordingSink, log
    from memtop.sources import LiveSource

    if max_bytes < MIN_MAX_BYTES:
        raise MemtopError(f"--max-size must be at least {MIN_MAX_BYTES >> 10} KiB", exit_code=2)
    preflight_live()
    recorder = RecordingSink(db, retention_s, max_bytes, min_interval_s=0.0)  # locks before compiling
    all_sinks: list[Sink] = [recorder, *sinks]
    source = LiveSource(config)
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGINT)}
    ticks = 0
    try:
        source.start()
        log(
            f"recording to {db} every {config.interval_s:g}s "
            f"(retention {retention_s / 3600:g} h, max {max_bytes / 2**20:.0f} MiB)"
        )
        next_tick = time.monotonic() + config.interval_s
        while True:
            time.sleep(max(0.0, next_tick - time.monotonic()))  # the first rates cover a whole interval
            snap = source.tick()
            ticks += 1
            for sink in all_sinks:
                try:
                    sink.on_snapshot(snap)
                except Exception as exc:  # one sink's bug must not stop the recording
                    log(f"{sink.__class__.__name__} failed: {exc.__class__.__name__}: {exc}")
            next_tick += config.interval_s
            if next_tick < time.monotonic():  # a tick took longer than the interval: start again from now
                next_tick = time.monotonic()
    except _Terminated:
        pass
    finally:
        stopping = time.monotonic()
        for sig in previous:  # a second signal must not cut the detaching short
            signal.signal(sig, signal.SIG_IGN)
        source.close(exiting=True)  # every probe at once; exiting, no need to wait
        log(f"probes detached in {time.monotonic() - stopping:.2f}s")
        for sink in all_sinks:
            try:
                sink.close()
            except Exception as exc:
                log(f"closing {sink.__class__.__name__} failed: {exc}")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log(
        f"stopped: {recorder.samples_written} samples written this run ({recorder.dropped} dropped, "
        f"{recorder.errors} failed); probes detached"
    )
    return 0


def run_dump(db: Path, start: str | None, end: str | None, output_format: str, table: str) -> int:
    """A recording's samples in [start, end]: one snapshot per JSON line, or a CSV of one table."""
    import csv

    from memtop.export import encode_json
    from memtop.recording import RecordingReader

    first = _time_arg(start, "--from") if start else float("-inf")
    last = _time_arg(end, "--to") if end else float("inf")
    if first > last:
        raise MemtopError("--from is later than --to", exit_code=2)
    reader = RecordingReader(db)
    out = sys.stdout
    try:
        if output_format == "json":
            for snap in reader.between(first, last):
                out.buffer.write(encode_json(snap, histories=False) + b"\n")
            out.flush()
            return 0
        from memtop import format as fmt
        from memtop.export import CONTAINER_COLUMNS, PROCESS_COLUMNS

        columns = PROCESS_COLUMNS if table == "processes" else CONTAINER_COLUMNS
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["taken_at", *columns])
        for snap in reader.between(first, last):
            rows = snap.processes if table == "processes" else snap.containers
            when = fmt.iso_utc(snap.taken_at)
            for row in rows:
                values = [getattr(row, c) for c in columns]
                writer.writerow(
                    [when, *(" ".join(map(str, v)) if isinstance(v, tuple) else v for v in values)]
                )
        return 0
    except BrokenPipeError:
        sys.stderr.close()  # `memtop dump | head`: the reader left, nothing to report
        return 0
    finally:
        reader.close()


def run_install(args: argparse.Namespace) -> int:
    from memtop.recording import install_unit

    path = install_unit(args)
    print(
        f"memtop: wrote {path}; start it with: "
        "systemctl daemon-reload && systemctl enable --now memtop-record"
    )
    return 0


def dump_bpf(config: Config) -> int:
    """Every program live mode would load, with this host's cflags, built as LiveSource builds them."""
    from memtop.sources import LiveSource

    source = LiveSource(config)
    probes = list(source.probes)
    if config.leaks_pid is not None:
        from memtop.probes.leaks import UserLeakProbe

        probes.append(UserLeakProbe(config.leaks_pid, sample_every=config.user_leak_sample))
    print("\n".join(probe.dump() for probe in probes))
    return 0


def _metrics_sinks(args: argparse.Namespace) -> list[Sink]:
    """`memtop record --metrics-listen`: the exporter as one more sink of the recorder's snapshots (it
    binds its port here, before anything compiles: a taken port is a one-line error)."""
    if not getattr(args, "metrics_listen", None):
        return []
    from memtop.metrics import MetricsEndpoint

    endpoint = MetricsEndpoint(args.metrics_listen, metrics_options_from_args(args))
    print(f"memtop: serving metrics on {endpoint.server.url}", file=sys.stderr, flush=True)
    return [endpoint]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_from_args(args)
    try:
        if args.command == "doctor":
            from memtop.doctor import run_doctor

            return run_doctor(sys.stdout)
        if args.dump_bpf:
            return dump_bpf(config)
        if args.command == "snapshot":
            return run_snapshot(config)
        if args.command == "exporter":
            return run_exporter(config, args.metrics_listen, metrics_options_from_args(args))
        if args.command == "record":
            if args.install:
                return run_install(args)
            return run_record(config, args.db, args.retention, args.max_size, sinks=_metrics_sinks(args))
        if args.command == "dump":
            return run_dump(args.db, args.start, args.end, args.format, args.table)
        return run_tui(config, args.at, Path(args.record) if args.record else None)
    except MemtopError as exc:
        print(f"memtop: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug, not bad input: still one line unless asked for the traceback
        if os.environ.get("MEMTOP_DEBUG"):
            raise
        print(
            f"memtop: internal error: {exc.__class__.__name__}: {exc} (MEMTOP_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 70

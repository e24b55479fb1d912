"""End-to-end: the real TCP connect probe on this kernel, real connects, and what it reports.

Every address is on this machine: loopback, or a veth pair between two network namespaces the test
creates and deletes. Clients are child processes, so their PIDs, names and cgroups are known.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memtop.errors import MemtopError
from memtop.tcp import SlowConnect, TcpAggregator, TcpKey, TcpReading, TcpRow

from .cgroup_util import test_cgroup, unique_name
from .test_bpf_e2e import loaded_prog_ids, prog_ids_held_by

pytestmark = pytest.mark.bpf

# A client that connects when told to and reports what it saw. argv[1] is a JSON spec:
#   host, port, family (4/6), count, threads; hold: open `count` non-blocking connects and keep them
#   pending until the next line on stdin, then close them.
CLIENT = r"""
import json, socket, sys, threading, time
spec = json.loads(sys.argv[1])
family = socket.AF_INET6 if spec["family"] == 6 else socket.AF_INET
print(json.dumps({"ready": True, "comm": open("/proc/self/comm").read().strip()}), flush=True)
sys.stdin.readline()
result = {"ok": 0, "refused": 0, "other": [], "sports": [], "tids": [], "seconds": []}
lock = threading.Lock()
if spec.get("hold"):
    held = []
    for _ in range(spec["count"]):
        s = socket.socket(family)
        s.setblocking(False)
        try:
            s.connect((spec["host"], spec["port"]))
        except BlockingIOError:
            pass
        held.append(s)
    print(json.dumps({"held": len(held)}), flush=True)
    sys.stdin.readline()
    for s in held:
        s.close()
else:
    def work():
        for _ in range(spec["count"]):
            s = socket.socket(family)
            s.settimeout(20)
            t = time.monotonic()
            try:
                s.connect((spec["host"], spec["port"]))
                outcome = "ok"
                sport = s.getsockname()[1]
            except ConnectionRefusedError:
                outcome, sport = "refused", None
            except OSError as exc:
                outcome, sport = repr(exc), None
            elapsed = time.monotonic() - t
            s.close()
            with lock:
                if outcome in ("ok", "refused"):
                    result[outcome] += 1
                else:
                    result["other"].append(outcome)
                if sport:
                    result["sports"].append(sport)
                result["tids"].append(threading.get_native_id())
                result["seconds"].append(elapsed)
    threads = [threading.Thread(target=work) for _ in range(spec.get("threads", 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
print(json.dumps(result), flush=True)
sys.stdin.readline()
"""

# A listener that accepts and closes connections until stdin closes; prints its port.
SERVER = r"""
import socket, sys, threading
host = sys.argv[1]
l = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((host, 0))
l.listen(1024)
def serve():
    while True:
        try:
            c, _ = l.accept()
        except OSError:
            return
        c.close()
threading.Thread(target=serve, daemon=True).start()
print(l.getsockname()[1], flush=True)
sys.stdin.read()
"""


# -- helpers ---------------------------------------------------------------------------------------


class Client:
    """One client process; `go()` makes it connect, `result()` is what it saw."""

    def __init__(self, spec: dict[str, Any], prefix: list[str] | None = None, **popen: Any) -> None:
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-c", CLIENT, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            **popen,
        )
        self.pid = self.proc.pid
        hello = json.loads(self._line())
        self.comm: str = hello["comm"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"client {self.pid} exited early ({self.proc.poll()})"
        return line

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self._line())
        return out

    def run(self) -> dict[str, Any]:
        self.go()
        return self.result()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


class Listener:
    """A listening socket of the test's own, accepting (and closing) in a thread unless paused."""

    def __init__(self, host: str = "127.0.0.1", backlog: int = 1024, accept: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, 0))
        self.sock.listen(backlog)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if accept:
            self.sock.settimeout(0.2)
            self._thread = threading.Thread(target=self._serve, daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sock.close()


class Observer:
    """A started probe whose readings go through the aggregator, keeping every slow connect seen."""

    def __init__(self, probe: Any) -> None:
        self.probe = probe
        self.aggregator = TcpAggregator(started_at=time.time())
        self.slow: list[SlowConnect] = []
        self.last: TcpReading | None = None

    def read(self) -> TcpReading:
        reading = self.probe.read()
        self.aggregator.ingest(time.time(), reading)
        self.slow.extend(reading.slow)
        self.last = reading
        return reading

    def settle(self) -> TcpReading:
        """Read twice, 0.2 s apart, so failures held for their error record are reported."""
        self.read()
        time.sleep(0.2)
        return self.read()

    def row(self, key: TcpKey) -> TcpRow | None:
        return next((r for r in self.aggregator.rows() if r.key == key), None)

    def slow_of(self, pid: int) -> list[SlowConnect]:
        return [s for s in self.slow if s.pid == pid]

    def wait_for(self, predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read()
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")


def start_probe(**kwargs: Any) -> Any:
    from memtop.probes.tcp import TcpProbe

    probe = TcpProbe(**kwargs)
    probe.start()
    return probe


@pytest.fixture
def observer() -> Iterator[Observer]:
    probe = start_probe(slow_ms=200)
    try:
        yield Observer(probe)
    finally:
        probe.close()


@contextlib.contextmanager
def clients(*specs: dict[str, Any], **popen: Any) -> Iterator[list[Client]]:
    started: list[Client] = []
    try:
        for spec in specs:
            started.append(Client(spec, **popen))
        yield started
    finally:
        for c in started:
            c.stop()


def free_port() -> int:
    """A port nothing listens on (bound, then released without listening)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- fast, slow and failed connects ---------------------------------------------------------------


def test_fast_loopback_connects_are_counted_for_the_right_process_name_and_cgroup(observer: Observer) -> None:
    listener = Listener()
    try:
        with (
            test_cgroup(unique_name()) as cg,
            clients(
                {"host": "127.0.0.1", "port": listener.port, "family": 4, "count": 40}, preexec_fn=cg.enter
            ) as (client,),
        ):
            result = client.run()
            assert result["ok"] == 40, result
            key = TcpKey(client.pid, 4, "127.0.0.1", listener.port)
            row = observer.wait_for(
                lambda: (r := observer.row(key)) and r.connects >= 40 and r, "40 connects"
            )
            assert (row.connects, row.failed) == (40, 0)
            assert row.comm == client.comm
            assert row.cgroup_id == cg.v2_id()
            assert sum(n for _, n in row.histogram) == 40
            # Loopback handshakes finish in microseconds; a SYN retransmit would take a second.
            assert row.p50_us is not None and row.p50_us < 50_000
            assert row.max_us < 900_000 and row.syn_retransmits == 0
            assert observer.last is not None and observer.last.drops() == {
                "pending_map_full": 0,
                "key_map_full": 0,
                "slow_lost": 0,
                "slow_rate_limited": 0,
                "outcome_lost": 0,
                "recursion_misses": observer.last.recursion_misses,
            }
    finally:
        listener.close()


def test_every_connect_is_sent_at_slow_threshold_zero_with_host_order_ports_and_threads(
    observer: Observer,
) -> None:
    listener = Listener()
    try:
        with clients(
            {"host": "127.0.0.1", "port": listener.port, "family": 4, "count": 10, "threads": 3}
        ) as (client,):
            observer.probe.set_pid_filter([client.pid])
            observer.probe.set_slow_ms(0)
            result = client.run()
            events = observer.wait_for(
                lambda: len(observer.slow_of(client.pid)) >= 30 and observer.slow_of(client.pid), "30 events"
            )
    finally:
        listener.close()
    assert result["ok"] == 30
    assert len(events) == 30
    assert {e.sport for e in events} == set(result["sports"])  # host byte order, as the client saw them
    assert {e.dport for e in events} == {listener.port}
    assert {e.tid for e in events} == set(result["tids"])  # the connecting threads
    assert all(e.saddr == e.daddr == "127.0.0.1" and not e.failed and e.reason == "" for e in events)


def listen_overflows() -> int:
    """TcpExt ListenOverflows of this network namespace: SYNs dropped because an accept queue was full."""
    header, values = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()[:2]]
    return int(values[header.index("ListenOverflows")])


def test_a_syn_dropped_by_a_full_accept_queue_is_a_slow_connect_of_about_a_second(observer: Observer) -> None:
    listener = Listener(backlog=0, accept=False)
    filler = socket.create_connection(("127.0.0.1", listener.port))  # the one queue slot is now taken
    accepted: list[socket.socket] = []
    try:
        with clients({"host": "127.0.0.1", "port": listener.port, "family": 4, "count": 1}) as (client,):
            dropped = listen_overflows()
            client.go()
            deadline = time.monotonic() + 10
            while listen_overflows() == dropped and time.monotonic() < deadline:  # its first SYN, dropped
                time.sleep(0.01)
            accepted.append(listener.sock.accept()[0])  # room for the retransmitted SYN
            result = client.result()
            # It really waited for a retransmit (the initial RTO is 1 s).
            assert result["ok"] == 1 and result["seconds"][0] >= 0.9, result
            key = TcpKey(client.pid, 4, "127.0.0.1", listener.port)
            row = observer.wait_for(lambda: (r := observer.row(key)) and r.connects and r, "the slow connect")
            (event,) = observer.wait_for(lambda: observer.slow_of(client.pid), "the slow event")
    finally:
        filler.close()
        for conn in accepted:
            conn.close()
        listener.close()
    assert row.syn_retransmits >= 1
    assert 900_000 <= row.max_us <= 3_000_000
    assert row.p99_us is not None and 500_000 <= row.p99_us <= row.max_us
    assert row.histogram and row.histogram[-1][0] >= 524_288
    assert row.last_slow_at is not None
    assert not event.failed and event.syn_retransmits >= 1
    assert 900_000 <= event.latency_us <= 3_000_000
    assert abs(event.latency_us - row.max_us) < 1000
    assert event.sport == result["sports"][0]


def test_connects_to_a_closed_port_are_refused_failures(observer: Observer) -> None:
    port = free_port()
    with clients({"host": "127.0.0.1", "port": port, "family": 4, "count": 3}) as (client,):
        result = client.run()
        assert result["refused"] == 3, result
        key = TcpKey(client.pid, 4, "127.0.0.1", port)
        observer.wait_for(lambda: len(observer.slow_of(client.pid)) >= 3, "three failures")
        observer.settle()
    row = observer.row(key)
    assert row is not None and (row.connects, row.failed) == (3, 3)
    assert row.histogram == () and row.p50_us is None  # failures are not latencies of a connect
    events = observer.slow_of(client.pid)
    assert len(events) == 3
    assert all(e.failed and e.reason == "refused" and e.error == 111 for e in events)


def test_a_connect_closed_by_the_application_while_pending_is_a_closed_failure(observer: Observer) -> None:
    listener = Listener(backlog=0, accept=False)
    filler = socket.create_connection(("127.0.0.1", listener.port))
    try:
        with clients({"host": "127.0.0.1", "port": listener.port, "family": 4, "count": 2, "hold": True}) as (
            client,
        ):
            client.go()
            assert client.result() == {"held": 2}
            pending = observer.wait_for(
                lambda: [c for c in observer.aggregator.in_flight() if c.pid == client.pid], "in-flight"
            )
            assert {(c.daddr, c.dport, c.comm) for c in pending} == {
                ("127.0.0.1", listener.port, client.comm)
            }
            client.go()  # close them while their SYNs wait for a retransmit
            client.result()
            events = observer.wait_for(
                lambda: len(observer.slow_of(client.pid)) == 2 and observer.slow_of(client.pid), "2 failures"
            )
            observer.settle()
    finally:
        filler.close()
        listener.close()
    assert all(e.failed and e.reason == "closed" and e.error == 0 for e in events)
    assert not [c for c in observer.aggregator.in_flight() if c.pid == client.pid]
    row = observer.row(TcpKey(client.pid, 4, "127.0.0.1", listener.port))
    assert row is not None and (row.connects, row.failed) == (2, 2)


def test_connects_whose_outcome_was_missed_are_closed_out_as_outcome_lost(observer: Observer) -> None:
    """The kernel skips a classic tracepoint program on a recursion miss: a connect's SYN_SENT -> CLOSE
    may never reach the probe. Simulated by detaching the state-change program while two connects are
    pending: their sockets' destruction closes them out (counted), and an entry whose socket destruction
    was missed too is expired once older than any SYN retry can last. Nothing stays in flight."""
    listener = Listener(backlog=0, accept=False)
    filler = socket.create_connection(("127.0.0.1", listener.port))
    try:
        with clients({"host": "127.0.0.1", "port": listener.port, "family": 4, "count": 2, "hold": True}) as (
            client,
        ):
            client.go()
            assert client.result() == {"held": 2}
            observer.wait_for(
                lambda: len([c for c in observer.aggregator.in_flight() if c.pid == client.pid]) == 2,
                "2 in flight",
            )
            lost_before = observer.read().outcome_lost
            observer.probe.bpf.detach_tracepoint(tp=b"sock:inet_sock_set_state")
            client.go()  # SYN_SENT -> CLOSE now happens unseen
            client.result()
            observer.wait_for(lambda: observer.read().outcome_lost == lost_before + 2, "2 outcomes lost")
    finally:
        filler.close()
        listener.close()
    reading = observer.read()
    assert not [c for c in reading.in_flight if c.pid == client.pid]
    assert reading.drops()["outcome_lost"] == lost_before + 2
    row = observer.row(TcpKey(client.pid, 4, "127.0.0.1", listener.port))
    assert row is None or row.connects == 0  # lost outcomes are not made up as failures

    # A pending entry whose destruction was missed as well: expired by age, also counted.
    table = observer.probe.bpf[b"pending"]
    stale = table.Leaf()
    stale.start_ns, stale.tgid, stale.family, stale.dport = 1, client.pid, socket.AF_INET, 9
    table[table.Key(0xDEAD0000)] = stale
    reading = observer.read()
    assert not [c for c in reading.in_flight if c.pid == client.pid and c.dport == 9]
    assert reading.outcome_lost == lost_before + 3
    assert reading.in_flight_count == len(table)


def test_ipv6_loopback_and_ipv4_mapped_destinations(observer: Observer) -> None:
    listener = Listener("::", backlog=64)  # dual-stack: also takes IPv4-mapped connects
    try:
        with clients(
            {"host": "::1", "port": listener.port, "family": 6, "count": 5},
            {"host": "::ffff:127.0.0.1", "port": listener.port, "family": 6, "count": 2},
        ) as (v6, mapped):
            assert v6.run()["ok"] == 5 and mapped.run()["ok"] == 2
            for client, daddr, n in ((v6, "::1", 5), (mapped, "::ffff:127.0.0.1", 2)):
                key = TcpKey(client.pid, 6, daddr, listener.port)
                row = observer.wait_for(
                    lambda k=key, n=n: (r := observer.row(k)) and r.connects >= n and r, daddr
                )
                assert (row.connects, row.failed) == (n, 0)
                assert row.p50_us is not None and row.p50_us < 50_000
    finally:
        listener.close()
    port = free_port()
    with clients({"host": "::1", "port": port, "family": 6, "count": 1}) as (client,):
        assert client.run()["refused"] == 1
        (event,) = observer.wait_for(lambda: observer.slow_of(client.pid), "the IPv6 failure")
    assert (event.family, event.saddr, event.daddr, event.dport) == (6, "::1", "::1", port)
    assert event.reason == "refused"


def test_concurrent_connects_from_several_processes_are_attributed_to_each(observer: Observer) -> None:
    listener = Listener()
    counts = (15, 25, 35, 45)
    try:
        specs = [
            {"host": "127.0.0.1", "port": listener.port, "family": 4, "count": n, "threads": 3}
            for n in counts
        ]
        with clients(*specs) as started:
            for c in started:
                c.go()
            results = [c.result() for c in started]
            assert [r["ok"] for r in results] == [3 * n for n in counts]
            keys = [TcpKey(c.pid, 4, "127.0.0.1", listener.port) for c in started]
            observer.wait_for(
                lambda: all(
                    (r := observer.row(k)) and r.connects >= 3 * n for k, n in zip(keys, counts, strict=True)
                ),
                "every client's connects",
            )
            for client, key, n in zip(started, keys, counts, strict=True):
                row = observer.row(key)
                assert row is not None and (row.connects, row.failed) == (3 * n, 0), (client.pid, row)
                assert row.comm == client.comm
    finally:
        listener.close()


# -- network namespaces --------------------------------------------------------------------------


@contextlib.contextmanager
def namespace_pair() -> Iterator[tuple[str, str, str]]:
    """Two network namespaces of the test's own joined by a veth pair: (client ns, server ns, server
    address). Deleted afterwards."""
    tag = uuid.uuid4().hex[:6]
    client_ns, server_ns = f"memtop-test-{tag}-c", f"memtop-test-{tag}-s"
    created: list[str] = []

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    try:
        for ns in (client_ns, server_ns):
            ip("netns", "add", ns)
            created.append(ns)
        ip("-n", client_ns, "link", "add", "mt0", "type", "veth", "peer", "name", "mt1", "netns", server_ns)
        ip("-n", client_ns, "addr", "add", "10.231.77.1/30", "dev", "mt0")
        ip("-n", server_ns, "addr", "add", "10.231.77.2/30", "dev", "mt1")
        for ns, dev in ((client_ns, "mt0"), (server_ns, "mt1")):
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield client_ns, server_ns, "10.231.77.2"
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_connects_inside_network_namespaces_of_the_tests_own(observer: Observer) -> None:
    with namespace_pair() as (client_ns, server_ns, server_addr):
        server = subprocess.Popen(
            ["ip", "netns", "exec", server_ns, sys.executable, "-c", SERVER, server_addr],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            prefix = ["ip", "netns", "exec", client_ns]
            with clients(
                {"host": server_addr, "port": port, "family": 4, "count": 12},
                {
                    "host": server_addr,
                    "port": port + 1 if port < 65535 else port - 1,
                    "family": 4,
                    "count": 2,
                },
                {"host": "127.0.0.1", "port": 9, "family": 4, "count": 1},  # the client ns's own loopback
                prefix=prefix,
            ) as (ok, refused, local):
                assert ok.run()["ok"] == 12
                assert refused.run()["refused"] == 2
                assert local.run()["refused"] == 1
                key = TcpKey(ok.pid, 4, server_addr, port)
                row = observer.wait_for(
                    lambda: (r := observer.row(key)) and r.connects >= 12 and r, "netns row"
                )
                assert (row.connects, row.failed) == (12, 0)
                assert row.comm == ok.comm
                observer.wait_for(
                    lambda: observer.slow_of(refused.pid) and observer.slow_of(local.pid), "failures"
                )
                observer.settle()
                assert [e.reason for e in observer.slow_of(refused.pid)] == ["refused", "refused"]
                assert all(e.saddr == "10.231.77.1" for e in observer.slow_of(refused.pid))
                (local_failure,) = observer.slow_of(local.pid)
                assert (local_failure.daddr, local_failure.dport, local_failure.reason) == (
                    "127.0.0.1",
                    9,
                    "refused",
                )
        finally:
            if server.stdin is not None:
                server.stdin.close()
            server.kill()
            server.wait(timeout=10)
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert client_ns not in names and server_ns not in names


# -- the PID filter, limits and drops ---------------------------------------------------------------


def test_pid_filter_in_the_kernel_map(observer: Observer) -> None:
    listener = Listener()
    spec = {"host": "127.0.0.1", "port": listener.port, "family": 4, "count": 5}
    try:
        with clients(spec, spec) as (wanted, other):
            observer.probe.set_pid_filter([wanted.pid])
            assert wanted.run()["ok"] == 5 and other.run()["ok"] == 5
            observer.wait_for(
                lambda: observer.row(TcpKey(wanted.pid, 4, "127.0.0.1", listener.port)), "wanted"
            )
            observer.settle()
            assert observer.row(TcpKey(other.pid, 4, "127.0.0.1", listener.port)) is None
        with clients(spec) as (later,):
            observer.probe.set_pid_filter(None)
            assert later.run()["ok"] == 5
            row = observer.wait_for(
                lambda: (
                    (r := observer.row(TcpKey(later.pid, 4, "127.0.0.1", listener.port))) and r.connects >= 5
                ),
                "unfiltered again",
            )
            assert row
    finally:
        listener.close()
    with pytest.raises(MemtopError):
        observer.probe.set_pid_filter(range(1, 5000))
    with pytest.raises(MemtopError):
        observer.probe.set_slow_ms(-1)


def test_slow_events_over_the_rate_cap_are_counted_not_sent() -> None:
    probe = start_probe(slow_ms=0, events_per_s=5)
    obs = Observer(probe)
    listener = Listener()
    try:
        with clients({"host": "127.0.0.1", "port": listener.port, "family": 4, "count": 60}) as (client,):
            probe.set_pid_filter([client.pid])
            assert client.run()["ok"] == 60
            obs.wait_for(
                lambda: (
                    (r := obs.row(TcpKey(client.pid, 4, "127.0.0.1", listener.port))) and r.connects >= 60
                ),
                "60",
            )
            reading = obs.settle()
    finally:
        listener.close()
        probe.close()
    sent = len(obs.slow_of(client.pid))
    assert 1 <= sent < 60
    assert sent + reading.slow_rate_limited == 60


def test_full_maps_count_their_drops() -> None:
    probe = start_probe(slow_ms=200, max_keys=64, max_pending=64)
    obs = Observer(probe)
    listener = Listener(backlog=0, accept=False)
    filler = socket.create_connection(("127.0.0.1", listener.port))
    closed_port = free_port()
    try:
        # 70 destinations (all of 127/8 is loopback, nothing listens): 64 fit in the per-key map.
        hosts = [f"127.0.1.{i}" for i in range(1, 71)]
        code = (
            "import socket, sys\n"
            "sys.stdin.readline()\n"
            f"for h in {hosts!r}:\n"
            "    s = socket.socket()\n"
            "    try: s.connect((h, int(sys.argv[1])))\n"
            "    except ConnectionRefusedError: pass\n"
            "    s.close()\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(closed_port)], stdin=subprocess.PIPE, text=True
        )
        probe.set_pid_filter([proc.pid])
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        reading = obs.read()  # (a nearly full map loses its exited processes' entries after this read)
        # Other processes may have connected before the filter was set: every key they took is one
        # fewer for the client, and the map was not full before the client ran.
        assert len(reading.per_key) == 64
        client_keys = len([k for k in reading.per_key if k.pid == proc.pid])
        assert client_keys >= 60
        assert reading.key_map_full == 70 - client_keys
        # 70 connects held pending: at most 64 fit in the pending map.
        with clients(
            {"host": "127.0.0.1", "port": listener.port, "family": 4, "count": 70, "hold": True}
        ) as (holder,):
            probe.set_pid_filter([holder.pid])
            holder.go()
            assert holder.result() == {"held": 70}
            reading = obs.read()
            held = [c for c in reading.in_flight if c.pid == holder.pid]
            assert len(held) >= 60
            assert reading.pending_map_full == 70 - len(held)
            assert reading.in_flight_count == 64
            assert {(c.daddr, c.dport) for c in held} == {("127.0.0.1", listener.port)}
    finally:
        filler.close()
        listener.close()
        probe.close()


def test_missing_required_tracepoint_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "events" / "tcp").mkdir(parents=True)
    monkeypatch.setenv("MEMTOP_TRACEFS", str(tmp_path))
    from memtop.probes.tcp import TcpProbe

    with pytest.raises(MemtopError, match="sock:inet_sock_set_state"):
        TcpProbe().start()


def test_close_detaches_every_program() -> None:
    before = prog_ids_held_by(os.getpid())
    probe = start_probe()
    ours = prog_ids_held_by(os.getpid()) - before
    assert len(ours) >= 5  # set_state, destroy, reset, retransmit, error report
    assert ours <= loaded_prog_ids()
    probe.close()
    probe.close()  # twice is fine
    assert not (ours & prog_ids_held_by(os.getpid()))
    assert not (ours & loaded_prog_ids()), "programs still loaded after close()"


# -- the benchmark still runs ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_tcp_bench_runs_end_to_end(tmp_path: Path) -> None:
    """No timing is asserted: the benchmark builds its workload, measures, and leaves nothing loaded."""
    for tool in ("gcc", "bpftool"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (sudo make setup)")
    result_json = tmp_path / "tcp_bench.json"
    bench = Path(__file__).resolve().parent.parent / "bench" / "tcp_bench.py"
    proc = subprocess.run(
        [
            sys.executable,
            str(bench),
            "--seconds",
            "0.3",
            "--rounds",
            "1",
            "--attempts",
            "1",
            "--json",
            str(result_json),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| memtop tcp probe |" in proc.stdout
    assert "| inet_sock_set_state |" in proc.stdout
    assert "remain loaded" in proc.stdout
    doc = json.loads(result_json.read_text())
    assert doc["summary"]["probe_counted_per_connect"] == pytest.approx(1.0)
    set_state = next(p for p in doc["summary"]["programs"] if p["tracepoint"] == "inet_sock_set_state")
    assert set_state["ns_per_event"] > 0 and set_state["events_per_connect"] >= 4

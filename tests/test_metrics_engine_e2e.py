"""End-to-end against the real engine: `memtop exporter` (the real command, real probes) scraped every second
by a Prometheus of the test's own on 127.0.0.1, a workload with a known kmalloc rate, TCP connects to a
listener of the test's own and a real OOM kill, each in a docker-shaped cgroup of the test's own; then
Prometheus' HTTP API must show the container's kmalloc rate within 10 %, the OOM counter at one with the
right labels, and the TCP histogram holding the connects made. Every query of the Grafana dashboard and of
the alert rules is evaluated by the same Prometheus, and every metric name they use must be one it scraped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .cgroup_util import test_cgroup, unique_name
from .conftest import REPO
from .test_bpf_e2e import loaded_prog_ids, prog_ids_held_by, wait_for
from .test_oom_e2e import COMM, FAST, LIMIT, checked_limit

pytestmark = pytest.mark.bpf

MEMTOP = Path(sys.executable).with_name("memtop")
RATE = 4000  # listxattr calls per second by the paced workload (one kmalloc each)
SECONDS = 40
WINDOW = "30s"  # the rate() window, inside the workload's run
CONNECTS = 25

PACED = f"""
import os, sys, tempfile, time
path = tempfile.mkstemp()[1]
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
per_slot, slots = {RATE} // 10, {SECONDS} * 10  # 10 slots a second: waking up costs kmallocs too
start_wall, start = time.time(), time.monotonic()
for i in range(slots):
    delay = start + i / 10 - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    for _ in range(per_slot):
        os.listxattr(path)
end_wall = time.time()
os.unlink(path)
sys.stdout.write(f"{{start_wall}} {{end_wall}} {{per_slot * slots}}\\n"); sys.stdout.flush()
sys.stdin.read()
"""
CONNECTOR = """
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
for _ in range(count):
    socket.create_connection(("127.0.0.1", port), timeout=10).close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_prometheus() -> str:
    """The prometheus binary; installs Debian's package (scripts/test-deps.sh) when it is missing."""
    if shutil.which("prometheus") is None and os.geteuid() == 0:
        subprocess.run(["bash", str(REPO / "scripts" / "test-deps.sh")], check=True)
    path = shutil.which("prometheus")
    if path is None:
        reason = "prometheus is not installed (scripts/test-deps.sh installs it)"
        if os.environ.get("MEMTOP_REQUIRE_BPF") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


class Prometheus:
    """A Prometheus server of the test's own: 127.0.0.1, a free port, a temp dir, a 1 s scrape interval."""

    def __init__(self, target: str, tmp: Path) -> None:
        binary = ensure_prometheus()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        config.write_text(
            textwrap.dedent(
                f"""
                global:
                  scrape_interval: 1s
                  evaluation_interval: 1s
                scrape_configs:
                  - job_name: memtop
                    static_configs:
                      - targets: ["{target}"]
                """
            )
        )
        self.log = open(tmp / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.console.templates=/dev/null",
                "--web.console.libraries=/dev/null",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, timeout=60, what="prometheus to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        return list(data["result"]) if data["resultType"] == "vector" else [data["result"]]

    def scraped_names(self) -> set[str]:
        return set(self.api("label/__name__/values"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


class Exporter:
    """`memtop exporter` as a user runs it, on a free port of 127.0.0.1."""

    def __init__(self, tmp: Path) -> None:
        self.stderr_path = tmp / "exporter.err"
        self.stderr = open(self.stderr_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(MEMTOP), "exporter", "--metrics-listen", "127.0.0.1:0", "--interval", "1"],
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )
        self.address = wait_for(self._address, timeout=60, what="the exporter to listen")
        wait_for(lambda: "collecting every" in self._err(), timeout=180, what="the exporter's probes")
        self.prog_ids = prog_ids_held_by(self.proc.pid)

    def _err(self) -> str:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"memtop exporter exited with {self.proc.returncode}: {self.stderr_path.read_text()}"
            )
        return self.stderr_path.read_text()

    def _address(self) -> str | None:
        match = re.search(r"serving metrics on http://(127\.0\.0\.1:\d+)/metrics", self._err())
        return match.group(1) if match else None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self.stderr.close()
        return code


@pytest.fixture
def engine() -> Iterator[tuple[Exporter, Prometheus]]:
    with tempfile.TemporaryDirectory(prefix="memtop-prom-") as tmp:
        exporter = Exporter(Path(tmp))
        prometheus = None
        try:
            prometheus = Prometheus(exporter.address, Path(tmp))
            yield exporter, prometheus
        finally:
            if prometheus is not None:
                prometheus.stop()
            exporter.stop()


@pytest.fixture(autouse=True)
def _memcg_oom_is_safe() -> None:
    with open("/proc/sys/vm/panic_on_oom") as f:
        if f.read().strip() == "2":
            pytest.skip("vm.panic_on_oom=2: a cgroup OOM would panic the machine")


def one(results: list[dict[str, Any]], what: str) -> float:
    assert len(results) == 1, f"{what}: {results}"
    return float(results[0]["value"][1])


def test_prometheus_sees_the_kmalloc_rate_the_oom_kill_and_the_connects(
    engine: tuple[Exporter, Prometheus],
) -> None:
    exporter, prom = engine
    work_id = uuid.uuid4().hex + uuid.uuid4().hex
    victim_id = uuid.uuid4().hex + uuid.uuid4().hex
    base = unique_name()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    with (
        contextlib.closing(listener),
        test_cgroup(f"{base}/docker/{work_id}") as work_cg,
        test_cgroup(f"{base}-oom/docker/{victim_id}", memory_limit_bytes=LIMIT) as victim_cg,
    ):
        checked_limit(victim_cg)
        wait_for(lambda: prom.query("up") and one(prom.query("up"), "up") == 1, what="the first scrape")

        # TCP: CONNECTS connects from the container to the test's listener
        subprocess.run(
            [sys.executable, "-c", CONNECTOR, str(port), str(CONNECTS)],
            preexec_fn=work_cg.enter,
            check=True,
            timeout=60,
        )

        # kmalloc: RATE listxattr calls per second for SECONDS seconds
        work = subprocess.Popen(
            [sys.executable, "-c", PACED],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=work_cg.enter,
        )
        try:
            assert work.stdin is not None and work.stdout is not None
            assert work.stdout.readline() == "ready\n"
            work.stdin.write("go\n")
            work.stdin.flush()
            start_wall, end_wall, calls = work.stdout.readline().split()
        finally:
            work.kill()
            work.wait(timeout=10)
        start, end = float(start_wall), float(end_wall)
        workload_rate = int(calls) / (end - start)

        before_kill = time.time()
        time.sleep(2)  # at least one scrape with no kill
        victim = subprocess.Popen([sys.executable, "-c", FAST], preexec_fn=victim_cg.enter)
        assert victim.wait(timeout=60) == -9, "expected an OOM kill"

        # -- what Prometheus saw ---------------------------------------------------------------------
        at = start + 35.0  # the window [start+5, start+35] lies inside the workload's run
        assert end >= at, f"the workload ended early: {end - start:.1f}s"
        rate_calls = one(
            prom.query(f'rate(memtop_kmalloc_calls_total{{container_id="{work_id}"}}[{WINDOW}])', at=at),
            "kmalloc calls rate",
        )
        print(f"kmalloc calls/s: prometheus {rate_calls:.1f}, workload {workload_rate:.1f}")
        assert rate_calls == pytest.approx(workload_rate, rel=0.10), (rate_calls, workload_rate)
        series = prom.query(f'memtop_kmalloc_bytes_total{{container_id="{work_id}"}}', at=at)
        assert series and series[0]["metric"]["runtime"] == "docker"
        assert series[0]["metric"]["container"] == work_id[:12]

        oom_query = f'memtop_oom_kills_total{{container_id="{victim_id}"}}'
        killed = wait_for(lambda: prom.query(oom_query), timeout=30, what="the OOM kill in Prometheus")
        assert len(killed) == 1, killed
        labels = killed[0]["metric"]
        assert labels["constraint"] == "memcg" and labels["victim_comm"] == COMM, labels
        assert labels["runtime"] == "docker" and labels["container"] == victim_id[:12]
        assert float(killed[0]["value"][1]) == 1
        assert prom.query(oom_query, at=before_kill) == []  # it rose from nothing to one

        tcp = f'{{container_id="{work_id}",port="{port}"}}'
        assert one(prom.query(f"memtop_tcp_connects_total{tcp}"), "connects") == CONNECTS
        assert one(prom.query(f"memtop_tcp_connect_failures_total{tcp}"), "failures") == 0
        inf = tcp[:-1] + ',le="+Inf"}'
        assert one(prom.query(f"memtop_tcp_connect_latency_seconds_bucket{inf}"), "+Inf bucket") == CONNECTS
        p99 = one(
            prom.query(f"histogram_quantile(0.99, memtop_tcp_connect_latency_seconds_bucket{tcp})"), "p99"
        )
        assert 0 < p99 < 10  # a loopback connect, in seconds (not microseconds)

        check_deploy_queries(prom)

    held = exporter.prog_ids
    assert held, "the exporter held no BPF programs"
    assert exporter.stop() == 0
    assert "probes detached" in exporter.stderr_path.read_text()
    assert not held & loaded_prog_ids(), "BPF programs left loaded after SIGTERM"


def check_deploy_queries(prom: Prometheus) -> None:
    """Every dashboard and rule expression evaluates without error in this Prometheus, and every memtop
    metric they name is one it scraped from the exporter (process_* included)."""
    from .test_metrics_deploy import deploy_expressions, selector_names

    scraped = prom.scraped_names()
    optional = {"memtop_container_memory_working_set_bytes"}  # served once issue #13's field lands
    for where, expr in deploy_expressions():
        prom.query(expr)  # raises on an error
        missing = {n for n in selector_names(expr) if n not in scraped} - optional
        assert not missing, f"{where}: {expr} names {missing}, not scraped from the exporter"


def test_sigint_then_sigterm_stop_the_exporter_with_every_probe_detached() -> None:
    """Ctrl-C, then a SIGTERM while it detaches (an impatient user, a service manager): exit 0, all gone."""
    with tempfile.TemporaryDirectory(prefix="memtop-exporter-") as tmp:
        exporter = Exporter(Path(tmp))
        held = exporter.prog_ids
        assert held, "the exporter held no BPF programs"
        exporter.proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        code = exporter.stop()  # sends SIGTERM while it is still running
        err = exporter.stderr_path.read_text()
        assert code == 0, err
        assert "probes detached" in err
    assert not held & loaded_prog_ids(), "BPF programs left loaded after SIGINT"


def test_a_taken_port_is_one_line_before_any_probe_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(MEMTOP), "exporter", "--metrics-listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"memtop: error: cannot serve metrics on 127.0.0.1:{port}: ")

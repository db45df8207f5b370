"""A real Redis Cluster for the tests: 3 masters and 3 replicas on free ports in a temp dir.

Started with ``redis-server --cluster-enabled yes`` per node and joined with
``redis-cli --cluster create … --cluster-replicas 1``, as an operator would.
A short ``cluster-node-timeout`` makes a killed master fail over in about two
seconds, so the fault tests stay short.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import wait_until_answering

NODE_TIMEOUT_MS = 1000


def _free_ports(count: int) -> list[int]:
    """``count`` free ports whose cluster-bus port (+10000) is free too."""
    import socket

    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class RedisCluster:
    """Six redis-server processes forming one cluster (AOF on, like the single-node fixture)."""

    def __init__(self, directory: Path, nodes: int = 6):
        self.binary, self.cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if not self.binary or not self.cli:
            pytest.fail("redis-server and redis-cli are not installed; .ci/run installs them (apt-get install redis-server)")
        self.directory = directory
        self.ports = _free_ports(nodes)
        self.processes: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """Every node, comma-separated (REDIS_URL's cluster form): the client starts from one that answers."""
        return ",".join(f"redis://127.0.0.1:{port}/0" for port in self.ports)

    def start_node(self, port: int) -> None:
        folder = self.directory / str(port)
        folder.mkdir(exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [
                self.binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "", "--protected-mode", "no", "--maxmemory", "1gb", "--maxmemory-policy", "noeviction",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until_answering(port)

    def start(self) -> None:
        for port in self.ports:
            self.start_node(port)
        subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_healthy()

    def info(self, port: int) -> dict:
        return redis.Redis(port=port, socket_timeout=1, decode_responses=True).cluster("INFO")

    def wait_healthy(self, timeout: float = 30.0, replicas: int = 1) -> None:
        """Every live node sees the cluster as ok with all 16384 slots served, and (``replicas``) every
        master has that many replicas in sync (so WAIT can be answered)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [self.info(port) for port in self.processes]
                synced = all(self.replicas_of(port) >= replicas for port in self.masters())
                if synced and all(s.get("cluster_state") == "ok" and s.get("cluster_slots_ok") == "16384" for s in states):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis Cluster did not become healthy")
            time.sleep(0.1)

    def replicas_of(self, port: int) -> int:
        """Replicas connected to and in sync with the master on ``port``."""
        info = redis.Redis(port=port, socket_timeout=1, decode_responses=True).info("replication")
        return sum(1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online")

    def masters(self) -> list[int]:
        """Ports of the nodes serving slots now."""
        out = []
        for port in self.processes:
            try:
                role = redis.Redis(port=port, socket_timeout=1).execute_command("ROLE")[0]
            except redis.RedisError:
                continue
            if (role.decode() if isinstance(role, bytes) else role) == "master":
                out.append(port)
        return out

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot."""
        from models.store import redis_from_url

        client = redis_from_url(self.url, cluster=True)
        try:
            return client.get_node_from_key(key).port
        finally:
            client.close()

    def wait_failover(self, dead: int, timeout: float = 30.0) -> float:
        """Seconds until a live node's slot map no longer names ``dead`` as a master (its replica took over)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                port = next(iter(self.processes))
                slots = redis.Redis(port=port, socket_timeout=1).execute_command("CLUSTER SLOTS")
                owners = {int(entry[2][1]) for entry in slots}
                if dead not in owners and sum(int(e[1]) - int(e[0]) + 1 for e in slots) == 16384:
                    return time.monotonic() - started
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"no replica took over the slots of {dead}")

    def replica_of(self, master: int) -> int:
        """The port of a replica of the master on ``master``."""
        role = redis.Redis(port=master, socket_timeout=1).execute_command("ROLE")
        return int(role[2][0][1])

    def pause(self, port: int) -> None:
        """SIGSTOP a node: its connections stay open but it answers nothing (a stalled replica)."""
        self.processes[port].send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self.processes[port].send_signal(signal.SIGCONT)

    def node_id(self, port: int) -> str:
        return redis.Redis(port=port, socket_timeout=1, decode_responses=True).execute_command("CLUSTER MYID")

    def reshard(self, source: int, target: int, slots: int) -> None:
        """Move ``slots`` slots (and their keys) from the master on ``source`` to the one on ``target``."""
        subprocess.run(
            [self.cli, "--cluster", "reshard", f"127.0.0.1:{target}", "--cluster-from", self.node_id(source),
             "--cluster-to", self.node_id(target), "--cluster-slots", str(slots), "--cluster-yes"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip

    def kill(self, port: int) -> None:
        """SIGKILL one node (no shutdown, no AOF flush beyond what it already wrote)."""
        process = self.processes.pop(port)
        process.kill()
        process.wait(10)

    def stop(self) -> None:
        """SIGTERM every node; one still up after 15 s is killed (a master waits up to its
        ``shutdown-timeout``, 10 s, for a lagging replica, e.g. right after a reshard)."""
        for process in self.processes.values():
            process.terminate()
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.processes.clear()

"""A Redis Sentinel group for tests: one master, replicas, three sentinels, all real `redis-server` processes.

Debian's redis-server runs a sentinel as `redis-server <conf> --sentinel` (`redis-sentinel` is the same binary
and may not be on PATH). The sentinels' timings (`down-after-milliseconds`, `failover-timeout`) are short:
they are test infrastructure, what the test's operator chose, not an irlive setting.

`SentinelStack` is the local stack with its clients and workers pointed at the group: its `env` carries the
`sentinel://` URL, and its `redis_url` (what the invariant checks and run polling read) is whichever node
the sentinels name master at the moment. The base stack's own Redis still starts and is left unused.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.sentinel import Sentinel

from sandbox import procs
from sandbox.procs import Proc, wait_until
from sandbox.stack import Stack
from worker.seams.store import close_sentinel

MASTER_NAME = "irlive"
START_TIMEOUT_S = 30.0
FAILOVER_TIMEOUT_S = 30.0


@dataclass
class Node:
    """One redis-server process (a data node or a sentinel) on 127.0.0.1:port."""

    port: int
    proc: Proc | None
    log: Path
    dir: Path

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return procs.no_retry_redis(self.port, timeout)


class SentinelGroup:
    """Start with `with SentinelGroup(dir) as group:`; the data nodes run as the stack runs its Redis (AOF with
    fsync always, noeviction), so a restarted node comes back with what it had."""

    def __init__(self, workdir: Path, *, replicas: int = 1, sentinels: int = 3, quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        self.workdir = workdir
        self._replicas = replicas
        self._sentinel_count = sentinels
        self._quorum = quorum
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self.nodes: dict[int, Node] = {}
        self.sentinels: list[Node] = []
        self._last_master: tuple[str, int] | None = None
        self._discovery: Any = None

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> SentinelGroup:
        try:
            master = self._start_node(procs.free_port(), replica_of=None)
            self._last_master = ("127.0.0.1", master.port)
            for _ in range(self._replicas):
                self._start_node(procs.free_port(), replica_of=master.port)
            for node in self.nodes.values():
                self._await_node(node)
            for port in self.nodes:
                if port != master.port:
                    self.await_replica_synced(port)
            for i in range(self._sentinel_count):
                self._start_sentinel(i, procs.free_port(), master.port)
            for s in self.sentinels:
                self._await_sentinel(s)
            self._discovery = Sentinel([("127.0.0.1", s.port) for s in self.sentinels],  # type: ignore[no-untyped-call]
                                       sentinel_kwargs={"socket_timeout": 1.0, "socket_connect_timeout": 1.0})
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        running = [n.proc for n in [*self.sentinels, *self.nodes.values()] if n.proc is not None]
        procs.stop_groups(running, timeout=5.0)
        if self._discovery is not None:
            close_sentinel(self._discovery)
            self._discovery = None

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # ---- what clients use --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"sentinel://{hosts}/0?master_name={MASTER_NAME}"

    def master(self) -> tuple[str, int]:
        """The master the sentinels name now; the last one known while none can say (mid-failover)."""
        try:
            host, port = self._discovery.discover_master(MASTER_NAME)
            self._last_master = (str(host), int(port))
        except (redis.RedisError, AttributeError):
            pass
        assert self._last_master is not None
        return self._last_master

    def master_port(self) -> int:
        return self.master()[1]

    # ---- faults ------------------------------------------------------------------------------------------

    def offsets(self) -> dict[int, int]:
        """Replication offset of each live data node (the master's: what it wrote; a replica's: what it has)."""
        found: dict[int, int] = {}
        for port, node in self.nodes.items():
            if not node.alive():
                continue
            client = node.client()
            try:
                info = client.info("replication")
                key = "master_repl_offset" if info.get("role") == "master" else "slave_repl_offset"
                found[port] = int(info.get(key, 0))
            except redis.RedisError:
                continue
            finally:
                client.close()
        return found

    def kill_master(self) -> int:
        """SIGKILL the master's process group (a crash: nothing more reaches its replicas); its port."""
        port = self.master_port()
        node = self.nodes[port]
        assert node.proc is not None, f"the master on {port} is not running"
        procs.kill_group(node.proc, signal.SIGKILL)
        node.proc = None
        return port

    def promoted(self, old_port: int) -> int | None:
        """The new master's port once the sentinels name one other than `old_port` and it answers as master."""
        port = self.master_port()
        if port == old_port:
            return None
        client = self.nodes[port].client()
        try:
            role: Any = client.role()
        except redis.RedisError:
            return None
        finally:
            client.close()
        return port if role and _text(role[0]) == "master" else None

    def await_failover(self, old_port: int, timeout: float = FAILOVER_TIMEOUT_S) -> int:
        found: list[int] = []

        def done() -> bool:
            port = self.promoted(old_port)
            if port is not None:
                found.append(port)
            return bool(found)

        wait_until(done, timeout, f"sentinel failover away from 127.0.0.1:{old_port}",
                   log=self.sentinels[0].log, interval=0.1)
        return found[0]

    def rejoin(self, port: int) -> None:
        """Start a killed node again as a replica of the current master (as an operator would; started as a
        master it would take writes until the sentinels demote it)."""
        node = self.nodes[port]
        if node.alive():
            raise RuntimeError(f"node {port} is running")
        self._start_node(port, replica_of=self.master_port())
        self._await_node(self.nodes[port])
        self.await_replica_synced(port)

        def listed() -> bool:  # the next failover needs a replica the sentinels see as up
            try:
                return ("127.0.0.1", port) in self._discovery.discover_slaves(MASTER_NAME)
            except redis.RedisError:
                return False

        wait_until(listed, START_TIMEOUT_S, f"sentinels list replica 127.0.0.1:{port}", log=self.sentinels[0].log,
                   interval=0.1)

    def await_replica_synced(self, port: int, timeout: float = START_TIMEOUT_S) -> None:
        node = self.nodes[port]

        def synced() -> bool:
            client = node.client()
            try:
                info = client.info("replication")
            except redis.RedisError:
                return False
            finally:
                client.close()
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        wait_until(synced, timeout, f"replica 127.0.0.1:{port} in sync", log=node.log, proc=node.proc)

    def switches(self) -> int:
        """Failovers so far, as the first sentinel saw them (also those no test asked for: a sentinel that
        could not reach a new master within down-after-milliseconds fails it over again)."""
        try:
            return self.sentinels[0].log.read_text(errors="replace").count("+switch-master")
        except OSError:
            return 0

    def sentinel_logs(self, lines: int = 30) -> str:
        return "".join("\n" + procs.log_tail(s.log, lines) for s in self.sentinels)

    # ---- processes -------------------------------------------------------------------------------------

    def _start_node(self, port: int, replica_of: int | None) -> Node:
        data = self.workdir / f"redis-{port}"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [
            procs.find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--maxmemory-policy", "noeviction",
            "--dir", str(data),
            # A replica's first sync starts at once rather than after Redis's default 5 s gathering delay.
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if replica_of is not None:
            cmd += ["--replicaof", "127.0.0.1", str(replica_of)]
        log = self.workdir / f"redis-{port}.log"
        node = Node(port, procs.spawn(cmd, log), log, data)
        self.nodes[port] = node
        return node

    def _await_node(self, node: Node) -> None:
        wait_until(lambda: procs.redis_pings(node.port), START_TIMEOUT_S, f"redis on 127.0.0.1:{node.port}",
                   log=node.log, proc=node.proc)

    def _start_sentinel(self, i: int, port: int, master_port: int) -> None:
        data = self.workdir / f"sentinel-{i}"
        data.mkdir(parents=True, exist_ok=True)
        conf = data / "sentinel.conf"  # the sentinel rewrites it with what it learns
        conf.write_text("\n".join([
            f"port {port}", "bind 127.0.0.1", f"dir {data}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {self._quorum}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {self._down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} {self._failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]) + "\n")
        log = self.workdir / f"sentinel-{i}.log"
        self.sentinels.append(Node(port, procs.spawn([procs.find_redis_server(), str(conf), "--sentinel"], log),
                                   log, data))

    def _await_sentinel(self, node: Node) -> None:
        others = self._sentinel_count - 1

        def knows_all() -> bool:
            client = node.client()
            try:
                state = client.sentinel_master(MASTER_NAME)
            except redis.RedisError:
                return False
            finally:
                client.close()
            return isinstance(state, dict) and int(state.get("num-slaves", 0)) >= self._replicas and \
                int(state.get("num-other-sentinels", 0)) >= others

        wait_until(knows_all, START_TIMEOUT_S, f"sentinel on 127.0.0.1:{node.port} sees the group",
                   log=node.log, proc=node.proc, interval=0.1)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SentinelStack(Stack):
    """The local stack, with workers and the CLI on the group's sentinel URL and checks on its master."""

    def __init__(self, group: SentinelGroup, workdir: Path, *, settings_env: Mapping[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(workdir, settings_env=settings_env, **kwargs)
        self.group = group

    @property
    def redis_url(self) -> str:
        host, port = self.group.master()
        return f"redis://{host}:{port}/0"

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, "IRLIVE_REDIS_URL": self.group.url}


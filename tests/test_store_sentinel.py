"""The `sentinel://` URL: parsed once (config), read alike by the Store (redis-py Sentinel) and the broker (kombu),
and the failover window's errors translated to StoreUnavailable. No server needed."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from redis import exceptions as rx
from redis.sentinel import MasterNotFoundError, SentinelConnectionPool

from worker.app import broker_url, make_app
from worker.config import SentinelTarget, Settings
from worker.errors import ConfigError, StoreUnavailable
from worker.seams.store import Pipeline, Replication, Store, translate

URL = "sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380,sentinel-c/2?master_name=irlive-main"


def test_a_sentinel_url_names_sentinels_master_and_database() -> None:
    t = SentinelTarget.parse(URL)
    assert t.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-c", 26379))
    assert t.master_name == "irlive-main" and t.db == 2
    assert t.password == "s3cret" and t.username is None and t.sentinel_password is None
    assert (t.wait_replicas, t.wait_timeout_ms) == (1, 500)
    assert "s3cret" not in repr(t) and "s3cret" not in t.where
    assert t.where == "master irlive-main via sentinels 10.0.0.1:26379,10.0.0.2:26380,sentinel-c:26379 db 2"


def test_the_url_options_user_and_ipv6() -> None:
    t = SentinelTarget.parse("sentinel://app:p%40ss@[::1]:5000,h2/0?master_name=m&sentinel_password=sp"
                             "&wait_replicas=2&wait_timeout_ms=250")
    assert t.sentinels == (("::1", 5000), ("h2", 26379))
    assert (t.username, t.password, t.sentinel_password) == ("app", "p@ss", "sp")
    assert (t.wait_replicas, t.wait_timeout_ms) == (2, 250)
    assert SentinelTarget.parse("sentinel://h?master_name=m").db == 0
    assert SentinelTarget.parse("sentinel://h/0?master_name=m&wait_replicas=0").wait_replicas == 0


@pytest.mark.parametrize(("url", "says"), [
    ("sentinel://h1:26379/0", "master_name"),
    ("sentinel://h1:26379/0?master_name=", "master_name"),
    ("sentinel:///0?master_name=m", "no sentinel"),
    ("sentinel://h1:port/0?master_name=m", "port"),
    ("sentinel://h1:99999/0?master_name=m", "port"),
    ("sentinel://h1/zero?master_name=m", "database"),
    ("sentinel://h1/0?master_name=m&mastername=x", "unknown option"),
    ("sentinel://h1/0?master_name=m&wait_replicas=many", "wait_replicas"),
    ("sentinel://h1/0?master_name=m&wait_timeout_ms=0", "wait_timeout_ms"),
])
def test_a_bad_sentinel_url_says_what_is_wrong_and_names_the_setting(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"IRLIVE_REDIS_URL": url.replace("//", "//:hunter2@", 1)})
    assert says in str(err.value) and "IRLIVE_REDIS_URL" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_settings_accept_a_sentinel_url_and_never_show_its_passwords() -> None:
    url = URL + "&sentinel_password=sentpw"
    s = Settings.from_env({"IRLIVE_REDIS_URL": url})
    assert s.redis_url == url
    shown = str(s.public_view())
    assert "s3cret" not in shown and "sentpw" not in shown and "irlive-main" in shown


def test_the_broker_gets_kombus_form_of_the_same_url() -> None:
    broker, options = broker_url(URL + "&sentinel_password=sp")
    assert broker == ("sentinel://:s3cret@10.0.0.1:26379/2;sentinel://:s3cret@10.0.0.2:26380/2;"
                      "sentinel://:s3cret@sentinel-c:26379/2")
    assert options["master_name"] == "irlive-main"
    assert options["sentinel_kwargs"]["password"] == "sp"
    assert broker_url("redis://h:6379/0") == ("redis://h:6379/0", {})
    assert broker_url("sentinel://u:p%2Fw@[::1]:1/0?master_name=m")[0] == "sentinel://u:p%2Fw@[::1]:1/0"


def test_the_celery_app_on_a_sentinel_url_uses_kombus_sentinel_transport() -> None:
    app = make_app(Settings.from_env({"IRLIVE_REDIS_URL": URL}))
    options = app.conf.broker_transport_options
    assert options["master_name"] == "irlive-main"
    assert options["visibility_timeout"] == Settings().visibility_timeout  # the rest is as on redis://
    conn = app.connection_for_write()
    try:
        assert conn.transport_cls == "sentinel"
        assert len(conn.alt) == 3 and conn.transport_options["master_name"] == "irlive-main"
    finally:
        conn.release()


def test_the_store_on_a_sentinel_url_asks_the_sentinels_for_its_master() -> None:
    store = Store.from_url(URL, socket_timeout=3)  # builds without connecting
    try:
        pool = store.client.connection_pool
        assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "irlive-main"
        assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "s3cret"
        assert store.where.startswith("master irlive-main via sentinels")
        assert store.replication is not None and store.replication.replicas == 1
    finally:
        store.close()
    assert Store.from_url(URL + "&wait_replicas=0").replication is None
    assert Store.from_url("redis://127.0.0.1:1/0").replication is None


@pytest.mark.parametrize("exc", [
    MasterNotFoundError("No master found for 'irlive'"),  # mid-failover: no sentinel names a healthy master
    rx.ConnectionError("The previous master is now a slave"),  # redis-py's answer to READONLY from a demoted one
    rx.ReadOnlyError("You can't write against a read only replica."),
    rx.BusyLoadingError("Redis is loading the dataset in memory"),  # a promoted or restarted node
    rx.ResponseError("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
    rx.ResponseError("NOREPLICAS Not enough good replicas to write."),  # min-replicas-to-write
    rx.ResponseError("Error running script (call to f_1): @user_script:3: -READONLY You can't write against a "
                     "read only replica."),
])
def test_the_failover_window_is_store_unavailable(exc: rx.RedisError) -> None:
    assert type(translate(exc)) is StoreUnavailable


class _Pipe:
    """Stands in for a non-transactional redis-py pipeline: what was queued, and a WAIT answering `acked`."""

    def __init__(self, acked: int) -> None:
        self.acked = acked
        self.commands: list[tuple[Any, ...]] = [("HSET", "k", "f", "v")]

    def execute_command(self, *args: Any) -> _Pipe:
        self.commands.append(args)
        return self

    def execute(self) -> list[Any]:
        return [1 if c[0] != "WAIT" else self.acked for c in self.commands]


def test_each_write_waits_for_its_replicas_on_its_own_connection() -> None:
    replication = Replication(1, 500)
    pipe = _Pipe(acked=1)
    assert replication.execute(pipe) == [1]
    assert pipe.commands[-1] == ("WAIT", 1, 500) and replication.short == 0


def test_a_write_no_replica_acknowledged_is_in_doubt_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    replication = Replication(1, 500)
    with caplog.at_level(logging.WARNING, logger="irlive.store"):
        for _ in range(3):
            with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
                replication.execute(_Pipe(acked=0))
    assert replication.short == 3
    assert caplog.text.count("replicas wanted") == 1


class _Queue(_Pipe):
    """A redis-py pipeline with no replica answering: a WAIT after its commands reports 0."""

    transaction = False

    def __init__(self) -> None:
        super().__init__(acked=0)
        self.commands = []

    def __len__(self) -> int:
        return len(self.commands)

    def hgetall(self, key: str) -> None:
        self.commands.append(("HGETALL", key))

    def hset(self, key: str, field: str, value: str) -> None:
        self.commands.append(("HSET", key, field, value))


def test_a_pipeline_of_reads_waits_for_no_replica_and_one_with_a_write_does() -> None:
    reads = _Queue()
    assert Pipeline(reads, Replication(1, 500)).hgetall("a").hgetall("b").execute() == [1, 1]
    assert all(c[0] != "WAIT" for c in reads.commands)
    writes = _Queue()
    with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
        Pipeline(writes, Replication(1, 500)).hgetall("a").hset("a", "f", "v").execute()
    assert writes.commands[-1] == ("WAIT", 1, 500)

"""The harness itself, proved against real coturn and Redis.

If these pass, a later test that says "coturn accepted icegate's credential" can be trusted:
coturn here accepts exactly the credentials the TURN REST scheme says it should and refuses
the rest. Credentials are computed in this file with Python's hmac, independently of icegate.

A successful `turnutils_uclient` run takes about five seconds (the client paces its own
traffic), a refused one a few milliseconds, so successes run concurrently where a test has
several.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import socket
import time

import pytest

from harness.coturn import redis_secret_key, rest_credential
from harness.ports import reserve_relay_range
from harness.pytest_plugin import CoturnFactory, require_binaries
from harness.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)

REALM = "harness.test"


def sign(secret: str, username: str) -> str:
    """base64(HMAC-SHA1(secret, username)), the password coturn expects."""
    return base64.b64encode(
        hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    ).decode()


def fresh_username(user: str = "alice", ttl: int = 600) -> str:
    return f"{int(time.time()) + ttl}:{user}"


def test_rest_credential_matches_the_published_test_vectors() -> None:
    assert rest_credential("north", "mbzrxpgjys", 1266890800) == (
        "1266890800:mbzrxpgjys", "nbRcrnq5h6xXhyNhlwk+lDLvVVo=")
    assert sign("foobar", "1599491771") == "Tpz/nKkyvX/vMSLKvL4sbtBt8Vs="


@pytest.mark.coturn
def test_credential_signed_with_the_secret_allocates(coturn_factory: CoturnFactory) -> None:
    coturn = coturn_factory(["s3cret"], realm=REALM)
    username = fresh_username()

    result = coturn.allocate(username, sign("s3cret", username))

    assert result.ok, result.output
    assert result.exit_code == 0
    assert "Total lost packets 0" in result.output


@pytest.mark.coturn
def test_wrong_secret_tampered_password_and_expired_username_are_refused(
    coturn_factory: CoturnFactory,
) -> None:
    coturn = coturn_factory(["s3cret"], realm=REALM)
    username = fresh_username()
    good = sign("s3cret", username)
    tampered = ("B" if good[0] == "A" else "A") + good[1:]
    expired = f"{int(time.time()) - 5}:alice"

    attempts = {
        "wrong secret": (username, sign("not-the-secret", username)),
        "tampered password": (username, tampered),
        "expired username": (expired, sign("s3cret", expired)),
        "username changed after signing": (fresh_username("mallory"), good),
    }
    for what, (user, password) in attempts.items():
        result = coturn.allocate(user, password)
        assert not result.ok, what
        assert result.exit_code == 255, (what, result.output)
        assert "Cannot complete Allocation" in result.output, what


@pytest.mark.coturn
def test_both_secrets_allocate_and_restart_swaps_them(coturn_factory: CoturnFactory) -> None:
    coturn = coturn_factory(["new", "old"], realm=REALM)
    username = fresh_username()

    by_new, by_old = coturn.allocate_each(
        [(username, sign("new", username)), (username, sign("old", username))])
    assert by_new.ok, by_new.output
    assert by_old.ok, by_old.output

    coturn.restart(secrets=["newer", "new"])
    by_old, by_newer = coturn.allocate_each(
        [(username, sign("old", username)), (username, sign("newer", username))])
    assert by_old.exit_code == 255
    assert by_newer.ok, by_newer.output


@pytest.mark.coturn
@pytest.mark.redis
def test_coturn_follows_secrets_in_redis_without_restart(
    coturn_factory: CoturnFactory, redis_server: RedisServer,
) -> None:
    coturn = coturn_factory(realm=REALM, redis_port=redis_server.port)
    key = redis_secret_key(REALM)
    username = fresh_username()
    password = sign("from-redis", username)

    assert coturn.allocate(username, password).exit_code == 255

    redis_server.command("SADD", key, "from-redis")
    added = coturn.allocate(username, password)
    assert added.ok, added.output

    redis_server.command("SREM", key, "from-redis")
    assert coturn.allocate(username, password).exit_code == 255


@pytest.mark.redis
@pytest.mark.parametrize("appendonly", [True, False], ids=["appendonly", "rdb"])
def test_redis_restart_keeps_data_and_url(appendonly: bool) -> None:
    require_binaries("redis-server")
    with RedisServer(appendonly=appendonly) as redis:
        url = redis.url
        redis.command("SET", "greeting", "hello")
        redis.command("SADD", "set", "a", "b")

        redis.restart()

        assert redis.url == url
        assert redis.command("GET", "greeting") == b"hello"
        assert redis.command("SCARD", "set") == 2
        assert redis.command("SISMEMBER", "set", "b") == 1


@pytest.mark.redis
def test_redis_kill_keeps_fsynced_data_with_appendonly(redis_server: RedisServer) -> None:
    redis_server.command("INCRBY", "counter", 41)
    redis_server.kill()
    assert not redis_server.running
    with pytest.raises(OSError):
        redis_server.command("PING", timeout=0.5)

    redis_server.start()

    assert redis_server.command("INCR", "counter") == 42


@pytest.mark.redis
def test_redis_pause_stops_answers_until_resume(redis_server: RedisServer) -> None:
    redis_server.pause()
    with pytest.raises(socket.timeout):
        redis_server.command("PING", timeout=0.3)

    redis_server.resume()

    assert redis_server.command("PING") == b"PONG"


def test_relay_ranges_held_at_once_never_overlap() -> None:
    ranges = [reserve_relay_range() for _ in range(20)]
    try:
        spans = sorted((r.min_port, r.max_port) for r in ranges)
        for (_, previous_max), (next_min, _) in itertools.pairwise(spans):
            assert next_min > previous_max
    finally:
        for held in ranges:
            held.release()

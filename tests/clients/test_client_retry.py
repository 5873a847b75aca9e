"""Retries with backoff on 429, 503 and refused connections, honouring Retry-After.

The ``sleeps`` fixture records each wait instead of sleeping and fixes the jitter at 0.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from email.utils import format_datetime

import httpx
import pytest

from clients.client import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AsyncMatloraClient,
    MatloraClient,
    OverloadedError,
    RetryPolicy,
    ServerError,
)
from clients.retry import parse_retry_after


def make_client(server, **policy) -> MatloraClient:
    http = httpx.Client(transport=server.transport)
    return MatloraClient("http://matlora.test", http_client=http, retry=RetryPolicy(**policy))


def overloaded(server, status=429, retry_after=None):
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return server.error_reply(status, "queue full", headers=headers)


def test_policy_backoff_doubles_to_cap():
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=3.0, jitter=0.5)
    assert [policy.backoff(attempt, 0.0) for attempt in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_policy_jitter_shortens_backoff():
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=8.0, jitter=0.5)
    assert policy.backoff(2, 0.5) == 1.5
    assert policy.backoff(2, 0.999) == pytest.approx(1.001)


def test_policy_retry_after_plus_jitter():
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=8.0, jitter=0.5)
    assert policy.next_delay(1, 0.0, retry_after=3.0, random_fraction=0.0) == 3.0
    assert policy.next_delay(1, 0.0, retry_after=3.0, random_fraction=0.5) == 3.125
    assert policy.next_delay(3, 0.0, retry_after=0.1, random_fraction=0.5) == 0.6


def test_policy_stops_at_max_attempts():
    policy = RetryPolicy(max_attempts=3)
    assert policy.next_delay(2, 0.0, None, 0.0) == 1.0
    assert policy.next_delay(3, 0.0, None, 0.0) is None


def test_policy_stops_at_max_wait():
    policy = RetryPolicy(max_attempts=10, max_wait=5.0)
    assert policy.next_delay(1, 4.5, None, 0.0) == 0.5
    assert policy.next_delay(1, 4.6, None, 0.0) is None
    assert policy.next_delay(1, 0.0, retry_after=6.0, random_fraction=0.0) is None


def test_policy_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"max_attempts=0 .*jitter=2"):
        RetryPolicy(max_attempts=0, jitter=2)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("3", 3.0), ("0.5", 0.5), (" 10 ", 10.0), ("-1", None), ("soon", None), ("nan", None), (None, None)],
)
def test_parse_retry_after_seconds(header, expected):
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date():
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    later = format_datetime(datetime(2025, 1, 1, 12, 0, 7, tzinfo=timezone.utc), usegmt=True)
    earlier = format_datetime(datetime(2025, 1, 1, 11, 0, 0, tzinfo=timezone.utc), usegmt=True)
    assert parse_retry_after(later, now=now.timestamp()) == 7.0
    assert parse_retry_after(earlier, now=now.timestamp()) == 0.0


def test_retries_429_then_succeeds(server, sleeps):
    server.replies = [overloaded(server), overloaded(server, 503)]
    with make_client(server, initial_backoff=0.5) as client:
        result = client.generate("hi")
    assert result.text == "85"
    assert len(server.requests) == 3
    assert sleeps == [0.5, 1.0]


def test_retry_honours_retry_after(server, sleeps):
    server.replies = [overloaded(server, retry_after="4"), overloaded(server, 503, retry_after="2")]
    with make_client(server, initial_backoff=0.5, max_wait=30) as client:
        client.generate("hi")
    assert sleeps == [4.0, 2.0]


def test_retry_sends_same_body(server, sleeps):
    server.replies = [overloaded(server)]
    with make_client(server) as client:
        client.generate("hi", rank=8, seed=1)
    first, second = server.json_bodies()
    assert first == second == {"prompt": "hi", "rank": 8, "seed": 1}


def test_retry_gives_up_after_max_attempts(server, sleeps):
    server.default = overloaded(server, 503, retry_after="1")
    with make_client(server, max_attempts=3, initial_backoff=0.5) as client, pytest.raises(OverloadedError) as caught:
        client.generate("hi")
    assert len(server.requests) == 3
    assert sleeps == [1.0, 1.0]
    assert caught.value.status_code == 503
    assert caught.value.retry_after == 1.0


def test_retry_after_over_max_wait(server, sleeps):
    server.default = overloaded(server, retry_after="60")
    with make_client(server, max_wait=10) as client, pytest.raises(OverloadedError):
        client.generate("hi")
    assert len(server.requests) == 1
    assert sleeps == []


def test_retry_total_wait_bounded(server, sleeps):
    server.default = overloaded(server)
    with make_client(server, max_attempts=100, initial_backoff=1, max_backoff=4, max_wait=10) as client:
        with pytest.raises(OverloadedError):
            client.generate("hi")
    assert sleeps == [1, 2, 4]
    assert len(server.requests) == 4


def test_retries_connect_error(server, sleeps):
    server.replies = [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow")]
    with make_client(server, initial_backoff=0.25) as client:
        assert client.generate("hi").text == "85"
    assert sleeps == [0.25, 0.5]


@pytest.mark.parametrize(
    "exception",
    [httpx.ReadTimeout("read"), httpx.RemoteProtocolError("server hung up"), httpx.ReadError("reset")],
)
def test_no_retry_after_request_sent(server, sleeps, exception):
    server.replies = [exception]
    with make_client(server) as client, pytest.raises(APIConnectionError):
        client.generate("hi")
    assert len(server.requests) == 1
    assert sleeps == []


def test_read_timeout_is_timeout_error(server, sleeps):
    server.replies = [httpx.ReadTimeout("read")]
    with make_client(server) as client, pytest.raises(APITimeoutError):
        client.generate("hi")


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422, 500, 502])
def test_no_retry_on_other_statuses(server, sleeps, status):
    server.default = server.error_reply(status, "failed")
    with make_client(server) as client, pytest.raises(APIError) as caught:
        client.generate("hi")
    assert caught.value.status_code == status
    assert len(server.requests) == 1


def test_no_retry_when_disabled(server, sleeps):
    server.default = overloaded(server)
    with make_client(server, max_attempts=1) as client, pytest.raises(OverloadedError):
        client.generate("hi")
    assert len(server.requests) == 1


def test_health_probe_not_retried(server, sleeps):
    server.replies = [httpx.ConnectError("refused")]
    with make_client(server) as client, pytest.raises(APIConnectionError):
        client.health()
    assert sleeps == []


def test_stream_retried_before_it_starts(server, sleeps):
    done = {"type": "done", **server.generate_body()}
    server.replies = [overloaded(server, retry_after="1"), server.sse_reply([{"type": "token", "text": "85"}, done])]
    with make_client(server) as client, client.generate_stream("hi") as stream:
        result = stream.until_done()
    assert result.text == "85"
    assert sleeps == [1.0]


def test_async_retry_honours_retry_after(server, sleeps):
    server.replies = [overloaded(server, retry_after="3"), httpx.ConnectError("refused"), overloaded(server, 503)]

    async def main():
        http = httpx.AsyncClient(transport=server.transport)
        policy = RetryPolicy(initial_backoff=0.5, max_wait=30)
        async with AsyncMatloraClient("http://matlora.test", http_client=http, retry=policy) as client:
            return await client.generate("hi")

    assert asyncio.run(main()).text == "85"
    assert sleeps == [3.0, 1.0, 2.0]


def test_async_no_retry_on_server_error(server, sleeps):
    server.default = server.error_reply(500, "generation failed")

    async def main():
        http = httpx.AsyncClient(transport=server.transport)
        async with AsyncMatloraClient("http://matlora.test", http_client=http) as client:
            await client.generate("hi")

    with pytest.raises(ServerError, match="generation failed"):
        asyncio.run(main())
    assert len(server.requests) == 1

"""MatloraClient and AsyncMatloraClient against a scripted server: requests, results, errors."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from clients.client import (
    AdapterNotFoundError,
    APIConnectionError,
    APIError,
    APITimeoutError,
    AsyncMatloraClient,
    AuthenticationError,
    GenerateResult,
    InvalidRequestError,
    InvalidResponseError,
    MatloraClient,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RetryPolicy,
    ServerError,
    Usage,
    build_generate_body,
)

NO_RETRY = RetryPolicy(max_attempts=1)


def make_client(server, **kwargs) -> MatloraClient:
    kwargs.setdefault("retry", NO_RETRY)
    return MatloraClient("http://matlora.test/", http_client=httpx.Client(transport=server.transport), **kwargs)


def make_async_client(server, **kwargs) -> AsyncMatloraClient:
    kwargs.setdefault("retry", NO_RETRY)
    http = httpx.AsyncClient(transport=server.transport)
    return AsyncMatloraClient("http://matlora.test", http_client=http, **kwargs)


def test_generate_body_omits_unset_fields():
    assert build_generate_body("hi") == {"prompt": "hi"}


def test_generate_body_all_fields():
    body = build_generate_body(
        "hi",
        rank="auto",
        adapter="arith",
        max_new_tokens=16,
        temperature=0.0,
        top_p=0.9,
        stop=["\n", "."],
        seed=3,
        stream=True,
    )
    assert body == {
        "prompt": "hi",
        "rank": "auto",
        "adapter": "arith",
        "max_new_tokens": 16,
        "temperature": 0.0,
        "top_p": 0.9,
        "stop": ["\n", "."],
        "seed": 3,
        "stream": True,
    }


def test_generate_body_rank_zero_kept():
    assert build_generate_body("hi", rank=0)["rank"] == 0


def test_generate_body_single_stop_string():
    assert build_generate_body("hi", stop="\n")["stop"] == ["\n"]


def test_generate_request(server):
    with make_client(server) as client:
        client.generate("What is 47 plus 38?", rank=8, max_new_tokens=4, temperature=0)

    (request,) = server.requests
    assert request.method == "POST"
    assert str(request.url) == "http://matlora.test/generate"
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers
    assert json.loads(request.content) == {
        "prompt": "What is 47 plus 38?",
        "rank": 8,
        "max_new_tokens": 4,
        "temperature": 0,
    }


def test_bearer_token_sent(server):
    with make_client(server, api_key="s3cret") as client:
        client.generate("hi")
    assert server.requests[0].headers["authorization"] == "Bearer s3cret"


def test_bearer_token_from_environment(server, monkeypatch):
    monkeypatch.setenv("MATLORA_API_KEY", "from-env")
    with make_client(server) as client:
        client.generate("hi")
    assert server.requests[0].headers["authorization"] == "Bearer from-env"


def test_generate_result_parsed(server):
    server.default = server.json_reply(
        200, server.generate_body(text="85", rank=4), {"x-request-id": "abc", "x-matlora-rank": "4"}
    )
    with make_client(server) as client:
        result = client.generate("What is 47 plus 38?", rank="auto")

    assert result == GenerateResult(
        id="req-1",
        text="85",
        rank=4,
        adapter="arith",
        finish_reason="stop",
        usage=Usage(prompt_tokens=7, completion_tokens=2),
        request_id="abc",
    )
    assert result.headers["x-matlora-rank"] == "4"


def test_generate_result_missing_field(server):
    body = server.generate_body()
    del body["usage"]
    server.default = server.json_reply(200, body)
    with make_client(server) as client, pytest.raises(InvalidResponseError, match="usage"):
        client.generate("hi")


def test_generate_result_not_json(server):
    server.default = httpx.Response(200, text="<html>gateway</html>")
    with make_client(server) as client, pytest.raises(InvalidResponseError, match="not JSON"):
        client.generate("hi")


def test_invalid_request_error_fields(server):
    server.default = server.error_reply(
        422, "rank out of range", type="invalid_request", field="rank", value=99, allowed="0..16"
    )
    with make_client(server) as client, pytest.raises(InvalidRequestError) as caught:
        client.generate("hi", rank=99)

    error = caught.value
    assert error.status_code == 422
    assert error.type == "invalid_request"
    assert error.field == "rank"
    assert error.value == 99
    assert error.allowed == "0..16"
    assert error.request_id == "req-1"
    assert str(error) == "HTTP 422: rank out of range field='rank' value=99 allowed='0..16' request_id=req-1"


def test_fastapi_validation_body_read(server):
    detail = [{"type": "int_parsing", "loc": ["body", "max_new_tokens"], "msg": "not an integer", "input": "x"}]
    server.default = server.json_reply(422, {"detail": detail})
    with make_client(server) as client, pytest.raises(InvalidRequestError) as caught:
        client.generate("hi")
    assert caught.value.field == "max_new_tokens"
    assert caught.value.value == "x"
    assert caught.value.message == "not an integer"


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, InvalidRequestError),
        (401, AuthenticationError),
        (404, NotFoundError),
        (413, PayloadTooLargeError),
        (429, OverloadedError),
        (503, OverloadedError),
        (500, ServerError),
        (502, ServerError),
        (418, APIError),
    ],
)
def test_status_maps_to_error_class(server, status, error_class):
    server.default = server.error_reply(status, "failed")
    with make_client(server) as client, pytest.raises(error_class) as caught:
        client.generate("hi")
    assert type(caught.value) is error_class
    assert caught.value.status_code == status


def test_unknown_adapter_lists_loaded(server):
    server.default = server.error_reply(
        404, "adapter 'math' is not loaded", field="adapter", value="math", allowed=["arith"]
    )
    with make_client(server) as client, pytest.raises(AdapterNotFoundError) as caught:
        client.generate("hi", adapter="math")
    assert caught.value.loaded_adapters == ["arith"]
    assert caught.value.value == "math"


def test_overloaded_error_retry_after(server):
    server.default = server.error_reply(429, "queue full", headers={"retry-after": "2"})
    with make_client(server) as client, pytest.raises(OverloadedError) as caught:
        client.generate("hi")
    assert caught.value.retry_after == 2.0


def test_error_body_not_json(server):
    server.default = httpx.Response(502, text="Bad Gateway", headers={"x-request-id": "gw-1"})
    with make_client(server) as client, pytest.raises(ServerError) as caught:
        client.generate("hi")
    assert caught.value.message == "Bad Gateway"
    assert caught.value.request_id == "gw-1"


def test_connection_error(server):
    server.default = httpx.ConnectError("connection refused")
    with make_client(server) as client, pytest.raises(APIConnectionError, match="connection refused"):
        client.generate("hi")


def test_read_timeout_error(server):
    server.default = httpx.ReadTimeout("")
    with make_client(server) as client, pytest.raises(APITimeoutError) as caught:
        client.generate("hi")
    assert str(caught.value) == "ReadTimeout on POST http://matlora.test/generate: timed out"


def test_timeout_sent_per_request(server):
    seen = []

    def reply(request):
        seen.append(request.extensions["timeout"])
        return server.json_reply(200, server.generate_body())

    server.default = reply
    with make_client(server, timeout=httpx.Timeout(30.0, connect=2.0)) as client:
        client.generate("hi")
        client.generate("hi", timeout=5.0)
    assert seen == [
        {"connect": 2.0, "read": 30.0, "write": 30.0, "pool": 30.0},
        {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0},
    ]


def test_list_models(server):
    data = [{"id": "arith", "object": "model", "ranks": [0, 1, 2, 4, 8]}, {"id": "arith@8", "object": "model"}]
    server.default = server.json_reply(200, {"object": "list", "data": data})
    with make_client(server) as client:
        models = client.list_models()

    assert str(server.requests[0].url) == "http://matlora.test/v1/models"
    assert [model.id for model in models] == ["arith", "arith@8"]
    assert models[0].ranks == (0, 1, 2, 4, 8)
    assert models[0].rank is None
    assert models[1].adapter == "arith"
    assert models[1].rank == 8


def test_health_and_ready(server):
    server.replies = [server.json_reply(200, {"status": "ok"}), server.json_reply(503, {"status": "draining"})]
    with make_client(server, retry=RetryPolicy()) as client:
        health = client.health()
        ready = client.ready()

    assert [str(request.url) for request in server.requests] == [
        "http://matlora.test/healthz",
        "http://matlora.test/readyz",
    ]
    assert (health.ok, health.status_code, health.body) == (True, 200, {"status": "ok"})
    assert (ready.ok, ready.status_code, ready.body) == (False, 503, {"status": "draining"})


def test_wait_until_ready(server, monkeypatch):
    monkeypatch.setattr("clients.client.time.sleep", lambda seconds: None)
    server.replies = [httpx.ConnectError("refused"), server.json_reply(503, {}), server.json_reply(200, {})]
    with make_client(server) as client:
        client.wait_until_ready(timeout=60)
    assert len(server.requests) == 3


def test_async_generate(server):
    server.default = server.json_reply(200, server.generate_body(text="85", rank=16))

    async def main():
        async with make_async_client(server, api_key="k") as client:
            return await client.generate("What is 47 plus 38?", rank=16, seed=1)

    result = asyncio.run(main())
    assert result.text == "85"
    assert result.rank == 16
    assert server.requests[0].headers["authorization"] == "Bearer k"
    assert json.loads(server.requests[0].content) == {"prompt": "What is 47 plus 38?", "rank": 16, "seed": 1}


def test_async_errors(server):
    server.default = server.error_reply(401, "missing bearer token")

    async def main():
        async with make_async_client(server) as client:
            await client.generate("hi")

    with pytest.raises(AuthenticationError, match="missing bearer token"):
        asyncio.run(main())


def test_async_list_models_and_ready(server):
    server.replies = [server.json_reply(200, {"data": [{"id": "arith@4"}]}), server.json_reply(200, {})]

    async def main():
        async with make_async_client(server) as client:
            return await client.list_models(), await client.ready()

    models, ready = asyncio.run(main())
    assert [model.id for model in models] == ["arith@4"]
    assert ready.ok


def test_build_body_sends_chat_flag():
    assert build_generate_body("hi", chat=True)["chat"] is True
    assert "chat" not in build_generate_body("hi")


@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_build_body_rejects_non_finite_numbers(field):
    with pytest.raises(ValueError, match=f"{field} must be a finite number, got nan"):
        build_generate_body("hi", **{field: float("nan")})


def test_build_body_rejects_stop_of_wrong_type():
    with pytest.raises(TypeError, match="stop must be a string or a list of strings, got 5"):
        build_generate_body("hi", stop=5)

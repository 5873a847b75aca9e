"""Every rejected input with its exact status and error body; the model is never called for them."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import OTHER_ADAPTER, TINY_ADAPTER, TINY_MAX_RANK, ThreadServer

PROMPT = "1 + 1 ="
TINY_CONTEXT = 512


def body(**fields) -> dict:
    return {"prompt": PROMPT, "adapter": TINY_ADAPTER, "max_new_tokens": 2, **fields}


# (case, request body, field, value, allowed)
INVALID_BODIES = [
    ("rank above max", body(rank=9), "rank", 9, "0..8 or 'auto'"),
    ("negative rank", body(rank=-1), "rank", -1, "0..8 or 'auto'"),
    ("fractional rank", body(rank=2.5), "rank", 2.5, "an integer 0..max rank, or 'auto'"),
    ("rank as text", body(rank="8"), "rank", "8", "an integer 0..max rank, or 'auto'"),
    ("rank as bool", body(rank=True), "rank", True, "an integer 0..max rank, or 'auto'"),
    ("empty prompt", body(prompt=""), "prompt", "", "a non-empty string"),
    ("whitespace prompt", body(prompt=" \n\t "), "prompt", " \n\t ", "a non-empty string"),
    ("prompt over context", body(prompt="x" * TINY_CONTEXT), "prompt", f"{TINY_CONTEXT} tokens", "1..511 tokens"),
    ("zero max_new_tokens", body(max_new_tokens=0), "max_new_tokens", 0, "1..64"),
    ("negative max_new_tokens", body(max_new_tokens=-5), "max_new_tokens", -5, "1..64"),
    ("max_new_tokens over limit", body(max_new_tokens=65), "max_new_tokens", 65, "1..64"),
    ("max_new_tokens over context", body(prompt="x" * 500, max_new_tokens=20), "max_new_tokens", 20, "1..12"),
    ("negative temperature", body(temperature=-0.1), "temperature", -0.1, ">= 0 (0 is greedy)"),
    ("top_p zero", body(top_p=0), "top_p", 0, "0 < top_p <= 1"),
    ("top_p above one", body(top_p=1.5), "top_p", 1.5, "0 < top_p <= 1"),
    ("empty stop string", body(stop=[""]), "stop", [""], "1 to 8 strings of 1 to 256 characters"),
    # Long values come back cut to 200 characters.
    (
        "stop string too long",
        body(stop=["x" * 257]),
        "stop",
        json.dumps(["x" * 257])[:200] + "...",
        "1 to 8 strings of 1 to 256 characters",
    ),
    ("too many stop strings", body(stop=list("abcdefghi")), "stop", list("abcdefghi"), "at most 8 items"),
    ("stop as number", body(stop=5), "stop", 5, "a string, or a list of 1 to 8 strings of 1 to 256 characters"),
    ("chat as text", body(chat="yes"), "chat", "yes", "true or false"),
    ("adapter as number", body(adapter=5), "adapter", 5, "the name of a loaded adapter"),
    ("misspelt field", body(max_tokens=5), "max_tokens", 5, "no such field"),
    ("missing prompt", {"adapter": TINY_ADAPTER}, "prompt", None, "a non-empty string"),
    ("adapter omitted with two loaded", {"prompt": PROMPT}, "adapter", None, [OTHER_ADAPTER, TINY_ADAPTER]),
]


# (case, request body, message): messages name the field and the value in JSON spelling.
INVALID_BODY_MESSAGES = [
    (
        "rank above max",
        body(rank=9),
        "rank is out of range: got 9, allowed 0..8 for adapter 'tiny' (0 is the base model) or 'auto'",
    ),
    ("zero max_new_tokens", body(max_new_tokens=0), "max_new_tokens is out of range: got 0, allowed 1..64"),
    ("top_p zero", body(top_p=0), "top_p is out of range: got 0, allowed 0 < top_p <= 1"),
    ("rank as bool", body(rank=True), "rank must be an integer or 'auto', got true"),
    ("stream as null", body(stream=None), "stream must be true or false, got null"),
    ("seed as text", body(seed="5"), 'seed must be an integer, got "5"'),
    ("stop as number", body(stop=5), "stop must be a string or a list of strings, got 5"),
    ("stop list of numbers", body(stop=[5]), "stop must be a string or a list of strings, got [5]"),
    ("too many stop strings", body(stop=list("abcdefghi")), "stop has 9 items, allowed at most 8 items"),
    ("missing prompt", {"adapter": TINY_ADAPTER}, "prompt is required"),
    ("misspelt field", body(max_tokens=5), "max_tokens is not a known field; check its spelling"),
]

# (JSON literal in the body, how the error echoes it): NaN and infinities as strings, so the body is standard JSON.
NON_FINITE_NUMBERS = [("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"), ("1e309", "Infinity")]

# (case, raw body, message)
UNPARSEABLE_BODIES = [
    (
        "invalid UTF-8",
        b'{"prompt": "\xff"}',
        "the request body is not valid UTF-8: invalid start byte (byte 0xff at offset 12); send JSON encoded as UTF-8",
    ),
    (
        "nested too deep",
        b"[" * 2000 + b"]" * 2000,
        "the request body nests arrays or objects too deeply for the JSON parser; request bodies need only a few "
        "levels of nesting",
    ),
]
JSON_HEADERS = {"content-type": "application/json"}


def strict_json(text: str):
    """Parse standard JSON only: NaN and Infinity, which Python's json module accepts, are errors."""

    def reject(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def wait_for_access_line(caplog: pytest.LogCaptureFixture, request_id: str, timeout: float = 5.0) -> str:
    """Return the access-log line of a request; it is written just after the response is sent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == "matlora.access" and request_id in record.getMessage():
                return record.getMessage()
        time.sleep(0.02)
    raise AssertionError(f"no access-log line for request {request_id}")


@pytest.fixture
def prefill_calls(tiny_server: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every prompt the model runs (its length), to check that rejected requests never reach it."""
    runner = tiny_server.engine.runner
    calls: list[int] = []
    original = runner.prefill

    def counting_prefill(row):
        calls.append(len(row.token_ids))
        return original(row)

    monkeypatch.setattr(runner, "prefill", counting_prefill)
    return calls


@pytest.mark.parametrize(
    ("case", "request_body", "field", "value", "allowed"), INVALID_BODIES, ids=[c[0] for c in INVALID_BODIES]
)
def test_invalid_body_422(
    client: httpx.Client, prefill_calls: list[int], case: str, request_body: dict, field: str, value, allowed
) -> None:
    response = client.post("/generate", json=request_body)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["field"] == field
    assert error["value"] == value
    assert error["allowed"] == allowed
    assert field in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert prefill_calls == []


@pytest.mark.parametrize(
    ("case", "request_body", "message"), INVALID_BODY_MESSAGES, ids=[c[0] for c in INVALID_BODY_MESSAGES]
)
def test_invalid_body_message(client: httpx.Client, case: str, request_body: dict, message: str) -> None:
    response = client.post("/generate", json=request_body)

    assert response.status_code == 422
    assert response.json()["error"]["message"] == message


@pytest.mark.parametrize(("literal", "echoed"), NON_FINITE_NUMBERS)
def test_non_finite_number_echoed_as_string(client: httpx.Client, literal: str, echoed: str) -> None:
    raw = f'{{"prompt": "{PROMPT}", "adapter": "{TINY_ADAPTER}", "temperature": {literal}}}'.encode()

    response = client.post("/generate", content=raw, headers=JSON_HEADERS)

    assert response.status_code == 422
    error = strict_json(response.text)["error"]
    assert error["field"] == "temperature"
    assert error["value"] == echoed
    assert error["allowed"] == ">= 0 (0 is greedy)"
    assert error["message"] == f"temperature must be a finite number, got {echoed}"


@pytest.mark.parametrize(("case", "raw", "message"), UNPARSEABLE_BODIES, ids=[c[0] for c in UNPARSEABLE_BODIES])
def test_unparseable_body_names_reason(
    client: httpx.Client, caplog: pytest.LogCaptureFixture, case: str, raw: bytes, message: str
) -> None:
    caplog.set_level(logging.INFO, logger="matlora.access")

    generate = client.post("/generate", content=raw, headers=JSON_HEADERS)
    completion = client.post("/v1/completions", content=raw, headers=JSON_HEADERS)

    assert generate.status_code == 422
    error = generate.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["field"] == "body"
    assert error["message"] == message
    assert completion.status_code == 400
    assert completion.json()["error"]["param"] == "body"
    assert completion.json()["error"]["message"] == message
    access_line = json.loads(wait_for_access_line(caplog, generate.headers["x-request-id"]))
    assert access_line["status"] == 422
    assert access_line["error"] == message


def test_unknown_adapter_404_lists_loaded(client: httpx.Client, prefill_calls: list[int]) -> None:
    response = client.post("/generate", json=body(adapter="math"))

    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "adapter_not_found"
    assert error["field"] == "adapter"
    assert error["value"] == "math"
    assert error["allowed"] == [OTHER_ADAPTER, TINY_ADAPTER]
    assert f"loaded adapters: {OTHER_ADAPTER}, {TINY_ADAPTER}" in error["message"]
    assert prefill_calls == []


def test_body_not_json_422(client: httpx.Client) -> None:
    response = client.post(
        "/generate", content=b"prompt=hi", headers={"content-type": "application/x-www-form-urlencoded"}
    )

    assert response.status_code == 422
    assert response.json()["error"]["allowed"] == "a JSON object"


def test_body_over_limit_413(client: httpx.Client, prefill_calls: list[int]) -> None:
    response = client.post("/generate", json=body(prompt="x" * 5000))

    assert response.status_code == 413
    error = response.json()["error"]
    assert error["type"] == "payload_too_large"
    assert error["allowed"] == "at most 4096 bytes"
    assert prefill_calls == []


def test_chunked_body_over_limit_413(client: httpx.Client) -> None:
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})

    assert response.status_code == 413
    assert response.json()["error"]["type"] == "payload_too_large"


def test_unknown_route_404(client: httpx.Client) -> None:
    response = client.get("/nope")

    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"


def test_server_keeps_serving_after_errors(client: httpx.Client) -> None:
    for case in INVALID_BODIES:
        client.post("/generate", json=case[1])

    response = client.post("/generate", json=body(rank=TINY_MAX_RANK))

    assert response.status_code == 200


def test_failed_generation_500_with_logged_request_id(
    tiny_server: ThreadServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_prefill(row):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(tiny_server.engine.runner, "prefill", broken_prefill)
    caplog.set_level(logging.INFO, logger="matlora.access")

    response = client.post("/generate", json=body())

    assert response.status_code == 500
    error = response.json()["error"]
    request_id = response.headers["x-request-id"]
    assert error["type"] == "generation_failed"
    assert error["request_id"] == request_id
    assert request_id in error["message"]
    logged = [record for record in caplog.records if request_id in record.getMessage()]
    assert any(record.levelname == "ERROR" and record.exc_info for record in logged)
    access_line = json.loads(wait_for_access_line(caplog, request_id))
    assert access_line["status"] == 500
    assert access_line["adapter"] == TINY_ADAPTER


def test_failed_stream_ends_with_error_event(
    tiny_server: ThreadServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_decode(rows):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(tiny_server.engine.runner, "decode", broken_decode)

    with client.stream("POST", "/generate", json=body(stream=True, max_new_tokens=5)) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]

    assert response.status_code == 200
    assert '"type": "error"' in lines[-1]
    assert response.headers["x-request-id"] in lines[-1]


@pytest.fixture(scope="module")
def small_queue_server(tiny_model_dir: Path, tiny_adapters: dict[str, Path]):
    with ThreadServer(
        base=str(tiny_model_dir),
        adapter=[f"{TINY_ADAPTER}={tiny_adapters[TINY_ADAPTER]}"],
        max_batch_size=1,
        max_queue=1,
        warmup=False,
    ) as server:
        yield server


def test_queue_full_429_with_retry_after(small_queue_server: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = small_queue_server.engine.runner
    decode = runner.decode
    step_started, release = threading.Event(), threading.Event()

    def held_decode(rows):
        step_started.set()
        release.wait(timeout=30)
        return decode(rows)

    monkeypatch.setattr(runner, "decode", held_decode)
    request = {"prompt": PROMPT, "max_new_tokens": 3}
    with httpx.Client(base_url=small_queue_server.url, timeout=60.0) as http, ThreadPoolExecutor(2) as pool:
        running = pool.submit(http.post, "/generate", json=request)
        assert step_started.wait(timeout=30)  # the first request occupies the only batch slot
        queued = pool.submit(http.post, "/generate", json=request)
        while small_queue_server.engine.waiting_count < 1:
            time.sleep(0.01)

        rejected = http.post("/generate", json=request)
        release.set()
        answered = [running.result().status_code, queued.result().status_code]

    assert rejected.status_code == 429
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["type"] == "overloaded"
    assert answered == [200, 200]


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir: Path, tiny_adapters: dict[str, Path]):
    with ThreadServer(
        base=str(tiny_model_dir),
        adapter=[f"{TINY_ADAPTER}={tiny_adapters[TINY_ADAPTER]}"],
        api_key="sesame",
        warmup=False,
    ) as server:
        yield server


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/generate"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
    ],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "sesame", "Basic sesame"])
def test_missing_or_bad_key_401(keyed_server: ThreadServer, method: str, path: str, authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization else {}

    response = httpx.request(method, keyed_server.url + path, json={"prompt": PROMPT}, headers=headers)

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("raw", [b"{not json", b'{"prompt": "\xff"}', b'{"prompt": 5}'], ids=["json", "utf8", "type"])
def test_malformed_body_without_key_401(keyed_server: ThreadServer, path: str, raw: bytes) -> None:
    response = httpx.post(keyed_server.url + path, content=raw, headers=JSON_HEADERS)

    assert response.status_code == 401
    assert response.json()["error"]["message"] == (
        "missing or invalid API key: send the header 'Authorization: Bearer <key>'"
    )


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_need_no_key(keyed_server: ThreadServer, path: str) -> None:
    assert httpx.get(keyed_server.url + path).status_code == 200


def test_right_key_accepted(keyed_server: ThreadServer) -> None:
    headers = {"authorization": "Bearer sesame"}

    generated = httpx.post(
        keyed_server.url + "/generate", json={"prompt": PROMPT, "max_new_tokens": 1}, headers=headers
    )
    scraped = httpx.get(keyed_server.url + "/metrics", headers=headers)

    assert generated.status_code == 200
    assert scraped.status_code == 200


def test_token_choice_failure_fails_only_its_request(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.engine import engine as engine_module

    choose = engine_module.next_token

    def failing_for_marked(logits, params, generator):
        if params.temperature == 0.75:
            raise RuntimeError("simulated sampling failure")
        return choose(logits, params, generator)

    monkeypatch.setattr(engine_module, "next_token", failing_for_marked)
    with ThreadPoolExecutor(2) as pool:
        marked = pool.submit(client.post, "/generate", json=body(temperature=0.75, max_new_tokens=8))
        other = pool.submit(client.post, "/generate", json=body(max_new_tokens=8))

    assert marked.result().status_code == 500
    assert other.result().status_code == 200


def test_lone_surrogate_prompt_422(client: httpx.Client, prefill_calls: list[int]) -> None:
    raw = b'{"prompt": "ab\\ud800cd", "adapter": "tiny"}'  # valid JSON, but not valid Unicode

    response = client.post("/generate", content=raw, headers={"content-type": "application/json"})

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "prompt"
    assert error["message"] == "prompt is not valid Unicode: surrogates not allowed at character 2"
    assert prefill_calls == []


def test_draining_503_logged_at_info(
    tiny_server: ThreadServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tiny_server.app.state.server_state, "draining", True)
    caplog.set_level(logging.INFO, logger="server")

    response = client.post("/generate", json=body())

    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    request_id = response.headers["x-request-id"]
    logged = [
        record for record in caplog.records if record.name == "server.errors" and request_id in record.getMessage()
    ]
    assert [record.levelname for record in logged] == ["INFO"]
    assert logged[0].getMessage() == (
        f"request {request_id} failed: the server is shutting down; retry on another replica"
    )

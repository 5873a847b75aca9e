"""``POST /generate`` on the tiny model: responses, streaming, stop strings and sampling."""

from __future__ import annotations

import json

import httpx
import pytest

from matlora.testing import build_tiny_tokenizer
from tests.server.conftest import OTHER_ADAPTER, TINY_ADAPTER, TINY_MAX_RANK

PROMPT = "The quick brown fox"


def stream_events(client: httpx.Client, body: dict) -> list[dict]:
    with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: ")]


def test_generate_returns_text_and_usage(client: httpx.Client) -> None:
    response = client.post(
        "/generate", json={"prompt": PROMPT, "rank": 4, "adapter": TINY_ADAPTER, "max_new_tokens": 6}
    )

    assert response.status_code == 200
    body = response.json()
    assert body["rank"] == 4
    assert body["adapter"] == TINY_ADAPTER
    assert body["usage"] == {"prompt_tokens": len(PROMPT.encode()), "completion_tokens": 6}
    assert body["finish_reason"] == "length"
    assert isinstance(body["text"], str) and body["text"]
    assert response.headers["x-matlora-rank"] == "4"
    assert response.headers["x-request-id"] == body["id"]


def test_generate_keeps_client_request_id(client: httpx.Client) -> None:
    response = client.post(
        "/generate",
        json={"prompt": PROMPT, "adapter": TINY_ADAPTER, "max_new_tokens": 1},
        headers={"x-request-id": "client-id-42"},
    )

    assert response.headers["x-request-id"] == "client-id-42"
    assert response.json()["id"] == "client-id-42"


def test_generate_rank_policy_max_when_rank_omitted(client: httpx.Client) -> None:
    response = client.post("/generate", json={"prompt": PROMPT, "adapter": TINY_ADAPTER, "max_new_tokens": 1})

    assert response.json()["rank"] == TINY_MAX_RANK
    assert response.headers["x-matlora-rank"] == str(TINY_MAX_RANK)


def test_generate_ranks_give_different_text(client: httpx.Client) -> None:
    texts = {
        rank: client.post(
            "/generate", json={"prompt": PROMPT, "adapter": TINY_ADAPTER, "rank": rank, "max_new_tokens": 12}
        ).json()["text"]
        for rank in (0, 1, TINY_MAX_RANK)
    }

    assert len(set(texts.values())) == 3


def test_generate_stream_matches_whole_answer(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "adapter": TINY_ADAPTER, "rank": 2, "max_new_tokens": 10}
    whole = client.post("/generate", json=body).json()

    events = stream_events(client, body)

    tokens, done = events[:-1], events[-1]
    assert all(event["type"] == "token" for event in tokens)
    assert done["type"] == "done"
    assert "".join(event["text"] for event in tokens) == whole["text"]
    assert done["text"] == whole["text"]
    assert done["rank"] == 2
    assert done["adapter"] == TINY_ADAPTER
    assert done["finish_reason"] == whole["finish_reason"]
    assert done["usage"] == whole["usage"]


def test_generate_stop_string_is_cut(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "adapter": TINY_ADAPTER, "rank": 3, "max_new_tokens": 24}
    full = client.post("/generate", json=body).json()["text"]
    stop = full[5:7]
    expected = full[: full.index(stop)]

    answer = client.post("/generate", json={**body, "stop": [stop]}).json()
    events = stream_events(client, {**body, "stop": [stop]})

    assert answer["text"] == expected
    assert answer["finish_reason"] == "stop"
    assert "".join(event["text"] for event in events[:-1]) == expected
    assert events[-1]["text"] == expected


def test_generate_same_seed_same_sample(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "adapter": TINY_ADAPTER, "max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9}

    first = client.post("/generate", json={**body, "seed": 7}).json()["text"]
    second = client.post("/generate", json={**body, "seed": 7}).json()["text"]
    others = {client.post("/generate", json={**body, "seed": seed}).json()["text"] for seed in (8, 9, 10)}

    assert first == second
    assert others != {first}


def test_generate_second_adapter(client: httpx.Client) -> None:
    response = client.post("/generate", json={"prompt": PROMPT, "adapter": OTHER_ADAPTER, "max_new_tokens": 2})

    assert response.status_code == 200
    assert response.json()["adapter"] == OTHER_ADAPTER
    assert response.json()["rank"] == 4


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_ok(client: httpx.Client, path: str) -> None:
    response = client.get(path)

    assert response.status_code == 200


def test_generate_tiny_temperature_is_greedy(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "adapter": TINY_ADAPTER, "max_new_tokens": 8}

    greedy = client.post("/generate", json=body).json()["text"]
    almost_zero = client.post("/generate", json={**body, "temperature": 1e-30, "seed": 1})

    assert almost_zero.status_code == 200
    assert almost_zero.json()["text"] == greedy


def test_generate_chat_applies_template(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "adapter": TINY_ADAPTER, "max_new_tokens": 1, "chat": True}
    response = client.post("/generate", json=body)

    templated = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    expected = len(build_tiny_tokenizer()(templated, add_special_tokens=False).input_ids)
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == expected


def test_every_response_names_the_replica(client: httpx.Client) -> None:
    generated = client.post("/generate", json={"prompt": PROMPT, "adapter": TINY_ADAPTER, "max_new_tokens": 1})
    health = client.get("/healthz")

    assert generated.headers["x-matlora-replica"].endswith(f":{client.base_url.port}")
    assert health.headers["x-matlora-replica"] == generated.headers["x-matlora-replica"]

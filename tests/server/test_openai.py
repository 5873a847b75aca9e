"""The official ``openai`` client against the OpenAI-compatible routes."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.server.conftest import OTHER_ADAPTER, OTHER_MAX_RANK, TINY_ADAPTER, TINY_MAX_RANK, ThreadServer

PROMPT = "2 + 3 ="


@pytest.fixture
def openai_client(tiny_server: ThreadServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key="unused", base_url=f"{tiny_server.url}/v1", max_retries=0) as client:
        yield client


def test_models_lists_adapters_and_ranks(openai_client: openai.OpenAI) -> None:
    ids = [model.id for model in openai_client.models.list()]

    expected = [TINY_ADAPTER, *(f"{TINY_ADAPTER}@{r}" for r in range(TINY_MAX_RANK + 1))]
    expected += [OTHER_ADAPTER, *(f"{OTHER_ADAPTER}@{r}" for r in range(OTHER_MAX_RANK + 1))]
    assert sorted(ids) == sorted(expected)


def test_models_entry_carries_ranks(client: httpx.Client) -> None:
    models = {model["id"]: model for model in client.get("/v1/models").json()["data"]}

    assert models[TINY_ADAPTER]["ranks"] == list(range(TINY_MAX_RANK + 1))
    assert models[TINY_ADAPTER]["max_rank"] == TINY_MAX_RANK
    assert models[f"{TINY_ADAPTER}@3"]["rank"] == 3
    assert models[f"{TINY_ADAPTER}@3"]["parent"] == TINY_ADAPTER


def test_completion_at_rank_equals_generate(openai_client: openai.OpenAI, client: httpx.Client) -> None:
    completion = openai_client.completions.create(model=f"{TINY_ADAPTER}@3", prompt=PROMPT, max_tokens=8, temperature=0)
    generated = client.post(
        "/generate", json={"prompt": PROMPT, "adapter": TINY_ADAPTER, "rank": 3, "max_new_tokens": 8}
    ).json()

    assert completion.choices[0].text == generated["text"]
    assert completion.choices[0].finish_reason == generated["finish_reason"]
    assert completion.model == f"{TINY_ADAPTER}@3"
    assert completion.usage.prompt_tokens == generated["usage"]["prompt_tokens"]
    assert completion.usage.completion_tokens == generated["usage"]["completion_tokens"]
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_completion_rank_in_extra_body(openai_client: openai.OpenAI) -> None:
    response = openai_client.completions.with_raw_response.create(
        model=TINY_ADAPTER, prompt=PROMPT, max_tokens=2, temperature=0, extra_body={"rank": 5}
    )

    assert response.headers["x-matlora-rank"] == "5"
    assert response.parse().model == f"{TINY_ADAPTER}@5"


def test_completion_stream_matches_whole(openai_client: openai.OpenAI) -> None:
    request = {"model": f"{TINY_ADAPTER}@2", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    whole = openai_client.completions.create(**request)

    chunks = list(openai_client.completions.create(**request, stream=True, stream_options={"include_usage": True}))

    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completion_uses_template(openai_client: openai.OpenAI, client: httpx.Client) -> None:
    chat = openai_client.chat.completions.create(
        model=f"{TINY_ADAPTER}@8",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
        max_tokens=6,
        temperature=0,
    )
    templated = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 + 3 =<|im_end|>\n<|im_start|>assistant\n"

    generated = client.post(
        "/generate",
        json={"prompt": templated, "adapter": TINY_ADAPTER, "rank": 8, "max_new_tokens": 6},
    ).json()

    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == generated["text"]
    assert chat.usage.prompt_tokens == generated["usage"]["prompt_tokens"]


def test_chat_stream_matches_whole(openai_client: openai.OpenAI) -> None:
    request = {
        "model": f"{OTHER_ADAPTER}@4",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 8,
        "temperature": 0,
    }
    whole = openai_client.chat.completions.create(**request)

    chunks = list(openai_client.chat.completions.create(**request, stream=True))

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_unknown_model_404(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        openai_client.completions.create(model="math@4", prompt=PROMPT, max_tokens=1)

    assert raised.value.status_code == 404
    assert raised.value.body["param"] == "model"
    assert f"{OTHER_ADAPTER}, {TINY_ADAPTER}" in raised.value.body["message"]


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"model": f"{TINY_ADAPTER}@9"}, "model"),
        ({"model": f"{TINY_ADAPTER}@x"}, "model"),
        ({"model": TINY_ADAPTER, "max_tokens": 0}, "max_tokens"),
        ({"model": TINY_ADAPTER, "max_tokens": 65}, "max_tokens"),
        ({"model": TINY_ADAPTER, "temperature": -1}, "temperature"),
        ({"model": TINY_ADAPTER, "top_p": 2}, "top_p"),
        ({"model": TINY_ADAPTER, "n": 2}, "n"),
        ({"model": TINY_ADAPTER, "logprobs": 3}, "logprobs"),
        ({"model": TINY_ADAPTER, "prompt": "   "}, "prompt"),
        ({"model": TINY_ADAPTER, "extra_body": {"rank": "high"}}, "rank"),
    ],
)
def test_invalid_completion_400(openai_client: openai.OpenAI, request_fields: dict, param: str) -> None:
    request = {"prompt": PROMPT, "max_tokens": 1, **request_fields}

    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.completions.create(**request)

    assert raised.value.status_code == 400
    assert raised.value.body["param"] == param
    assert raised.value.body["type"] == "invalid_request_error"


def test_chat_without_messages_400(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(model=TINY_ADAPTER, messages=[])

    assert raised.value.body["param"] == "messages"


def test_retrieve_model_by_id(openai_client: openai.OpenAI) -> None:
    model = openai_client.models.retrieve(f"{TINY_ADAPTER}@4")
    adapter = openai_client.models.retrieve(TINY_ADAPTER)

    assert model.id == f"{TINY_ADAPTER}@4"
    assert model.owned_by == "matlora"
    assert model.to_dict()["rank"] == 4
    assert model.to_dict()["parent"] == TINY_ADAPTER
    assert adapter.to_dict()["ranks"] == list(range(TINY_MAX_RANK + 1))


@pytest.mark.parametrize("model_id", [f"{TINY_ADAPTER}@{TINY_MAX_RANK + 1}", "math", f"{TINY_ADAPTER}@auto"])
def test_retrieve_unknown_model_404(openai_client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        openai_client.models.retrieve(model_id)

    assert raised.value.body["code"] == "model_not_found"
    assert raised.value.body["type"] == "invalid_request_error"
    assert raised.value.body["param"] == "model"
    assert raised.value.body["message"] == (
        f"unknown model {model_id!r}; the models are {OTHER_ADAPTER}, {OTHER_ADAPTER}@0..{OTHER_ADAPTER}@4; "
        f"{TINY_ADAPTER}, {TINY_ADAPTER}@0..{TINY_ADAPTER}@8 (GET /v1/models lists them)"
    )


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "user", "content": ""}], "messages.0.content"),
        ([{"role": "user", "content": " \n\t"}], "messages.0.content"),
        ([{"role": "user", "content": [{"type": "text", "text": " "}]}], "messages.0.content"),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": ""}], "messages.1.content"),
        ([{"role": "system", "content": ""}], "messages"),
        ([{"role": "system", "content": " "}, {"role": "assistant", "content": ""}], "messages"),
    ],
)
def test_chat_without_text_400(openai_client: openai.OpenAI, messages: list[dict], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(model=TINY_ADAPTER, messages=messages, max_tokens=1)

    assert raised.value.status_code == 400
    assert raised.value.body["param"] == param


def test_chat_empty_user_message_names_field(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(model=TINY_ADAPTER, messages=[{"role": "user", "content": ""}])

    assert raised.value.body["message"] == (
        'messages.0.content must contain text in a user message, not only whitespace, got ""'
    )


@pytest.mark.parametrize("rank", [99, -1])
def test_model_rank_out_of_range_400(openai_client: openai.OpenAI, rank: int) -> None:
    model = f"{TINY_ADAPTER}@{rank}"

    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.completions.create(model=model, prompt=PROMPT, max_tokens=1)

    assert raised.value.body["param"] == "model"
    assert raised.value.body["message"] == (
        f"the rank in model '{model}' is out of range: adapter '{TINY_ADAPTER}' serves ranks 0..8 "
        f"(0 is the base model); use {TINY_ADAPTER}@0 to {TINY_ADAPTER}@8, or {TINY_ADAPTER}@auto"
    )


def test_chat_conflicting_token_limits_400(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(
            model=TINY_ADAPTER,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=5,
            max_completion_tokens=6,
        )

    assert raised.value.body["param"] == "max_completion_tokens"
    assert raised.value.body["message"] == (
        "max_completion_tokens must equal max_tokens (5) when both are sent; send only one of them, got 6"
    )


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"echo": True}, "echo is not supported by this server; send false, or leave it out, got true"),
        ({"logprobs": 3}, "logprobs is not supported by this server; send null, false or 0, or leave it out, got 3"),
        ({"temperature": -1}, "temperature is out of range: got -1, allowed >= 0 (0 is greedy)"),
    ],
)
def test_invalid_completion_message(openai_client: openai.OpenAI, request_fields: dict, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.completions.create(model=TINY_ADAPTER, prompt=PROMPT, max_tokens=1, **request_fields)

    assert raised.value.body["message"] == message

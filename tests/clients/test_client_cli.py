"""``matlora ask`` and ``matlora loadgen`` against a scripted server."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys

import httpx
import pytest

from matlora.cli import main


@pytest.fixture
def routed(server, monkeypatch):
    """Route every httpx client the CLI builds to the scripted server."""
    real_client, real_async_client = httpx.Client, httpx.AsyncClient
    monkeypatch.setattr(httpx, "Client", lambda **kwargs: real_client(transport=server.transport, **kwargs))
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kwargs: real_async_client(transport=server.transport, **kwargs))
    monkeypatch.delenv("MATLORA_API_KEY", raising=False)
    return server


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ask_prints_text_and_rank(routed, capsys):
    routed.default = routed.json_reply(200, routed.generate_body(text="85", rank=8))
    code = main(["ask", "What is 47 plus 38?", "--rank", "8", "--url", "http://matlora.test:9000"])

    captured = capsys.readouterr()
    assert code == 0
    assert captured.out == "85\n"
    assert captured.err == ("rank 8, adapter arith, finish_reason stop, tokens 7 prompt + 2 generated, request req-1\n")
    assert str(routed.requests[0].url) == "http://matlora.test:9000/generate"
    assert routed.json_bodies() == [{"prompt": "What is 47 plus 38?", "rank": 8, "chat": True}]


def test_ask_sends_every_option(routed, capsys):
    code = main(
        [
            "ask",
            "hi",
            "--rank",
            "auto",
            "--adapter",
            "arith",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--stop",
            "\n",
            "--stop",
            ".",
            "--seed",
            "5",
            "--raw",
            "--api-key",
            "s3cret",
        ]
    )
    assert code == 0
    assert routed.json_bodies() == [
        {
            "prompt": "hi",
            "rank": "auto",
            "adapter": "arith",
            "max_new_tokens": 4,
            "temperature": 0.7,
            "top_p": 0.9,
            "stop": ["\n", "."],
            "seed": 5,
        }
    ]
    assert routed.requests[0].headers["authorization"] == "Bearer s3cret"


def test_ask_api_key_from_environment(routed, monkeypatch, capsys):
    monkeypatch.setenv("MATLORA_API_KEY", "env-token")
    assert main(["ask", "hi"]) == 0
    assert routed.requests[0].headers["authorization"] == "Bearer env-token"


def test_ask_json(routed, capsys):
    assert main(["ask", "hi", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "id": "req-1",
        "text": "85",
        "rank": 8,
        "adapter": "arith",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 7, "completion_tokens": 2},
        "request_id": "req-1",
    }


def test_ask_stream(routed, capsys):
    done = {"type": "done", **routed.generate_body(text="85", rank=4)}
    routed.default = routed.sse_reply([{"type": "token", "text": "8"}, {"type": "token", "text": "5"}, done])
    assert main(["ask", "hi", "--stream"]) == 0

    captured = capsys.readouterr()
    assert captured.out == "85\n"
    assert captured.err.startswith("rank 4, adapter arith")
    assert routed.json_bodies()[0]["stream"] is True


def test_ask_stream_json(routed, capsys):
    done = {"type": "done", **routed.generate_body(text="8", rank=4)}
    routed.default = routed.sse_reply([{"type": "token", "text": "8"}, done])
    assert main(["ask", "hi", "--stream", "--json"]) == 0

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"type": "token", "text": "8"}
    assert lines[1]["type"] == "done"
    assert lines[1]["rank"] == 4


def test_ask_prompt_from_stdin(routed, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 1 plus 1?\n"))
    assert main(["ask", "-"]) == 0
    assert routed.json_bodies()[0]["prompt"] == "What is 1 plus 1?\n"


def test_ask_invalid_request(routed, capsys):
    routed.default = routed.error_reply(422, "rank out of range", field="rank", value=99, allowed="0..16")
    assert main(["ask", "hi", "--rank", "99"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: HTTP 422: rank out of range field='rank' value=99 allowed='0..16' request_id=req-1\n"


def test_ask_unauthorized_hint(routed, capsys):
    routed.default = routed.error_reply(401, "missing bearer token")
    assert main(["ask", "hi"]) == 1
    assert "hint: pass the server's token with --api-key or $MATLORA_API_KEY" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "eight"], "invalid rank 'eight': expected an integer such as 8, or 'auto'"),
        (["--temperature", "nan"], "invalid value 'nan': expected a finite number"),
    ],
)
def test_ask_rejects_bad_option(args, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["ask", "hi", *args])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_ask_connection_refused(capsys, monkeypatch):
    monkeypatch.delenv("MATLORA_API_KEY", raising=False)
    url = f"http://127.0.0.1:{closed_port()}"
    assert main(["ask", "hi", "--url", url, "--retries", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ConnectError on POST " + url + "/generate")
    assert f"hint: is a server running at {url}?" in err


def test_loadgen_writes_report(routed, tmp_path, capsys):
    out = tmp_path / "load.json"
    code = main(
        [
            "loadgen",
            "--url",
            "http://matlora.test",
            "--rate",
            "200",
            "--duration",
            "0.05",
            "--arrival",
            "constant",
            "--ranks",
            "4,auto,default",
            "--max-new-tokens",
            "2",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["summary"]["requests"] == 10
    assert report["summary"]["status_counts"] == {"200": 10}
    assert report["config"]["max_new_tokens"] == 2
    assert {tuple(body.keys()) for body in routed.json_bodies()} <= {
        ("prompt", "rank", "max_new_tokens", "chat"),
        ("prompt", "max_new_tokens", "chat"),
    }
    assert all(body["chat"] is True for body in routed.json_bodies())
    assert {body.get("rank") for body in routed.json_bodies()} <= {4, "auto", None}

    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["rank", "sent", "ok"]
    assert "10 sent, 10 ok" in table


def test_loadgen_rejects_bad_rate(capsys):
    with pytest.raises(SystemExit):
        main(["loadgen", "--rate", "0"])
    assert "invalid value '0': expected a number > 0" in capsys.readouterr().err


def test_loadgen_missing_prompts_file(tmp_path, capsys):
    assert main(["loadgen", "--prompts", str(tmp_path / "missing.txt")]) == 1
    assert "error: cannot read --prompts" in capsys.readouterr().err


def test_clients_do_not_import_torch():
    code = (
        "import sys, clients.cli, clients.client, clients.loadgen; "
        "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_loadgen_fails_when_no_request_succeeds(routed, capsys):
    routed.default = routed.json_reply(
        422, {"error": {"type": "invalid_request", "message": "bad rank", "field": "rank"}}
    )
    code = main(["loadgen", "--url", "http://matlora.test", "--rate", "200", "--duration", "0.02", "--raw"])

    assert code == 1
    assert "no request succeeded" in capsys.readouterr().err
    assert all("chat" not in body for body in routed.json_bodies())

"""vllm_ht/tools/loadtest.py's client against a stand-in server that answers like vLLM does, including the
way vLLM fails mid-stream (an error event, then [DONE]): what counts as completed, cancelled, failed."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vllm_ht.tools.loadtest import LoadRequest, failure_reason, run_load


def _chunk(content=None, finish=None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]}


def _usage(n: int) -> dict:
    return {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}}


ERROR = {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}}
# prompt -> the stream's events (each sent as `data: <json>`), "[DONE]" as itself
STREAMS = {
    "ok": [_chunk("Hel"), _chunk("lo"), _chunk(finish="stop"), _usage(2), "[DONE]"],
    "length": [_chunk("a"), _chunk("b", finish="length"), _usage(4), "[DONE]"],
    "error-event": [_chunk("Hel"), ERROR, "[DONE]"],
    "abort": [_chunk("Hel"), _chunk(finish="abort"), _usage(1), "[DONE]"],
    "no-finish-reason": [_chunk("Hel"), _usage(1), "[DONE]"],
    "too-many-tokens": [_chunk("Hel"), _chunk(finish="length"), _usage(9), "[DONE]"],
    "no-usage": [_chunk("Hel"), _chunk(finish="stop"), "[DONE]"],
    "no-done": [_chunk("Hel"), _chunk(finish="stop"), _usage(1)],
    "cancel": [_chunk(str(i)) for i in range(6)] + [_chunk(finish="length"), _usage(6), "[DONE]"],
}
# prompt -> the non-streaming JSON answer
ANSWERS = {
    "ok": {"choices": [{"message": {"content": "Hello"}, "finish_reason": "stop"}], "usage": {"completion_tokens": 2}},
    "abort": {"choices": [{"message": {"content": "He"}, "finish_reason": "abort"}], "usage": {"completion_tokens": 1}},
    "too-many-tokens": {"choices": [{"message": {"content": "Hello"}, "finish_reason": "length"}],
                        "usage": {"completion_tokens": 9}},
}


class _VLLMLike(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        self.send_response(200)
        if not body["stream"]:
            data = json.dumps(ANSWERS[prompt]).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in STREAMS[prompt]:
            self.wfile.write(f"data: {event if event == '[DONE]' else json.dumps(event)}\n\n".encode())
            self.wfile.flush()

    def log_message(self, *args):
        pass


class _Quiet(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass    # the cancelled stream's broken pipe: the client left on purpose


@pytest.fixture(scope="module")
def base():
    server = _Quiet(("127.0.0.1", 0), _VLLMLike)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _one(base: str, prompt: str, max_tokens: int = 4, stream: bool = True, cancel_after=None):
    results, summary = run_load(base, "m", [LoadRequest(prompt, max_tokens, stream=stream, cancel_after=cancel_after)])
    assert summary.sent == 1 and summary.completed + summary.cancelled + summary.failed == 1
    return results[0], summary


@pytest.mark.parametrize("prompt, finish", [("ok", "stop"), ("length", "length")])
def test_a_stream_that_ends_as_answers_end_is_completed(base, prompt, finish):
    r, summary = _one(base, prompt)
    assert (r.status, r.error, r.finish_reason) == ("completed", None, finish)
    assert summary.completed == 1 and summary.completion_tokens == r.completion_tokens


@pytest.mark.parametrize("prompt, why", [
    ("error-event", "error event: Internal server error"),   # vLLM: error event, then [DONE]
    ("abort", "finish_reason 'abort'"),
    ("no-finish-reason", "finish_reason None"),
    ("too-many-tokens", "9 completion tokens > max_tokens 4"),
    ("no-usage", "no usage report"),
    ("no-done", "without [DONE]"),
])
def test_a_stream_that_reached_done_badly_is_failed_with_its_reason(base, prompt, why):
    r, summary = _one(base, prompt)
    assert r.status == "failed" and why in r.error
    assert summary.failed == 1 and summary.errors == [r.error] and summary.completion_tokens == 0


def test_a_cancelled_stream_keeps_its_partial_text(base):
    r, summary = _one(base, "cancel", max_tokens=8, cancel_after=2)
    assert (r.status, r.text, r.chunks, r.error) == ("cancelled", "01", 2, None)
    assert summary.cancelled == 1


@pytest.mark.parametrize("prompt, status", [("ok", "completed"), ("abort", "failed"), ("too-many-tokens", "failed")])
def test_non_streaming_answers_are_judged_the_same_way(base, prompt, status):
    r, _ = _one(base, prompt, stream=False)
    assert r.status == status and (r.error is None) == (status == "completed")


def test_failure_reason_without_max_tokens_only_needs_a_finished_answer():
    req = LoadRequest("p", max_tokens=None)
    assert failure_reason(req, "length", 10_000) is None
    assert failure_reason(req, "stop", 3, error_event="boom") == "error event: boom"

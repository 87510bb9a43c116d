"""The HT server under load, cancellations, context limits, KV-cache pressure and bad input
(`pytest -m reliability`; in the default run too). Real `vllm serve` processes on 127.0.0.1, fp32
(greedy identity with plain vLLM is exact only there), the shipped checkpoint.

Nothing is lost, by the server's own account (`/metrics`, vllm_ht/tools/server_metrics.py): after each
test no request is running or waiting, the KV cache is empty again, every request sent reached the
engine, none ended in error, and the ones that did not finish are ones the client cancelled. Every
test that generates also sees drafts proposed and accepted during it: trees were in flight."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from e2e.e2e_helpers import run_engine          # tests/ is on sys.path (tests/conftest.py)
from vllm_ht.tools.loadtest import LoadRequest, Server, mixed_workload, run_load
from vllm_ht.tools.server_metrics import ServerCounts, scrape

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "checkpoints" / "smollm2-135m-instruct"
PROMPTS = [json.loads(line)["prompt"] for line in (REPO / "benchmarks" / "prompts.jsonl").read_text().splitlines()[:16]]
MAX_LEN = 512
COMMON = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_LEN)]
# a fixed 4-node tree: the tests need drafts at every batch size, and the cost policy drafts little
# above batch 1 on a 2-core CPU (vllm_ht/policy.py)
HT = ["--speculative-model", "hidden_transfer", "--ht-checkpoint", str(CHECKPOINT), "--ht-num-nodes", "4"]
KV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
LONG = "Tell me more about the history of the bicycle and how it changed over time. " * 30   # ~500 tokens


def _post(base: str, body, timeout: float = 300) -> dict:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _greedy(prompt: str, max_tokens: int | None) -> LoadRequest:
    return LoadRequest(prompt=prompt, max_tokens=max_tokens, stream=False)


def _texts(base: str, model: str, requests: list[LoadRequest]) -> list[str]:
    results, summary = run_load(base, model, requests)
    assert summary.failed == 0, summary.errors
    return [r.text for r in results]


def _settled(base: str, before: ServerCounts, wait: float = 15) -> ServerCounts:
    """What happened since `before`, once the server is idle (gauges come with the engine's steps)."""
    deadline = time.monotonic() + wait
    while True:
        d = scrape(base).since(before)
        if (d.running, d.waiting, d.kv_cache_usage) == (0, 0, 0) or time.monotonic() > deadline:
            return d


def _accounted(d: ServerCounts, sent: int, completed: int, cancelled: int = 0) -> None:
    """The server's account of `sent` requests the client saw as `completed` or `cancelled`."""
    assert (d.running, d.waiting) == (0, 0), f"requests left in the engine: {d}"
    assert d.kv_cache_usage == 0, f"KV blocks still held: {d.kv_cache_usage:.1%}"
    assert d.started == sent, f"{sent} sent, {d.started} reached the engine"
    assert d.num_finished("abort", "error", "repetition") == 0, d.finished
    finished = d.num_finished("stop", "length")
    assert completed <= finished, f"{completed} completed for the client, {finished} finished in the engine"
    assert sent - finished <= cancelled, f"{sent - finished} aborted in the engine, {cancelled} cancelled"


def _drafted(d: ServerCounts) -> None:
    assert d.drafts > 0 and d.draft_tokens > 0, "no drafts proposed: no tree was in flight"
    assert d.accepted_tokens > 0, f"{d.draft_tokens:.0f} draft tokens proposed, none accepted"


WORKLOAD = mixed_workload(PROMPTS, count=64, cancel_share=0.25, seed=0)
GREEDY = sorted({(r.prompt, r.max_tokens) for r in WORKLOAD if r.temperature == 0})
FILL = " Please answer in detail, step by step, with one concrete example for each point you make." * 2
PRESSURE = [_greedy(p + FILL, 64) for p in PROMPTS[:6]]    # 76-87-token prompts: decoding crosses a 128-token block
NEAR_END = [_greedy(LONG[: 1800], None), _greedy(LONG[: 1700], None)]   # no max_tokens: run to the context end


@pytest.fixture(scope="module")
def model(model_dir) -> str:
    return str(model_dir)


@pytest.fixture(scope="module")
def plain(model, tmp_path_factory) -> dict:
    """Plain vLLM's greedy texts for every greedy request of the tests below: vLLM's offline engine
    in one process with the servers' model settings (fp32, eager, max_model_len 512), the same chat
    template, detokenized with the model's tokenizer (tests/e2e/test_server_e2e.py checks such texts
    against a server's). A request without max_tokens runs to the context end, as on the server.
    One process instead of a plain `vllm serve`: ~35 s less start-up on 2 cores."""
    from transformers import AutoTokenizer

    wanted = [_greedy(p, n) for p, n in GREEDY] + NEAR_END + PRESSURE
    tmp = tmp_path_factory.mktemp("plain")
    prompts, params = tmp / "prompts.jsonl", tmp / "params.json"
    prompts.write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in wanted))
    params.write_text(json.dumps([{"max_tokens": r.max_tokens} for r in wanted]))
    out = run_engine(model, tmp / "plain.json", "--prompts", str(prompts), "--request-params", str(params),
                     "--max-model-len", str(MAX_LEN), "--batch-sizes", str(len(wanted)))
    tok = AutoTokenizer.from_pretrained(model)
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in out["runs"][str(len(wanted))]["outputs"]]
    g, e = len(GREEDY), len(GREEDY) + len(NEAR_END)
    return {"load": dict(zip(GREEDY, texts[:g])), "near_end": texts[g:e], "pressure": texts[e:]}


@pytest.fixture(scope="module")
def ht(model, tmp_path_factory):
    with Server(model, COMMON + HT, tmp_path_factory.mktemp("ht") / "server.log", env=KV) as s:
        yield s


def test_64_concurrent_streams_with_cancellations(ht, model, plain):
    before = scrape(ht.base)
    results, summary = run_load(ht.base, model, WORKLOAD)
    print("\n64 concurrent streaming chats:", summary.line())
    assert summary.failed == 0, summary.errors[:5]
    assert summary.cancelled >= 8                                   # the cancellations really happened
    greedy_done = [r for r in results if r.status == "completed" and r.request.temperature == 0]
    assert len(greedy_done) >= 16
    for r in greedy_done:
        assert r.text == plain["load"][(r.request.prompt, r.request.max_tokens)], r.request
    greedy_cancelled = [r for r in results if r.status == "cancelled" and r.request.temperature == 0]
    assert greedy_cancelled
    for r in greedy_cancelled:       # what the client saw before it left is what plain vLLM says
        assert plain["load"][(r.request.prompt, r.request.max_tokens)].startswith(r.text), r.request
    # the server is fine afterwards: a fresh greedy request still equals plain vLLM
    again = _texts(ht.base, model, [_greedy(*GREEDY[0])])
    assert again == [plain["load"][GREEDY[0]]]
    d = _settled(ht.base, before)
    _accounted(d, sent=len(WORKLOAD) + 1, completed=summary.completed + 1, cancelled=summary.cancelled)
    _drafted(d)


def test_context_end_with_trees_in_flight(ht, model, plain):
    """Prompts a few dozen tokens short of max_model_len and no max_tokens: decoding runs into the
    context end while drafts are scheduled; the scheduler cuts them and the output equals plain."""
    before = scrape(ht.base)
    got = [_post(ht.base, {"model": model, "messages": [{"role": "user", "content": r.prompt}], "temperature": 0})
           for r in NEAR_END]
    for answer, want in zip(got, plain["near_end"]):
        assert answer["choices"][0]["message"]["content"] == want
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"] == MAX_LEN
    d = _settled(ht.base, before)
    _accounted(d, sent=len(NEAR_END), completed=len(NEAR_END))
    assert d.num_finished("length") == len(NEAR_END)
    _drafted(d)


def test_prompt_over_the_context_is_a_clear_400(ht, model, plain):
    before = scrape(ht.base)
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(ht.base, {"model": model, "messages": [{"role": "user", "content": LONG * 2}]})
    assert e.value.code == 400
    assert "context" in e.value.read().decode().lower()
    assert ht.healthy()
    assert _texts(ht.base, model, [_greedy(*GREEDY[0])]) == [plain["load"][GREEDY[0]]]
    d = _settled(ht.base, before)
    _accounted(d, sent=1, completed=1)          # the rejected prompt never reached the engine
    _drafted(d)


@pytest.mark.parametrize("body", [
    pytest.param(b"{not json", id="not-json"),
    pytest.param({"messages": "hi"}, id="messages-not-a-list"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, id="negative-max-tokens"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}], "temperature": -2}, id="negative-temperature"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}], "top_p": 7}, id="top-p-over-1"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, id="absurd-max-tokens"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 10**6},
                 id="absurd-top-logprobs"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, id="max-tokens-not-a-number"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}], "n": 0}, id="zero-choices"),
])
def test_malformed_requests_are_4xx_and_the_server_keeps_serving(ht, model, plain, body):
    if isinstance(body, dict):
        body = {"model": model, **body}
    before = scrape(ht.base)
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(ht.base, body)
    assert 400 <= e.value.code < 500, e.value.read()[:300]
    assert _texts(ht.base, model, [_greedy(*GREEDY[1])]) == [plain["load"][GREEDY[1]]]
    d = _settled(ht.base, before)
    _accounted(d, sent=1, completed=1)          # the bad request never reached the engine
    _drafted(d)


def test_kv_cache_pressure_and_preemption(model, plain, tmp_path):
    """Five KV blocks of 128 tokens (one is vLLM's null block: room for 512 tokens) for 6 concurrent
    greedy requests whose decoding crosses a block boundary (up to 12 blocks asked against 4):
    running requests run out of blocks, vLLM preempts and recomputes; every HT output still equals
    plain vLLM's."""
    with Server(model, COMMON + HT + ["--num-gpu-blocks-override", "5"], tmp_path / "server.log", env=KV) as s:
        before = scrape(s.base)
        texts = _texts(s.base, model, PRESSURE)
        d = _settled(s.base, before)
    assert d.preemptions > 0, "no preemption happened: the test did not test anything"
    assert texts == plain["pressure"]
    _accounted(d, sent=len(PRESSURE), completed=len(PRESSURE))
    _drafted(d)

"""The OpenAI-compatible HTTP API on real Serve, through the real `openai` client."""

from __future__ import annotations

import concurrent.futures as cf
import json

import openai
import pytest
import requests

from tests.conftest import hf_clear_greedy
from tests.serve.conftest import MODEL, metric_totals, replica_labels

PROMPTS = ["hello world", "The quick brown fox", "Ray starts the stage actors", "café 東京"]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.base}/v1", api_key="unused", timeout=120, max_retries=0)


class HFText:
    """transformers' greedy text for a prompt: a server's text must equal it, or, past a near-tie
    (where either token is right and the two paths part), begin with the text before the tie."""

    def __init__(self, tok, path: str, ids: list[int], steps: int = 12):
        clear = hf_clear_greedy(path, ids, steps)
        self.whole = len(clear) == steps
        self.text = tok.decode(clear, skip_special_tokens=True)

    def matches(self, text: str) -> bool:
        # a cut inside a multi-byte character decodes to U+FFFD, which the full text lacks
        return text == self.text if self.whole else text.startswith(self.text.rstrip("\ufffd"))


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    chat_text = tok.apply_chat_template(
        [{"role": "user", "content": "hi there"}], add_generation_prompt=True, tokenize=False
    )
    return {
        "completions": [HFText(tok, tiny_ckpt, tok(p).input_ids) for p in PROMPTS],
        "chat": HFText(tok, tiny_ckpt, tok(chat_text, add_special_tokens=False).input_ids),
    }


def test_models_lists_the_served_model(client):
    (card,) = client.models.list().data
    assert card.id == MODEL


def test_completion_matches_transformers(client, reference):
    for prompt, expected in zip(PROMPTS, reference["completions"]):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert expected.matches(r.choices[0].text), (r.choices[0].text, expected.text)
        assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_batch_of_prompts_and_token_ids(client, reference, served):
    r = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert (
        all(ref.matches(t) for ref, t in zip(reference["completions"], texts)) and len(texts) == 4
    )
    tok_prompt = requests.post(
        f"{served.base}/v1/completions",
        json={"model": MODEL, "prompt": [1, 261, 495], "max_tokens": 4, "temperature": 0},
    ).json()
    assert tok_prompt["usage"]["prompt_tokens"] == 3


def test_streaming_completion_matches_and_ends_with_done(client, reference, served):
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert reference["completions"][0].matches(text)
    assert chunks[-1].usage.completion_tokens == 12
    raw = requests.post(
        f"{served.base}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True},
        stream=True,
    )
    lines = [ln for ln in raw.iter_lines() if ln]
    assert lines[-1] == b"data: [DONE]" and raw.headers["content-type"].startswith(
        "text/event-stream"
    )


def test_chat_uses_the_chat_template_streaming_and_not(client, reference):
    msgs = [{"role": "user", "content": "hi there"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    assert reference["chat"].matches(r.choices[0].message.content)
    assert r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=12, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == r.choices[0].message.content  # the same request alone: the same path


def test_chat_without_max_tokens_stops_at_the_servers_limit(client, served):
    """The session app allows max_tokens up to 400 in a 512-token context: a chat that names no
    max_tokens gets what the context allows, capped at the limit (it once ran to the context)."""
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "go on"}],
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 400 and r.choices[0].finish_reason == "length"


def test_n_seed_logprobs_echo_and_extra_sampling_fields(client, served):
    r = client.completions.create(
        model=MODEL,
        prompt="hello",
        max_tokens=5,
        n=3,
        temperature=0.8,
        seed=7,
        logprobs=2,
        extra_body={
            "top_k": 20,
            "min_p": 0.01,
            "repetition_penalty": 1.1,
            "min_tokens": 2,
            "ignore_eos": True,
        },
    )
    again = client.completions.create(
        model=MODEL,
        prompt="hello",
        max_tokens=5,
        n=3,
        temperature=0.8,
        seed=7,
        logprobs=2,
        extra_body={
            "top_k": 20,
            "min_p": 0.01,
            "repetition_penalty": 1.1,
            "min_tokens": 2,
            "ignore_eos": True,
        },
    )
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    assert len(r.choices) == 3 and all(len(c.logprobs.tokens) == 5 for c in r.choices)
    echo = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=2, temperature=0, echo=True, logprobs=1
    )
    assert echo.choices[0].text.startswith("hello")
    assert echo.choices[0].logprobs.token_logprobs[0] is None
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    assert len(chat.choices[0].logprobs.content) == 3
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2


def test_sixteen_concurrent_streaming_clients_all_complete(client, reference, served):
    def one(i):
        s = client.completions.create(
            model=MODEL, prompt=PROMPTS[i % 4], max_tokens=12, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in s if c.choices)

    with cf.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(one, range(16)))
    for i, text in enumerate(texts):  # crowded batches: other shapes than alone, so ties may part
        assert reference["completions"][i % 4].matches(text), (i, text)
    served.wait_idle()


def test_client_disconnect_mid_stream_aborts_and_frees_slots(served):
    """Only an abort can end this request early: it ignores EOS and asks for the limit, 400."""
    before = served.wait_idle()
    with requests.post(
        f"{served.base}/v1/completions",
        stream=True,
        timeout=60,
        json={
            "model": MODEL,
            "prompt": "hello",
            "max_tokens": 400,
            "stream": True,
            "ignore_eos": True,
        },
    ) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith(b"data: ")
            if seen >= 3:
                break  # leave mid-stream: the connection closes
    after = served.wait_idle(timeout=60)
    assert after["finished_requests"] - before["finished_requests"] == 1
    assert 3 <= after["generated_tokens"] - before["generated_tokens"] < 400


BAD = [
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 2}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n must be"),
    ({"prompt": "x", "stop": 5}, 400, "stop"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": [1, 999999]}, 400, "out of range"),
    ({"prompt": "x", "max_tokens": 10_000}, 400, "limit"),
    ({"prompt": "word " * 400}, 400, "limit"),
    ({"prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
]


@pytest.mark.parametrize("body, status, words", BAD, ids=[b[2] for b in BAD])
def test_bad_input_gets_its_status_and_an_openai_error_body(served, body, status, words):
    r = requests.post(f"{served.base}/v1/completions", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"] and "Traceback" not in err["message"]


def test_malformed_json_and_oversized_bodies(served):
    r = requests.post(
        f"{served.base}/v1/completions",
        data=b"{not json",
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    big = json.dumps({"model": MODEL, "prompt": "a" * (200 * 1024)})
    r = requests.post(
        f"{served.base}/v1/completions",
        data=big,
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
    assert requests.get(f"{served.base}/health", timeout=60).ok


def test_overload_gets_429_with_retry_after_and_the_server_keeps_serving(served, client):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 120, "ignore_eos": True}

    def one(_):
        r = requests.post(f"{served.base}/v1/completions", json=body, timeout=300)
        return r.status_code, r.headers.get("Retry-After"), r.json()

    with cf.ThreadPoolExecutor(48) as pool:
        results = list(pool.map(one, range(48)))
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
    assert all(h == "1" and "retry" in b["error"]["message"] for c, h, b in results if c == 429)
    served.wait_idle()
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices


def test_health_probes_every_stage_and_metrics_are_prometheus(served, client):
    h = requests.get(f"{served.base}/health", timeout=60).json()
    assert h["status"] == "ok" and h["stages"] == 2
    before = metric_totals(requests.get(f"{served.base}/metrics", timeout=30).text)
    client.completions.create(
        model=MODEL, prompt="metrics", max_tokens=3, extra_body={"ignore_eos": True}
    )
    text = requests.get(f"{served.base}/metrics", timeout=30).text
    after = metric_totals(text)
    samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert len(replica_labels(text)) == 1 and all('replica="' in ln for ln in samples)

    def grew(name: str) -> float:
        return after[name] - before[name]

    # this request's own observations, whatever ran before it
    assert grew("jamba_ray_generated_tokens_total") == 3
    assert grew("jamba_ray_requests_finished_total") == 1
    assert grew("jamba_ray_time_to_first_token_seconds_count") == 1
    assert grew("jamba_ray_time_per_output_token_seconds_count") == 1
    assert grew('jamba_ray_time_to_first_token_seconds_bucket{le="+Inf"}') == 1
    assert grew("jamba_ray_time_to_first_token_seconds_sum") > 0
    assert grew('jamba_ray_stage_busy_seconds_total{stage="0"}') > 0
    assert grew('jamba_ray_stage_busy_seconds_total{stage="1"}') > 0
    assert after["jamba_ray_slots_total"] == 8 and after["jamba_ray_requests_running"] == 0
    # object store, no fixed-shape decode steps by default: these stay at 0
    assert after['jamba_ray_stage_p2p_sends_total{stage="0"}'] == 0
    assert after['jamba_ray_stage_decode_graph_steps_total{stage="1"}'] == 0
    assert "# TYPE jamba_ray_time_to_first_token_seconds histogram" in text

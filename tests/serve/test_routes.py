"""vLLM's extra routes (/tokenize, /detokenize, /tokenizer_info, /version), a model by id, unknown
routes in OpenAI's error shape, and the field rule: a field we accept is honoured, any other is
a 400 that names it."""

from __future__ import annotations

import openai
import pytest
import requests

from jamba_ray.serve.protocol import (
    UNSUPPORTED,
    ChatCompletionRequest,
    CompletionRequest,
)
from jamba_ray.serve.translate import sampling_params
from tests.serve.conftest import MODEL


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.base}/v1", api_key="unused", timeout=120, max_retries=0)


def test_tokenize_and_detokenize_round_trip(served):
    r = requests.post(
        f"{served.base}/tokenize",
        json={"model": MODEL, "prompt": "hello world", "return_token_strs": True},
        timeout=60,
    ).json()
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) and r["max_model_len"] == 512
    assert r["tokens"][0] == 1  # BOS: add_special_tokens defaults to true for a prompt
    back = requests.post(f"{served.base}/detokenize", json={"tokens": r["tokens"][1:]}, timeout=60)
    assert back.json() == {"prompt": "hello world"}
    chat = requests.post(
        f"{served.base}/tokenize",
        json={"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True},
        timeout=60,
    ).json()
    text = requests.post(f"{served.base}/detokenize", json={"tokens": chat["tokens"]}, timeout=60)
    assert text.json()["prompt"] == "<|startoftext|><|user|>hi\n<|assistant|>"
    partial = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    cont = requests.post(
        f"{served.base}/tokenize",
        json={"messages": partial, "continue_final_message": True},
        timeout=60,
    ).json()
    text = requests.post(f"{served.base}/detokenize", json={"tokens": cont["tokens"]}, timeout=60)
    assert text.json()["prompt"].endswith("<|assistant|>Hel")


def test_tokenizer_info_version_and_a_model_by_id(served, client):
    info = requests.get(f"{served.base}/tokenizer_info", timeout=60).json()
    assert info["tokenizer_class"] and info["eos_token"] == "<|endoftext|>"
    assert "<|assistant|>" in info["chat_template"]
    assert requests.get(f"{served.base}/version", timeout=60).json()["version"]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


BAD_ROUTES = [
    ("get", "/v1/nothing-here", 404),
    ("post", "/v1/embeddings", 404),
    ("get", "/v1/completions", 405),
    ("delete", "/v1/models", 405),
    ("post", "/tokenize/extra", 404),
]


@pytest.mark.parametrize("method, path, status", BAD_ROUTES, ids=[p for _, p, _ in BAD_ROUTES])
def test_unknown_routes_and_methods_answer_in_openai_shape(served, method, path, status):
    r = getattr(requests, method)(f"{served.base}{path}", timeout=60)
    assert r.status_code == status
    err = r.json()["error"]
    assert path in err["message"] and err["type"] == "not_found_error" and err["code"] == status


def test_bad_tokenizer_requests_are_400s(served):
    for route, body in [
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}),
        ("/tokenize", {"promt": "x"}),
        ("/detokenize", {"tokens": [10**9]}),
    ]:
        r = requests.post(f"{served.base}{route}", json=body, timeout=60)
        assert r.status_code == 400, (route, body, r.text)


# ---- the field rule ------------------------------------------------------------------------
# Every field the request models accept, by what honours it. A field added to a model without
# being listed here (and honoured) fails the first test.
HONOURED = {
    "sampling (SamplingParams)": {
        "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
        "frequency_penalty", "top_k", "min_p", "repetition_penalty", "min_tokens",
        "stop_token_ids", "ignore_eos", "skip_special_tokens", "priority", "prompt_logprobs",
        "cache_salt",
    },
    "the front": {"model", "stream", "stream_options", "user", "best_of", "add_special_tokens"},
    "completions": {"prompt", "logprobs", "echo"},
    "chat": {
        "messages", "max_completion_tokens", "logprobs", "top_logprobs", "add_generation_prompt",
        "continue_final_message", "chat_template_kwargs",
    },
    "structured outputs": {
        "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
        "guided_grammar", "guided_decoding_backend",
    },
    "tools": {"tools", "tool_choice", "parallel_tool_calls"},
}  # fmt: skip


def test_every_accepted_field_is_one_we_honour():
    honoured = set().union(*HONOURED.values())
    for model in (CompletionRequest, ChatCompletionRequest):
        assert set(model.model_fields) <= honoured, set(model.model_fields) - honoured
        assert model.model_config["extra"] == "forbid"


NON_DEFAULT = {
    "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "n": 2, "stop": ("x",), "seed": 3,
    "presence_penalty": 0.5, "frequency_penalty": 0.25, "top_k": 5, "min_p": 0.1,
    "repetition_penalty": 1.2, "min_tokens": 1, "stop_token_ids": (7,), "ignore_eos": True,
    "skip_special_tokens": False, "priority": -3, "prompt_logprobs": 2, "cache_salt": "s",
}  # fmt: skip


def test_every_sampling_field_reaches_the_engine():
    assert set(NON_DEFAULT) == HONOURED["sampling (SamplingParams)"]
    req = CompletionRequest(model=MODEL, prompt="x", **NON_DEFAULT)
    params = sampling_params(req, req.max_tokens, None, req.prompt_logprobs)
    assert {k: getattr(params, k) for k in NON_DEFAULT} == NON_DEFAULT


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_an_unsupported_field_is_a_400_naming_it(served, field):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], field: ["set"]}
    r = requests.post(f"{served.base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and f"'{field}'" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == field


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "temprature": 0.5},
        {"prompt": "x", "stream_options": {"include_usage": True, "continous": True}},
        {"messages": [{"role": "user", "content": "x", "nmae": "bob"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    ],
)
def test_a_misspelt_or_unknown_field_is_a_400_naming_it(served, body):
    route = "chat/completions" if "messages" in body else "completions"
    r = requests.post(f"{served.base}/v1/{route}", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert any(w in message for w in ("temprature", "continous", "nmae", "image_url")), message


def test_empty_or_default_values_of_unsupported_fields_pass(client):
    r = client.completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=2,
        extra_body={"logit_bias": {}, "suffix": None, "length_penalty": 1.0},
    )
    assert r.choices

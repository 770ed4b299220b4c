"""The OpenAI-compatible HTTP API, driven by the official `openai` client against running services: the same
outputs as the gRPC API, OpenAI's streaming and error shapes, a 400 for every field it does not serve, and a client
that leaves releasing its sessions."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import json
import urllib.request

import grpc
import openai
import pytest
from transformers import AutoTokenizer

from cast.v1 import generation_pb2, generation_pb2_grpc
from orchestrator.config import OrchestratorConfig
from orchestrator.server import start_server
from orchestrator.stack import free_ports, is_serving
from tests.integration.stacks import prompts_for_tests
from tests.integration.test_bad_input import live_sequences, wait_until_released

MODEL = "target"  # the verify service names the model after its checkpoint directory
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(tiny_stack):
    with client_for(tiny_stack.spec.http_url) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    return AutoTokenizer.from_pretrained(tiny_pair[0])


def grpc_generate(stub, prompt: str, n: int, **fields) -> generation_pb2.GenerateResponse:
    return stub.Generate(generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=n, **fields), timeout=120)


def ext(obj) -> dict:
    """The response's `cast` extension field."""
    return obj.model_extra["cast"]


# --- completions ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["cast", "eagle2", "ar"])
def test_greedy_completions_equal_the_grpc_api_token_for_token(client, generation_stub, tokenizer, policy):
    for i, prompt in enumerate(prompts_for_tests(6)):
        n = (3, 17, 40)[i % 3]
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                             extra_body={"cast": {"policy": policy}})
        expected = grpc_generate(generation_stub, prompt, n, policy=policy)
        assert ext(response)["token_ids"] == list(expected.token_ids), f"prompt {i}"
        assert response.choices[0].text == expected.text
        assert response.choices[0].finish_reason == (
            "length" if expected.finish_reason == generation_pb2.FINISH_REASON_LENGTH else "stop")
        prompt_tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
        assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (
            prompt_tokens, len(expected.token_ids), prompt_tokens + len(expected.token_ids))
        assert ext(response)["stats"]["policy"] == policy and ext(response)["stats"]["steps"] >= 1


def test_streamed_completion_equals_the_unary_one(client):
    kw = dict(model=MODEL, prompt="def fibonacci(n):", max_tokens=30, temperature=0,
              extra_body={"cast": {"policy": "eagle2"}})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [t for c in text_chunks for t in ext(c)["token_ids"]] == ext(whole)["token_ids"]
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "text_completion"
    # Without include_usage, no usage chunk.
    plain = list(client.completions.create(stream=True, **kw))
    assert plain[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_step_stats_say_where_each_token_came_from(stack_factory):
    """The target drafting for itself gets whole paths accepted: the step records show the verified trees, accepted
    paths that walk down them, and each step's tokens as draft tokens then the bonus token."""
    with client_for(stack_factory("target-as-draft").spec.http_url) as client:
        response = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=40, temperature=0,
                                             extra_body={"cast": {"policy": "eagle2", "step_stats": True}})
    steps = ext(response)["steps"]
    assert len(steps) == ext(response)["stats"]["steps"]
    assert [t["id"] for s in steps for t in s["tokens"]] == ext(response)["token_ids"]
    assert "".join(t["text"] for s in steps for t in s["tokens"]) == response.choices[0].text
    for step in steps:
        tree = step["tree"]
        assert len(tree["tokens"]) == len(tree["parents"]) == len(tree["texts"]) == step["verified_nodes"]
        node = 0
        for index, token in zip(step["accepted_path"], step["tokens"]):  # the path walks down the tree
            assert tree["parents"][index] == node and tree["tokens"][index] == token["id"]
            node = index
        sources = [t["source"] for t in step["tokens"]]
        assert sources[: len(step["accepted_path"])] == ["draft"] * len(step["accepted_path"])
        assert sources[len(step["accepted_path"]):] in ([], ["bonus"])  # [] where the request ended on a draft token
        assert len(step["tokens"]) <= step["accepted_tokens"]
    assert sum(t["source"] == "draft" for s in steps for t in s["tokens"]) > len(steps) / 2


def test_stop_strings_cut_the_text(client):
    kw = dict(model=MODEL, prompt="def add(a, b):", max_tokens=30, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    assert full, "the tiny model should produce some text"
    stop = full[len(full) // 2:][:2]
    for given in (stop, [stop, "\x00never"]):
        cut = client.completions.create(stop=given, **kw).choices[0]
        assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop)]
        streamed = list(client.completions.create(stop=given, stream=True, **kw))
        assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_seeded_sampling_repeats_and_equals_the_grpc_api(client, generation_stub):
    kw = dict(model=MODEL, prompt="class Stack:\n", max_tokens=20, temperature=1.0, top_p=0.95)
    runs = {seed: ext(client.completions.create(seed=seed, **kw))["token_ids"] for seed in (1, 2, 3)}
    assert ext(client.completions.create(seed=2, **kw))["token_ids"] == runs[2]
    expected = grpc_generate(generation_stub, kw["prompt"], 20, temperature=1.0, top_p=0.95, seed=2, policy="cast")
    assert runs[2] == list(expected.token_ids)
    assert len({tuple(ids) for ids in runs.values()}) > 1, "different seeds should sample differently"


def test_models_and_health(client, tiny_stack):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["cast"]["chat"] is False
    with urllib.request.urlopen(f"{tiny_stack.spec.http_url}/health", timeout=10) as reply:
        assert json.load(reply) == {"status": "serving"}


# --- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, param", [
    (dict(n=2), "n"), (dict(best_of=3), "best_of"), (dict(logprobs=2), "logprobs"), (dict(echo=True), "echo"),
    (dict(suffix="}"), "suffix"), (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(frequency_penalty=1.0), "frequency_penalty"), (dict(logit_bias={"5": 10}), "logit_bias"),
    (dict(extra_body={"top_k": 5}), "top_k"),          # vLLM's spelling; ours is cast.top_k
    (dict(extra_body={"cast": {"beam": 1}}), "cast.beam"),
])
def test_each_unsupported_completion_field_is_a_400_naming_it(client, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=4, **fields)
    assert info.value.status_code == 400 and info.value.param == param, info.value.message
    assert param in info.value.message and info.value.type == "invalid_request_error"


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    response = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=4, temperature=0, n=1,
                                         best_of=1, echo=False, presence_penalty=0, frequency_penalty=0.0,
                                         logit_bias={}, user="someone")
    assert response.usage.completion_tokens >= 1


@pytest.mark.parametrize("fields, status, param", [
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(max_tokens=10**6), 400, "max_tokens"),
    (dict(temperature=-1), 400, "temperature"),
    (dict(top_p=0), 400, "top_p"),
    (dict(seed=-1), 400, "seed"),
    (dict(stop=[""]), 400, "stop"),
    (dict(prompt="x = 1\n" * 2000), 400, "prompt"),
    (dict(prompt=["one", "two"]), 400, "prompt"),
    (dict(prompt=[1, 10**6]), 400, "prompt[1]"),
    (dict(model="gpt-5"), 404, "model"),
    (dict(extra_body={"cast": {"policy": "beam"}}), 400, "cast.policy"),
    (dict(stream_options={"include_usage": True}), 400, "stream_options"),
])
def test_bad_values_answer_openai_errors_naming_the_field(client, fields, status, param):
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**{"model": MODEL, "prompt": "def f(x):", "max_tokens": 4, **fields})
    error = info.value
    assert error.status_code == status and error.param == param, error.message
    assert set(error.body) == {"message", "type", "param", "code"}
    # ...and the server keeps serving.
    assert client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=2).usage.completion_tokens >= 1


def test_chat_without_a_chat_template_is_a_400_that_says_so(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.param == "messages" and "chat template" in info.value.message


# --- a client that leaves -----------------------------------------------------------------------------------------

def test_a_client_that_disconnects_mid_stream_releases_its_sessions(client, tiny_stack):
    stream = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=2000, temperature=0,
                                       stream=True, extra_body={"cast": {"policy": "eagle2", "ignore_eos": True}})
    next(iter(stream))
    assert live_sequences(tiny_stack) == (1, 1)
    stream.close()
    assert wait_until_released(tiny_stack) == (0, 0)


def test_a_unary_client_that_times_out_releases_its_sessions(tiny_stack):
    with client_for(tiny_stack.spec.http_url).with_options(timeout=1.0) as impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model=MODEL, prompt="import os\n", max_tokens=3000, temperature=0,
                                         extra_body={"cast": {"policy": "eagle2", "ignore_eos": True}})
    assert wait_until_released(tiny_stack) == (0, 0)


async def test_a_full_server_answers_429(tiny_stack):
    """Admission control over HTTP: one live, one queued, the third request is a 429 at once."""
    addrs = tiny_stack.addresses()
    config = OrchestratorConfig(tokenizer_dir=tiny_stack.spec.target_dir, draft=addrs["draft"],
                                verify=addrs["verify"], port=0, http_port=0, max_live=1, max_queued=1)
    server, _ = await start_server(config)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http.port}/v1", api_key="unused", max_retries=0)
    long = dict(model=MODEL, prompt="import os\n", max_tokens=300, stream=True,
                extra_body={"cast": {"policy": "ar", "ignore_eos": True}})
    try:
        first = await client.completions.create(**long)
        await anext(aiter(first))
        queued = asyncio.ensure_future(client.completions.create(**long))  # answers once it runs
        await asyncio.sleep(0.3)
        with pytest.raises(openai.RateLimitError) as info:
            await client.completions.create(**{**long, "stream": False})
        assert info.value.status_code == 429 and info.value.code == "resource_exhausted"
        await first.close()
        second = await asyncio.wait_for(queued, 30)
        assert ext(await anext(aiter(second)))["token_ids"]
        await second.close()
    finally:
        await client.close()
        await server.http.stop()
        await server.stop(None)
        await server.close()


# --- chat ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_server(tiny_stack, tmp_path_factory):
    """A second orchestrator on the tiny stack's services, with a copy of the tokenizer that has a chat template."""
    tokenizer_dir = tmp_path_factory.mktemp("chat-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tiny_stack.spec.target_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tokenizer_dir)
    port, http_port = free_ports(2)
    addrs = tiny_stack.addresses()
    log = open(tmp_path_factory.mktemp("chat-logs") / "orchestrator.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.server", "--tokenizer", str(tokenizer_dir),
                             "--draft", addrs["draft"], "--verify", addrs["verify"], "--port", str(port),
                             "--http-port", str(http_port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not is_serving(f"127.0.0.1:{port}"):
            assert proc.poll() is None and time.monotonic() < deadline, "the chat orchestrator did not start"
            time.sleep(0.3)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield (client_for(f"http://127.0.0.1:{http_port}"), generation_pb2_grpc.GenerationServiceStub(channel),
                   tokenizer)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def fibonacci(n):"}]


def test_chat_completions_equal_the_grpc_api_on_the_templated_prompt(chat_server):
    client, stub, tokenizer = chat_server
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    expected = grpc_generate(stub, prompt, 25, policy="eagle2")
    kw = dict(model=MODEL, messages=MESSAGES, max_completion_tokens=25, temperature=0,
              extra_body={"cast": {"policy": "eagle2"}})
    response = client.chat.completions.create(**kw)
    assert response.object == "chat.completion" and response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert ext(response)["token_ids"] == list(expected.token_ids)
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage == response.usage
    # max_tokens, the older name, works as well; text parts are joined.
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "def fibonacci"},
                                                        {"type": "text", "text": "(n):"}]}]
    older = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=25, temperature=0,
                                           extra_body={"cast": {"policy": "eagle2"}})
    assert older.choices[0].message.content == expected.text


@pytest.mark.parametrize("fields, param", [
    (dict(n=2), "n"), (dict(logprobs=True), "logprobs"), (dict(top_logprobs=3), "top_logprobs"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(tool_choice="auto"), "tool_choice"), (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(messages=[{"role": "tool", "content": "1", "tool_call_id": "x"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0].type"),
    (dict(messages=[]), "messages"),
    (dict(max_completion_tokens=0), "max_completion_tokens"),
])
def test_each_unsupported_chat_field_is_a_400_naming_it(chat_server, fields, param):
    client, _, _ = chat_server
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **fields})
    assert info.value.status_code == 400 and info.value.param == param, info.value.message

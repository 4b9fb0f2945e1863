"""`mlx-gpt2 serve` (issue 14): the real server in its own process, driven by the official openai client,
raw HTTP for what clients must not be able to do, lm-eval as an evaluation harness, and many clients at once.

Every server here is the real console script on a free loopback port (`--port 0`, the port read from
uvicorn's start line), serving the trained small GPT-2 of tests/data in float32.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from mlx_gpt2 import SamplingOptions, generate, load, perplexity, stream_generate

STARTED = re.compile(r"serving .* on http://([\d.]+):(\d+);")
TEXT = (
    "The Python language is a general purpose programming language. A list is a mutable sequence of "
    "items, and a tuple is an immutable one."
)


class Served:
    """A running `mlx-gpt2 serve`: its process, its URL, and what it printed on stderr."""

    def __init__(self, *args: str, timeout: float = 120) -> None:
        script = Path(sys.executable).parent / "mlx-gpt2"
        self.proc = subprocess.Popen([str(script), "serve", "--port", "0", *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=os.environ.copy())  # fmt: skip
        self.lines: list[str] = []
        self.started = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.started.wait(timeout):
            self.proc.kill()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        if self.proc.poll() is not None:
            raise AssertionError("the server exited at start:\n" + "".join(self.lines))
        host, port = self.address
        self.url = f"http://{host}:{port}"

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if STARTED.search(line):
                self.address = STARTED.search(line).groups()
                self.started.set()
        self.started.set()  # it exited

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers={"content-type": "application/json",
                          **kwargs.pop("headers", {})}, timeout=120, **kwargs)  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def served(trained_small_dir):
    server = Served("--model", trained_small_dir, "--dtype", "float32", "--max-concurrency", "8", "--quiet")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local(trained_small_dir):
    """The same checkpoint through the Python API: what the server must agree with."""
    return load(trained_small_dir, dtype="float32")


@pytest.fixture(scope="module")
def hf(trained_small_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(trained_small_dir, torch_dtype=torch.float32).eval()


def healthy(server: Served) -> dict:
    response = httpx.get(server.url + "/health", timeout=30)
    assert response.status_code == 200
    return response.json()


def wait_idle(server: Served, deadline: float = 60) -> dict:
    """/health until nothing runs or waits (a cancelled sequence leaves at the model thread's next step)."""
    end = time.monotonic() + deadline
    while True:
        load_now = healthy(server)
        if load_now["running"] == 0 and load_now["waiting"] == 0 or time.monotonic() > end:
            return load_now
        time.sleep(0.05)  # polling a condition, not timing anything


# ---- Endpoints -------------------------------------------------------------------------------------------

def test_health_and_models(served, trained_small_dir):
    assert healthy(served) == {"status": "ok", "running": 0, "waiting": 0}
    models = served.client().models.list()
    assert [m.id for m in models.data] == [str(trained_small_dir)]
    assert served.client().models.retrieve(str(trained_small_dir)).id == str(trained_small_dir)
    with pytest.raises(openai.NotFoundError):
        served.client().models.retrieve("gpt2-xl")
    other = served.post("/v1/completions", {"model": "gpt2-xl", "prompt": "Hi"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"


def test_greedy_completion_is_the_python_apis(served, local, trained_small_dir):
    model, tokenizer = local
    out = served.client().completions.create(model=str(trained_small_dir), prompt="The Python language", max_tokens=24,
                                             temperature=0)  # fmt: skip
    expected = generate(model, tokenizer, "The Python language", max_tokens=24)
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenizer.encode("The Python language"))
    assert out.usage.completion_tokens == len(tokenizer.encode(expected)) == 24
    assert out.usage.total_tokens == out.usage.prompt_tokens + 24


def test_stream_equals_the_whole_answer(served, trained_small_dir):
    client = served.client()
    whole = client.completions.create(model=str(trained_small_dir), prompt="A list is", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=str(trained_small_dir), prompt="A list is", max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].choices == []


def test_stop_strings_end_the_text_before_them(served, local):
    model, tokenizer = local
    full = generate(model, tokenizer, "A list is", max_tokens=30)
    stop = full[full.index('"') :][:2]  # this model's greedy text: ' the "____...'
    out = served.client().completions.create(model=None, prompt="A list is", max_tokens=30, temperature=0,
                                             stop=[stop, "never in it"])  # fmt: skip
    assert out.choices[0].text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_every_prompt_form(served, local):
    model, tokenizer = local
    texts = ["The Python language", "A tuple is"]
    ids = [tokenizer.encode(t) for t in texts]
    expected = [generate(model, tokenizer, t, max_tokens=6) for t in texts]
    client = served.client()
    for prompt in (texts, ids, ids[0], texts[0]):
        out = client.completions.create(model=None, prompt=prompt, max_tokens=6, temperature=0)
        n = 1 if prompt in (ids[0], texts[0]) else 2
        assert [c.text for c in out.choices] == expected[:n]
        assert [c.index for c in out.choices] == list(range(n))
        assert out.usage.prompt_tokens == sum(map(len, ids[:n]))


def test_n_best_of_and_seeds(served):
    client = served.client()
    ask = dict(model=None, prompt="The Python language", max_tokens=12, temperature=1.0, seed=7)
    first, again = client.completions.create(n=3, **ask), client.completions.create(n=3, **ask)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # a seed reproduces
    assert len({c.text for c in first.choices}) > 1  # the n samples are not n copies of one
    best = client.completions.create(n=2, best_of=4, logprobs=0, **ask)
    assert len(best.choices) == 2 and best.usage.completion_tokens == 4 * 12
    four = client.completions.create(n=4, logprobs=0, **ask)  # the same 4 samples: best_of picks the top 2
    mean = lambda c: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)
    ranked = sorted(four.choices, key=lambda c: -mean(c))
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]


def test_sampling_extensions_and_penalties_are_applied(served, local):
    model, tokenizer = local
    client = served.client()
    plain = client.completions.create(model=None, prompt="The Python language", max_tokens=10, temperature=0)
    banned = tokenizer.encode(plain.choices[0].text)[0]
    biased = client.completions.create(model=None, prompt="The Python language", max_tokens=10, temperature=0,
                                       logit_bias={str(banned): -100})  # fmt: skip
    assert tokenizer.encode(biased.choices[0].text)[0] != banned
    expected = generate(model, tokenizer, "The Python language", max_tokens=10,
                        sampling=SamplingOptions(repetition_penalty=1.5))  # fmt: skip
    out = client.completions.create(model=None, prompt="The Python language", max_tokens=10, temperature=0,
                                    extra_body={"repetition_penalty": 1.5, "top_k": 5, "min_p": 0.1})  # fmt: skip
    assert out.choices[0].text == expected  # greedy: top_k and min_p keep the argmax
    penalised = client.completions.create(model=None, prompt="A list is", max_tokens=12, temperature=0,
                                          frequency_penalty=1.5, presence_penalty=0.5)  # fmt: skip
    assert tokenizer.encode(penalised.choices[0].text) == penalised_greedy(model, tokenizer.encode("A list is"), 12, 1.5, 0.5)


def penalised_greedy(model, ids: list[int], steps: int, frequency: float, presence: float) -> list[int]:
    """OpenAI's penalties written out: logit - frequency x count - presence x (count > 0), over the text so far."""
    import mlx.core as mx

    ids, new = list(ids), []
    for _ in range(steps):
        logits = np.array(model(mx.array(ids)[None])[0, -1].astype(mx.float32))
        counts = np.bincount(ids, minlength=logits.size)
        token = int(np.argmax(logits - frequency * counts - presence * (counts > 0)))
        ids.append(token)
        new.append(token)
    return new


# ---- Legacy logprobs: what evaluation harnesses read -----------------------------------------------------

def test_echo_logprobs_are_transformers_log_softmax(served, local, hf):
    model, tokenizer = local
    ids = tokenizer.encode(TEXT)
    out = served.client().completions.create(model=None, prompt=TEXT, max_tokens=0, echo=True, logprobs=3)
    lp = out.choices[0].logprobs
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()
    expected = [reference[i - 1, ids[i]] for i in range(1, len(ids))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], expected, atol=1e-4, rtol=0)
    assert lp.tokens == [tokenizer.decode([t]) for t in ids]
    assert "".join(lp.tokens) == out.choices[0].text == TEXT
    assert lp.text_offset == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    for i in (1, 5, len(ids) - 1):  # the top 3 of a position are transformers' top 3, most likely first
        top = np.argsort(-reference[i - 1])[:3]
        assert list(lp.top_logprobs[i]) == [tokenizer.decode([t]) for t in top]
        np.testing.assert_allclose(list(lp.top_logprobs[i].values()), reference[i - 1, top], atol=1e-4)
    assert out.usage.completion_tokens == 0 and out.choices[0].finish_reason == "length"
    # Their sum is what `perplexity` scores, token for token.
    scored = perplexity(model, tokenizer, TEXT)
    assert scored.tokens == len(ids) - 1
    assert -sum(lp.token_logprobs[1:]) == pytest.approx(scored.nll * scored.tokens, rel=1e-5)


def test_echo_with_generated_tokens_and_the_perplexity_command(served, local, trained_small_dir, tmp_path):
    model, tokenizer = local
    out = served.client().completions.create(model=None, prompt=TEXT, max_tokens=4, echo=True, logprobs=1, temperature=0)
    lp, n = out.choices[0].logprobs, len(tokenizer.encode(TEXT))
    assert len(lp.tokens) == n + 4 and out.choices[0].text == TEXT + generate(model, tokenizer, TEXT, max_tokens=4)
    # greedy: each generated token is its position's most likely one
    assert all(lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values()), abs=1e-6) for i in range(n, n + 4))
    (tmp_path / "text.txt").write_text(TEXT)
    script = Path(sys.executable).parent / "mlx-gpt2"
    cmd = subprocess.run([str(script), "perplexity", "--model", str(trained_small_dir), "--dtype", "float32", "-f",
                          str(tmp_path / "text.txt"), "--quiet"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert cmd.returncode == 0, cmd.stderr
    printed = float(re.search(r"perplexity[^\d]*([\d.]+)", cmd.stdout + cmd.stderr).group(1))
    mean = -sum(lp.token_logprobs[1:n]) / (n - 1)
    assert printed == pytest.approx(np.exp(mean), rel=1e-3)  # printed rounded


def test_generated_logprobs_and_offsets(served, local, hf):
    _, tokenizer = local
    out = served.client().completions.create(model=None, prompt="A list is", max_tokens=5, logprobs=2, temperature=0)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    start = len("A list is")
    assert lp.text_offset == [start + len("".join(lp.tokens[:i])) for i in range(5)]
    model, _ = local
    prompt = tokenizer.encode("A list is")
    ids = prompt + [r.token for r in stream_generate(model, tokenizer, "A list is", max_tokens=5)]
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()
    p = len(prompt)
    np.testing.assert_allclose(lp.token_logprobs, [reference[p - 1 + i, ids[p + i]] for i in range(5)], atol=1e-4)


def test_chat_completions(served, local):
    model, tokenizer = local
    messages = [{"role": "system", "content": "You answer about Python."}, {"role": "user", "content": "What is a list?"}]
    prompt = "You answer about Python.\n\nUser: What is a list?\nAssistant:"
    client = served.client()
    out = client.chat.completions.create(model=None, messages=messages, max_tokens=12, temperature=0, logprobs=True,
                                         top_logprobs=2)  # fmt: skip
    expected = generate(model, tokenizer, prompt, max_tokens=12, stop=["\nUser:", "\nSystem:"])
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))
    content = out.choices[0].logprobs.content
    assert "".join(c.token for c in content) == expected
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    stream = client.chat.completions.create(model=None, messages=messages, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_the_checkpoints_chat_template(trained_small_dir, tmp_path):
    """A fine-tune's own template (tokenizer_config.json) renders as transformers renders it."""
    from transformers import AutoTokenizer

    from mlx_gpt2.server.chat import ChatTemplate

    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")  # fmt: skip
    for path in trained_small_dir.iterdir():
        shutil.copyfile(path, tmp_path / path.name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|endoftext|>"}))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reference = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours = ChatTemplate.from_dir(tmp_path, eos_token="<|endoftext|>")
    assert ours.render(messages) == reference and ours.stops == []
    escape = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", bos_token="", eos_token="")
    with pytest.raises(Exception, match="unsafe"):  # sandboxed: a template computes text, it cannot reach Python
        escape.render(messages)


def test_response_format_json_schema_and_json_object(served):
    import jsonschema

    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0,
              "maximum": 99}}, "required": ["answer", "n"], "additionalProperties": False}  # fmt: skip
    client = served.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    chat = client.chat.completions.create(model=None, messages=[{"role": "user", "content": "Answer."}], max_tokens=40,
                                          temperature=1, seed=5, n=3, response_format=fmt)  # fmt: skip
    for choice in chat.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert choice.finish_reason == "stop"
    plain = client.completions.create(model=None, prompt="Reply:", max_tokens=40, temperature=1, seed=6,
                                      extra_body={"response_format": fmt})  # fmt: skip
    jsonschema.validate(json.loads(plain.choices[0].text), schema)
    anything = client.chat.completions.create(model=None, messages=[{"role": "user", "content": "JSON"}], max_tokens=60,
                                              temperature=0, response_format={"type": "json_object"})  # fmt: skip
    text = anything.choices[0].message.content
    assert text.startswith("{") and (anything.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))
    bad = served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wibble"}}}})  # fmt: skip
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    assert served.post("/v1/completions", {"prompt": "x", "response_format": {"type": "yaml"}}).status_code == 400


def test_tokenize_and_detokenize(served, local):
    _, tokenizer = local
    ids = tokenizer.encode("Hello world, GPT-2!")
    got = served.post("/tokenize", {"content": "Hello world, GPT-2!"}).json()
    assert got["tokens"] == ids and got["count"] == len(ids)
    pieces = served.post("/tokenize", {"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert pieces == [{"id": t, "piece": tokenizer.decode([t])} for t in tokenizer.encode("Hello world")]
    assert served.post("/detokenize", {"tokens": ids}).json()["content"] == "Hello world, GPT-2!"
    assert served.post("/detokenize", {"tokens": [50257]}).status_code == 400


def test_the_prompt_cache_serves_a_shared_prefix(served, local):
    model, tokenizer = local
    shared = tokenizer.encode("Few-shot examples: the zebra crossed the quiet harbour at dawn, twice.")
    a, b = shared + tokenizer.encode(" First"), shared + tokenizer.encode(" Second")
    client = served.client()
    first = client.completions.create(model=None, prompt=a, max_tokens=8, temperature=0)
    second = client.completions.create(model=None, prompt=b, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == len(shared)
    assert second.choices[0].text == generate(model, tokenizer, b, max_tokens=8)  # the same tokens as computed afresh


# ---- Bad input: one clean 4xx each, and the server goes on -----------------------------------------------

BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"prompt": "x", "temperature": 10**400}, 400, "temperature"),  # an integer too big for a float
    ({"prompt": "x", "repetition_penalty": 1e-300}, 400, "repetition_penalty"),
    ({"prompt": "x", "top_k": -1}, 400, "top_k"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 17}, 400, "n"),
    ({"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ({"prompt": "x", "echo": "yes"}, 400, "echo"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "seed": 2**64}, 400, "seed"),
    ({"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"hello": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"50257": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"prompt": [50257]}, 400, "prompt"),
    ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": [[1, 2], [2**40]]}, 400, "prompt"),
    ({"prompt": [1.5]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": {"text": "x"}}, 400, "prompt"),
    ({"prompt": [[1]] * 5000}, 400, "prompt"),  # more prompts than one request may hold
    ({"prompt": [[1]] * 300}, 400, "prompt"),  # more sequences than the server runs and queues
    ({"prompt": "x", "stop": ["s"] * 17}, 400, "stop"),
    ({"prompt": "x", "stop": "s" * 257}, 400, "stop"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "stream": True, "n": 1, "best_of": 2}, 400, "best_of"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"prompt": "x " * 200}, 400, "prompt"),  # past the 128-token window
    ({"prompt": list(range(120)), "max_tokens": 20}, 400, "prompt"),  # fits, but not with 20 more
]


@pytest.mark.parametrize("body, status, param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_are_clean_4xx(served, body, status, param):
    response = served.post("/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert "Traceback" not in error["message"] and len(error["message"]) < 400


def test_edge_requests_that_are_fine(served, local):
    model, tokenizer = local
    client = served.client()
    one = client.completions.create(model=None, prompt="Hi", max_tokens=0, echo=True, logprobs=2)
    assert one.choices[0].text == "Hi" and one.choices[0].logprobs.token_logprobs == [None]
    empty = client.completions.create(model=None, prompt="", max_tokens=3, temperature=0)  # from <|endoftext|>
    assert empty.choices[0].text == generate(model, tokenizer, "", max_tokens=3)
    tiny = client.completions.create(model=None, prompt="A list is", max_tokens=5, temperature=1e-30)
    assert tiny.choices[0].text == generate(model, tokenizer, "A list is", max_tokens=5)  # that cold is greedy
    full = list(range(100, 228))  # a prompt that fills the 128-token window can still be scored
    scored = client.completions.create(model=None, prompt=full, max_tokens=1, echo=True, logprobs=0)
    assert len(scored.choices[0].logprobs.token_logprobs) == 128 and scored.usage.completion_tokens == 0
    chat = client.chat.completions.create(model=None, n=2, max_completion_tokens=None, max_tokens=4, temperature=1,
                                          seed=1, messages=[{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": None},
                                                            {"role": "user", "content": "Go on"}])  # fmt: skip
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 8


def test_bad_chat_requests(served):
    for body, param in [({"messages": []}, "messages"), ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
                        ({"messages": [{"role": "user", "content": 5}]}, "messages"),
                        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}, "max_tokens")]:  # fmt: skip
        response = served.post("/v1/chat/completions", body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_sizes_routes_and_the_server_goes_on(served, local):
    huge = served.post("/v1/completions", json.dumps({"prompt": "a" * (10 * 2**20)}))
    assert huge.status_code == 413 and "8388608" in huge.json()["error"]["message"]
    long = served.post("/v1/completions", {"prompt": "word " * 200_000})  # 1 MB: under the body limit, over the window
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    deep = served.post("/v1/completions", "[" * 100_000 + "]" * 100_000)
    assert deep.status_code == 400
    assert httpx.get(served.url + "/v2/nothing").status_code == 404
    assert httpx.get(served.url + "/v1/completions").status_code == 405
    assert "error" in httpx.get(served.url + "/v2/nothing").json()
    assert healthy(served)["status"] == "ok"
    model, tokenizer = local
    out = served.client().completions.create(model=None, prompt="A tuple is", max_tokens=5, temperature=0)
    assert out.choices[0].text == generate(model, tokenizer, "A tuple is", max_tokens=5)


# ---- Under load ------------------------------------------------------------------------------------------

def load_requests(n: int) -> list[dict]:
    rng = random.Random(14)
    starts = ["The Python language", "A list is", "In the beginning", "def main():\n", "A tuple is an", "Errors"]
    requests = []
    for i in range(n):
        request = {"prompt": rng.choice(starts) + " " * rng.randint(0, 1), "max_tokens": rng.randint(1, 28)}
        if i % 3 == 1:
            request.update(temperature=0.9, top_p=0.9, seed=rng.randint(0, 10**6))
        elif i % 3 == 2:
            request.update(temperature=0.7, top_k=20, seed=i, frequency_penalty=0.5)
        else:
            request.update(temperature=0)
        if i % 4 == 3:
            request["stop"] = ["."]
        requests.append(request)
    return requests


async def stream_text(url: str, request: dict, disconnect_after: int | None = None) -> tuple[str, str | None]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    text, finish, seen = [], None, 0
    known = {"prompt", "max_tokens", "temperature", "top_p", "seed", "frequency_penalty", "stop"}
    extra = {k: v for k, v in request.items() if k not in known}  # our extensions (top_k) ride in the body
    asked = {k: v for k, v in request.items() if k in known}
    async with await client.completions.create(model=None, stream=True, extra_body=extra, **asked) as stream:
        async for chunk in stream:
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
            seen += 1
            if disconnect_after is not None and seen >= disconnect_after:
                break  # leaving the block closes the connection mid-stream
    await client.close()
    return "".join(text), finish


def test_32_concurrent_streams_each_equal_its_solo_run(served):
    requests = load_requests(32)
    solo = [asyncio.run(stream_text(served.url, r)) for r in requests]

    async def together():
        return await asyncio.gather(*(stream_text(served.url, r) for r in requests))

    assert asyncio.run(together()) == solo
    assert all(finish in ("stop", "length") for _, finish in solo)
    assert wait_idle(served) == {"status": "ok", "running": 0, "waiting": 0}


def test_clients_that_disconnect_free_their_slots(served):
    requests = load_requests(16)
    for r in requests:
        r["max_tokens"] = 30
        r.pop("stop", None)
    kept = list(range(0, 16, 2))
    solo = {i: asyncio.run(stream_text(served.url, requests[i])) for i in kept}
    rng = random.Random(3)

    async def together():
        calls = [stream_text(served.url, r, None if i in kept else rng.randint(1, 10)) for i, r in enumerate(requests)]
        return await asyncio.gather(*calls)

    results = asyncio.run(together())
    assert {i: results[i] for i in kept} == solo
    assert wait_idle(served) == {"status": "ok", "running": 0, "waiting": 0}

    async def abandon_non_streaming():  # a client that gives up on a plain request frees its slot too
        async with httpx.AsyncClient(timeout=0.3) as client:
            with pytest.raises(httpx.TimeoutException):
                await client.post(served.url + "/v1/completions", json={"prompt": "A list is", "max_tokens": 120,
                                                                        "n": 8, "logprobs": 5})  # fmt: skip

    asyncio.run(abandon_non_streaming())
    assert wait_idle(served) == {"status": "ok", "running": 0, "waiting": 0}


# ---- A second server: key, limits, template, queue -------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(trained_small_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("templated")
    for path in trained_small_dir.iterdir():
        shutil.copyfile(path, directory / path.name)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    server = Served("--model", directory, "--model-id", "tiny", "--api-key", "s3cret", "--max-queue", "0",
                    "--max-body-mb", "0.01", "--max-tokens-limit", "100", "--quiet", "--dtype", "float32",
                    "--draft-model", trained_small_dir, "--num-draft", "3")  # fmt: skip
    yield server
    server.stop()


def test_the_api_key(guarded):
    assert httpx.get(guarded.url + "/v1/models").status_code == 401
    wrong = guarded.post("/v1/completions", {"prompt": "x"}, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="nope").completions.create(model="tiny", prompt="x", max_tokens=1)
    assert guarded.client(api_key="s3cret").models.list().data[0].id == "tiny"
    assert httpx.get(guarded.url + "/health").status_code == 200  # a load balancer's probe carries no key


def test_limits_template_draft_and_a_full_queue(guarded, local):
    _, tokenizer = local
    key = {"authorization": "Bearer s3cret"}
    big = guarded.post("/v1/completions", {"prompt": "x" * 20_000}, headers=key)
    assert big.status_code == 413
    assert guarded.post("/v1/completions", {"prompt": "x", "max_tokens": 101}, headers=key).status_code == 400
    never = guarded.post("/v1/completions", {"prompt": "x", "n": 2, "max_tokens": 1}, headers=key)
    assert never.status_code == 400 and "at most 1" in never.json()["error"]["message"]  # 1 slot, no queue
    # One sequence decodes (the draft model serves one at a time) and none may wait: the next is a 429.
    with httpx.stream("POST", guarded.url + "/v1/completions", headers=key, timeout=120,
                      json={"prompt": "A list is", "max_tokens": 100, "temperature": 0, "stream": True}) as first:  # fmt: skip
        lines = first.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # it is running
        busy = guarded.post("/v1/completions", {"prompt": "x", "max_tokens": 1}, headers=key)
        rest = [line for line in lines if line.startswith("data: ")]
    assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error", busy.text
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    client = guarded.client(api_key="s3cret")
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert chat.usage.prompt_tokens == len(tokenizer.encode("[user] Hi\n[assistant]"))
    model, _ = local
    drafted = client.completions.create(model="tiny", prompt="A list is", max_tokens=8, temperature=0, logprobs=1)
    assert drafted.choices[0].text == generate(model, tokenizer, "A list is", max_tokens=8)  # speculative: the same tokens
    assert len(drafted.choices[0].logprobs.token_logprobs) == 8
    info = httpx.get(guarded.url + "/tokenizer_info", headers=key).json()
    assert info["chat_template"].startswith("{% for m in messages %}") and info["eos_token"] == "<|endoftext|>"


# ---- An evaluation harness as a client -------------------------------------------------------------------

def test_lm_eval_scores_a_multiple_choice_task(served, local, trained_small_dir, tmp_path, monkeypatch):
    """lm-eval's local-completions model scores a task built from Python's own license text; its
    per-choice log-likelihoods are those our API computes directly."""
    import sysconfig

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))  # not ~/.cache
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    import mlx.core as mx
    from lm_eval.tasks import TaskManager

    from mlx_gpt2.numerics import log_softmax

    model, tokenizer = local
    license_text = Path(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    sentences = [s.strip() for s in license_text.read_text().replace("\n", " ").split(". ") if 40 < len(s.strip()) < 160]
    rows = []
    for i, sentence in enumerate(sentences[:6]):
        words = sentence.split()
        context, answer = " ".join(words[:-3]), " ".join(words[-3:])
        distractors = [" ".join(sentences[(i + k) % len(sentences)].split()[-3:]) for k in (7, 13)]
        rows.append({"context": context, "choices": [answer, *distractors], "label": 0})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "license_mc.yaml").write_text(
        "task: license_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={trained_small_dir},base_url={served.url}/v1/completions,tokenizer_backend=remote,"
                   "num_concurrent=4,max_retries=1",
        tasks=["license_mc"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
    )  # fmt: skip
    samples = results["samples"]["license_mc"]
    assert len(samples) == len(rows)
    for sample in samples:
        assert [a[1] for a in sample["arguments"]] == [" " + c for c in sample["doc"]["choices"]]
        for (context, continuation), (loglikelihood, is_greedy) in zip(sample["arguments"], sample["filtered_resps"]):
            # as lm-eval splits a pair: the whole text tokenized, the context's tokens are the condition
            prompt, whole = tokenizer.encode(context), tokenizer.encode(context + continuation)
            logprobs = np.array(log_softmax(model(mx.array(whole)[None])[0].astype(mx.float32)))
            targets = range(len(prompt), len(whole))
            assert loglikelihood == pytest.approx(sum(logprobs[i - 1, whole[i]] for i in targets), abs=1e-4)
            assert is_greedy == all(logprobs[i - 1].argmax() == whole[i] for i in targets)
    accuracy = np.mean([max(range(3), key=lambda k: s["filtered_resps"][k][0]) == 0 for s in samples])
    assert results["results"]["license_mc"]["acc,none"] == accuracy


# ---- The command: Ctrl-C drains, bad options fail in one line ---------------------------------------------

def test_ctrl_c_lets_a_stream_finish_and_frees_the_port(trained_small_dir):
    server = Served("--model", trained_small_dir, "--host", "0.0.0.0", "--drain-timeout", "60")
    assert any("warning: --host 0.0.0.0" in line for line in server.lines)
    url = f"http://127.0.0.1:{server.address[1]}"
    events = []
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "A list is", "max_tokens": 100, "stream": True,
                                                             "temperature": 0, "stop": None}, timeout=120) as response:  # fmt: skip
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 1:
                    server.proc.send_signal(signal.SIGINT)  # Ctrl-C while the stream is running
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 100 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(60) == 0, "".join(server.lines)
    with socket.socket() as probe:  # the port is free again: a new server can listen there
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a restarted server does
        probe.bind(("0.0.0.0", int(server.address[1])))
        probe.listen()


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--max-concurrency", "0"], "--max-concurrency must be in [1, 256]"),
    (["--max-body-mb", "0"], "--max-body-mb must be in"),
])  # fmt: skip
def test_bad_options_fail_in_one_line(args, message):
    script = Path(sys.executable).parent / "mlx-gpt2"
    done = subprocess.run([str(script), "serve", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"error: {done.stderr.strip()[7:]}"]
    assert message in done.stderr

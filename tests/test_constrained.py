"""Constrained generation (issue 17): JSON Schema, regular expressions and Lark grammars, through llguidance,
in the API, the CLI and the server. Sampled outputs are checked by `jsonschema` and `re.fullmatch`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from mlx_gpt2 import (
    Draft,
    SamplingOptions,
    UserError,
    batch_generate_response,
    generate,
    load,
    stream_generate,
)
from mlx_gpt2.generation.constrained import Constraint

# Nested objects, arrays, enums, bounded integers, strings with patterns, optional fields; every valid
# instance is bounded in length, so every sample must finish within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "label": {"enum": ["cat", "dog", "bird"]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 4}, "verified": {"type": "boolean"}},
            "required": ["name"],
            "additionalProperties": False,
        },
        "scores": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9}, "maxItems": 2},
    },
    "required": ["id", "label", "code"],
    "additionalProperties": False,
}
REGEX = r"(yes|no|maybe)(, [0-9]{1,3} (cats|dogs))?\."


@pytest.fixture(scope="module")
def trained(trained_small_dir):
    return load(trained_small_dir, dtype="float32")


@pytest.fixture(scope="module")
def random_weights(small_converted):
    return load(small_converted)


def sample(model, tokenizer, n: int, **constraint) -> list[tuple[str, str]]:
    """n samples at temperature 1 (one batch), each with its own matcher; (text, finish reason)."""
    c = Constraint.of(tokenizer, **constraint)
    out = batch_generate_response(model, tokenizer, ["Record:"] * n, max_tokens=160, sampling=SamplingOptions(temp=1.0, seed=17),
                                  constraints=c)  # fmt: skip
    return list(zip(out.texts, out.finish_reasons))


def test_the_engines_tokenizer_is_ours_byte_for_byte(trained):
    from pydoc_data.topics import topics

    from mlx_gpt2.generation.constrained import engine_tokenizer

    _, tokenizer = trained
    engine = engine_tokenizer(tokenizer)
    differ = [i for i in range(tokenizer.vocab_size) if engine.decode_bytes([i]) != tokenizer.id_to_bytes(i)]
    # 187 is the lone byte 0xFF, which llguidance reserves as its own marker; it never occurs in UTF-8 text.
    assert differ == [187] and tokenizer.id_to_bytes(187) == b"\xff"
    text = topics["assert"] + " ünïcode 🤖   spaces\n\n\ttabs"
    assert engine.tokenize_str(text) == tokenizer.encode(text)
    assert engine.eos_token == tokenizer.eos_token_id and engine.vocab_size == tokenizer.vocab_size


@pytest.mark.parametrize("which", ["trained", "random_weights"])
def test_200_sampled_outputs_all_follow_the_schema(which, request):
    model, tokenizer = request.getfixturevalue(which)
    outputs = sample(model, tokenizer, 200, json_schema=SCHEMA)
    for text, finish in outputs:
        assert finish == "stop", (text, finish)  # the grammar completed
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({t for t, _ in outputs}) > 20  # samples, not one answer 200 times
    assert any("owner" in json.loads(t) for t, _ in outputs) and any("owner" not in json.loads(t) for t, _ in outputs)


@pytest.mark.parametrize("which", ["trained", "random_weights"])
def test_200_sampled_outputs_all_match_the_regex(which, request):
    model, tokenizer = request.getfixturevalue(which)
    outputs = sample(model, tokenizer, 200, regex=REGEX)
    assert all(finish == "stop" and re.fullmatch(REGEX, text) for text, finish in outputs), outputs[:5]
    assert len({t for t, _ in outputs}) > 5


def test_a_lark_grammar(trained):
    model, tokenizer = trained
    grammar = 'start: sum\nsum: NUMBER (" + " NUMBER)* " = " NUMBER\nNUMBER: /[1-9][0-9]?/\n'
    for text, finish in sample(model, tokenizer, 40, grammar=grammar):
        assert finish == "stop" and re.fullmatch(r"[1-9][0-9]?( \+ [1-9][0-9]?)* = [1-9][0-9]?", text), text


def test_greedy_constrained_is_greedy_when_greedy_already_follows(trained):
    model, tokenizer = trained
    free = generate(model, tokenizer, "A list is", max_tokens=12)
    assert free.startswith(' the "_')  # this model's greedy text
    pattern = r' the "_*'
    assert re.fullmatch(pattern, free)
    assert generate(model, tokenizer, "A list is", max_tokens=12, regex=pattern) == free
    lark = 'start: " the \\"" UNDERSCORES\nUNDERSCORES: /_*/\n'
    assert generate(model, tokenizer, "A list is", max_tokens=12, grammar=lark) == free
    drafted = generate(model, tokenizer, "A list is", max_tokens=12, regex=pattern, draft=Draft(model, num_draft=3))
    assert drafted == free  # speculative decoding: drafts checked against the same constraint


def test_constrained_speculative_and_streamed_match_plain(trained):
    model, tokenizer = trained
    plain = generate(model, tokenizer, "Record:", max_tokens=80, json_schema=SCHEMA)
    jsonschema.validate(json.loads(plain), SCHEMA)
    drafted = generate(model, tokenizer, "Record:", max_tokens=80, json_schema=SCHEMA, draft=Draft(model, num_draft=4))
    assert drafted == plain
    responses = list(stream_generate(model, tokenizer, "Record:", max_tokens=80, json_schema=json.dumps(SCHEMA)))
    assert "".join(r.text for r in responses) == plain and responses[-1].finish_reason == "stop"


def test_beam_search_keeps_every_beam_in_the_grammar(trained, trained_small_dir):
    from mlx_gpt2 import beam_search

    model, tokenizer = trained
    results = beam_search(model, tokenizer, ["Answer:", "Record:"], num_beams=3, max_tokens=40,
                          constraint=Constraint.of(tokenizer, regex=REGEX))  # fmt: skip
    assert all(r.finish_reason == "stop" and re.fullmatch(REGEX, r.text) for r in results), results
    one = beam_search(model, tokenizer, ["Answer:"], num_beams=1, max_tokens=40, constraint=Constraint.of(tokenizer, regex=REGEX))
    assert one[0].text == generate(model, tokenizer, "Answer:", max_tokens=40, regex=REGEX)  # one beam is greedy
    script = Path(sys.executable).parent / "mlx-gpt2"
    out = subprocess.run([str(script), "generate", "--model", str(trained_small_dir), "--prompt", "Answer:", "-n", "40",
                          "--num-beams", "3", "--regex", REGEX], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0 and out.stdout.rstrip("\n") == results[0].text, out.stderr


def test_cut_short_is_length(trained):
    model, tokenizer = trained
    responses = list(stream_generate(model, tokenizer, "Record:", max_tokens=3, json_schema=SCHEMA))
    assert responses[-1].finish_reason == "length"  # the output may be incomplete: it says so


def test_one_constraint_at_a_time_and_clear_errors(trained):
    _, tokenizer = trained
    with pytest.raises(UserError, match="one constraint at a time, not json_schema and regex"):
        Constraint.of(tokenizer, json_schema=SCHEMA, regex="a")
    with pytest.raises(UserError, match="the regex does not compile"):
        Constraint.of(tokenizer, regex="(")
    with pytest.raises(UserError, match="the json schema does not compile"):
        Constraint.of(tokenizer, json_schema={"type": "wibble"})
    with pytest.raises(UserError, match="not valid JSON"):
        Constraint.of(tokenizer, json_schema="{nope")
    with pytest.raises(UserError, match="the grammar does not compile"):
        Constraint.of(tokenizer, grammar="start: undefined_rule\n")
    with pytest.raises(TypeError, match="unexpected keyword argument 'regexp'"):
        generate(*trained, "x", regexp="a")


def test_the_cli(trained_small_dir, tmp_path):
    script = Path(sys.executable).parent / "mlx-gpt2"
    run = lambda *a: subprocess.run([str(script), "generate", "--model", str(trained_small_dir), "--prompt", "Record:",
                                     "-n", "80", *a], capture_output=True, text=True, timeout=300)  # fmt: skip
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    out = run("--json-schema", str(tmp_path / "schema.json"), "--temp", "1", "--seed", "3")  # a file (inline JSON too)
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), SCHEMA)
    out = run("--regex", REGEX, "--temp", "1", "--seed", "4")
    assert out.returncode == 0 and re.fullmatch(REGEX, out.stdout.rstrip("\n")), out.stdout + out.stderr
    (tmp_path / "sum.lark").write_text('start: NUMBER " + " NUMBER\nNUMBER: /[0-9]{1,2}/\n')
    out = run("--grammar", str(tmp_path / "sum.lark"))
    assert out.returncode == 0 and re.fullmatch(r"[0-9]{1,2} \+ [0-9]{1,2}", out.stdout.rstrip("\n")), out.stdout
    for args, message in [(["--regex", "a", "--json-schema", json.dumps({"type": "wibble"})], "error: give one constraint"),
                          (["--json-schema", str(tmp_path / "missing.json")], "error: --json-schema")]:  # fmt: skip
        out = run(*args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and message in lines[0], out.stderr

"""resolve_source against a real Hugging Face cache layout on disk, offline; and its error messages.

The cache is built the way huggingface_hub 2.x builds it: models--{org}--{name}/blobs/<hash> holds the
bytes, snapshots/<commit>/<file> are relative symlinks into blobs, refs/<branch> holds the commit hash
(no newline: huggingface_hub reads it verbatim). huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE
once, at import, so in-process tests patch huggingface_hub.constants; one test runs a fresh interpreter
with only the environment variables set, as a user would.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
from huggingface_hub.utils import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from checkpoints import expected_tensors, make_hf_model, write_checkpoint
from mlx_gpt2.convert.hub import is_repo_id, resolve_source
from mlx_gpt2.convert.read import read_tensors
from mlx_gpt2.errors import UserError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OFFLINE_MESSAGE = "is not in the local Hugging Face cache and the Hub cannot be reached"


def cache_repo(hub_cache: Path, repo_id: str, files: Path, *, commit: str = COMMIT, ref="main") -> Path:
    """Put the files of `files` into the cache as snapshot `commit` of `repo_id`; return the snapshot."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(files.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def _no_network(*args, **kwargs):
    raise AssertionError("snapshot_download must not be called")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME in tmp, offline; returns its hub/ cache folder."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (home / "hub").mkdir(parents=True)
    return home / "hub"


@pytest.fixture(scope="module")
def model():
    return make_hf_model({"vocab_size": 1000}, seed=3)


@pytest.mark.parametrize("layout", ["hub", "sharded", "bin"])
def test_cached_repo_resolves_offline(layout, model, offline_cache, tmp_path):
    files = write_checkpoint(model, tmp_path / "files", layout)
    snapshot = cache_repo(offline_cache, "org/name", files)
    resolved = resolve_source("org/name")
    assert resolved == snapshot
    tensors = read_tensors(resolved)
    assert sorted(tensors) == sorted(expected_tensors(model, layout))


def test_revision_picks_the_snapshot(model, offline_cache, tmp_path):
    files = write_checkpoint(model, tmp_path / "files", "hub")
    other = "f" * 40
    cache_repo(offline_cache, "org/name", files)
    tagged = cache_repo(offline_cache, "org/name", files, commit=other, ref="v1")
    assert resolve_source("org/name", revision="v1") == tagged
    assert resolve_source("org/name", revision=other) == tagged


def test_uncached_repo_offline_says_so(offline_cache):
    with pytest.raises(UserError, match=OFFLINE_MESSAGE) as info:
        resolve_source("org/absent")
    assert "org/absent" in str(info.value)
    assert "pass a local directory" in str(info.value)


def test_uncached_revision_offline_says_so(model, offline_cache, tmp_path):
    cache_repo(offline_cache, "org/name", write_checkpoint(model, tmp_path / "files", "hub"))
    with pytest.raises(UserError, match=OFFLINE_MESSAGE):
        resolve_source("org/name", revision="not-cached")


def test_cached_repo_without_weights_is_an_error(offline_cache, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "config.json").write_text("{}")
    cache_repo(offline_cache, "org/configonly", files)
    with pytest.raises(UserError, match="holds no model.safetensors or pytorch_model.bin"):
        resolve_source("org/configonly")


def test_env_vars_alone_are_honoured(model, tmp_path):
    """A fresh interpreter with HF_HOME and HF_HUB_OFFLINE set, nothing patched."""
    home = tmp_path / "hf-home"
    snapshot = cache_repo(home / "hub", "org/name", write_checkpoint(model, tmp_path / "files", "bin"))
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    script = "from mlx_gpt2.convert.hub import resolve_source; print(resolve_source('org/name'))"
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(snapshot)


# ---- local paths --------------------------------------------------------------------------------


def test_local_directory_passes_through(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_network)
    assert resolve_source(str(tmp_path)) == tmp_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_source("org/name") == Path("org/name")  # a local folder wins over a repo id


@pytest.mark.parametrize("source", ["./missing", "/no/such/dir", "~/no-such-dir-here"])
def test_local_looking_paths_that_do_not_exist(source, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_network)
    with pytest.raises(UserError, match="does not exist; pass a checkpoint directory or a Hugging Face"):
        resolve_source(source)


@pytest.mark.parametrize("source", ["a/b/c", "bad name", "org/-name"])
def test_neither_path_nor_repo_id(source, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_network)
    with pytest.raises(UserError, match="neither an existing directory nor a Hugging Face repo id"):
        resolve_source(source)


def test_a_file_is_not_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_network)
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(UserError, match="is a file, not a checkpoint directory"):
        resolve_source(str(file))


@pytest.mark.parametrize(
    "source, expected",
    [
        ("gpt2", True),
        ("openai-community/gpt2", True),
        ("mlx-community/gpt2-4bit", True),
        ("a/b/c", False),
        ("org/-name", False),
        ("org/name.", False),
        ("org--x/name", False),
        ("org/na..me", False),
        ("org/name.git", False),
        ("with space", False),
        ("", False),
        ("x" * 97, False),
    ],
)
def test_is_repo_id(source, expected):
    assert is_repo_id(source) is expected


# ---- huggingface_hub errors, one line each ------------------------------------------------------


# The HTTP client huggingface_hub is built on: httpx2 from 2.x, httpx in 1.x, requests before.
_HTTP = importlib.import_module(
    {"0": "requests", "1": "httpx"}.get(huggingface_hub.__version__.split(".")[0], "httpx2")
)
_URL = "https://huggingface.co/api/models/org/name"


def _http_error(cls, status: int):
    if _HTTP.__name__ == "requests":
        response = _HTTP.Response()
        response.status_code, response.url = status, _URL
    else:
        response = _HTTP.Response(status, request=_HTTP.Request("GET", _URL))
    return cls(f"{status} Client Error", response=response)


def _connect_error(message: str):
    return (_HTTP.ConnectionError if _HTTP.__name__ == "requests" else _HTTP.ConnectError)(message)


def _proxy_error(message: str):
    return (_HTTP.exceptions.ProxyError if _HTTP.__name__ == "requests" else _HTTP.ProxyError)(message)


@pytest.mark.parametrize(
    "error, message",
    [
        (_http_error(RepositoryNotFoundError, 404), "was not found on the Hugging Face Hub"),
        (_http_error(GatedRepoError, 403), "gated repo: accept its licence .* set HF_TOKEN"),
        (_http_error(RevisionNotFoundError, 404), "revision 'v9' of org/name was not found"),
        (_http_error(HfHubHTTPError, 503), "answered 503"),
        (LocalEntryNotFoundError("Cannot find ..."), OFFLINE_MESSAGE),
        (_connect_error("[Errno -2] Name or service not known"), "could not reach the Hugging Face Hub"),
        (_proxy_error("407"), "check your network or proxy"),
    ],
)
def test_hub_errors_become_one_line(error, message, monkeypatch):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fails)
    with pytest.raises(UserError, match=message) as info:
        resolve_source("org/name", revision="v9")
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is error


def test_other_errors_pass_through(monkeypatch):
    def fails(*args, **kwargs):
        raise PermissionError("cache is read-only")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fails)
    with pytest.raises(PermissionError):
        resolve_source("org/name")


def test_bin_is_fetched_only_when_there_are_no_safetensors(tmp_path, monkeypatch):
    """The second download asks for pytorch_model*.bin, never the first."""
    calls = []
    folder = tmp_path / "snapshot"
    folder.mkdir()

    def download(repo_id, *, revision, allow_patterns):
        calls.append(allow_patterns)
        if any("pytorch_model" in p for p in allow_patterns):
            (folder / "pytorch_model.bin").write_bytes(b"")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_source("org/name") == folder
    assert len(calls) == 2
    assert "config.json" in calls[0] and not any(".bin" in p for p in calls[0])
    assert "pytorch_model*.bin" in calls[1] and "pytorch_model.bin.index.json" in calls[1]

    calls.clear()
    (folder / "model.safetensors").write_bytes(b"")
    resolve_source("org/name")
    assert len(calls) == 1

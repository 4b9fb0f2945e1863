"""Turn what the user typed into a checkpoint directory: a local folder, or a Hub snapshot.

Downloads go through `huggingface_hub.snapshot_download`, which owns the cache (HF_HOME, HF_HUB_CACHE),
offline mode (HF_HUB_OFFLINE), authentication (HF_TOKEN) and the progress bars; this module only picks
which files to fetch and turns its errors into one line that says what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub
from huggingface_hub.utils import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from mlx_gpt2.errors import UserError

# Everything a GPT-2 checkpoint needs, and nothing else (the gpt2 repo also holds TF, Flax, ONNX, ...).
CONFIG_AND_TOKENIZER = [
    "config.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
]
SAFETENSORS_PATTERNS = ["model*.safetensors", "model.safetensors.index.json"]
TORCH_BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]

# huggingface_hub's own rule: "name" or "namespace/name", [A-Za-z0-9_.-], 1-96 characters each.
_REPO_ID = re.compile(r"(?:[A-Za-z0-9_.-]{1,96}/)?[A-Za-z0-9_.-]{1,96}")


def is_repo_id(source: str) -> bool:
    """Whether `source` is shaped like a Hugging Face repo id ("gpt2", "openai-community/gpt2")."""
    return (
        bool(_REPO_ID.fullmatch(source))
        and not any(part[0] in "-." or part[-1] in "-." for part in source.split("/"))
        and "--" not in source
        and ".." not in source
        and not source.endswith(".git")
    )


def resolve_source(source: str, *, revision: str | None = None) -> Path:
    """A local checkpoint directory as is, or the snapshot of a Hub repo, downloaded if need be."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{source} is a file, not a checkpoint directory; pass the folder that holds it")
    if source.startswith((".", "/", "~")):
        raise UserError(
            f"{source} does not exist; pass a checkpoint directory or a Hugging Face repo id "
            "(like openai-community/gpt2)"
        )
    if not is_repo_id(source):
        raise UserError(
            f"{source!r} is neither an existing directory nor a Hugging Face repo id "
            "(like openai-community/gpt2); check the path"
        )
    if revision is not None and not (isinstance(revision, str) and revision.strip()):
        raise UserError(f"revision must be a branch, tag or commit hash, not {revision!r}")
    snapshot = _download(source, revision, CONFIG_AND_TOKENIZER + SAFETENSORS_PATTERNS)
    if not any(snapshot.glob("*.safetensors")):
        snapshot = _download(source, revision, CONFIG_AND_TOKENIZER + TORCH_BIN_PATTERNS)
    if not any(snapshot.glob("*.safetensors")) and not any(snapshot.glob("pytorch_model*.bin")):
        raise UserError(
            f"{_name(source, revision)} holds no model.safetensors or pytorch_model.bin; "
            "is it a PyTorch GPT-2 checkpoint?"
        )
    return snapshot


def _download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> Path:
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=allow_patterns
        )
    except Exception as error:
        mapped = _user_error(error, repo_id, revision)
        if mapped is error:
            raise
        raise mapped from error
    return Path(folder)


def _user_error(error: Exception, repo_id: str, revision: str | None) -> Exception:
    """One actionable line for each way huggingface_hub can fail; anything else passes through."""
    name = _name(repo_id, revision)
    if isinstance(error, GatedRepoError):
        return UserError(
            f"{repo_id} is a gated repo: accept its licence at https://huggingface.co/{repo_id} "
            "and set HF_TOKEN (or run `hf auth login`)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return UserError(
            f"{repo_id} is not a local directory and was not found on the Hugging Face Hub; "
            "check the name, or set HF_TOKEN if the repo is private"
        )
    if isinstance(error, RevisionNotFoundError):
        return UserError(
            f"revision {revision!r} of {repo_id} was not found on the Hugging Face Hub; "
            "pass an existing branch, tag or commit hash"
        )
    if isinstance(error, DisabledRepoError):
        return UserError(f"{repo_id} has been disabled on the Hugging Face Hub; use another repo")
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return UserError(
            f"{name} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE=1 or no network); download it once online or pass a local directory"
        )
    if isinstance(error, HFValidationError):
        return UserError(f"{repo_id!r} is not a valid Hugging Face repo id; pass namespace/name")
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", "an error")
        return UserError(
            f"the Hugging Face Hub answered {status} while downloading {name}; "
            "try again later, or check HF_TOKEN"
        )
    if isinstance(error, _network_errors()):
        return UserError(
            f"could not reach the Hugging Face Hub to download {name} ({type(error).__name__}); "
            "check your network or proxy, or pass a local directory"
        )
    return error


def _network_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's transport errors: httpx2 (huggingface_hub 2), httpx (1.x), requests (0.x)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, attribute in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                              ("requests", "RequestException")):  # fmt: skip
        try:
            errors.append(getattr(__import__(module), attribute))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _name(repo_id: str, revision: str | None) -> str:
    return repo_id if revision is None else f"{repo_id} (revision {revision})"

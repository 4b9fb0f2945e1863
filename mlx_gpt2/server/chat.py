"""Chat messages -> one prompt: the checkpoint's own chat template where it has one, else a plain transcript.

GPT-2 was never trained on chat, so the transcript is the simplest honest form: a system message first,
then one line per turn, each turn named (`User:`, `Assistant:`), ending with `Assistant:` for the reply:

    You are a helpful assistant.

    User: What is the capital of France?
    Assistant:

Generation stops where the next turn would begin (`\\nUser:`, `\\nSystem:`), or at <|endoftext|>. A
fine-tune with a `chat_template` in its tokenizer_config.json gets its own template instead, rendered as
transformers renders it (Jinja, sandboxed: a template can compute text, not reach the machine).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

TRANSCRIPT_STOPS = ["\nUser:", "\nSystem:"]
NAMES = {"user": "User", "assistant": "Assistant", "system": "System", "developer": "System"}


class ChatTemplate:
    """Renders messages into a prompt; `stops` are the strings that end a reply with this template."""

    def __init__(self, template: str | None, *, bos_token: str, eos_token: str) -> None:
        self.source, self.bos_token, self.eos_token = template, bos_token, eos_token
        self.stops = [] if template else list(TRANSCRIPT_STOPS)
        self._compiled = None
        if template:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            try:
                self._compiled = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
            except Exception as error:  # jinja2's TemplateSyntaxError and kin
                raise UserError(f"the checkpoint's chat_template does not compile: {error}") from None

    @classmethod
    def from_dir(cls, directory: Path, *, eos_token: str) -> ChatTemplate:
        """The template of tokenizer_config.json in `directory`, if it has one; the transcript otherwise."""
        path = Path(directory) / "tokenizer_config.json"
        template = None
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, OSError, RecursionError):
                config = {}
            template = config.get("chat_template") if isinstance(config, dict) else None
            if isinstance(template, list):  # several named templates: the default one
                template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
            if not isinstance(template, str):
                template = None
        return cls(template, bos_token=eos_token, eos_token=eos_token)

    def render(self, messages: list[dict[str, str]]) -> str:
        if self._compiled is not None:
            return self._compiled.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                         eos_token=self.eos_token)  # fmt: skip
        return transcript(messages)


def transcript(messages: list[dict[str, str]]) -> str:
    """The plain transcript: a leading system message as a paragraph, then `Name: text` lines, then `Assistant:`."""
    lines, rest = [], messages
    if messages and messages[0]["role"] in ("system", "developer"):
        lines.append(messages[0]["content"].strip() + "\n")
        rest = messages[1:]
    lines += [f"{NAMES[m['role']]}: {m['content'].strip()}" for m in rest]
    return "\n".join([*lines, "Assistant:"])

"""Chat templates: the checkpoint's Jinja template, rendered in a sandbox as transformers renders it.

The template comes from ``chat_template.jinja`` beside the checkpoint, else the
``chat_template`` of its ``tokenizer_config.json`` (a string, or a list of named templates of
which "default" is used). It is rendered by jinja2's ``ImmutableSandboxedEnvironment`` with
``trim_blocks`` and ``lstrip_blocks``, the variables ``messages``, ``add_generation_prompt``
and the special tokens of tokenizer_config.json, and a ``raise_exception`` function, as
transformers' ``apply_chat_template`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from formerkit.errors import CheckpointError, InputError

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplate:
    """A compiled chat template and the special tokens its rendering sees."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as err:
            raise CheckpointError(f"the checkpoint's chat template does not compile: {err}") from err
        self.special_tokens = special_tokens or {}

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` ([{"role", "content"}, ...]); InputError if the template refuses them."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except jinja2.TemplateError as err:
            raise InputError(f"the chat template cannot render these messages: {err}") from err


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _token_text(value: object) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_chat_template(directory: str | Path) -> ChatTemplate | None:
    """The chat template saved with a checkpoint directory, or None when it has none."""
    directory = Path(directory)
    config_file = directory / "tokenizer_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err
    special = {name: text for name in _SPECIAL if (text := _token_text(config.get(name))) is not None}
    jinja_file = directory / "chat_template.jinja"
    source = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        return None
    return ChatTemplate(source, special)

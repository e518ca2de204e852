"""The request bodies of the OpenAI-compatible routes, as pydantic models (unknown fields are ignored).

A field of the wrong type fails validation, which the app turns into a 400 naming the field.
Ranges (temperature >= 0, top_p in (0, 1], ...) are checked by ``SamplingParams`` /
``GenerationConfig``, whose messages name the field too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from formerkit.serve.sampling import SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    """``stream_options``: include_usage adds a last chunk with the usage (and no choices)."""

    include_usage: bool = False


class SamplingFields(_Body):
    """The generation fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = None
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    def sampling(self, max_tokens: int, logprobs: int | None, seed: int | None) -> SamplingParams:
        """These fields as the engine's ``SamplingParams`` (top_k of 0 or -1 means off, as in vLLM)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop or () if s)
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              top_k=self.top_k if self.top_k and self.top_k > 0 else None,
                              top_p=self.top_p if self.top_p < 1 else None, min_p=self.min_p or None,
                              repetition_penalty=self.repetition_penalty, seed=seed, stop=stop,
                              logprobs=logprobs, ignore_eos=self.ignore_eos)


class CompletionRequest(SamplingFields):
    """POST /v1/completions: a prompt (text, texts, token ids or lists of token ids)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatMessage(_Body):
    """One chat message: a role and its text (a string, or a list of text parts)."""

    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The message's text: the string, or its text parts joined."""
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions: messages rendered with the checkpoint's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True


class EmbeddingRequest(_Body):
    """POST /v1/embeddings: one text or a list of texts."""

    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"

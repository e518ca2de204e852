"""Serving: the continuous-batching engine (no HTTP here) and, with the ``serve`` extra, the OpenAI-compatible app.

``Engine`` and ``SamplingParams`` need only torch; ``formerkit.serve.app`` imports FastAPI.
"""

from formerkit.serve.engine import ContextLengthError, Engine, Output, QueueFullError, Request
from formerkit.serve.sampling import SamplingParams, TokenLogprobs

__all__ = ["ContextLengthError", "Engine", "Output", "QueueFullError", "Request", "SamplingParams", "TokenLogprobs"]

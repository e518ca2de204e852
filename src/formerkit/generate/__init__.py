"""Generation: one GenerationConfig; decoding loops, sampling, beam search, speculative, Jacobi and early-exit
decoding, KV-cache eviction policies."""

from formerkit.generate.beam import BeamOutput, beam_search
from formerkit.generate.cache_policy import CachePolicy
from formerkit.generate.config import GenerationConfig
from formerkit.generate.decode import generate, stream
from formerkit.generate.early_exit import EarlyExitOutput, early_exit_generate
from formerkit.generate.eviction import policy_logits
from formerkit.generate.jacobi import JacobiOutput, jacobi_generate
from formerkit.generate.speculative import SpeculativeOutput, speculative_generate
from formerkit.generate.steps import decode_step, prefill
from formerkit.generate.text import generate_text

__all__ = ["BeamOutput", "beam_search", "CachePolicy", "decode_step", "EarlyExitOutput", "early_exit_generate",
           "generate", "generate_text", "GenerationConfig", "jacobi_generate", "JacobiOutput", "policy_logits",
           "prefill", "speculative_generate", "SpeculativeOutput", "stream"]

"""Generation: decoding loops, sampling, beam search, speculative decoding."""

from formerkit.generate.beam import BeamOutput, beam_search
from formerkit.generate.decode import decode_step, generate, prefill, stream
from formerkit.generate.speculative import SpeculativeOutput, speculative_generate
from formerkit.generate.stream import generate_text

__all__ = ["BeamOutput", "beam_search", "decode_step", "generate", "generate_text", "prefill", "speculative_generate",
           "SpeculativeOutput", "stream"]

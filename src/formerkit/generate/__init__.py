"""Generation: decoding loops, sampling, beam search, speculative decoding."""

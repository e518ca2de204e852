"""Building blocks of the Transformer, one concept per module."""

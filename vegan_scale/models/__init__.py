"""Networks, encoders, decoders and the auto-encoder (pure torch)."""

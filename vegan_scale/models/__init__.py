"""Networks, encoders, decoders and the auto-encoder (pure torch), and their options (``options.py``, torch-free)."""

"""Latent penalties D_Z(Q_Z, P_Z) (pure torch), and their options (``options.py``, torch-free)."""

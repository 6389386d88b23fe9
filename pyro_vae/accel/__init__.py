"""Acceleration: recording and compiled replay, compiled density kernels.

Installed by :mod:`pyro_vae.infer` (and the training engine); never imported
by :mod:`pyro_vae.components` or :mod:`pyro_vae.models`, which stay plain
Pyro and PyTorch.
"""

"""Triton kernels of the encoder, installed as `gundam.kernels`.

Each module holds one kernel and its launcher. They take tensors and segment tables and know nothing of
images or checkpoints.
"""

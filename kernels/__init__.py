"""Triton kernels of the encoder, installed as `gundam.kernels`.

Each kernel module holds its kernels, their launchers, the autograd Function where there is a backward, and a
torch reference with the same arguments where the kernel computes something new. They take tensors, segment
tables and row maps and know nothing of images or checkpoints. The planning code imports without Triton:
`segments` builds the host-side tables (segment and program tables, row maps), `tiling` holds every block-size
heuristic. Every launcher follows `launch.py`: a wrong type or dtype raises TypeError, a wrong shape, stride,
device or value ValueError; `config=` overrides the heuristic block sizes. `compile_check` builds every kernel
at its production configs for real GPUs without one.
"""

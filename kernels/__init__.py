"""Triton kernels of the encoder, installed as `gundam.kernels`.

Each module holds one kernel, its launcher and a torch reference with the same arguments where the kernel
computes something new. They take tensors, segment tables and row maps and know nothing of images or
checkpoints. Every launcher follows `launch.py`: a wrong type or dtype raises TypeError, a wrong shape,
stride, device or value ValueError; `config=` overrides the heuristic block sizes. `compile_check` builds
each kernel's registered production configs for real GPUs without one.
"""

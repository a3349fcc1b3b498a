"""Attention kernels for block diffusion (importable as `cascade_kernels`)."""

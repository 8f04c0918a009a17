"""Triton kernels of layerroute_rt, each with its launch wrapper and autograd.Function."""

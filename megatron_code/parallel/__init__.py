"""Parallelism: the layout and its process groups, tensor-parallel layers, gradient reduction."""

"""Benchmarks that print numbers and ratios (speed targets live here, not in timed unit tests).

step.py: the training step vs pytorch/examples'; data.py: shards, streaming, JPEG decoding;
ray_overhead.py: Ray Train vs a plain loop; scaling.py: compute + allreduce -> the scaling model.
"""

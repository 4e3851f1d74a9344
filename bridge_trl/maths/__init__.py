"""The maths-reasoning kit: the accuracy reward, prompt templates, data loaders and benchmark evaluation.

The trainer core (`bridge_trl.trainer` and what it imports) never imports this package: BRIDGE trains on any
TRL reward function and dataset; this kit is what the paper's recipes plug in.
"""

"""Quantization formats and recipes, the streaming converter, and the memory planner."""

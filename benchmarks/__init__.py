"""Benchmarks (not part of the node pack ComfyUI loads): see benchmarks/README.md."""

"""Triadic split computing for LLaMA-family models: Edge -> Cloud -> Edge."""

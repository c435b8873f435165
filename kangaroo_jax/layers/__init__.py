"""Reusable building blocks: dense layers with logical axes, norms, rotary embeddings, resizing."""

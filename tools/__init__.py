"""Command-line tools of kangaroo-jax."""

"""isdaa-jax: Direct Alignment Algorithms with importance weighting for Llama models in JAX."""

__version__ = "0.1.0"

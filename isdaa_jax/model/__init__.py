"""The Llama model, its Hugging Face I/O and log-prob computation."""

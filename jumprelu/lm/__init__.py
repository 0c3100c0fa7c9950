"""Real activations: a decoder-only LM (Llama family, Gemma 2) in JAX, its loaders and text sources."""

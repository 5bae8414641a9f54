"""plug_jax: Persona-Plug (PPlug) personalized LLMs in JAX/Flax."""

"""Models: the base model manifest, GGUF and hub bases, the built-in model, devices, 4-bit and loading."""

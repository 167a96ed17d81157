"""Checkpoint loading: Hugging Face directories (safetensors), GGUF files, the default model."""

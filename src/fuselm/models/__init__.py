"""Model architectures; ``registry.get_model_class`` maps an HF architecture name to a class."""

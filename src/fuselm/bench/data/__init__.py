"""Public-domain texts for ``fuselm bench perplexity`` (see README.md)."""

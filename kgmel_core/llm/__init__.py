"""Stages 1 and 3: the LiteLLM client, the packaged local model, prompts, parsers, triple filtering."""

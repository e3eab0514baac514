"""Data and KB: benchmark readers (MIMIC layout), the demo dataset, and the exact texts each side embeds."""

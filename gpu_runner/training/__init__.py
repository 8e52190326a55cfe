"""LoRA / DoRA / textual-inversion training as a library (no database, no queue).

Import the submodules you need: `config` works without torch; the rest need the runner extra.
"""

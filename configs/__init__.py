"""Hydra's config tree (installed as vlmtune.configs): groups mirror the code's seams."""

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parent)

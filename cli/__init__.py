"""Typer front end of layerzo, installed as ``layerzo.cli``."""

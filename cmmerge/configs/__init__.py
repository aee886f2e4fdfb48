"""Hydra configs shipped with cmmerge (package data)."""

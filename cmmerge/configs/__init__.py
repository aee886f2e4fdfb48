"""Hydra configs shipped with cmmerge (package data). Importing it (as Hydra does to read them)
stores the shared top-level keys' defaults (:mod:`cmmerge.config.keys`) that common.yaml lists."""

from cmmerge.config.store import register

register()

"""The declared keys' defaults, put in Hydra's ConfigStore where the YAML files name them."""

from __future__ import annotations

from cmmerge.config import keys, sections


def register() -> None:
    """Store the top-level keys (:mod:`~cmmerge.config.keys`: ``keys``, ``keys_<command>``) and
    the training sections (:mod:`~cmmerge.config.sections`: the ``train`` group's ``default``)."""
    keys.register()
    sections.register()

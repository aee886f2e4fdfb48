"""One Hydra composition for a plain single run (``cmmerge <stage> key=value ...``).

Hydra's ``main`` composes a run's config twice (once only to read ``hydra.mode``), and the
key check of :mod:`cmmerge.config.overrides` composed it a third time. For a command with no
Hydra option, no ``hydra.*`` override and no stage that sets ``hydra.mode`` (only ``sweep``
does), the mode is known to be unset, and the key check can look at the config Hydra composes
anyway, just before it applies the command line's overrides. :func:`one_composition` arranges
both for the duration of one ``main`` call and undoes them after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from omegaconf import DictConfig


def is_plain_run(stage: str, args: list[str], overrides: list[str]) -> bool:
    """Whether ``cmmerge <stage> args`` is a single run whose ``hydra.mode`` is unset: no Hydra
    option (``-m``, ``--cfg``, ``--help``, ``--config-dir``...), no ``hydra`` override, not a
    sweep."""
    return (
        _hydra_has_the_hooks()
        and stage != "sweep"
        and not any(arg.startswith("-") for arg in args)
        and not any(o.lstrip("+~").startswith("hydra") for o in overrides)
    )


def _hydra_has_the_hooks() -> bool:
    """Whether this Hydra has the two internals :func:`one_composition` replaces (Hydra 1.3
    does); without them a run composes as Hydra does by itself, with the separate key check."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.hydra import Hydra

    return "get_mode" in Hydra.__dict__ and isinstance(
        ConfigLoaderImpl.__dict__.get("_apply_overrides_to_config"), staticmethod
    )


@contextmanager
def one_composition(check_keys: Callable[[DictConfig], None] | None) -> Iterator[None]:
    """Inside: Hydra's mode query answers "unset" without composing (what it finds for a plain
    run), and ``check_keys``, when given, runs once on the first config Hydra composes, after
    the group choices and before the overrides are applied (where an unknown key would fail)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.hydra import Hydra

    get_mode = Hydra.__dict__["get_mode"]
    apply = ConfigLoaderImpl.__dict__["_apply_overrides_to_config"]
    pending = [check_keys] if check_keys is not None else []

    def checked_apply(overrides: list, cfg: DictConfig) -> None:
        while pending:
            pending.pop()(cfg)
        apply.__func__(overrides, cfg)

    Hydra.get_mode = lambda self, config_name, overrides: None  # type: ignore[method-assign]
    ConfigLoaderImpl._apply_overrides_to_config = staticmethod(checked_apply)  # type: ignore
    try:
        yield
    finally:
        Hydra.get_mode = get_mode  # type: ignore[method-assign]
        ConfigLoaderImpl._apply_overrides_to_config = apply  # type: ignore[method-assign]

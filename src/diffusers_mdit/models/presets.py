"""Named model presets: ``Model.from_preset(name, **config_overrides)``, shared by every model
family of the package, and a registry to find a preset's model class by name.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

# preset name (aliases included) -> the model class that owns it, filled by
# :func:`register_presets`.
PRESET_OWNERS: dict[str, type] = {}
# former preset name -> its current name: renamed presets keep working under the old name.
PRESET_ALIASES: dict[str, str] = {}


class PresetMixin:
    """Adds :meth:`list_presets`, :meth:`preset_config` and :meth:`from_preset` to a
    ``ConfigMixin`` model. Tables are attached with :func:`register_presets`."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    preset_aliases: ClassVar[dict[str, str]] = {}

    @classmethod
    def list_presets(cls) -> list[str]:
        """Names accepted by :meth:`from_preset`."""
        return list(cls.presets)

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> dict[str, Any]:
        """The config dict of preset ``name`` (or of a former name, see
        :data:`PRESET_ALIASES`) with ``overrides`` (config fields) applied."""
        name = cls.preset_aliases.get(name, name)
        if name not in cls.presets:
            owner = PRESET_OWNERS.get(name)
            hint = f" {name!r} is a preset of {owner.__name__}." if owner else ""
            raise ValueError(
                f"Unknown {cls.__name__} preset {name!r}.{hint} Available presets: "
                f"{', '.join(cls.presets)}."
            )
        fields = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = set(overrides) - set(fields)
        if unknown:
            raise ValueError(
                f"Unknown config field(s) {sorted(unknown)} for {cls.__name__}. "
                f"Valid fields: {', '.join(fields)}."
            )
        return {**cls.presets[name], **overrides}

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        """Build a randomly initialised model from the named preset; ``overrides`` replace
        config fields, e.g. ``num_classes=0`` (unconditional) or ``in_channels=3``."""
        return cls(**cls.preset_config(name, **overrides))


def register_presets(
    cls: type[PresetMixin],
    presets: dict[str, dict[str, Any]],
    aliases: dict[str, str] | None = None,
) -> None:
    """Attach a preset table to ``cls`` and record its names in :data:`PRESET_OWNERS`;
    ``aliases`` maps former names to names of ``presets``."""
    aliases = aliases or {}
    unknown = set(aliases.values()) - set(presets)
    if unknown:
        raise ValueError(f"Aliases of unknown presets: {sorted(unknown)}.")
    cls.presets = presets
    cls.preset_aliases = aliases
    for name in [*presets, *aliases]:
        PRESET_OWNERS[name] = cls
    PRESET_ALIASES.update(aliases)


def from_preset(name: str, **overrides: Any):
    """Build any model of the package from its preset name (see :func:`list_presets`)."""
    if name not in PRESET_OWNERS:
        raise ValueError(
            f"Unknown preset {name!r}. Available presets: {', '.join(list_presets())}."
        )
    return PRESET_OWNERS[name].from_preset(name, **overrides)


def list_presets() -> list[str]:
    """Every preset name of every model family in the package (former names left out)."""
    return [name for name in PRESET_OWNERS if name not in PRESET_ALIASES]

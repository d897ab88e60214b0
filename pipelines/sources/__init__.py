"""Dataset sources, looked up by name and imported only when used (STYLE.md habit 1).

Adding a dataset = one module with a :class:`~pipelines.sources.base.Source`
subclass + one line in :data:`SOURCES`.
"""

from __future__ import annotations

import importlib

from pipelines.sources.base import ExtractConfig, Source, SourceError

SOURCES: dict[str, str] = {
    "waymo_e2e": "pipelines.sources.waymo_e2e:WaymoE2ESource",
    "nuscenes": "pipelines.sources.nuscenes:NuScenesSource",
    "nuplan": "pipelines.sources.nuplan:NuPlanSource",
    "bench2drive": "pipelines.sources.bench2drive:Bench2DriveSource",
}


def get_source_class(name: str) -> type[Source]:
    """The source class registered as ``name``; an unknown name lists the valid ones."""
    try:
        target = SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown dataset source {name!r}; valid: {sorted(SOURCES)}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def make_source(cfg: ExtractConfig) -> Source:
    """Build the source for ``cfg.dataset`` (checks the input path before any work)."""
    return get_source_class(cfg.dataset)(cfg)


__all__ = ["SOURCES", "ExtractConfig", "Source", "SourceError", "get_source_class", "make_source"]

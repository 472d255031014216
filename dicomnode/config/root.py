"""The whole configuration document (:class:`Config`), made of the sections of the other modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dicomnode.config.destinations import Destination
from dicomnode.config.node import (
    CompletionConfig,
    LoggingConfig,
    MetricsConfig,
    NodeConfig,
    RayConfig,
    StorageConfig,
    UiConfig,
    WorkerConfig,
)
from dicomnode.config.pipelines import PipelineConfig, Rule
from dicomnode.errors import ConfigError


@dataclass(frozen=True)
class Config:
    """The whole node configuration. Build it with :func:`load_config` or :func:`parse_config`."""

    node: NodeConfig = field(default_factory=NodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    destinations: tuple[Destination, ...] = ()
    pipelines: tuple[PipelineConfig, ...] = ()
    rules: tuple[Rule, ...] = ()
    unmatched: Literal["ignore", "forward"] = "ignore"  # series matching no rule: record as ignored, or forward
    unmatched_destinations: tuple[str, ...] = ()  # where 'forward' sends unmatched series (default: all)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    ui: UiConfig = field(default_factory=UiConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def spool_dir(self) -> Path:
        return self.storage.path / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.storage.path / "outbox"

    @property
    def db_path(self) -> Path:
        return self.storage.path / "dicomnode.sqlite3"

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise ConfigError(f"unknown destination {name!r}")

    def pipeline(self, name: str) -> PipelineConfig:
        for pipe in self.pipelines:
            if pipe.name == name:
                return pipe
        raise ConfigError(f"unknown pipeline {name!r}")

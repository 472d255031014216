"""Configuration: one YAML file, parsed once into an immutable, validated :class:`Config`.

Every section is a frozen dataclass; the loader walks the dataclass fields, so the dataclasses below *are* the
schema. Unknown keys are errors that name the key with its dotted path (``node.ae_tilte``), and values are
checked at start-up: AE titles (1-16 characters of the DICOM default repertoire, no backslash), ports,
paths, cross references between pipelines, rules and destinations. ``config/dicomnode.example.yaml`` shows
every key with its default.

Modules: :mod:`.node` (node-wide sections), :mod:`.destinations`, :mod:`.pipelines` (pipelines, models,
rules), :mod:`.root` (the document), :mod:`.loader` (YAML -> Config), :mod:`.validate` (start-up checks),
:mod:`.defaults` (the embedded default). Import from here: ``from dicomnode.config import Config, load_config``.
With ``errors``, the base of the import graph: imports nothing else of the node.
"""

from dicomnode.config.defaults import (
    DEFAULT_PIPELINE,
    DEFAULT_RESULTS,
    default_raw,
)
from dicomnode.config.destinations import (
    Destination,
    DestinationKind,
    HttpAuth,
    HttpAuthKind,
)
from dicomnode.config.loader import (
    apply_overrides,
    load_config,
    parse_config,
)
from dicomnode.config.node import (
    HOME_ENV,
    CompletionConfig,
    DevicePreference,
    Engine,
    LateInstancePolicy,
    LoggingConfig,
    MetricsConfig,
    NodeConfig,
    RayConfig,
    RayPlacement,
    StorageConfig,
    TlsConfig,
    UiConfig,
    UserCredential,
    UserIdentityConfig,
    WorkerConfig,
    check_ae_title,
    default_storage_path,
    is_loopback,
)
from dicomnode.config.pipelines import (
    OUTPUT_KIND_ALIASES,
    PREPROCESS_STEPS,
    CropStep,
    HuStep,
    LabelCode,
    ModelConfig,
    NormalizeStep,
    OutputKind,
    OutputsConfig,
    PadStep,
    PipelineConfig,
    PreprocessStep,
    ResampleStep,
    Rule,
    RuleMatch,
    SegmenterKind,
    VolumeConfig,
    WindowStep,
    output_kinds,
)
from dicomnode.config.root import (
    Config,
)

__all__ = [
    "CompletionConfig",
    "Config",
    "CropStep",
    "DEFAULT_PIPELINE",
    "DEFAULT_RESULTS",
    "Destination",
    "DestinationKind",
    "DevicePreference",
    "Engine",
    "HOME_ENV",
    "HttpAuth",
    "HttpAuthKind",
    "HuStep",
    "LabelCode",
    "LateInstancePolicy",
    "LoggingConfig",
    "MetricsConfig",
    "ModelConfig",
    "NodeConfig",
    "NormalizeStep",
    "OUTPUT_KIND_ALIASES",
    "OutputKind",
    "OutputsConfig",
    "PREPROCESS_STEPS",
    "PadStep",
    "PipelineConfig",
    "PreprocessStep",
    "RayConfig",
    "RayPlacement",
    "ResampleStep",
    "Rule",
    "RuleMatch",
    "SegmenterKind",
    "StorageConfig",
    "TlsConfig",
    "UiConfig",
    "UserCredential",
    "UserIdentityConfig",
    "VolumeConfig",
    "WindowStep",
    "WorkerConfig",
    "apply_overrides",
    "check_ae_title",
    "default_raw",
    "default_storage_path",
    "is_loopback",
    "load_config",
    "output_kinds",
    "parse_config",
]

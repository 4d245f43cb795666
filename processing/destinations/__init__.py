"""Destinations: where a processed upload or transfer is delivered.

* :mod:`.base` -- the :class:`Destination` protocol, :class:`DeliveryTarget`,
  :class:`DeliveryResult`, :class:`CheckpointStore`
* :mod:`.local` -- :class:`LocalFolderDestination` (atomic rename into a folder)
* :mod:`.onedrive` -- :class:`OneDriveDestination` (Graph upload sessions, own fragment loop)
* :mod:`.graph_auth` -- token providers (static token, azure-identity credentials)
* :mod:`.checkpoints` -- in-memory and JSON-file checkpoint stores
* :mod:`.paths` -- path template rendering and sanitization
* :mod:`.manifest` -- the JSON manifest written beside a delivered file
* :mod:`.errors` -- :class:`DeliveryError` and its kinds
"""

from .base import (
    CONFLICT_BEHAVIOURS,
    CheckpointStore,
    Conflict,
    DeliveryResult,
    DeliveryTarget,
    Destination,
    ProgressCallback,
)
from .checkpoints import FileCheckpointStore, MemoryCheckpointStore
from .errors import (
    ChecksumMismatch,
    DeliveryCanceled,
    DeliveryConflict,
    DeliveryError,
    DestinationRejected,
    DestinationUnavailable,
    InvalidTarget,
    SourceFailed,
    Unauthorized,
)
from .graph_auth import (
    AzureCredentialTokenProvider,
    StaticTokenProvider,
    TokenProvider,
    build_token_provider,
)
from .local import LocalFolderDestination
from .manifest import Manifest, manifest_path
from .onedrive import (
    DEFAULT_FRAGMENT_SIZE,
    DEFAULT_GRAPH_BASE_URL,
    FRAGMENT_UNIT,
    MAX_FRAGMENT_SIZE,
    SIMPLE_UPLOAD_MAX,
    OneDriveDestination,
    OneDriveSettings,
)
from .paths import (
    render_path,
    sanitize_component,
    sanitize_path,
    split_target_path,
    validate_template,
)

__all__ = [
    "CONFLICT_BEHAVIOURS",
    "DEFAULT_FRAGMENT_SIZE",
    "DEFAULT_GRAPH_BASE_URL",
    "FRAGMENT_UNIT",
    "MAX_FRAGMENT_SIZE",
    "SIMPLE_UPLOAD_MAX",
    "AzureCredentialTokenProvider",
    "CheckpointStore",
    "ChecksumMismatch",
    "Conflict",
    "DeliveryCanceled",
    "DeliveryConflict",
    "DeliveryError",
    "DeliveryResult",
    "DeliveryTarget",
    "Destination",
    "DestinationRejected",
    "DestinationUnavailable",
    "FileCheckpointStore",
    "InvalidTarget",
    "LocalFolderDestination",
    "Manifest",
    "MemoryCheckpointStore",
    "OneDriveDestination",
    "OneDriveSettings",
    "ProgressCallback",
    "SourceFailed",
    "StaticTokenProvider",
    "TokenProvider",
    "Unauthorized",
    "build_token_provider",
    "manifest_path",
    "render_path",
    "sanitize_component",
    "sanitize_path",
    "split_target_path",
    "validate_template",
]

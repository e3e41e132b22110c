"""``kvmesh.errors``: the error hierarchy, kept importable under its first name.

The hierarchy lives in :mod:`kvmesh.core.errors` (the shared layer); this module re-exports it so
``from kvmesh.errors import NotFound`` keeps working everywhere.
"""
from kvmesh.core.errors import *  # noqa: F401,F403
from kvmesh.core.errors import (HTTP_STATUS_BY_GRPC_CODE, AlreadyExists, Conflict, DataCorrupt,  # noqa: F401
                                DeadlineExceeded, InvalidArgument, KVMeshError, NotFound, PermissionDenied,
                                ResourceExhausted, TooBusy, Unauthenticated, Unavailable, from_grpc_error)

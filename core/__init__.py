"""kvmesh.core: what every process of the mesh shares (errors, chunk keys, auth and TLS settings,
gRPC server bootstrap and channels, request ids). It imports nothing of kvmesh but the generated
code in ``kvmesh.api`` and the error hierarchy; controller, agents and engine import it."""

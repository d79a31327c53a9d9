"""gRPC API: `jamba.proto` and its generated modules (regenerate with
`python -m jamba_ray.proto.build`)."""

"""Ray Serve front: OpenAI-compatible HTTP (and gRPC through Serve's proxy) over one pipeline per
replica."""

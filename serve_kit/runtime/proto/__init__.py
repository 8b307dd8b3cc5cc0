"""KServe v2 / Triton gRPC protocol: the .proto sources and their generated modules.

Regenerate with scripts/gen_proto.sh; the generated modules are committed.
"""

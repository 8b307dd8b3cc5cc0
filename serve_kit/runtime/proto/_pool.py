"""The descriptor pool serve-kit's generated protobuf modules register into (not protobuf's default).

tritonclient, Triton's Python packages and KServe all register the same file and message names
(`grpc_service.proto`, `inference.ModelInferRequest`, ...) in protobuf's default pool, and a
second registration of a name in one process fails. A private pool lets the runtime, tritonclient
and our tests live in one process. scripts/gen_proto.sh points the generated code here.
"""

from google.protobuf import descriptor_pool

_POOL = descriptor_pool.DescriptorPool()


def Default() -> descriptor_pool.DescriptorPool:  # noqa: N802 - the name the generated code calls
    return _POOL

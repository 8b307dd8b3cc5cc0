#!/usr/bin/env bash
# Regenerate serve_kit/runtime/proto/*_pb2.py and *_pb2_grpc.py from the .proto files beside them.
# The generated files are committed, so the runtime needs no protoc; run this after editing a .proto.
#
# Why grpcio-tools 1.62.x: its protoc (protobuf 25.x) emits code that runs on every protobuf
# runtime from 4.25 up (tested through 7.x). Newer protoc versions stamp a check into the generated
# code that refuses any runtime older than themselves, and tritonclient 2.51.0 (the dev extra)
# pins protobuf < 5.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DIR=serve_kit/runtime/proto
WANT=1.62.

have="$("$PY" -c 'import grpc_tools, importlib.metadata as m; print(m.version("grpcio-tools"))' 2>/dev/null || true)"
if [[ "$have" != "$WANT"* ]]; then
    echo "gen_proto.sh: needs grpcio-tools ${WANT}x in $PY (found: ${have:-none})" >&2
    echo "  install it with: $PY -m pip install --no-deps 'grpcio-tools==1.62.3'" >&2
    exit 1
fi

"$PY" -m grpc_tools.protoc -I "$DIR" --python_out="$DIR" --grpc_python_out="$DIR" \
    "$DIR/model_config.proto" "$DIR/grpc_service.proto"

# model_config.proto defines no service, so its _grpc module would be empty.
rm -f "$DIR/model_config_pb2_grpc.py"

for f in "$DIR"/*_pb2.py "$DIR"/*_pb2_grpc.py; do
    # Package-relative imports, so the modules work as serve_kit.runtime.proto.*.
    sed -i -E 's/^import (model_config_pb2|grpc_service_pb2) as /from . import \1 as /' "$f"
    # Our own descriptor pool: tritonclient registers the same `inference.*` names in protobuf's
    # default pool, and two registrations of one name in a process is an error (see _pool.py).
    sed -i 's/^from google\.protobuf import descriptor_pool as _descriptor_pool$/from . import _pool as _descriptor_pool/' "$f"
done

if grep -nE '^import (model_config|grpc_service)_pb2|google\.protobuf import descriptor_pool' "$DIR"/*_pb2*.py; then
    echo "gen_proto.sh: the generated code changed shape; fix the rewrites above" >&2
    exit 1
fi
echo "regenerated: $(ls "$DIR"/*_pb2*.py | tr '\n' ' ')"

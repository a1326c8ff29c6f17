#!/usr/bin/env bash
# Generates the Python gRPC code for proto/safemode/v1/*.proto into
# clients/python/gen/ (git-ignored), or into the directory given as $1.
# safemode_client.py does the same by itself at start (generate()); this is for
# reading the generated code or importing it from your own program.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/gen}"
python="${SAFEMODE_PYTHON:-python3}"
"$python" -c 'import grpc_tools' 2>/dev/null || {
    echo "generate.sh: grpcio-tools is missing; install it with: $python -m pip install grpcio grpcio-tools" >&2
    exit 1
}
proto="$here/../../proto"
well_known="$("$python" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"
mkdir -p "$out"
"$python" -m grpc_tools.protoc -I"$proto" -I"$well_known" \
    --python_out="$out" --grpc_python_out="$out" \
    "$proto"/safemode/v1/policy.proto \
    "$proto"/safemode/v1/subscription.proto \
    "$proto"/safemode/v1/control.proto
echo "generated $out/safemode/v1/ (put $out on PYTHONPATH: import safemode.v1.subscription_pb2)"

#!/bin/sh
# Regenerate the committed Python code from tritarget/v1/*.proto into protos/ (or $1):
# protoc writes tritarget/v1/*_pb2*.py under a scratch dir, the modules move next to
# this script (so they are tritarget.protos.*_pb2 in editable and wheel installs
# alike) and the grpc module imports its messages relatively.
set -eu; here=$(cd "$(dirname "$0")" && pwd); out=${1:-$here}; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python -m grpc_tools.protoc -I "$here" --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" "$here"/tritarget/v1/*.proto && for f in "$tmp"/tritarget/v1/*; do sed 's/^from tritarget\.v1 import /from . import /' "$f" > "$out/$(basename "$f")"; done

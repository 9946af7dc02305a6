#!/usr/bin/env bash
# Start `kvmesh serve` on the embedded SmolLM2, ask it one question over HTTP
# (the standard OpenAI client) and one over gRPC (`kvmesh generate`), then keep
# serving until Ctrl-C. KVMESH_QUICKSTART_EXIT=1 stops after the samples.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
HTTP_PORT=${KVMESH_HTTP_PORT:-8000}
GRPC_PORT=${KVMESH_GRPC_PORT:-50051}

"$BIN/kvmesh" model pull smollm2
"$BIN/kvmesh" serve --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" &
SERVE_PID=$!
trap 'kill "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true' EXIT INT TERM

for _ in $(seq 1 300); do
    if "$BIN/python" - "$HTTP_PORT" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1)
PY
    kill -0 "$SERVE_PID" 2>/dev/null || { echo "kvmesh serve exited early" >&2; exit 1; }
    sleep 1
done

echo "== HTTP, OpenAI client: POST /v1/chat/completions"
"$BIN/python" deploy/sample_request.py --base-url "http://127.0.0.1:$HTTP_PORT/v1"
echo "== gRPC: kvmesh generate"
"$BIN/kvmesh" generate --router "127.0.0.1:$GRPC_PORT" "What is the capital of France?"
echo
echo "kvmesh is serving: HTTP http://127.0.0.1:$HTTP_PORT/v1, gRPC 127.0.0.1:$GRPC_PORT (Ctrl-C stops it)"
if [ "${KVMESH_QUICKSTART_EXIT:-0}" != 1 ]; then
    wait "$SERVE_PID"
fi

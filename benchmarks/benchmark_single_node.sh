#!/usr/bin/env bash
# Start `gptjax serve`, send the FasterTransformer backend's request with tritonclient (identity_test.py),
# print the latency, stop the server: as FasterTransformer_backend's tools/benchmark_single_node.sh.
#
#   benchmarks/benchmark_single_node.sh -b 8 -i 512 -o 16 -n 10 [-p PORT] [serve args, e.g. --model gpt3-1.3b --mesh tensor=8]
#
# -b batch size, -i input (prompt) length, -o output length, -n timed runs, -p port (default: a free one).
# Every other argument goes to `gptjax serve`; with no --model/--checkpoint it serves megatron-345m (random
# weights), the model of the FasterTransformer example. PYTHON picks the interpreter (default: .venv's).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi

batch=8 input_len=512 output_len=16 runs=10 port=""
serve_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -b) batch="$2"; shift 2 ;;
    -i) input_len="$2"; shift 2 ;;
    -o) output_len="$2"; shift 2 ;;
    -n) runs="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) serve_args+=("$1"); shift ;;
  esac
done
if [[ ! " ${serve_args[*]-} " =~ " --model" && ! " ${serve_args[*]-} " =~ " --checkpoint" ]]; then
  serve_args+=(--model megatron-345m)
fi
if [[ -z "$port" ]]; then
  port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

log="$(mktemp -t gptjax-serve.XXXXXX.log)"
cd "$repo"
"$PYTHON" -m gptjax serve --port "$port" "${serve_args[@]}" >"$log" 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
}
trap stop_server EXIT

echo "[INFO] starting the server on 127.0.0.1:$port (${serve_args[*]}), log: $log"
if ! "$PYTHON" - "$port" "$server" <<'PY'
import os, sys, time
from serving.client import Client
port, pid = sys.argv[1], int(sys.argv[2])
with Client(f"127.0.0.1:{port}") as client:
    end = time.monotonic() + 1800
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit("the server exited while loading")
        try:
            client.wait_ready(timeout=5)
            sys.exit(0)
        except TimeoutError:
            pass
    sys.exit("the server was not ready in 30 minutes")
PY
then
  tail -n 20 "$log" >&2
  exit 1
fi

status=0
"$PYTHON" "$here/identity_test.py" -b "$batch" -i "$input_len" -o "$output_len" -n "$runs" -u "127.0.0.1:$port" \
  || status=$?
stop_server
trap - EXIT
exit $status

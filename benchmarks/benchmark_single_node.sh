#!/usr/bin/env bash
# Start `gptjax serve` with a FasterTransformer v1 config.pbtxt, send the backend's request (identity_test.py,
# over HTTP by default), print the latency, stop the server: as FasterTransformer_backend's
# tools/benchmark_single_node.sh of 2021.
#
#   benchmarks/benchmark_single_node.sh -b 8 -i 512 -o 16 -n 10 [--protocol grpc] [--dialect 5.x] [-p PORT]
#                                       [serve args, e.g. --model gpt3-1.3b --mesh tensor=8 --dtype bfloat16]
#
# -b batch size, -i input (prompt) length, -o output length, -n timed runs, --protocol http (default) or grpc,
# --dialect v1 (default: INPUT_ID ... -> OUTPUT0) or 5.x (input_ids ...), -p the gRPC port (default: a free one;
# HTTP takes another free one). Every other argument goes to `gptjax serve`; with no --model/--checkpoint it
# serves megatron-345m (random weights), the model of the FasterTransformer example. With no --config it writes
# the config.pbtxt the 2021 script wrote (candidate_num 1: greedy; max_seq_len = input + output; batch_size and
# max_batch_size = the batch; is_half 1) to a temporary folder. PYTHON picks the interpreter (default: .venv's).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi

batch=8 input_len=512 output_len=16 runs=10 port="" protocol=http dialect=v1
serve_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -b) batch="$2"; shift 2 ;;
    -i) input_len="$2"; shift 2 ;;
    -o) output_len="$2"; shift 2 ;;
    -n) runs="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    --protocol) protocol="$2"; shift 2 ;;
    --dialect) dialect="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) serve_args+=("$1"); shift ;;
  esac
done
if [[ "$protocol" != http && "$protocol" != grpc ]]; then
  echo "benchmark_single_node.sh: --protocol must be http or grpc, got '$protocol'" >&2; exit 2
fi
if [[ ! " ${serve_args[*]-} " =~ " --model" && ! " ${serve_args[*]-} " =~ " --checkpoint" ]]; then
  serve_args+=(--model megatron-345m)
fi
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port="${port:-$(free_port)}"
http_port="$(free_port)"

work="$(mktemp -d -t gptjax-bench.XXXXXX)"
log="$work/serve.log"
if [[ ! " ${serve_args[*]-} " =~ " --config" ]]; then
  # the 2021 script's config.pbtxt, less the model-shape keys (checked against the model when given)
  param() { printf 'parameters {\n  key: "%s"\n  value: {\n    string_value: "%s"\n  }\n}\n' "$1" "$2"; }
  {
    printf 'name: "fastertransformer"\nbackend: "fastertransformer"\nmax_batch_size: %s\n' "$batch"
    printf 'input [\n  { name: "INPUT_ID" data_type: TYPE_UINT32 dims: [ -1 ] },\n'
    printf '  { name: "REQUEST_INPUT_LEN" data_type: TYPE_UINT32 dims: [ 1 ] },\n'
    printf '  { name: "REQUEST_OUTPUT_LEN" data_type: TYPE_UINT32 dims: [ 1 ] }\n]\n'
    printf 'output [\n  { name: "OUTPUT0" data_type: TYPE_UINT32 dims: [ -1 ] }\n]\n'
    printf 'instance_group [\n  {\n    count: 1\n    kind : KIND_CPU\n  }\n]\n'
    param candidate_num 1; param probability_threshold 0.0; param max_seq_len $((input_len + output_len))
    param is_half 1; param batch_size "$batch"; param layer_para_batch_size "$batch"; param is_fuse_QKV 1
    param temperature 1.0; param repetition_penalty 1.0
  } >"$work/config.pbtxt"
  serve_args+=(--config "$work/config.pbtxt")
fi

cd "$repo"
"$PYTHON" -m gptjax serve --port "$port" --http-port "$http_port" --metrics-port 0 "${serve_args[@]}" >"$log" 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
}
trap stop_server EXIT

echo "[INFO] starting the server on 127.0.0.1:$port (gRPC) and :$http_port (HTTP) (${serve_args[*]}), log: $log"
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

url="127.0.0.1:$http_port"
if [[ "$protocol" == grpc ]]; then url="127.0.0.1:$port"; fi
status=0
"$PYTHON" "$here/identity_test.py" -i "$protocol" --dialect "$dialect" -b "$batch" -s "$input_len" -o "$output_len" \
  -n "$runs" -u "$url" || status=$?
stop_server
trap - EXIT
exit $status

# Sourced by the GPU scripts, from the repository root: $OUT made, Python unbuffered, the wheels carried in
# .whl/ (packages the GPU image lacks) installed into /tmp/site and put on PYTHONPATH where a GPU is (elsewhere the
# environment has them, and the wheels are built for the GPU image's Python), and on the script's exit
# $OUT bundled into one bundle.jsonl (decode_table.py kept) if it holds more files than a device call returns.
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ ":${PYTHONPATH:-}:" != *":/tmp/site:"* ]] && compgen -G ".whl/*.whl" > /dev/null \
    && command -v nvidia-smi > /dev/null; then  # once per job, on the GPU machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
trap 'python3 -m benchmarks.pack_out "$OUT" --keep decode_table.py' EXIT

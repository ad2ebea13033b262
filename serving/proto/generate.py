"""Regenerate the Python modules beside the .proto files: `python -m serving.proto.generate [OUT_DIR]`.

protoc runs with the import root `serving/proto`, so the descriptors are named `gptjax/v1/generator.proto`
and `inference/grpc_service.proto`; the generated imports are then made package-relative (`from . import`),
so the modules load as `serving.proto.gptjax.v1` and `serving.proto.inference`. The grpc stubs' version
guard is lowered to the oldest grpcio we support, because the code they generate does not depend on it.
The test suite runs this into a temporary folder and fails when the committed modules differ.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTOS = ("gptjax/v1/generator.proto", "inference/model_config.proto", "inference/grpc_service.proto")
MIN_GRPC_VERSION = "1.84.0"


def _fix(text: str) -> str:
    text = re.sub(r"^from (?:gptjax\.v1|inference) import (\w+_pb2)", r"from . import \1", text, flags=re.M)
    return re.sub(r"^GRPC_GENERATED_VERSION = '[^']*'", f"GRPC_GENERATED_VERSION = '{MIN_GRPC_VERSION}'", text,
                  flags=re.M)


def generate(out_dir: str | Path = ROOT) -> list[Path]:
    """Write the *_pb2.py and *_pb2_grpc.py modules of every .proto into out_dir (same sub-folders)."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{ROOT}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", *PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for src in sorted(Path(tmp).rglob("*.py")):
            dst = out_dir / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(_fix(src.read_text()))
            written.append(dst)
    return written


if __name__ == "__main__":
    for path in generate(sys.argv[1] if len(sys.argv) > 1 else ROOT):
        print(path)

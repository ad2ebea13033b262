"""Bundle a GPU run's output folder into one JSONL when it holds more files than come back from the device.

    python -m benchmarks.pack_out OUT_DIR [--keep decode_table.py] [--limit 8]
    python -m benchmarks.pack_out OUT_DIR --into benchmarks/results-h200-DATE-runNN.jsonl   # always, elsewhere

A device call returns at most 8 files from $OUT (the rest are dropped, named only in `files_left_out`), so a
script that writes a log per part loses parts. With more than `--limit` files, every file but the kept ones
becomes lines of OUT_DIR/bundle.jsonl and is removed: a JSON object line keeps its fields, with "source" (the
file's path under OUT_DIR) first (a field of that name becomes "row_source"); any other line becomes
{"source": ..., "line": text}; a bundle already there (from a script run inside the script) is added to.
`--into` writes the bundle to a file of its own, anew, and removes nothing: the form of the results files
beside RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BUNDLE = "bundle.jsonl"
DEVICE_FILE_LIMIT = 8  # files that come back from one device call


def rows(path: Path, source: str):
    """The file's non-empty lines as bundle rows."""
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            yield {"source": source, "line": line}
        else:  # a row's own "source" field stays, renamed
            yield {"source": source, **{("row_source" if k == "source" else k): v for k, v in value.items()}}


def pack(out_dir: Path, into: Path | None = None, keep=(), limit: int = DEVICE_FILE_LIMIT) -> list[str]:
    """Bundle `out_dir`'s files (see the module docstring) -> the sources bundled, [] when nothing was."""
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    in_place = into is None
    if in_place:
        if len(files) <= limit:
            return []
        into = out_dir / BUNDLE
    bundled = [p for p in files if p.name not in keep and p.resolve() != into.resolve()]
    with open(into, "a" if in_place else "w") as f:  # in place, a nested script's bundle stays; --into: anew
        for p in bundled:
            for row in rows(p, str(p.relative_to(out_dir))):
                f.write(json.dumps(row) + "\n")
    if in_place:  # the originals go, and the folders they leave empty
        for p in bundled:
            p.unlink()
        for d in sorted((d for d in out_dir.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            if not any(d.iterdir()):
                d.rmdir()
    return [str(p.relative_to(out_dir)) for p in bundled]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--into", type=Path, help="write the bundle here, whatever the count, and remove nothing")
    p.add_argument("--keep", action="append", default=[], help="a file name to leave as it is (repeatable)")
    p.add_argument("--limit", type=int, default=DEVICE_FILE_LIMIT, help="bundle only past this many files")
    args = p.parse_args()
    if not args.out_dir.is_dir():
        p.error(f"{args.out_dir} is not a folder")
    done = pack(args.out_dir, args.into, args.keep, args.limit)
    if done:
        print(f"bundled {len(done)} files into {args.into or args.out_dir / BUNDLE}")


if __name__ == "__main__":
    main()

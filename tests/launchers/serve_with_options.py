"""`gptjax serve` with the listener's options given as JSON: `serve_with_options.py '{"stream_idle_timeout_s": 2}'
SERVE_ARGS...`, for tests that need limits a config file does not set (a short idle time). Exits as the CLI."""

from __future__ import annotations

import json
import sys

from gptjax import cli
from serving.server import ServerOptions, serve


def main() -> int:
    options = ServerOptions(**json.loads(sys.argv[1]))
    args = cli.build_parser().parse_args(["serve", *sys.argv[2:]])
    try:
        return serve(args, cli.build_engine, options)
    except ValueError as e:
        print(f"gptjax serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

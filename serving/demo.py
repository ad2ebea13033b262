"""`make demo`'s server part: start `gptjax serve`, answer one request through `gptjax client`, stop it.

    python -m serving.demo [--port 8001] [--prompt TEXT] [serve args, e.g. --model gpt2-124m]

Exits with the client's status, or 1 when the server fails to start or to stop cleanly. The HTTP and metrics
ports are off unless the serve args ask for them.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time

from serving.client import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=24)
    args, serve_args = p.parse_known_args(argv)
    port = args.port or free_port()
    target = f"127.0.0.1:{port}"
    for flag in ("--http-port", "--metrics-port"):  # the demo talks gRPC: no fixed ports that may be taken
        if not any(a == flag or a.startswith(flag + "=") for a in serve_args):
            serve_args += [flag, "0"]
    print(f"$ gptjax serve --port {port} {' '.join(serve_args)}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "gptjax", "serve", "--port", str(port), *serve_args])
    try:
        with Client(target) as client:
            end = time.monotonic() + 600
            while server.poll() is None:
                try:
                    client.wait_ready(timeout=5)
                    break
                except TimeoutError:
                    if time.monotonic() > end:
                        print("demo: the server was not ready in 10 minutes", file=sys.stderr)
                        return 1
            else:
                print(f"demo: the server exited with status {server.returncode}", file=sys.stderr)
                return 1
        cmd = ["client", "--server", target, "--prompt", args.prompt, "--max-new-tokens", str(args.max_new_tokens),
               "--stream"]
        print(f"$ gptjax {' '.join(cmd)}", flush=True)
        status = subprocess.call([sys.executable, "-m", "gptjax", *cmd])
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    if server.returncode != 0:
        print(f"demo: the server stopped with status {server.returncode}", file=sys.stderr)
        return status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())

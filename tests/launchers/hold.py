"""A multi-process job that keeps every device busy until killed: how tests check that the death of one
process ends the others. Started like `gptjax` itself: by srun or mpirun, or with
`hold.py COORDINATOR NUM_PROCESSES PROCESS_ID`."""

from __future__ import annotations

import sys

from gptjax import distributed


def main() -> int:
    args = sys.argv[1:]
    distributed.initialize(*(args[:1] + [int(a) for a in args[1:]]))
    import jax

    from gptjax import Engine, make_mesh

    engine = Engine.from_preset("gpt2-tiny", mesh=make_mesh(tensor=len(jax.devices())))
    step = 0
    while True:
        engine.generate([[5, 17, 99]], max_new_tokens=4, greedy=True)
        if step == 0:
            print(f"running {jax.process_index()}", file=sys.stderr, flush=True)
        step += 1


if __name__ == "__main__":
    sys.exit(main())

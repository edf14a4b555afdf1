"""Run llama-cpp-python's own OpenAI-compatible server under rs-local's host decisions.

``python -m llama_cpp.server`` loads its model itself, with repacking on, so on an AMX CPU it
segfaults at its first request. ``python -m rs_local.runtime.upstream_server ARGS`` takes
the same arguments and first applies the repack decision (``RS_LOCAL_REPACK`` and the CPU,
see :mod:`rs_local.runtime.host`), the OpenMP setting and our thread count (its own default is
half the machine's logical CPUs, whatever the affinity or a container's quota; its ``--n_threads``
or ``N_THREADS`` still win) to the whole process. The tests use
it for the HTTP judge; users can use it the same way.
"""

from __future__ import annotations

import os
import sys

from rs_local.runtime.host import decide_repack, default_threads, quiet_openmp
from rs_local.runtime.loading import install_repack_policy


def main() -> None:
    """Apply the host decisions, then hand over to ``llama_cpp.server``'s own entry point."""
    quiet_openmp()
    decision = decide_repack()
    install_repack_policy(decision)
    threads = str(default_threads())
    for name in ("N_THREADS", "N_THREADS_BATCH"):  # read by its settings where no argument sets them
        os.environ.setdefault(name, threads)
    print(f"rs-local: llama.cpp weight repacking {decision}", file=sys.stderr, flush=True)
    from llama_cpp.server.__main__ import main as server_main

    server_main()


if __name__ == "__main__":
    main()

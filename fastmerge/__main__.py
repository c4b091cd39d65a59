"""``python -m fastmerge ...`` is the ``fastmerge`` command (see :mod:`fastmerge.cli`)."""
import os
import sys

from .cli import main

if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        # Under torchrun the command has committed its output and destroyed its process group
        # by now; torch.distributed's C++ threads (gloo, the TCPStore) can still abort the
        # process ("terminate called without an active exception") in the static destructors
        # run at interpreter exit, turning a finished merge into a failed launch. Leave without
        # them, the streams flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    sys.exit(code)

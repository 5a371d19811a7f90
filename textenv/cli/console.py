"""What every console command does around its work: quiet libraries, an exit status.

A command module has ``run(argv)``, which parses, works, prints its results (stdout)
and returns them to a Python caller, and ``main(argv)``, the console entry point
(``[project.scripts]``), which returns the exit status: ``sys.exit(main())`` in the
generated wrapper exits 0 on success (the wrapper would print any other returned
value on stderr and exit 1). Failures keep their own exits: argparse's 2 for a usage
error, a traceback and 1 for an error in the work.

Stderr, on success, holds only what the command means to say there: the progress bar
of long work (left out with ``--quiet``) and notes of its own, each line starting
with ``<command>: note:``. Library noise stays off: transformers' warnings and its
progress bars ("Loading weights") are silenced by ``quiet_libraries`` unless the user
chose transformers' verbosity (``TRANSFORMERS_VERBOSITY=info``, ``warning``, ...).
"""

from __future__ import annotations

import os
import sys


def quiet_libraries() -> None:
    """Transformers' warnings (verbosity error) and progress bars off for the rest of the
    command, unless ``TRANSFORMERS_VERBOSITY`` is set: then transformers does as it says
    (at ``info`` or ``debug`` the loading bars show too, see ``textenv.models.quiet_loading``)."""
    from transformers.utils import logging as transformers_logging

    if os.environ.get("TRANSFORMERS_VERBOSITY"):
        return
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def note(prog: str, text: str) -> None:
    """One line on stderr that the command means: ``<prog>: note: <text>``."""
    print(f"{prog}: note: {text}", file=sys.stderr)

"""What every console command does around its work: quiet libraries, an exit status.

A command module has ``run(argv)``, which parses, works, prints its results (stdout)
and returns them to a Python caller, and ``main(argv)``, the console entry point
(``[project.scripts]``), made here by ``console_main(__name__, command)``: it returns the
exit status, and ``sys.exit(main())`` in the generated wrapper exits 0 on success (the
wrapper would print any other returned value on stderr and exit 1). Failures keep
their own exits: argparse's 2 for a usage error, a traceback and 1 for an error in the
work.

Stderr, on success, holds only what the command means to say there: the progress bar
of long work (left out with ``--quiet``) and notes of its own, each line starting
with ``<command>: note:``. Library noise stays off: transformers' warnings and its
progress bars ("Loading weights") are silenced by ``quiet_libraries`` unless the user
chose transformers' verbosity (``TRANSFORMERS_VERBOSITY=info``, ``warning``, ...).
"""

from __future__ import annotations

import os
import sys
from typing import Callable


def quiet_libraries() -> None:
    """Transformers' warnings (verbosity error) and progress bars off for the rest of the
    command, unless ``TRANSFORMERS_VERBOSITY`` is set: then transformers does as it says
    (at ``info`` or ``debug`` the loading bars show too, see ``textenv.lm.models.quiet_loading``)."""
    from transformers.utils import logging as transformers_logging

    if os.environ.get("TRANSFORMERS_VERBOSITY"):
        return
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def note(prog: str, text: str) -> None:
    """One line on stderr that the command means: ``<prog>: note: <text>``."""
    print(f"{prog}: note: {text}", file=sys.stderr)


def console_main(module: str, command: str) -> Callable[[list[str] | None], int]:
    """The console entry point ``main(argv=None)`` of the command module named ``module``
    (its ``__name__``): it calls that module's ``run(argv)`` (looked up at each call) and
    returns the exit status 0; the results are on stdout, and ``run`` returns them to
    Python callers. ``command`` is the installed name, for the docstring."""

    def main(argv: list[str] | None = None) -> int:
        sys.modules[module].run(argv)
        return 0

    main.__doc__ = (f"The console command {command}: exit status 0 on success (its results are on stdout; "
                    "``run`` returns them to Python callers).")
    main.__module__ = module
    return main

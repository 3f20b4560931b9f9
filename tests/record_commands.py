"""Run the imagebuild CLI and record every program it starts, one JSON argv per line.

    python tests/record_commands.py LOG -- build amd64 console ...

The hostile-input tests read the log to prove where mounts, copies and chroots went; the
product itself is run unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_log = open(sys.argv[1], "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)
_popen_init = subprocess.Popen.__init__


def _recording_init(self: subprocess.Popen, args, *rest, **kwargs):  # type: ignore[no-untyped-def]
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    _log.write(json.dumps([os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a)
                           for a in argv]) + "\n")
    _log.flush()
    _popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _recording_init  # type: ignore[method-assign]
# The checkout under test, not whichever imagebuild happens to be installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagebuild.cli import main  # noqa: E402

argv = sys.argv[2:]
if argv[:1] == ["--"]:
    argv = argv[1:]
sys.exit(main(argv))

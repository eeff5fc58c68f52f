"""Make the repository's packages importable from a script in `pipelines/`.

`python pipelines/recaption.py` puts `pipelines/` first on `sys.path`, where `recaption.py` and
`train.py` would shadow the `recaption` and `train` packages. Importing this module first puts the
repository root first instead and moves `pipelines/` to the end, spelled with a trailing separator:
- processes a script spawns (img2dataset's workers) re-run the script and must still find this module;
- Ray copies the script's folder to the front of its workers' `sys.path` only when the driver's
  `sys.path` holds it spelled exactly as `dirname(realpath(argv[0]))`; the other spelling keeps
  `pipelines/` (and its shadowing names) out of every Ray worker.
"""
import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = str(_HERE.parent)
sys.path[:] = ([_ROOT] + [p for p in sys.path if p != _ROOT and Path(p or ".").resolve() != _HERE]
               + [str(_HERE) + os.sep])

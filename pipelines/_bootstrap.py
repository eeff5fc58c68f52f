"""Make the repository's packages importable from a script in `pipelines/`.

`python pipelines/recaption.py` puts `pipelines/` first on `sys.path`, where `recaption.py` and
`train.py` would shadow the `recaption` and `train` packages (in Ray workers too, which inherit
the driver's path). Importing this module first swaps that entry for the repository root.
"""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = str(_HERE.parent)
# pipelines/ stays, last: processes a script spawns (img2dataset's, vLLM's) re-import it by name.
sys.path[:] = [_ROOT] + [p for p in sys.path if p != _ROOT and Path(p or ".").resolve() != _HERE] + [str(_HERE)]

"""Command-line entry points, thin by design: `python pipelines/NAME.py ...` (as `ray job submit
--working-dir .` runs them) or `python -m pipelines.NAME ...`; installed, `openvision-NAME ...`.

Every script starts with `import _bootstrap`. Run as a script, that module is found beside it and
fixes `sys.path`; imported as part of this package, the name below makes the same line a no-op.
"""
import sys

from pipelines import _bootstrap

sys.modules.setdefault("_bootstrap", _bootstrap)

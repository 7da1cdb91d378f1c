"""mailhub: a store-and-forward mail continuity hub (see DESIGN.md)."""

import os as _os

__version__ = "0.1.0"

# Installed, ``plugins/`` becomes ``mailhub.plugins`` (setup.cfg package_dir).
# Run from a source checkout (a compat editable install, or the repository
# root on sys.path), it sits beside this package instead: let the import
# system find it there, so both ways load the same built-in plugins.
_here = _os.path.dirname(__file__)
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "plugins")) and _os.path.isfile(
    _os.path.join(_root, "plugins", "__init__.py")
):
    __path__.append(_root)

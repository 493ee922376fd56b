"""Import Opacus without the root log handler it installs.

``opacus.utils.module_utils`` calls ``logging.basicConfig`` at import time, which adds a
StreamHandler to the root logger; every library line that propagates to root (Flower, Ray,
fedmed when not configured) then prints twice. This is the one place fedmed undoes that.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType

# The format string Opacus passes to basicConfig: identifies its handler when Opacus was imported
# elsewhere first (before this module could snapshot the root handlers).
_OPACUS_ROOT_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


def import_opacus() -> ModuleType:
    """Return the ``opacus`` module, removing the root handler its import adds."""
    root = logging.getLogger()
    already_imported = "opacus" in sys.modules
    before = list(root.handlers)
    import opacus  # heavy (torch): imported only when DP work starts

    if not already_imported:
        for handler in root.handlers:
            if handler not in before:
                root.removeHandler(handler)
    _remove_opacus_root_handlers(root)
    return opacus


def _remove_opacus_root_handlers(root: logging.Logger) -> None:
    for handler in list(root.handlers):
        formatter = handler.formatter
        if type(handler) is logging.StreamHandler and formatter is not None and formatter._fmt == _OPACUS_ROOT_FORMAT:
            root.removeHandler(handler)

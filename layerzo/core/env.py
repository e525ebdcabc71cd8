"""What the environment asks of layerzo, read at call time (never cached at import)."""

from __future__ import annotations

import os

_TRUE = ("1", "ON", "YES", "TRUE")


def is_offline() -> bool:
    """True when the user asked for no network (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().upper() in _TRUE for f in flags)


def debug_enabled() -> bool:
    """``LAYERZO_DEBUG=1``: show tracebacks instead of one-line errors."""
    return os.environ.get("LAYERZO_DEBUG", "").strip() not in ("", "0", "false", "False")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (its type name when it has none): for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

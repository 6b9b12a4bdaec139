"""The pack's one exception root: every error it raises on purpose says what was wrong and what to do.

Callers (the command line, a script, a test) can catch `QwenEditError` and show its message alone;
anything else that escapes is a bug, worth its traceback.
"""

from __future__ import annotations


class QwenEditError(Exception):
    """A refusal or failure the pack explains; the message is meant for the user as it is."""


class ImageError(QwenEditError, ValueError):
    """An IMAGE (or PIL image) the pack cannot edit: wrong type, shape, size or values."""


class ImageTypeError(ImageError, TypeError):
    """An IMAGE of the wrong type (kept a TypeError for callers that catch that)."""

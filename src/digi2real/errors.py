"""Errors a user can act on.

Every failure caused by the user's input (a missing file, a bad config value, a corrupt image) is raised as a
:class:`Digi2RealError` whose message is one line naming the thing at fault and the fix. The CLI prints that line and
exits non-zero; library users catch the class.
"""

from __future__ import annotations


class Digi2RealError(Exception):
    """A problem with the user's input or environment, with a one-line message that says how to fix it."""


class ConfigError(Digi2RealError):
    """A configuration value is missing, unknown or out of range."""


class BadImageError(Digi2RealError):
    """An image file cannot be used (unreadable, empty, wrong size or layout)."""


class ModelError(Digi2RealError):
    """A model file is missing, cannot be downloaded, or does not have the expected inputs and outputs."""

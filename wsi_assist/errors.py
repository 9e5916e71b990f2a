"""Exceptions with messages fit for one line of CLI output."""

from __future__ import annotations


class WsiAssistError(Exception):
    """Base class: the message alone explains the problem to a user."""


class SlideError(WsiAssistError):
    """A slide cannot be opened, read or measured."""


class ConfigError(WsiAssistError):
    """A configuration value is missing or invalid; the message names the key path."""


class ModelError(WsiAssistError):
    """A model file is missing, truncated or does not match what was expected."""


class StageSkipped(WsiAssistError):
    """A stage has nothing to do because its model is not configured; the message says
    how to enable it. Recorded as "not run" for the slide, not as a failure."""

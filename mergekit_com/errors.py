"""Errors that stop a merge before any heavy work, with a message saying what to change."""


class ChainConfigError(ValueError):
    """A configuration CoM cannot run; the message names what to change."""

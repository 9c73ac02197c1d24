"""CST: a fleet of SillyTavern servers and one API-key pool, from one desired-state file."""

__version__ = "0.1.0"

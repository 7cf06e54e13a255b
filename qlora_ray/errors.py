"""Errors a user can fix: the CLI prints them without a traceback and exits with status 2."""


class UserError(Exception):
    """A problem with the user's input (a spec, a data file, a path), stated so they can fix it."""

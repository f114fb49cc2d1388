"""Errors services raise that the API maps to a status code."""


class Conflict(Exception):
    """The object is not in a state that allows the action (HTTP 409)."""

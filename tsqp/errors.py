"""Errors a user can meet. The CLI prints them as one line and exits non-zero, without a traceback."""


class TsqpError(Exception):
    """Base class: something went wrong that the user can understand and act on."""


class ModelError(TsqpError):
    """The model folder is missing, corrupt, or holds an unsupported architecture."""


class ProtocolError(TsqpError):
    """A message broke the wire protocol (bad header, frame count, dtype, shape or size)."""


class ServerError(TsqpError):
    """The server answered a request with an error."""


class ConnectionLost(TsqpError):
    """The server could not be reached, went away, or did not answer in time."""


class IntegrityError(TsqpError):
    """A result returned by the untrusted server failed verification."""


class LinkRefused(ConnectionLost):
    """The server refused the link itself: a CURVE key not in its allow-list, or a security mismatch."""

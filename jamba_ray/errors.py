"""One exception hierarchy; the fronts map it to HTTP and gRPC codes in one place each."""


class JambaRayError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidRequestError(JambaRayError, ValueError):
    """The caller sent something we cannot run (bad parameter, empty prompt, too long)."""

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param  # the request field at fault, when there is one


class ModelNotFoundError(JambaRayError, ValueError):
    """The model path or hub id does not resolve to a checkpoint."""


class ConfigError(JambaRayError, ValueError):
    """A model config, pipeline layout or engine setting is invalid."""


class StartupError(ConfigError):
    """A Serve app's replica failed in its constructor (Serve gave up after its retries)."""


class CapacityError(JambaRayError):
    """The engine is full (queue limit reached); retry later."""


class StageFailedError(JambaRayError):
    """A pipeline stage died or cannot compute."""


class RequestAbortedError(JambaRayError):
    """The request was cancelled before it finished."""


class AuthenticationError(JambaRayError):
    """The API key is missing or wrong."""


class RequestTooLargeError(InvalidRequestError):
    """The request body is larger than the server accepts."""


class RequestTimeoutError(JambaRayError):
    """The request ran past the server's timeout."""


class RouteNotFoundError(JambaRayError):
    """No such endpoint (or not with this method)."""

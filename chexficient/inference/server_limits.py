"""The server's default time limits, apart from the server so that building the `chexficient` parser does not
import FastAPI (the `inference` extra) for commands that do not serve."""

DEFAULT_QUEUE_TIMEOUT_S = 10.0  # a decode's wait for room in the in-flight pixel budget, then 503
DEFAULT_HEADER_TIMEOUT_S = 10.0  # a request's line and headers, from its first byte, then 408
DEFAULT_BODY_TIMEOUT_S = 60.0  # a request's body, from its headers, then 408
DEFAULT_IDLE_TIMEOUT_S = 30.0  # an idle keep-alive connection, then closed

__all__ = ["DEFAULT_BODY_TIMEOUT_S", "DEFAULT_HEADER_TIMEOUT_S", "DEFAULT_IDLE_TIMEOUT_S", "DEFAULT_QUEUE_TIMEOUT_S"]

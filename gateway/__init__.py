"""blendgate's HTTP gateway: the OpenAI-compatible API, configuration and backends."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("blendgate")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

"""cellfoundry: from single-cell datasets to tokenized shards and pretrained models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cellfoundry")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]

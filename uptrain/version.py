"""The version of uptrain, read by the package metadata, the CLI and every record uptrain writes."""

__version__ = "0.1.0"

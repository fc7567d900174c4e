"""memsnap node agent: dirty-page tracking, incremental images, migration."""

__version__ = "0.1.0"

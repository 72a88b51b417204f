"""mlserve: an aiohttp model server with dynamic micro-batching over a pool of worker processes."""

__version__ = "0.1.0"

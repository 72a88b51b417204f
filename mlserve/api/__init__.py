"""HTTP handlers, one module a protocol. Handlers decode, call the service, encode; nothing more."""

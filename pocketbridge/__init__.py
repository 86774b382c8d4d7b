"""PocketBridge: a self-hosted relay daemon for end-to-end-encrypted multi-device sync."""

__version__ = "1.0.0"

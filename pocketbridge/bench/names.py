"""The bench's scenario names and default service addresses (shared by its command line and runner)."""

SCENARIOS = ("relay", "handshakes", "memory", "replay")  # --scenario all
MORE = ("delete-account", "fragmented")  # slow, or their own kind of figure: only when named
SOAK = "soak"  # long-running leak check; not part of "all" (see bench/soak.py)
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

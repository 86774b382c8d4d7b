# ruff: noqa: E501  (comment text, kept one line per line of the generated file)
"""The words of the generated configuration file (``pocketbridge config init``, config.example.toml).

One comment per key, written above it; the keys, their order and their defaults come from the model in
:mod:`pocketbridge.config`. A test fails when a key has no entry here.
"""

from __future__ import annotations

HEADER = """\
# PocketBridge configuration. Every key is shown with its default, so this file changes nothing as it is;
# copy it, delete what you don't change, and edit the rest. Check a file with `pocketbridge check-config`.
#
# Any key can also be set from the environment as PB_<SECTION>_<KEY>, which wins over this file:
#   PB_WS_MAX_MESSAGE_BYTES=1000   PB_STORAGE_BACKEND=postgres   PB_SERVER_TRUSTED_PROXIES=127.0.0.1,10.0.0.0/8
# Lists are comma-separated there. PB_CONFIG names this file.
#
# Durations are in seconds (whole or fractional). Counts and sizes are whole numbers >= 1; sizes are in bytes.
"""

KEYS: dict[str, dict[str, str]] = {
    "listen": {
        "ws": 'WebSocket listener, "host:port" (IPv6 as "[::1]:3001"; port 0 picks a free one). Clients connect to /ws.',
        "http": 'HTTP listener for /health, /metrics, /api and /admin. Put both behind one origin in your reverse proxy.',
        "metrics": 'Separate listener for /metrics. Empty: served on the HTTP listener, and only to loopback peers.',
    },
    "server": {
        "data_dir": 'Where the identity key and the SQLite database live. Empty: $STATE_DIRECTORY (systemd), else\n$XDG_DATA_HOME/pocketbridge, else ~/.local/share/pocketbridge.',
        "identity_key_file": "The server's Ed25519 identity key (created on first start, mode 0600). Clients pin it: back it up.\nEmpty: <data_dir>/identity.key.",
        "trusted_proxies": 'Reverse proxies whose X-Forwarded-For is believed, as IP addresses or CIDRs, e.g. ["127.0.0.1", "10.0.0.0/8"].\nPer-address limits use the socket peer unless it is listed here.',
        "instance_id": 'Name of this instance in logs, metrics and the bus (A-Z a-z 0-9 . _ -, up to 64). Empty: random at each start.',
    },
    "storage": {
        "backend": '"sqlite" (one instance) or "postgres" (required to run several instances).',
        "path": 'SQLite database file. Empty: <data_dir>/pocketbridge.db.',
        "dsn": 'PostgreSQL connection string, e.g. "postgresql://pocketbridge@db/pocketbridge". Required with backend = "postgres".',
        "pool_size": 'PostgreSQL connections per instance.',
        "statement_timeout": 'PostgreSQL statement_timeout for every query, in seconds.',
        "op_timeout": 'A store call slower than this counts as "store unavailable": clients get 1013 and retry later.',
        "min_free_bytes": "Below this much free space on the data directory's filesystem (SQLite), new events are refused with\nthe rejection ack STORAGE_FULL instead of letting the disk fill up. 256 MiB; 0 turns the check off.",
        "batch_size": 'Most write operations (events, admissions, presence) committed together in one store transaction.',
        "batch_linger": "PostgreSQL: seconds a busy writer waits before taking the next batch, so concurrent connections'\nevents share one round trip and one WAL flush. 0 disables it. (The embedded store does not wait.)",
        "sqlite_synchronous": 'SQLite PRAGMA synchronous: "full" (no acknowledged event is lost on power failure) or "normal" (faster).',
    },
    "bus": {
        "backend": 'Fan-out between instances: "memory" (single instance) or "redis" (several instances).',
        "url": 'Redis URL when backend = "redis": redis://, rediss:// (TLS) or unix://.',
    },
    "ws": {
        "max_message_bytes": 'Largest WebSocket message accepted; bigger ones close the connection with 1009. 16 MiB.\nKeep it above [events] max_payload_bytes, so oversized events get a rejection instead of a close.',
        "handshake_timeout": 'Time a new connection has to finish the handshake.',
        "ping_interval": 'The server pings every ping_interval and closes with 1008 when no pong arrives for pong_timeout.',
        "pong_timeout": '',
        "send_queue_messages": 'Per-connection send queue, in messages and in bytes (32 MiB). A client that falls this far behind is closed\nwith 1013 and catches up by replay when it reconnects.',
        "send_queue_bytes": '',
        "max_tracked_deliveries": "Live deliveries remembered per connection while waiting for the client's ack; the oldest are forgotten\nbeyond this (they are only re-delivered later, never lost).",
        "close_timeout": "How long to wait for the client's side of a close handshake.",
        "upgrade_timeout": 'Time a new TCP connection has to send its HTTP upgrade request. The upgrade and the handshake together\nnever take longer than handshake_timeout.',
        "max_handshake_message_bytes": 'Largest message accepted before the handshake is done (client_hello and client_auth are tiny). 64 KiB.',
        "max_fragments_per_message": 'Most frames one fragmented message may be sent in; more close the connection with 1009.',
        "max_pending_connections": 'Connections that have not finished the handshake (TCP accepted, upgrade or handshake under way), across all\naddresses. When the cap is reached the oldest of them is closed to make room.',
    },
    "session": {
        "ttl": 'Session lifetime; clients reconnect when it ends. At least 600. 86400 = 24 hours.',
        "warning_before": 'The "session expiring soon" warning is sent this long before the end. Must be less than ttl.',
    },
    "events": {
        "max_payload_bytes": 'Largest event payload (decoded) that is stored; larger events are rejected with PAYLOAD_TOO_LARGE. 10 MiB.\nMust be less than [ws] max_message_bytes.',
    },
    "limits": {
        "max_devices_per_user": 'Registered, non-revoked devices per account.',
        "ws_connections_per_ip": 'Open WebSocket connections per peer address.',
        "ws_connects_per_ip_per_minute": 'New WebSocket connections per peer address per minute.',
        "handshakes_per_ip_per_minute": 'Handshakes (client_hello) per peer address per minute.',
        "events_per_user_per_minute": 'Events per account: a token bucket refilled at this rate per minute, holding at most event_burst_per_user.',
        "event_burst_per_user": '',
        "scratchpad_per_connection_per_second": 'scratchpad_sync messages per connection per second; extra ones are dropped.',
        "clock_skew": 'How far client clocks may be off (event ttl, signed HTTP requests), in seconds either way.',
        "ipv6_prefix": 'IPv6 peers count against their prefix of this length (a /64 is usually one subscriber).',
        "max_stored_bytes_per_user": 'Stored payload bytes per account (events within retention); beyond it events are refused with\nQUOTA_EXCEEDED. 1 GiB; 0 means unlimited.',
        "stored_bytes_per_user_per_minute": 'Payload bytes per account per minute; beyond it events are refused with QUOTA_EXCEEDED. 256 MiB; 0 means\nunlimited.',
    },
    "replay": {
        "default_page_size": 'Events per replay page when the client asks for none, and the most it may ask for. default <= max.',
        "max_page_size": '',
        "max_page_bytes": 'A replay page stops before its events exceed this many bytes (it always holds at least one event). 8 MiB.',
        "full_resync_threshold": 'A device this many events behind is told to resync from scratch instead of replaying.',
        "token_max_age": "Replay continuation tokens older than this are ignored (the replay starts over from the device's cursor).",
    },
    "pairing": {
        "code_ttl": 'Lifetime of a 6-digit pairing code.',
        "initiations_per_device_per_hour": 'Pairing codes a device may request per hour.',
        "max_failures_per_connection": 'Wrong pairing codes allowed per connection (then it is closed), per peer address per hour, and per minute\nacross the whole deployment. They stop code guessing.',
        "max_failures_per_ip_per_hour": '',
        "max_failures_per_minute": '',
    },
    "retention": {
        "event_days": 'Events older than this many days are deleted, unless their own ttl is later. Devices are never deleted.',
        "purge_interval": 'How often the purge runs.',
        "audit_days": 'Days the audit trail (handshake refusals, registrations, pairings, renames, revocations, account\ndeletions, admin actions, rate-limit cut-offs) is kept. Read it with GET /admin/audit.',
        "inactive_user_days": 'Accounts whose every device is revoked and that had no activity for this many days are deleted by the\npurge. 0 (the default) keeps them.',
    },
    "http": {
        "bearer_token_ttl": 'Lifetime of the bearer tokens issued by POST /api/auth/token.',
        "max_body_bytes": 'Largest request body; larger ones get 413. 64 KiB.',
        "cors_origins": 'Browser origins allowed by CORS, e.g. ["https://app.example.com"] (scheme://host[:port], no path), or ["*"].\nEmpty: no cross-origin access.',
        "unauthenticated_per_ip_per_minute": 'Per peer address, per minute: requests before authentication, and failed authentications\n(after which all of /api answers 429 for that address).',
        "auth_failures_per_ip_per_minute": '',
        "requests_per_device_per_minute": 'Per device, per minute: /api requests, and token requests (/api/auth/token and /refresh).',
        "token_requests_per_device_per_minute": '',
        "device_mutations_per_user_per_minute": 'Per account: device renames and deletions per minute, account deletions per hour.',
        "account_deletions_per_user_per_hour": '',
        "keep_alive_timeout": 'An idle keep-alive connection is closed after this many seconds.',
    },
    "admin": {
        "api_key": 'Key for /admin/* (X-Admin-API-Key or "Authorization: Bearer"). Empty: the admin API is disabled.\nOtherwise at least 32 characters, e.g. from `openssl rand -hex 32`. Prefer PB_ADMIN_API_KEY to keep it out of files.',
        "requests_per_ip_per_minute": 'Per peer address, per minute: /admin requests, and failed admin authentications.',
        "auth_failures_per_ip_per_minute": '',
    },
    "log": {
        "level": '"debug", "info", "warning" or "error".',
        "format": '"json", "text", or "auto" (text on a terminal, json otherwise).',
    },
    "drain": {
        "window": 'On SIGTERM, existing connections are closed (1001) spread over `window` seconds, and the process exits\nafter `deadline` at the latest. window must be less than deadline.',
        "deadline": '',
    },
    "tracing": {
        "exporter": 'Optional OpenTelemetry tracing (install the extra: pip install \'pocketbridge[tracing]\').\n"none" (default, no overhead), "otlp" (OTLP/HTTP to endpoint) or "console" (spans on stdout).\nSpans: ws.handshake, event.ingest, store.batch, relay.publish, relay.deliver. They carry no ids, keys or\npayloads. A relay across instances is one trace: only the W3C trace context travels in the bus message.',
        "endpoint": 'The OTLP/HTTP traces endpoint of your collector.',
        "service_name": 'service.name of the spans.',
    },
}

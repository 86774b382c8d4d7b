-- PocketBridge embedded store, schema version 2 (SQLite). The PostgreSQL schema is /schema.sql.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS users (
    user_id       TEXT PRIMARY KEY CHECK (length(user_id) = 64 AND user_id = lower(user_id)),
    created_at    INTEGER NOT NULL,
    server_seq    INTEGER NOT NULL DEFAULT 0 CHECK (server_seq >= 0),
    deleting      INTEGER NOT NULL DEFAULT 0,
    last_activity INTEGER,
    stored_bytes  INTEGER NOT NULL DEFAULT 0,  -- payload bytes of the user's stored events (the quota)
    quota_tokens  REAL,                        -- the bytes-per-minute bucket: bytes available at quota_at
    quota_at      INTEGER
);

CREATE TABLE IF NOT EXISTS devices (
    device_id           TEXT PRIMARY KEY CHECK (length(device_id) = 36 AND device_id = lower(device_id)),
    user_id             TEXT NOT NULL REFERENCES users (user_id),
    bound_key           TEXT NOT NULL CHECK (length(bound_key) = 64 AND bound_key = lower(bound_key)),
    device_name         TEXT CHECK (device_name IS NULL OR length(device_name) BETWEEN 1 AND 50),
    device_type         TEXT CHECK (device_type IS NULL OR device_type IN ('mobile', 'desktop', 'web')),
    registered_at       INTEGER NOT NULL,
    last_seen           INTEGER,
    is_online           INTEGER NOT NULL DEFAULT 0,
    connection_id       TEXT,
    last_ack_device_seq INTEGER NOT NULL DEFAULT 0,
    delivery_cursor     INTEGER NOT NULL DEFAULT 0,
    revoked_at          INTEGER,
    revoke_reason       TEXT
);
CREATE INDEX IF NOT EXISTS devices_user ON devices (user_id);
CREATE UNIQUE INDEX IF NOT EXISTS devices_name_per_user
    ON devices (user_id, device_name) WHERE revoked_at IS NULL AND device_name IS NOT NULL;

CREATE TABLE IF NOT EXISTS streams (
    user_id   TEXT NOT NULL,
    stream_id TEXT NOT NULL,
    last_seq  INTEGER NOT NULL,
    PRIMARY KEY (user_id, stream_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS events (
    user_id           TEXT NOT NULL,
    server_seq        INTEGER NOT NULL,
    event_id          TEXT NOT NULL,
    device_id         TEXT NOT NULL,
    device_seq        INTEGER NOT NULL CHECK (device_seq BETWEEN 1 AND 9007199254740991),
    stream_id         TEXT NOT NULL,
    stream_seq        INTEGER NOT NULL,
    type              TEXT NOT NULL,
    encrypted_payload TEXT NOT NULL,
    payload_size      INTEGER NOT NULL,
    ttl               INTEGER,
    created_at        INTEGER NOT NULL,
    UNIQUE (user_id, server_seq),
    UNIQUE (user_id, event_id),
    UNIQUE (user_id, device_id, device_seq)
);
CREATE INDEX IF NOT EXISTS events_ttl ON events (ttl) WHERE ttl IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_created ON events (created_at);
-- Covers what deleting an account reads (rowid, payload_size) without walking each event's payload pages.
CREATE INDEX IF NOT EXISTS events_user_size ON events (user_id, server_seq, payload_size);

CREATE TABLE IF NOT EXISTS pairing_codes (
    code       TEXT PRIMARY KEY CHECK (length(code) = 6),
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used       INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS profiles (
    user_id              TEXT PRIMARY KEY,
    display_name         TEXT CHECK (display_name IS NULL OR length(display_name) BETWEEN 1 AND 100),
    email                TEXT CHECK (email IS NULL OR length(email) <= 254),
    avatar_url           TEXT,
    preferences          TEXT NOT NULL DEFAULT '{}',
    onboarding_completed INTEGER NOT NULL DEFAULT 0,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
);

-- PB1 signatures accepted recently (replay protection, §10.2), kept until their timestamp + skew.
CREATE TABLE IF NOT EXISTS seen_signatures (
    signature  TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_signatures_expiry ON seen_signatures (expires_at);

-- Security-relevant actions (full device and user ids; never keys, signatures, codes or payloads).
CREATE TABLE IF NOT EXISTS audit_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    action TEXT NOT NULL,
    actor  TEXT,
    target TEXT,
    peer   TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at);

-- Failed pairing attempts (§7), for the limits every instance must see (per address, deployment-wide).
CREATE TABLE IF NOT EXISTS pairing_failures (
    at   INTEGER NOT NULL,
    peer TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pairing_failures_at ON pairing_failures (at);
CREATE INDEX IF NOT EXISTS pairing_failures_peer ON pairing_failures (peer, at);

-- Every deletion of an event (purge, account deletion) gives its bytes back to the user's quota.
CREATE TRIGGER IF NOT EXISTS events_release_quota AFTER DELETE ON events BEGIN
    UPDATE users SET stored_bytes = max(0, stored_bytes - OLD.payload_size) WHERE user_id = OLD.user_id;
END;

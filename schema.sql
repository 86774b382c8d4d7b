-- PocketBridge PostgreSQL schema, version 2.
-- Applied by `pocketbridge migrate` (versioned, idempotent, under an advisory lock); `serve` refuses to
-- start on an unmigrated or newer schema. Times are timestamptz; the wire carries epoch milliseconds.

CREATE TABLE IF NOT EXISTS pb_schema (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS users (
    user_id       text PRIMARY KEY CHECK (user_id ~ '^[0-9a-f]{64}$'),
    created_at    timestamptz NOT NULL,
    server_seq    bigint NOT NULL DEFAULT 0 CHECK (server_seq >= 0),
    deleting      boolean NOT NULL DEFAULT false,
    last_activity timestamptz
);
-- version 2: the storage quota (payload bytes stored, and a bytes-per-minute bucket: bytes available at quota_at)
ALTER TABLE users ADD COLUMN IF NOT EXISTS stored_bytes bigint NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN IF NOT EXISTS quota_tokens double precision;
ALTER TABLE users ADD COLUMN IF NOT EXISTS quota_at bigint;

CREATE TABLE IF NOT EXISTS devices (
    device_id           text PRIMARY KEY
                        CHECK (device_id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$'),
    user_id             text NOT NULL REFERENCES users (user_id),
    bound_key           text NOT NULL CHECK (bound_key ~ '^[0-9a-f]{64}$'),
    device_name         text CHECK (device_name IS NULL OR char_length(device_name) BETWEEN 1 AND 50),
    device_type         text CHECK (device_type IS NULL OR device_type IN ('mobile', 'desktop', 'web')),
    registered_at       timestamptz NOT NULL,
    last_seen           timestamptz,
    is_online           boolean NOT NULL DEFAULT false,
    connection_id       text,
    instance_id         text,
    last_ack_device_seq bigint NOT NULL DEFAULT 0,
    delivery_cursor     bigint NOT NULL DEFAULT 0,
    revoked_at          timestamptz,
    revoke_reason       text CHECK (revoke_reason IS NULL OR char_length(revoke_reason) <= 200)
);
CREATE INDEX IF NOT EXISTS devices_user ON devices (user_id);
CREATE INDEX IF NOT EXISTS devices_instance ON devices (instance_id) WHERE is_online;
CREATE UNIQUE INDEX IF NOT EXISTS devices_name_per_user
    ON devices (user_id, device_name) WHERE revoked_at IS NULL AND device_name IS NOT NULL;

CREATE TABLE IF NOT EXISTS streams (
    user_id   text NOT NULL,
    stream_id text NOT NULL,
    last_seq  bigint NOT NULL,
    PRIMARY KEY (user_id, stream_id)
);

CREATE TABLE IF NOT EXISTS events (
    user_id           text NOT NULL,
    server_seq        bigint NOT NULL,
    event_id          text NOT NULL,
    device_id         text NOT NULL,
    device_seq        bigint NOT NULL CHECK (device_seq BETWEEN 1 AND 9007199254740991),
    stream_id         text NOT NULL CHECK (char_length(stream_id) <= 256 AND stream_id ~ '^[A-Za-z0-9:_-]+$'),
    stream_seq        bigint NOT NULL,
    type              text NOT NULL CHECK (type ~ '^[A-Za-z0-9:_-]{1,64}$'),
    encrypted_payload text NOT NULL,
    payload_size      integer NOT NULL CHECK (payload_size >= 1),
    ttl               bigint,
    created_at        timestamptz NOT NULL,
    PRIMARY KEY (user_id, server_seq),
    UNIQUE (user_id, event_id),
    UNIQUE (user_id, device_id, device_seq)
);
CREATE INDEX IF NOT EXISTS events_ttl ON events (ttl) WHERE ttl IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_created ON events (created_at);

CREATE TABLE IF NOT EXISTS pairing_codes (
    code       text PRIMARY KEY CHECK (code ~ '^[0-9]{6}$'),
    user_id    text NOT NULL,
    device_id  text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    used       boolean NOT NULL DEFAULT false
);

CREATE TABLE IF NOT EXISTS profiles (
    user_id              text PRIMARY KEY,
    display_name         text CHECK (display_name IS NULL OR char_length(display_name) BETWEEN 1 AND 100),
    email                text CHECK (email IS NULL OR char_length(email) <= 254),
    avatar_url           text,
    preferences          jsonb NOT NULL DEFAULT '{}',
    onboarding_completed boolean NOT NULL DEFAULT false,
    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS seen_signatures (
    signature  text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_signatures_expiry ON seen_signatures (expires_at);

-- Live instances (heartbeat); devices online on an instance that stopped beating are set offline.
CREATE TABLE IF NOT EXISTS instances (
    instance_id text PRIMARY KEY,
    last_beat   timestamptz NOT NULL
);

-- Security-relevant actions (full device and user ids; never keys, signatures, codes or payloads).
CREATE TABLE IF NOT EXISTS audit_log (
    id     bigserial PRIMARY KEY,
    at     timestamptz NOT NULL,
    action text NOT NULL,
    actor  text,
    target text,
    peer   text,
    detail text
);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at);

-- Failed pairing attempts (§7), for the limits every instance must see (per address, deployment-wide).
CREATE TABLE IF NOT EXISTS pairing_failures (
    at   timestamptz NOT NULL,
    peer text NOT NULL
);
CREATE INDEX IF NOT EXISTS pairing_failures_at ON pairing_failures (at);
CREATE INDEX IF NOT EXISTS pairing_failures_peer ON pairing_failures (peer, at);

-- Millisecond helpers (the wire's unit).
CREATE OR REPLACE FUNCTION pb_ms(t timestamptz) RETURNS bigint
    LANGUAGE sql IMMUTABLE AS $$ SELECT (extract(epoch FROM t) * 1000)::bigint $$;
CREATE OR REPLACE FUNCTION pb_ts(ms bigint) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE AS $$ SELECT to_timestamp(ms / 1000.0) $$;

-- One event, one round trip: idempotency, quota, server_seq and stream_seq in one call (§5.4).
-- The PostgreSQL fast path of the append rule: the same checks in the same order as rules.append_event
-- (pocketbridge/store/rules.py, which SQLite and the in-memory store run). Change both together;
-- tests/unit/test_store_contract.py runs the same cases on every backend.
-- outcome: stored | duplicate | conflict | revoked | deleting | quota_exceeded
-- p_max_bytes: stored payload bytes allowed per user; p_rate: payload bytes per minute (0 = unlimited).
DROP FUNCTION IF EXISTS pb_append_event(text, text, text, bigint, text, text, text, integer, bigint, bigint);
-- Every writer of a user's events first locks the user's row, so the duplicate checks below cannot
-- race another instance, and commit order equals server_seq order within the user.
CREATE OR REPLACE FUNCTION pb_append_event(
    p_user text, p_event_id text, p_device text, p_device_seq bigint, p_stream text, p_type text,
    p_payload text, p_size integer, p_ttl bigint, p_now bigint, p_max_bytes bigint, p_rate bigint,
    OUT outcome text, OUT server_seq bigint, OUT stream_seq bigint
) LANGUAGE plpgsql AS $$
DECLARE
    v_owner text; v_revoked timestamptz; v_deleting boolean; v_existing text;
    v_stored bigint; v_tokens double precision; v_at bigint; v_avail double precision;
BEGIN
    SELECT u.deleting, u.stored_bytes, u.quota_tokens, u.quota_at INTO v_deleting, v_stored, v_tokens, v_at
      FROM users u WHERE u.user_id = p_user FOR UPDATE;
    SELECT d.user_id, d.revoked_at INTO v_owner, v_revoked FROM devices d WHERE d.device_id = p_device;
    IF v_owner IS NULL OR v_owner <> p_user OR v_revoked IS NOT NULL THEN
        outcome := 'revoked'; RETURN;
    END IF;
    IF v_deleting THEN
        outcome := 'deleting'; RETURN;
    END IF;
    SELECT e.event_id INTO v_existing FROM events e
     WHERE e.user_id = p_user AND e.device_id = p_device AND e.device_seq = p_device_seq;
    IF FOUND THEN
        outcome := CASE WHEN v_existing = p_event_id THEN 'duplicate' ELSE 'conflict' END; RETURN;
    END IF;
    PERFORM 1 FROM events e WHERE e.user_id = p_user AND e.event_id = p_event_id;
    IF FOUND THEN
        outcome := 'duplicate'; RETURN;
    END IF;
    IF p_max_bytes > 0 AND v_stored + p_size > p_max_bytes THEN
        outcome := 'quota_exceeded'; RETURN;
    END IF;
    IF p_rate > 0 THEN
        v_avail := CASE WHEN v_tokens IS NULL OR v_at IS NULL THEN p_rate ELSE v_tokens END;
        IF v_at IS NOT NULL THEN
            v_avail := least(p_rate, v_avail + greatest(0, p_now - v_at) * p_rate / 60000.0);
        END IF;
        IF p_size > v_avail THEN
            outcome := 'quota_exceeded'; RETURN;
        END IF;
        v_tokens := v_avail - p_size;
    ELSE
        v_tokens := NULL;
    END IF;
    UPDATE users u SET server_seq = u.server_seq + 1, last_activity = pb_ts(p_now),
           stored_bytes = u.stored_bytes + p_size, quota_tokens = v_tokens, quota_at = p_now
     WHERE u.user_id = p_user RETURNING u.server_seq INTO server_seq;
    INSERT INTO streams AS s (user_id, stream_id, last_seq) VALUES (p_user, p_stream, 1)
        ON CONFLICT (user_id, stream_id) DO UPDATE SET last_seq = s.last_seq + 1
        RETURNING s.last_seq INTO stream_seq;
    INSERT INTO events (user_id, server_seq, event_id, device_id, device_seq, stream_id, stream_seq, type,
                        encrypted_payload, payload_size, ttl, created_at)
    VALUES (p_user, server_seq, p_event_id, p_device, p_device_seq, p_stream, stream_seq, p_type,
            p_payload, p_size, p_ttl, pb_ts(p_now));
    UPDATE devices SET last_ack_device_seq = greatest(last_ack_device_seq, p_device_seq)
     WHERE device_id = p_device;
    outcome := 'stored';
END $$;

-- Every deletion of events (purge, account deletion) gives their bytes back to the users' quotas.
CREATE OR REPLACE FUNCTION pb_release_quota() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE users u SET stored_bytes = greatest(0, u.stored_bytes - g.bytes)
      FROM (SELECT user_id, sum(payload_size) AS bytes FROM gone GROUP BY user_id) g
     WHERE u.user_id = g.user_id;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS events_release_quota ON events;
CREATE TRIGGER events_release_quota AFTER DELETE ON events REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION pb_release_quota();

-- Upgrading from version 1: count what each user already stores.
DO $$
BEGIN
    IF (SELECT coalesce(max(version), 0) FROM pb_schema) = 1 THEN
        UPDATE users u SET stored_bytes = coalesce((SELECT sum(e.payload_size) FROM events e
                                                    WHERE e.user_id = u.user_id), 0);
    END IF;
END $$;

INSERT INTO pb_schema (version) VALUES (1) ON CONFLICT DO NOTHING;
INSERT INTO pb_schema (version) VALUES (2) ON CONFLICT DO NOTHING;

"""The SDK raises its own error types as themselves, never wrapped in an exception group (docs/sdk.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from pocketbridge.client import Closed, DeviceKey, HandshakeRefused, connect, new_device_id
from tests.conftest import make_config, run_daemon


async def test_errors_reach_the_caller_unwrapped(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", drain={"window": 0.1, "deadline": 5})
    key = DeviceKey.generate()
    async with run_daemon(config) as (daemon, running):
        with pytest.raises(ValueError, match="mine"):  # an error of the caller's own code in the block
            async with connect(running.ws_url, key, new_device_id()):
                raise ValueError("mine")
        with pytest.raises(HandshakeRefused) as refused:  # another key for a registered device id
            device = new_device_id()
            async with connect(running.ws_url, key, device):
                pass
            async with connect(running.ws_url, DeviceKey.generate(), device):
                pass
        assert refused.value.code == 1008
        with pytest.raises(Closed) as closed:  # the server drains: 1001 inside the block
            async with connect(running.ws_url, key, new_device_id()) as client:
                daemon.stop()
                with trio.fail_after(10):
                    await client.receive_event()
        assert closed.value.code == 1001

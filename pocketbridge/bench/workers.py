"""The runner's side of the load-generator processes (``python -m pocketbridge.bench.worker``, see worker.py for
the line protocol): start them, call them (bounded), stop them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from .params import BenchError


class WorkerProc:
    """One ``python -m pocketbridge.bench.worker`` subprocess; JSON lines in and out."""

    def __init__(self, index: int, log_dir: Path) -> None:
        self.index = index
        self.log_path = log_dir / f"worker-{index}.log"
        self.proc: trio.Process | None = None
        self._buf = b""

    async def start(self) -> None:
        with open(self.log_path, "wb") as log:  # noqa: ASYNC230  (a local file, opened once)
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "pocketbridge.bench.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )

    async def _readline(self) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        while b"\n" not in self._buf:
            chunk = await self.proc.stdout.receive_some(1 << 20)
            if not chunk:
                raise BenchError(f"worker {self.index} exited unexpectedly:\n{self.log_tail()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    async def call(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:  # noqa: ASYNC109 (BenchError)
        assert self.proc is not None and self.proc.stdin is not None
        try:
            with trio.fail_after(timeout):
                await self.proc.stdin.send_all(json.dumps(cmd).encode() + b"\n")
                reply: dict[str, Any] = json.loads(await self._readline())
        except trio.TooSlowError:
            raise BenchError(f"worker {self.index}: {cmd['cmd']} did not answer within {timeout:.0f} s") from None
        if not reply.get("ok"):
            raise BenchError(f"worker {self.index}: {cmd['cmd']} failed: {reply.get('error')}")
        return reply

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self) -> None:
        """Ask it to exit (closing its connections), then kill it if it hasn't within 5 s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                try:
                    if proc.stdin is not None:
                        await proc.stdin.send_all(b'{"cmd":"exit"}\n')
                        await proc.stdin.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(5):
                    await proc.wait()


async def call_all(
    workers: Sequence[WorkerProc], cmds: Sequence[dict[str, Any]], timeout: float  # noqa: ASYNC109 (per worker)
) -> list[dict[str, Any]]:
    """``cmds[i]`` to ``workers[i]``, all at once; their replies (the first failure is raised)."""
    results: list[dict[str, Any] | None] = [None] * len(workers)

    async def one(i: int) -> None:
        results[i] = await workers[i].call(cmds[i], timeout)

    try:
        async with trio.open_nursery() as nursery:
            for i in range(len(workers)):
                nursery.start_soon(one, i)
    except BaseExceptionGroup as group:
        first = group.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [r for r in results if r is not None]


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` near-equal shares."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]

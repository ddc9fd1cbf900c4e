"""A client of the daemon's API on its unix socket (what ``dataplane --daemon ...`` uses).

::

    async with DaemonClient("/run/dataplane/api.sock") as api:
        job = await api.create("storage-migrations", body)
        async for event in api.events("storage-migrations", job["id"]):
            ...                     # the last one is the report
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

__all__ = ["DaemonClient", "DaemonError"]


class DaemonError(Exception):
    """The daemon cannot be reached, or refused a request (``status``: its HTTP status, 0 when
    unreachable; the message is its error line)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class DaemonClient:
    """HTTP/JSON over the daemon's unix socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        # no total limit: an event stream lasts as long as its migration; the daemon sends a
        # keep-alive every 15 s, so a read that waits a minute means it is gone
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path),
                                             base_url="http://dataplane",
                                             timeout=aiohttp.ClientTimeout(total=None, sock_connect=30,
                                                                           sock_read=60))

    async def __aenter__(self) -> DaemonClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.session.close()

    async def _call(self, method: str, url: str, body: Any = None) -> Any:
        try:
            async with self.session.request(method, url, json=body) as resp:
                text = await resp.text()
                data = json.loads(text) if text else None
                if resp.status >= 400:
                    error = data.get("error") if isinstance(data, dict) else text
                    details = data.get("details") if isinstance(data, dict) else None
                    more = f" ({'; '.join(details)})" if details and len(details) > 1 else ""
                    raise DaemonError(f"the daemon says: {error}{more}", resp.status)
                return data
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            why = str(exc) or type(exc).__name__
            raise DaemonError(f"cannot reach the daemon on {self.path}: {why}") from None
        except ValueError as exc:
            raise DaemonError(f"the daemon answered something that is not JSON: {exc}") from None

    async def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a new job. :raises DaemonError: unreachable or refused (a 4xx with the reason)."""
        job: dict[str, Any] = await self._call("POST", f"/v1/{resource}", body)
        return job

    async def get(self, resource: str, job_id: str) -> dict[str, Any]:
        """The job. :raises DaemonError: unreachable or no such job."""
        job: dict[str, Any] = await self._call("GET", f"/v1/{resource}/{job_id}")
        return job

    async def cancel(self, resource: str, job_id: str) -> None:
        """Ask the job to stop (an ended job is fine). :raises DaemonError: unreachable."""
        try:
            await self._call("DELETE", f"/v1/{resource}/{job_id}")
        except DaemonError as exc:
            if exc.status != 409:
                raise

    async def events(self, resource: str, job_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        """The job's events after event ``after``, until the stream ends (after the report).

        :raises DaemonError: unreachable, or the stream broke.
        """
        try:
            async with self.session.get(f"/v1/{resource}/{job_id}/events",
                                        headers={"Last-Event-ID": str(after)}) as resp:
                if resp.status != 200:
                    raise DaemonError(f"the daemon refused the event stream ({resp.status})", resp.status)
                async for raw in resp.content:
                    line = raw.decode(errors="replace")
                    if line.startswith("data: "):
                        yield json.loads(line[6:])
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise DaemonError(f"the event stream of job {job_id} from the daemon broke "
                              f"({exc or type(exc).__name__}); the job goes on in the daemon") from None

"""A client of the daemon's API over its unix socket (httpx), for the CLI (`memvisor create/exec/stop`)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from memvisor.errors import MemvisorError

CONNECT_TIMEOUT_S = 5.0
CREATE_TIMEOUT_S = 300.0  # a TCG boot with swap set-up


class Client:
    """Talks to one daemon."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://memvisor",
                                  timeout=httpx.Timeout(CREATE_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise MemvisorError(f"cannot reach the memvisor daemon at {self.socket_path}: {exc}",
                                hint="start it with `memvisor serve`, or pass --socket") from None
        return _checked(response)

    def create(self, policy: dict[str, dict[str, Any]], name: str | None = None, debug: bool = False,
               template: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"policy": policy, "name": name, "debug": debug}
        if template is not None:
            body["template"] = template
        return dict(self._call("POST", "/v1/sandboxes", body))

    def make_template(self, name: str, source: str | None = None, policy: dict[str, dict[str, Any]] | None = None,
                      argv: list[str] | None = None, timeout: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "source": source, "argv": argv, "timeout": timeout}
        if policy:
            body["policy"] = policy
        return dict(self._call("POST", "/v1/templates", body))

    def templates(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/templates"))

    def remove_template(self, name: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/v1/templates/{name}"))

    def list(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/sandboxes"))

    def park(self, key: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/sandboxes/{key}/park", {}))

    def resume(self, key: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/sandboxes/{key}/resume", {}))

    def stop(self, key: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/v1/sandboxes/{key}"))

    def fleet(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/fleet"))

    def drain(self, node: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/fleet/nodes/{node}/drain", {}))

    def exec(self, key: str, request: dict[str, Any], on_stdout: Callable[[bytes], None],
             on_stderr: Callable[[bytes], None]) -> dict[str, Any]:
        """Run a command, streaming its output to the callbacks; return its exit record."""
        try:
            with self._http.stream("POST", f"/v1/sandboxes/{key}/exec", json=request,
                                   timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)) as response:
                if response.status_code >= 400:
                    response.read()
                    _checked(response)
                for line in response.iter_lines():
                    item = json.loads(line)
                    if "stdout" in item:
                        on_stdout(base64.b64decode(item["stdout"]))
                    elif "stderr" in item:
                        on_stderr(base64.b64decode(item["stderr"]))
                    elif "exit" in item:
                        return dict(item["exit"])
                    elif "error" in item:
                        raise MemvisorError(f"the command failed in sandbox {key}: {item['error']}")
        except httpx.TransportError as exc:
            raise MemvisorError(f"lost the memvisor daemon at {self.socket_path}: {exc}") from None
        raise MemvisorError(f"the daemon ended the command's stream in sandbox {key} without its exit")


def _checked(response: httpx.Response) -> Any:
    if response.status_code < 400:
        return response.json()
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text[:200]}
    detail = body.get("detail")
    if isinstance(detail, list):  # FastAPI's validation errors: name the fields
        detail = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" for d in detail)
    raise MemvisorError(f"the daemon refused the request ({response.status_code}): {detail}", hint=body.get("hint"))

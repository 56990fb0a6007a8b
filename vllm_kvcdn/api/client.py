"""A small HTTP client for the side API (stdlib only, used by the CLI)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request

from vllm_kvcdn.defaults import PUBLISHER_KEY_ENV


class APIError(Exception):
    pass


class SideAPIClient:
    def __init__(self, server: str, key: str | None = None, timeout: float = 600):
        self.base = server.rstrip("/") + "/kvcdn/v1"
        self.key = key or os.environ.get(PUBLISHER_KEY_ENV)
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise APIError(f"{method} {path}: HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise APIError(f"cannot reach {self.base}: {e.reason}") from None

    def publish(self, *, text: str | None = None, messages: list | None = None, tokens: list | None = None,
                title: str = "", cache_salt: str | None = None, metadata: dict | None = None,
                adapter: str | None = None, private: bool = False, require_grant: bool = False) -> dict:
        body = {"text": text, "messages": messages, "tokens": tokens, "title": title, "cache_salt": cache_salt,
                "metadata": metadata or {}, "adapter": adapter, "private": private or None,
                "require_grant": require_grant or None}
        return self._call("POST", "/documents", {k: v for k, v in body.items() if v is not None})

    def list(self) -> dict:
        return self._call("GET", "/documents")

    def get(self, doc_id: str, verify: bool = False) -> dict:
        return self._call("GET", f"/documents/{doc_id}" + ("?verify=true" if verify else ""))

    def delete(self, doc_id: str) -> dict:
        return self._call("DELETE", f"/documents/{doc_id}")

    def verify(self, doc_id: str) -> dict:
        return self._call("POST", f"/documents/{doc_id}/verify")

    def stats(self) -> dict:
        return self._call("GET", "/stats")

    def usage(self, *, cache_salt: str | None = None, **filters) -> dict:
        """The usage report (``document``, ``tenant``, ``since``, ``until``, ``detail``,
        ``limit``); with ``cache_salt`` (and no key) a tenant's own reads."""
        query = urllib.parse.urlencode({k: str(v).lower() if isinstance(v, bool) else v
                                        for k, v in filters.items() if v is not None})
        headers = {"X-KVCDN-Cache-Salt": cache_salt} if cache_salt is not None else None
        return self._call("GET", "/usage" + (f"?{query}" if query else ""), headers=headers)

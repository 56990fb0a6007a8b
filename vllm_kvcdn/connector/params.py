"""A request's ``kv_transfer_params["kvcdn"]``, parsed and checked where it enters.

Any client of vLLM's OpenAI routes can put anything in ``kv_transfer_params``. Parsing
never raises; a value we cannot use is a logged, counted, ignored request (served as an
ordinary one). Publishing or verifying writes to the shared store, so it needs the
publisher key (``KVCDNConfig.publish_key``); without one configured, no request may.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from vllm_kvcdn.chain import is_chunk_key
from vllm_kvcdn.config import PUBLISH_PARAM

MAX_TITLE_CHARS = 512
MAX_METADATA_BYTES = 16 * 1024  # JSON; the manifest carries it to every reader
WAIT_PROMPT = [0]  # the prompt of a wait_for request: one token, nothing to match


@dataclass(frozen=True)
class PublishAsk:
    """A checked publish, verify (``verify``: the document id) or wait for the result of
    either (``wait_for``: the document id; see ``scheduler`` "Publish results")."""

    verify: str | None = None
    wait_for: str | None = None
    sync_index: bool = False  # wait until the index has re-read the store (after a deletion)
    title: str = ""
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class KVCDNParams:
    ask: PublishAsk | None = None  # None: an ordinary request (it may still hit)
    rejected: str | None = None  # why the kvcdn params were ignored, for the response and the log
    reason: str | None = None  # short label of ``rejected`` for metrics


def metadata_problem(metadata: Any) -> str | None:
    """Why ``metadata`` cannot go into a manifest, or None (shared with the side API)."""
    if not isinstance(metadata, dict):
        return "'metadata' must be a JSON object"
    try:
        size = len(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as e:
        return f"'metadata' is not plain JSON: {e}"
    if size > MAX_METADATA_BYTES:
        return f"'metadata' is {size} bytes of JSON; the limit is {MAX_METADATA_BYTES}"
    return None


def _reject(reason: str, message: str) -> KVCDNParams:
    return KVCDNParams(rejected=message, reason=reason)


def parse_params(raw: Any, publish_key: str) -> KVCDNParams:
    """What a request's ``kv_transfer_params`` asks of kvcdn. Never raises."""
    try:
        return _parse(raw, publish_key)
    except Exception as e:  # a bug here must not reach the engine: treat it as malformed
        return _reject("malformed", f"kvcdn params could not be read: {type(e).__name__}")


def _parse(raw: Any, publish_key: str) -> KVCDNParams:
    if raw is None:
        return KVCDNParams()
    if not isinstance(raw, dict):
        return _reject("malformed", "kv_transfer_params must be a JSON object")
    params = raw.get(PUBLISH_PARAM)
    if params is None:
        return KVCDNParams()
    if not isinstance(params, dict):
        return _reject("malformed", f"kv_transfer_params.{PUBLISH_PARAM} must be a JSON object")
    publish, verify, wait_for = params.get("publish", False), params.get("verify"), params.get("wait_for")
    sync_index = params.get("sync_index") is True
    if not publish and verify is None and wait_for is None and not sync_index:
        return KVCDNParams()  # nothing asked (e.g. a client echoing back a response's report)
    if publish is not True and publish is not False:
        return _reject("malformed", "'publish' must be true or false")
    if sum((bool(publish), verify is not None, wait_for is not None, sync_index)) > 1:
        return _reject("malformed", "ask for one of 'publish', 'verify', 'wait_for' and 'sync_index'")
    for name, doc_id in (("verify", verify), ("wait_for", wait_for)):
        if doc_id is not None and not is_chunk_key(doc_id):
            return _reject("malformed", f"'{name}' must be a document id (64 lowercase hex digits)")
    title, metadata = params.get("title", ""), params.get("metadata") or {}
    if not isinstance(title, str) or len(title) > MAX_TITLE_CHARS:
        return _reject("malformed", f"'title' must be a string of at most {MAX_TITLE_CHARS} characters")
    problem = metadata_problem(metadata)
    if problem:
        return _reject("malformed", problem)
    key = params.get("key")
    if not publish_key:
        return _reject("unauthorized", "publishing through kv_transfer_params is off on this server "
                                       "(publish with `kvcdn serve`'s side API, or set "
                                       "kv_connector_extra_config.publish_key)")
    if not isinstance(key, str) or not hmac.compare_digest(key.encode(), publish_key.encode()):
        return _reject("unauthorized", f"publish, verify and wait_for need the publisher key in "
                                       f"kv_transfer_params.{PUBLISH_PARAM}.key")
    ask = PublishAsk(verify=verify, wait_for=wait_for, sync_index=sync_index, title=title, metadata=metadata)
    return KVCDNParams(ask=ask)

"""The commands' way to a running server's side API: a client from the arguments, and
an API error turned into a one-line exit."""

from __future__ import annotations


def client(args):
    from vllm_kvcdn.api.client import SideAPIClient

    return SideAPIClient(args.server, key=getattr(args, "key", None))


def call(fn):
    """``fn()``, or exit with the API's error message."""
    from vllm_kvcdn.api.client import APIError

    try:
        return fn()
    except APIError as e:
        raise SystemExit(f"kvcdn: {e}") from None

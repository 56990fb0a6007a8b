"""Helpers the tests share: S3 and HTTP servers, the scheduler rig, documents and queries."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository's root

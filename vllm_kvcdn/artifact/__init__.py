"""The artifact: what a published document is, independent of any engine.

``chain`` (chunk keys), ``fingerprint`` (what the KV depends on), ``chunk_format`` and
``codec`` (a chunk's bytes), ``manifest`` (a document), ``documents`` (write, read and
compare them through a store), ``catalog`` (list, inspect, delete), ``index`` (match a
prompt against published chunks in memory)."""

"""``kvcdn``: the command line. Every subcommand has ``--help``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vllm_kvcdn.artifact import ArtifactError, Manifest, decode_chunk
from vllm_kvcdn.index import MANIFEST_PREFIX, chunk_object_key, manifest_object_key
from vllm_kvcdn.store import default_store_url, open_store


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help=f"store URL (default: $KVCDN_STORE or {default_store_url()})")


def _manifests(store):
    for key in sorted(store.list(MANIFEST_PREFIX)):
        data = store.get(key)
        if data is None:
            continue
        try:
            yield Manifest.from_json(data)
        except ArtifactError as e:
            print(f"warning: skipping {key}: {e}", file=sys.stderr)


def _find_manifest(store, doc: str) -> Manifest:
    if Path(doc).is_file():
        return Manifest.from_json(Path(doc).read_bytes())
    matches = [m for m in _manifests(store) if m.doc_id.startswith(doc)]
    if len(matches) != 1:
        raise SystemExit(f"kvcdn: {len(matches)} documents match {doc!r} in {store.url}; give more of the id")
    return matches[0]


def cmd_make_tiny_model(args) -> None:
    from vllm_kvcdn.tiny_model import make_model

    out = make_model(args.dir, args.shape, seed=args.seed, dtype=args.dtype)
    print(f"wrote a {args.shape} Qwen3-architecture model with seeded random weights to {out}")


def cmd_ls(args) -> None:
    store = open_store(args.store)
    rows = list(_manifests(store))
    if args.json:
        print(json.dumps([json.loads(m.to_json()) for m in rows], indent=1))
        return
    print(f"{len(rows)} documents in {store.url}")
    for m in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created))
        print(f"{m.doc_id[:16]}  {m.num_tokens:>7} tok  {len(m.chunks):>4} chunks  "
              f"{m.total_bytes / 1e6:>9.2f} MB  {when}  fp={m.fingerprint[:12]}  {m.title}")


def cmd_inspect(args) -> None:
    store = open_store(args.store)
    m = _find_manifest(store, args.doc)
    print(m.to_json().decode())
    if args.verify:
        bad = 0
        for c in m.chunks:
            data = store.get(chunk_object_key(c.key))
            try:
                if data is None:
                    raise ArtifactError("missing", "chunk object is missing")
                kv = decode_chunk(data, key=c.key, fingerprint=m.fingerprint)
                status = "ok" if kv.header.checksum == c.checksum else "checksum differs from manifest"
            except ArtifactError as e:
                status = f"BAD ({e.reason}): {e}"
            bad += status != "ok"
            print(f"chunk {c.key[:16]} {c.num_tokens:>4} tok {c.nbytes:>10} B  {status}")
        if bad:
            raise SystemExit(f"kvcdn: {bad} of {len(m.chunks)} chunks failed verification")


def cmd_rm(args) -> None:
    store = open_store(args.store)
    m = _find_manifest(store, args.doc)
    store.delete(manifest_object_key(m.doc_id))  # first: no request can match it any more
    still_used = {c.key for other in _manifests(store) for c in other.chunks}
    removed = sum(store.delete(chunk_object_key(c.key)) for c in m.chunks if c.key not in still_used)
    print(f"removed document {m.doc_id[:16]} ({removed} chunks deleted, "
          f"{len(m.chunks) - removed} still used by other documents)")


def cmd_demo(args) -> None:
    from vllm_kvcdn.demo import run_demo

    run_demo(model=args.model, store_url=args.store, max_tokens=args.max_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcdn", description="vllm-kvcdn: publish a document's KV cache once, load it token-exact everywhere."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="publish a sample document and answer a question over it (tiny model, local store)")
    p.add_argument("--model", default=None, help="model path (default: generate the tiny model under ~/.cache/kvcdn/models)")
    _store_arg(p)
    p.add_argument("--max-tokens", type=int, default=16)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("make-tiny-model", help="write a Qwen3-architecture model with seeded random weights")
    p.add_argument("dir", help="output directory")
    p.add_argument("--shape", default="tiny", choices=["tiny", "qwen3-0.6b", "qwen3-4b"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("ls", help="list published documents in a store")
    _store_arg(p)
    p.add_argument("--json", action="store_true", help="print the manifests as JSON")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("inspect", help="show a document's manifest (and verify its chunks)")
    p.add_argument("doc", help="document id (a unique prefix is enough) or a manifest file")
    _store_arg(p)
    p.add_argument("--verify", action="store_true", help="read every chunk and check its checksum")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("rm", help="delete a document (chunks shared with other documents are kept)")
    p.add_argument("doc", help="document id (a unique prefix is enough)")
    _store_arg(p)
    p.set_defaults(func=cmd_rm)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()

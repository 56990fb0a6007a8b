"""``kvcdn``: the command line. Every subcommand has ``--help``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from vllm_kvcdn.artifact import catalog
from vllm_kvcdn.artifact.manifest import Manifest
from vllm_kvcdn.cli import side_api
from vllm_kvcdn.defaults import DEFAULT_CHUNK_SIZE, SIGNING_KEY_ENV, TENANT_KEY_ENV, default_store_url
from vllm_kvcdn.store import open_store


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help=f"store URL (default: $KVCDN_STORE or {default_store_url()})")


def _server_arg(p: argparse.ArgumentParser, default: str | None = None) -> None:
    where = f"default {default}" if default else "without it, work on --store directly"
    p.add_argument("--server", default=default, help=f"a kvcdn server URL, e.g. http://localhost:8000 ({where})")
    p.add_argument("--key", default=None, help="publisher key (default: $KVCDN_PUBLISHER_KEY)")


def _find_entry(store, doc: str) -> catalog.Entry:
    matches = catalog.find(store, doc)
    if len(matches) != 1:
        raise SystemExit(f"kvcdn: {len(matches)} documents match {doc!r} in {store.url}; give more of the id")
    return matches[0]


def _find_manifest(store, doc: str) -> Manifest:
    if Path(doc).is_file():
        return Manifest.from_json(Path(doc).read_bytes())
    entry = _find_entry(store, doc)
    if isinstance(entry, catalog.DamagedManifest):
        raise SystemExit(f"kvcdn: {entry.advice()}")
    return entry


def cmd_make_tiny_model(args) -> None:
    from vllm_kvcdn.testing.tiny_model import make_model

    out = make_model(args.dir, args.shape, seed=args.seed, dtype=args.dtype)
    print(f"wrote a {args.shape} Qwen3-architecture model with seeded random weights to {out}")


def cmd_serve(args, vllm_args: list[str]) -> None:
    from vllm_kvcdn.cli.serve import serve

    serve(args.model, vllm_args, store_url=args.kvcdn_store, chunk_size=args.kvcdn_chunk_size,
          preset=args.kvcdn_preset, publisher_key=args.publisher_key)


def _read_document(path: str) -> str:
    return sys.stdin.read() if path == "-" else Path(path).read_text()


def cmd_publish(args) -> None:
    from tqdm import tqdm

    client = side_api.client(args)
    for path in tqdm(args.files, desc="publishing", unit="doc", disable=len(args.files) < 2):
        text = _read_document(path)
        title = args.title or ("stdin" if path == "-" else Path(path).name)
        if args.chat:
            try:
                messages = json.loads(text)
            except ValueError:
                messages = None
            if not isinstance(messages, list):  # plain text: one message
                messages = [{"role": args.role, "content": text}]
            result = side_api.call(lambda: client.publish(messages=messages, title=title, cache_salt=args.salt,
                                                          adapter=args.adapter, private=args.private,
                                                          require_grant=args.require_grant))
        else:
            result = side_api.call(lambda: client.publish(text=text, title=title, cache_salt=args.salt,
                                                          adapter=args.adapter, private=args.private,
                                                          require_grant=args.require_grant))
        print(f"{result['id']}  {result['num_tokens']} tokens  {result['num_chunks']} chunks  "
              f"{(result.get('bytes') or 0) / 1e6:.2f} MB  {result['seconds']:.2f}s  {title}")


def cmd_ls(args) -> None:
    if args.server:
        docs = side_api.call(lambda: side_api.client(args).list())["documents"]
        if args.json:
            print(json.dumps(docs, indent=1))
            return
        print(f"{len(docs)} documents on {args.server}")
        for d in docs:
            if "damaged" in d:
                print(f"{d['id'][:16]}  DAMAGED manifest: {d['damaged']}")
                continue
            reads = "-" if d["reads"] is None else d["reads"]  # "-": the server keeps no ledger
            print(f"{d['id'][:16]}  {d['num_tokens']:>7} tok  {d['num_chunks']:>4} chunks  {d['bytes'] / 1e6:>9.2f} MB"
                  f"  reads={reads:<6} {'servable' if d['servable'] else 'other model'}  {d['title']}")
        return
    store = open_store(args.store)
    rows = list(catalog.entries(store))
    if args.json:
        print(json.dumps([json.loads(m.to_json()) if isinstance(m, Manifest) else {"doc_id": m.doc_id,
                          "damaged": m.error} for m in rows], indent=1))
        return
    print(f"{len(rows)} documents in {store.url}")
    for m in rows:
        if isinstance(m, catalog.DamagedManifest):
            print(f"{m.doc_id[:16]}  DAMAGED manifest: {m.error}")
            continue
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created))
        print(f"{m.doc_id[:16]}  {m.num_tokens:>7} tok  {len(m.chunks):>4} chunks  "
              f"{m.total_bytes / 1e6:>9.2f} MB  {when}  fp={m.fingerprint[:12]}  {m.title}")


def cmd_inspect(args) -> None:
    if args.server:
        view = side_api.call(lambda: side_api.client(args).get(args.doc, verify=args.verify))
        print(json.dumps(view, indent=1))
        results = [(c["key"], c["status"]) for c in view.get("chunks", [])]
        chunks = view["manifest"]["chunks"]
    else:
        store = open_store(args.store)
        m = _find_manifest(store, args.doc)
        print(m.to_json().decode())
        print(_signed_by(m))
        results = catalog.verify_chunks(store, m) if args.verify else []
        chunks = [{"num_tokens": c.num_tokens, "nbytes": c.nbytes} for c in m.chunks]
    for (key, status), c in zip(results, chunks):
        print(f"chunk {key[:16]} {c['num_tokens']:>4} tok {c['nbytes']:>10} B  {status}")
    bad = sum(status != "ok" for _, status in results)
    if bad:
        raise SystemExit(f"kvcdn: {bad} of {len(chunks)} chunks failed verification; publish the document "
                         f"again to repair it")


def _signed_by(m: Manifest) -> str:
    """Who signed the manifest, and whether the signature holds (trusting the signer named)."""
    from vllm_kvcdn.artifact.provenance import TrustPolicy

    if not m.signature:
        return "unsigned (served only where allow_unsigned is on)"
    why = TrustPolicy(frozenset({m.publisher}), allow_unsigned=False).verdict(m)
    return f"signed by {m.publisher}: {'signature valid' if why is None else why.replace('_', ' ')}"


def cmd_verify(args) -> None:
    report = side_api.call(lambda: side_api.client(args).verify(args.doc))
    for c in report.get("chunks", []):
        print(f"chunk {c['key'][:16]} {c['num_tokens']:>5} tok  {c['status']}")
    verdict = "identical to a fresh prefill" if report.get("identical") else f"NOT identical {report.get('error', '')}"
    print(f"document {report['document'][:16]}: {verdict}")
    if not report.get("identical"):
        raise SystemExit(1)


def cmd_rm(args) -> None:
    if args.server:
        d = side_api.call(lambda: side_api.client(args).delete(args.doc))
        print(f"removed document {d['doc_id'][:16]} ({d['chunks_deleted']} chunks deleted, "
              f"{d['chunks_kept']} still used by other documents)")
        return
    store = open_store(args.store)
    d = catalog.delete_document(store, _find_entry(store, args.doc))
    print(f"removed document {d.doc_id[:16]} ({d.chunks_deleted} chunks deleted, "
          f"{d.chunks_kept} still used by other documents)")


def cmd_gc(args) -> None:
    store = open_store(args.store)
    garbage = catalog.find_garbage(store, args.grace)
    verb = "would delete" if args.dry_run else "deleting"
    print(f"{store.url}: {garbage.referenced} chunks in use, {garbage.young} unreferenced but younger than "
          f"{args.grace:g}s (kept); {verb} {len(garbage.unreferenced)} chunks ({garbage.bytes / 1e6:.1f} MB)")
    if args.dry_run:
        for key in garbage.unreferenced:
            print(key)
        return
    print(f"deleted {catalog.collect_garbage(store, garbage)} chunks")


def _hf(args):
    from vllm_kvcdn.hf import HFKVCDN

    return HFKVCDN(args.model, store_url=args.store, dtype=args.dtype, device=args.device,
                   allow_cross_profile=getattr(args, "allow_cross_profile", False),
                   signing_key=args.signing_key or os.environ.get(SIGNING_KEY_ENV, ""), trusted_publishers=args.trust,
                   allow_unsigned=args.allow_unsigned, tenant_keys=args.tenant_key or _env_tenant_keys())


def _env_tenant_keys() -> list[str]:
    return [os.environ[TENANT_KEY_ENV]] if os.environ.get(TENANT_KEY_ENV) else []


def cmd_grant(args) -> None:
    from vllm_kvcdn.artifact.provenance import PublisherKey
    from vllm_kvcdn.market.grants import issue
    from vllm_kvcdn.market.ledger import PUBLIC_TENANT, tenant_of

    if args.salt is not None and args.tenant is not None:
        raise SystemExit("kvcdn: give --salt or --tenant, not both")
    key_path = args.key or os.environ.get(SIGNING_KEY_ENV)
    if not key_path:
        raise SystemExit(f"kvcdn: give --key (the publisher's signing key) or set {SIGNING_KEY_ENV}")
    tenant = args.tenant or (tenant_of(args.salt) if args.salt is not None else PUBLIC_TENANT)
    try:
        token = issue(PublisherKey.load(key_path), args.doc, tenant, args.ttl, args.reads)
    except ValueError as e:
        raise SystemExit(f"kvcdn: {e}") from None
    print(token)


def cmd_keygen(args) -> None:
    from vllm_kvcdn.artifact.provenance import PublisherKey
    from vllm_kvcdn.artifact.sealing import FileTenantKey

    path = Path(args.path).expanduser()
    public = Path(f"{path}.pub")
    if path.exists() or public.exists():
        raise SystemExit(f"kvcdn: {path} or {public} exists; keygen never overwrites a key")
    if args.tenant:
        key = FileTenantKey.generate()
        key.save(path)
        print(f"tenant key: {path} (id {key.key_id}; keep it secret: only the tenant's servers hold it, in "
              f"kv_connector_extra_config.tenant_keys or $KVCDN_TENANT_KEY)")
        return
    key = PublisherKey.generate()
    key.save(path)
    public.write_text(key.public_hex + "\n")
    print(f"signing key: {path} (keep it secret: set kv_connector_extra_config.signing_key or $KVCDN_SIGNING_KEY)")
    print(f"public key:  {public}  {key.public_hex}")
    print("servers that should serve this publisher's documents list it in trusted_publishers")


def cmd_hf_publish(args) -> None:
    kv = _hf(args)
    for path in args.files:
        text = _read_document(path)
        started = time.perf_counter()
        m = kv.publish(text=text, cache_salt=args.salt, title=args.title or Path(path).name, private=args.private)
        print(f"{m.doc_id}  {m.num_tokens} tokens  {len(m.chunks)} chunks  {m.total_bytes / 1e6:.2f} MB  "
              f"{time.perf_counter() - started:.2f}s on {kv.device.type}")


def cmd_hf_generate(args) -> None:
    from vllm_kvcdn.hf import FingerprintMismatch

    kv = _hf(args)
    text = args.prompt if args.prompt is not None else _read_document(args.prompt_file)
    started = time.perf_counter()
    try:
        out = kv.generate(kv.encode(text), doc_id=args.doc, max_new_tokens=args.max_new_tokens,
                          do_sample=args.sample)
    except (FingerprintMismatch, ValueError, KeyError) as e:
        raise SystemExit(f"kvcdn: {e}") from None
    print(out.text)
    print(f"[kvcdn] {out.cached_tokens} prompt tokens loaded from {str(out.doc_id)[:16]}, "
          f"{len(out.token_ids)} generated in {time.perf_counter() - started:.2f}s on {kv.device.type}",
          file=sys.stderr)


def cmd_demo(args) -> None:
    from vllm_kvcdn.cli.demo import run_demo

    run_demo(model=args.model, store_url=args.store, max_tokens=args.max_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcdn", description="vllm-kvcdn: publish a document's KV cache once, load it token-exact everywhere."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="publish a sample document and answer a question over it (tiny model, local store)")
    p.add_argument("--model", default=None,
                   help="model path (default: generate the tiny model under ~/.cache/kvcdn/models)")
    _store_arg(p)
    p.add_argument("--max-tokens", type=int, default=16)
    p.set_defaults(func=cmd_demo)

    def hf_args(p):
        p.add_argument("model", help="a transformers model directory (or hub id, if downloaded)")
        _store_arg(p)
        p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
        p.add_argument("--device", default=None, help="mps, cuda or cpu (default: the first available, in that order)")
        p.add_argument("--signing-key", default=None,
                       help="Ed25519 key file to sign published manifests with (default: $KVCDN_SIGNING_KEY)")
        p.add_argument("--trust", action="append", default=[], metavar="PUBLIC_KEY",
                       help="a publisher whose documents may be loaded (64 hex digits or a .pub file; repeatable)")
        p.add_argument("--tenant-key", action="append", default=[], metavar="FILE",
                       help="a tenant key file that opens (the first: seals) private documents (default: "
                            "$KVCDN_TENANT_KEY; repeatable)")
        p.add_argument("--allow-unsigned", action="store_true", default=None,
                       help="load unsigned documents (default: yes for a local store, no for s3://)")

    p = sub.add_parser("hf-publish", help="publish documents with plain transformers (no server)")
    hf_args(p)
    p.add_argument("files", nargs="+", help="text files, or - for standard input")
    p.add_argument("--salt", default=None, help="cache_salt for the artifact")
    p.add_argument("--private", action="store_true", help="seal the chunks with the first --tenant-key")
    p.add_argument("--title", default=None)
    p.set_defaults(func=cmd_hf_publish)

    p = sub.add_parser("hf-generate", help="generate with transformers from a published document's KV")
    hf_args(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", default=None, help="the full prompt text (document + question)")
    group.add_argument("--prompt-file", default=None, help="a file holding the full prompt, or -")
    p.add_argument("--doc", default=None, help="document id (default: the longest published prefix of the prompt)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--allow-cross-profile", action="store_true",
                   help="accept artifacts of the same model made by another engine/device (exactness not promised)")
    p.set_defaults(func=cmd_hf_generate)

    p = sub.add_parser("keygen", help="make a publisher's Ed25519 signing key (PATH) and its public key (PATH.pub)",
                       description="Make a publisher's signing key. A server that publishes with it (signing_key) "
                                   "signs every manifest; servers that list the public key in trusted_publishers "
                                   "serve those documents, and no one else's.")
    p.add_argument("path", help="where to write the private key (PKCS#8 PEM, mode 0600); the public key goes to "
                                "PATH.pub")
    p.add_argument("--tenant", action="store_true",
                   help="make a tenant key instead (256 bits, hex, mode 0600): it seals private documents")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("grant", help="sign a read grant: a tenant may load these documents until it expires",
                       description="Print a read grant token, signed with the documents' publisher key. A request "
                                   "carries it as kv_transfer_params {\"kvcdn\": {\"grant\": TOKEN}}; a document "
                                   "published with --require-grant (every document, on a server with "
                                   "require_grants) loads only under a valid one, metered against it.")
    p.add_argument("--doc", action="append", required=True, metavar="DOC_ID", help="a document id (repeatable)")
    p.add_argument("--key", default=None, help=f"the publisher's signing key (default: ${SIGNING_KEY_ENV})")
    p.add_argument("--salt", default=None, help="the tenant's cache_salt (its hash goes into the grant)")
    p.add_argument("--tenant", default=None, help="the tenant as the ledger names it (default: public)")
    p.add_argument("--ttl", type=float, default=3600.0, metavar="SECONDS", help="valid for this long (default 3600)")
    p.add_argument("--reads", type=int, default=None, help="how many reads it buys (default: any until it expires)")
    p.set_defaults(func=cmd_grant)

    p = sub.add_parser("make-tiny-model", help="write a Qwen3-architecture model with seeded random weights")
    p.add_argument("dir", help="output directory")
    p.add_argument("--shape", default="tiny", choices=["tiny", "qwen3-0.6b", "qwen3-4b"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser(
        "serve",
        help="vLLM's OpenAI server with KVCDNConnector and the /kvcdn/v1 side API",
        description="Start vLLM's OpenAI-compatible server with KVCDNConnector and the publishing side API "
                    "on the same port. Every argument not listed here goes to vLLM unchanged "
                    "(see `python -m vllm.entrypoints.openai.api_server --help`).",
    )
    p.add_argument("model", help="model path or name, as for vLLM's --model")
    p.add_argument("--kvcdn-store", default=None, help=f"store URL (default: $KVCDN_STORE or {default_store_url()})")
    p.add_argument("--kvcdn-chunk-size", type=int, default=None,
                   help=f"tokens per chunk (default {DEFAULT_CHUNK_SIZE})")
    p.add_argument("--kvcdn-preset", default=None, help="a --kv-transfer-config JSON file (see connectors/)")
    p.add_argument("--publisher-key", default=None,
                   help="key that publish/delete calls must send (default: $KVCDN_PUBLISHER_KEY, else generated)")
    p.set_defaults(func=cmd_serve, passthrough=True)

    p = sub.add_parser("publish", help="publish documents to a kvcdn server (prefill runs on the server)")
    p.add_argument("files", nargs="+", help="text files, or - for standard input")
    _server_arg(p, default="http://localhost:8000")
    p.add_argument("--chat", action="store_true",
                   help="publish as a chat prefix: a JSON list of messages, or the text as one message")
    p.add_argument("--role", default="user", help="role of the message with --chat and plain text (default user)")
    p.add_argument("--title", default=None, help="title (default: the file name)")
    p.add_argument("--salt", default=None, help="cache_salt: only requests with this salt will hit")
    p.add_argument("--private", action="store_true",
                   help="seal the chunks with the server's tenant key (AES-256-GCM): only servers holding it can "
                        "read or serve the document; use with --salt, which keeps other tenants' requests off it")
    p.add_argument("--require-grant", action="store_true",
                   help="reads load only under a read grant signed by the server's key (`kvcdn grant`)")
    p.add_argument("--adapter", default=None,
                   help="a LoRA adapter the server serves (--lora-modules NAME=PATH): the document is computed "
                        "with it, and only requests for that adapter hit it")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("ls", help="list published documents (on a server, or in a store)")
    _store_arg(p)
    _server_arg(p)
    p.add_argument("--json", action="store_true", help="print the manifests as JSON")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("inspect", help="show a document's manifest (and verify its chunks)")
    p.add_argument("doc", help="document id (a unique prefix is enough) or a manifest file")
    _store_arg(p)
    _server_arg(p)
    p.add_argument("--verify", action="store_true", help="read every chunk and check its checksum")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="recompute a document on the server and compare with the store, bit for bit")
    p.add_argument("doc", help="document id (a unique prefix is enough)")
    _server_arg(p, default="http://localhost:8000")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("rm", help="delete a document (chunks shared with other documents are kept)")
    p.add_argument("doc", help="document id (a unique prefix is enough)")
    _store_arg(p)
    _server_arg(p)
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("gc", help="delete chunks no published document uses (old enough not to be a publish under way)")
    _store_arg(p)
    p.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS",
                   help="keep unreferenced chunks younger than this: a publish writes its chunks before its "
                        "manifest (default 3600)")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    p.set_defaults(func=cmd_gc)

    from vllm_kvcdn.cli.market import add_parsers

    add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] == "serve" and not any(a in ("-h", "--help") for a in argv[1:2]):
        args, vllm_args = parser.parse_known_args(argv)
        return args.func(args, vllm_args)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()

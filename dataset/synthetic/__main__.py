"""`python -m dataset.synthetic --out DIR --shards N --per-shard M [--bad]` writes img2dataset-style
`DIR/{00000..}.tar` (+ `.parquet` and `_stats.json`) and prints what it injected.

`python -m dataset.synthetic --metadata-only --out DIR --shards N --per-shard M [--bad] --url-base URL`
writes DataComp-like metadata `DIR/metadata/{00000..}.parquet` (uid, url, text, original_width,
original_height, sha256) and the images it points at, `DIR/images/{uid}.jpg`;
`python -m dataset.synthetic serve DIR --port P` serves them on loopback for img2dataset.
"""
from __future__ import annotations

import argparse
import sys

from dataset.synthetic.bad_inputs import BAD_KINDS
from dataset.synthetic.input_shards import write_shards
from dataset.synthetic.web import URL_FAILURES, ImageServer, write_metadata


def serve_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m dataset.synthetic serve",
                                description="Serve DIR/images/ on loopback with the injected-failure routes: "
                                + "; ".join(f"/{k}/: {v}" for k, v in URL_FAILURES.items()))
    p.add_argument("dir", help="folder written by --metadata-only")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--hang-seconds", type=float, default=60.0,
                   help="how long /hang/ requests sleep; longer than img2dataset's default 10 s timeout")
    a = p.parse_args(argv)
    server = ImageServer(a.dir, a.port, a.hang_seconds)
    print(f"serving {a.dir}/images at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve_main(argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--shards", type=int, default=2, help="shards (with --metadata-only: metadata files)")
    p.add_argument("--per-shard", type=int, default=32, help="good samples per shard (or per metadata file)")
    p.add_argument("--bad", action="store_true",
                   help=f"also inject one of each bad sample per shard: {', '.join(BAD_KINDS)}; "
                        f"with --metadata-only one of each failing url per file: {', '.join(URL_FAILURES)}")
    p.add_argument("--image-size", type=int, default=128, help="side of the square images in px (shards only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metadata-only", action="store_true",
                   help="write DataComp-like metadata parquet + the images it points at instead of shards")
    p.add_argument("--url-base", default="http://127.0.0.1:8000",
                   help="where `serve` will listen (--metadata-only); matches serve's default port")
    a = p.parse_args(argv)
    if a.metadata_only:
        info = write_metadata(a.out, a.shards, a.per_shard, url_base=a.url_base, bad=a.bad, seed=a.seed)
        print(f"{a.out}/metadata: {len(info['files'])} files, {info['good']} good urls, "
              f"{len(info['injected'])} failing ({', '.join(sorted(set(info['injected'].values()))) or 'none'})")
        return
    for info in write_shards(a.out, a.shards, a.per_shard, bad=a.bad, image_size=a.image_size, seed=a.seed):
        print(f"{a.out}/{info['shard']}.tar: {len(info['keys'])} keys, injected {len(info['injected'])} bad")


if __name__ == "__main__":
    main()

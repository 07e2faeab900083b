"""The `fastcl` command: `fastcl info`, `fastcl demo`."""

from __future__ import annotations

import argparse
import json
import logging

from .facts import DOMAINS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastcl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, build, and which backends run here")
    demo = sub.add_parser("demo", help="serve a stream of new facts with SmolLM2-135M and learn from it")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--companies", type=int, default=6, help="fictional entities to learn, 4 facts each")
    demo.add_argument("--domain", choices=sorted(DOMAINS), default="companies",
                      help="what the facts are about: companies (the recipe was developed on them) or people")
    demo.add_argument("--out", default="fastcl-demo.png", help="where to write the plot")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "info":
        from .info import info

        print(json.dumps(info(), indent=2))
        return 0
    from .demo import run_demo

    return run_demo(seed=args.seed, companies=args.companies, out=args.out, domain=args.domain)


if __name__ == "__main__":
    raise SystemExit(main())

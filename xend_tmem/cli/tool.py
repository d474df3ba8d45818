"""The ``xend-tmem`` command: ``inspect`` streams, manage the ``hypervisor``, run the ``demo``.

Exit codes: 0 success, 1 bad input or refused operation (one ``Error:`` line on
stderr), 2 usage, 130 interrupted. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..demo import add_arguments as add_demo_arguments
from ..errors import XendTmemError


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import run
    try:
        out = run(args.file, chunks_only=args.chunks, as_json=args.json, with_pages=args.pages,
                  width=args.width, guest=args.guest)
    except OSError as exc:
        print(f"Error: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except XendTmemError as exc:
        print(f"Error: {args.file}: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _cmd_hypervisor(args: argparse.Namespace) -> int:
    from .hypervisor import run
    return run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import main as demo_main
    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xend-tmem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="describe a xend image, libxc stream or tmem chunk file")
    p.add_argument("file")
    p.add_argument("--chunks", action="store_true", help="FILE holds bare tmem chunks (-5, -6)")
    p.add_argument("--json", action="store_true", help="print JSON (vectors' expected.json keys)")
    p.add_argument("--pages", action="store_true", help="list pages and invalidations")
    p.add_argument("--width", type=int, choices=(4, 8), default=None,
                   help="the saving tools' unsigned long size (default: inferred "
                        "from the stream)")
    p.add_argument("--guest", choices=("pv", "hvm"), default=None,
                   help="guest type of a raw stream (an image's config says it)")
    p.set_defaults(func=_cmd_inspect)
    h = sub.add_parser("hypervisor", help="start, stop or ask about the hypervisor process")
    from .hypervisor import add_arguments as add_hypervisor_arguments
    add_hypervisor_arguments(h)
    h.set_defaults(func=_cmd_hypervisor)
    d = sub.add_parser("demo", help="live-migrate a tmem-heavy domain between two local daemons")
    add_demo_arguments(d)
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

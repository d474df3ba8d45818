"""The ``xend-tmem`` command: ``inspect`` streams, manage the ``hypervisor``, run the ``demo``.

Exit codes: 0 success, 1 bad input or refused operation (one ``Error:`` line on
stderr), 2 usage, 130 interrupted. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import TYPE_CHECKING, Callable, List, Optional

from ..demo import add_arguments as add_demo_arguments
from ..errors import XendTmemError

if TYPE_CHECKING:
    from ..plugins import CheckpointHooks


def _inspect_hooks(names: Optional[str]) -> CheckpointHooks:
    """The plugin manager whose markers ``inspect`` reads: ``--plugins`` or every
    installed checkpoint plugin (an image may hold any of their chunks)."""
    from ..plugins import get_plugin_manager, installed_plugins
    if names is None:
        enabled = sorted(installed_plugins())
    else:
        enabled = [n.strip() for n in names.split(",") if n.strip()]
    return get_plugin_manager(enabled, {})


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ..errors import PluginError
    from .inspect import run
    try:
        hooks = _inspect_hooks(args.plugins)
    except PluginError as exc:
        print(f"Error: {exc} (choose the plugins with --plugins)", file=sys.stderr)
        return 1
    try:
        out, error = run(args.file, as_json=args.json, with_pages=args.pages, width=args.width,
                         guest=args.guest, kind=args.kind, hooks=hooks, salvage_dir=args.salvage)
    except OSError as exc:
        if exc.filename in (None, args.file):
            print(f"Error: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        else:
            print(f"Error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except XendTmemError as exc:
        print(f"Error: {args.file}: {exc}", file=sys.stderr)
        return 1
    if out:
        print(out)
    if error is not None and args.salvage is None:
        sys.stdout.flush()
        print(f"Error: {args.file}: {error}", file=sys.stderr)
        return 1
    return 0


def _cmd_hypervisor(args: argparse.Namespace) -> int:
    from .hypervisor import run
    return run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import main as demo_main
    return demo_main(args)


_RST_ROLE = re.compile(r":[a-z]+:`~?\.?([^`]*)`")
_RST_LITERAL = re.compile(r"``([^`]*)``|`([^`]*)`")


def plain_text(doc: Optional[str]) -> str:
    """A docstring as ``--help`` text: RST roles and literals without their markup
    (argparse prints descriptions verbatim)."""
    text = _RST_ROLE.sub(r"\1", doc or "")
    return _RST_LITERAL.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2),
                            text).strip()


class _Paragraphs(argparse.HelpFormatter):
    """Descriptions refilled paragraph by paragraph (argparse's own makes one of all)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(super(_Paragraphs, self)._fill_text(para, width, indent)
                            for para in text.split("\n\n"))


def _described(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
               help_text: str, module_doc: Optional[str]) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows its module's docstring, as plain text."""
    return sub.add_parser(name, help=help_text, description=plain_text(module_doc),
                          formatter_class=_Paragraphs)


def build_parser() -> argparse.ArgumentParser:
    from . import hypervisor as hypervisor_cli
    from . import inspect as inspect_cli
    from .. import demo
    parser = argparse.ArgumentParser(prog="xend-tmem",
                                     description=plain_text(__doc__.splitlines()[0]))
    sub = parser.add_subparsers(dest="command", required=True)
    p = _described(sub, "inspect", "describe a xend image, libxc stream or tmem chunk file",
                   inspect_cli.__doc__)
    p.add_argument("file")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--chunks", dest="kind", action="store_const", const="chunks",
                      help="read FILE as bare tmem chunks (-5, -6), skipping detection")
    kind.add_argument("--stream", dest="kind", action="store_const", const="stream",
                      help="read FILE as a raw libxc stream, skipping detection")
    kind.add_argument("--image", dest="kind", action="store_const", const="image",
                      help="read FILE as a xend image, skipping detection")
    p.add_argument("--json", action="store_true", help="print JSON (vectors' expected.json keys)")
    p.add_argument("--pages", action="store_true",
                   help="list every tmem page and RAM page with its crc32, and invalidations")
    p.add_argument("--salvage", metavar="DIR", default=None,
                   help="write the tmem that arrived (all of it, or up to where a truncated "
                        "file stops) to DIR/tmem.chunks, a tmem chunk file that inspect and "
                        "the chunk reader accept (a cut pool is closed with the terminator "
                        "OID), and what was salvaged to DIR/salvage.json; never overwrites; "
                        "exits 0 once written")
    p.add_argument("--plugins", metavar="NAMES", default=None,
                   help="comma-separated checkpoint plugins whose chunks to read (default: "
                        "every installed one)")
    p.add_argument("--width", type=int, choices=(4, 8), default=None,
                   help="the saving tools' unsigned long size (default: inferred "
                        "from the stream)")
    p.add_argument("--guest", choices=("pv", "hvm"), default=None,
                   help="guest type of a raw stream (an image's config says it)")
    p.set_defaults(func=_cmd_inspect)
    h = _described(sub, "hypervisor", "start, stop or ask about the hypervisor process",
                   hypervisor_cli.__doc__)
    from .hypervisor import add_arguments as add_hypervisor_arguments
    add_hypervisor_arguments(h)
    h.set_defaults(func=_cmd_hypervisor)
    d = _described(sub, "demo", "live-migrate a tmem-heavy domain between two local daemons",
                   demo.__doc__)
    add_demo_arguments(d)
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (``| head``): stop quietly, as cat does on SIGPIPE;
        # stdout goes to /dev/null so the interpreter's final flush cannot complain
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


if __name__ == "__main__":
    sys.exit(main())

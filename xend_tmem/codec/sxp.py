"""xend's S-expressions (SXP): the domain config inside every save image.

An SXP value is a ``str`` atom or a ``list`` of SXP values. The text form is
what xend read and wrote: ``(domain (domid 3) (name web1) (image (linux ...)))``;
atoms are bare words or single/double-quoted strings with backslash escapes,
and ``#`` starts a comment that runs to the end of the line (xend-config.sxp).

The parser is iterative with a nesting cap, because a save image's config is
untrusted input and must not be able to exhaust the Python stack.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import ConfigError

MAX_DEPTH = 256

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<open>\()
  | (?P<close>\))
  | (?P<dq>"[^"\\]*(?:\\.[^"\\]*)*")
  | (?P<sq>'[^'\\]*(?:\\.[^'\\]*)*')
  | (?P<atom>[^\s()"'\#][^\s()"']*)
""", re.VERBOSE | re.DOTALL)

_TOKEN_NO_COMMENTS = re.compile(r"""
    (?P<ws>\s+)
  | (?P<open>\()
  | (?P<close>\))
  | (?P<dq>"[^"\\]*(?:\\.[^"\\]*)*")
  | (?P<sq>'[^'\\]*(?:\\.[^'\\]*)*')
  | (?P<atom>[^\s()"']+)
""", re.VERBOSE | re.DOTALL)

_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|[0-7]{1,3}|.)", re.DOTALL)
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b",
                   "f": "\f", "v": "\v"}
# An atom printed bare must read back as the same single atom.
_BARE = re.compile(r"[^\s()\"'\\#][^\s()\"'\\]*")
_QUOTE_MAP = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_NEEDS_ESCAPE = re.compile(r'[\\"\x00-\x1f\x7f]')


class SxpSyntaxError(ConfigError):
    """Malformed SXP text; carries the character position for callers that
    translate it into a byte offset (a save image's config)."""

    def __init__(self, problem: str, text: str, pos: int, source: Optional[str] = None) -> None:
        self.problem = problem
        self.pos = pos
        self.line = text.count("\n", 0, pos) + 1
        self.col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        where = f"{source}: " if source else ""
        super().__init__(f"{where}SXP syntax error at line {self.line} column {self.col}: "
                         f"{problem}")


def _unescape_one(m: "re.Match[str]") -> str:
    e = m.group(1)
    if len(e) == 3 and e[0] == "x":
        return chr(int(e[1:], 16))
    if e[0] in "01234567":
        return chr(int(e, 8))
    return _SIMPLE_ESCAPES.get(e, e)


def _unquote(tok: str) -> str:
    body = tok[1:-1]
    return _ESCAPE.sub(_unescape_one, body) if "\\" in body else body


def _parse(text: str, source: Optional[str], comments: bool) -> Tuple[List[Any], List[int]]:
    token = _TOKEN if comments else _TOKEN_NO_COMMENTS
    top: List[Any] = []
    starts: List[int] = []           # position of each top-level expression
    stack: List[List[Any]] = [top]
    opened: List[int] = []
    pos, end = 0, len(text)
    while pos < end:
        m = token.match(text, pos)
        if m is None:
            # only a quote without its closing partner stops every alternative
            raise SxpSyntaxError(f"unterminated {text[pos]}-quoted string", text, pos, source)
        kind = m.lastgroup
        if kind not in ("ws", "comment") and len(stack) == 1 and kind != "close":
            starts.append(pos)
        if kind == "open":
            if len(stack) > MAX_DEPTH:
                raise SxpSyntaxError(f"lists nested deeper than {MAX_DEPTH}", text, pos, source)
            new: List[Any] = []
            stack[-1].append(new)
            stack.append(new)
            opened.append(pos)
        elif kind == "close":
            if len(stack) == 1:
                raise SxpSyntaxError("')' without a matching '('", text, pos, source)
            stack.pop()
            opened.pop()
        elif kind == "atom":
            stack[-1].append(m.group())
        elif kind in ("dq", "sq"):
            stack[-1].append(_unquote(m.group()))
        pos = m.end()
    if opened:
        raise SxpSyntaxError("'(' is never closed", text, opened[-1], source)
    return top, starts


def parse_all(text: str, *, source: Optional[str] = None, comments: bool = True) -> List[Any]:
    """Every top-level expression in ``text`` (xend-config.sxp holds many)."""
    return _parse(text, source, comments)[0]


def parse(text: str, *, source: Optional[str] = None, comments: bool = True) -> Any:
    """Exactly one SXP expression (a domain config); anything after it is an error."""
    forms, starts = _parse(text, source, comments)
    if not forms:
        raise SxpSyntaxError("no SXP expression", text, len(text), source)
    if len(forms) > 1:
        raise SxpSyntaxError("text continues after the expression", text, starts[1], source)
    return forms[0]


def _atom_text(x: Any) -> str:
    if isinstance(x, bool):
        return "1" if x else "0"
    if isinstance(x, (int, float)):
        return repr(x)
    if isinstance(x, str):
        return x
    raise ConfigError(f"cannot write a {type(x).__name__} value ({x!r}) as an SXP atom")


def quote(atom: Any) -> str:
    """``atom`` as xend would print it: bare when that reads back unchanged."""
    s = _atom_text(atom)
    if _BARE.fullmatch(s) and s.isprintable():
        return s
    if _NEEDS_ESCAPE.search(s):
        s = _NEEDS_ESCAPE.sub(lambda m: _QUOTE_MAP.get(m.group(), f"\\x{ord(m.group()):02x}"), s)
    return f'"{s}"'


def to_string(sxp: Any, *, pretty: bool = False) -> str:
    """Text that :func:`parse` reads back as ``sxp``; ``pretty`` indents lists
    holding lists the way ``xm list -l`` showed them."""
    out: List[str] = []
    _emit(sxp, out, 0 if pretty else None, 0)
    return "".join(out)


def _emit(x: Any, out: List[str], indent: Optional[int], depth: int) -> None:
    if not isinstance(x, (list, tuple)):
        out.append(quote(x))
        return
    if depth > MAX_DEPTH:
        raise ConfigError(f"SXP nested deeper than {MAX_DEPTH}")
    out.append("(")
    nested = (indent is not None and bool(x) and isinstance(x[0], str)
              and any(isinstance(y, (list, tuple)) for y in x))
    margin = 4 * (indent or 0)          # used only when nested, which needs an indent
    for i, y in enumerate(x):
        if nested and i and isinstance(y, (list, tuple)):
            out.append("\n" + " " * (margin + 4))
        elif i:
            out.append(" ")
        _emit(y, out, None if indent is None else indent + 1, depth + 1)
    if nested:
        out.append("\n" + " " * margin)
    out.append(")")


# -- lookup helpers (xend's sxp.child / child_value / children) ------------

def children(sxp: Any, name: Optional[str] = None) -> List[Any]:
    """Sub-lists of ``sxp`` (after its head) whose head is ``name`` (any if None)."""
    if not isinstance(sxp, (list, tuple)):
        return []
    return [c for c in sxp[1:] if isinstance(c, (list, tuple)) and c
            and (name is None or c[0] == name)]


def child(sxp: Any, name: str, default: Any = None) -> Any:
    """The first sub-list headed ``name``."""
    for c in children(sxp, name):
        return c
    return default


def child_value(sxp: Any, name: str, default: Any = None) -> Any:
    """The first value of the first ``(name value ...)`` form: ``(memory 512)`` -> ``'512'``."""
    c = child(sxp, name)
    if c is None or len(c) < 2:
        return default
    return c[1]


# -- plain-data bridge -------------------------------------------------------
#
# from_mapping / to_mapping convert between SXP and nested dicts:
#   dict          <-> (key form form ...)       nested forms
#   scalar        <-> (key value)               numbers and bools become strings
#   list of v     <-> (key v1) (key v2) ...     a repeated form (devices)
#   tuple         <-> (key item item ...)       anything else, items kept verbatim
# SXP -> mapping -> SXP keeps every value; repeated keys are grouped together.
# Numbers come back as strings; a one-item list or tuple comes back as its item.

def from_mapping(name: str, mapping: Mapping[str, Any]) -> List[Any]:
    """``(name (key value) ...)`` from a domain description dict."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"SXP head must be a non-empty string, not {name!r}")
    return [name, *_forms(mapping, name)]


def _forms(mapping: Mapping[str, Any], path: str) -> List[Any]:
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(mapping).__name__}")
    out: List[Any] = []
    for k, v in mapping.items():
        if not isinstance(k, str) or not k:
            raise ConfigError(f"{path}: key {k!r} is not a non-empty string")
        if isinstance(v, list):
            for item in v:
                if isinstance(item, list):
                    raise ConfigError(f"{path}.{k}: a repeated value cannot itself be a list")
                out.append(_form(k, item, path))
        else:
            out.append(_form(k, v, path))
    return out


def _form(key: str, v: Any, path: str) -> List[Any]:
    where = f"{path}.{key}"
    if isinstance(v, Mapping):
        return [key, *_forms(v, where)]
    if isinstance(v, tuple):
        return [key, *(_verbatim(x, where) for x in v)]
    if v is None:
        raise ConfigError(f"{where}: None has no SXP form")
    try:
        return [key, _atom_text(v)]
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _verbatim(x: Any, where: str) -> Any:
    if isinstance(x, (list, tuple)):
        return [_verbatim(y, where) for y in x]
    try:
        return _atom_text(x)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def to_mapping(sxp: Any) -> Dict[str, Any]:
    """The dict of ``(head (key value) ...)`` (the head, ``sxp[0]``, is dropped);
    values are strings, as in the text."""
    if not isinstance(sxp, list) or not sxp or not isinstance(sxp[0], str):
        raise ConfigError(f"expected a (name (key value) ...) expression, got {_short(sxp)}")
    return _to_dict(sxp[1:], sxp[0])


def _is_form(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and isinstance(x[0], str)


def _to_dict(forms: List[Any], path: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    repeated = set()
    for f in forms:
        if not _is_form(f):
            raise ConfigError(f"{path}: {_short(f)} is not a (key value ...) form")
        k = f[0]
        v = _value(f[1:], f"{path}.{k}")
        if k not in out:
            out[k] = v
        elif k in repeated:
            out[k].append(v)
        else:
            out[k] = [out[k], v]
            repeated.add(k)
    return out


def _value(rest: List[Any], path: str) -> Any:
    if not rest:
        return {}
    if len(rest) == 1 and isinstance(rest[0], str):
        return rest[0]
    if all(_is_form(x) for x in rest):
        return _to_dict(rest, path)
    return tuple(_copy(x) for x in rest)


def _copy(x: Any) -> Any:
    return [_copy(y) for y in x] if isinstance(x, list) else x


def _short(x: Any, limit: int = 60) -> str:
    try:
        s = to_string(x)
    except ConfigError:
        s = repr(x)
    return s if len(s) <= limit else s[:limit - 3] + "..."


__all__ = ["parse", "parse_all", "to_string", "quote", "children", "child", "child_value",
           "from_mapping", "to_mapping", "SxpSyntaxError", "MAX_DEPTH"]

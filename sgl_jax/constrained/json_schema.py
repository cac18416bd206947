"""JSON schema -> regular expression (for :mod:`sgl_jax.constrained.regex`).

The generated regex describes a set of JSON texts that all validate against
the schema (soundness).  It is not always *every* valid text (completeness is
traded for a finite automaton); the deliberate restrictions are listed here.

Layout
    Compact by default (``{"a":1,"b":[1,2]}``).  ``whitespace_pattern`` is a regex
    inserted between structural tokens (after ``{ [ , :``, before ``, : ] }``);
    e.g. ``r"[ \\n]{0,2}"``, or ``"flexible"`` = ``r"[ \\t\\n\\r]*"`` (unbounded: a
    model may emit whitespace for a long time).  No whitespace is generated
    around the top-level value.

Objects
    Properties are emitted in schema order; every ``required`` property is
    present, optional ones may be omitted (commas are placed correctly).  Only
    the listed ``properties`` are ever emitted, whatever ``additionalProperties``
    says (absent/``true``/schema: extra keys are simply never generated, which is
    always valid).  An object schema *without* ``properties`` generates a map:
    arbitrary string keys whose values follow ``additionalProperties`` (a
    schema; absent/``true`` = any JSON value; ``false`` = only ``{}``).
    Duplicate keys in a map are not prevented.  ``required`` names must be listed
    in ``properties``.

Strings
    Raw characters except ``"``, ``\\`` and U+0000..U+001F, or the escapes
    ``\\" \\\\ \\/ \\b \\f \\n \\r \\t`` and ``\\uHHHH`` for non-surrogate code units
    (surrogate escapes are never generated, so ``minLength``/``maxLength``
    count exactly one code point per unit).  ``pattern`` uses full-match
    semantics (a subset of the ECMA "search" semantics, hence sound), with the
    regex subset documented in :mod:`.regex`; pattern characters that need
    escaping in JSON are emitted in escaped form.  ``pattern`` or ``format``
    cannot be combined with ``minLength``/``maxLength``.  ``format``: ``date``
    (never generates Feb 29), ``time`` (RFC 3339 ``full-time``, no leap second),
    ``date-time`` (``T``/``Z`` upper case), ``email`` (dot-atom local part,
    DNS-ish domain; label lengths are not limited), ``uuid``, ``ipv4`` (dotted
    decimal without leading zeros).  Other formats raise SchemaError.

Numbers
    Integers: exact regex for the range given by ``minimum``/``maximum``/
    ``exclusiveMinimum``/``exclusiveMaximum`` (bounds may be fractional; draft-4
    boolean ``exclusiveMinimum``/``exclusiveMaximum`` are honoured).  Canonical
    form only (no leading zeros, no ``-0``).
    Numbers: without bounds ``-?int(.frac)?([eE][+-]?digits)?``.  With any bound
    the exponent is dropped and the bound is enforced *exactly* on the decimal
    value of the text (integer part and fraction digits).  Approximation: a
    float-based validator may still reject a value that differs from an
    exclusive bound only beyond float precision (e.g. ``0.10000000000000000001``
    with ``exclusiveMinimum: 0.1``).  ``multipleOf`` is unsupported.

Arrays
    ``items`` (schema), ``minItems``, ``maxItems``; ``prefixItems`` (or draft-7
    list-form ``items``) generates exactly ``min(len(prefix), maxItems)`` items.
    ``uniqueItems: true`` and ``contains`` are unsupported.

Combinators and references
    ``anyOf`` -> alternation.  ``oneOf`` -> alternation as well: if the branches
    overlap, a generated value may match several branches (invalid for
    ``oneOf``) -- use disjoint branches.  ``allOf`` with a single subschema is
    inlined; more is unsupported.  ``enum``/``const`` of any JSON value (emitted
    compactly), filtered by ``type`` if given.  ``$ref`` to local JSON pointers
    (``#``, ``#/$defs/..``, ``#/definitions/..`` ...).  A recursive ``$ref`` is
    expanded at most ``max_recursion_depth`` (default 3) times inside itself;
    deeper, that branch is removed (optional properties dropped, arrays limited,
    ``anyOf`` branches pruned).  If the schema cannot terminate, SchemaError.
    The empty schema / ``true`` = any JSON value, nested at most
    ``max_recursion_depth`` levels.

Any other constraint keyword raises :class:`SchemaError` naming the keyword and
its JSON pointer.  Purely descriptive keywords (``title``, ``description``,
``examples``, ``default``, ``$schema``, ``$id``, ``$comment``, ``deprecated``,
``readOnly``, ``writeOnly``, ``$anchor``) and ``x-*`` extensions are ignored.
"""
from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Optional

from .regex import ConstraintError, RegexError, Alt, Chars, Repeat, Seq, escape, parse, to_pattern

__all__ = [
    "SchemaError",
    "json_schema_to_regex",
    "choices_to_regex",
    "int_range_regex",
    "number_range_regex",
    "INT", "FLOAT", "BOOL", "STRING",
    "JSON_STRING", "JSON_NUMBER", "JSON_INTEGER",
    "WHITESPACE_FLEXIBLE",
    "DEFAULT_MAX_RECURSION_DEPTH",
]

# SGLang's primitive "dtype" regexes (same languages; \w \s are ASCII here).
INT = r"[-+]?[0-9]+[ \n]*"
FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
BOOL = r"(True|False)"
STRING = r"\"[\w\d\s]*\""

_HEX = "[0-9a-fA-F]"
_HEX4_NO_SURR = "(?:[0-9a-cA-Ce-fE-F][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2})"
JSON_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u' + _HEX4_NO_SURR + ")"
JSON_STRING = '"' + JSON_CHAR + '*"'
JSON_INTEGER = r"-?(?:0|[1-9][0-9]*)"
JSON_NUMBER = JSON_INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_FRAC_ANY = r"(?:\.[0-9]+)?"
WHITESPACE_FLEXIBLE = r"[ \t\n\r]*"
DEFAULT_MAX_RECURSION_DEPTH = 3

_DESCRIPTIVE = {"title", "description", "examples", "default", "$schema", "$id", "id",
                "$comment", "deprecated", "readOnly", "writeOnly", "$anchor",
                "$defs", "definitions"}
_GENERIC = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}
_TYPE_KEYWORDS = {
    "string": {"minLength", "maxLength", "pattern", "format"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "array": {"items", "prefixItems", "minItems", "maxItems", "uniqueItems", "additionalItems"},
    "object": {"properties", "required", "additionalProperties"},
    "boolean": set(),
    "null": set(),
}
_SUPPORTED = _GENERIC | set().union(*_TYPE_KEYWORDS.values())
_ALL_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

_FORMATS = {
    "date": r"[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
            r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))",
    "time": r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?"
            r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])",
    "email": r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
             r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
             r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "ipv4": r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
            r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
}
_FORMATS["date-time"] = _FORMATS["date"] + "T" + _FORMATS["time"]


class SchemaError(ConstraintError):
    """Unsupported or invalid schema.  ``path`` is a JSON pointer (``#/...``)."""

    def __init__(self, message: str, path: str = "#", keyword: Optional[str] = None):
        self.path = path
        self.keyword = keyword
        where = f" (keyword {keyword!r} at {path})" if keyword else f" (at {path})"
        super().__init__(message + where)


def _ptr(path: str, *parts) -> str:
    for p in parts:
        path += "/" + str(p).replace("~", "~0").replace("/", "~1")
    return path


def _alt(parts) -> Optional[str]:
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    uniq = list(dict.fromkeys(parts))
    if len(uniq) == 1:
        return uniq[0]
    return "(?:" + "|".join(uniq) + ")"


def _grp(r: str) -> str:
    return "(?:" + r + ")"


def choices_to_regex(choices) -> str:
    """Regex matching exactly one of the given strings."""
    choices = list(choices)
    if not choices:
        raise ConstraintError("choices must be a non-empty list of strings")
    for c in choices:
        if not isinstance(c, str):
            raise ConstraintError(f"choices must be strings, got {type(c).__name__}")
    return "(?:" + "|".join(escape(c) for c in dict.fromkeys(choices)) + ")"


# ----------------------------------------------------------------------------
# integer and decimal ranges
# ----------------------------------------------------------------------------


def _same_len(lo: str, hi: str) -> str:
    """Regex for digit strings of len(lo) == len(hi) between lo and hi (inclusive)."""
    if lo == hi:
        return lo
    if len(lo) == 1:
        return f"[{lo}-{hi}]"
    k = len(lo) - 1
    if lo[1:] == "0" * k and hi[1:] == "9" * k:
        return f"[{lo[0]}-{hi[0]}][0-9]{{{k}}}" if k > 1 else f"[{lo[0]}-{hi[0]}][0-9]"
    if lo[0] == hi[0]:
        return lo[0] + _grp(_same_len(lo[1:], hi[1:]))
    parts = [lo[0] + _grp(_same_len(lo[1:], "9" * k))]
    a, b = int(lo[0]) + 1, int(hi[0]) - 1
    if a <= b:
        d = f"[{a}-{b}]" if a < b else str(a)
        parts.append(d + ("[0-9]" if k == 1 else f"[0-9]{{{k}}}"))
    parts.append(hi[0] + _grp(_same_len("0" * k, hi[1:])))
    return "(?:" + "|".join(parts) + ")"


def _nonneg_range(a: int, b: Optional[int]) -> Optional[str]:
    """Canonical decimal integers in [a, b] (a >= 0, b None = unbounded)."""
    if b is not None and a > b:
        return None
    parts = []
    top = b
    if b is None:
        L = len(str(a))
        top = 10 ** L - 1
        parts_tail = "[1-9][0-9]*" if a == 0 else f"[1-9][0-9]{{{L},}}"
    for L in range(len(str(a)), len(str(top)) + 1):
        lo = max(a, 10 ** (L - 1) if L > 1 else 0)
        hi = min(top, 10 ** L - 1)
        if lo <= hi:
            parts.append(_same_len(str(lo), str(hi)))
    if b is None:
        if a == 0:
            return "(?:0|[1-9][0-9]*)"
        parts.append(parts_tail)
    return _alt(parts)


def int_range_regex(lo: Optional[int], hi: Optional[int]) -> Optional[str]:
    """Exact regex for canonical JSON integers in [lo, hi] (None = unbounded).
    Returns None for an empty range."""
    if lo is not None and hi is not None and lo > hi:
        return None
    parts = []
    # non-negative part
    a = 0 if lo is None else max(lo, 0)
    if hi is None or hi >= a:
        parts.append(_nonneg_range(a, hi))
    # negative part: magnitudes in [max(1, -hi), -lo]
    if lo is None or lo < 0:
        mlo = 1 if hi is None or hi >= 0 else -hi
        mhi = None if lo is None else -lo
        r = _nonneg_range(mlo, mhi)
        if r is not None:
            parts.append("-" + r)
    return _alt(parts)


def _digits_frac(x: Decimal) -> tuple[int, str]:
    """x >= 0 -> (integer part, fraction digits without trailing zeros)."""
    ip = int(x)  # truncation == floor for x >= 0
    frac = x - ip
    if frac == 0:
        return ip, ""
    s = format(frac, "f")  # '0.xxx'
    return ip, s.split(".", 1)[1].rstrip("0")


_frac_memo: dict = {}


def _frac_nonempty(lo: str, ls: bool, hi: Optional[str], hs: bool) -> Optional[str]:
    """Non-empty digit strings F with lo (<|<=) 0.F (<|<=) hi.  lo/hi are digit
    strings without trailing zeros ("" = 0); hi None = no upper bound."""
    key = (lo, ls, hi, hs)
    if key in _frac_memo:
        return _frac_memo[key]
    if hi is not None and hi == "":
        # 0.F <= 0 (or < 0): only all-zero strings, and only if lo allows 0
        r = "0+" if (not hs and lo == "" and not ls) else None
    elif hi is None and lo == "":
        r = "[0-9]*[1-9][0-9]*" if ls else "[0-9]+"
    else:
        l0 = int(lo[0]) if lo else 0
        h0 = int(hi[0]) if hi is not None else 9
        groups: list[tuple[int, int, Optional[str]]] = []
        for d in range(l0, h0 + 1):
            nlo, nls = ("", False) if d > l0 else (lo[1:], ls)
            nhi, nhs = (None, False) if (hi is None or d < h0) else (hi[1:], hs)
            rest = _frac_any_len(nlo, nls, nhi, nhs)
            if rest is None:
                continue
            if groups and groups[-1][2] == rest and groups[-1][1] == d - 1:
                groups[-1] = (groups[-1][0], d, rest)
            else:
                groups.append((d, d, rest))
        parts = []
        for a, b, rest in groups:
            head = str(a) if a == b else f"[{a}-{b}]"
            parts.append(head + (_grp(rest) if rest and "|" in rest else rest))
        r = _alt(parts)
    _frac_memo[key] = r
    return r


def _frac_any_len(lo: str, ls: bool, hi: Optional[str], hs: bool) -> Optional[str]:
    """Like _frac_nonempty but the empty string (value 0) is allowed if in range."""
    empty_ok = (lo == "" and not ls) and (hi is None or hi != "" or not hs)
    ne = _frac_nonempty(lo, ls, hi, hs)
    if ne is None:
        return "" if empty_ok else None
    if empty_ok:
        return _grp(ne) + "?" if ne != "[0-9]+" else "[0-9]*"
    return ne


def _frac_suffix(lo: str, ls: bool, hi: Optional[str], hs: bool) -> Optional[str]:
    """Regex for the optional '.F' suffix with lo (<|<=) 0.F (<|<=) hi."""
    empty_ok = (lo == "" and not ls) and (hi is None or hi != "" or not hs)
    ne = _frac_nonempty(lo, ls, hi, hs)
    if ne is None:
        return "" if empty_ok else None
    body = r"\." + (_grp(ne) if "|" in ne else ne)
    return _grp(body) + "?" if empty_ok else body


def _mag_regex(a: Decimal, a_strict: bool, b: Optional[Decimal], b_strict: bool) -> Optional[str]:
    """Magnitudes (no sign) x with a (<|<=) x (<|<=) b, a >= 0, as I(.F)?."""
    if b is not None and (a > b or (a == b and (a_strict or b_strict))):
        return None
    A, fa = _digits_frac(a)
    parts = []
    if b is None:
        s = _frac_suffix(fa, a_strict, None, False)
        if s is not None:
            parts.append(str(A) + s)
        r = _nonneg_range(A + 1, None)
        parts.append(_grp(r) + _FRAC_ANY)
        return _alt(parts)
    B, fb = _digits_frac(b)
    if A == B:
        s = _frac_suffix(fa, a_strict, fb, b_strict)
        return None if s is None else str(A) + s
    s = _frac_suffix(fa, a_strict, None, False)
    if s is not None:
        parts.append(str(A) + s)
    mid = _nonneg_range(A + 1, B - 1)
    if mid is not None:
        parts.append(_grp(mid) + _FRAC_ANY)
    s = _frac_suffix("", False, fb, b_strict)
    if s is not None:
        parts.append(str(B) + s)
    return _alt(parts)


def number_range_regex(lo: Optional[Decimal], lo_strict: bool,
                       hi: Optional[Decimal], hi_strict: bool) -> Optional[str]:
    """Exact regex for decimal numbers (no exponent) with lo (<|<=) x (<|<=) hi.
    Never generates ``-0`` / ``-0.0``.  Returns None for an empty range."""
    parts = []
    # non-negative values
    if hi is None or hi > 0 or (hi == 0 and not hi_strict):
        if lo is None or lo < 0:
            a, a_s = Decimal(0), False
        else:
            a, a_s = lo, lo_strict
        r = _mag_regex(a, a_s, hi, hi_strict)
        if r is not None:
            parts.append(r)
    # negative values: magnitude m = -x > 0
    if lo is None or lo < 0:
        if hi is None or hi >= 0:
            m_lo, m_ls = Decimal(0), True
        else:
            m_lo, m_ls = -hi, hi_strict
        m_hi, m_hs = (None, False) if lo is None else (-lo, lo_strict)
        r = _mag_regex(m_lo, m_ls, m_hi, m_hs)
        if r is not None:
            parts.append("-" + _grp(r))
    return _alt(parts)


# ----------------------------------------------------------------------------
# schema walker
# ----------------------------------------------------------------------------


def _json_literal(value, path) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SchemaError(f"value is not valid JSON: {e}", path) from None
    return escape(text)


def _type_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "unknown"


def _to_decimal(v, path, kw) -> Decimal:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SchemaError(f"{kw} must be a number", _ptr(path, kw), kw)
    if isinstance(v, float) and not math.isfinite(v):
        raise SchemaError(f"{kw} must be finite", _ptr(path, kw), kw)
    return Decimal(v) if isinstance(v, int) else Decimal(repr(v))


def _nonneg_int(schema, kw, path, default=None):
    v = schema.get(kw, default)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise SchemaError(f"{kw} must be a non-negative integer", _ptr(path, kw), kw)
    return v


class _Builder:
    """JSON schema -> regex, one method per keyword family.

    Over ~300 lines because of that one-method-per-family layout; the methods share the builder's
    definitions ($defs) and recursion limits.
    """

    def __init__(self, root, ws: str, max_depth: int):
        self.root = root
        self.ws = ws
        self.max_depth = max_depth

    # -- helpers -----------------------------------------------------------
    def resolve(self, ref: str, path: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"only local references ('#...') are supported, got {ref!r}",
                              _ptr(path, "$ref"), "$ref")
        node = self.root
        frag = ref[1:]
        if frag and not frag.startswith("/"):
            raise SchemaError(f"unsupported reference {ref!r} (anchors are not supported)",
                              _ptr(path, "$ref"), "$ref")
        for raw in frag.split("/")[1:] if frag else []:
            tok = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and tok in node:
                node = node[tok]
            elif isinstance(node, list) and tok.isdigit() and int(tok) < len(node):
                node = node[int(tok)]
            else:
                raise SchemaError(f"unresolvable reference {ref!r}", _ptr(path, "$ref"), "$ref")
        return node

    def check_keywords(self, schema: dict, path: str):
        for k, v in schema.items():
            if k in _DESCRIPTIVE or k.startswith("x-"):
                continue
            if k not in _SUPPORTED:
                raise SchemaError(f"unsupported keyword {k!r}", _ptr(path, k), k)
        if schema.get("uniqueItems", False) not in (False,):
            raise SchemaError("uniqueItems: true is unsupported", _ptr(path, "uniqueItems"),
                              "uniqueItems")

    def any_value(self, depth: int) -> str:
        parts = [JSON_STRING, JSON_NUMBER, "true", "false", "null"]
        if depth > 0:
            sub = self.any_value(depth - 1)
            parts.append(self.array_of(sub, 0, None))
            parts.append(self.map_of(sub))
        return _alt(parts)

    def array_of(self, item: Optional[str], min_items: int, max_items: Optional[int]):
        ws = self.ws
        if max_items is not None and max_items < min_items:
            return None
        if item is None or max_items == 0:
            return r"\[" + ws + r"\]" if min_items == 0 else None
        sep = ws + "," + ws
        lo = max(min_items - 1, 0)
        hi = None if max_items is None else max_items - 1
        if hi is None:
            q = "*" if lo == 0 else ("+" if lo == 1 else "{%d,}" % lo)
        elif lo == hi:
            q = "{%d}" % lo
        else:
            q = "?" if (lo, hi) == (0, 1) else "{%d,%d}" % (lo, hi)
        body = _grp(item)
        if hi == 0:
            elems = body
        else:
            elems = body + _grp(sep + body) + q
        if min_items == 0:
            return r"\[" + ws + _grp(elems) + "?" + ws + r"\]"
        return r"\[" + ws + elems + ws + r"\]"

    def map_of(self, value: Optional[str]) -> str:
        ws = self.ws
        if value is None:
            return r"\{" + ws + r"\}"
        kv = JSON_STRING + ws + ":" + ws + _grp(value)
        return r"\{" + ws + _grp(kv + _grp(ws + "," + ws + kv) + "*") + "?" + ws + r"\}"

    # -- main --------------------------------------------------------------
    def gen(self, schema, path: str, refs: tuple, depth: int) -> Optional[str]:
        if schema is True:
            return self.any_value(max(self.max_depth - depth, 0))
        if schema is False:
            return None
        if not isinstance(schema, dict):
            raise SchemaError("a schema must be an object or a boolean", path)
        self.check_keywords(schema, path)
        constraint_keys = [k for k in schema if k in _SUPPORTED]

        if "$ref" in schema:
            others = [k for k in constraint_keys if k != "$ref"]
            if others:
                raise SchemaError("keywords next to '$ref' are unsupported",
                                  _ptr(path, others[0]), others[0])
            ref = schema["$ref"]
            target = self.resolve(ref, path)
            if refs.count(ref) > self.max_depth:
                return None  # recursion bound reached: prune this branch
            return self.gen(target, ref, refs + (ref,), depth)

        for comb in ("anyOf", "oneOf", "allOf"):
            if comb in schema:
                subs = schema[comb]
                if not isinstance(subs, list) or not subs:
                    raise SchemaError(f"{comb} must be a non-empty array", _ptr(path, comb), comb)
                others = [k for k in constraint_keys if k != comb]
                if others:
                    raise SchemaError(f"keywords next to {comb!r} are unsupported",
                                      _ptr(path, others[0]), others[0])
                if comb == "allOf":
                    if len(subs) != 1:
                        raise SchemaError("allOf with more than one subschema is unsupported",
                                          _ptr(path, comb), comb)
                    return self.gen(subs[0], _ptr(path, comb, 0), refs, depth)
                return _alt([self.gen(s, _ptr(path, comb, i), refs, depth)
                             for i, s in enumerate(subs)])

        types = schema.get("type")
        if types is not None:
            tl = [types] if isinstance(types, str) else types
            if not isinstance(tl, list) or not tl or any(t not in _ALL_TYPES for t in tl):
                raise SchemaError(f"invalid type {types!r}", _ptr(path, "type"), "type")
            types = list(dict.fromkeys(tl))

        if "const" in schema or "enum" in schema:
            kw = "const" if "const" in schema else "enum"
            others = [k for k in constraint_keys if k not in ("const", "enum", "type")]
            if others:
                raise SchemaError(f"keywords next to {kw!r} are unsupported",
                                  _ptr(path, others[0]), others[0])
            if "const" in schema and "enum" in schema:
                raise SchemaError("both const and enum are unsupported", _ptr(path, "enum"), "enum")
            values = [schema["const"]] if kw == "const" else schema["enum"]
            if not isinstance(values, list) or (kw == "enum" and not values):
                raise SchemaError("enum must be a non-empty array", _ptr(path, "enum"), "enum")
            out = []
            for i, v in enumerate(values):
                t = _type_of(v)
                if types is not None and not (t in types or (t == "integer" and "number" in types)):
                    continue
                out.append(_json_literal(v, _ptr(path, kw, i) if kw == "enum" else _ptr(path, kw)))
            return _alt(out)

        if types is None:
            present = [t for t in _ALL_TYPES
                       if t != "integer" and _TYPE_KEYWORDS[t] & set(schema)]
            if not present:
                return self.any_value(max(self.max_depth - depth, 0))
            types = present
        return _alt([self.gen_type(t, schema, path, refs, depth) for t in types])

    def gen_type(self, t: str, schema: dict, path: str, refs: tuple, depth: int) -> Optional[str]:
        if t == "null":
            return "null"
        if t == "boolean":
            return "(?:true|false)"
        if t == "string":
            return self.gen_string(schema, path)
        if t in ("integer", "number"):
            return self.gen_number(t, schema, path)
        if t == "array":
            return self.gen_array(schema, path, refs, depth)
        return self.gen_object(schema, path, refs, depth)

    def gen_string(self, schema: dict, path: str) -> Optional[str]:
        mn = _nonneg_int(schema, "minLength", path, 0)
        mx = _nonneg_int(schema, "maxLength", path)
        has_len = "minLength" in schema or "maxLength" in schema
        if "format" in schema:
            fmt = schema["format"]
            if fmt not in _FORMATS:
                raise SchemaError(f"unsupported string format {fmt!r}", _ptr(path, "format"), "format")
            if has_len or "pattern" in schema:
                k = "pattern" if "pattern" in schema else ("minLength" if "minLength" in schema else "maxLength")
                raise SchemaError("format cannot be combined with pattern/minLength/maxLength",
                                  _ptr(path, k), k)
            return '"' + _FORMATS[fmt] + '"'
        if "pattern" in schema:
            if has_len:
                k = "minLength" if "minLength" in schema else "maxLength"
                raise SchemaError("pattern cannot be combined with minLength/maxLength",
                                  _ptr(path, k), k)
            pat = schema["pattern"]
            if not isinstance(pat, str):
                raise SchemaError("pattern must be a string", _ptr(path, "pattern"), "pattern")
            try:
                ast = parse(pat)
            except RegexError as e:
                raise SchemaError(f"unsupported pattern: {e}", _ptr(path, "pattern"), "pattern") from None
            return '"' + _grp(to_pattern(_json_escape_ast(ast))) + '"'
        if mx is not None and mx < mn:
            return None
        if mx is None:
            q = "*" if mn == 0 else ("+" if mn == 1 else "{%d,}" % mn)
        elif mn == mx:
            q = "{%d}" % mn
        else:
            q = "{%d,%d}" % (mn, mx)
        if mx == 0:
            return '""'
        return '"' + JSON_CHAR + q + '"'

    def gen_number(self, t: str, schema: dict, path: str) -> Optional[str]:
        lo = hi = None
        lo_s = hi_s = False
        for kw in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            if kw not in schema:
                continue
            v = schema[kw]
            if kw.startswith("exclusive") and isinstance(v, bool):
                continue  # draft-4 form, handled below
            d = _to_decimal(v, path, kw)
            strict = kw.startswith("exclusive")
            if kw.endswith("inimum"):
                if lo is None or d > lo or (d == lo and strict):
                    lo, lo_s = d, strict
            else:
                if hi is None or d < hi or (d == hi and strict):
                    hi, hi_s = d, strict
        if schema.get("exclusiveMinimum") is True and "minimum" in schema:
            lo_s = True if lo == _to_decimal(schema["minimum"], path, "minimum") else lo_s
        if schema.get("exclusiveMaximum") is True and "maximum" in schema:
            hi_s = True if hi == _to_decimal(schema["maximum"], path, "maximum") else hi_s
        if t == "integer":
            ilo = None
            if lo is not None:
                ilo = math.floor(lo) + 1 if lo_s and lo == math.floor(lo) else math.ceil(lo)
            ihi = None
            if hi is not None:
                ihi = math.ceil(hi) - 1 if hi_s and hi == math.ceil(hi) else math.floor(hi)
            if ilo is None and ihi is None:
                return JSON_INTEGER
            return int_range_regex(ilo, ihi)
        if lo is None and hi is None:
            return JSON_NUMBER
        return number_range_regex(lo, lo_s, hi, hi_s)

    def gen_array(self, schema: dict, path: str, refs: tuple, depth: int) -> Optional[str]:
        mn = _nonneg_int(schema, "minItems", path, 0)
        mx = _nonneg_int(schema, "maxItems", path)
        items = schema.get("items")
        prefix = schema.get("prefixItems")
        if isinstance(items, list):
            if prefix is not None:
                raise SchemaError("list-form items together with prefixItems", _ptr(path, "items"), "items")
            prefix, items = items, None
            prefix_kw = "items"
        else:
            prefix_kw = "prefixItems"
        if "additionalItems" in schema and prefix_kw != "items":
            raise SchemaError("additionalItems without list-form items is unsupported",
                              _ptr(path, "additionalItems"), "additionalItems")
        if prefix is not None:
            if not isinstance(prefix, list):
                raise SchemaError("prefixItems must be an array", _ptr(path, prefix_kw), prefix_kw)
            n = len(prefix) if mx is None else min(len(prefix), mx)
            if mn > n:
                raise SchemaError("minItems larger than the number of prefix items is unsupported",
                                  _ptr(path, "minItems"), "minItems")
            ws = self.ws
            elems = []
            for i in range(n):
                r = self.gen(prefix[i], _ptr(path, prefix_kw, i), refs, depth + 1)
                if r is None:
                    return None
                elems.append(_grp(r))
            return r"\[" + ws + (ws + "," + ws).join(elems) + ws + r"\]"
        if items is None:
            item = self.any_value(max(self.max_depth - depth - 1, 0))
        else:
            item = self.gen(items, _ptr(path, "items"), refs, depth + 1)
        return self.array_of(item, mn, mx)

    def gen_object(self, schema: dict, path: str, refs: tuple, depth: int) -> Optional[str]:
        ws = self.ws
        props = schema.get("properties")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError("required must be an array of strings", _ptr(path, "required"), "required")
        ap = schema.get("additionalProperties", True)
        if not isinstance(ap, (bool, dict)):
            raise SchemaError("additionalProperties must be a schema",
                              _ptr(path, "additionalProperties"), "additionalProperties")
        if props is None:
            if required:
                raise SchemaError("required properties must be listed in properties",
                                  _ptr(path, "required"), "required")
            if ap is False:
                return r"\{" + ws + r"\}"
            if ap is True:
                return self.map_of(self.any_value(max(self.max_depth - depth - 1, 0)))
            return self.map_of(self.gen(ap, _ptr(path, "additionalProperties"), refs, depth + 1))
        if not isinstance(props, dict):
            raise SchemaError("properties must be an object", _ptr(path, "properties"), "properties")
        for r in required:
            if r not in props:
                raise SchemaError(f"required property {r!r} is not listed in properties",
                                  _ptr(path, "required"), "required")
        items = []  # (regex, required)
        for name, sub in props.items():
            v = self.gen(sub, _ptr(path, "properties", name), refs, depth + 1)
            req = name in required
            if v is None:
                if req:
                    return None
                continue
            key = _json_literal(name, _ptr(path, "properties"))
            items.append((key + ws + ":" + ws + _grp(v), req))
        sep = ws + "," + ws
        n = len(items)
        # tail_after[i]: items i.. when something was already emitted (each needs a comma)
        tail_after = [""] * (n + 1)
        for i in range(n - 1, -1, -1):
            r, req = items[i]
            tail_after[i] = (sep + r if req else _grp(sep + r) + "?") + tail_after[i + 1]
        # nothing emitted yet: the first emitted item is some i up to the first
        # required one (a flat alternation, no deep nesting)
        first_req = next((i for i, (_, req) in enumerate(items) if req), None)
        last = n - 1 if first_req is None else first_req
        body = _alt([items[i][0] + tail_after[i + 1] for i in range(last + 1)]) if items else ""
        can_be_empty = first_req is None
        if not items:
            return r"\{" + ws + r"\}"
        if can_be_empty:
            return r"\{" + ws + _grp(body) + "?" + ws + r"\}"
        return r"\{" + ws + body + ws + r"\}"


def _json_escape_ast(node):
    """Rewrite a pattern AST over decoded characters into one over JSON-encoded text."""
    if isinstance(node, Chars):
        safe = []
        extra = []
        for a, b in node.ranges:
            for x, y in ((a, min(b, 0x1F)), (max(a, 0x20), b)):
                if x > y:
                    continue
                if y <= 0x1F:
                    for cp in range(x, y + 1):
                        e = {8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r"}.get(cp, f"\\u{cp:04x}")
                        extra.append(e)
                    continue
                cur = x
                for special in (0x22, 0x5C):
                    if x <= special <= y:
                        if cur <= special - 1:
                            safe.append((cur, special - 1))
                        extra.append("\\" + chr(special))
                        cur = special + 1
                if cur <= y:
                    safe.append((cur, y))
        alts = []
        if safe:
            alts.append(Chars(tuple(safe)))
        for e in extra:
            alts.append(Seq(tuple(Chars(((ord(c), ord(c)),)) for c in e)))
        if not alts:
            return Chars(())
        return alts[0] if len(alts) == 1 else Alt(tuple(alts))
    if isinstance(node, Seq):
        return Seq(tuple(_json_escape_ast(x) for x in node.items))
    if isinstance(node, Alt):
        return Alt(tuple(_json_escape_ast(x) for x in node.items))
    if isinstance(node, Repeat):
        return Repeat(_json_escape_ast(node.item), node.lo, node.hi)
    raise TypeError(node)


def json_schema_to_regex(schema, *, whitespace_pattern: Optional[str] = None,
                         max_recursion_depth: int = DEFAULT_MAX_RECURSION_DEPTH) -> str:
    """Compile a JSON schema (dict, bool or JSON text) to a regex string."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise SchemaError(f"schema is not valid JSON: {e}") from None
    if whitespace_pattern is None:
        ws = ""
    elif whitespace_pattern == "flexible":
        ws = WHITESPACE_FLEXIBLE
    else:
        try:
            parse(whitespace_pattern)
        except RegexError as e:
            raise ConstraintError(f"invalid whitespace_pattern: {e}") from None
        ws = _grp(whitespace_pattern) if whitespace_pattern else ""
    if not isinstance(max_recursion_depth, int) or max_recursion_depth < 0:
        raise ValueError("max_recursion_depth must be a non-negative int")
    r = _Builder(schema, ws, max_recursion_depth).gen(schema, "#", (), 0)
    if r is None:
        raise SchemaError("no JSON value satisfies the schema (or a recursive schema cannot "
                          f"terminate within max_recursion_depth={max_recursion_depth})")
    return r

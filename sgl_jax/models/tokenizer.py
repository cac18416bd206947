"""Tokenizers for sgl_jax, built on the `tokenizers` library (no jax, no torch).

Two ways in:

* :meth:`Tokenizer.from_gguf` rebuilds the tokenizer from the ``tokenizer.*`` metadata
  of a GGUF file (llama.cpp key names).  Two vocabulary families are supported:

  - ``tokenizer.ggml.model == "gpt2"``: byte-level BPE (vocab + merges).  The text is
    split before BPE the way the model's ``tokenizer.ggml.pre`` says (see
    :data:`SUPPORTED_PRE_TOKENIZERS`).
  - ``tokenizer.ggml.model == "llama"``: SentencePiece-style vocabulary (``▁`` marks a
    space, ``<0xNN>`` byte-fallback pieces, per-piece scores).  Encoded like
    SentencePiece BPE / llama.cpp: the adjacent pair whose concatenation has the highest
    score is merged first; characters outside the vocabulary fall back to bytes.

* :meth:`Tokenizer.from_hf_dir` loads ``tokenizer.json`` (+ ``tokenizer_config.json``,
  ``generation_config.json``, ``chat_template.jinja``) from a Hugging Face style folder.

Token ids <-> bytes: :meth:`Tokenizer.token_bytes` gives the exact bytes a token adds to
the decoded text; :meth:`Tokenizer.decode` and :class:`IncrementalDetokenizer` both work at
that byte level, so streaming output concatenates to exactly ``decode(all_ids)``.
"""

from __future__ import annotations

import bisect
import codecs
import datetime as _dt
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

__all__ = [
    "Tokenizer",
    "IncrementalDetokenizer",
    "tiny_byte_tokenizer",
    "tiny_byte_tokenizer_metadata",
    "bytes_to_unicode",
    "SUPPORTED_PRE_TOKENIZERS",
]

# GGUF token types (llama.cpp / sentencepiece numbering).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

_SPIECE_SPACE = "\u2581"  # ▁
_BYTE_PIECE_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

# Texts of special tokens that end a turn / the text (llama.cpp calls these end-of-generation
# tokens).  A special token with one of these texts joins ``stop_token_ids``.
_END_OF_GENERATION_TEXTS = frozenset(
    {
        "</s>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end|>",
        "<end_of_turn>",
        "<|return|>",
        "<EOT>",
        "<end_of_utterance>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",  # deepseek: <｜end▁of▁sentence｜>
    }
)


# --------------------------------------------------------------------------------------
# GPT-2 byte <-> unicode alphabet
# --------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: every byte value gets a printable character.

    Bytes that are already printable, non-space Latin-1 characters stand for themselves;
    the remaining 68 bytes are given the code points 256, 257, ... in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    keep_set = set(keep)
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep_set:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _byte_level_to_bytes(token: str) -> bytes:
    """Undo the GPT-2 byte->unicode mapping; text outside that alphabet is taken as UTF-8."""
    try:
        return bytes([_CHAR_TO_BYTE[c] for c in token])
    except KeyError:
        return token.encode("utf-8")


def _sentencepiece_to_bytes(token: str) -> bytes:
    m = _BYTE_PIECE_RE.match(token)
    if m is not None:
        return bytes([int(m.group(1), 16)])
    return token.replace(_SPIECE_SPACE, " ").encode("utf-8")


# --------------------------------------------------------------------------------------
# Pre-tokenizers for byte-level BPE vocabularies (keyed by GGUF tokenizer.ggml.pre)
# --------------------------------------------------------------------------------------

# The split patterns llama.cpp and the original HF tokenizer.json files use.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_gpt2():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _pre_digits_then_gpt2():
    # StarCoder / SmolLM: every digit is its own pre-token, then the GPT-2 split.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _pre_split(pattern: str):
    def build():
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


class _PreSpec:
    __slots__ = ("build", "ignore_merges", "nfc", "default_add_bos")

    def __init__(self, build, *, ignore_merges=False, nfc=False, default_add_bos=False):
        self.build = build
        self.ignore_merges = ignore_merges
        self.nfc = nfc
        self.default_add_bos = default_add_bos


_LLAMA3_SPEC = _PreSpec(_pre_split(_LLAMA3_PATTERN), ignore_merges=True, default_add_bos=True)
_QWEN2_SPEC = _PreSpec(_pre_split(_QWEN2_PATTERN), nfc=True)
_DIGITS_SPEC = _PreSpec(_pre_digits_then_gpt2)
_GPT2_SPEC = _PreSpec(_pre_gpt2)

_PRE_SPECS: dict[str, _PreSpec] = {
    "default": _GPT2_SPEC,
    "gpt2": _GPT2_SPEC,
    "gpt-2": _GPT2_SPEC,
    "mpt": _GPT2_SPEC,
    "olmo": _GPT2_SPEC,
    "jais": _GPT2_SPEC,
    "smollm": _DIGITS_SPEC,
    "starcoder": _DIGITS_SPEC,
    "refact": _DIGITS_SPEC,
    "command-r": _DIGITS_SPEC,
    "codeshell": _DIGITS_SPEC,
    "exaone": _DIGITS_SPEC,
    "minerva": _DIGITS_SPEC,
    "llama-bpe": _LLAMA3_SPEC,
    "llama3": _LLAMA3_SPEC,
    "llama-v3": _LLAMA3_SPEC,
    "falcon3": _LLAMA3_SPEC,
    "pixtral": _LLAMA3_SPEC,
    "dbrx": _PreSpec(_pre_split(_LLAMA3_PATTERN)),
    "smaug-bpe": _PreSpec(_pre_split(_LLAMA3_PATTERN)),
    "qwen2": _QWEN2_SPEC,
    "deepseek-r1-qwen": _QWEN2_SPEC,
}

SUPPORTED_PRE_TOKENIZERS = frozenset(_PRE_SPECS)


# --------------------------------------------------------------------------------------
# GGUF metadata access
# --------------------------------------------------------------------------------------


def _field_value(value: Any) -> Any:
    """A python value from a gguf ReaderField (or a plain value passed in a mapping)."""
    if hasattr(value, "parts") and hasattr(value, "types"):
        try:
            return value.contents()
        except (UnicodeDecodeError, AttributeError):
            import gguf

            types = list(value.types)
            if types and types[0] == gguf.GGUFValueType.STRING:
                return bytes(value.parts[value.data[0]]).decode("utf-8", errors="replace")
            if len(types) >= 2 and types[1] == gguf.GGUFValueType.STRING:
                return [bytes(value.parts[i]).decode("utf-8", errors="replace") for i in value.data]
            raise
    if hasattr(value, "tolist"):  # numpy arrays / scalars
        return value.tolist()
    return value


class _Meta:
    """Read-only view of the tokenizer metadata of one GGUF file."""

    def __init__(self, path_or_fields: Any):
        if isinstance(path_or_fields, (str, os.PathLike)):
            self.source = os.fspath(path_or_fields)
            if not os.path.isfile(self.source):
                raise FileNotFoundError(f"GGUF file not found: {self.source}")
            from gguf import GGUFReader

            raw: Mapping[str, Any] = GGUFReader(self.source).fields
        elif hasattr(path_or_fields, "fields") and isinstance(getattr(path_or_fields, "fields"), Mapping):
            raw = path_or_fields.fields
            filename = getattr(getattr(path_or_fields, "data", None), "filename", None)  # np.memmap
            self.source = os.fspath(filename) if filename else "<GGUFReader>"
        elif isinstance(path_or_fields, Mapping):
            raw = path_or_fields
            self.source = str(raw.get("__source__", "<GGUF metadata mapping>"))
        else:
            raise TypeError(
                "Tokenizer.from_gguf expects a path, a gguf.GGUFReader or a mapping of GGUF "
                f"metadata; got {type(path_or_fields).__name__}"
            )
        self._raw = raw
        self._cache: dict[str, Any] = {}

    def has(self, key: str) -> bool:
        return key in self._raw

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self._raw:
            return default
        if key not in self._cache:
            self._cache[key] = _field_value(self._raw[key])
        return self._cache[key]

    def require(self, key: str) -> Any:
        if key not in self._raw:
            raise ValueError(f"{self.source}: missing GGUF tokenizer metadata key {key!r}")
        return self.get(key)


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def _to_int_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class Tokenizer:
    """Text <-> token ids for one model.  Build with :meth:`from_gguf` / :meth:`from_hf_dir`.

    Over ~300 lines because it carries two constructors (GGUF metadata, Hugging Face directory) plus
    encode/decode/templates over one backend.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        tokens: Sequence[str | None],
        decode_kind: str,
        special_ids: Iterable[int],
        added_text_ids: Iterable[int] = (),
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        extra_stop_ids: Iterable[int] = (),
        chat_template: str | None = None,
        strip_leading_space: bool = False,
        source: str = "<tokenizer>",
    ):
        if decode_kind not in ("byte_level", "sentencepiece", "text"):
            raise ValueError(f"unknown decode_kind {decode_kind!r}")
        self._tk = backend
        self._tokens: list[str | None] = list(tokens)
        self._decode_kind = decode_kind
        self._special_ids = frozenset(int(i) for i in special_ids)
        self._added_text_ids = frozenset(int(i) for i in added_text_ids)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        self.chat_template = chat_template
        self.source = source
        self._strip_leading_space = bool(strip_leading_space)
        n = len(self._tokens)
        named_ids = (("bos", bos_token_id), ("eos", eos_token_id), ("pad", pad_token_id), ("unk", unk_token_id))
        for name, tid in named_ids:
            if tid is not None and not 0 <= tid < n:
                raise ValueError(f"{source}: {name} token id {tid} outside vocabulary of size {n}")

        stop = set(int(i) for i in extra_stop_ids)
        if eos_token_id is not None:
            stop.add(int(eos_token_id))
        for i in self._special_ids:
            if self._tokens[i] in _END_OF_GENERATION_TEXTS:
                stop.add(i)
        self.stop_token_ids: frozenset[int] = frozenset(i for i in stop if 0 <= i < n)
        self._token_bytes: list[bytes | None] | None = None
        self._compiled_template = None

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "Tokenizer":
        """The tokenizer of a model file or directory: a ``.gguf`` file's metadata, else a Hugging Face dir."""
        return cls.from_gguf(str(path)) if str(path).endswith(".gguf") else cls.from_hf_dir(path)

    # ---------------------------------------------------------------- construction: GGUF
    @classmethod
    def from_gguf(cls, path_or_fields: Any) -> "Tokenizer":
        """Rebuild the tokenizer described by a GGUF file's ``tokenizer.*`` metadata.

        ``path_or_fields``: a path to a ``.gguf`` file, a ``gguf.GGUFReader``, or a mapping
        from GGUF key to value (ReaderFields or plain python values).

        Long because it maps every GGUF tokenizer metadata variant (BPE, SentencePiece, pre-tokenizer names,
        special tokens) in one place.
        """
        meta = _Meta(path_or_fields)
        src = meta.source
        model = meta.require("tokenizer.ggml.model")
        tokens = list(meta.require("tokenizer.ggml.tokens"))
        n = len(tokens)
        if n == 0:
            raise ValueError(f"{src}: 'tokenizer.ggml.tokens' is empty")
        types = meta.get("tokenizer.ggml.token_type")
        if types is None:
            types = [TOKEN_NORMAL] * n
            if model == "llama":
                types = [TOKEN_BYTE if _BYTE_PIECE_RE.match(t) else TOKEN_NORMAL for t in tokens]
        types = [int(t) for t in types]
        if len(types) != n:
            raise ValueError(f"{src}: 'tokenizer.ggml.token_type' has {len(types)} entries for {n} tokens")

        def opt_id(key: str) -> int | None:
            v = meta.get(key)
            if v is None:
                return None
            v = int(v)
            return v if 0 <= v < n else None

        bos = opt_id("tokenizer.ggml.bos_token_id")
        eos = opt_id("tokenizer.ggml.eos_token_id")
        pad = opt_id("tokenizer.ggml.padding_token_id")
        unk = opt_id("tokenizer.ggml.unknown_token_id")
        extra_stop = [
            i for i in (opt_id("tokenizer.ggml.eot_token_id"), opt_id("tokenizer.ggml.eom_token_id")) if i is not None
        ]

        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)  # duplicates (rare) keep their first id

        strip_leading_space = False
        if model == "gpt2":
            pre = meta.get("tokenizer.ggml.pre", "default")
            spec = _PRE_SPECS.get(pre)
            if spec is None:
                raise ValueError(
                    f"{src}: unsupported tokenizer.ggml.pre {pre!r} (tokenizer.ggml.model 'gpt2'); "
                    f"supported: {', '.join(sorted(_PRE_SPECS))}"
                )
            merges = _parse_merges(meta.require("tokenizer.ggml.merges"), src)
            try:
                bpe = models.BPE(
                    vocab=vocab,
                    merges=merges,
                    fuse_unk=False,
                    byte_fallback=False,
                    ignore_merges=spec.ignore_merges,
                )
            except Exception as e:  # tokenizers raises a bare Exception on bad merges
                raise ValueError(f"{src}: cannot build BPE from the GGUF vocab/merges: {e}") from e
            tk = tokenizers.Tokenizer(bpe)
            if spec.nfc:
                tk.normalizer = normalizers.NFC()
            tk.pre_tokenizer = spec.build()
            tk.decoder = decoders.ByteLevel()
            decode_kind = "byte_level"
            default_add_bos = spec.default_add_bos
        elif model == "llama":
            scores = meta.require("tokenizer.ggml.scores")
            scores = [float(s) for s in scores]
            if len(scores) != n:
                raise ValueError(f"{src}: 'tokenizer.ggml.scores' has {len(scores)} entries for {n} tokens")
            if meta.has("tokenizer.ggml.merges"):
                merges = _parse_merges(meta.get("tokenizer.ggml.merges"), src)
            else:
                merges = _merges_from_scores(tokens, scores, types, vocab)
            has_bytes = any(t == TOKEN_BYTE for t in types)
            bpe = models.BPE(
                vocab=vocab,
                merges=merges,
                unk_token=tokens[unk] if unk is not None else None,
                fuse_unk=True,
                byte_fallback=has_bytes,
            )
            tk = tokenizers.Tokenizer(bpe)
            add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            steps = []
            if add_space_prefix:
                # Applied to every stretch of plain text (after each special token too),
                # the way llama.cpp prefixes a space to each raw-text fragment.
                steps.append(normalizers.Prepend(_SPIECE_SPACE))
            steps.append(normalizers.Replace(" ", _SPIECE_SPACE))
            tk.normalizer = normalizers.Sequence(steps)
            tk.pre_tokenizer = None
            dec = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
            if add_space_prefix:
                dec.append(decoders.Strip(" ", 1, 0))
            tk.decoder = decoders.Sequence(dec)
            decode_kind = "sentencepiece"
            strip_leading_space = add_space_prefix
            default_add_bos = True
        else:
            raise ValueError(
                f"{src}: unsupported tokenizer.ggml.model {model!r}; supported: 'gpt2' (byte-level BPE), "
                "'llama' (SentencePiece-style)"
            )

        # Control / unknown tokens are special (matched whole, skipped when decoding);
        # user-defined tokens are matched whole but decode as their text.
        special_ids = [i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_UNUSED)]
        atomic_special = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t in (TOKEN_CONTROL, TOKEN_UNKNOWN) and vocab.get(tokens[i]) == i and tokens[i]
        ]
        user_defined = [i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
        atomic_user = [
            AddedToken(tokens[i], special=False, normalized=False)
            for i in user_defined
            if vocab.get(tokens[i]) == i and tokens[i]
        ]
        if atomic_special:
            tk.add_special_tokens(atomic_special)
        if atomic_user:
            tk.add_tokens(atomic_user)

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        add_bos = default_add_bos if add_bos is None else bool(add_bos)
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        return cls(
            tk,
            tokens=tokens,
            decode_kind=decode_kind,
            special_ids=special_ids,
            added_text_ids=user_defined,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
            unk_token_id=unk,
            add_bos=add_bos,
            add_eos=add_eos,
            extra_stop_ids=extra_stop,
            chat_template=meta.get("tokenizer.chat_template"),
            strip_leading_space=strip_leading_space,
            source=src,
        )

    # ------------------------------------------------------------ construction: HF folder
    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``generation_config.json``).

        Long because it maps every tokenizer_config.json variant in one place.
        """
        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise ValueError(f"{path}: no tokenizer.json (required to build the tokenizer)")
        with open(tok_file, encoding="utf-8") as f:
            spec = json.load(f)
        tk = tokenizers.Tokenizer.from_str(json.dumps(spec))
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        gen_config = _read_json(os.path.join(path, "generation_config.json"))

        n = tk.get_vocab_size(with_added_tokens=True)
        added = spec.get("added_tokens") or []
        n = max([n, *(int(a["id"]) + 1 for a in added)])
        tokens: list[str | None] = [tk.id_to_token(i) for i in range(n)]
        special_ids = [int(a["id"]) for a in added if a.get("special")]
        added_text_ids = [int(a["id"]) for a in added if not a.get("special")]

        # How a token's string maps to output bytes, read off the decoder / model.
        kinds = _component_types(spec.get("decoder")) | _component_types(spec.get("pre_tokenizer"))
        model_spec = spec.get("model") or {}
        if "ByteLevel" in kinds:
            decode_kind = "byte_level"
        elif kinds & {"ByteFallback", "Metaspace"} or model_spec.get("byte_fallback") or _replaces_spiece_space(
            spec.get("decoder")
        ):
            decode_kind = "sentencepiece"
        else:
            decode_kind = "text"
        strip_leading_space = _decoder_strips_leading_space(spec.get("decoder"))

        def tok_id(value: Any) -> int | None:
            if value is None:
                return None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, int):
                return value
            return tk.token_to_id(value) if isinstance(value, str) else None

        bos = tok_id(config.get("bos_token"))
        eos = tok_id(config.get("eos_token"))
        pad = tok_id(config.get("pad_token"))
        unk = tok_id(config.get("unk_token"))

        gen_eos = gen_config.get("eos_token_id")
        gen_eos_list = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if eos is None and gen_eos_list:
            eos = int(gen_eos_list[0])
        if bos is None and isinstance(gen_config.get("bos_token_id"), int):
            bos = gen_config["bos_token_id"]
        if pad is None and isinstance(gen_config.get("pad_token_id"), int):
            pad = gen_config["pad_token_id"]

        # BOS/EOS: tokenizer_config flags first, else whatever the post-processor adds.
        tmpl_bos, tmpl_eos = _template_processing_ends(spec.get("post_processor"), tk)
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:
            add_bos = tmpl_bos is not None
            if tmpl_bos is not None and bos is None:
                bos = tmpl_bos
        if "add_eos_token" in config:
            add_eos = bool(config["add_eos_token"])
        else:
            add_eos = tmpl_eos is not None

        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
            chat_template = named.get("default") or next(iter(named.values()), None)
        jinja_file = os.path.join(path, "chat_template.jinja")
        if chat_template is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                chat_template = f.read()

        tk.post_processor = None  # BOS/EOS are added by Tokenizer.encode
        tk.no_padding()
        tk.no_truncation()
        return cls(
            tk,
            tokens=tokens,
            decode_kind=decode_kind,
            special_ids=special_ids,
            added_text_ids=added_text_ids,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
            unk_token_id=unk,
            add_bos=add_bos,
            add_eos=add_eos,
            extra_stop_ids=[int(i) for i in gen_eos_list],
            chat_template=chat_template,
            strip_leading_space=strip_leading_space,
            source=path,
        )

    # ------------------------------------------------------------------------- basics
    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, kind={self._decode_kind}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_token_id}, eos={self.eos_token_id}, add_bos={self.add_bos})"
        )

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (no post-processor; BOS/EOS added by us)."""
        return self._tk

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self._tokens[self.bos_token_id]

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self._tokens[self.eos_token_id]

    def id_to_token(self, i: int) -> str | None:
        return self._tokens[self._check_id(i)]

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def _check_id(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self._tokens):
            raise IndexError(f"token id {i} outside vocabulary of size {len(self._tokens)}")
        return i

    # ----------------------------------------------------------------------- encoding
    def _finish_ids(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if add_special_tokens:
            if self.add_bos and self.bos_token_id is not None:
                ids = [self.bos_token_id, *ids]
            if self.add_eos and self.eos_token_id is not None:
                ids = [*ids, self.eos_token_id]
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``.  Special-token texts in ``text`` become those tokens.

        ``add_special_tokens`` adds BOS/EOS only where the model's metadata asks for them.
        """
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return self._finish_ids(ids, add_special_tokens)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        encs = self._tk.encode_batch(list(texts), add_special_tokens=False)
        return [self._finish_ids(e.ids, add_special_tokens) for e in encs]

    # ----------------------------------------------------------------------- decoding
    def _bytes_of(self, i: int) -> bytes:
        tok = self._tokens[i]
        if tok is None:
            return b""
        if i in self._added_text_ids:
            return tok.encode("utf-8")
        if self._decode_kind == "byte_level":
            return _byte_level_to_bytes(tok)
        if self._decode_kind == "sentencepiece":
            return _sentencepiece_to_bytes(tok)
        return self._tk.decode([i], skip_special_tokens=False).encode("utf-8")

    def token_bytes_list(self) -> list[bytes | None]:
        """For every id, the bytes it adds to decoded text; ``None`` for special tokens.

        Built once and cached: this is the table the structured-generation compiler walks.
        Do not mutate the returned list.
        """
        if self._token_bytes is None:
            special = self._special_ids
            self._token_bytes = [None if i in special else self._bytes_of(i) for i in range(len(self._tokens))]
        return self._token_bytes

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes token ``i`` contributes to the decoded text (``b""`` for special tokens)."""
        b = self.token_bytes_list()[self._check_id(i)]
        return b"" if b is None else b

    def _special_text_bytes(self, i: int) -> bytes:
        tok = self._tokens[i]
        return b"" if tok is None else tok.encode("utf-8")

    def _join_bytes(self, ids: Iterable[int], skip_special_tokens: bool) -> bytes:
        table = self.token_bytes_list()
        n = len(table)
        parts = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise IndexError(f"token id {i} outside vocabulary of size {n}")
            b = table[i]
            if b is None:
                if skip_special_tokens:
                    continue
                b = self._special_text_bytes(i)
            parts.append(b)
        return b"".join(parts)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. a cut-off character) becomes U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        data = self._join_bytes(ids, skip_special_tokens)
        if self._strip_leading_space and data[:1] == b" ":
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def detokenizer(self, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat template
    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render the model's jinja2 chat template (sandboxed) to a prompt string.

        The result usually starts with the template's own BOS text where the model wants
        one, so encode it with ``add_special_tokens=False``.
        """
        if not self.chat_template:
            raise ValueError(f"{self.source}: the model has no chat template (tokenizer.chat_template)")
        if self._compiled_template is None:
            self._compiled_template = _chat_environment().from_string(self.chat_template)
        variables = dict(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=None if self.pad_token_id is None else self._tokens[self.pad_token_id],
            unk_token=None if self.unk_token_id is None else self._tokens[self.unk_token_id],
        )
        variables.update(kwargs)
        return self._compiled_template.render(**variables)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """Render a jinja2 chat template string (sandboxed, the same environment as `Tokenizer.apply_chat_template`)
    without a tokenizer: for clients that got the template from a server. `variables` fills bos_token etc."""
    variables.setdefault("bos_token", "")
    variables.setdefault("eos_token", "")
    return _chat_environment().from_string(template).render(messages=messages,
                                                             add_generation_prompt=add_generation_prompt,
                                                             **variables)


# --------------------------------------------------------------------------------------
# Incremental detokenization
# --------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Streaming detokenizer: feed ids, get the newly completed text.

    Works at the byte level (``Tokenizer.token_bytes``), so characters split over several
    tokens come out whole, and bytes of an incomplete UTF-8 character are held back until
    it completes.  The concatenation of everything returned by :meth:`feed` and
    :meth:`finish` equals ``tokenizer.decode(all_ids, skip_special_tokens)``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        *,
        strip_leading_space: bool | None = None,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._table = tokenizer.token_bytes_list()
        self._strip = tokenizer._strip_leading_space if strip_leading_space is None else bool(strip_leading_space)
        self._seen_bytes = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chunks: list[str] = []
        self._text_cache: str | None = ""
        self.token_ids: list[int] = []

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add one id or several; return the text they completed (possibly "")."""
        ids = _to_int_list(ids)
        self.token_ids.extend(ids)
        data = self.tokenizer._join_bytes(ids, self.skip_special_tokens)
        if not data:
            return ""
        if not self._seen_bytes:
            self._seen_bytes = True
            if self._strip and data[:1] == b" ":
                data = data[1:]
        out = self._decoder.decode(data, final=False)
        if out:
            self._chunks.append(out)
            self._text_cache = None
        return out

    __call__ = feed

    def finish(self) -> str:
        """End of stream: held-back bytes of an unfinished character become U+FFFD."""
        out = self._decoder.decode(b"", final=True)
        if out:
            self._chunks.append(out)
            self._text_cache = None
        return out

    @property
    def pending_bytes(self) -> bytes:
        """Bytes of a character not yet complete (held back)."""
        return self._decoder.getstate()[0]

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
            self._chunks = [self._text_cache]
        return self._text_cache


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _parse_merges(merges: Iterable[Any], src: str) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        if isinstance(m, (list, tuple)):
            out.append((m[0], m[1]))
            continue
        cut = m.find(" ", 1)  # the first piece is never empty; a later one may hold a space
        if cut < 0:
            raise ValueError(f"{src}: malformed merge {m!r} in 'tokenizer.ggml.merges'")
        out.append((m[:cut], m[cut + 1 :]))
    return out


def _merges_from_scores(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], vocab: Mapping[str, int]
) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's "merge the best-scoring pair" rule.

    Every piece that can be cut into two mergeable pieces yields one merge per cut; merges
    are ranked by the merged piece's score (best first).
    """
    mergeable = {t for t, ty in zip(tokens, types) if ty in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    ranked = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty not in (TOKEN_NORMAL, TOKEN_USER_DEFINED) or len(tok) < 2 or vocab.get(tok) != i:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _iter_components(node: Any):
    if isinstance(node, dict):
        yield node
        for key in ("decoders", "pretokenizers", "normalizers"):
            for child in node.get(key) or []:
                yield from _iter_components(child)


def _component_types(node: Any) -> set[str]:
    return {c.get("type") for c in _iter_components(node)}


def _replaces_spiece_space(node: Any) -> bool:
    for c in _iter_components(node):
        if c.get("type") == "Replace" and (c.get("pattern") or {}).get("String") == _SPIECE_SPACE:
            return True
    return False


def _decoder_strips_leading_space(node: Any) -> bool:
    for c in _iter_components(node):
        if c.get("type") == "Strip" and c.get("content") == " " and int(c.get("start", 0)) > 0:
            return True
        if c.get("type") == "Metaspace":
            scheme = c.get("prepend_scheme")
            if scheme is None:
                return bool(c.get("add_prefix_space", True))
            return scheme != "never"
    return False


def _template_processing_ends(node: Any, tk: tokenizers.Tokenizer) -> tuple[int | None, int | None]:
    """Ids of the special tokens a TemplateProcessing post-processor puts first / last."""
    if not isinstance(node, dict):
        return None, None
    if node.get("type") == "Sequence":
        bos = eos = None
        for child in node.get("processors") or []:
            b, e = _template_processing_ends(child, tk)
            bos = bos if b is None else b
            eos = eos if e is None else e
        return bos, eos
    if node.get("type") != "TemplateProcessing":
        return None, None
    single = node.get("single") or []

    def special_id(item: dict) -> int | None:
        st = item.get("SpecialToken")
        if st is None:
            return None
        entry = (node.get("special_tokens") or {}).get(st["id"]) or {}
        ids = entry.get("ids") or []
        if ids:
            return int(ids[0])
        return tk.token_to_id(st["id"])

    bos = special_id(single[0]) if single else None
    eos = special_id(single[-1]) if len(single) > 1 else None
    return bos, eos


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    # like transformers' chat-template tojson: no HTML escaping, non-ASCII kept as is
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return _dt.datetime.now().strftime(fmt)


_CHAT_ENV = None


def _chat_environment():
    global _CHAT_ENV
    if _CHAT_ENV is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        _CHAT_ENV = env
    return _CHAT_ENV


# --------------------------------------------------------------------------------------
# A tiny deterministic byte-level tokenizer for tests of tiny random models
# --------------------------------------------------------------------------------------

_TINY_MERGES = (
    "Ġ t", "h e", "i n", "e r", "a n", "Ġ a", "o n", "r e", "Ġt he", "Ġ s",
    "Ġ w", "o r", "e n", "a t", "i s", "Ġ o", "Ġ c", "e s", "i t", "Ġ b",
    "in g", "Ġ f", "a r", "Ġ p", "o u", "Ġ m", "a l", "l l", "Ġ h", "e d",
    "Ġ i", "Ġ d", "Ġ an", "Ġan d", "Ġ Ġ", "Ċ Ċ", "l o", "Ġw or", "Ġwor l", "Ġworl d",
    "he ll", "hell o",
)  # fmt: skip

_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|bos|>{{ message['role'] }}\n{{ message['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


def tiny_byte_tokenizer_metadata() -> dict[str, Any]:
    """GGUF ``tokenizer.*`` metadata (plain python values) of :func:`tiny_byte_tokenizer`.

    Ids 0..255 are the single bytes (id == byte value), 256..297 the merges above,
    298 ``<|bos|>``, 299 ``<|eos|>``: vocabulary size 300.  Usable with ``gguf.GGUFWriter``
    to give tiny test models a tokenizer.
    """
    tokens = [_BYTE_TO_CHAR[b] for b in range(256)]
    for m in _TINY_MERGES:
        left, right = m.split(" ")
        tokens.append(left + right)
    tokens += ["<|bos|>", "<|eos|>"]
    types = [TOKEN_NORMAL] * (len(tokens) - 2) + [TOKEN_CONTROL, TOKEN_CONTROL]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": list(_TINY_MERGES),
        "tokenizer.ggml.bos_token_id": len(tokens) - 2,
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
        "tokenizer.ggml.padding_token_id": len(tokens) - 1,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": _TINY_CHAT_TEMPLATE,
    }


def tiny_byte_tokenizer() -> Tokenizer:
    """A deterministic 300-token byte-level BPE tokenizer (bytes + 42 merges + <|bos|>, <|eos|>).

    Adds ``<|bos|>`` (id 298) when encoding with ``add_special_tokens=True``; ``<|eos|>`` (299)
    is the eos / pad / stop token.  Every string round-trips through encode/decode.
    """
    meta = tiny_byte_tokenizer_metadata()
    meta["__source__"] = "<tiny_byte_tokenizer>"
    return Tokenizer.from_gguf(meta)


# A program's prompts share long prefixes: a `select` sends its prompt and then the prompt + each choice, and every
# HellaSwag program the same 20-shot prefix. Tokenized whole, a select re-tokenized ~800 tokens five times (~2 ms
# each on a 2-core CPU: ~10 ms of a ~100 ms program in process; bench/notes.md, session 29). `PrefixEncoder`
# keeps the last texts' ids and tokenizes a new text only from a safe cut before where it leaves the closest one.
_SPLICE_CHARS = 256  # how far back from the divergence a cut is looked for


def _starts_piece(text: str, p: int) -> bool:
    """text[p] is a space after a non-space character and before a letter (0 < p < len(text) - 1). Every
    pre-tokenizer these vocabularies use starts a piece there whatever comes before or after: the byte-level
    regexes' " ?letters" pieces (the piece before ends at its last non-space character, and no earlier alternative
    of theirs matches a space before a letter), SentencePiece's whitespace split. So the pieces before p and from p
    on tokenize apart."""
    return text[p] == " " and not text[p - 1].isspace() and text[p + 1].isalpha()


def _splice_cut(text: str, end: int) -> int:
    """The last position p < end - 1 (within _SPLICE_CHARS of `end`) that `_starts_piece`, or -1."""
    for p in range(min(end, len(text)) - 2, max(end - _SPLICE_CHARS, 1) - 1, -1):
        if _starts_piece(text, p):
            return p
    return -1


def _common_prefix(a: str, b: str) -> int:
    """len of the longest common prefix of a and b: compared 4,096 characters at a time, then bisected inside the
    first block that differs (slice comparisons at C speed; a 100k-character prompt copies ~200 KB, not 17 halves)."""
    n, i, block = min(len(a), len(b)), 0, 4096
    while i < n and a[i:i + block] == b[i:i + block]:
        i += block
    if i >= n:
        return n
    lo, hi = i, min(i + block, n)  # a[:lo] == b[:lo]; the common prefix ends at or before hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[i:mid] == b[i:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _next_cut(text: str, start: int) -> int:
    """The first position p >= start (within _SPLICE_CHARS of it) that `_starts_piece`, or len(text)."""
    for p in range(max(start, 1), min(len(text) - 1, start + _SPLICE_CHARS)):
        if _starts_piece(text, p):
            return p
    return len(text)


class PrefixEncoder:
    """tok.encode(text) for texts that share prefixes with recent ones, tokenizing only past a cut.

    Keeps the last `keep` texts with their ids and each token's first character. For a new text, the kept text
    with the longest common prefix gives its ids before a cut (`_splice_cut`) inside that common part, and only
    text[cut:] is tokenized. The cut is used only where the kept text has a token starting exactly there and its
    own text from the cut to its next such position tokenizes alone to its ids there (no piece or merge reaches
    back across the cut, e.g. a normalizer's prefix); otherwise the text is tokenized whole. Tested against whole
    encodes (tests/test_tokenizer.py)."""

    def __init__(self, tok: "Tokenizer", keep: int = 8, min_chars: int = 64):
        self.tok, self.keep, self.min_chars = tok, keep, min_chars
        self._kept: list[tuple[str, list[int], list[int]]] = []  # (text, raw ids, each id's first char)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids, starts = self._raw(text)
        self._kept = [e for e in self._kept if e[0] != text][-(self.keep - 1):] + [(text, ids, starts)]
        return self.tok._finish_ids(list(ids), add_special_tokens)

    def _raw(self, text: str) -> tuple[list[int], list[int]]:
        best, n = None, 0
        for e in self._kept:
            m = _common_prefix(e[0], text)
            if m > n:
                best, n = e, m
        cut = _splice_cut(text, n) if best is not None and n >= self.min_chars else -1
        if cut > 0:
            old, old_ids, old_starts = best
            k = _index_of(old_starts, cut)
            # the kept text from the cut to its next cut (or its end), tokenized alone, must give its own ids
            end = _next_cut(old, cut + 64)
            k_end = _index_of(old_starts, end) if end < len(old) else len(old_ids)
            if k > 0 and k_end > k and \
                    self.tok._tk.encode(old[cut:end], add_special_tokens=False).ids == old_ids[k:k_end]:
                tail = self.tok._tk.encode(text[cut:], add_special_tokens=False)
                return old_ids[:k] + tail.ids, old_starts[:k] + [cut + a for a, _ in tail.offsets]
        enc = self.tok._tk.encode(text, add_special_tokens=False)
        return enc.ids, [a for a, _ in enc.offsets]


def _index_of(starts: list[int], pos: int) -> int:
    """The index of the token starting at character `pos` (starts ascending), or -1."""
    i = bisect.bisect_left(starts, pos)
    return i if i < len(starts) and starts[i] == pos else -1


def prefix_encoder(tok):
    """A PrefixEncoder over `tok` when it is this module's Tokenizer, else `tok` itself (its own encode)."""
    return PrefixEncoder(tok) if isinstance(tok, Tokenizer) else tok

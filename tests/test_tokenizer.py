"""Tests for sgl_jax.models.tokenizer (GGUF / HF-dir tokenizers, detokenization, chat templates).

Reference data: tests/reference/tokenizer_smollm2.json, written by
tools/make_tokenizer_reference.py with transformers (GGUF loader) and sentencepiece.
"""

from __future__ import annotations

import json
import os
import random
import re

import gguf
import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from sgl_jax.models.tokenizer import (
    IncrementalDetokenizer,
    Tokenizer,
    bytes_to_unicode,
    tiny_byte_tokenizer,
    tiny_byte_tokenizer_metadata,
)

REF_PATH = os.path.join(os.path.dirname(__file__), "reference", "tokenizer_smollm2.json")
with open(REF_PATH, encoding="utf-8") as _f:
    REF = json.load(_f)
SMOL_CASES = REF["smollm2"]["cases"]
SPM_REF = REF["spm_tiny"]

# Random multilingual text for round-trip / streaming tests.
_ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|")
    + [" ", " ", " ", "  ", "\n", "\n\n", "\t", "\r\n"]
    + list("éèàüößçñøåæÅ")
    + list("你好世界中文字符测试")
    + list("こんにちはカタカナ")
    + list("안녕하세요")
    + list("Приветмир")
    + list("مرحبا")
    + list("नमस्ते")
    + ["👋", "👋🏽", "🎉", "❤️", "🇫🇷", "👨‍👩‍👧", "∑", "≤", "∞", "½", "²", "\u200b", "\u0301"]
)


def _random_texts(seed: int, n: int, max_len: int = 40) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


@pytest.fixture(scope="module")
def smol(smollm2_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf)


# ------------------------------------------------------------------------------------------
# SmolLM2 GGUF vs the transformers reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SMOL_CASES, ids=[f"{i}:{c['text'][:20]!r}" for i, c in enumerate(SMOL_CASES)])
def test_smollm2_encode_decode_matches_reference(smol, case):
    text = case["text"]
    # transformers' GGUF loader ignores tokenizer.ggml.pre == "smollm" (SmolLM2 splits off every
    # digit first); where that changes the result the generator recorded the SmolLM2-rule ids.
    expected = case.get("ids_smollm_pre", case["ids"])
    assert smol.encode(text, add_special_tokens=False) == expected
    assert smol.encode(text) == expected  # the GGUF says add_bos_token = false
    if "ids_smollm_pre" not in case:
        assert smol.encode(text) == case["ids_with_special"]
    assert smol.decode(case["ids"]) == case["decoded"]
    assert smol.decode(case["ids"], skip_special_tokens=False) == case["decoded_with_special"]
    assert smol.decode(expected, skip_special_tokens=False) == text
    assert [smol.id_to_token(i) for i in case["ids"]] == case["tokens"]


def test_smollm2_digit_split_rule(smol):
    # SmolLM2's tokenizer.json: [Digits(individual_digits=True), ByteLevel]; llama.cpp: \p{N} first.
    ids = smol.encode("a  12")
    assert [smol.id_to_token(i) for i in ids] == ["a", "ĠĠ", "1", "2"]


def test_smollm2_metadata(smol):
    ref = REF["smollm2"]
    assert smol.vocab_size == ref["vocab_size"] == 49152
    assert len(smol) == 49152
    assert smol.bos_token_id == ref["bos_token_id"] == 1
    assert smol.eos_token_id == ref["eos_token_id"] == 2
    assert smol.pad_token_id == ref["pad_token_id"]
    assert smol.unk_token_id == 0
    assert smol.add_bos is False
    assert smol.bos_token == "<|im_start|>"
    assert smol.eos_token == "<|im_end|>"
    assert smol.special_token_ids == frozenset(range(17))  # all 17 control tokens
    assert set(ref["special_ids"]) <= smol.special_token_ids
    assert smol.stop_token_ids == frozenset({0, 2})  # <|im_end|> (eos) + <|endoftext|>
    assert isinstance(smol.stop_token_ids, frozenset)
    assert smol.token_to_id("<|im_end|>") == 2


@pytest.mark.parametrize("chat", REF["smollm2"]["chat"], ids=lambda c: f"{len(c['messages'])}msgs")
def test_smollm2_chat_template_matches_reference(smol, chat):
    rendered = smol.apply_chat_template(chat["messages"], add_generation_prompt=chat["add_generation_prompt"])
    assert rendered == chat["rendered"]
    assert smol.encode(rendered, add_special_tokens=False) == chat["ids"]


def test_smollm2_special_tokens_are_atomic(smol):
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smol.decode(ids) == "user\nhi"
    # a partial special token is plain text
    ids = smol.encode("<|im_start")
    assert 1 not in ids
    assert smol.decode(ids) == "<|im_start"


def test_smollm2_token_bytes(smol):
    table = smol.token_bytes_list()
    assert table is smol.token_bytes_list()  # cached
    assert len(table) == smol.vocab_size
    assert [i for i, b in enumerate(table) if b is None] == sorted(smol.special_token_ids)
    assert smol.token_bytes(0) == b""
    assert smol.token_bytes(smol.token_to_id("Ġworld")) == b" world"
    assert smol.token_bytes(smol.token_to_id("Ċ")) == b"\n"
    # byte-level vocab: single-byte tokens for ASCII and the UTF-8 bytes used by common text
    # (SmolLM2 has 235 of the 256; it lacks e.g. 0xC0/0xC1/0xF5+, never valid in UTF-8)
    single = {b[0] for b in table if b is not None and len(b) == 1}
    assert {9, 10, 13, *range(0x20, 0x7F), *range(0x80, 0xC0), *range(0xC2, 0xF1)} <= single
    # the GPT-2 alphabet is a bijection over the 256 bytes
    alphabet = bytes_to_unicode()
    assert len(set(alphabet.values())) == 256
    for case in SMOL_CASES:
        ids = case.get("ids_smollm_pre", case["ids"])
        joined = b"".join(smol.token_bytes(i) for i in ids)
        assert joined == smol.decode(ids).encode("utf-8")
    with pytest.raises(IndexError):
        smol.token_bytes(smol.vocab_size)
    with pytest.raises(IndexError):
        smol.decode([-1])


def test_smollm2_random_roundtrip(smol):
    texts = _random_texts(seed=0, n=150)
    batch = smol.encode_batch(texts)
    for text, ids in zip(texts, batch):
        assert smol.encode(text) == ids
        assert smol.decode(ids) == text


# ------------------------------------------------------------------------------------------
# Incremental detokenization
# ------------------------------------------------------------------------------------------


def test_incremental_one_at_a_time_matches_decode(smol):
    saw_held_back = False
    for text in _random_texts(seed=1, n=120):
        ids = smol.encode(text)
        detok = IncrementalDetokenizer(smol)
        pieces = []
        for i in ids:
            out = detok.feed(i)
            assert "\ufffd" not in out  # never half a character
            pieces.append(out)
            if detok.pending_bytes:
                saw_held_back = True
                so_far = b"".join(smol.token_bytes(j) for j in detok.token_ids)
                assert detok.text.encode() + detok.pending_bytes == so_far
        assert detok.finish() == ""
        assert "".join(pieces) == detok.text == smol.decode(ids) == text
        assert detok.token_ids == ids
    assert saw_held_back  # multi-token characters were exercised


def test_incremental_random_chunks_and_specials(smol):
    rng = random.Random(2)
    for text in _random_texts(seed=3, n=60):
        text = f"<|im_start|>user\n{text}<|im_end|>"
        ids = smol.encode(text)
        for skip in (True, False):
            detok = smol.detokenizer(skip_special_tokens=skip)
            pos, out = 0, []
            while pos < len(ids):
                k = rng.randint(1, 4)
                out.append(detok.feed(ids[pos : pos + k]))
                pos += k
            out.append(detok.finish())
            assert "".join(out) == detok.text == smol.decode(ids, skip_special_tokens=skip)
        assert detok.text == text


def test_incremental_holds_back_partial_character(smol):
    ids = smol.encode(" 👋")
    assert len(ids) >= 2  # the emoji's bytes span several tokens
    detok = IncrementalDetokenizer(smol)
    assert detok.feed(ids[0]) == " "
    assert detok.pending_bytes != b""
    rest = "".join(detok.feed(i) for i in ids[1:])
    assert rest == "👋" and detok.pending_bytes == b""
    # cut off mid-character: finish() flushes what decode() would show
    detok = IncrementalDetokenizer(smol)
    assert detok.feed(ids[:-1]) == " "
    assert detok.finish() == "\ufffd"
    assert detok.text == smol.decode(ids[:-1])


# ------------------------------------------------------------------------------------------
# tiny byte tokenizer
# ------------------------------------------------------------------------------------------


def test_tiny_byte_tokenizer():
    tok = tiny_byte_tokenizer()
    again = tiny_byte_tokenizer()
    assert tok.vocab_size == 300
    assert [tok.id_to_token(i) for i in range(300)] == [again.id_to_token(i) for i in range(300)]
    assert tok.bos_token_id == 298 and tok.id_to_token(298) == "<|bos|>"
    assert tok.eos_token_id == 299 and tok.id_to_token(299) == "<|eos|>"
    assert tok.stop_token_ids == frozenset({299})
    assert tok.special_token_ids == frozenset({298, 299})
    assert all(tok.token_bytes(b) == bytes([b]) for b in range(256))
    ids = tok.encode("hello the world and")
    assert ids == again.encode("hello the world and")
    assert ids[0] == 298
    assert [tok.id_to_token(i) for i in ids[1:]] == ["hello", "Ġthe", "Ġworld", "Ġand"]
    assert tok.encode("hi", add_special_tokens=False) == [ord("h"), ord("i")]
    assert tok.encode("a<|eos|>b", add_special_tokens=False) == [ord("a"), 299, ord("b")]
    for text in _random_texts(seed=4, n=50):
        ids = tok.encode(text)
        assert max(ids) < 300
        assert tok.decode(ids) == text
        detok = IncrementalDetokenizer(tok)
        assert "".join(detok.feed(i) for i in ids) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|bos|>user\nhi<|eos|>\n<|bos|>assistant\n"
    meta = tiny_byte_tokenizer_metadata()
    assert len(meta["tokenizer.ggml.tokens"]) == 300


# ------------------------------------------------------------------------------------------
# SentencePiece-style ("llama") GGUF vocabularies
# ------------------------------------------------------------------------------------------

_SPM_PIECES = [
    "▁", "e", "h", "l", "o", "w", "r", "d", "a", "b", "n", "t", "s",
    "▁h", "he", "ll", "lo", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "ld", "▁world",
    "an", "na", "ban", "ana", "▁b", "▁ban", "▁banana", "▁▁", "▁▁▁▁", "▁t", "th", "▁th", "the", "▁the",
    "st", "▁s", "▁st", "es", "est", "▁test",
]  # fmt: skip


def _spm_vocab():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(_SPM_PIECES) + ["<|tool|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(_SPM_PIECES) + [4]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(_SPM_PIECES))] + [0.0]
    return tokens, scores, types


def _write_gguf(path, **kv):
    w = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in kv.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    tokens, scores, types = _spm_vocab()
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    return _write_gguf(
        path,
        tokenizer_model="llama",
        token_list=tokens,
        token_scores=scores,
        token_types=types,
        bos_token_id=1,
        eos_token_id=2,
        unk_token_id=0,
        chat_template=(
            "{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
        ),
    )


def _spm_reference_encode(text, tokens, scores, types, add_space_prefix=True):
    """llama.cpp / SentencePiece BPE: merge the best-scoring adjacent pair (leftmost on ties)."""
    if not text:
        return []
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
    s = ("▁" if add_space_prefix else "") + text.replace(" ", "▁")
    syms = list(s)
    while True:
        best = None
        for i in range(len(syms) - 1):
            cat = syms[i] + syms[i + 1]
            if cat in normal and (best is None or scores[normal[cat]] > best[0]):
                best = (scores[normal[cat]], i)
        if best is None:
            break
        i = best[1]
        syms[i : i + 2] = [syms[i] + syms[i + 1]]
    ids = []
    byte_id = {t: i for i, t in enumerate(tokens) if re.fullmatch(r"<0x[0-9A-F]{2}>", t)}
    for sym in syms:
        if sym in normal:
            ids.append(normal[sym])
        else:
            ids.extend(byte_id[f"<0x{b:02X}>"] for b in sym.encode("utf-8"))
    return ids


def test_spm_gguf_encode_decode(spm_gguf):
    tok = Tokenizer.from_gguf(spm_gguf)
    tokens, scores, types = _spm_vocab()
    tid = {t: i for i, t in enumerate(tokens)}
    assert tok.vocab_size == len(tokens)
    assert tok.add_bos is True  # llama-type default when the file has no add_bos_token
    assert tok.encode("hello") == [1, tid["▁hello"]]
    assert tok.encode("hello world", add_special_tokens=False) == [tid["▁hello"], tid["▁world"]]
    assert tok.decode(tok.encode("hello world")) == "hello world"
    # byte fallback for characters outside the vocabulary
    ids = tok.encode("héllo", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids] == ["▁h", "<0xC3>", "<0xA9>", "llo"]
    assert tok.decode(ids) == "héllo"
    assert tok.token_bytes(tid["<0xC3>"]) == b"\xc3"
    assert tok.token_bytes(tid["▁hello"]) == b" hello"
    assert tok.token_bytes_list()[1] is None and tok.token_bytes(1) == b""
    # control tokens are atomic; text after a special token gets the space prefix (llama.cpp rule)
    assert tok.encode("<s>hello</s>", add_special_tokens=False) == [1, tid["▁hello"], 2]
    assert tok.decode([1, tid["▁hello"], 2], skip_special_tokens=False) == "<s> hello</s>"
    # user-defined tokens are atomic and decode as their text
    ids = tok.encode("test<|tool|>the", add_special_tokens=False)
    assert ids == [tid["▁test"], tid["<|tool|>"], tid["▁the"]]
    assert tok.decode(ids) == "test<|tool|> the"
    assert tok.special_token_ids == frozenset({0, 1, 2})
    assert tok.stop_token_ids == frozenset({2})
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>[user] hi</s>"


def test_spm_gguf_matches_reference_algorithm(spm_gguf):
    tok = Tokenizer.from_gguf(spm_gguf)
    tokens, scores, types = _spm_vocab()
    rng = random.Random(5)
    alphabet = list("ehlowrdabnts") + [" ", " ", "  ", "é", "你", "👋", "\n", "x"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    texts += ["hello world", "banana bandana", "  the test  ", "the", "   "]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == _spm_reference_encode(text, tokens, scores, types), text
        assert tok.decode(ids) == text
        detok = IncrementalDetokenizer(tok)
        assert "".join(detok.feed(i) for i in ids) + detok.finish() == text


def test_spm_matches_sentencepiece_reference():
    """A SentencePiece BPE model (trained by the generator with the sentencepiece library)."""
    fields = {
        "__source__": "spm_tiny reference",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": SPM_REF["pieces"],
        "tokenizer.ggml.scores": SPM_REF["scores"],
        "tokenizer.ggml.token_type": SPM_REF["types"],
        "tokenizer.ggml.unknown_token_id": SPM_REF["unk_id"],
        "tokenizer.ggml.bos_token_id": SPM_REF["bos_id"],
        "tokenizer.ggml.eos_token_id": SPM_REF["eos_id"],
        "tokenizer.ggml.add_bos_token": True,
    }
    tok = Tokenizer.from_gguf(fields)
    for case in SPM_REF["cases"]:
        assert tok.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"]
        assert [tok.id_to_token(i) for i in case["ids"]] == case["pieces"]
        assert tok.decode(case["ids"]) == case["decoded"]
        assert tok.encode(case["text"]) == [SPM_REF["bos_id"], *case["ids"]]


def test_spm_without_space_prefix(tmp_path):
    tokens, scores, types = _spm_vocab()
    path = _write_gguf(
        tmp_path / "nospace.gguf",
        tokenizer_model="llama",
        token_list=tokens,
        token_scores=scores,
        token_types=types,
        bos_token_id=1,
        eos_token_id=2,
        add_space_prefix=False,
        add_bos_token=False,
    )
    tok = Tokenizer.from_gguf(path)
    tid = {t: i for i, t in enumerate(tokens)}
    assert tok.add_bos is False
    assert tok.encode("hello world") == [tid["he"], tid["llo"], tid["▁world"]]
    assert tok.decode(tok.encode(" hello")) == " hello"


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_missing_metadata_errors(tmp_path):
    path = _write_gguf(tmp_path / "notokens.gguf", tokenizer_model="gpt2")
    with pytest.raises(ValueError, match=r"notokens\.gguf.*tokenizer\.ggml\.tokens"):
        Tokenizer.from_gguf(path)
    path = _write_gguf(tmp_path / "nomodel.gguf", token_list=["a", "b"])
    with pytest.raises(ValueError, match=r"nomodel\.gguf.*tokenizer\.ggml\.model"):
        Tokenizer.from_gguf(path)
    meta = tiny_byte_tokenizer_metadata()
    del meta["tokenizer.ggml.merges"]
    meta["__source__"] = "/some/model.gguf"
    with pytest.raises(ValueError, match=r"/some/model\.gguf.*tokenizer\.ggml\.merges"):
        Tokenizer.from_gguf(meta)
    tokens, scores, types = _spm_vocab()
    path = _write_gguf(tmp_path / "noscores.gguf", tokenizer_model="llama", token_list=tokens, token_types=types)
    with pytest.raises(ValueError, match=r"noscores\.gguf.*tokenizer\.ggml\.scores"):
        Tokenizer.from_gguf(path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_gguf(tmp_path / "absent.gguf")


def test_unsupported_types_errors():
    meta = tiny_byte_tokenizer_metadata()
    meta["tokenizer.ggml.pre"] = "made-up-pre"
    meta["__source__"] = "/models/x.gguf"
    with pytest.raises(ValueError, match=r"/models/x\.gguf.*'made-up-pre'"):
        Tokenizer.from_gguf(meta)
    meta["tokenizer.ggml.pre"] = "default"
    meta["tokenizer.ggml.model"] = "rwkv"
    with pytest.raises(ValueError, match=r"/models/x\.gguf.*'rwkv'"):
        Tokenizer.from_gguf(meta)


@pytest.mark.parametrize("pre", ["default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2"])
def test_supported_pre_tokenizers_roundtrip(pre):
    meta = tiny_byte_tokenizer_metadata()
    meta["tokenizer.ggml.pre"] = pre
    tok = Tokenizer.from_gguf(meta)
    for text in _random_texts(seed=6, n=20):
        # qwen2 normalizes to NFC first, so compare against the NFC form
        import unicodedata

        want = unicodedata.normalize("NFC", text) if pre == "qwen2" else text
        assert tok.decode(tok.encode(text)) == want
    pieces = lambda s: [tok.id_to_token(i) for i in tok.encode(s, add_special_tokens=False)]  # noqa: E731
    if pre in ("llama-bpe", "llama3"):
        assert tok.add_bos is True  # metadata says so (tiny metadata sets add_bos_token)
    if pre == "smollm":
        assert pieces("12") == ["1", "2"]


def test_chat_template_errors_and_sandbox(smol):
    meta = tiny_byte_tokenizer_metadata()
    del meta["tokenizer.chat_template"]
    tok = Tokenizer.from_gguf(meta)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])

    from jinja2.exceptions import SecurityError, TemplateError

    meta = tiny_byte_tokenizer_metadata()
    meta["tokenizer.chat_template"] = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
        "{{ bos_token }}{{ messages | tojson }}{% if tools %}|{{ tools | tojson(indent=2) }}{% endif %}{{ eos_token }}"
    )
    tok = Tokenizer.from_gguf(meta)
    msgs = [{"role": "user", "content": "héllo <b>"}]
    assert tok.apply_chat_template(msgs) == '<|bos|>[{"role": "user", "content": "héllo <b>"}]<|eos|>'
    tools = [{"name": "f"}]
    assert tok.apply_chat_template(msgs, tools=tools).endswith('|[\n  {\n    "name": "f"\n  }\n]<|eos|>')
    with pytest.raises(TemplateError, match="first message must be from the user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    meta["tokenizer.chat_template"] = "{{ messages.append(1) }}"
    with pytest.raises(SecurityError):
        Tokenizer.from_gguf(meta).apply_chat_template(msgs)


# ------------------------------------------------------------------------------------------
# from_hf_dir
# ------------------------------------------------------------------------------------------


def _byte_level_hf_tokenizer() -> tokenizers.Tokenizer:
    meta = tiny_byte_tokenizer_metadata()
    tokens = meta["tokenizer.ggml.tokens"][:-2]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(
        [AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    )
    tk.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    return tk


def test_from_hf_dir_byte_level(tmp_path):
    tk = _byte_level_hf_tokenizer()
    tk.save(str(tmp_path / "tokenizer.json"))
    eot, ims, ime, think = 298, 299, 300, 301
    assert tk.token_to_id("<|endoftext|>") == eot and tk.token_to_id("<think>") == think
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": template + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "add_bos_token": False,
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [ime, eot]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.vocab_size == 302
    assert tok.eos_token_id == ime and tok.pad_token_id == eot and tok.bos_token_id is None
    assert tok.stop_token_ids == frozenset({ime, eot})
    assert tok.special_token_ids == frozenset({eot, ims, ime})
    text = "<|im_start|>user\nhello the world 👋<think>é<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == ims and ids[-1] == ime and think in ids
    assert ids == tk.encode(text).ids
    assert tok.decode(ids) == "user\nhello the world 👋<think>é"
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.token_bytes(think) == b"<think>"
    assert tok.token_bytes(ord(" ")) == b" "
    assert tok.token_bytes_list()[ims] is None
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(detok.feed(i) for i in ids) == text


def test_from_hf_dir_post_processor_bos(tmp_path):
    tk = _byte_level_hf_tokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", 298)]
    )
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    tok = Tokenizer.from_hf_dir(tmp_path)  # no tokenizer_config.json at all
    assert tok.add_bos is True and tok.bos_token_id == 298
    assert tok.encode("hi") == [298, ord("h"), ord("i")]
    assert tok.encode("hi", add_special_tokens=False) == [ord("h"), ord("i")]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|endoftext|>x"


def test_from_hf_dir_sentencepiece(tmp_path, spm_gguf):
    gg = Tokenizer.from_gguf(spm_gguf)
    gg.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"add_bos_token": True, "bos_token": {"content": "<s>"}, "eos_token": "</s>", "unk_token": "<unk>"}
        )
    )
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.unk_token_id == 0
    for text in ["hello world", "héllo  the test", " leading", "a\nb 👋"]:
        ids = tok.encode(text)
        assert ids == gg.encode(text)
        assert tok.decode(ids) == gg.decode(ids) == text
    assert tok.token_bytes_list() == gg.token_bytes_list()


def test_from_hf_dir_metaspace(tmp_path):
    """Modern HF SentencePiece layout: Metaspace pre-tokenizer, byte-fallback BPE, Metaspace decoder."""
    tokens, scores, types = _spm_vocab()
    gg_merges = Tokenizer.from_gguf(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types,
        }
    )
    merges = json.loads(gg_merges.backend.to_str())["model"]["merges"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], unk_token="<unk>", byte_fallback=True)
    )
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.add_bos is False  # no tokenizer_config, no post-processor
    # (no leading-space texts: HF's Metaspace "first" scheme neither prefixes text that already
    # starts with a space nor decodes a first token of only "▁"s losslessly)
    for text in ["hello world", "héllo the test", "two  spaces ", "a\nb 👋", "x"]:
        ids = tok.encode(text)
        assert ids == tk.encode(text).ids
        assert tok.decode(ids) == tk.decode(ids) == text
        detok = IncrementalDetokenizer(tok)
        assert "".join(detok.feed(i) for i in ids) == text
    assert tok.token_bytes(vocab["<0xC3>"]) == b"\xc3"
    assert tok.token_bytes(vocab["▁hello"]) == b" hello"


def test_from_gguf_reader_and_mapping(smollm2_gguf, smol):
    reader = gguf.GGUFReader(smollm2_gguf)
    tok = Tokenizer.from_gguf(reader)
    assert tok.source == smollm2_gguf
    assert tok.encode("Hello world") == smol.encode("Hello world")
    tok = Tokenizer.from_gguf(dict(reader.fields))  # a mapping of ReaderFields
    assert tok.encode("<|im_start|>hi 12") == smol.encode("<|im_start|>hi 12")
    with pytest.raises(TypeError):
        Tokenizer.from_gguf(42)


def test_from_hf_dir_missing_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + r".*tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_no_torch_or_jax_imported():
    import subprocess
    import sys

    import sgl_jax.models.tokenizer as mod

    source = open(mod.__file__, encoding="utf-8").read()
    assert not re.search(r"^\s*(import|from)\s+(jax|torch|transformers)\b", source, re.M)
    code = (
        "import sys; import sgl_jax.models.tokenizer as t; t.tiny_byte_tokenizer();"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------
# PrefixEncoder: texts sharing prefixes tokenized past a cut, the same ids as whole encodes
# ------------------------------------------------------------------------------------------
def _prefix_cases(seed: int) -> list[list[str]]:
    """Groups of texts as programs send them: a prompt, then the prompt + each of a few choices; prompts that share
    a long prefix and differ after it; continuations that merge with the prompt's last word ("hel" + "lo"), start
    with spaces, digits, punctuation, newlines or special-token text, and prompts ending in whitespace."""
    rng = random.Random(seed)
    words = ["the", "man", "is", "sitting", "on", "a", "roof.", "He", "hello", "world", "2024", "x=3;", "naïve",
             "Привет", "日本語", "👋", "it's", "<|im_start|>", "\n", "\n\n", "  ", "...", "(ok)", "e.g.", "abc123"]
    shared = " ".join(rng.choice(words) for _ in range(120))
    groups = []
    for _ in range(12):
        prompt = shared + " " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
        prompt += rng.choice(["", " ", "\n", " hel", ":", " 12"])
        conts = [rng.choice(["", " ", "lo", "lo world", " is using wrap.", "\nAnswer:", "3 apples", " ",
                             "<|im_end|>", " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))])
                 for _ in range(4)]
        groups.append([prompt] + [prompt + c for c in conts])
    return groups


def _check_prefix_encoder(tok, groups):
    from sgl_jax.models.tokenizer import PrefixEncoder

    enc = PrefixEncoder(tok)
    for group in groups:
        for text in group:
            for special in (False, True):
                assert enc.encode(text, add_special_tokens=special) == tok.encode(text, add_special_tokens=special), \
                    repr(text[-60:])


def test_prefix_encoder_matches_whole_encodes_smollm2(smol):
    _check_prefix_encoder(smol, _prefix_cases(1) + _prefix_cases(2))


def test_prefix_encoder_matches_whole_encodes_spm(spm_gguf):
    """SentencePiece: the normalizer's space prefix makes a cut's tail tokenize differently alone, which the
    encoder checks, so texts are tokenized whole there -- still the same ids."""
    _check_prefix_encoder(Tokenizer.from_gguf(spm_gguf), _prefix_cases(3))


def test_prefix_encoder_splices(smol):
    """It does tokenize only past a cut: the kept text's ids before the cut are reused (a spy on the backend sees
    only the short tails after the first text), and a text that shares nothing is tokenized whole."""
    from sgl_jax.models.tokenizer import PrefixEncoder

    enc = PrefixEncoder(smol)
    seen = []
    real = smol._tk

    class Spy:
        def encode(self, text, add_special_tokens=False):
            seen.append(len(text))
            return real.encode(text, add_special_tokens=add_special_tokens)

    prompt = "The man is sitting on a roof. He " * 40 + "is using"
    enc.encode(prompt)
    for c in (" wrap to wrap a pair of skis.", " a ladder.", "\n"):
        seen.clear()
        smol._tk = Spy()
        try:
            got = enc.encode(prompt + c)
        finally:
            smol._tk = real
        assert seen and max(seen) < 64, seen  # the tails only: the kept text's and the new text's
        assert got == smol.encode(prompt + c)
    other = "Entirely different text, no shared prefix."
    seen.clear()
    smol._tk = Spy()
    try:
        enc.encode(other)
    finally:
        smol._tk = real
    assert seen == [len(other)]


def test_common_prefix_matches_the_naive_one():
    """The blocked, bisected common prefix against os.path.commonprefix, around the block size and at the ends."""
    from sgl_jax.models.tokenizer import _common_prefix

    rng = random.Random(7)
    for _ in range(2000):
        n = rng.choice([0, 1, 5, 100, 4095, 4096, 4097, 9000])
        a = "".join(rng.choice("ab") for _ in range(n))
        k = rng.randint(0, n)
        b = a[:k] + ("" if rng.random() < 0.2 else "c" + a[k:k + rng.randint(0, 50)])
        if rng.random() < 0.5:
            a, b = b, a
        assert _common_prefix(a, b) == len(os.path.commonprefix([a, b])), (n, k)

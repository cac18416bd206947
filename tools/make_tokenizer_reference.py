"""Write tests/reference/tokenizer_smollm2.json: tokenizer reference data from independent code.

Run with the reference venv (torch + transformers + sentencepiece), never from the test suite:

    /work/refvenv/bin/python tools/make_tokenizer_reference.py [--gguf /tmp/smollm2.gguf]

Two parts:

1. ``smollm2``: SmolLM2-135M-Instruct's tokenizer loaded by transformers from the GGUF
   (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``): ids, decoded text and chat
   template renderings for a set of strings.

   transformers' GGUF loader ignores ``tokenizer.ggml.pre == "smollm"`` and splits text with
   the plain GPT-2 rule, while SmolLM2's own tokenizer.json (and llama.cpp) first split off
   every digit ([Digits(individual_digits=True), ByteLevel]).  With this vocabulary (no token
   contains a digit next to anything else) the two agree except where a run of whitespace
   precedes a digit.  For those strings we also record ``ids_smollm_pre``: the same
   transformers tokenizer with its pre-tokenizer set to SmolLM2's published one.

2. ``spm_tiny``: a SentencePiece BPE model trained here with the ``sentencepiece`` library
   (byte fallback, identity normalization, dummy prefix, llama-style settings): its pieces,
   scores and types, plus ``sp.encode`` / ``sp.decode`` results.  The tests write those pieces
   into a GGUF ("llama" tokenizer) and check that our rebuild encodes exactly like
   sentencepiece.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile

SMOLLM2_STRINGS = [
    "Hello world",
    "Hello, world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, but we've seen what you'd do.",
    "12345 3.14159",
    "Call 555-0199 before 2024-12-31, or pay $1,000.50 (10% off).",
    "x=1+2*3/4-5",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    'import json\nprint(json.dumps({"k": [1, 2, 3]}, indent=2))',
    "   leading spaces",
    " one leading space",
    "trailing spaces   ",
    "multiple     spaces    inside",
    "line one\nline two\n\nline four",
    "\n\n\n",
    "tabs\tand\t\ttabs",
    "\t\tindented with tabs",
    "mixed \t \n whitespace \r\n here",
    "café naïve résumé façade Ångström",
    "Straße, Größe, Fußgänger",
    "你好，世界！今天天气很好。",
    "こんにちは、世界。カタカナとひらがな",
    "안녕하세요 세계",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Emoji: 👋🏽 🎉🎉 ❤️ 🇫🇷 👨‍👩‍👧‍👦",
    "math: ∑ x² ≤ ∞, ½ + ¾ = 1¼, π≈3.14",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "text before <|endoftext|> text after",
    "<|im_start partial special token",
    "<repo_name>sgl_jax<file_sep>tokenizer.py",
    "URL: https://example.com/path?q=a&b=c#frag",
    "email: someone@example.org",
    "ALL CAPS TEXT AND lowercase text",
    "snake_case camelCase PascalCase kebab-case",
    "\"quoted\" 'single' `backtick` «guillemets»",
    "",
    " ",
    "a",
    # whitespace runs before digits: where transformers' GGUF pre-tokenizer differs from SmolLM2's
    "Total:  42 items",
    "   7 apples\n  8 pears",
]

CHAT_CASES = [
    {"messages": [{"role": "user", "content": "Hi! What is 2+2?"}], "add_generation_prompt": True},
    {
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one, please 🙏"},
        ],
        "add_generation_prompt": True,
    },
    {"messages": [{"role": "user", "content": "No generation prompt here."}], "add_generation_prompt": False},
]

SPM_TEST_STRINGS = [
    "hello world",
    "the cat sat on the mat",
    "Hello World",
    "  two leading spaces",
    "trailing space ",
    "many    spaces   between",
    "newline\nin the middle",
    "tab\tcharacter",
    "unseen letters: café, Straße, 你好, 👋",
    "numbers 12345 and 3.14",
    "x",
    "",
    " ",
    "mississippi banana bandana",
    "the theory of the thermal threshold",
]


def _smollm2(gguf_path: str) -> dict:
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        name = os.path.basename(gguf_path)
        os.symlink(os.path.abspath(gguf_path), os.path.join(tmp, name))
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
        # Same tokenizer with SmolLM2's published pre-tokenizer (tokenizer.json of the HF repo).
        smollm_tok = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
    smollm_tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )

    cases = []
    for text in SMOLLM2_STRINGS:
        ids = tok.encode(text, add_special_tokens=False)
        case = {
            "text": text,
            "ids": ids,
            "ids_with_special": tok.encode(text, add_special_tokens=True),
            "tokens": tok.convert_ids_to_tokens(ids),
            "decoded": tok.decode(ids, skip_special_tokens=True),
            "decoded_with_special": tok.decode(ids, skip_special_tokens=False),
        }
        alt = smollm_tok.encode(text, add_special_tokens=False)
        if alt != ids:
            case["ids_smollm_pre"] = alt
        cases.append(case)

    chats = []
    for c in CHAT_CASES:
        rendered = tok.apply_chat_template(
            c["messages"], tokenize=False, add_generation_prompt=c["add_generation_prompt"]
        )
        chats.append({**c, "rendered": rendered, "ids": tok.encode(rendered, add_special_tokens=False)})

    return {
        "source": f"transformers {transformers.__version__} AutoTokenizer.from_pretrained(gguf_file=...)",
        "gguf": os.path.basename(gguf_path),
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "special_ids": sorted(tok.all_special_ids),
        "cases": cases,
        "chat": chats,
    }


def _spm_tiny() -> dict:
    import sentencepiece as spm

    rng = random.Random(1234)
    words = (
        "the cat sat on mat hello world this is a test of the tokenizer with some words that repeat "
        "theory thermal threshold there their then than banana bandana mississippi number numbers "
        "and or but not space spaces between newline middle tab character leading trailing two many "
        "Hello World The A In On"
    ).split()
    lines = []
    for _ in range(3000):
        n = rng.randint(3, 12)
        seps = [" ", " ", " ", "  ", "    "]
        line = words[rng.randrange(len(words))]
        for _ in range(n):
            line += rng.choice(seps) + words[rng.randrange(len(words))]
        if rng.random() < 0.3:
            line += " " + str(rng.randint(0, 99999))
        lines.append(line)

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=520,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_unused(i):
            types.append(5)
        elif sp.is_byte(i):
            types.append(6)
        else:
            types.append(1)
    cases = []
    for text in SPM_TEST_STRINGS:
        ids = sp.encode(text)
        cases.append(
            {"text": text, "ids": ids, "pieces": [sp.id_to_piece(i) for i in ids], "decoded": sp.decode(ids)}
        )
    return {
        "source": f"sentencepiece {spm.__version__} BPE trained by tools/make_tokenizer_reference.py",
        "pieces": pieces,
        "scores": scores,
        "types": types,
        "unk_id": sp.unk_id(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "cases": cases,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default="/tmp/smollm2.gguf")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "reference", "tokenizer_smollm2.json"))
    args = ap.parse_args()
    data = {"smollm2": _smollm2(args.gguf), "spm_tiny": _spm_tiny()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")
    n_alt = sum("ids_smollm_pre" in c for c in data["smollm2"]["cases"])
    print(f"wrote {os.path.abspath(args.out)}: {len(data['smollm2']['cases'])} strings ({n_alt} with ids_smollm_pre), "
          f"{len(data['smollm2']['chat'])} chats, spm vocab {len(data['spm_tiny']['pieces'])}")


if __name__ == "__main__":
    main()

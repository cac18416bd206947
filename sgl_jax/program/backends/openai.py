"""`OpenAI(model, base_url=..., api_key=..., is_chat_model=...)`: programs on any OpenAI-compatible API.

Ours at `/v1` included. Plain HTTP (no `openai` package, no tiktoken download): token counts for API
speculation come from a tokenizer given as `tokenizer=` (an `sgl_jax` Tokenizer, or a path to a GGUF or a
Hugging Face directory), else from the server's `/tokenize` when it has one (ours does), else characters.

- Completion models send the state's text; chat models send its messages, and generate only inside an
  assistant turn (the API produces whole assistant messages).
- `select`: on completion models, each choice is scored from echoed prompt logprobs (one request for the
  prompt and all choices, the same two-token window and normalisation as the native backends); on chat
  models, by constrained generation (`regex` over the choices, an extension our server and SGLang's accept)
  when `supports_regex`, else by generating and taking the choice the answer starts with.
- SGLang sampling fields that OpenAI lacks (`top_k`, `min_p`, `regex`, `json_schema`, `ignore_eos`, ...) are
  sent only when set away from their defaults, so a strict API only sees them when a program asks for them.
Host code: no jax import.
"""

from __future__ import annotations

import json
import os
import re

import requests

from sgl_jax.program import ir
from sgl_jax.program.backends.base import Backend, Completion, Prompt
from sgl_jax.program.backends.http import BackendError, check_response
from sgl_jax.program.chat_template import DEFAULT, ChatTemplate, get_chat_template
from sgl_jax.program.choices import decide

_EXTRAS_DEFAULT = {"top_k": -1, "min_p": 0.0, "ignore_eos": False, "min_tokens": 0}


class OpenAI(Backend):
    def __init__(self, model_name: str, base_url: str = "https://api.openai.com/v1", api_key: str | None = None,
                 is_chat_model: bool = True, chat_template: str | ChatTemplate | None = None, tokenizer=None,
                 supports_regex: bool | None = None, timeout: float = 600.0):
        self.model_name, self.base_url, self.timeout = model_name, base_url.rstrip("/"), timeout
        self.is_chat_model = is_chat_model
        self.session = requests.Session()
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self._template = get_chat_template(chat_template) if isinstance(chat_template, str) else (
            chat_template or DEFAULT)
        self.supports_regex = ("api.openai.com" not in self.base_url) if supports_regex is None else supports_regex
        self._tokenizer = self._load_tokenizer(tokenizer)
        self._server_tokenize = True

    @staticmethod
    def _load_tokenizer(tok):
        if not isinstance(tok, (str, os.PathLike)):  # None or a tokenizer object (a str has .encode too)
            return tok
        from sgl_jax.models.tokenizer import Tokenizer

        return Tokenizer.from_path(tok)

    def get_chat_template(self) -> ChatTemplate:
        return self._template

    # ------------------------------------------------------------------------------- transport
    def _post(self, path: str, body: dict, stream: bool = False):
        r = self.session.post(self.base_url + path, json=body, timeout=self.timeout, stream=stream)
        check_response(r)
        return r if stream else r.json()

    def _body(self, prompt: Prompt, params: ir.SamplingDefaults) -> tuple[str, dict]:
        stop = [params.stop] if isinstance(params.stop, str) else list(params.stop)
        body = {"model": self.model_name, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "n": params.n, "frequency_penalty": params.frequency_penalty,
                "presence_penalty": params.presence_penalty}
        if stop:
            body["stop"] = stop
        extras = {"top_k": params.top_k, "min_p": params.min_p, "ignore_eos": params.ignore_eos,
                  "min_tokens": params.min_new_tokens}
        body.update({k: v for k, v in extras.items() if v != _EXTRAS_DEFAULT[k]})
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        if params.regex_for_request() is not None:
            body["regex"] = params.regex_for_request()
        if params.json_schema is not None:
            body["json_schema"] = params.json_schema
        if params.return_logprob:
            top = params.top_logprobs_num or 0
            if self.is_chat_model:
                body.update(logprobs=True, top_logprobs=top)
            else:
                body["logprobs"] = top
        if self.is_chat_model:
            if prompt.cur_role != "assistant":
                raise ir.ProgramError("OpenAI chat model: gen/select must be inside an assistant turn "
                                      "(s += sgl.assistant(sgl.gen(...)))")
            body["messages"] = prompt.messages
            return "/chat/completions", body
        body["prompt"] = prompt.text
        return "/completions", body

    @staticmethod
    def _logprobs(choice: dict) -> tuple[list, list]:
        """The choice's logprobs as native meta_info entries ([logprob, None, token text]; the API gives no
        ids): (output_token_logprobs, output_top_logprobs), from either API's shape."""
        lp = choice.get("logprobs") or {}
        if "content" in lp:  # chat
            items = lp["content"] or []
            return ([[x["logprob"], None, x["token"]] for x in items],
                    [[[t["logprob"], None, t["token"]] for t in x.get("top_logprobs") or []] for x in items])
        toks, lps = lp.get("tokens") or [], lp.get("token_logprobs") or []
        tops = lp.get("top_logprobs") or [None] * len(toks)
        return ([[v, None, t] for v, t in zip(lps, toks)],
                [[[v, None, t] for t, v in (d or {}).items()] for d in tops])

    @staticmethod
    def _text(choice: dict) -> str:
        return choice["message"]["content"] if "message" in choice else choice["text"]

    # ------------------------------------------------------------------------------- API
    def generate(self, prompt: Prompt, params) -> Completion:
        path, body = self._body(prompt, params)
        obj = self._post(path, body)
        texts = [self._text(c) for c in sorted(obj["choices"], key=lambda c: c["index"])]
        first = min(obj["choices"], key=lambda c: c["index"])
        meta = {"id": obj.get("id"), "finish_reason": first.get("finish_reason"), "usage": obj.get("usage"),
                "completion_tokens": (obj.get("usage") or {}).get("completion_tokens")}
        if params.return_logprob:
            meta["output_token_logprobs"], meta["output_top_logprobs"] = self._logprobs(first)
        return Completion(texts if params.n > 1 else texts[0], meta)

    def generate_stream(self, prompt: Prompt, params):
        path, body = self._body(prompt, params)
        body["stream"] = True
        meta: dict = {"output_token_logprobs": [], "output_top_logprobs": []} if params.return_logprob else {}
        with self._post(path, body, stream=True) as r:
            for line in r.iter_lines(decode_unicode=False):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                ev = json.loads(data)
                for c in ev.get("choices", []):
                    if c.get("index", 0) != 0:
                        continue
                    delta = c["delta"].get("content") or "" if "delta" in c else c.get("text", "")
                    meta = dict(meta, id=ev.get("id"), finish_reason=c.get("finish_reason"))
                    if params.return_logprob:
                        toks, tops = self._logprobs(c)
                        meta["output_token_logprobs"] = meta["output_token_logprobs"] + toks
                        meta["output_top_logprobs"] = meta["output_top_logprobs"] + tops
                    yield delta, meta
        return None

    def truncate(self, text: str, max_tokens: int) -> str:
        tok = self._tokenizer
        if tok is not None:
            ids = tok.encode(text, add_special_tokens=False)
            return text if len(ids) <= max_tokens else tok.decode(ids[:max_tokens])
        if self._server_tokenize:
            try:
                root = re.sub(r"/v1$", "", self.base_url)
                r = self.session.post(root + "/tokenize", json={"text": text, "add_special_tokens": False},
                                      timeout=self.timeout)
                if r.status_code == 200:
                    ids = r.json()["tokens"]
                    if len(ids) <= max_tokens:
                        return text
                    d = self.session.post(root + "/detokenize", json={"tokens": ids[:max_tokens]},
                                          timeout=self.timeout)
                    if d.status_code == 200:
                        return d.json()["text"]
            except (requests.RequestException, KeyError, ValueError):
                pass
            self._server_tokenize = False
        return text[:max_tokens]

    def select(self, prompt: Prompt, choices, temperature, method):
        if self.is_chat_model:
            return self._select_chat(prompt, choices), None
        obj = self._post("/completions", {"model": self.model_name, "prompt": [prompt.text] + [prompt.text + c for c in choices],
                                          "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0})
        lps = [c["logprobs"] for c in sorted(obj["choices"], key=lambda c: c["index"])]
        start = max(len(lps[0]["tokens"]) - 2, 0)
        windows = [[[lp, None, t] for lp, t in zip(x["token_logprobs"][start:], x["tokens"][start:])]
                   for x in lps[1:]]

        def unconditional(_token_lists):
            raise ValueError("unconditional_likelihood_normalized needs token ids, which the OpenAI API does not "
                             "return; use token_length_normalized or greedy_token_selection here")

        return decide(method, prompt.text, choices, windows, [[] for _ in choices], unconditional), None

    def _select_chat(self, prompt: Prompt, choices):
        from sgl_jax.program.choices import ChoicesDecision

        params = ir.SamplingDefaults(temperature=0.0, max_new_tokens=max(len(c) for c in choices) + 8)
        if self.supports_regex:
            params = params.merge({"regex": "(" + "|".join(re.escape(c) for c in choices) + ")"})
        text = self.generate(prompt, params).text
        for c in sorted(choices, key=len, reverse=True):
            if text.strip().startswith(c.strip()):
                return ChoicesDecision(c, {"generated": text})
        raise BackendError(f"select: the model answered {text!r}, which is none of the choices {list(choices)}")

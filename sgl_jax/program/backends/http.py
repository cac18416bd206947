"""`RuntimeEndpoint(url)`: programs against a server's native API -- ours, or upstream SGLang's.

Speaks the native protocol the way upstream's client does (../shared/reference/sglang-wire-protocol.md):
every call sends the whole text so far (prefix reuse is the server's radix cache), streaming reads
cumulative text, and `select` caches the prefix, then scores all choices in one batched request with
prompt logprobs from two tokens before the prompt's end. The chat template is the model's own when the
server publishes it in `/get_model_info` (ours does), else the named one passed as `chat_template=`,
else upstream's plain default. Host code: no jax import.
"""

from __future__ import annotations

import json

import requests

from sgl_jax.program.backends.base import Backend, Completion, Prompt
from sgl_jax.program.chat_template import DEFAULT, ChatTemplate, get_chat_template
from sgl_jax.program.choices import decide


class BackendError(RuntimeError):
    """The server answered a call with an error (its message is kept)."""


def check_response(r: requests.Response) -> None:
    """Raise BackendError with the server's own message unless the answer is 200 (both HTTP backends)."""
    if r.status_code != 200:
        try:
            msg = r.json().get("error", {}).get("message") or r.text
        except ValueError:
            msg = r.text
        raise BackendError(f"{r.request.method} {r.url} -> HTTP {r.status_code}: {msg}")


class RuntimeEndpoint(Backend):
    def __init__(self, base_url: str, api_key: str | None = None, chat_template: str | ChatTemplate | None = None,
                 timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.model_info = self._get("/get_model_info")
        if isinstance(chat_template, str):
            chat_template = get_chat_template(chat_template)
        if chat_template is None and self.model_info.get("chat_template"):
            chat_template = ChatTemplate.from_jinja(self.model_info["chat_template"],
                                                    bos_token=self.model_info.get("bos_token") or "",
                                                    eos_token=self.model_info.get("eos_token") or "")
        self._template = chat_template or DEFAULT

    # ------------------------------------------------------------------------------- transport
    def _get(self, path: str) -> dict:
        r = self.session.get(self.base_url + path, timeout=self.timeout)
        check_response(r)
        return r.json()

    def _post(self, body: dict | None, path: str = "/generate", stream: bool = False):
        r = self.session.post(self.base_url + path, json=body, timeout=self.timeout, stream=stream)
        check_response(r)
        return r if stream else r.json()

    # ------------------------------------------------------------------------------- API
    def get_chat_template(self) -> ChatTemplate:
        return self._template

    def flush_cache(self) -> bool:
        r = self.session.post(self.base_url + "/flush_cache", timeout=self.timeout)
        return r.status_code == 200

    def get_server_info(self) -> dict:
        return self._get("/server_info")

    def _body(self, prompt: Prompt, params) -> dict:
        sp, top = params.native()
        return {"text": prompt.text, "sampling_params": sp, **top}

    def generate(self, prompt: Prompt, params) -> Completion:
        obj = self._post(self._body(prompt, params))
        if isinstance(obj, list):
            return Completion([o["text"] for o in obj], [o["meta_info"] for o in obj])
        return Completion(obj["text"], obj["meta_info"])

    def generate_stream(self, prompt: Prompt, params):
        body = self._body(prompt, params)
        body["stream"] = True
        pos = 0
        with self._post(body, stream=True) as r:
            for line in r.iter_lines(decode_unicode=False):
                if not line or not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev:
                    raise BackendError(f"stream error: {ev['error']}")
                yield ev["text"][pos:], ev["meta_info"]
                pos = len(ev["text"])
        return None

    def prefill(self, prompt: Prompt, hold: bool = False):
        self._post({"text": prompt.text, "sampling_params": {"max_new_tokens": 0}})
        return None, None

    def select(self, prompt: Prompt, choices, temperature, method):
        obj = self._post({"text": prompt.text, "sampling_params": {"max_new_tokens": 0}})
        start = max(obj["meta_info"]["prompt_tokens"] - 2, 0)
        outs = self._post({"text": [prompt.text + c for c in choices],
                           "sampling_params": {"max_new_tokens": 0, "temperature": 0}, "return_logprob": True,
                           "return_text_in_logprobs": True, "logprob_start_len": start})
        windows = [o["meta_info"]["input_token_logprobs"] for o in outs]
        outputs = [o["meta_info"].get("output_token_logprobs", []) for o in outs]

        def unconditional(token_lists):
            res = self._post({"input_ids": [list(t) for t in token_lists], "sampling_params": {"max_new_tokens": 0},
                              "return_logprob": True})  # the server's default window, as upstream's client asks
            return [o["meta_info"]["input_token_logprobs"] for o in res]

        return decide(method, prompt.text, choices, windows, outputs, unconditional), None

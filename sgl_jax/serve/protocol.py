"""Wire formats: SGLang's `/generate` and the OpenAI routes, parsed into engine calls and shaped back.

No HTTP here, only plain values: `server.py` owns the routes and the streams. A request becomes a
list of `SubRequest`s, one engine sequence each: batch item i with sample j of n lands at response
index `i * n + j` (SGLang's and OpenAI's order). Every parse error is an `InvalidRequestError` whose
message names the field the *client* sent (`max_tokens` on the OpenAI routes, `input_ids[1][3]` in a
batch) and the value that was expected.

Engine events are SGLang-shaped: `{"text": cumulative, "output_ids": cumulative, "meta_info": {...}}`
with logprob entries `[logprob | None, token_id, token_text | None]`; the OpenAI shapers convert them.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Mapping
from typing import Any

from sgl_jax.errors import InvalidRequestError, UnsupportedFeatureError
from sgl_jax.engine.prepare import nth_sample
from sgl_jax.sampling_params import SamplingParams


def new_id(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex


@dataclasses.dataclass
class SubRequest:
    """One engine sequence: what `engine.validate` / `engine.generate_stream` receive, plus its slot."""

    index: int
    rid: str
    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: dict | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    prepared: Any = None  # the engine's PreparedRequest, set by the server before the request is queued

    def validate_kwargs(self) -> dict[str, Any]:
        return dict(text=self.text, input_ids=self.input_ids, sampling_params=self.sampling_params,
                    return_logprob=self.return_logprob, logprob_start_len=self.logprob_start_len,
                    top_logprobs_num=self.top_logprobs_num)

    def stream_kwargs(self) -> dict[str, Any]:
        return dict(self.validate_kwargs(), return_text_in_logprobs=self.return_text_in_logprobs, rid=self.rid)


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _bool(body: Mapping, key: str, default: bool, where: str = "") -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InvalidRequestError(f"{where}{key} must be true or false, got {v!r}", field=key)
    return v


def _int(body: Mapping, key: str, default: int | None, lo: int | None = None, where: str = "") -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequestError(f"{where}{key} must be an integer, got {v!r}", field=key)
    if lo is not None and v < lo:
        raise InvalidRequestError(f"{where}{key} must be >= {lo}, got {v}", field=key)
    return v


def _check_ids(ids: Any, name: str, vocab_size: int) -> list[int]:
    if not isinstance(ids, list):
        raise InvalidRequestError(f"{name} must be a list of token ids, got {_type_name(ids)}", field="input_ids")
    if not ids:
        raise InvalidRequestError(f"{name} must not be empty (the prompt needs at least one token)", field="input_ids")
    for j, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise InvalidRequestError(f"{name}[{j}] must be a token id in [0, {vocab_size}), got {t!r}",
                                      field="input_ids")
    return ids


# ---------------------------------------------------------------------------------------------------
# SGLang /generate
# ---------------------------------------------------------------------------------------------------

_GENERATE_KEYS = frozenset({"text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                            "top_logprobs_num", "return_text_in_logprobs", "stream", "rid"})
# Upstream fields this server does not implement: accepted only when absent, null, empty or false.
_GENERATE_UNSUPPORTED = frozenset({"image_data", "audio_data", "video_data", "input_embeds", "lora_path",
                                   "session_params", "custom_logit_processor", "return_hidden_states",
                                   "bootstrap_host", "bootstrap_port", "bootstrap_room", "data_parallel_rank",
                                   "background", "return_bytes", "return_entropy"})
# "model": SGLang's gateway names the model on every request it forwards; a worker serves one
_GENERATE_IGNORED = frozenset({"log_metrics", "modalities", "stream_options", "no_logs", "model"})


@dataclasses.dataclass
class GenerateRequest:
    subs: list[SubRequest]
    batched: bool          # the response is a list (a batch, or n > 1)
    stream: bool
    rid: str | None        # the client's rid for a single prompt, for /abort_request


def _per_item(body: Mapping, key: str, batch: int, kind, default):
    v = body.get(key)
    if isinstance(v, list):
        if len(v) != batch:
            raise InvalidRequestError(f"{key} has {len(v)} entries but the batch has {batch} prompts", field=key)
        return [kind({key: x}, key, default, where="") for x in v]
    return [kind(body, key, default)] * batch


def parse_generate(body: Any, *, vocab_size: int, max_context: int) -> GenerateRequest:
    """Long because SGLang's /generate accepts single, batched and per-item forms of every field."""
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {_type_name(body)}", field="body")
    for k, v in body.items():
        if k in _GENERATE_KEYS or k in _GENERATE_IGNORED:
            continue
        if k in _GENERATE_UNSUPPORTED:
            if v in (None, False, [], {}):
                continue
            raise UnsupportedFeatureError(f"{k} is not supported by this server", field=k)
        raise InvalidRequestError(f"unknown field {k!r} in /generate; known: {', '.join(sorted(_GENERATE_KEYS))}",
                                  field=k)
    text, input_ids = body.get("text"), body.get("input_ids")
    if text is not None and input_ids is not None:
        raise InvalidRequestError("give either text or input_ids, not both", field="text")
    prompts: list[tuple[str | None, list[int] | None]]
    if text is not None:
        if isinstance(text, str):
            batched, prompts = False, [(text, None)]
        elif isinstance(text, list):
            if not text:
                raise InvalidRequestError("text must be a string or a non-empty list of strings, got []", field="text")
            for i, t in enumerate(text):
                if not isinstance(t, str):
                    raise InvalidRequestError(f"text[{i}] must be a string, got {_type_name(t)}", field="text")
            batched, prompts = True, [(t, None) for t in text]
        else:
            raise InvalidRequestError(f"text must be a string or a list of strings, got {_type_name(text)}",
                                      field="text")
    elif input_ids is not None:
        if isinstance(input_ids, list) and input_ids and all(isinstance(x, list) for x in input_ids):
            batched = True
            prompts = [(None, _check_ids(x, f"input_ids[{i}]", vocab_size)) for i, x in enumerate(input_ids)]
        else:
            batched, prompts = False, [(None, _check_ids(input_ids, "input_ids", vocab_size))]
    else:
        raise InvalidRequestError("one of text or input_ids is required", field="text")
    batch = len(prompts)

    sps = body.get("sampling_params")
    if isinstance(sps, list):
        if not batched:
            raise InvalidRequestError("sampling_params must be an object for a single prompt, got a list",
                                      field="sampling_params")
        if len(sps) != batch:
            raise InvalidRequestError(f"sampling_params has {len(sps)} entries but the batch has {batch} prompts",
                                      field="sampling_params")
    else:
        sps = [sps] * batch
    return_logprob = _per_item(body, "return_logprob", batch, _bool, False)
    start_len = _per_item(body, "logprob_start_len", batch, _int, -1)
    top_num = _per_item(body, "top_logprobs_num", batch, _int, 0)
    for name, vals in (("logprob_start_len", start_len), ("top_logprobs_num", top_num)):
        lo = -1 if name == "logprob_start_len" else 0
        for x in vals:
            if x < lo:
                raise InvalidRequestError(f"{name} must be >= {lo}, got {x}", field=name)
    text_in_lp = _bool(body, "return_text_in_logprobs", False)
    stream = _bool(body, "stream", False)
    rid = body.get("rid")
    if rid is not None:
        if batched and isinstance(rid, list):
            if len(rid) != batch or not all(isinstance(r, str) and r for r in rid):
                raise InvalidRequestError(f"rid must be a list of {batch} non-empty strings for this batch", field="rid")
        elif not isinstance(rid, str) or not rid:
            raise InvalidRequestError(f"rid must be a non-empty string, got {rid!r}", field="rid")

    subs: list[SubRequest] = []
    n_of: list[int] = []
    for i, ((t, ids), sp) in enumerate(zip(prompts, sps)):
        where = f"sampling_params[{i}]" if batched and isinstance(body.get("sampling_params"), list) else "sampling_params"
        parsed = SamplingParams.from_dict(sp, vocab_size=vocab_size, max_context=max_context,
                                          prompt_len=len(ids) if ids is not None else None, where=where)
        n_of.append(parsed.n)
    multi = batched or n_of[0] > 1
    for i, ((t, ids), sp) in enumerate(zip(prompts, sps)):
        n = n_of[i]
        base = rid[i] if isinstance(rid, list) else (f"{rid}-{i}" if rid and batched else rid)
        for j in range(n):
            sub_rid = (base if n == 1 else f"{base}-{j}") if base else new_id()
            subs.append(SubRequest(
                index=len(subs), rid=sub_rid, text=t, input_ids=ids, sampling_params=nth_sample(sp or {}, j),
                return_logprob=return_logprob[i], logprob_start_len=start_len[i], top_logprobs_num=top_num[i],
                return_text_in_logprobs=text_in_lp))
    return GenerateRequest(subs, multi, stream, rid if isinstance(rid, str) else None)


# ---------------------------------------------------------------------------------------------------
# OpenAI routes: request side
# ---------------------------------------------------------------------------------------------------

# OpenAI name -> sampling_params key (SGLang extras keep their names).
_OPENAI_SAMPLING = {
    "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "min_tokens": "min_new_tokens",
    "seed": "sampling_seed", "temperature": "temperature", "top_p": "top_p", "n": "n", "stop": "stop",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "logit_bias": "logit_bias",
    "top_k": "top_k", "min_p": "min_p", "ignore_eos": "ignore_eos", "regex": "regex", "json_schema": "json_schema",
    "ebnf": "ebnf", "repetition_penalty": "repetition_penalty", "stop_token_ids": "stop_token_ids",
    "stop_regex": "stop_regex", "no_stop_trim": "no_stop_trim", "skip_special_tokens": "skip_special_tokens",
    "spaces_between_special_tokens": "spaces_between_special_tokens",
}
_COMMON_KEYS = frozenset(_OPENAI_SAMPLING) | {"model", "stream", "stream_options", "user", "rid"}
_COMPLETION_KEYS = _COMMON_KEYS | {"prompt", "logprobs", "echo", "best_of", "suffix"}
_CHAT_KEYS = _COMMON_KEYS | {"messages", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
                             "parallel_tool_calls", "functions", "function_call", "store", "metadata",
                             "service_tier", "modalities"}


@dataclasses.dataclass
class OpenAIRequest:
    id: str
    subs: list[SubRequest]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None          # completions: top count; chat: top_logprobs when logprobs is on
    echo_texts: list[str] | None  # completions with echo: the prompt text of each prompt


# SGLang's OpenAI-route extensions (its gateway sends them with their defaults): accepted when they change nothing
# here -- absent, null or false (continue_final_message, return_hidden_states), or reasoning switches, which
# apply only with a reasoning parser, and this server has none
_OPENAI_UNSUPPORTED = frozenset({"continue_final_message", "return_hidden_states"})
_OPENAI_IGNORED = frozenset({"separate_reasoning", "stream_reasoning"})


def _check_keys(body: Any, known: frozenset, route: str) -> None:
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {_type_name(body)}", field="body")
    for k in body:
        if k in _OPENAI_UNSUPPORTED:
            if body[k] not in (None, False):
                raise InvalidRequestError(f"{k!r} is not supported by this server (only false)", field=k)
            continue
        if k not in known and k not in _OPENAI_IGNORED:
            raise InvalidRequestError(f"unknown field {k!r} in {route}", field=k)


def _openai_sampling(body: Mapping, *, default_max: int | None, prompt_len: int, vocab_size: int,
                     max_context: int) -> tuple[dict, SamplingParams]:
    sp: dict[str, Any] = {}
    names: dict[str, str] = {}
    for key, target in _OPENAI_SAMPLING.items():
        if key in body and body[key] is not None:
            sp[target] = body[key]
            if key != target:
                names[target] = key
    if "max_new_tokens" not in sp:
        sp["max_new_tokens"] = default_max if default_max is not None else max(max_context - prompt_len, 0)
        names.setdefault("max_new_tokens", "max_tokens")
    parsed = SamplingParams.from_dict(sp, vocab_size=vocab_size, max_context=max_context, prompt_len=prompt_len,
                                      where="", names=names)
    if parsed.choices is not None:
        raise UnsupportedFeatureError("choices is not an OpenAI field", field="choices")
    return sp, parsed


def _stream_opts(body: Mapping) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise InvalidRequestError(f"stream_options must be an object, got {opts!r}", field="stream_options")
    return stream, _bool(opts, "include_usage", False, where="stream_options.")


def _unsupported_if_set(body: Mapping, key: str, allowed=(None,)) -> None:
    v = body.get(key)
    if v is not None and v not in allowed and v != [] and v != {}:
        raise UnsupportedFeatureError(f"{key} is not supported by this server, got {v!r}", field=key)


def parse_completion(body: Any, tokenizer, *, max_context: int) -> OpenAIRequest:
    _check_keys(body, _COMPLETION_KEYS, "/v1/completions")
    _unsupported_if_set(body, "suffix", allowed=(None, ""))
    vocab = int(tokenizer.vocab_size)
    prompt = body.get("prompt")
    prompts: list[list[int]]
    texts: list[str]
    if isinstance(prompt, str):
        raw = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raw = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        raw = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        raw = prompt
    elif prompt is None:
        raise InvalidRequestError("prompt is required (a string, a list of strings, or token ids)", field="prompt")
    else:
        raise InvalidRequestError(
            f"prompt must be a non-empty string, a list of strings, a list of token ids or a list of lists of "
            f"token ids, got {prompt!r}"[:300], field="prompt")
    single = raw is not prompt
    prompts, texts = [], []
    for i, p in enumerate(raw):
        name = "prompt" if single else f"prompt[{i}]"
        if isinstance(p, str):
            if not p:
                raise InvalidRequestError(f"{name} must be a non-empty string", field="prompt")
            prompts.append(tokenizer.encode(p, add_special_tokens=True))
            texts.append(p)
        else:
            ids = _check_ids(p, name, vocab)
            prompts.append(ids)
            texts.append(tokenizer.decode(ids))
    stream, include_usage = _stream_opts(body)
    logprobs = _int(body, "logprobs", None, lo=0)
    echo = _bool(body, "echo", False)
    best_of = _int(body, "best_of", None, lo=1)
    rid = _rid(body, "cmpl-")
    subs: list[SubRequest] = []
    n = 1
    for i, ids in enumerate(prompts):
        sp, parsed = _openai_sampling(body, default_max=16, prompt_len=len(ids), vocab_size=vocab,
                                      max_context=max_context)
        n = parsed.n
        if best_of is not None and best_of != n:
            raise UnsupportedFeatureError(f"best_of must equal n ({n}) on this server, got {best_of}", field="best_of")
        for j in range(n):
            subs.append(SubRequest(
                index=len(subs), rid=f"{rid}-{len(subs)}", input_ids=ids, sampling_params=nth_sample(sp, j),
                return_logprob=logprobs is not None, top_logprobs_num=logprobs or 0,
                logprob_start_len=0 if (echo and logprobs is not None) else -1, return_text_in_logprobs=True))
    return OpenAIRequest(rid, subs, n, stream, include_usage, logprobs, texts if echo else None)


def _rid(body: Mapping, prefix: str) -> str:
    rid = body.get("rid")
    if rid is None:
        return new_id(prefix)
    if not isinstance(rid, str) or not rid:
        raise InvalidRequestError(f"rid must be a non-empty string, got {rid!r}", field="rid")
    return rid


_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _message_content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict):
                raise InvalidRequestError(f"{where}.content[{k}] must be an object, got {_type_name(part)}",
                                          field="messages")
            if part.get("type") != "text":
                raise UnsupportedFeatureError(
                    f"{where}.content[{k}].type {part.get('type')!r} is not supported; only 'text' parts are",
                    field="messages")
            if not isinstance(part.get("text"), str):
                raise InvalidRequestError(f"{where}.content[{k}].text must be a string", field="messages")
            parts.append(part["text"])
        return "\n".join(parts)
    raise InvalidRequestError(f"{where}.content must be a string or a list of text parts, got {_type_name(content)}",
                              field="messages")


def render_messages(messages: Any, tokenizer) -> str:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects", field="messages")
    msgs = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequestError(f"{where} must be an object, got {_type_name(m)}", field="messages")
        role = m.get("role")
        if role not in _ROLES:
            raise InvalidRequestError(f"{where}.role must be one of {', '.join(sorted(_ROLES))}; got {role!r}",
                                      field="messages")
        if "content" not in m and role != "assistant":
            raise InvalidRequestError(f"{where}.content is required", field="messages")
        if m.get("tool_calls"):
            raise UnsupportedFeatureError(f"{where}.tool_calls is not supported", field="messages")
        msg = {"role": role, "content": _message_content(m.get("content"), where) or ""}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        msgs.append(msg)
    try:
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    except (ValueError, TypeError, KeyError) as e:
        raise InvalidRequestError(f"messages: the chat template rejected them: {e}", field="messages") from None
    except Exception as e:  # jinja2 TemplateError and friends (raise_exception in templates)
        if type(e).__module__.startswith("jinja2"):
            raise InvalidRequestError(f"messages: the chat template rejected them: {e}", field="messages") from None
        raise


def parse_chat(body: Any, tokenizer, *, max_context: int) -> OpenAIRequest:
    _check_keys(body, _CHAT_KEYS, "/v1/chat/completions")
    for key in ("tools", "functions"):
        _unsupported_if_set(body, key)
    _unsupported_if_set(body, "tool_choice", allowed=(None, "none", "auto"))
    _unsupported_if_set(body, "function_call", allowed=(None, "none", "auto"))
    _unsupported_if_set(body, "modalities", allowed=(None, ["text"]))
    vocab = int(tokenizer.vocab_size)
    prompt_text = render_messages(body.get("messages"), tokenizer)
    ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    if not ids:
        raise InvalidRequestError("messages render to an empty prompt", field="messages")
    stream, include_usage = _stream_opts(body)
    want_lp = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, lo=0)
    if top is not None and top > 0 and not want_lp:
        raise InvalidRequestError("top_logprobs requires logprobs: true", field="top_logprobs")
    body = dict(body)
    rf = body.pop("response_format", None)
    if rf is not None:
        schema = _response_format_schema(rf)
        if schema is not None:
            if any(body.get(k) is not None for k in ("regex", "json_schema", "ebnf")):
                raise InvalidRequestError("response_format cannot be combined with regex, json_schema or ebnf",
                                          field="response_format")
            body["json_schema"] = schema
    sp, parsed = _openai_sampling(body, default_max=None, prompt_len=len(ids), vocab_size=vocab,
                                  max_context=max_context)
    rid = _rid(body, "chatcmpl-")
    subs = [SubRequest(index=j, rid=f"{rid}-{j}", input_ids=ids, sampling_params=nth_sample(sp, j),
                       return_logprob=want_lp, top_logprobs_num=(top or 0) if want_lp else 0,
                       return_text_in_logprobs=True)
            for j in range(parsed.n)]
    return OpenAIRequest(rid, subs, parsed.n, stream, include_usage, (top or 0) if want_lp else None, None)


def _response_format_schema(rf: Any) -> str | None:
    import json

    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise InvalidRequestError(f"response_format must be an object with a 'type', got {rf!r}",
                                  field="response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise InvalidRequestError("response_format.json_schema must be an object with a 'schema'",
                                      field="response_format")
        schema = js.get("schema", js.get("schema_"))
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError("response_format.json_schema.schema must be a JSON schema object",
                                      field="response_format")
        return json.dumps(schema)
    raise UnsupportedFeatureError(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}", field="response_format")


# ---------------------------------------------------------------------------------------------------
# OpenAI routes: response side
# ---------------------------------------------------------------------------------------------------

def finish_reason(meta: Mapping) -> tuple[str | None, Any]:
    """(OpenAI finish_reason, matched_stop) from meta_info.finish_reason."""
    fr = meta.get("finish_reason")
    if not fr:
        return None, None
    kind = fr.get("type") if isinstance(fr, dict) else str(fr)
    return kind, fr.get("matched") if isinstance(fr, dict) else None


def usage(finals: list[dict], n: int) -> dict:
    """Token counts; a prompt sampled n times counts once, completions all count."""
    metas = [f["meta_info"] for f in finals]
    prompt = sum(m.get("prompt_tokens", 0) for m in metas[::max(n, 1)])
    completion = sum(m.get("completion_tokens", 0) for m in metas)
    cached = sum(m.get("cached_tokens", 0) or 0 for m in metas)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _lp(x: Any) -> float | None:
    """A JSON-safe logprob: OpenAI's floor -9999.0 for -inf, None for NaN."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return None
    return max(x, -9999.0) if x != math.inf else 0.0


def _tok_text(entry: list, tokenizer) -> str:
    t = entry[2] if len(entry) > 2 else None
    return t if t is not None else tokenizer.decode([entry[1]], skip_special_tokens=False)


def logprob_entries(meta: Mapping, with_input: bool) -> tuple[list, list]:
    """(token entries, top entries) in order: the prompt's (echo) then the output's."""
    toks = list(meta.get("output_token_logprobs") or [])
    tops = list(meta.get("output_top_logprobs") or [None] * len(toks))
    if with_input:
        itoks = list(meta.get("input_token_logprobs") or [])
        itops = list(meta.get("input_top_logprobs") or [None] * len(itoks))
        toks, tops = itoks + toks, itops + tops
    tops += [None] * (len(toks) - len(tops))
    return toks, tops


class CompletionLogprobs:
    """Builds the legacy completions `logprobs` object, incrementally for streams."""

    def __init__(self, tokenizer, top_n: int, with_input: bool):
        self.tokenizer, self.top_n, self.with_input = tokenizer, top_n, with_input
        self.sent = 0
        self.offset = 0

    def delta(self, meta: Mapping) -> dict:
        toks, tops = logprob_entries(meta, self.with_input)
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e, top in zip(toks[self.sent:], tops[self.sent:]):
            text = _tok_text(e, self.tokenizer)
            out["tokens"].append(text)
            out["token_logprobs"].append(_lp(e[0]))
            out["top_logprobs"].append(
                None if top is None else {_tok_text(t, self.tokenizer): _lp(t[0]) for t in top[:self.top_n]}
                if self.top_n else None)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        self.sent = len(toks)
        return out


class ChatLogprobs:
    """Builds chat `logprobs.content` entries, incrementally for streams."""

    def __init__(self, tokenizer, top_n: int):
        self.tokenizer, self.top_n = tokenizer, top_n
        self.sent = 0

    def _item(self, e: list) -> dict:
        text = _tok_text(e, self.tokenizer)
        return {"token": text, "logprob": _lp(e[0]), "bytes": list(text.encode("utf-8"))}

    def delta(self, meta: Mapping) -> dict:
        toks, tops = logprob_entries(meta, False)
        content = []
        for e, top in zip(toks[self.sent:], tops[self.sent:]):
            item = self._item(e)
            item["top_logprobs"] = [self._item(t) for t in (top or [])[:self.top_n]]
            content.append(item)
        self.sent = len(toks)
        return {"content": content}


def text_delta(new: str, old: str) -> str:
    """What to append to `old` to show `new`, both cumulative. Sent text cannot be retracted, so a
    revised tail (which a well-behaved engine avoids by holding back possible stop-string prefixes)
    is handled like the SGLang frontend does: by position."""
    return new[len(old):]


def completion_response(req: OpenAIRequest, finals: list[dict], tokenizer, model: str) -> dict:
    choices = []
    for sub, ev in zip(req.subs, finals):
        meta = ev["meta_info"]
        text = ev["text"]
        if req.echo_texts is not None:
            text = req.echo_texts[sub.index // req.n] + text
        reason, matched = finish_reason(meta)
        lp = None
        if req.logprobs is not None:
            lp = CompletionLogprobs(tokenizer, req.logprobs, req.echo_texts is not None).delta(meta)
        choices.append({"index": sub.index, "text": text, "logprobs": lp, "finish_reason": reason,
                        "matched_stop": matched})
    return {"id": req.id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(finals, req.n)}


def chat_response(req: OpenAIRequest, finals: list[dict], tokenizer, model: str) -> dict:
    choices = []
    for sub, ev in zip(req.subs, finals):
        meta = ev["meta_info"]
        reason, matched = finish_reason(meta)
        lp = ChatLogprobs(tokenizer, req.logprobs).delta(meta) if req.logprobs is not None else None
        choices.append({"index": sub.index, "message": {"role": "assistant", "content": ev["text"]},
                        "logprobs": lp, "finish_reason": reason, "matched_stop": matched})
    return {"id": req.id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(finals, req.n)}

"""Role markup for `system` / `user` / `assistant`: taken from the model's own chat template.

Upstream's frontend guesses a template from the model path and falls back to plain `USER:` markup for unknown
models. Here a backend that knows the model's jinja chat template (the in-process engine's tokenizer, or our
server's `/get_model_info`) hands it over, and `ChatTemplate.from_jinja` derives each role's prefix and suffix
by rendering sentinel conversations: the text before and after the sentinel content of each role, as the
template would render that turn. A template that inserts a default system message when the conversation does
not start with one is detected the same way, and the program gets that message too. Named templates
(`default`, `chatml`, `llama-3-instruct`) remain for servers that do not publish theirs.
Host code: no jax import.
"""

from __future__ import annotations

import dataclasses

_S, _U, _A = "SGLJAXsystemSENTINEL", "SGLJAXuserSENTINEL", "SGLJAXassistantSENTINEL"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    name: str
    roles: dict  # role -> (prefix, suffix)
    default_system_prompt: str | None = None
    preamble: str = ""  # text the template puts before the first turn (e.g. a BOS) when no system turn exists
    stop_str: tuple = ()

    def prefix_suffix(self, role: str) -> tuple[str, str]:
        if role not in self.roles:
            raise ValueError(f"the {self.name!r} chat template has no {role!r} role")
        return self.roles[role]

    @staticmethod
    def from_jinja(template: str, name: str = "model", **variables) -> "ChatTemplate":
        """Derive the role markup from a jinja chat template (see the module docstring)."""
        from sgl_jax.models.tokenizer import render_chat_template

        def render(msgs, gen=False):
            return render_chat_template(template, msgs, add_generation_prompt=gen, **variables)

        sys_m, user_m, asst_m = ({"role": "system", "content": _S}, {"role": "user", "content": _U},
                                 {"role": "assistant", "content": _A})
        roles = {}
        u = render([user_m])
        ua = render([user_m, asst_m])
        if not ua.startswith(u) or _U not in u or _A not in ua:
            raise ValueError(f"chat template {name!r}: cannot find the turns in its rendering")
        head, _, user_suffix = u.partition(_U)
        asst_prefix, _, asst_suffix = ua[len(u):].partition(_A)
        try:
            s = render([sys_m])
            su = render([sys_m, user_m])
            sys_prefix, _, sys_suffix = s.partition(_S)
            if not su.startswith(s) or _S not in s:
                raise ValueError("system turn not a prefix")
            user_prefix = su[len(s):].partition(_U)[0]
            roles["system"] = (sys_prefix, sys_suffix)
        except Exception:  # templates without a system role (they raise, or drop it)
            user_prefix, sys_prefix, sys_suffix = "", None, None
        if not user_prefix or not head.endswith(user_prefix):
            user_prefix = head
        roles["user"] = (user_prefix, user_suffix)
        roles["assistant"] = (asst_prefix, asst_suffix)
        lead = head[: len(head) - len(user_prefix)]
        default_system, preamble = None, ""
        if lead and sys_prefix is not None and lead.startswith(sys_prefix) and lead.endswith(sys_suffix) and \
                len(lead) >= len(sys_prefix) + len(sys_suffix):
            default_system = lead[len(sys_prefix): len(lead) - len(sys_suffix)]
        elif lead:
            preamble = lead
        stop = asst_suffix.strip()
        return ChatTemplate(name, roles, default_system, preamble, (stop,) if stop else ())


DEFAULT = ChatTemplate("default", {"system": ("SYSTEM:", "\n"), "user": ("USER:", "\n"),
                                   "assistant": ("ASSISTANT:", "\n")})
CHATML = ChatTemplate("chatml", {r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ("system", "user", "assistant")},
                      stop_str=("<|im_end|>",))
LLAMA3 = ChatTemplate("llama-3-instruct", {
    r: (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>") for r in ("system", "user", "assistant")},
    stop_str=("<|eot_id|>",))
NAMED = {t.name: t for t in (DEFAULT, CHATML, LLAMA3)}


def get_chat_template(name: str) -> ChatTemplate:
    if name not in NAMED:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(sorted(NAMED))} "
                         f"(or let the backend use the model's own)")
    return NAMED[name]

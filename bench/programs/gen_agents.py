"""Generative agents: the recorded calls of a town simulation replayed one after another.

Each line of the call log is one call of one of five templated functions (our own wording and examples):
poignancy of an event (max 2 tokens), the (subject, predicate, object) triple of an action (20, stop ")"),
an emoji for an action (6), the sector an agent goes to (10, stop "}") and the object it uses there (5,
stop "}"). Each function starts with a fixed few-shot header, so every call after the first of its kind
finds the header cached; the agent-specific text follows. One program runs one call (it dispatches on the
kind); the runner replays them with one thread, in log order, as the paper does (`--parallel 1`).

Sizes: cpu = the first 60 calls; full (--full) = the first 1000 (the paper's `--num-events 1000`).
No gold (the recorded run kept no outputs).
"""

from __future__ import annotations

from bench.programs import common

SIZES = {"cpu": dict(n=60, threads=1), "full": dict(n=1000, threads=1)}
METRIC = None
FILE = "generative_agents_agent_calls.jsonl"
KINDS = ("poignancy_event", "generate_event_triple", "generate_pronunciatio", "action_location_sector",
         "action_location_object")

POIGNANCY = (
    "Rate how memorable an event is for a person, from 1 (routine: brushing teeth, making the bed) to 10 "
    "(life-changing: a wedding, losing a job). Answer with the number only.\n\n"
    "Person: Tom Lee, a retired mail carrier who gardens every day.\nEvent: Tom Lee is watering the roses\n"
    "Rating: 1\n\n"
    "Person: Ana Diaz, a nurse saving up for her own flat.\nEvent: Ana Diaz is signing the lease on her first "
    "flat\nRating: 8\n\n")
TRIPLE = (
    "Turn an action into a (subject, predicate, object) triple.\n\n"
    "Action: Sam Ortiz is baking bread for the market\nTriple: (Sam Ortiz, bake, bread)\n\n"
    "Action: desk is being cleaned\nTriple: (desk, be, cleaned)\n\n"
    "Action: Mia Chen is reading a novel in the park\nTriple: (Mia Chen, read, novel)\n\n")
EMOJI = (
    "Show each action as one or two emoji.\n\n"
    "Action: drinking coffee\nEmoji: \u2615\n\n"
    "Action: running in the park\nEmoji: \U0001F3C3\U0001F333\n\n"
    "Action: writing a letter\nEmoji: \u270D\uFE0F\n\n")
SECTOR = (
    "Pick the area a person should go to for their next action. Only pick an area from the list given.\n\n"
    "Jane Park lives in Jane Park's house, which has kitchen, bedroom. Jane Park is now in Jane Park's house, "
    "which has kitchen, bedroom. Areas Jane Park knows: Jane Park's house, Town Library, Corner Bakery. "
    "Jane Park is reading the news and will next buy a croissant.\n"
    "Jane Park should go to this area: {Corner Bakery}\n\n")
OBJECT = (
    "Pick the place inside an area where a person should do their action. Only pick from the list given.\n\n"
    "Jane Park is going to Corner Bakery, which has: counter, seating, oven. Jane Park is buying a croissant "
    "and will next eat it.\nJane Park should go to: {counter}\n\n")


def load(data_dir: str, n: int | None, seed: int = 0, full: bool = False) -> list[dict]:
    calls = common.read_jsonl(common.path(data_dir, FILE))
    out = []
    for rec in common.take(calls, n, seed):
        (kind, fields), = rec.items()
        if kind not in KINDS:
            raise ValueError(f"{FILE}: unknown agent call kind {kind!r}; expected one of {KINDS}")
        out.append({"kind": kind, "fields": fields})
    return out


def _sector(f: dict) -> str:
    return (f"{f['persona_name']} lives in {f['living_sector']}, which has {f['living_sector_areas']}. "
            f"{f['persona_name']} is now in {f['current_sector']}, which has {f['current_sector_areas']}. "
            f"Plan for today: {f['daily_plan'].strip()} Areas {f['persona_name']} knows: {f['sector_options']}. "
            f"{f['persona_name']} is {f['current_action']} and will next be {f['next_action']}.\n"
            f"{f['persona_name']} should go to this area: {{")


def _object(f: dict) -> str:
    return (f"{f['persona_name']} is going to {f['target_sector']}, which has: {f['target_sector_areas']}. "
            f"{f['persona_name']} is {f['current_action']} and will next be {f['next_action']}.\n"
            f"{f['persona_name']} should go to: {{")


def build(sgl, full: bool = False):
    @sgl.function
    def agent_call(s, kind, fields):
        f = fields
        if kind == "poignancy_event":
            s += POIGNANCY + f"Person: {f['persona_iss'].strip()}\nEvent: {f['event']}\nRating:"
            s += sgl.gen("out", max_tokens=2)
        elif kind == "generate_event_triple":
            s += TRIPLE + f"Action: {f['persona_name']} is {f['action']}\nTriple: ({f['persona_name']},"
            s += sgl.gen("out", max_tokens=20, stop=")")
        elif kind == "generate_pronunciatio":
            s += EMOJI + f"Action: {f['action']}\nEmoji:" + sgl.gen("out", max_tokens=6)
        elif kind == "action_location_sector":
            s += SECTOR + _sector(f) + sgl.gen("out", max_tokens=10, stop="}")
        else:  # action_location_object (load() admits only the five kinds)
            s += OBJECT + _object(f) + sgl.gen("out", max_tokens=5, stop="}")

    return agent_call

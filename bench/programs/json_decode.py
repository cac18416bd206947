"""JSON decoding: a city's facts extracted from its Wikipedia summary into a fixed JSON skeleton.

The program writes the skeleton's constant text itself (braces, keys, newlines) and fills each value with a
regex-constrained gen: name and country (a string, then ","), latitude (a decimal, then ","), population (an
integer, then ",") and the top 3 landmarks (a list of three strings). Inside a value the runtime's FSM forces
the fixed characters (the closing quote's comma, the list's '", "' separators), which is what jump-forward
decoding skips; the ablation turns it off. The whole object is kept in the variable `json`.

Data: the 23 cities of the paper's list with their Wikipedia REST summaries (45-185 words; the paper used whole
pages of ~3000 tokens, built live). Sizes: cpu = 10 cities (the paper's count), full (--full) = all 23.
Validity: `json` parses (control characters allowed inside strings, since the string pattern admits
newlines) into the five keys with a string, a string, a number, an integer and a list of 3 strings.
"""

from __future__ import annotations

import json

from bench.programs import common

SIZES = {"cpu": dict(n=10), "full": dict(n=23)}
METRIC = "json_valid"
FILE = "json_decode_city_summaries.jsonl"
STRING = r'"[\w\d\s]*"'
REGEX = {"name": STRING + ",", "country": STRING + ",", "latitude": r"-?[0-9]{1,3}\.[0-9]{1,6},",
         "population": r"[0-9]{1,10},", "landmarks": r"\[" + STRING + ", " + STRING + ", " + STRING + r"\]"}
MAX_TOKENS = {"name": 8, "country": 8, "latitude": 8, "population": 8, "landmarks": 24}
KEYS = {"name": "name", "country": "country", "latitude": "latitude", "population": "population",
        "landmarks": "top 3 landmarks"}


def load(data_dir: str, n: int | None, seed: int = 0, full: bool = False) -> list[dict]:
    rows = common.take(common.read_jsonl(common.path(data_dir, FILE)), n, seed)
    return [{"document": r["document"], "_city": r["city"]} for r in rows]


def build(sgl, full: bool = False):
    @sgl.function
    def city_json(s, document):
        s += "Please extract the information of a city from the following Wikipedia page.\n"
        s += "Page begin.\n" + document.strip() + "\nPage end.\n"
        s += "Here is the name, country, latitude, population and top 3 landmarks of the city in JSON format.\n"
        with s.var_scope("json"):
            s += "{\n"
            for var, key in KEYS.items():
                s += f'    "{key}": ' + sgl.gen(var, max_tokens=MAX_TOKENS[var], regex=REGEX[var]) + "\n"
            s += "}"

    return city_json


def valid(text: str) -> bool:
    try:
        obj = json.loads(text, strict=False)
    except (TypeError, ValueError):
        return False
    if not isinstance(obj, dict) or set(obj) != set(KEYS.values()):
        return False
    lm = obj["top 3 landmarks"]
    return (isinstance(obj["name"], str) and isinstance(obj["country"], str)
            and isinstance(obj["latitude"], (int, float)) and isinstance(obj["population"], int)
            and isinstance(lm, list) and len(lm) == 3 and all(isinstance(x, str) for x in lm))


def score(state, args: dict) -> float:
    return float(valid(state["json"]))

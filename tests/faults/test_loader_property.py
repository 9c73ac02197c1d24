"""Any input the loader can meet ends as a model or as located problems, never another exception.

Three generators: random bytes (not UTF-8, control characters, NUL), random text assembled
from YAML's own punctuation and tags (anchors, aliases, complex keys, merge keys, flow and
block collections), and the example file with one value swapped for a random one (reaching
the rules and the model behind the parser).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.desired.model import DesiredState, parse
from reconciler.desired.problems import InvalidDesiredState
from reconciler.desired.safe_yaml import decode
from reconciler.desired.validation import check

ROOT = Path(__file__).resolve().parents[2]
FILE = Path("/srv/cst/desired.yaml")
# the example with every setting written out (defaults filled in) and the optional fields used
EXAMPLE = yaml.safe_load((ROOT / "examples" / "desired.yaml").read_text())
EXAMPLE["settings"] = check((ROOT / "examples" / "desired.yaml").read_text())["settings"]
EXAMPLE["instances"][0]["max_memory"] = "1.5GiB"
EXAMPLE["accounts"].append({"name": "file", "provider": "static", "keys_file": "keys.txt"})
EXAMPLE["settings"]["sillytavern"]["server"] = "../SillyTavern/server.js"
LOCATED = re.compile(rf"^{re.escape(str(FILE))}:[1-9][0-9]*: ")

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(load) -> str:
    """'model' or 'problems'; anything else (an exception escaping) fails the test."""
    try:
        desired = load()
    except InvalidDesiredState as exc:
        assert exc.problems, "an InvalidDesiredState must say what is wrong"
        for problem in exc.problems:
            assert LOCATED.match(str(problem)), str(problem)
            assert problem.message.strip()
        return "problems"
    assert isinstance(desired, DesiredState)
    usable(desired)
    return "model"


def usable(desired: DesiredState) -> None:
    """What the runtime relies on in a model: whole-number ports and counts, finite positive times."""
    s = desired.settings
    for value in (s.concurrency, s.logs.keep, s.logs.max_size, s.proxy.max_attempts, s.proxy.failure_threshold,
                  *(i.port for i in desired.instances), *(i.max_memory or 1 for i in desired.instances)):
        assert type(value) is int, value
    for seconds in (s.resync, s.sillytavern.start_timeout, s.sillytavern.stop_timeout, s.proxy.timeout,
                    *(a.refresh for a in desired.accounts)):
        assert 0 < seconds < float("inf"), seconds
    assert all(i.id == f"st-instance-{i.port}" for i in desired.instances)


TOKENS = st.sampled_from([
    "version: 1\n", "version", "settings", "instances", "accounts", "port", "state", "state_dir",
    "resync", "listen", "upstream", "max_memory", ": ", ":", "- ", "-", "\n", "\n  ", "  ", " ",
    "? ", "[", "]", "{", "}", ",", "&a ", "&b ", "*a", "*b", "<<: ", "!!binary ", "!!int ", "!!str ",
    "!!set ", "!!omap ", "!!python/object:os.system ", "!foo ", "'", '"', "\\", "\\0", "\\ud800",
    "#", "|", ">", "---\n", "...\n", "%YAML 1.1\n", "null", "~", ".nan", ".inf", "-.inf", "1e999",
    "8001", "8001.0", "0x1F", "0o17", "2020-01-01", "yes", "on", "5m", "1.5GiB", "http://[x",
    "http://h:99999", "~nobodyxyz/x", "127.0.0.1:3000", "\x00", "\x07", "\x1b", "\ufeff", "\u2028",
    "é", "中", "\t",
])


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    outcome(lambda: parse(decode(data, str(FILE)), FILE))


@FUZZ
@given(st.lists(TOKENS, max_size=60).map("".join))
def test_random_yaml(text: str) -> None:
    outcome(lambda: parse(text, FILE))


@FUZZ
@given(st.lists(TOKENS, max_size=40).map(lambda tokens: "version: 1\nsettings:\n  " + "".join(tokens)))
def test_random_yaml_inside_a_valid_start(text: str) -> None:
    outcome(lambda: parse(text, FILE))


# values that once reached past the validator, or nearly: each must end as a problem or be usable
AWKWARD_VALUES = [
    "5m", "0ms", "9" * 40 + "h", "9" * 400 + "GiB", "1.5GiB", "0B", "127.0.0.1:99999", "http://[::1",
    "https://h:99999/v1", "https://ok.example/v1", "~/x", "~nobodyxyz/x", "0.0.0.0", "a" * 300 + ":1",
    "st-instance-8001", "../../etc", "a:\u00b2", 8001.0, 4.0, float("nan"), float("inf"), 1e-300, True, 0, -1]
AWKWARD = st.sampled_from(AWKWARD_VALUES)
SCALARS = (AWKWARD | AWKWARD | AWKWARD | st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30) | st.binary(max_size=8)
           | st.dates())
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=8)


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*path, i))


PATHS = list(_paths(EXAMPLE))[1:]


@settings(FUZZ, max_examples=1000)
@given(st.lists(st.tuples(st.sampled_from(PATHS), VALUES), min_size=1, max_size=3))
def test_the_example_with_random_values(swaps) -> None:
    data = copy.deepcopy(EXAMPLE)
    for path, value in swaps:
        parent = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier swap removed this place
    outcome(lambda: parse(yaml.dump(data, allow_unicode=True), FILE))


def _swapped(path, value) -> str:
    data = copy.deepcopy(EXAMPLE)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return yaml.dump(data, allow_unicode=True)


def test_every_awkward_value_in_every_place() -> None:
    """The exhaustive companion of the random swaps: each awkward value at each path."""
    outcomes = {outcome(lambda: parse(_swapped(path, value), FILE))
                for path in PATHS for value in AWKWARD_VALUES}
    assert outcomes == {"model", "problems"}


def test_the_generators_reach_both_outcomes() -> None:
    """The property would hold for a loader that refuses everything: show models come out too."""
    assert outcome(lambda: parse(yaml.dump(EXAMPLE), FILE)) == "model"
    assert outcome(lambda: parse("version: 1\n", FILE)) == "model"
    assert outcome(lambda: parse("version: [\n", FILE)) == "problems"

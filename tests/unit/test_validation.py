"""Each class of bad input gives one line: file, line, YAML path, what is wrong."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reconciler.desired.model import load, parse
from reconciler.desired.problems import InvalidDesiredState
from reconciler.desired.validation import MAX_PROBLEMS, check

ROOT = Path(__file__).resolve().parents[2]


def problems(text: str) -> list[str]:
    with pytest.raises(InvalidDesiredState) as info:
        check(textwrap.dedent(text), "desired.yaml")
    return [str(p) for p in info.value.problems]


def test_example_file_is_valid():
    desired = load(ROOT / "examples" / "desired.yaml")
    assert [i.id for i in desired.instances] == ["st-instance-8001", "st-instance-8002"]
    assert desired.settings.state_dir == (ROOT / "examples" / ".cst")
    assert desired.settings.sillytavern.version == "1.19.0"
    assert [a.provider for a in desired.accounts] == ["daidai", "static"]


@pytest.mark.parametrize("text,expected", [
    ("""\
     version: 1
     instances:
       - port: 8001
       - port: 8002
       - port: 8001
     """, "desired.yaml:5: instances[2].port: 8001 is used twice (first at instances[0])"),
    ("""\
     version: 1
     instances:
       - port: 80
     """, "desired.yaml:3: instances[0].port: 80 is outside 1024-65535"),
    ("""\
     version: 1
     instances:
       - port: 70000
     """, "desired.yaml:3: instances[0].port: 70000 is outside 1024-65535"),
    ("""\
     version: 1
     instances:
       - port: 8001
         colour: blue
     """, "desired.yaml:4: instances[0].colour: unknown key (expected one of: budget, hosts, max_memory, park_after, password_env, port, proxy, sillytavern_version, state)"),
    ("""\
     version: 1
     instances:
       - port: "8001"
     """, "desired.yaml:3: instances[0].port: expected an integer, got a string '8001'"),
    ("""\
     version: 1
     instances:
       - port: 8001
         state: runing
     """, "desired.yaml:4: instances[0].state: 'runing' is not one of: running, stopped"),
    ("""\
     version: 1
     accounts:
       - name: a
         provider: openrouter
     """, "desired.yaml:4: accounts[0].provider: 'openrouter' is not one of: daidai, static"),
    ("""\
     version: 1
     accounts:
       - name: a
         provider: daidai
         email: me@example.com
     """, "desired.yaml:3: accounts[0]: missing password_env (the name of an environment variable) or password_file"),
    ("""\
     version: 1
     accounts:
       - name: a
         provider: static
     """, "desired.yaml:3: accounts[0]: missing keys_env (the name of an environment variable) or keys_file"),
    ("""\
     version: 1
     instances:
       - port: 8001
         password_env: "my password"
     """, "desired.yaml:4: instances[0].password_env: 'my password' is not an environment variable name (letters, digits, _)"),
    ("""\
     version: 2
     """, "desired.yaml:1: version: 2 is not supported (expected 1)"),
    ("""\
     settings:
       state_dir: x
     """, "desired.yaml:1: missing required key 'version'"),
    ("""\
     version: 1
     instances:
       - port: 8001
     instances: []
     """, "desired.yaml:4: instances: key appears twice in the same mapping"),
    ("""\
     version: 1
     instances:
       - port: 8001
       - [port: 8002
     """, "desired.yaml:5: YAML syntax error: expected ',' or ']', but got '<stream end>'"),
    ("""\
     version: 1
     settings:
       api: {listen: "127.0.0.1:3000"}
     instances:
       - port: 3000
     """, "desired.yaml:5: instances[0].port: 3000 is already taken by settings.api.listen"),
    ("""\
     version: 1
     settings:
       proxy: {listen: "0.0.0.0:5100"}
     """, "desired.yaml:3: settings.proxy.listen: '0.0.0.0:5100' is not a loopback address: set client_keys_env so that the proxy asks its clients for a key"),
    ("""\
     version: 1
     settings:
       proxy:
         listen: "0.0.0.0:5100"
         client_keys_env: PROXY_KEYS
         anonymous: true
     """, "desired.yaml:6: settings.proxy.anonymous: true would open the key pool to anyone who reaches '0.0.0.0:5100': it is allowed only on a loopback address"),
    ("""\
     version: 1
     settings:
       sillytavern: {start_timeout: soon}
     """, "desired.yaml:3: settings.sillytavern.start_timeout: 'soon' is not a duration (a number of seconds, or like 30s, 5m, 1h, 90d)"),
    ("""\
     version: 1
     accounts:
       - {name: a, provider: static, keys_env: A}
       - {name: a, provider: static, keys_env: B}
     """, "desired.yaml:4: accounts[1].name: 'a' is used twice (first at accounts[0])"),
], ids=["duplicate-port", "port-too-low", "port-too-high", "unknown-key", "wrong-type", "bad-enum",
        "unknown-provider", "missing-password-env", "missing-keys-env", "bad-env-name", "version",
        "missing-version", "duplicate-key", "syntax", "port-clash-api", "exposed-proxy", "anonymous-exposed", "bad-duration",
        "duplicate-account"])
def test_bad_input_is_located(text, expected):
    assert expected in problems(text)


def test_all_problems_reported_at_once_in_line_order():
    found = problems("""\
        version: 1
        instances:
          - port: 8001
            state: maybe
          - port: 8001
    """)
    assert found == ["desired.yaml:4: instances[0].state: 'maybe' is not one of: running, stopped",
                     "desired.yaml:5: instances[1].port: 8001 is used twice (first at instances[0])"]


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_not_a_mapping(text):
    assert problems(text)[0].startswith("desired.yaml:1: ")


def test_relative_paths_resolve_against_the_file(tmp_path):
    desired = parse("version: 1\nsettings: {state_dir: s, data_root: ../d}\n", tmp_path / "sub" / "desired.yaml")
    assert desired.settings.state_dir == tmp_path / "sub" / "s"
    assert desired.settings.data_root == tmp_path / "d"


def test_cli_validate_exit_codes(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("version: 1\ninstances:\n  - port: 8001\n")
    bad.write_text("version: 1\ninstances:\n  - port: 8001\n  - port: 8001\n")
    def run(f):
        return subprocess.run([sys.executable, "-m", "reconciler", "validate", "-f", str(f)],
                              capture_output=True, text=True)
    ok = run(good)
    assert ok.returncode == 0 and "valid" in ok.stdout
    failed = run(bad)
    assert failed.returncode == 1
    assert failed.stderr.strip() == f"{bad}:4: instances[1].port: 8001 is used twice (first at instances[0])"
    missing = run(tmp_path / "nope.yaml")
    assert missing.returncode == 1 and "nope.yaml:1: cannot read the file" in missing.stderr


BUDGETS = """\
    version: 1
    settings:
      usage: {timezone: Mars/Olympus, retention: 1h}
      budget: {tokens_per_day: -5, tokens_per_month: 1.5, requests_per_minute: 1000000000000000}
    instances:
      - port: 8001
        budget: {tokens_per_dya: 50000}
      - port: 8002
        budget: lots
      - port: 8003
        proxy: false
        budget: {tokens_per_day: 5}
    """


def test_bad_budgets_and_usage_settings_are_located_and_nothing_is_applied():
    assert problems(BUDGETS) == [
        "desired.yaml:3: settings.usage.timezone: 'Mars/Olympus' is not a known time zone "
        "(an IANA name such as Asia/Shanghai or UTC)",
        "desired.yaml:3: settings.usage.retention: '1h' is shorter than a day "
        "(ledger rows are kept at least for the day they count in)",
        "desired.yaml:4: settings.budget.tokens_per_day: -5 is less than the minimum of 0",
        "desired.yaml:4: settings.budget.tokens_per_month: expected an integer, got a number 1.5",
        "desired.yaml:4: settings.budget.requests_per_minute: 1000000000000000 is greater than the maximum of 1000000",
        "desired.yaml:7: instances[0].budget.tokens_per_dya: unknown key "
        "(expected one of: requests_per_minute, tokens_per_day, tokens_per_month)",
        "desired.yaml:9: instances[1].budget: expected a mapping or null, got a string 'lots'",
        "desired.yaml:12: instances[2].budget: this instance does not use the key pool (proxy: false), "
        "so a budget would limit nothing",
    ]


STORES = """\
    version: 1
    settings:
      usage:
        store: "postgresql://cst:hunter2@db.example:5432/cst"
        store_password_env: CST_STORE_PASSWORD
        store_password_file: /etc/cst/store-password
        on_store_down: maybe
    """


def test_a_shared_store_holds_no_password_and_names_its_host_and_database(tmp_path):
    assert problems(STORES) == [
        "desired.yaml:3: settings.usage: give store_password_env or store_password_file, not both",
        "desired.yaml:4: settings.usage.store: the URL holds a password: put it in the environment "
        "(store_password_env) or a 0600 file (store_password_file), never in desired.yaml",
        "desired.yaml:7: settings.usage.on_store_down: 'maybe' is not one of: closed, open",
    ]
    for url, why in [("postgresql://cst@db/cst?password=x", "holds a password"),
                     ("postgresql://cst@:5432/cst", "names no host"),
                     ("postgresql://cst@db:5432", "names no database"),
                     ("postgresql://cst@db:port/cst", "is not a PostgreSQL URL"),
                     ("mysql://cst@db/cst", "expected to match ^postgres(ql)?://")]:
        found = problems(f'version: 1\nsettings: {{usage: {{store: "{url}"}}}}\n')
        assert len(found) == 1 and why in found[0], (url, found)
    assert problems("version: 1\nsettings: {usage: {store_password_env: X}}\n") == [
        "desired.yaml:2: settings.usage.store_password_env: there is no settings.usage.store to use it for"]
    desired = parse(textwrap.dedent("""\
        version: 1
        settings:
          usage:
            store: "postgresql://cst@db.example/cst?sslmode=verify-full&sslrootcert=ca.pem"
            store_password_file: secrets/store-password
            on_store_down: open
        """), tmp_path / "desired.yaml")
    usage = desired.settings.usage
    assert usage.store == "postgresql://cst@db.example/cst?sslmode=verify-full&sslrootcert=ca.pem"
    assert usage.store_password_file == tmp_path / "secrets" / "store-password" and usage.on_store_down == "open"
    assert parse("version: 1\n", tmp_path / "desired.yaml").settings.usage.on_store_down == "closed"


def test_a_followed_branch_is_named_as_git_allows_and_is_off_unless_declared(tmp_path):
    assert problems('version: 1\nsettings:\n  git: {remote: "-upload-pack=evil", branch: "a..b", every: 0}\n') == [
        "desired.yaml:3: settings.git.remote: '-upload-pack=evil' is not valid here "
        "(expected to match ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$)",
        "desired.yaml:3: settings.git.every: 0 is not a duration (a number of seconds, or like 30s, 5m, 1h, 90d)",
        "desired.yaml:3: settings.git.branch: 'a..b' is not a branch name git accepts "
        "(no '..', '//', '@{', and no '/', '.' or '.lock' at the end)",
        "desired.yaml:3: settings.git.every: 0 is out of range (from 1ms to 365 days)",
    ]
    assert parse("version: 1\n", tmp_path / "desired.yaml").settings.git is None
    followed = parse("version: 1\nsettings: {git: {branch: prod, every: 30s, push: true}}\n",
                     tmp_path / "desired.yaml").settings.git
    assert followed is not None and (followed.remote, followed.branch, followed.every, followed.push) == (
        "origin", "prod", 30.0, True)


def test_budgets_inherit_the_fleet_s_and_null_or_empty_means_no_limit(tmp_path):
    desired = parse(textwrap.dedent("""\
        version: 1
        settings:
          usage: {timezone: Asia/Shanghai, retention: 30d}
          budget: {tokens_per_day: 200000, requests_per_minute: 30}
        instances:
          - port: 8001
            budget: {tokens_per_day: 50000}
          - port: 8002
          - port: 8003
            budget: null
          - port: 8004
            budget: {}
          - port: 8005
            proxy: false
        """), tmp_path / "desired.yaml")
    assert desired.settings.usage.timezone == "Asia/Shanghai" and desired.settings.usage.retention == 30 * 86400
    limits = {i.port: (i.budget.tokens_per_day, i.budget.requests_per_minute, i.budget.limited)
              for i in desired.instances}
    assert limits == {8001: (50000, None, True), 8002: (200000, 30, True), 8003: (None, None, False),
                      8004: (None, None, False), 8005: (None, None, False)}
    plain = parse("version: 1\n", tmp_path / "desired.yaml")
    assert plain.settings.usage.timezone is None and plain.settings.usage.retention == 90 * 86400


def test_a_file_of_thousands_of_problems_lists_the_first_and_counts_the_rest(tmp_path) -> None:
    entries = "".join(f"  - port: not-a-port-{i}\n" for i in range(3000))
    path = tmp_path / "desired.yaml"
    path.write_text("version: 1\ninstances:\n" + entries)
    with pytest.raises(InvalidDesiredState) as invalid:
        load(path)
    problems = [str(p) for p in invalid.value.problems]
    assert len(problems) == MAX_PROBLEMS + 1   # was 3,000 lines, each logged by cst serve on every save
    assert problems[0].startswith(f"{path}:3: instances[0].port:")
    assert problems[-1] == f"{path}:{3 + MAX_PROBLEMS}: and {3000 - MAX_PROBLEMS} more problems from this line on"

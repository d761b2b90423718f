"""The hosts file as a user writes it: what it means, and how mistakes are reported.

Every error must be a HostsFileError (exit code 2) whose message names the file,
the entry (`hosts[1]`) and the field, so the user can fix it without reading code.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clusterrun.errors import EXIT_USAGE
from clusterrun.hostsfile import (
    HOST_KEYS,
    TOP_KEYS,
    Host,
    HostsFile,
    HostsFileError,
    load_hosts,
    parse_hosts,
)


def write(tmp_path: Path, text: str | bytes, name: str = "hosts.yaml") -> Path:
    p = tmp_path / name
    if isinstance(text, str):
        p.write_text(text, encoding="utf-8")
    else:
        p.write_bytes(text)
    return p


def load_error(tmp_path: Path, text: str | bytes) -> HostsFileError:
    p = write(tmp_path, text)
    with pytest.raises(HostsFileError) as info:
        load_hosts(p)
    assert info.value.exit_code == EXIT_USAGE == 2
    assert str(info.value).startswith(f"{p}: "), "every error starts with the file's path"
    return info.value


def parse_error(data) -> str:
    with pytest.raises(HostsFileError) as info:
        parse_hosts(data, "hosts.yaml")
    assert info.value.exit_code == 2
    msg = str(info.value)
    assert msg.startswith("hosts.yaml: ")
    return msg


def names(hf: HostsFile) -> list[str]:
    return [h.host for h in hf.hosts]


# --- what a valid file means ----------------------------------------------------


def test_the_guide_example_means_what_the_guide_says(tmp_path):
    p = write(tmp_path, """\
# defaults for every host
nproc_per_node: 4
user: alice
port: 22
identity_file: ~/.ssh/id_ed25519
python: /opt/venv/bin/python
workdir: ~/project
setup: source ~/venv/bin/activate
env:
  NCCL_DEBUG: WARN
master_port: 29500
master_addr: 10.0.0.1
hosts:
  - host: gpu-a
    addr: 10.0.0.1
    nproc_per_node: 8
  - gpu-b
  - gpu-c:2
  - "gpu[d-f]"
""")
    hf = load_hosts(p)
    assert hf.path == str(p)
    assert names(hf) == ["gpu-a", "gpu-b", "gpu-c", "gpud", "gpue", "gpuf"]
    assert [h.nproc_per_node for h in hf.hosts] == [8, 4, 2, 4, 4, 4]
    assert hf.master_port == 29500 and hf.master_addr == "10.0.0.1"
    a, b = hf.hosts[0], hf.hosts[1]
    assert a.addr == "10.0.0.1" and b.addr is None
    for h in hf.hosts:   # defaults reach every host, whatever form its entry has
        assert (h.user, h.port, h.identity_file) == ("alice", 22, "~/.ssh/id_ed25519")
        assert (h.python, h.workdir) == ("/opt/venv/bin/python", "~/project")
        assert h.setup == ("source ~/venv/bin/activate",)
        assert dict(h.env) == {"NCCL_DEBUG": "WARN"}
        assert not h.is_local


def test_per_host_values_override_defaults_and_env_is_merged_with_the_host_winning():
    hf = parse_hosts({
        "user": "alice", "port": 22, "nproc_per_node": 2,
        "env": {"NCCL_DEBUG": "WARN", "SHARED": "default"},
        "hosts": [
            {"host": "gpu-a", "user": "bob", "port": 2222, "nproc_per_node": 8,
             "env": {"SHARED": "mine", "ONLY_A": 1}},
            "gpu-b",
        ],
    })
    a, b = hf.hosts
    assert (a.user, a.port, a.nproc_per_node) == ("bob", 2222, 8)
    assert dict(a.env) == {"NCCL_DEBUG": "WARN", "SHARED": "mine", "ONLY_A": "1"}
    assert (b.user, b.port, b.nproc_per_node) == ("alice", 22, 2)
    assert dict(b.env) == {"NCCL_DEBUG": "WARN", "SHARED": "default"}


def test_env_values_become_strings_booleans_as_1_and_0():
    hf = parse_hosts({"env": {"A": 3, "B": 1.5, "C": True, "D": False, "E": "x y"}, "hosts": ["h"]})
    assert dict(hf.hosts[0].env) == {"A": "3", "B": "1.5", "C": "1", "D": "0", "E": "x y"}


def test_nothing_but_hosts_gives_documented_defaults():
    hf = parse_hosts({"hosts": ["gpu-a"]})
    (h,) = hf.hosts
    assert h == Host(host="gpu-a", name="gpu-a", nproc_per_node=1)
    assert hf.master_port == 29500 and hf.master_addr is None


def test_a_bare_list_is_a_list_of_hosts():
    assert names(parse_hosts(["a", "b"])) == ["a", "b"]


def test_bare_string_host_nproc_and_user_at_host():
    hf = parse_hosts({"nproc_per_node": 4, "hosts": ["gpu-a", "gpu-b:2", "alice@gpu-c:3", "10.0.0.7"]})
    assert names(hf) == ["gpu-a", "gpu-b", "alice@gpu-c", "10.0.0.7"]
    assert [h.nproc_per_node for h in hf.hosts] == [4, 2, 3, 4]
    assert [h.name for h in hf.hosts] == names(hf), "tags show the host as written"


def test_name_is_what_tags_show_and_addr_is_kept():
    (h,) = parse_hosts({"hosts": [{"host": "gpu-a.example.com", "name": "node0", "addr": "10.0.0.1"}]}).hosts
    assert (h.host, h.name, h.addr) == ("gpu-a.example.com", "node0", "10.0.0.1")


def test_localhost_runs_without_ssh():
    hf = parse_hosts(["localhost:2", "gpu-a"])
    assert [h.is_local for h in hf.hosts] == [True, False]


@pytest.mark.parametrize("spec, expected", [
    ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("n[a-c]", ["na", "nb", "nc"]),
    ("x[1,3,5-6]", ["x1", "x3", "x5", "x6"]),
    ("rack[2-3].dc", ["rack2.dc", "rack3.dc"]),
    ("[a-b]host", ["ahost", "bhost"]),
])
def test_ranges_expand_in_order(spec, expected):
    assert names(parse_hosts([spec])) == expected
    assert names(parse_hosts([{"host": spec}])) == expected


def test_a_range_with_nproc_and_defaults_gives_each_host_the_same_settings():
    hf = parse_hosts({"user": "u", "hosts": ["gpu[1-2]:4", {"host": "n[a-b]", "nproc_per_node": 3}]})
    assert [(h.host, h.nproc_per_node, h.user) for h in hf.hosts] == [
        ("gpu1", 4, "u"), ("gpu2", 4, "u"), ("na", 3, "u"), ("nb", 3, "u"),
    ]


def test_node_rank_order_is_file_order_across_ranges():
    assert names(parse_hosts(["z", "a[1-2]", "m"])) == ["z", "a1", "a2", "m"]


def test_master_port_auto_is_accepted():
    assert parse_hosts({"master_port": "auto", "hosts": ["a"]}).master_port == "auto"


# --- mistakes: each names file, entry and field ----------------------------------------


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(HostsFileError) as info:
        load_hosts(p)
    assert info.value.exit_code == 2
    assert str(info.value) == f"{p}: no such file"


def test_directory(tmp_path):
    with pytest.raises(HostsFileError) as info:
        load_hosts(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: ")
    assert "is a directory" in str(info.value)


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path, text):
    e = load_error(tmp_path, text)
    assert "empty" in str(e) and "hosts:" in str(e)


@pytest.mark.parametrize("raw", [
    b"hosts:\n  - gpu-a\x00\n",                 # NUL byte
    b"\x7fELF\x02\x01\x01\x00\x00\x00",         # an executable
    b"hosts: [\xff\xfe]\n",                    # invalid UTF-8
    bytes(range(256)),
])
def test_binary_file(tmp_path, raw):
    e = load_error(tmp_path, raw)
    assert "binary" in str(e) or "not a text file" in str(e)


def test_invalid_yaml_names_the_line(tmp_path):
    e = load_error(tmp_path, "nproc_per_node: 2\nhosts:\n  - gpu-a\n - gpu-b\n")
    assert re.search(r"line \d+", str(e)), str(e)
    assert "not valid YAML" in str(e)


def test_invalid_yaml_line_number_is_the_users_line(tmp_path):
    e = load_error(tmp_path, "hosts:\n  - a\n  - b\nuser: [unclosed\n")
    assert re.search(r": line [45]: ", str(e)), str(e)


@pytest.mark.parametrize("data, where, suggestion", [
    ({"nproc_per_nod": 2, "hosts": ["a"]}, "nproc_per_nod", "nproc_per_node"),
    ({"hosts": ["a", {"host": "b", "nproc_per_nod": 2}]}, "hosts[1].nproc_per_nod", "nproc_per_node"),
    ({"master_prot": 1, "hosts": ["a"]}, "master_prot", "master_port"),
    ({"hosts": [{"host": "b", "adr": "10.0.0.1"}]}, "hosts[0].adr", "addr"),
])
def test_unknown_key_suggests_the_near_match(data, where, suggestion):
    msg = parse_error(data)
    assert msg.startswith(f"hosts.yaml: {where}: unknown key")
    assert f"did you mean `{suggestion}`" in msg


def test_unknown_key_with_no_near_match_lists_the_known_keys():
    msg = parse_error({"zzzzzz": 1, "hosts": ["a"]})
    assert "zzzzzz" in msg and "nproc_per_node" in msg and "hosts" in msg


def test_master_port_is_not_a_per_host_key():
    assert "hosts[0].master_port: unknown key" in parse_error({"hosts": [{"host": "a", "master_port": 1}]})


@pytest.mark.parametrize("bad", [0, -1, "four", True, False, 2.5, None, [4]])
def test_nproc_per_node_must_be_a_positive_integer(bad):
    msg = parse_error({"hosts": ["a", {"host": "b", "nproc_per_node": bad}]})
    assert msg.startswith("hosts.yaml: hosts[1].nproc_per_node: must be a positive integer")
    assert repr(bad) in msg


def test_nproc_per_node_default_is_checked_too():
    assert parse_error({"nproc_per_node": "four", "hosts": ["a"]}).startswith(
        "hosts.yaml: nproc_per_node: must be a positive integer or `gpu`, got 'four'")


@pytest.mark.parametrize("entry, says", [
    ("gpu-a:0", "must be a positive integer, got 0"),
    ("gpu-a:four", "expected host or host:nproc_per_node, got 'gpu-a:four'"),
    ("gpu-a:", "expected host or host:nproc_per_node, got 'gpu-a:'"),
])
def test_bad_host_colon_nproc(entry, says):
    assert parse_error(["ok", entry]) == f"hosts.yaml: hosts[1]: {says}"


@pytest.mark.parametrize("bad", [0, 70000, -1, "ssh", True, 22.0])
def test_port_range(bad):
    msg = parse_error({"hosts": ["a", {"host": "b", "port": bad}]})
    assert msg.startswith("hosts.yaml: hosts[1].port: must be a port number 1-65535")


@pytest.mark.parametrize("bad", [0, 70000, "auto-ish", True])
def test_master_port_range(bad):
    msg = parse_error({"master_port": bad, "hosts": ["a"]})
    assert msg.startswith("hosts.yaml: master_port: must be a port number 1-65535 or `auto`")


def test_port_auto_only_for_master_port():
    assert "hosts[0].port" in parse_error({"hosts": [{"host": "a", "port": "auto"}]})


@pytest.mark.parametrize("host", ["a;b", "$(x)", "a b", "`id`", "a|b", "a&b", "a>b", "'a'", '"a"',
                                  "a\\b", "a\tb", "a\nb", "~", "a*", "a?b", "a{b,c}", "", "é"])
def test_host_with_shell_syntax_is_rejected(host):
    for entries in (["ok", host], ["ok", {"host": host}]):
        msg = parse_error(entries)
        assert msg.startswith("hosts.yaml: hosts[1]"), msg


def test_bad_host_in_mapping_names_the_host_field():
    assert parse_error(["ok", {"host": "a;b"}]).startswith("hosts.yaml: hosts[1].host: not a valid ssh host: 'a;b'")


def test_missing_host_key():
    assert parse_error([{"name": "x"}]).startswith("hosts.yaml: hosts[0].host: missing")


@pytest.mark.parametrize("field, bad", [("addr", "10.0.0.1; rm -rf /"), ("addr", "$(x)"),
                                        ("name", "node 0"), ("name", "n$(x)")])
def test_bad_name_or_addr(field, bad):
    assert parse_error(["ok", {"host": "b", field: bad}]).startswith(f"hosts.yaml: hosts[1].{field}: ")


def test_bad_master_addr():
    assert parse_error({"master_addr": "a b", "hosts": ["x"]}).startswith("hosts.yaml: master_addr: ")


@pytest.mark.parametrize("key", ["1ABC", "A-B", "A B", "", "A=B", "é"])
def test_env_with_bad_key(key):
    msg = parse_error({"hosts": ["ok", {"host": "b", "env": {key: "v"}}]})
    assert msg.startswith(f"hosts.yaml: hosts[1].env.{key}: not a valid environment variable name")


@pytest.mark.parametrize("value", [[1, 2], {"a": 1}, None])
def test_env_with_non_scalar_value(value):
    msg = parse_error({"env": {"GOOD": "x", "BAD": value}, "hosts": ["a"]})
    assert msg.startswith("hosts.yaml: env.BAD: must be a string or number")


def test_env_must_be_a_mapping():
    assert parse_error({"hosts": [{"host": "a", "env": ["A=1"]}]}).startswith(
        "hosts.yaml: hosts[0].env: must be a mapping")


@pytest.mark.parametrize("field", ["name", "addr"])
def test_name_or_addr_on_a_range_is_rejected(field):
    msg = parse_error(["ok", {"host": "gpu[1-2]", field: "x"}])
    assert msg.startswith("hosts.yaml: hosts[1]: ")
    assert "`name` and `addr` cannot be used with a host range" in msg


@pytest.mark.parametrize("spec", ["gpu[3-1]", "gpu[c-a]", "gpu[1-b]", "gpu[", "gpu]", "gpu[1-2][3-4]",
                                  "gpu[aa-bb]", "gpu[1-200000]"])
def test_bad_ranges(spec):
    msg = parse_error(["ok", spec])
    assert msg.startswith("hosts.yaml: hosts[1]: ")


@pytest.mark.parametrize("data, where", [
    ({"hosts": []}, "hosts"),
    ({"hosts": "gpu-a"}, "hosts"),
    ({"user": "x"}, "hosts"),
    ({"hosts": [["a"]]}, "hosts[0]"),
    ({"hosts": ["a", None]}, "hosts[1]"),
    ({"hosts": ["a"], "setup": {"x": 1}}, "setup"),
    ({"hosts": ["a"], "connect_timeout": 0}, "connect_timeout"),
    ({"hosts": [{"host": "a", "user": ["x"]}]}, "hosts[0].user"),
    ({"hosts": [{"host": "a", "workdir": "x\ny"}]}, "hosts[0].workdir"),
])
def test_structural_mistakes_name_the_field(data, where):
    assert parse_error(data).startswith(f"hosts.yaml: {where}: ")


@pytest.mark.parametrize("data", ["gpu-a", 42, 1.5, True])
def test_top_level_must_be_a_mapping_or_list(data):
    parse_error(data)


def test_errors_in_a_file_name_the_file_entry_and_field(tmp_path):
    e = load_error(tmp_path, "hosts:\n  - gpu-a\n  - host: gpu-b\n    nproc_per_node: four\n")
    assert str(e) == f"{tmp_path / 'hosts.yaml'}: hosts[1].nproc_per_node: must be a positive integer or `gpu`, got 'four'"


# --- inputs that once crashed the parser: each is a HostsFileError now ----------------


@pytest.mark.parametrize("entry", ["gpu-a:²", "gpu[¹-³]"])
def test_superscript_digits_in_a_count_or_a_range_are_refused(entry):
    parse_error(["ok", entry])


@pytest.mark.parametrize("entry", ["gpu-a:" + "9" * 5000, "gpu[1-" + "9" * 5000 + "]"])
def test_huge_numbers_in_a_count_or_a_range_are_refused(entry):
    parse_error(["ok", entry])


@pytest.mark.parametrize("entry", ["gpu-a\n", "gpu[1-2]\n"])
def test_a_host_with_a_trailing_newline_is_refused(entry):
    parse_error(["ok", entry])


def test_an_env_key_with_a_trailing_newline_is_refused():
    parse_error({"env": {"FOO\n": 1}, "hosts": ["a"]})


@pytest.mark.parametrize("text", [
    "hosts: [2001-13-45]\n",
    "user: 2001-02-30\nhosts: [a]\n",
    "nproc_per_node: " + "9" * 5000 + "\nhosts: [a]\n",
])
def test_yaml_values_pyyaml_cannot_construct_are_refused(tmp_path, text):
    load_error(tmp_path, text)


def test_deeply_nested_yaml_is_refused(tmp_path):
    load_error(tmp_path, "hosts: " + "[" * 500 + "]" * 500)


# --- properties: any input ends as a valid HostsFile or a HostsFileError ------------

SHELL_META = set(" \t\n\r\v\f;&|$`'\"\\<>(){}*?[]!#~=,^")


weird_strings = (
    st.sampled_from([
        "", " ", "gpu-a", "gpu-a:4", "gpu-a:0", "h:x", "::1", "user@h", "localhost", "localhost:2",
        "gpu[01-03]", "n[a-c]", "x[1,3,5-6]", "n[A-c]", "n[,]", "gpu[3-1]", "[", "]", "a[b",
        "a;b", "$(x)", "`id`", "a b", "a\nb", "~", "-v", "%", "@", "a@", "@b", "\x00", "é", "日本",
        "auto", "29500", "NCCL_DEBUG", "1ABC", "A=B", "true", "null",
    ])
    | st.text(max_size=12)
    | st.text(alphabet="ab01:[]-,@.;$ \n", max_size=12)
    # a plausible host with one arbitrary character somewhere: is that character let through?
    | st.tuples(st.from_regex(r"[a-z][a-z0-9.@-]{0,5}", fullmatch=True), st.characters(),
                st.sampled_from(["", "1", ":2", "[1-2]", "[a-b]:3"]), st.booleans())
        .map(lambda t: t[0] + t[1] + t[2] if t[3] else t[0] + t[2] + t[1])
)

keys = st.sampled_from(sorted(TOP_KEYS | HOST_KEYS)) | weird_strings | st.integers(-3, 3) | st.none()
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | weird_strings)
yamlish = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=20,
)
odd = scalars | st.lists(scalars, max_size=2) | st.dictionaries(keys, scalars, max_size=2)


def mostly(good, other=odd):
    """`good` nine times in ten: one bad field makes the whole file an error, and we want
    plenty of files that get all the way through validation."""
    return st.integers(0, 9).flatmap(lambda i: other if i == 0 else good)


valid_host = st.builds(
    lambda user, body, rng, nproc: f"{user}g{body}{rng}{nproc}",
    st.sampled_from(["", "alice@"]), st.text("az09.-", max_size=5),
    st.sampled_from(["", "[01-03]", "[a-c]", "[1,3,5-6]"]), st.sampled_from(["", ":1", ":4"]),
)
host_text = mostly(valid_host, weird_strings)
env = st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,5}", fullmatch=True) | weird_strings | st.integers(),
                      mostly(scalars, st.lists(scalars, max_size=2)), max_size=4)
FIELD = {
    "nproc_per_node": st.integers(-1, 16), "port": st.integers(-1, 70000),
    "master_port": st.integers(-1, 70000) | st.just("auto"), "connect_timeout": st.floats(-1, 700),
    "env": env, "setup": weird_strings | st.lists(weird_strings, max_size=3),
}


def field(key: str):
    return mostly(FIELD.get(key, host_text))


host_entry = mostly(
    host_text
    | st.fixed_dictionaries({"host": host_text},
                            optional={k: field(k) for k in sorted(HOST_KEYS - {"host"})}),
    st.dictionaries(keys, odd, max_size=4),
)
shaped = st.fixed_dictionaries(
    {"hosts": mostly(st.lists(host_entry, min_size=1, max_size=4))},
    optional={k: field(k) for k in sorted(TOP_KEYS - {"hosts"})},
)


def check_outcome(fn) -> None:
    try:
        hf = fn()
    except HostsFileError as e:
        assert e.exit_code == 2
        return
    assert isinstance(hf, HostsFile) and hf.hosts
    for h in hf.hosts:
        assert isinstance(h.nproc_per_node, int) and not isinstance(h.nproc_per_node, bool)
        assert h.nproc_per_node >= 1
        assert h.host and h.host.isascii() and h.host.isprintable()
        assert not SHELL_META & set(h.host), h.host
        for k, v in h.env.items():
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) and isinstance(v, str) and "\x00" not in v
        assert h.port is None or 1 <= h.port <= 65535
    assert hf.master_port == "auto" or 1 <= hf.master_port <= 65535


@settings(max_examples=150, deadline=None)
@given(mostly(shaped, yamlish))
@example({"hosts": ["a;b"]})
@example({"hosts": [{"host": "n[a-c]", "name": "x"}]})
@example({"hosts": [{"host": "a", "env": {"K": [1]}}]})
def test_parse_hosts_never_fails_with_anything_but_HostsFileError(data):
    check_outcome(lambda: parse_hosts(data, "hosts.yaml"))


@settings(max_examples=100, deadline=None)
@given(valid_host, st.characters(), st.integers(0, 20), st.booleans())
def test_any_character_in_a_host_is_rejected_or_harmless(host, char, at, as_mapping):
    spec = host[:at] + char + host[at:]
    entry = {"host": spec} if as_mapping else spec
    check_outcome(lambda: parse_hosts(["ok", entry], "hosts.yaml"))


yaml_fragments = st.sampled_from([
    "hosts:", "\n", "  ", "- ", "gpu-a", ":4", "host: ", "nproc_per_node: ", "env:", "A: ", "1", "0",
    "four", "[", "]", "{", "}", ",", '"', "'", "#", "&a", "*a", "!!str ", "!!python/object:os.system ",
    "? ", "|", ">", "---", "...", "%YAML 1.1", "\t", "port: ", "70000", "auto", "~", "null", ";", "$(x)",
    "é", "\\", "@", "gpu[01-03]", "n[a-c]",
])
yaml_texts = st.lists(yaml_fragments, max_size=40).map("".join) | st.text(max_size=80)


def _write_tmp(raw: bytes) -> str:
    with tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False) as f:
        f.write(raw)
    return f.name


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=200),
    yaml_texts
              .map(lambda t: t.encode("utf-8")),
))
def test_load_hosts_on_any_bytes_gives_a_hostsfile_or_a_hostsfileerror(raw):
    path = _write_tmp(raw)
    try:
        check_outcome(lambda: load_hosts(path))
    finally:
        Path(path).unlink()


def test_the_same_host_twice_is_refused_unless_named_apart(tmp_path):
    with pytest.raises(HostsFileError) as e:
        parse_hosts({"hosts": ["gpu-a", "gpu-b", "gpu-a:2"]}, "hosts.yaml")
    assert str(e.value).startswith("hosts.yaml: hosts[2]: `gpu-a` is already hosts[0]")
    with pytest.raises(HostsFileError):
        parse_hosts({"hosts": ["gpu[1-3]", "gpu2"]}, "hosts.yaml")
    ok = parse_hosts({"hosts": [{"host": "localhost", "name": "a"}, {"host": "localhost", "name": "b"}]})
    assert [h.name for h in ok.hosts] == ["a", "b"]


# --- hang_timeout / on_hang ------------------------------------------------------------


@pytest.mark.parametrize("value, seconds", [(300, 300.0), ("90s", 90.0), ("5m", 300.0), ("1.5h", 5400.0),
                                            ("2.5", 2.5)])
def test_hang_timeout_accepts_seconds_and_units(value, seconds):
    hf = parse_hosts({"hang_timeout": value, "on_hang": "kill", "hosts": ["a"]})
    assert (hf.hang_timeout, hf.on_hang) == (seconds, "kill")


@pytest.mark.parametrize("text", ["hang_timeout: 5 min", "hang_timeout: 0", "hang_timeout: -3",
                                  "hang_timeout: true", "on_hang: stop"])
def test_a_bad_hang_setting_is_named(tmp_path, text):
    e = load_error(tmp_path, text + "\nhosts: [a]\n")
    assert text.split(":")[0] in str(e)


# --- start_timeout ----------------------------------------------------------------------


@pytest.mark.parametrize("value, seconds", [(30, 30.0), ("90s", 90.0), ("15m", 900.0), ("1h", 3600.0)])
def test_start_timeout_accepts_seconds_and_units(value, seconds):
    assert parse_hosts({"start_timeout": value, "hosts": ["a"]}).start_timeout == seconds


def test_start_timeout_defaults_to_ten_minutes():
    assert parse_hosts({"hosts": ["a"]}).start_timeout == 600.0


@pytest.mark.parametrize("text", ["start_timeout: 0", "start_timeout: -1", "start_timeout: soon",
                                  "start_timeout: true", "start_timeout: 10 min"])
def test_a_bad_start_timeout_is_named(tmp_path, text):
    e = load_error(tmp_path, text + "\nhosts: [a]\n")
    assert "start_timeout" in str(e) and "duration" in str(e)


# --- restarts and spares ----------------------------------------------------------------


def test_restarts_and_spares_parse_with_the_defaults_of_hosts():
    hf = parse_hosts({"user": "alice", "nproc_per_node": 4, "max_restarts": 3, "restart_delay": "10s",
                      "hosts": ["a", "b"], "spares": ["c", {"host": "d", "nproc_per_node": 2}]})
    assert (hf.max_restarts, hf.restart_delay) == (3, 10.0)
    assert [(s.name, s.user, s.nproc_per_node) for s in hf.spares] == [("c", "alice", 4), ("d", "alice", 2)]
    assert (parse_hosts({"hosts": ["a"]}).max_restarts, parse_hosts({"hosts": ["a"]}).spares) == (0, ())


@pytest.mark.parametrize("text, field", [
    ("max_restarts: -1\nhosts: [a]", "max_restarts"), ("max_restarts: two\nhosts: [a]", "max_restarts"),
    ("restart_delay: soon\nhosts: [a]", "restart_delay"), ("spares: c\nhosts: [a]", "spares"),
    ("hosts: [a]\nspares: [a]", "spares[0]"),
])
def test_bad_restart_settings_are_named(tmp_path, text, field):
    assert field in str(load_error(tmp_path, text + "\n"))


def test_the_restart_settings_a_detached_run_receives_come_back_whole():
    from clusterrun.run.attempts import Restarts
    from clusterrun.options import LaunchOptions

    hf = parse_hosts({"max_restarts": 2, "gpus": "0-1", "setup": ["a", "b"], "env": {"K": "v"},
                      "hosts": ["x", "y:gpu"], "spares": [{"host": "z", "port": 2222}]})
    r = Restarts(hf, LaunchOptions("t.py", ("--lr", "1"), env={"T": "s"}, nproc_per_node=None), 2, 1.5)
    assert Restarts.from_json(r.to_json()) == r

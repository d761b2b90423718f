"""Unit: scriptlint as a library, beyond tests/test_lint.py's checks (which stay as they were)."""

from __future__ import annotations

import textwrap

from clusterrun.scriptlint import lint_source


def test_a_long_device_string_from_the_launch_argument_is_named_in_full():
    # CR006 names the device use; when that is a long f-string rather than a call,
    # it used to fail with AttributeError (a traceback from `lint` and from `up`).
    name = "the_local_rank_that_torch_distributed_launch_used_to_pass_on_argv"
    source = textwrap.dedent(f"""\
        import argparse
        parser = argparse.ArgumentParser()
        parser.add_argument("--local_rank", type=int, default=0)
        args = parser.parse_args()
        {name} = args.local_rank
        device = f"cuda:{{{name}}}"
        """)
    [finding] = lint_source(source, "train.py")
    assert (finding.line, finding.code) == (3, "CR006")
    assert f"so f'cuda:{{{name}}}' (line 6) gives every process of a node the same device" \
        in finding.message

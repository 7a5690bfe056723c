"""Every PowerShell script the Hyper-V source can send parses with the tree-sitter PowerShell grammar
(no ERROR or MISSING node) and binds exactly the values it was given, hostile ones included.

PowerShell cannot run here, so the grammar stands in for the parser; the values are read back with
PowerShell's quoting rules (fakehost.parse_script), which is what would catch an injection.
"""

from __future__ import annotations

import base64

import pytest

from collectors.sources.hyperv import scripts
from tests.hyperv import fakehost

HOSTILE = [
    "O'Brien",
    "it''s",
    "'; Remove-Item -Recurse C:\\ ; '",
    "$env:USERNAME $(Stop-Computer) ${x}",
    "back`tick`n`$x`",
    "line1\nline2\r\nline3",
    'double "quotes" and @{ } @( ) { }',
    "smart \u2018single\u2019 \u201alow\u201b quotes",
    "D:\\Hyper-V\\O'Brien $web `x`\\Virtual Hard Disks\\sys.vhdx",
    "rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001",
    "Microsoft:5B3D9E6A\\83F8638B\\0\\0\\L",
    "<#", "#>", "# not a comment", "",
    "ünïcödé 日本語 🙂",
]


def sample_params(operation: scripts.Operation, value: str) -> dict[str, scripts.Value]:
    """Strings for every parameter, with the integer ones given integers as the source does."""
    ints = {"ConsistencyLevel", "WaitSeconds", "Offset", "Length", "RequestedState"}
    return {name: (2**63 - 1 if name in ints else value) for name in operation.params}


@pytest.mark.parametrize("op", sorted(scripts.OPERATIONS))
def test_every_script_parses_and_binds_hostile_values(op: str) -> None:
    operation = scripts.OPERATIONS[op]
    for value in HOSTILE:
        params = sample_params(operation, value)
        script = scripts.render(op, **params)
        assert fakehost.syntax_errors(script) == [], (op, value)
        assert fakehost.parse_script(script) == (op, params)


def test_bootstrap_parses_and_fits_the_command_line() -> None:
    assert fakehost.syntax_errors(scripts.BOOTSTRAP) == []
    assert base64.b64decode(scripts.encode_bootstrap()).decode("utf-16-le") == scripts.BOOTSTRAP
    assert len(scripts.encode_bootstrap()) < 2000  # cmd.exe allows 8191 characters in all
    longest = max(scripts.render(op, **sample_params(o, "x" * 300)) for op, o in scripts.OPERATIONS.items())
    assert len(longest) > 3000  # too long for -EncodedCommand, hence stdin
    assert base64.b64decode(scripts.encode_stdin(longest)).decode() == longest


def test_every_script_reports_through_the_wrapper() -> None:
    """One JSON document out, errors caught: the body sits inside the top-level try of the wrapper."""
    for op, operation in scripts.OPERATIONS.items():
        script = scripts.render(op, **sample_params(operation, "v"))
        assert "{body}" not in script
        head, _, rest = script.partition("\ntry {\n")
        assert "function Get-ByKey" in head and "$result = " in rest.split("\n} catch {")[0]
        assert rest.endswith("    exit 1\n}\n")
        assert "ConvertTo-Json -InputObject @{ result = $result } -Compress -Depth 8" in rest


@pytest.mark.parametrize(("value", "expected"), [
    (None, "$null"), (True, "$true"), (False, "$false"), (0, "0"), (18446744073709551615, "18446744073709551615"),
    ("plain", "'plain'"), ("O'Brien", "'O''Brien'"), ("a\u2019b", "'a\u2019\u2019b'"), ("$x`", "'$x`'"),
])
def test_literal(value: scripts.Value, expected: str) -> None:
    assert scripts.literal(value) == expected


def test_literal_refuses_what_it_cannot_express() -> None:
    with pytest.raises(ValueError, match=r"NUL"):
        scripts.literal("a\x00b")
    with pytest.raises(TypeError):
        scripts.literal(1.5)  # type: ignore[arg-type]


def test_render_checks_parameter_names() -> None:
    with pytest.raises(TypeError, match=r"takes"):
        scripts.render("changes", Path="x")
    with pytest.raises(TypeError, match=r"takes"):
        scripts.render("vms", Extra="x")

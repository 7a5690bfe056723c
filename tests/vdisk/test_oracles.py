"""A missing oracle must fail the run on CI (CI=true) and only skip on a developer machine."""

from __future__ import annotations

import pytest

from .conftest import need_module, need_tool


def test_missing_oracle_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install no-such-package"):
        need_tool("no-such-tool-3f9a", "no-such-package")
    with pytest.raises(pytest.skip.Exception, match="pip install no-such-dist"):
        need_module("no_such_module_3f9a", "no-such-dist")


def test_missing_oracle_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-3f9a is not installed"):
        need_tool("no-such-tool-3f9a", "no-such-package")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_3f9a is not installed"):
        need_module("no_such_module_3f9a", "no-such-dist")

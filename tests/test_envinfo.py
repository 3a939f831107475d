"""env.json's provenance: the commit a run measured."""

from packinfer_bench.envinfo import git_sha


def test_git_sha_prefers_the_sha_the_caller_names(monkeypatch, tmp_path):
    monkeypatch.setenv("PACKINFER_GIT_SHA", "abc123")
    assert git_sha() == "abc123"
    monkeypatch.delenv("PACKINFER_GIT_SHA")
    assert git_sha(tmp_path) is None  # no checkout, no variable

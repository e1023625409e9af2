"""``storyline runner --remote``: broken and hostile options are refused with a clear error
before anything is cloned, started or written."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from runners.__main__ import default_clone_dir, main


@pytest.fixture
def remote(tmp_path: Path) -> str:
    seed = tmp_path / "seed"
    seed.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(seed)], check=True)
    (seed / "storyline.toml").write_text('base_branch = "main"\n')
    subprocess.run(["git", "-C", str(seed), "add", "-A"], check=True)
    subprocess.run(
        ["git", "-C", str(seed), "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "i"],
        check=True,
    )
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(bare)], check=True)
    return bare.as_uri()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ([], "needs the shared database"),
        (["--database-url", "sqlite:///x.db", "--project", "."], "exclude each other"),
        (["--database-url", "sqlite:///x.db", "--worker-id", "bad id;rm"], "--worker-id"),
        (["--database-url", "sqlite:///x.db", "--worker-id=-x"], "--worker-id"),
        (["--database-url", "sqlite:///x.db", "--lease-ttl", "0.1"], "--lease-ttl"),
    ],
)
def test_bad_options_are_refused_before_cloning(
    remote: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    says: str,
) -> None:
    monkeypatch.delenv("STORYLINE_DATABASE_URL", raising=False)
    monkeypatch.delenv("STORYLINE_DATABASE_URL_FILE", raising=False)
    clone = tmp_path / "clone"
    assert main(["--remote", remote, "--clone-dir", str(clone), *extra]) == 2
    assert says in capsys.readouterr().err
    assert not clone.exists()


def test_an_unreachable_remote_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clone = tmp_path / "clone"
    missing = (tmp_path / "nowhere.git").as_uri()
    code = main(
        ["--remote", missing, "--clone-dir", str(clone), "--database-url", "sqlite:///x.db"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nowhere.git" in err
    assert not clone.exists()


def test_a_clone_of_another_remote_is_never_repointed(
    remote: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    subprocess.run(["git", "clone", "-q", remote, str(other)], check=True)
    subprocess.run(
        ["git", "-C", str(other), "remote", "set-url", "origin", "https://example.invalid/x.git"],
        check=True,
    )
    code = main(["--remote", remote, "--clone-dir", str(other), "--database-url", "sqlite:///x"])
    assert code == 2
    assert "example.invalid" in capsys.readouterr().err


def test_default_clone_dirs_differ_per_remote_and_stay_inside_the_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    a = default_clone_dir("git@host:team/app.git")
    b = default_clone_dir("https://host/other/app.git")
    hostile = default_clone_dir("file:///../../etc/passwd/..")
    assert a != b and a.name.startswith("app.git-")
    for path in (a, b, hostile):
        assert path.parent == tmp_path / "storyline" / "clones"

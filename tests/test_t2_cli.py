"""The command line on bad input: one clear line on stderr, exit status 1, nothing changed."""

from __future__ import annotations

from pathlib import Path

from harness import cdpfs


def _one_line_error(proc, *words: str) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdpfs: error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_init_status_verify(tmp_path: Path) -> None:
    store = tmp_path / "s"
    assert "initialised" in cdpfs("init", store).stdout
    out = cdpfs("status", store).stdout
    assert "1 records" in out and "in use       no" in out
    assert cdpfs("verify", store).stdout.strip().endswith(": ok")


def test_bad_paths(tmp_path: Path) -> None:
    _one_line_error(cdpfs("status", tmp_path / "nope", check=False), "no such store")
    _one_line_error(cdpfs("verify", tmp_path, check=False), "not a cdpfs store")
    _one_line_error(cdpfs("umount", tmp_path, check=False), "no cdpfs volume is mounted")
    (tmp_path / "file").write_text("x")
    _one_line_error(cdpfs("init", tmp_path / "file", check=False), "not a directory")
    _one_line_error(cdpfs("init", tmp_path / "s", "--block-size", "1000", check=False),
                    "power of two")
    assert (tmp_path / "file").read_text() == "x"
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())

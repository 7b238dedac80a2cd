from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

import netchan
from netchan.identity import check_node_id, node_id_of


def test_node_id_is_stable_and_short(tmp_path):
    ident = netchan.Identity.generate()
    assert len(ident.node_id) == 32
    assert ident.node_id == node_id_of(ident.public_key)
    assert check_node_id(ident.node_id.upper()) == ident.node_id
    path = tmp_path / "k"
    ident.save(path)
    assert netchan.Identity.load(path).node_id == ident.node_id
    assert netchan.Identity.generate().node_id != ident.node_id


def test_saved_key_is_private(tmp_path):
    path = tmp_path / "k"
    old = os.umask(0)
    try:
        netchan.Identity.generate().save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_loading_a_key_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "k"
    netchan.Identity.generate().save(path)
    path.chmod(0o644)
    with pytest.raises(netchan.KeyFileError, match="chmod 600"):
        netchan.Identity.load(path)


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "k"
    netchan.Identity.generate().save(path)
    with pytest.raises(netchan.KeyFileError, match="exists"):
        netchan.Identity.generate().save(path)


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nxx\n"])
def test_malformed_key_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "k"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(netchan.KeyFileError, match="not a netchan key file"):
        netchan.Identity.load(path)


def test_missing_key_file(tmp_path):
    with pytest.raises(netchan.KeyFileError, match="not found"):
        netchan.Identity.load(tmp_path / "nope")


@pytest.mark.parametrize("bad", ["", "abc", "!" * 32, 42])
def test_bad_node_ids_are_rejected(bad):
    with pytest.raises(netchan.ConfigurationError):
        check_node_id(bad)


def test_cli_keygen_and_id(tmp_path):
    path = tmp_path / "node.key"
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "netchan", *a], capture_output=True, text=True, timeout=60
    )
    made = run("keygen", "-o", str(path))
    assert made.returncode == 0, made.stderr
    node_id = made.stdout.strip()
    assert check_node_id(node_id) == node_id
    again = run("id", str(path))
    assert again.returncode == 0 and again.stdout.strip() == node_id
    assert run("keygen", "-o", str(path)).returncode != 0  # no silent overwrite
    path.chmod(0o640)
    refused = run("id", str(path))
    assert refused.returncode != 0 and "chmod 600" in refused.stderr

"""Retention inside a running mount: the periodic prune frees history the policy
no longer keeps, while the volume stays in use and every kept point stays intact."""

from __future__ import annotations

import errno
import os
import re
import time

import pytest
from harness import Volume, cdpfs, last_seq, wait_until


def _stored_mib(vol: Volume) -> float:
    out = cdpfs("stat", vol.store).stdout
    return float(re.search(r"stored\s+([\d,.]+) MiB", out)[1].replace(",", ""))  # type: ignore[index]


def test_mount_prunes_periodically_and_keeps_bookmarks(make_volume: type[Volume]) -> None:
    vol = make_volume("vol").init()
    cdpfs("retention", vol.store, "--keep-all", "1s", "--prune-interval", "1s")
    vol.mount()
    try:
        versions = [os.urandom(300_000) for _ in range(15)]
        seqs = []
        for data in versions:
            (vol.mnt / "f").write_bytes(data)
            seqs.append(last_seq(vol))
        cdpfs("bookmark", "third", "--at", f"#{seqs[2]}", "--volume", vol.mnt)
        before = _stored_mib(vol)
        assert before > 4  # 15 versions of 300 kB of random data
        log = vol.store / "cdpfs.log"
        wait_until(lambda: re.search(r"pruned: [1-9]\d* versions", log.read_text()) is not None,
                   timeout=30, what="the mount's periodic prune")
        wait_until(lambda: _stored_mib(vol) < before / 2, timeout=30, what="space to be freed")
        # The bookmark and the live state are intact; a thinned point is gone.
        assert (vol.mnt / "@third" / "f").read_bytes() == versions[2]
        assert (vol.mnt / f"@#{seqs[2]}" / "f").read_bytes() == versions[2]
        assert (vol.mnt / "f").read_bytes() == versions[-1]
        with pytest.raises(OSError) as exc:
            (vol.mnt / f"@#{seqs[5]}" / "f").read_bytes()
        assert exc.value.errno == errno.ENOENT
        # Writing goes on while pruning runs every second.
        (vol.mnt / "g").write_bytes(versions[0])
        time.sleep(1.5)
        assert (vol.mnt / "g").read_bytes() == versions[0]
        vol.umount()
    finally:
        vol.cleanup()
    vol.verify()
    bad = [line for line in log.read_text().splitlines() if " ERROR " in line]
    assert not bad, bad

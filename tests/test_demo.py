"""The README's main job: `kachery demo` computes, then loads everything, then recomputes one branch,
then a second node sharing the first one's bucket computes nothing."""

from __future__ import annotations

import re
from pathlib import Path


def test_demo_three_runs(kachery) -> None:
    proc = kachery("demo", "--recordings", "2", "--duration", "1", timeout=300)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    rows = {m.group(1).strip(): tuple(int(x) for x in m.groups()[1:4])
            for m in re.finditer(r"│ ([a-z0-9 ,]+?)\s*│ (\d+)\s*│ (\d+)\s*│ (\d+)\s*│", out)}
    assert rows["first run"] == (10, 0, 0)  # 5 stages x 2 recordings, all computed
    assert rows["run again"] == (0, 2, 8)  # 2 summaries loaded, everything upstream pruned
    computed, loaded, _ = rows["threshold of rec00 changed"]
    assert computed == 3 and loaded == 2  # detect, features, summary of rec00; its filter and rec01 load
    # a second node with a home of its own shares the first node's bucket: it computes nothing
    assert rows["second node, shared bucket"] == (0, 2, 8)
    lab = re.search(r"results published to file://(\S+)/bucket$", out, re.M).group(1)
    assert not Path(lab).exists(), "the second node's home and the bucket are temporary"
    # the temporary home printed at the start is deleted: the last line says so, and how to keep one
    home = re.search(r"^home: (\S+)$", out, re.M).group(1)
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"removed the demo's temporary home {home};") and "kachery demo --keep" in last, last
    assert not Path(home).exists()


def test_demo_help_documents_keep(kachery) -> None:
    proc = kachery("demo", "--help")
    text = " ".join(proc.stdout.decode().split())
    assert proc.returncode == 0 and "--keep" in text
    assert "temporary home" in text and "deleted at the end" in text


def test_demo_bad_option_is_one_line(kachery) -> None:
    proc = kachery("demo", "--recordings", "0")
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr

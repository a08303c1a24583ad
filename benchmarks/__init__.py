"""Runnable comparisons of kachery-tasks against peers: ``python -m benchmarks [NAME...]``.

Each module ``benchmarks/<name>.py`` defines ``run() -> list[dict]``; each row has ``case``,
``ours_s``, ``peer``, ``peer_s``, ``ratio`` (ours / peer: below 1 means we are faster) and may have
``note`` and ``target``. The runner prints a table and writes ``benchmarks/results/<name>.json``.
"""

"""`rpo cache export | import | stats` as a user runs them, against the real service."""

from __future__ import annotations

import json

from cache_helpers import TOKEN, entry

from services.cli.main import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


async def test_export_import_and_stats_commands(cache, cache_url, run_id, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RPO_API_TOKEN", TOKEN)
    await cache.put_entries(run_id, [entry(f"q{i}", [i, i]) for i in range(25)])
    common = ["--set", f"services.cache_url={cache_url}"]
    path = tmp_path / "run.ndjson"

    code, out, _ = run(capsys, "cache", "stats", *common, "--set", f"services.run_id={run_id}")
    assert code == 0 and json.loads(out) == {"run_id": run_id, "entries": 25, "trained_steps": 0}
    code, _, err = run(capsys, "cache", "stats", *common)  # `auto` names no run
    assert code == 2 and "name it with --set services.run_id=ID" in err

    code, out, _ = run(
        capsys, "cache", "export", "--out", str(path), *common, "--set", f"services.run_id={run_id}"
    )
    assert code == 0 and json.loads(out)["entries"] == 25 and path.is_file()

    target = run_id + "-imported"
    try:
        code, out, _ = run(
            capsys, "cache", "import", "--file", str(path), *common, "--set", f"services.run_id={target}"
        )
        assert code == 0 and json.loads(out)["entries"] == 25
        assert (await cache.stats(target)).entries == 25
    finally:
        await cache.delete_run(target)

    code, _, err = run(
        capsys,
        "cache",
        "import",
        "--file",
        str(tmp_path / "missing"),
        *common,
        "--set",
        f"services.run_id={target}",
    )
    assert code == 2 and "no such file" in err
    monkeypatch.setenv("RPO_API_TOKEN", "wrong")
    code, _, err = run(
        capsys, "cache", "import", "--file", str(path), *common, "--set", f"services.run_id={target}"
    )
    assert code == 2 and "401" in err and "wrong" not in err.replace("missing or wrong", "")

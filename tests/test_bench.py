"""`vlexport bench` works end to end (numbers are not asserted: timings belong in bench/results, not in tests)."""

import json

from typer.testing import CliRunner

from vlexport.cli import app


def test_bench_writes_json_markdown_and_plot(full_bundle, tmp_path):
    r = CliRunner().invoke(app, ["bench", str(full_bundle), "--repeats", "2", "--contexts", "8,32", "--json",
                                 "--plot", str(tmp_path / "b.png"), "--markdown", str(tmp_path / "b.md")])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    metrics = {row["metric"] for row in result["rows"]}
    assert metrics == {"vision_ms", "ttft_ms", "prefill_ms", "decode_ms", "e2e_tokens_per_s", "peak_rss_mb"}
    for row in result["rows"]:
        assert row["bundle"] > 0 and row["pytorch"] > 0 and row["ratio"] > 0
    decode = [row for row in result["rows"] if row["metric"] == "decode_ms"]
    assert [row["context"] for row in decode] == [8, 32] and all(row["floor_ms"] > 0 for row in decode)
    assert all("prompt_tokens" in row for row in result["rows"] if row["metric"] in ("ttft_ms", "prefill_ms"))
    assert result["read_bandwidth_gbs"] > 0 and result["machine"]["cores"] >= 1
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "| decode_ms | context 8 |" in (tmp_path / "b.md").read_text()


def test_bench_bad_contexts(full_bundle):
    r = CliRunner().invoke(app, ["bench", str(full_bundle), "--contexts", "a,b"])
    assert r.exit_code == 2 and "--contexts" in r.output

"""`vlexport bench` works end to end (numbers are not asserted: timings belong in bench/results, not in tests)."""

from pathlib import Path

from typer.testing import CliRunner

from test_cli import validate
from vlexport.cli import app


def test_bench_writes_json_markdown_and_plot(full_bundle, tmp_path):
    r = CliRunner().invoke(app, ["bench", str(full_bundle), "--repeats", "2", "--contexts", "8,32", "--json",
                                 "--plot", str(tmp_path / "b.png"), "--markdown", str(tmp_path / "b.md")])
    assert r.exit_code == 0, r.output
    result = validate("bench", r.stdout)
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


def test_bench_compare_times_every_bundle_against_one_pytorch_run(tiny_base, full_bundle, tmp_path):
    """--compare: per-part latency of an FP32 and an INT8 bundle of one model, each against the same PyTorch run;
    the INT8 decoder's floor counts the bytes it stores, so it is lower than the FP32 one."""
    fp32, int8 = tmp_path / "fp32", tmp_path / "int8"
    for out, target in ((fp32, "cpu"), (int8, "cpu-int8")):
        r = CliRunner().invoke(app, ["build", "--base", str(tiny_base), "-o", str(out), "--target", target, "--no-verify"])
        assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["bench", str(fp32), "--compare", str(int8), "--repeats", "2", "--contexts", "8",
                                 "--json", "--markdown", str(tmp_path / "c.md")])
    assert r.exit_code == 0, r.output
    rows = validate("bench --compare", r.stdout)["rows"]
    assert {(row["bundle"], row["metric"]) for row in rows} == {
        (b, m) for b in ("fp32", "int8") for m in ("vision_ms", "prefill_ms", "decode_ms")}
    assert {row["precision"] for row in rows if row["bundle"] == "fp32"} == {"fp32"}
    assert "decoder int8 (dynamic)" in next(row["precision"] for row in rows if row["bundle"] == "int8")
    floors = {row["bundle"]: row["floor_ms"] for row in rows if row["metric"] == "decode_ms"}
    assert 0 < floors["int8"] < floors["fp32"]
    assert all(row["ms"] > 0 and row["pytorch"] > 0 and row["ratio"] > 0 for row in rows)
    # Bundles of different models are refused: one PyTorch baseline must fit them all.
    r = CliRunner().invoke(app, ["bench", str(fp32), "--compare", str(full_bundle), "--repeats", "1"])
    assert r.exit_code == 2 and "another base or other adapters" in r.output


def test_bench_peer_builds_onnxruntime_genai_from_the_merged_weights(full_bundle, tmp_path):
    """--peer onnxruntime-genai: the builder's model of the bundle's merged language model, timed in the same run;
    prefill and decode rows get a peer column, in the JSON, the markdown and the plot."""
    r = CliRunner().invoke(app, ["bench", str(full_bundle), "--peer", "onnxruntime-genai", "--repeats", "2",
                                 "--contexts", "8,32", "--no-rss", "--json", "--plot", str(tmp_path / "p.png"),
                                 "--markdown", str(tmp_path / "p.md")])
    assert r.exit_code == 0, r.output
    result = validate("bench", r.stdout)
    assert result["peer"]["name"] == "onnxruntime-genai" and result["peer"]["precision"] == "fp32"
    peered = [row for row in result["rows"] if "peer" in row]
    assert {row["metric"] for row in peered} == {"prefill_ms", "decode_ms"}
    assert all(row["peer"] > 0 and row["peer_ratio"] > 0 for row in peered)
    assert "| decode_ms | context 8 |" in (tmp_path / "p.md").read_text() and "vs peer" in (tmp_path / "p.md").read_text()
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_peer_weights_are_the_bundles(full_bundle, tmp_path):
    """The peer's Llama directory holds the bundle's merged weights: its logits equal the bundle's decoder's."""
    import numpy as np

    from vlexport.bench.peer import PeerSide, build_peer, write_llama_dir
    from vlexport.bench.run import merged_torch_model
    from vlexport.runtime import Bundle

    bundle = Bundle(full_bundle)
    model = merged_torch_model(bundle.manifest)
    llama = write_llama_dir(model, Path(bundle.manifest["base"]["path"]), tmp_path / "llama")
    peer = PeerSide(build_peer(llama, tmp_path / "peer", "fp32", 2, lambda m: None))
    ids = np.arange(3, 40, dtype=np.int64)[None]
    g = peer.generator(ids.size + 4)
    g.append_tokens(ids.astype(np.int32).reshape(-1))
    theirs = np.asarray(g.get_logits()).reshape(-1)
    ours = bundle.prefill(ids, None).logits[0]
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())


def test_bench_peer_refused_where_it_cannot_run(full_bundle):
    r = CliRunner().invoke(app, ["bench", str(full_bundle), "--peer", "llama.cpp"])
    assert r.exit_code == 2 and "--peer" in r.output
    r = CliRunner().invoke(app, ["bench", str(full_bundle), "--peer", "onnxruntime-genai", "--compare", str(full_bundle)])
    assert r.exit_code == 2 and "--peer" in r.output

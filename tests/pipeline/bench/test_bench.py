"""pipeline/bench: each benchmark runs at toy size and reports the fields and same-run ratios it promises."""

import pytest



@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_bench_decode_measures_what_the_formula_says():
    from pipeline.bench.decode import DecodeBench, bench_decode

    row = bench_decode(DecodeBench(context=96, chunk_size=4, leading_tokens=5, dim=32, n_layers=2, n_heads=2, vocab=97,
                                   new_tokens=3), compile=False)
    assert row["compiled"] is False
    assert row["attamba_cache_bytes"] == row["attamba_analytic_cache_bytes"]
    assert row["full_cache_bytes"] == row["full_analytic_cache_bytes"]
    assert row["cache_bytes_ratio"] == row["analytic_cache_bytes_ratio"] < 1
    assert row["attamba_decode_tokens_per_s"] > 0 and row["full_decode_tokens_per_s"] > 0


def test_bench_decode_falls_back_to_eager_when_compiling_fails(monkeypatch):
    import torch._dynamo
    import torch._inductor.config as inductor_config

    from pipeline.bench import decode as bd

    bench = bd.DecodeBench(context=48, chunk_size=4, leading_tokens=5, dim=32, n_layers=1, n_heads=2, vocab=97, new_tokens=2)

    monkeypatch.setattr(bd, "can_compile_decoding", lambda: True)  # a compiler is found, but it does not work
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # no cached kernels to hide the failure
    torch._dynamo.reset()
    try:
        with pytest.warns(UserWarning, match="torch.compile failed"):
            row = bd.bench_decode(bench)
    finally:
        torch._dynamo.reset()
    assert row["compiled"] is False and row["compile_error"]
    assert row["attamba_cache_bytes"] == row["attamba_analytic_cache_bytes"] and row["decode_speedup"] > 0
    with pytest.raises(Exception):  # asked for explicitly, a failure is not hidden
        bd.bench_decode(bench, compile=True)
    torch._dynamo.reset()


def test_bench_train_step_reports_both_clocks():
    import statistics

    from pipeline.bench.train_step import TrainStepBench, bench_train_step

    row = bench_train_step(TrainStepBench(seq_len=64, dim=32, n_layers=1, n_heads=2, vocab=97, repeats=3))
    assert len(row["pair_ratios"]) == 3
    assert row["attamba_over_transformer"] == statistics.median(row["pair_ratios"])
    for key in ("attamba_step_s", "transformer_step_s", "attamba_step_cpu_s", "transformer_step_cpu_s",
                "attamba_over_transformer_cpu"):
        assert row[key] > 0, key


def test_bench_matvec_reports_bandwidth_and_ratio():
    from pipeline.bench.matvec import bench_matvec

    row = bench_matvec(shapes=((8, 16), (3, 5)), sweep_bytes=4096, rounds=2, compile=False)
    assert row["compiled"] is False and [r["shape"] for r in row["shapes"]] == [[8, 16], [3, 5]]
    for r in row["shapes"]:
        assert r["linear_gb_per_s"] > 0 and r["matvec_gb_per_s"] > 0 and "compiled_matvec_gb_per_s" not in r
    assert row["matvec_speedup"] > 0 and "compiled_matvec_speedup" not in row

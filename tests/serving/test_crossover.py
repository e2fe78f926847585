"""The measured crossover table: from a benchmark's buckets, per batch size, cached by GPU and shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mp_sglang.method.config import ENV_CACHE_DIR, MultipoleConfig
from mp_sglang.serving import crossover
from mp_sglang.serving.crossover import AttentionShape, Crossover, from_buckets

SHAPE = AttentionShape(q_heads=32, kv_heads=8, head_dim=128, dtype="torch.bfloat16")
K = 1024


def test_the_crossover_is_where_the_method_stays_ahead() -> None:
    dense = {8: {1 * K: 100.0, 2 * K: 100.0, 3 * K: 100.0, 4 * K: 100.0}}
    method = {8: {1 * K: 80.0, 2 * K: 101.0, 3 * K: 97.0, 4 * K: 120.0}}
    # 3K is 3 % behind (beyond the 2 % tolerance): the method is ahead for good only from 4K.
    assert from_buckets(dense, method, K).points == ((8, 4 * K),)
    assert from_buckets(dense, method, K, tolerance=0.05).points == ((8, 2 * K),)
    behind = {8: {k: v * 0.5 for k, v in method[8].items()}}
    assert from_buckets(dense, behind, K).points == ((8, 5 * K),)  # never within the range: its end
    # Buckets below the multipole server's dense_below measured its dense path, not the method.
    level = {8: {k: 100.0 for k in method[8]}}
    assert from_buckets(dense, level, K, method_from=3 * K).points == ((8, 3 * K),)


def test_batch_sizes_between_measured_ones_are_interpolated() -> None:
    table = Crossover(((1, 12 * K), (8, 4 * K), (32, 2 * K)))
    assert table.context_for(1) == 12 * K and table.context_for(4) == round(12 * K - 8 * K * 3 / 7)
    assert table.context_for(20) == 3 * K and table.context_for(64) == 2 * K
    assert table.lowest() == 2 * K
    with pytest.raises(ValueError, match="sorted"):
        Crossover(((8, K), (1, K)))


def test_tables_are_cached_per_gpu_and_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path))
    table = Crossover(((1, 9000), (32, 1500)))
    path = crossover.save(table, SHAPE, "NVIDIA H100 80GB HBM3", source="run 1")
    assert path == tmp_path / "crossover" / "nvidia-h100-80gb-hbm3-q32-kv8-d128-bfloat16.json"
    assert crossover.load(SHAPE, "NVIDIA H100 80GB HBM3") == (table, path)
    other_gpu, _ = crossover.load(SHAPE, "NVIDIA H200")
    other_shape, _ = crossover.load(AttentionShape(40, 8, 128, "bfloat16"), "NVIDIA H100 80GB HBM3")
    assert other_gpu is None and other_shape is None


def test_dense_below_set_by_the_user_overrides_the_table(tmp_path: Path) -> None:
    assert crossover.explicit_dense_below({"MULTIPOLE_DENSE_BELOW": "2048"})
    assert not crossover.explicit_dense_below({"MULTIPOLE_TOKEN_BUDGET": "0.05"})
    config = tmp_path / "multipole.json"
    config.write_text(json.dumps({"dense_below": 2048}))
    assert crossover.explicit_dense_below({"MULTIPOLE_CONFIG": str(config)})
    config.write_text(json.dumps({"token_budget": 0.05}))
    assert not crossover.explicit_dense_below({"MULTIPOLE_CONFIG": str(config)})


def _bench_row(backend: str, batch: int, buckets: dict[int, float]) -> dict:
    return {"backend": backend, "batch": batch, "server_buckets": {str(k): v for k, v in buckets.items()}}


def test_a_bench_e2e_result_becomes_the_cached_table(tmp_path: Path, capsys) -> None:
    """The CLI over a bench_e2e.py JSON: the first backend is the dense one; the multipole one
    indexed from 1K (its label's MULTIPOLE_DENSE_BELOW)."""
    dense = "flashinfer --cuda-graph-max-bs 32"
    method = "MULTIPOLE_DENSE_BELOW=1024 MULTIPOLE_TOKEN_BUDGET=0.05 multipole --cuda-graph-max-bs 32"
    result = {
        "args": {"bucket_tokens": K},
        "device": "NVIDIA H100 80GB HBM3",
        "attention_shape": {"q_heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"},
        "rows": [
            _bench_row(dense, 1, {K: 500, 2 * K: 490, 3 * K: 480}),
            _bench_row(method, 1, {K: 400, 2 * K: 420, 3 * K: 440}),
            _bench_row(dense, 32, {K: 9000, 2 * K: 8000, 3 * K: 7000}),
            _bench_row(method, 32, {K: 8000, 2 * K: 9000, 3 * K: 9100}),
        ],
    }
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(result))
    assert crossover.main([str(bench), "--cache-dir", str(tmp_path)]) == 0
    table, path = crossover.load(
        AttentionShape(32, 8, 128, "bfloat16"), "NVIDIA H100 80GB HBM3", tmp_path / "crossover"
    )
    assert table is not None and table.points == ((1, 4 * K), (32, 2 * K))
    assert str(path) in capsys.readouterr().out
    # It was measured at a 5 % budget: it applies to a server of that budget, not of the default.
    assert table.differences(MultipoleConfig(token_budget=0.05, dense_below=1)) == []
    assert table.differences(MultipoleConfig()) == ["token_budget=0.02 (measured: 0.05)"]
    result["rows"] = [row for row in result["rows"] if row["backend"] == dense]
    bench.write_text(json.dumps(result))
    with pytest.raises(ValueError, match="multipole backend"):
        crossover.main([str(bench), "--cache-dir", str(tmp_path)])


def test_the_cache_folder_variable_is_not_a_method_setting() -> None:
    """Every MULTIPOLE_* variable is a setting and a typo stops start-up; the cache folder is not one."""
    assert MultipoleConfig.from_env({ENV_CACHE_DIR: "/tmp/cache"}) == MultipoleConfig()

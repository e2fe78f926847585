import json

import pytest

from mp_sglang.method.config import MultipoleConfig


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("token_budget", -0.1),
        ("token_budget", 12.5),
        ("token_budget", "2%"),
        ("token_budget", True),
        ("tokens_per_cluster", 0),
        ("tokens_per_cluster", 2.0),
        ("kmeans_block", 8),
        ("kmeans_iters", 0),
        ("update_iters", -1),
        ("update_block", 0),
        ("recent_window", -5),
        ("sink_tokens", -1),
        ("levels", 0),
        ("levels", 9),
        ("level_ratio", 1),
        ("level_budget_multiplier", 0.5),
        ("windowed_rope", "yes"),
        ("dense_below", -1),
        ("decode_path", "triton"),
        ("index_capacity", 0),
        ("max_request_budget", 1.5),
        ("max_request_budget", -0.1),
    ],
)
def test_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MultipoleConfig(**{field: value})


def test_cluster_size_cannot_exceed_block():
    with pytest.raises(ValueError, match="tokens_per_cluster"):
        MultipoleConfig(tokens_per_cluster=64, kmeans_block=32)


def test_budget_is_fraction_or_tokens():
    assert MultipoleConfig(token_budget=0.05).budget_tokens(10_000) == 500
    assert MultipoleConfig(token_budget=300).budget_tokens(10_000) == 300
    assert MultipoleConfig(token_budget=0).budget_tokens(10_000) == 0
    assert MultipoleConfig(token_budget=1.0).budget_tokens(10_000) == 10_000
    assert MultipoleConfig(token_budget=1).budget_tokens(10_000) == 1


def test_from_env_reads_file_then_variables(tmp_path):
    path = tmp_path / "mp.json"
    path.write_text(json.dumps({"token_budget": 0.05, "levels": 2}))
    env = {"MULTIPOLE_CONFIG": str(path), "MULTIPOLE_LEVELS": "3", "MULTIPOLE_WINDOWED_ROPE": "false"}
    cfg = MultipoleConfig.from_env(env)
    assert (cfg.token_budget, cfg.levels, cfg.windowed_rope) == (0.05, 3, False)
    assert MultipoleConfig.from_env({"MULTIPOLE_TOKEN_BUDGET": "512"}).budget_tokens(10**6) == 512
    assert MultipoleConfig.from_env({"MULTIPOLE_TOKEN_BUDGET": "1.0"}).budget_tokens(10**6) == 10**6


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MULTIPOLE_TOKEN_BUDGT": "0.1"}, "unknown setting MULTIPOLE_TOKEN_BUDGT"),
        ({"MULTIPOLE_LEVELS": "two"}, "MULTIPOLE_LEVELS"),
        ({"MULTIPOLE_WINDOWED_ROPE": "maybe"}, "boolean"),
        ({"MULTIPOLE_CONFIG": "/nonexistent/mp.json"}, "MULTIPOLE_CONFIG"),
    ],
)
def test_from_env_rejects_bad_settings(env, message):
    with pytest.raises(ValueError, match=message):
        MultipoleConfig.from_env(env)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="budgett"):
        MultipoleConfig.from_dict({"budgett": 3})


def test_decode_path_picks_the_kernels_for_flat_indexes():
    assert MultipoleConfig().decodes_with_kernels("cuda:0")
    assert not MultipoleConfig().decodes_with_kernels("cpu")
    assert not MultipoleConfig(levels=2).decodes_with_kernels("cuda")  # hierarchies: the reference
    assert MultipoleConfig(decode_path="kernels").decodes_with_kernels("cpu")
    assert not MultipoleConfig(decode_path="reference").decodes_with_kernels("cuda")
    with pytest.raises(ValueError, match="flat indexes"):
        MultipoleConfig(decode_path="kernels", levels=2)

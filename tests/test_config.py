import pytest

from moe_emergence import GPT2MoEConfig, MoEConfig


@pytest.mark.parametrize(
    "kwargs, field, fragment",
    [
        ({"num_experts": 8, "top_k": 9}, "top_k", "[1, num_experts=8]"),
        ({"top_k": 0}, "top_k", "[1, num_experts"),
        ({"num_experts": 0}, "num_experts", ">= 1"),
        ({"num_experts": 2.5}, "num_experts", "integer"),
        ({"noise_std": -0.1}, "noise_std", ">= 0"),
        ({"init_noise_std": -1.0}, "init_noise_std", ">= 0"),
        ({"router_init_std": float("nan")}, "router_init_std", "finite"),
        ({"lb_coef": -1}, "lb_coef", ">= 0"),
        ({"z_coef": float("inf")}, "z_coef", "finite"),
        ({"drop_ratio": 1.5}, "drop_ratio", "[0, 1]"),
        ({"drop_ratio": -0.1}, "drop_ratio", "[0, 1]"),
        ({"noise_anneal_steps": -5}, "noise_anneal_steps", ">= 0"),
        ({"init": "zeros"}, "init", "copy"),
        ({"layers": []}, "layers", "non-empty"),
        ({"layers": [1, 1]}, "layers", "unique"),
        ({"layers": [-1]}, "layers", ">= 0"),
        ({"layers": "some"}, "layers", '"all"'),
        ({"straight_through": "yes"}, "straight_through", "true or false"),
        ({"backend": "cuda"}, "backend", "eager"),
    ],
)
def test_bad_values_name_field_value_and_range(kwargs, field, fragment):
    with pytest.raises(ValueError) as err:
        MoEConfig(**kwargs)
    msg = str(err.value)
    assert f"MoEConfig.{field}=" in msg
    assert repr(kwargs[field]) in msg
    assert fragment in msg


def test_layer_outside_model_is_refused():
    cfg = MoEConfig(layers=[0, 3])
    assert cfg.resolve_layers(4) == [0, 3]
    with pytest.raises(ValueError, match=r"MoEConfig.layers=\[0, 3\].*\[3\].*0..2"):
        cfg.resolve_layers(3)
    with pytest.raises(ValueError, match="outside the model"):
        GPT2MoEConfig(n_layer=2, moe=MoEConfig(layers=[2]).to_dict())


def test_no_silent_clamping_and_roundtrip():
    cfg = MoEConfig(num_experts=4, top_k=2, layers=[2, 0], init="drop", drop_ratio=0.25)
    assert cfg.layers == [0, 2]  # sorted, not altered
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown key 'num_expert'; did you mean 'num_experts'"):
        MoEConfig.from_dict({"num_expert": 4})

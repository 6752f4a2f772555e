import pytest
import torch
from torch import nn

from guidance_tune.config import ConfigError, ModelConfig
from guidance_tune.models import create_model, list_models

# Small versions of every registered target, so building and running them takes milliseconds.
SMALL_KWARGS = {
    "deep_fcn": {"depth": 3, "first_width": 64, "width": 32},
    "wide_fcn": {"depth": 2, "width": 32},
    "deep_convnet": {"layers": [1, 1, 1, 1], "width": 8},
    "plain_convnet": {"widths": [8, 16], "convs": 2},
}
# ... and of every sequence model: tokens (b, T) in, logits (b, T, V) out
SMALL_SEQUENCE_KWARGS = {
    "rnn_lm": {"embed_dim": 8, "hidden_size": 12, "num_layers": 2},
    "transformer_decoder": {"d_model": 8, "nhead": 2, "dim_feedforward": 8, "num_layers": 2},
    "transformer_lm": {"d_model": 8, "nhead": 2, "dim_feedforward": 16, "num_layers": 2},
}
# ... and of the parity models: padded bit strings (b, T) in, two logits out
SMALL_PARITY_KWARGS = {
    "parity_transformer": {"d_model": 8, "nhead": 2, "dim_feedforward": 16, "num_layers": 2},
    "parity_rnn": {"hidden_size": 8},
}


def build(name: str, seed: int = 0, *, in_channels=3, image_size=32, num_classes=10, **fields):
    spec = ModelConfig(name=name, **fields)
    return create_model(
        spec, in_channels=in_channels, image_size=image_size, num_classes=num_classes, seed=seed
    )


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(module, kind) for module in model.modules())


def test_the_papers_targets_are_registered():
    assert {"deep_fcn", "wide_fcn", "deep_convnet"} <= set(list_models())


def test_every_registered_model_is_checked_below():
    checked = set(SMALL_KWARGS) | set(SMALL_SEQUENCE_KWARGS) | set(SMALL_PARITY_KWARGS)
    assert set(list_models()) == checked


@pytest.mark.parametrize("name", sorted(SMALL_PARITY_KWARGS))
def test_a_parity_model_reads_each_string_up_to_its_padding(name):
    """Padding (token 2) after a string changes nothing: neither more of it nor what it hides."""
    model = build(name, kwargs=SMALL_PARITY_KWARGS[name], in_channels=3, image_size=30).eval()
    bits = torch.randint(0, 2, (4, 10), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([bits, torch.full((4, 20), 2)], dim=1)
    with torch.no_grad():
        logits = model(bits)
        assert logits.shape == (4, 2)
        assert torch.allclose(model(padded), logits, atol=1e-5)
        bits[:, 5:] = 2  # now strings of 5 bits: the rest is padding
        shorter = model(bits)
        assert torch.allclose(model(bits[:, :5]), shorter, atol=1e-5)
        assert not torch.allclose(shorter, logits)


@pytest.mark.parametrize("name", sorted(SMALL_SEQUENCE_KWARGS))
def test_every_sequence_model_gives_logits_per_position(name):
    model = build(
        name, kwargs=SMALL_SEQUENCE_KWARGS[name], in_channels=13, image_size=20, num_classes=11
    )
    assert model(torch.randint(0, 13, (4, 20))).shape == (4, 20, 11)
    assert model(torch.randint(0, 13, (4, 7))).shape == (4, 7, 11)  # shorter sequences too


@pytest.mark.parametrize("name", sorted(SMALL_KWARGS))
@pytest.mark.parametrize("in_channels,image_size,num_classes", [(1, 28, 10), (3, 32, 100)])
def test_every_target_gives_logits_per_class(name, in_channels, image_size, num_classes):
    model = build(
        name,
        kwargs=SMALL_KWARGS[name],
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
    )
    logits = model(torch.randn(4, in_channels, image_size, image_size))
    assert logits.shape == (4, num_classes)


def test_deep_fcn_defaults_are_the_authors_deep_mlp():
    model = build("deep_fcn", in_channels=1, image_size=28)
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    dropouts = [module for module in model.modules() if isinstance(module, nn.Dropout)]
    assert len(linears) == 49
    assert count(model, nn.BatchNorm1d) == 48
    assert len(dropouts) == 48 and all(module.p == 0.1 for module in dropouts)
    assert linears[0].in_features == 28 * 28 and linears[0].out_features == 2048
    assert all(linear.out_features == 1024 for linear in linears[1:-1])
    assert linears[-1] is model.head and model.head.out_features == 10
    assert "blocks.47.linear" in dict(model.named_modules())


def test_wide_fcn_defaults_are_three_wide_blocks_without_dropout():
    model = build("wide_fcn", in_channels=1, image_size=8)
    widths = [module.out_features for module in model.modules() if isinstance(module, nn.Linear)]
    assert widths == [8192, 8192, 8192, 10]
    assert count(model, nn.Dropout) == 0


def test_deep_convnet_is_resnet50_without_shortcuts():
    model = build("deep_convnet", image_size=64).eval()
    names = dict(model.named_modules())
    assert count(model, nn.Conv2d) == 49
    assert count(model, nn.AdaptiveAvgPool2d) == 1 and isinstance(model.fc, nn.Linear)
    assert not any("downsample" in name for name in names)
    assert {"conv1", "layer1.0.conv1", "layer4.2.conv3", "avgpool", "fc"} <= set(names)
    # With a shortcut the input would bypass a silenced block; without one nothing gets past.
    nn.init.zeros_(model.layer2[0].bn3.weight)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert torch.equal(logits, model.fc.bias.expand(2, -1))


def test_plain_convnet_is_stages_of_convs_pooled_between_them():
    model = build("plain_convnet", in_channels=1, image_size=8).eval()
    names = dict(model.named_modules())
    assert count(model, nn.Conv2d) == 6 and count(model, nn.MaxPool2d) == 2
    assert {"stages.0.0.conv", "stages.2.2.conv", "avgpool", "fc"} <= set(names)
    assert model.fc.in_features == 128
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_torchvision_guide_takes_grey_images_and_keeps_its_module_paths():
    guide = build("resnet18", in_channels=1, image_size=28)
    assert guide(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert "layer1.0.conv1" in dict(guide.named_modules())
    assert count(guide, nn.Conv2d) == 20


def test_torchvision_guide_keeps_imagenet_logits_when_kwargs_say_so():
    guide = build("resnet18", kwargs={"num_classes": 1000}, num_classes=10)
    assert guide.fc.out_features == 1000


def test_torchvision_guide_refuses_other_channel_counts():
    with pytest.raises(ConfigError, match="channels"):
        build("resnet18", in_channels=2)


def test_user_factory_gets_the_data_shape_it_asks_for(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "from torch import nn\n"
        "def mlp(in_channels, image_size, num_classes, hidden=8):\n"
        "    features = in_channels * image_size * image_size\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(features, hidden),\n"
        "                         nn.ReLU(), nn.Linear(hidden, num_classes))\n"
        "def linear(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mlp = build("my_nets:mlp", kwargs={"hidden": 5}, image_size=8, num_classes=7)
    assert mlp[1].out_features == 5 and mlp(torch.randn(4, 3, 8, 8)).shape == (4, 7)
    linear = build("my_nets:linear", image_size=8, num_classes=7)
    assert linear(torch.randn(4, 3, 8, 8)).shape == (4, 7)
    with pytest.raises(ConfigError, match="my_nets:missing"):
        build("my_nets:missing")


def test_same_seed_gives_bitwise_equal_weights_whatever_ran_before():
    first = build("deep_fcn", seed=3, kwargs=SMALL_KWARGS["deep_fcn"])
    torch.rand(1000)
    build("resnet18", seed=9)
    again = build("deep_fcn", seed=3, kwargs=SMALL_KWARGS["deep_fcn"])
    other = build("deep_fcn", seed=4, kwargs=SMALL_KWARGS["deep_fcn"])
    state, same, different = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[key], same[key]) for key in state)
    assert not torch.equal(state["blocks.0.linear.weight"], different["blocks.0.linear.weight"])


def test_init_seed_overrides_the_run_seed_and_leaves_the_callers_rng_alone():
    before = torch.random.get_rng_state()
    a = build("resnet18", seed=0, init_seed=7)
    b = build("resnet18", seed=1, init_seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.conv1.weight, b.conv1.weight)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_weights_file_is_loaded_exactly(tmp_path, wrap):
    source = build("deep_fcn", seed=0, kwargs=SMALL_KWARGS["deep_fcn"])
    path = tmp_path / "target.pt"
    state = source.state_dict()
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    loaded = build("deep_fcn", seed=1, kwargs=SMALL_KWARGS["deep_fcn"], weights=path)
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in state.items())


def test_weights_that_do_not_fit_or_do_not_exist_are_a_config_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build("wide_fcn", kwargs=SMALL_KWARGS["wide_fcn"]).state_dict(), path)
    with pytest.raises(ConfigError, match="weights") as error:
        build("deep_fcn", kwargs=SMALL_KWARGS["deep_fcn"], weights=path)
    assert "other.pt" in str(error.value)
    with pytest.raises(ConfigError, match="weights.*missing.pt"):
        build("deep_fcn", kwargs=SMALL_KWARGS["deep_fcn"], weights=tmp_path / "missing.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="weights"):
        build("deep_fcn", kwargs=SMALL_KWARGS["deep_fcn"], weights=tmp_path / "notes.txt")


def test_unknown_model_name_suggests_the_close_match():
    with pytest.raises(ConfigError, match="deep_fnc") as error:
        build("deep_fnc")
    message = str(error.value)
    assert "'deep_fcn'" in message and "torchvision" in message
    assert "package.module:factory" in message


@pytest.mark.parametrize("name", ["deep_fcn", "resnet18"])
def test_misspelt_kwarg_names_the_model_and_the_kwarg(name):
    with pytest.raises(ConfigError, match=f"{name}.*widht"):
        build(name, kwargs={"widht": 32})

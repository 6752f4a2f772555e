import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torchvision.models import resnet18, resnet50

from guidance_tune.guidance.layers import (
    LayerCapture,
    batch_first,
    build_pairs,
    discover_layers,
    select_layers,
    spread_pairs,
)

# Golden pairs (target <- guide) read off the authors' code: authors-layer-pairs.md.
RESNET18_TO_DEEP_FCN = [
    (0, 0), (2, 1), (5, 2), (7, 3), (9, 4), (12, 5), (14, 6), (16, 7), (19, 8), (21, 9),
    (24, 10), (26, 11), (28, 12), (31, 13), (33, 14), (35, 15), (38, 16), (40, 17), (42, 18),
    (45, 19), (47, 20),
]  # fmt: skip
RESNET50_TO_DEEP_CONVNET = [(t, t) for t in range(6)] + [
    (6, 7), (7, 8), (8, 9), (9, 10), (10, 11), (11, 12), (12, 13), (13, 14), (14, 15), (15, 16),
    (16, 17), (17, 18), (18, 20), (19, 21), (20, 22), (21, 23), (22, 24), (23, 25), (24, 26),
    (25, 27), (26, 28), (27, 29), (28, 30), (29, 31), (30, 32), (31, 34), (32, 35), (33, 36),
    (34, 37), (35, 38), (36, 39), (37, 40), (38, 41), (39, 42), (40, 43), (41, 44), (42, 45),
    (43, 47), (44, 48), (45, 49), (46, 50), (47, 51), (48, 52), (49, 53),
]  # fmt: skip


@pytest.mark.parametrize(
    "n_guide, n_target, expected",
    [
        (21, 48, RESNET18_TO_DEEP_FCN),
        (21, 3, [(0, 5), (1, 14), (2, 20)]),
        (54, 50, RESNET50_TO_DEEP_CONVNET),
        (1, 20, [(0, 0)]),
        (32, 4, [(0, 5), (1, 15), (2, 25), (3, 31)]),
        (20, 4, [(0, 3), (1, 9), (2, 15), (3, 19)]),
    ],
)
def test_spread_pairs_match_authors_golden_pairs(n_guide, n_target, expected):
    assert spread_pairs(n_guide, n_target, overwrite=True) == expected


def test_authors_mapping_overwrites_resnet50_guide_records_on_deep_fcn():
    pairs = spread_pairs(54, 48, overwrite=True)
    assert [t for t, _ in pairs] == list(range(48))
    assert sorted(set(range(54)) - {g for _, g in pairs}) == [4, 13, 22, 30, 39, 48]


def test_all_pairs_mapping_keeps_every_guide_layer_in_guide_order():
    pairs = spread_pairs(21, 3, overwrite=False)
    assert [g for _, g in pairs] == list(range(21))
    assert pairs[4:7] == [(0, 4), (0, 5), (1, 6)]  # 5 * 0.1 = 0.5 rounds half to even
    assert len(spread_pairs(54, 48, overwrite=False)) == 54


def test_spread_pairs_rejects_a_network_without_layers():
    with pytest.raises(ValueError, match="at least one hooked layer"):
        spread_pairs(0, 5, overwrite=True)


def test_resnet18_guide_has_the_authors_21_records_in_execution_order():
    model = resnet18(weights=None)
    layers = discover_layers(model, torch.randn(2, 3, 32, 32))
    names = [layer.name for layer in layers]
    assert len(layers) == 21 and model.training
    assert names[:6] == [
        "conv1",
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.1.conv1",
        "layer1.1.conv2",
        "layer2.0.conv1",
    ]
    for stage in (2, 3, 4):
        i = names.index(f"layer{stage}.0.conv2")
        assert names[i + 1] == f"layer{stage}.0.downsample.0"
    assert [layer.type_name for layer in layers] == ["Conv2d"] * 20 + ["AdaptiveAvgPool2d"]
    assert layers[0].shape == (64, 16, 16) and layers[-1].shape == (512, 1, 1)
    assert "fc" not in names


def test_resnet50_guide_has_54_records():
    layers = discover_layers(resnet50(weights=None).eval(), torch.randn(2, 3, 32, 32))
    assert len(layers) == 54
    assert sum(".downsample.0" in layer.name for layer in layers) == 4


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_mlp_layers_are_named_by_module_path_and_logits_dropped():
    layers = discover_layers(MLP(), torch.randn(4, 8))
    assert [(layer.name, layer.type_name, layer.shape) for layer in layers] == [
        ("body.0", "Linear", (16,)),
        ("body.3", "Linear", (16,)),
    ]


def test_weight_tied_seq_first_decoder_gives_the_authors_32_records():
    class TiedDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerDecoderLayer(16, 2, dim_feedforward=24, dropout=0.0)
            self.out = nn.Linear(16, 5)

        def forward(self, x):
            memory = x
            for _ in range(4):
                x = self.layer(x, memory)
            return self.out(x)

    layers = discover_layers(TiedDecoder(), torch.randn(7, 3, 16))  # (L, B, D)
    assert len(layers) == 32
    assert [layer.type_name for layer in layers[:8]] == [
        "MultiheadAttention", "LayerNorm", "MultiheadAttention", "LayerNorm",
        "Linear", "Linear", "LayerNorm", "TransformerDecoderLayer",
    ]  # fmt: skip
    assert layers[4].shape == (7, 24)  # linear1 inside the seq-first layer, batch moved first
    assert all(layer.shape[0] == 7 for layer in layers)
    assert [layer.name for layer in layers[7::8]] == ["layer", "layer#1", "layer#2", "layer#3"]


def test_transformer_encoder_target_in_eval_still_records_its_sublayers():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
            self.encoder = nn.TransformerEncoder(block, 4, enable_nested_tensor=False)
            self.out = nn.Linear(16, 2)

        def forward(self, x):
            return self.out(self.encoder(x))

    layers = discover_layers(Encoder().eval(), torch.randn(3, 5, 16))
    assert len(layers) == 20
    assert [layer.type_name for layer in layers[:5]] == [
        "MultiheadAttention", "LayerNorm", "Linear", "Linear", "LayerNorm",
    ]  # fmt: skip


def test_unbatched_outputs_are_skipped_by_discovery():
    class Summary(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(4, 4)
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            self.rnn(x[0])  # one unbatched (L, D) sequence: no batch axis to compare on
            return self.out(self.fc(x[:, -1]))

    assert [layer.name for layer in discover_layers(Summary(), torch.randn(3, 6, 4))] == ["fc"]


def identity(activation):
    return activation


def capture_once(model, names, *inputs, transform=identity):
    capture = LayerCapture(model, names, transform)
    out = model(*inputs)
    capture.remove()
    return capture.captured, out


def test_capture_conv_and_linear_outputs_batch_first():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(2, 3, 8, 8)
    captured, out = capture_once(model, ["0", "3"], x)
    torch.testing.assert_close(captured["0"], model[0](x))
    torch.testing.assert_close(captured["3"], out)


@pytest.mark.parametrize("seq_first", [False, True])
def test_lstm_capture_keeps_the_output_sequence_with_batch_first(seq_first):
    lstm = nn.LSTM(4, 6, num_layers=2, batch_first=not seq_first)
    x = torch.randn(7, 3, 4) if seq_first else torch.randn(3, 7, 4)
    model = nn.Sequential()
    model.add_module("lstm", lstm)
    captured, (out, _) = capture_once(model, ["lstm"], x)
    expected = out.transpose(0, 1) if seq_first else out
    assert captured["lstm"].shape == (3, 7, 6)
    torch.testing.assert_close(captured["lstm"], expected)


def test_packed_gru_output_is_padded_batch_first():
    model = nn.Sequential()
    model.add_module("gru", nn.GRU(4, 5))
    x = torch.randn(6, 3, 4)
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]))
    captured, _ = capture_once(model, ["gru"], packed)
    assert captured["gru"].shape == (3, 6, 5)
    assert captured["gru"][2, 2:].abs().sum() == 0


def test_decoder_layer_and_its_seq_first_sublayers_are_captured_batch_first():
    model = nn.ModuleDict({"dec": nn.TransformerDecoderLayer(16, 2, 24, dropout=0.0)})
    x, memory = torch.randn(7, 3, 16), torch.randn(5, 3, 16)  # seq-first (L, B, D)
    names = ["dec", "dec.linear1", "dec.norm3"]
    capture = LayerCapture(model, names, identity)
    out = model["dec"](x, memory)
    captured = capture.captured
    torch.testing.assert_close(captured["dec"], out.transpose(0, 1))
    torch.testing.assert_close(captured["dec.norm3"], out.transpose(0, 1))
    assert captured["dec.linear1"].shape == (3, 7, 24)


def test_multihead_attention_capture_keeps_the_attention_output():
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0].mean(1)

    model, x = Attend(), torch.randn(3, 5, 8)
    captured, _ = capture_once(model, ["attn"], x)
    torch.testing.assert_close(captured["attn"], model.attn(x, x, x)[0])


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.block(self.block(x)))


def test_module_called_twice_gives_path_and_path_hash_1():
    model, x = Twice(), torch.randn(3, 4)
    assert [layer.name for layer in discover_layers(model, x)] == ["block", "block#1"]
    captured, _ = capture_once(model, ["block", "block#1"], x)
    torch.testing.assert_close(captured["block"], model.block(x))
    torch.testing.assert_close(captured["block#1"], model.block(model.block(x)))


def test_should_capture_false_stores_nothing_and_counts_no_calls():
    model, x = Twice(), torch.randn(3, 4)
    active = [False]
    capture = LayerCapture(model, ["block"], identity, should_capture=lambda: active[0])
    model(x)
    assert capture.captured == {}
    active[0] = True
    model(x)
    assert set(capture.captured) == {"block"}


def test_clear_restarts_call_counts_and_remove_stops_capturing():
    model, x = Twice(), torch.randn(3, 4)
    capture = LayerCapture(model, ["block"], identity)
    model(x)
    capture.clear()
    assert capture.captured == {}
    model(2 * x)
    torch.testing.assert_close(capture.captured["block"], model.block(2 * x))
    capture.remove()
    capture.clear()
    model(x)
    assert capture.captured == {} and not model.block._forward_hooks


def test_captured_gram_carries_gradient_to_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())

    def gram(a):
        flat = a.flatten(1)
        return flat @ flat.T

    capture = LayerCapture(model, ["2"], gram)
    model(torch.randn(3, 3, 8, 8))
    assert capture.captured["2"].shape == (3, 3)
    capture.captured["2"].sum().backward()
    assert model[0].weight.grad.abs().sum() > 0


def test_unknown_capture_name_lists_the_nearest_valid_names():
    with pytest.raises(ValueError, match="layer2.0.conv1"):
        LayerCapture(resnet18(weights=None), ["layer2.0.cnv1"], identity)
    with pytest.raises(ValueError, match="'block#0'"):
        LayerCapture(Twice(), ["block#0"], identity)


def test_batch_first_rejects_an_unbatched_attention_output():
    attn = nn.MultiheadAttention(8, 2)
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match="no batch axis"):
        batch_first(attn, attn(x, x, x))


NAMES = [f"l{i}" for i in range(5)]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", NAMES),
        ("first_half", ["l0", "l1", "l2"]),
        ("last_half", ["l2", "l3", "l4"]),
        ("every_2", ["l0", "l2", "l4"]),
        ("every_1", NAMES),
        ("range_1_3", ["l1", "l2"]),
        ("range_0_5", NAMES),
        ("0,3,l4", ["l0", "l3", "l4"]),
        ("l3, 0, 3", ["l0", "l3"]),
        ("-1", ["l4"]),
        ("l2", ["l2"]),
    ],
)
def test_select_layers_picks_named_subsets_in_network_order(spec, expected):
    assert select_layers(NAMES, spec) == expected


def test_halves_of_an_even_network_split_it_exactly():
    names = NAMES[:4]
    assert select_layers(names, "first_half") + select_layers(names, "last_half") == names


@pytest.mark.parametrize(
    "spec, message",
    [
        ("every_0", "K in every_K"),
        ("range_3_3", "0 <= A < B <= 5"),
        ("range_2_9", "5 layers exist"),
        ("7", "out of range; 5 layers exist"),
        ("l9", "'l9' is neither"),
        ("bogus", "Valid specs"),
        ("0,,1", "is neither"),
    ],
)
def test_bad_layer_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        select_layers(NAMES, spec)
    assert repr(spec) in str(error.value)


def test_empty_selection_is_an_error():
    with pytest.raises(ValueError, match="selects no layers; 0 layers exist"):
        select_layers([], "all")


def test_build_pairs_authors_mapping_uses_layer_names():
    guide = [f"g{i}" for i in range(21)]
    target = ["t0", "t1", "t2"]
    assert build_pairs(target, guide, mapping="authors") == [
        ("t0", "g5"),
        ("t1", "g14"),
        ("t2", "g20"),
    ]
    assert len(build_pairs(target, guide, mapping="all_pairs")) == 21
    assert build_pairs(target, guide, mapping="authors", guide_subset="first_half")[0] == (
        "t0",
        "g2",
    )


def test_build_pairs_explicit_names_a_misspelled_layer():
    target, guide = ["fc.0", "fc.1"], ["layer1.0.conv1", "avgpool"]
    pairs = [("fc.1", "avgpool"), ("fc.0", "layer1.0.conv1")]
    assert build_pairs(target, guide, mapping="explicit", explicit=pairs) == pairs
    with pytest.raises(ValueError, match="guide layer 'layer1.0.conv' not found.*layer1.0.conv1"):
        build_pairs(target, guide, mapping="explicit", explicit=[("fc.0", "layer1.0.conv")])
    with pytest.raises(ValueError, match="pairs are \\(target, guide\\)"):
        build_pairs(target, guide, mapping="explicit", explicit=[("avgpool", "fc.0")])


def test_build_pairs_rejects_unknown_mapping_and_bad_subset():
    with pytest.raises(ValueError, match="unknown layer mapping 'nearest'"):
        build_pairs(["t"], ["g"], mapping="nearest")
    with pytest.raises(ValueError, match="guide_subset: layer spec 'every_0'"):
        build_pairs(["t"], ["g"], mapping="authors", guide_subset="every_0")

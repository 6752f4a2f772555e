import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guidance_tune.config import GuidanceConfig, ModelConfig
from guidance_tune.guidance.alignment import METRICS, get_metric
from guidance_tune.guidance.layers import LayerCapture
from guidance_tune.guidance.modes import guide_mode
from guidance_tune.guidance.term import Guidance, LogitDistillation
from guidance_tune.models import create_model

SHAPE = {"in_channels": 1, "image_size": 16, "num_classes": 10}


def _fcn(depth=6, seed=0):
    spec = ModelConfig(name="deep_fcn", kwargs={"depth": depth, "first_width": 32, "width": 16})
    return create_model(spec, seed=seed, **SHAPE)


def _resnet18(seed=1):
    return create_model(ModelConfig(name="resnet18"), seed=seed, **SHAPE)


def _batch(b=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 16, 16, generator=generator), torch.randint(0, 10, (b,))


class CallCounter:
    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


def _guided_steps(target, guidance, steps, lr=1e-2):
    optimizer = torch.optim.Adam(target.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, y = _batch(seed=step)
        target.train()
        logits = target(x)
        loss = F.cross_entropy(logits, y) + guidance(x, logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_three_lines_add_guidance_to_a_plain_loop():
    target, guide = _fcn(), _resnet18()
    x, _ = _batch()
    guidance = Guidance(target, guide, sample_input=x[:2])
    logits = target(x)
    loss = guidance(x, logits)
    loss.backward()
    assert len(guidance.pairs) == 6  # 21 ResNet-18 layers spread over 6 target layers
    assert 0 < loss.item() <= len(guidance.pairs)
    assert target.blocks[0].linear.weight.grad is not None


def test_one_target_forward_and_one_guide_forward_per_guided_step():
    target, guide = _fcn(), _resnet18()
    guidance = Guidance(target, guide, sample_input=_batch()[0][:2])
    target_calls, guide_calls = CallCounter(target), CallCounter(guide)
    _guided_steps(target, guidance, steps=3)
    assert target_calls.calls == 3
    assert guide_calls.calls == 3


def _term(kind, target, guide, x):
    config = GuidanceConfig(kind=kind)
    if kind == "distillation":
        return LogitDistillation(guide, config)
    return Guidance(target, guide, sample_input=x[:2], config=config)


@pytest.mark.parametrize("kind", ["alignment", "distillation"])
def test_preparing_the_guide_before_the_target_forward_gives_the_same_term(kind):
    target, guide = _fcn(), _resnet18()
    x, _ = _batch()
    term = _term(kind, target, guide, x)
    target.train()
    torch.manual_seed(0)  # the same dropout masks in both target forwards
    guide_after = term(x, target(x))
    guide_calls = CallCounter(guide)
    torch.manual_seed(0)
    term.prepare(x)
    guide_first = term(x, target(x))
    assert guide_calls.calls == 1
    assert guide_first.item() == pytest.approx(guide_after.item(), rel=1e-6)
    assert guide_first.requires_grad


def test_a_prepared_guide_pass_for_another_batch_is_refused():
    target, guide = _fcn(), _resnet18()
    x, _ = _batch()
    guidance = _term("alignment", target, guide, x)
    target.train()
    other, _ = _batch(seed=1)
    guidance.prepare(x)
    with pytest.raises(ValueError, match="prepare"):
        guidance(other, target(other))


def test_guide_is_bitwise_unchanged_and_gets_no_gradient():
    target, guide = _fcn(), _resnet18()
    guide.train()  # even a guide handed over in train mode must keep its BatchNorm statistics
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    guidance = Guidance(target, guide, sample_input=_batch()[0][:2])
    _guided_steps(target, guidance, steps=3)
    after = guide.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in guide.parameters())


def test_guidance_keeps_only_b_by_b_matrices_of_the_guide():
    target, guide = _fcn(), _resnet18()
    x, _ = _batch(b=12)
    guidance = Guidance(target, guide, sample_input=x[:2])
    guide(x)  # what the guide's hooks keep from one forward
    kept = guidance._guide_capture.captured
    assert kept and all(matrix.shape == (12, 12) for matrix in kept.values())
    target.train()
    guidance(x, target(x))
    assert guidance._guide_capture.captured == {}
    assert guidance._target_capture.captured == {}


def test_after_the_guided_steps_the_guide_never_runs():
    target, guide = _fcn(), _resnet18()
    config = GuidanceConfig(guided_steps=2)
    guidance = Guidance(target, guide, sample_input=_batch()[0][:2], config=config)
    guide_calls = CallCounter(guide)
    _guided_steps(target, guidance, steps=5)
    assert guide_calls.calls == 2
    x, _ = _batch()
    assert guidance(x, target(x)).item() == 0.0


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_each_pair_gets_the_metric_of_its_own_two_layers(metric):
    target, guide = _fcn(), _resnet18()
    x, _ = _batch()
    config = GuidanceConfig(mapping="all_pairs", metric=metric)
    guidance = Guidance(target, guide, sample_input=x[:2], config=config)
    target_layers = [t for t, _ in guidance.pairs]
    assert len(set(target_layers)) < len(target_layers)  # layers shared by several pairs
    raw_target = LayerCapture(target, sorted(set(target_layers)), torch.Tensor.detach)
    raw_guide = LayerCapture(guide, sorted({g for _, g in guidance.pairs}), torch.Tensor.detach)
    target.train()
    loss = guidance(x, target(x))
    similarities = guidance.pop_similarities()
    expected = [
        METRICS[metric](raw_target.captured[t], raw_guide.captured[g]).item()
        for t, g in guidance.pairs
    ]
    assert list(similarities.values()) == pytest.approx(expected, abs=1e-5)
    assert loss.item() == pytest.approx(sum(1 - e for e in expected), abs=1e-4)


def test_ridge_guidance_fits_with_the_configured_penalty():
    target, guide = _fcn(), _resnet18()
    x, _ = _batch()
    similarities = {}
    for ridge_lambda in (0.01, 10.0):
        config = GuidanceConfig(metric="ridge", ridge_lambda=ridge_lambda)
        guidance = Guidance(target, guide, sample_input=x[:2], config=config)
        raw_target = LayerCapture(target, [guidance.pairs[0][0]], torch.Tensor.detach)
        raw_guide = LayerCapture(guide, [guidance.pairs[0][1]], torch.Tensor.detach)
        target.train()
        torch.manual_seed(0)  # the same dropout masks for both penalties
        guidance(x, target(x))
        similarities[ridge_lambda] = next(iter(guidance.pop_similarities().values()))
        expected = get_metric("ridge", ridge_lambda)(
            raw_target.captured[guidance.pairs[0][0]], raw_guide.captured[guidance.pairs[0][1]]
        )
        assert similarities[ridge_lambda] == pytest.approx(expected.item(), abs=1e-5)
        for hooks in (guidance, raw_target, raw_guide):
            hooks.remove()
    assert similarities[0.01] > similarities[10.0]  # a larger penalty fits less


def test_guidance_raises_alignment_of_the_mapped_layers():
    target, guide = _fcn(depth=4), _resnet18()
    x, _ = _batch(b=32)
    guidance = Guidance(target, guide, sample_input=x[:2])
    optimizer = torch.optim.Adam(target.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        target.train()
        loss = guidance(x, target(x))
        first = first if first is not None else guidance.pop_similarities()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    guidance.pop_similarities()
    guidance(x, target(x))
    last = guidance.pop_similarities()
    assert list(first) == list(last) == guidance.pair_labels()
    assert sum(last.values()) > sum(first.values()) + 0.5


def test_noise_inputs_reach_the_guide_but_not_the_target():
    target, guide = _fcn(), _resnet18()
    seen = {}
    guide.register_forward_pre_hook(lambda m, args: seen.update(guide=args[0]))
    config = GuidanceConfig(guide_inputs="noise")
    guidance = Guidance(target, guide, sample_input=_batch()[0][:2], config=config)
    x, _ = _batch()
    guidance(x, target(x))
    assert seen["guide"].shape[0] == x.shape[0]
    assert seen["guide"].min() >= 0 and seen["guide"].max() <= 1  # the authors' clamped noise
    assert not torch.equal(seen["guide"], x)


class SequenceTarget(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=1, batch_first=True)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(torch.relu(self.proj(out)).mean(1))


class SequenceGuide(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def test_guidance_between_an_lstm_target_and_a_transformer_guide():
    target, guide = SequenceTarget(), SequenceGuide()
    x = torch.randn(6, 5, 8)
    guidance = Guidance(target, guide, sample_input=x[:2])
    assert guidance.pairs[0][0] == "lstm"
    target.train()
    loss = guidance(x, target(x))
    loss.backward()
    assert torch.isfinite(loss)
    assert target.lstm.weight_ih_l0.grad.abs().sum() > 0


def test_missing_target_forward_is_a_clear_error():
    target, guide = _fcn(), _resnet18()
    x, _ = _batch()
    guidance = Guidance(target, guide, sample_input=x[:2])
    with pytest.raises(RuntimeError, match="call target"):
        guidance(x)


def test_distillation_from_an_identical_guide_costs_nothing():
    target = _fcn()
    guide = _fcn()
    guide.load_state_dict(target.state_dict())
    target.eval()  # no dropout, so both give the same logits
    x, _ = _batch()
    distillation = LogitDistillation(guide, GuidanceConfig(kind="distillation"))
    assert distillation(x, target(x)).item() == pytest.approx(0.0, abs=1e-6)
    other = LogitDistillation(_fcn(seed=5), GuidanceConfig(kind="distillation"))
    loss = other(x, target(x))
    assert loss.item() > 0
    assert loss.requires_grad


def _dropout_fcn_guide(seed=1):
    """A guide with BatchNorm and dropout in every block, pretrained-looking BN statistics."""
    spec = ModelConfig(name="deep_fcn", kwargs={"depth": 4, "first_width": 32, "width": 16})
    guide = create_model(spec, seed=seed, **SHAPE)
    for module in guide.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return guide


def test_a_guide_with_train_mode_dropout_draws_masks_but_its_batchnorm_stays_in_eval():
    target, guide = _fcn(), _dropout_fcn_guide()
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    x, _ = _batch()
    rng = torch.get_rng_state()
    term = Guidance(target, guide, sample_input=x[:2], guide_dropout=True)
    assert torch.equal(torch.get_rng_state(), rng)  # layers found in eval: no mask drawn
    first, second = term._guide_pass(x), term._guide_pass(x)
    assert not torch.allclose(first, second)  # a fresh dropout mask each pass
    torch.manual_seed(3)
    again = term._guide_pass(x)
    torch.manual_seed(3)
    assert torch.equal(term._guide_pass(x), again)  # the masks come from the run's RNG
    _guided_steps(target, term, steps=2)
    after = guide.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics never move
    assert not any(p.requires_grad or p.grad is not None for p in guide.parameters())
    dropouts = [m for m in guide.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.training for m in dropouts)
    assert not any(m.training for m in guide.modules() if not isinstance(m, nn.Dropout))


def test_by_default_the_guide_runs_wholly_in_eval_and_its_passes_repeat_exactly():
    target, guide = _fcn(), _dropout_fcn_guide()
    x, _ = _batch()
    term = Guidance(target, guide, sample_input=x[:2])
    assert torch.equal(term._guide_pass(x), term._guide_pass(x))
    assert not any(m.training for m in guide.modules())


@pytest.mark.parametrize(
    "module", [nn.MultiheadAttention(8, 2, dropout=0.5), nn.RNN(8, 8, 2, dropout=0.5)]
)
def test_train_mode_reaches_the_dropout_inside_attention_and_rnns(module):
    """The authors' Transformer guides drop attention weights too: that dropout is the module's
    own train flag, not a Dropout layer's."""
    guide = nn.ModuleDict({"linear": nn.Linear(8, 8), "norm": nn.BatchNorm1d(8), "inner": module})
    guide_mode(guide, dropout=True)
    assert module.training and not guide["norm"].training and not guide["linear"].training
    guide_mode(guide, dropout=False)
    assert not any(m.training for m in guide.modules())

"""Which layers guidance compares, and how their activations are captured.

Layers are named by module path as in ``print(model)`` (``layer2.0.conv1``), so a user can read a
mapping and check it against the model. A module run more than once per forward (weight tying)
gets ``path#k`` for its k-th extra call. Hooked types, execution order, the dropped logits
record and the even spread of guide layers over target layers follow the authors' code
(guidance-method.md A.2, A.3); the batch axis is found from the modules, not guessed from sizes.
A name, subset or mapping that does not fit the models is the user's to fix (ConfigError); a
model whose forward fails during discovery is not, and keeps its traceback.

Sequence activations. An RNN's or attention's tuple output is captured as its output sequence
(the hidden state and the attention weights are dropped), a PackedSequence as its padded
``(b, T', H)`` tensor (zeros past each length; ``T'`` the batch's longest), and a ``(b, T, H)``
activation is one sample per example, flattened to ``T * H`` features, as the authors do: the
Gram entry of two sequences sums their position-by-position inner products. Where the data
says which positions are padding (``valid_positions``), those are zeroed in every captured
activation of both networks before the Gram, so padding adds nothing to a similarity and a
batch compares the same whatever length it was padded to (``guidance.pad_masking``; the
authors compare padded positions as they are, which ``pad_masking: false`` reproduces).
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from guidance_tune.config import ConfigError

HOOKABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.RNN,
    nn.LSTM,
    nn.GRU,
    nn.MultiheadAttention,
    nn.TransformerDecoderLayer,
    nn.LayerNorm,
)

# Their batch is axis 0 whatever the model around them does.
_BATCH_AXIS0_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_TUPLE_OUTPUT_TYPES = (nn.RNNBase, nn.MultiheadAttention)

SPEC_HELP = (
    "'all', 'first_half', 'last_half', 'blocks' (whole blocks' outputs, such as a "
    "TransformerDecoderLayer's), 'every_K' (K >= 1), 'range_A_B' (layers A..B-1, "
    "0 <= A < B <= number of layers), or a comma-separated list of indices and/or layer names "
    "such as '0,3,layer4.1.conv2'"
)
MAPPINGS = ("authors", "all_pairs", "explicit")


@dataclass(frozen=True)
class LayerInfo:
    """One hooked call: what a user reads in a mapping, checks against print(model), sizes."""

    name: str
    type_name: str
    shape: tuple[int, ...]


def _call_name(path: str, call: int) -> str:
    return path if call == 0 else f"{path}#{call}"


def _own_batch_first(module: nn.Module) -> bool | None:
    """Transformer layers keep the flag on their attention, not on themselves."""
    flag = getattr(module, "batch_first", None)
    if flag is None:
        flag = getattr(getattr(module, "self_attn", None), "batch_first", None)
    return flag if isinstance(flag, bool) else None


def _parent_batch_first(model: nn.Module) -> dict[str, bool | None]:
    """Per module path, the flag of the nearest enclosing module that has one.

    A Linear or LayerNorm inside a seq-first Transformer layer sees (L, B, D) tensors but has no
    flag of its own; this is how we know its batch is axis 1.
    """
    for_children: dict[str, bool | None] = {}
    inherited: dict[str, bool | None] = {}
    for path, module in model.named_modules():
        parent = for_children.get(path.rpartition(".")[0]) if path else None
        inherited[path] = parent
        own = _own_batch_first(module)
        for_children[path] = parent if own is None else own
    return inherited


def batch_first(
    module: nn.Module, output: object, *, parent_batch_first: bool | None = None
) -> torch.Tensor:
    """The activation guidance compares, batch axis first.

    The batch axis comes from the module's own ``batch_first`` (RNNs, attention, Transformer
    layers) or, for a Linear/LayerNorm inside a seq-first model, from ``parent_batch_first``; the
    authors' "which axis equals the batch size" guess breaks whenever a length equals the batch.
    A custom seq-first model can say so with a ``batch_first = False`` attribute of its own.
    Raises ValueError for outputs that have no batch axis (unbatched RNN/attention calls).
    """
    if isinstance(module, _TUPLE_OUTPUT_TYPES) and isinstance(output, tuple):
        output = output[0]  # RNN hidden state and attention weights are not representations
    if isinstance(output, PackedSequence):
        return pad_packed_sequence(output, batch_first=True)[0]
    own = _own_batch_first(module)
    dims = output.dim() if isinstance(output, torch.Tensor) else 0
    if dims == 0 or (own is not None and dims != 3):
        shape = tuple(output.shape) if dims else type(output).__name__
        raise ValueError(f"{type(module).__name__} output {shape} has no batch axis (unbatched?)")
    seq_first = own is False or (
        own is None
        and parent_batch_first is False
        and dims == 3
        and not isinstance(module, _BATCH_AXIS0_TYPES)
    )
    return output.transpose(0, 1) if seq_first else output


def zero_padding(activation: Tensor, valid: Tensor) -> Tensor:
    """``activation`` (b, T', ...) with the positions that ``valid`` (b, T) bool marks as padding
    set to 0. Axis 1 is the input's position axis, as :func:`batch_first` leaves every sequence
    layer's output; ``T' < T`` is a packed RNN's output, which ends at the longest sequence.
    An output without a position axis (b, d) is returned as it is."""
    if activation.dim() < 3:
        return activation
    steps = activation.shape[1]
    if steps > valid.shape[1]:
        raise ValueError(
            f"activation {tuple(activation.shape)} has more positions than its input "
            f"({valid.shape[1]}): axis 1 is not the input's positions, so padding can't be masked"
        )
    keep = valid[:, :steps].reshape(len(valid), steps, *[1] * (activation.dim() - 2))
    return activation * keep.to(activation.dtype)


def discover_layers(model: nn.Module, sample_input: torch.Tensor | tuple) -> list[LayerInfo]:
    """Hookable layer calls of one forward, in execution order, the logits record dropped.

    This is the authors' record list (A.2), so indices into it match their mapping. The model
    stays in whatever mode it is in: the guide's mode at discovery should be its mode in training.
    """
    paths = {path: m for path, m in model.named_modules() if isinstance(m, HOOKABLE_TYPES)}
    parents = _parent_batch_first(model)
    records: list[LayerInfo] = []
    calls = dict.fromkeys(paths, 0)

    def record(path: str, module: nn.Module, args: object, output: object) -> None:
        name = _call_name(path, calls[path])
        calls[path] += 1
        try:
            activation = batch_first(module, output, parent_batch_first=parents[path])
        except ValueError:
            return
        records.append(LayerInfo(name, type(module).__name__, tuple(activation.shape[1:])))

    handles = [m.register_forward_hook(functools.partial(record, p)) for p, m in paths.items()]
    try:
        args = sample_input if isinstance(sample_input, tuple) else (sample_input,)
        with torch.no_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return records[:-1]


def _close_names(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=5, cutoff=0.5)
    return ", ".join(close) if close else "none close; first layers: " + ", ".join(valid[:5])


def _split_name(name: str, modules: dict[str, nn.Module]) -> tuple[str, int]:
    path, hash_sign, call = name.partition("#")
    ok = path in modules and path != "" and (not hash_sign or (call.isdigit() and int(call) >= 1))
    if not ok:
        valid = [p for p, m in modules.items() if isinstance(m, HOOKABLE_TYPES)]
        raise ConfigError(
            f"unknown layer {name!r}; nearest valid names: {_close_names(name, valid)}. Names are "
            "module paths as in print(model), with '#k' (k >= 1) for the k-th extra call of a "
            "reused module; discover_layers(model, sample_input) lists them."
        )
    return path, int(call) if hash_sign else 0


class LayerCapture:
    """Persistent forward hooks, registered once at construction on the named modules only.

    Hooks stay until ``remove()``: registering per step costs time and makes torch.compile
    retrace. ``transform`` (e.g. a b x b Gram) runs inside the hook so the raw activation is
    freed as soon as the model is done with it. ``should_capture`` returning False makes a hook
    do nothing, e.g. during activation-checkpoint recomputation or once guidance is switched off.
    ``valid_positions`` (token inputs ``(b, T)`` -> bool ``(b, T)``) marks the real positions of
    the model's input; the rest are zeroed in each activation before ``transform``
    (:func:`zero_padding`).
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        transform: Callable[[torch.Tensor], torch.Tensor],
        should_capture: Callable[[], bool] = lambda: True,
        valid_positions: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        modules = dict(model.named_modules())
        wanted: dict[str, set[int]] = {}
        for name in names:
            path, call = _split_name(name, modules)
            wanted.setdefault(path, set()).add(call)
        parents = _parent_batch_first(model)
        self.captured: dict[str, torch.Tensor] = {}
        self._transform = transform
        self._should_capture = should_capture
        self._valid_positions = valid_positions
        self._inputs: Tensor | None = None  # this forward's, while padding is masked
        self._valid: Tensor | None = None  # their real positions, found at the first capture
        self._calls = dict.fromkeys(wanted, 0)
        self._handles = [
            modules[path].register_forward_hook(
                functools.partial(self._hook, path, frozenset(calls), parents[path])
            )
            for path, calls in wanted.items()
        ]
        # each forward of the whole model starts afresh: nothing stale survives a second forward
        self._handles.append(model.register_forward_pre_hook(self._start))

    def _start(self, module: nn.Module, args: tuple) -> None:
        self.clear()
        self._inputs, self._valid = None, None
        if self._valid_positions is not None and args:  # the tokens: the first argument
            self._inputs = args[0]

    def _hook(
        self,
        path: str,
        wanted_calls: frozenset[int],
        parent_batch_first: bool | None,
        module: nn.Module,
        args: object,
        output: object,
    ) -> None:
        if not self._should_capture():
            return
        call = self._calls[path]
        self._calls[path] = call + 1
        if call in wanted_calls:
            activation = batch_first(module, output, parent_batch_first=parent_batch_first)
            if self._inputs is not None:
                if self._valid is None:
                    self._valid = self._valid_positions(self._inputs)
                activation = zero_padding(activation, self._valid)
            self.captured[_call_name(path, call)] = self._transform(activation)

    def clear(self) -> None:
        """Drop what was captured; also runs before every forward of the whole model, so call
        counts restart and "path#k" names match the k-th call of that forward."""
        self.captured.clear()
        self._calls = dict.fromkeys(self._calls, 0)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def spread_pairs(n_guide: int, n_target: int, *, overwrite: bool) -> list[tuple[int, int]]:
    """(target index, guide index) pairs spreading the guide evenly over the target (A.3).

    The float step and Python's round (half to even) are kept exactly as the authors compute them
    because they decide which layers meet. With ``overwrite`` the authors' dict keyed by target
    index is reproduced: the deepest guide layer landing on a target index wins.
    """
    if n_guide < 1 or n_target < 1:
        raise ConfigError(
            f"cannot spread {n_guide} guide layers over {n_target} target layers; both networks "
            "need at least one hooked layer besides the logits layer"
        )
    step = (n_target - 1) / (n_guide - 1) if n_guide > 1 else 1
    spread = [(min(round(i * step), n_target - 1), i) for i in range(n_guide)]
    if not overwrite:
        return spread
    return sorted(dict(spread).items())


def _parse_list(names: list[str], spec: str) -> list[str]:
    n, index_of = len(names), {name: i for i, name in enumerate(names)}
    picked = set()
    for item in (part.strip() for part in spec.split(",")):
        if re.fullmatch(r"-?\d+", item):
            if not -n <= int(item) < n:
                raise ConfigError(
                    f"layer spec {spec!r}: index {item} is out of range; {n} layers exist "
                    f"(indices 0..{n - 1}, or negative from the end)"
                )
            picked.add(int(item) % n)
        elif item in index_of:
            picked.add(index_of[item])
        else:
            raise ConfigError(
                f"layer spec {spec!r}: {item!r} is neither a known spec nor one of the {n} "
                f"layers (nearest: {_close_names(item, names)}). Valid specs: {SPEC_HELP}"
            )
    return [names[i] for i in sorted(picked)]


_HALVES = {
    "all": lambda n: slice(None),
    "first_half": lambda n: slice((n + 1) // 2),
    "last_half": lambda n: slice(n // 2, None),
}


def block_outputs(names: Sequence[str]) -> list[str]:
    """The records of modules that hold other recorded modules: a Transformer layer's output,
    not its attention, norms or Linears (every call of a tied layer: ``layers.0#k``)."""
    paths = [name.partition("#")[0] for name in names]
    return [
        name
        for name, path in zip(names, paths, strict=True)
        if any(other.startswith(path + ".") for other in paths)
    ]


def _parse_spec(names: list[str], spec: str) -> list[str]:
    n = len(names)
    if spec in _HALVES:
        return names[_HALVES[spec](n)]
    if spec == "blocks":
        return block_outputs(names)
    if every := re.fullmatch(r"every_(\d+)", spec):
        if int(every[1]) < 1:
            raise ConfigError(f"layer spec {spec!r}: K in every_K must be >= 1")
        return names[:: int(every[1])]
    if span := re.fullmatch(r"range_(\d+)_(\d+)", spec):
        start, stop = int(span[1]), int(span[2])
        if not 0 <= start < stop <= n:
            raise ConfigError(
                f"layer spec {spec!r}: need 0 <= A < B <= {n} in range_A_B; {n} layers exist"
            )
        return names[start:stop]
    return _parse_list(names, spec)


def select_layers(names: Sequence[str], spec: str) -> list[str]:
    """The layers a named subset picks, in network order, so a search space can sweep subsets.

    For an odd number of layers both halves include the middle one (first_half is
    names[:(n+1)//2], last_half is names[n//2:]). In a list, an integer item is always an index,
    even where a layer is named like one (a bare nn.Sequential's children are '0', '1', ...);
    list items are de-duplicated and kept in network order, as the even spread assumes depth order.
    """
    names = list(names)
    picked = _parse_spec(names, spec.strip())
    if not picked:
        raise ConfigError(
            f"layer spec {spec!r} selects no layers; {len(names)} layers exist. Valid specs: "
            f"{SPEC_HELP}"
        )
    return picked


def _check_explicit(
    pair: tuple[str, str], target_layers: Sequence[str], guide_layers: Sequence[str]
) -> tuple[str, str]:
    if len(pair) != 2:
        raise ConfigError(f"explicit pair {pair!r} must be (target_layer, guide_layer)")
    for role, name, layers, other in (
        ("target", pair[0], target_layers, guide_layers),
        ("guide", pair[1], guide_layers, target_layers),
    ):
        if name not in layers:
            swapped = " (that is a layer of the other network: pairs are (target, guide))"
            raise ConfigError(
                f"explicit pair {tuple(pair)!r}: {role} layer {name!r} not found"
                f"{swapped if name in other else ''}; close {role} layers: "
                f"{_close_names(name, list(layers))}"
            )
    return pair[0], pair[1]


def build_pairs(
    target_layers: Sequence[str],
    guide_layers: Sequence[str],
    *,
    mapping: str,
    guide_subset: str = "all",
    explicit: Sequence[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    """(target layer, guide layer) pairs that each get a 1 - CKA loss term.

    "authors" reproduces the released code (last guide layer per target wins, A.3); "all_pairs"
    keeps every spread pair, the many-to-one supervision the paper describes; "explicit" takes
    the given pairs as they are (``guide_subset`` is ignored there).
    """
    if mapping == "explicit":
        if not explicit:
            raise ConfigError("mapping 'explicit' needs at least one (target, guide) layer pair")
        return [_check_explicit(pair, target_layers, guide_layers) for pair in explicit]
    if mapping not in MAPPINGS:
        raise ConfigError(f"unknown layer mapping {mapping!r}; choose one of {', '.join(MAPPINGS)}")
    try:
        guide = select_layers(guide_layers, guide_subset)
    except ConfigError as error:
        raise ConfigError(f"guide_subset: {error}") from None
    spread = spread_pairs(len(guide), len(target_layers), overwrite=mapping == "authors")
    return [(target_layers[t], guide[g]) for t, g in spread]

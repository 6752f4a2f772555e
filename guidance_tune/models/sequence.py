"""Sequence models for the token tasks, laid out as the authors build them (notes A.7).

Builders take the registry's ``(in_channels, image_size, num_classes)`` as (input vocabulary,
sequence length, output vocabulary) and map ``(b, T)`` int64 tokens to logits ``(b, T, V)``.
Every width and depth is a kwarg. Layers are named so that a mapping reads as the paper
describes it: ``rnns.2`` is the third RNN layer, ``layers.3`` the fourth decoder layer.

The RNN LM is the target of copy-paste and of language modelling; ``transformer_decoder`` is
the copy-paste guide, ``transformer_lm`` the language-model guide. The parity pair is in
:mod:`guidance_tune.models.parity`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guidance_tune.models.registry import register_model


class RNNLM(nn.Module):
    """Embedding, ``num_layers`` stacked single-layer tanh RNNs (each one hooked layer), then a
    Linear to the vocabulary. Every layer starts from a zero state, for every batch.

    ``chained_states``: the authors' RNN, in which layer i + 1 starts from layer i's final state
    (within the same forward; the first layer from zeros, and nothing is carried from one batch
    to the next, so there is no state to reset or checkpoint). That state has read the whole
    sequence, so the upper layers see future tokens from the first position: a language model
    given it predicts words it has already read (its perplexity is not a language model's); in
    copy-paste, whose answers lie in the past, it only hands the upper layers the whole input
    early. Off by default; on to reproduce the authors.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        embed_dim: int,
        hidden_size: int,
        num_layers: int,
        chained_states: bool,
    ) -> None:
        super().__init__()
        self.chained_states = chained_states
        self.embed = nn.Embedding(vocab_size, embed_dim)
        sizes = [embed_dim] + [hidden_size] * num_layers
        self.rnns = nn.ModuleList(
            nn.RNN(width_in, hidden_size, batch_first=True) for width_in in sizes[:-1]
        )
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden, state = self.embed(tokens), None
        for rnn in self.rnns:
            hidden, final = rnn(hidden, state)  # final: (1, b, H)
            state = final if self.chained_states else None
        return self.head(hidden)


@register_model("rnn_lm", takes="tokens", predicts="positions")
def rnn_lm(
    in_channels: int,
    image_size: int,
    num_classes: int,
    embed_dim: int = 256,
    hidden_size: int = 512,
    num_layers: int = 4,
    chained_states: bool = False,
) -> nn.Module:
    del image_size  # any length
    return RNNLM(in_channels, num_classes, embed_dim, hidden_size, num_layers, chained_states)


def sinusoidal_positions(length: int, width: int) -> Tensor:
    """The Transformer paper's fixed position code ``(length, width)``."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(1e4) / width))
    code = torch.zeros(length, width)
    code[:, 0::2] = torch.sin(position * frequency)
    code[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return code


def causal_mask(length: int, device: torch.device) -> Tensor:
    """True where a position may not look: every later position."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=1)


class TransformerDecoder(nn.Module):
    """Embedding times sqrt(d) plus sinusoidal positions (with dropout), ``num_layers``
    ``nn.TransformerDecoderLayer`` calls (post-LN, batch first), then a Linear to the vocabulary.

    ``layout="authors"``: one layer instance called ``num_layers`` times (tied weights), its
    cross-attention reading its own input without a mask, as the released code does; harmless
    for copy-paste, whose answers lie in the past, but it sees the future. ``layout="causal"``:
    ``num_layers`` separate layers, each cross-attending to the embedded input under the same
    causal mask as its self-attention, so no position sees a later one.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_length: int,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        num_layers: int,
        dropout: float,
        layout: str,
    ) -> None:
        super().__init__()
        if layout not in ("authors", "causal"):
            raise ValueError(f"layout {layout!r}: choose authors or causal")
        self.layout, self.num_layers, self.d_model = layout, num_layers, d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        positions = sinusoidal_positions(max_length, d_model)
        self.register_buffer("positions", positions, persistent=False)
        self.drop = nn.Dropout(dropout)
        count = 1 if layout == "authors" else num_layers
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                d_model, nhead, dim_feedforward, dropout=dropout, batch_first=True
            )
            for _ in range(count)
        )
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        embedded = self.embed(tokens) * math.sqrt(self.d_model) + self.positions[:length]
        hidden = self.drop(embedded)
        mask = causal_mask(length, tokens.device)
        for index in range(self.num_layers):
            if self.layout == "authors":
                hidden = self.layers[0](hidden, hidden, tgt_mask=mask)
            else:
                layer = self.layers[index]
                hidden = layer(hidden, embedded, tgt_mask=mask, memory_mask=mask)
        return self.head(hidden)


@register_model("transformer_decoder", takes="tokens", predicts="positions")
def transformer_decoder(
    in_channels: int,
    image_size: int,
    num_classes: int,
    d_model: int = 512,
    nhead: int = 16,
    dim_feedforward: int = 512,
    num_layers: int = 4,
    dropout: float = 0.1,
    layout: str = "authors",
) -> nn.Module:
    return TransformerDecoder(
        in_channels,
        num_classes,
        image_size,
        d_model,
        nhead,
        dim_feedforward,
        num_layers,
        dropout,
        layout,
    )


class TransformerLMBlock(nn.Module):
    """The authors' block: LayerNorm before each sublayer, the residual added to the normalised
    stream (``h = LN1(x); x = h + MHA(h); h = LN2(x); x = h + FF(h)``). Its hooked records, in
    order: norm1, attention, norm2, the FFN's hidden Linear and its output Linear."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=1e-12)
        self.attention = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-12)
        self.hidden = nn.Linear(d_model, dim_feedforward)
        self.output = nn.Linear(dim_feedforward, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        normed = self.norm1(x)
        attended, _ = self.attention(normed, normed, normed, attn_mask=mask, need_weights=False)
        x = normed + self.drop(attended)
        normed = self.norm2(x)
        return normed + self.drop(self.output(self.drop(F.gelu(self.hidden(normed)))))


class TransformerLM(nn.Module):
    """Token plus learned position embeddings, ``num_layers`` causal :class:`TransformerLMBlock`
    s, then an untied Linear head; weights drawn from N(0, 0.02) as the authors do, so there
    are ``5 * num_layers`` hooked records (20 for 4 layers, as in their table)."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_length: int,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        num_layers: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_length, d_model)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerLMBlock(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.head = nn.Linear(d_model, num_classes)
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.normal_(parameter, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        place = torch.arange(length, device=tokens.device)
        hidden = self.drop(self.embed(tokens) + self.positions(place))
        mask = causal_mask(length, tokens.device)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return self.head(hidden)


@register_model("transformer_lm", takes="tokens", predicts="positions")
def transformer_lm(
    in_channels: int,
    image_size: int,
    num_classes: int,
    d_model: int = 512,
    nhead: int = 16,
    dim_feedforward: int = 2048,
    num_layers: int = 4,
    dropout: float = 0.1,
) -> nn.Module:
    return TransformerLM(
        in_channels, num_classes, image_size, d_model, nhead, dim_feedforward, num_layers, dropout
    )

"""The GPT: token + learned position embeddings, pre-LayerNorm transformer blocks of causal
multi-head self-attention and a ReLU MLP, a final LayerNorm and an untied lm_head.

At the seed sizes (vocab 512, context 256, d_model 384, 6 heads, 6 layers) it has exactly
11,132,672 parameters. Attention goes through fastgpt.ops, so the fused kernel and the
reference are interchangeable. For generation, forward takes a KVCache (new_cache()): the
keys and values of the tokens already seen, so that only the new tokens are computed.

Initialisation (GPT-2's, plus a small read-out):
- Linear and Embedding weights ~ N(0, 0.02^2), biases 0, LayerNorm weight 1 and bias 0;
- the two projections that write into the residual stream (attention output, MLP down)
  ~ N(0, (0.02 / sqrt(2 * num_layers))^2), so the residual's variance does not grow with depth;
- lm_head weight ~ N(0, (1 / d_model)^2) (a muP-style read-out): the untrained logits have a
  standard deviation of about 1/sqrt(d_model), so the model starts near the uniform guess and
  pays ln(vocab_size) nats (6.2383 at vocab 512). With 0.02 the logits' spread alone would
  add ~0.08 nats at the seed sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgpt import ops


class LayerCache:
    """One attention layer's keys and values of the tokens seen so far, for generation:
    (B, H, context_length, D) buffers, allocated at the first append, of which the first
    `length` positions are filled."""

    def __init__(self, context_length: int):
        self.context_length = context_length
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v (B, H, T, D) after the cached positions; return every key and value
        so far, (B, H, length, D) views of the buffers."""
        B, H, T, D = k.shape
        if self.keys is None:
            self.keys = k.new_empty(B, H, self.context_length, D)
            self.values = v.new_empty(B, H, self.context_length, D)
        end = self.length + T
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """The keys and values of every layer (GPT.new_cache); `length` tokens cached."""

    def __init__(self, num_layers: int, context_length: int):
        self.layers = [LayerCache(context_length) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        assert d_model % num_heads == 0, "num_heads must divide d_model"
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). With a cache, x holds the tokens after those cached."""
        B, T, C = x.shape
        H = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, H, T, C // H)
            return t.view(B, T, H, C // H).transpose(1, 2)

        # q, k and v by one (C -> 3C) matmul over x rather than three (the weights stay three
        # Linears: the chapter's names, and checkpoints keep their layout)
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        q, k, v = map(heads, F.linear(x, weight).split(C, dim=-1))
        if cache is not None:  # attend to every token so far: (B, H, cached + T, C // H)
            k, v = cache.append(k, v)
        y = ops.causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(d_model, 4 * d_model)
        self.down = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C), computed on the B*T rows. (On (B, T, C) views
        torch.compile's partitioner does not see that the ReLU output it keeps for the down
        projection's gradient is the one the ReLU's own gradient reads, and keeps a bool
        mask besides: on a CPU, storing it took 15% of a compiled step.)"""
        rows = x.reshape(-1, x.shape[-1])
        return self.dropout(self.down(torch.relu(self.up(rows)))).view_as(x)


class Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int = 512, context_length: int = 256, d_model: int = 384,
                 num_heads: int = 6, num_layers: int = 6, dropout: float = 0.1):
        super().__init__()
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context_length, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, num_heads, dropout) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size)
        self._init_weights(d_model, num_layers)

    @torch.no_grad()
    def _init_weights(self, d_model: int, num_layers: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.out_proj, block.mlp.down):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * num_layers))
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=1.0 / d_model)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx: (B, T) int64 token ids, T <= context_length -> logits (B, T, vocab_size).

        cache (generation): idx holds the tokens that follow the cache's, at positions
        cache.length onwards; their keys and values are added to it."""
        return self.lm_head(self.hidden_states(idx, cache))

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """What lm_head reads: the final LayerNorm's output (B, T, d_model) for idx (B, T);
        cache as in forward."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.context_length:
            raise ValueError(f"sequence length {start + T} exceeds context_length "
                             f"{self.context_length}")
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        return self.ln_f(x)

    def new_cache(self) -> KVCache:
        """An empty key/value cache for generate()."""
        return KVCache(len(self.blocks), self.context_length)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
             backend: str | None = None) -> torch.Tensor:
        """Cross-entropy of the next-token guesses. idx, targets: (B, T) int64; "none"
        gives (B * T,). From the hidden states through fastgpt.ops.linear_cross_entropy,
        whose fused path never holds the (B * T, vocab_size) logits (the reference is
        lm_head then the cross-entropy, as ever). backend None: the process default
        (fastgpt.ops.get_backend())."""
        hidden = self.hidden_states(idx)
        return ops.linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight,
                                        targets.flatten(), self.lm_head.bias,
                                        reduction=reduction, backend=backend)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

"""Generate text from a trained checkpoint, one token at a time."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from fastgpt import FastGPTError
from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint
from fastgpt.config import check_seed
from fastgpt.distributed import pick_device
from fastgpt.model import GPT


def _check_sampling(temperature: float, top_k: int | None) -> None:
    """Raise FastGPTError for a temperature or top_k that generate cannot sample with."""
    if not (temperature >= 0 and math.isfinite(temperature)):  # nan fails both
        raise FastGPTError("temperature must be a finite number >= 0 (0: always the "
                           f"likeliest token), got {temperature}")
    if top_k is not None and top_k < 1:
        raise FastGPTError(f"top_k must be at least 1, got {top_k}")


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             kv_cache: bool = True) -> torch.Tensor:
    """Extend idx (B, T) int64 by max_new_tokens tokens -> (B, T + max_new_tokens).

    Each new token is drawn from softmax(logits / temperature), restricted to the top_k
    most likely tokens if top_k is set; temperature 0 picks the most likely token. The
    model sees at most its last context_length tokens.

    kv_cache: keep every layer's keys and values and feed the model one new token per step,
    instead of the whole window again. The positions are learned and absolute, so once
    the sequence outgrows context_length the window slides, every token's position
    changes, and the cache is primed afresh on the last window for each further token:
    the tokens are those of kv_cache=False (the same logits up to rounding), faster only
    while the sequence fits the context.
    """
    _check_sampling(temperature, top_k)
    model.eval()
    window = model.context_length
    cache, pending = None, idx[:, -window:]  # pending: the tokens the cache lacks
    for _ in range(max_new_tokens):
        if not kv_cache or cache is None or cache.length + pending.shape[1] > window:
            cache, pending = model.new_cache() if kv_cache else None, idx[:, -window:]
        logits = model(pending, cache)[:, -1, :].float()  # (B, V)
        next_id = _pick(logits, temperature, top_k, generator)
        idx = torch.cat([idx, next_id], dim=1)
        pending = next_id
    return idx


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """The next token (B, 1) from the last position's logits (B, V) float32."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


def sample_from_checkpoint(path: str, prompt: str = "\n", max_new_tokens: int = 200,
                           temperature: float = 1.0, top_k: int | None = None, seed: int = 1337,
                           num_samples: int = 1, device: str = "auto", kv_cache: bool = True,
                           log: Callable[[str], None] | None = None) -> list[str]:
    """Load a checkpoint and return num_samples continuations of prompt (prompt included).
    log, if given, receives one line: the new tokens per second of the generation."""
    if max_new_tokens < 0:
        raise FastGPTError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise FastGPTError(f"num_samples must be at least 1, got {num_samples}")
    _check_sampling(temperature, top_k)  # before the checkpoint loads
    check_seed(seed)
    model, _, tokenizer = model_from_checkpoint(load_checkpoint(path), path)
    target = pick_device(device)
    model.to(target)
    prompt_ids = tokenizer.encode(prompt or "\n")  # an empty prompt starts a fresh line
    idx = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=target)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    out = generate(model, idx, max_new_tokens, temperature, top_k, generator, kv_cache)
    if target.type == "cuda":  # greedy decoding never waits for the GPU on its own
        torch.cuda.synchronize(target)
    seconds = time.perf_counter() - started
    if log is not None and max_new_tokens:
        new_tokens = max_new_tokens * num_samples
        log(f"{new_tokens} new tokens in {seconds:.2f} s: {new_tokens / seconds:,.0f} tokens/s "
            f"on {target} ({'with' if kv_cache else 'without'} the key/value cache)")
    return [tokenizer.decode(row.tolist()) for row in out]

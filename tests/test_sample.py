import pytest
import torch

from fastgpt import FastGPTError
from fastgpt.model import GPT
from fastgpt.sample import generate, sample_from_checkpoint
from fastgpt.train import train
from helpers import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(vocab_size=512, context_length=16, d_model=32, num_heads=2, num_layers=2)


def test_generate_appends_tokens_and_crops_to_the_context(model):
    prompt = torch.randint(0, 512, (2, 40))  # longer than context_length: cropped per step
    out = generate(model, prompt, 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 45) and out.dtype == torch.long
    assert torch.equal(out[:, :40], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < 512


def test_greedy_top_k_and_seeds(model):
    prompt = torch.randint(0, 512, (1, 8))
    greedy = generate(model, prompt, 6, temperature=0)
    assert torch.equal(greedy, generate(model, prompt, 6, temperature=0))
    top1 = generate(model, prompt, 6, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(top1, greedy)  # top-1 sampling is greedy decoding
    by_hand = prompt
    for _ in range(6):
        with torch.no_grad():
            next_id = model(by_hand)[:, -1].argmax(-1, keepdim=True)
        by_hand = torch.cat([by_hand, next_id], 1)
    assert torch.equal(greedy, by_hand)

    def draw(seed):
        return generate(model, prompt, 20, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))  # an untrained model is near uniform over 512


def test_bad_sampling_settings(model):
    prompt = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(FastGPTError, match="temperature"):
        generate(model, prompt, 1, temperature=-1)
    with pytest.raises(FastGPTError, match="top_k"):
        generate(model, prompt, 1, top_k=0)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), float("-inf")])
def test_a_temperature_that_is_not_finite_is_refused(model, temperature):
    # nan made softmax nan (a traceback from multinomial); inf sampled uniform noise
    message = f"temperature must be a finite number >= 0.*got {temperature}"
    with pytest.raises(FastGPTError, match=message):
        generate(model, torch.zeros(1, 1, dtype=torch.long), 1, temperature=temperature)


def test_sample_from_a_trained_checkpoint(tmp_path, corpus_file):
    train(tiny_config(tmp_path / "runs", corpus_file, max_steps=3))
    path = str(tmp_path / "runs" / "tiny" / "best.pt")
    texts = sample_from_checkpoint(path, prompt="def parse(", max_new_tokens=12,
                                   num_samples=2, seed=5)
    assert len(texts) == 2 and all(t.startswith("def parse(") for t in texts)
    assert texts == sample_from_checkpoint(path, prompt="def parse(", max_new_tokens=12,
                                           num_samples=2, seed=5)
    assert sample_from_checkpoint(path, prompt="x", max_new_tokens=0) == ["x"]


class FedTokens:
    """Records how many tokens each forward of `model` is fed."""

    def __init__(self, model):
        self.lengths = []
        self.handle = model.register_forward_pre_hook(
            lambda module, args: self.lengths.append(args[0].shape[1]))


@pytest.mark.parametrize("prompt_length", [3, 16, 40])  # shorter than, as long as, longer
@pytest.mark.parametrize("temperature, top_k", [(0, None), (1.0, None), (0.8, 20)])
def test_the_kv_cache_gives_exactly_the_tokens_of_the_whole_window(model, prompt_length,
                                                                   temperature, top_k):
    # fp32; 30 new tokens from a 3-token prompt cross the context (16) and slide it
    prompt = torch.randint(0, 512, (3, prompt_length), generator=torch.Generator().manual_seed(7))

    def run(kv_cache):
        return generate(model, prompt, 30, temperature, top_k,
                        torch.Generator().manual_seed(11), kv_cache=kv_cache)
    assert torch.equal(run(True), run(False))


def test_the_cache_feeds_one_token_per_step_until_the_window_slides(model):
    fed = FedTokens(model)
    try:
        generate(model, torch.zeros(1, 3, dtype=torch.long), 20, temperature=0)
    finally:
        fed.handle.remove()
    # the prompt, then one token at a time up to 16 in the window; past it, every new
    # token shifts every position (learned absolute positions): the last window afresh
    assert fed.lengths == [3] + [1] * 13 + [16] * 6


def test_cached_logits_are_the_whole_windows(model):
    # the logits themselves, position by position: prefill 5, then 11 single tokens
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        whole = model(idx)
        cache = model.new_cache()
        parts = [model(idx[:, :5], cache)] + [model(idx[:, t:t + 1], cache)
                                              for t in range(5, 16)]
        assert cache.length == 16
        torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=1e-5)  # fp32
        with pytest.raises(ValueError, match="sequence length 17 exceeds context_length 16"):
            model(idx[:, :1], cache)


def test_a_rolling_cache_would_be_wrong(model):
    # why the cache restarts: keeping the cached keys of positions 1..15 and adding a new
    # token would leave them computed at positions 1..15, where the slid window has them
    # at 0..14; the logits differ
    idx = torch.randint(0, 512, (1, 17), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        cache = model.new_cache()
        model(idx[:, :16], cache)
        for layer in cache.layers:  # drop position 0, keep the rest where they were
            layer.keys[:, :, :15] = layer.keys[:, :, 1:16].clone()
            layer.values[:, :, :15] = layer.values[:, :, 1:16].clone()
            layer.length = 15
        rolled = model(idx[:, 16:], cache)[:, -1]
        slid = model(idx[:, 1:])[:, -1]
    assert (rolled - slid).abs().max() > 1e-3

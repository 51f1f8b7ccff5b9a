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

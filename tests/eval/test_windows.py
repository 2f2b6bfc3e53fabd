import torch
from conftest import generated_text
from transformers import AutoTokenizer

from awqkit.data.corpora import load_corpus
from awqkit.eval.windows import eval_windows, sample_windows, stream_windows


def test_max_windows_tokenizes_a_prefix_without_changing_the_windows(tokenizer):
    text = generated_text(20_000)
    assert torch.equal(eval_windows(tokenizer, text, 128, 4), eval_windows(tokenizer, text, 128)[:4])


def test_windows_lead_with_bos_when_the_tokenizer_does(gemma3_dir):
    gemma = AutoTokenizer.from_pretrained(gemma3_dir)
    text = load_corpus("fortunes")[:20_000]
    stream = stream_windows(gemma, text, 32, 3)
    plain = gemma(text[: text.find("\n\n", 2_000)], add_special_tokens=False)["input_ids"]
    assert stream.bos and stream.ids.shape == (3, 32) and (stream.ids[:, 0] == gemma.bos_token_id).all()
    assert stream.ids[:, 1:].reshape(-1).tolist() == plain[: 3 * 31]
    samples = sample_windows(gemma, text, 5, 16, seed=0)
    assert samples.bos and len(samples) == 5 and (samples.ids[:, 0] == gemma.bos_token_id).all()


def test_samples_are_seeded_truncated_paragraphs(tokenizer):
    text = "\n\n".join(f"paragraph number {i} " + "word " * (i % 40) for i in range(200)) + "\n\n\n\n  \n\n"
    a, b = sample_windows(tokenizer, text, 20, 24, seed=3), sample_windows(tokenizer, text, 20, 24, seed=3)
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, sample_windows(tokenizer, text, 20, 24, seed=4).ids)
    assert not a.bos and len(a) == 20 and a.lengths.max() == 24 and a.lengths.min() < 24
    for row, length in zip(a.ids, a.lengths):
        paragraph = tokenizer.decode(row[:length])
        assert paragraph.startswith("paragraph number") and (row[length:] == 0).all()

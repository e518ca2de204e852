"""Token healing: a prompt's last token taken back, the first new token constrained to extend its text."""

from __future__ import annotations

import torch

import formerkit as fk
from formerkit.generate.prompts import heal_prompts, token_texts
from formerkit.generate.text import generate_text
from formerkit.tokenizers import train_bpe

TEXT = "".join(f"def function_{i}(value):\n    return value + {i}\n\nclass Thing{i}:\n    pass\n" for i in range(60))


TOK = train_bpe([TEXT], 400)
torch.manual_seed(0)
MODEL = fk.Transformer(fk.ModelConfig.from_preset("gpt2", n_layers=2, d_model=32, n_heads=4, d_ff=64,
                                                 vocab_size=TOK.vocab_size, max_seq_len=64)).eval()


def test_a_trailing_space_is_taken_back_and_constrains_the_first_token():
    ids = TOK.encode("def ", add_special_tokens=False)
    assert [TOK.decode([i]) for i in ids] == ["def", " "]
    rows, shown, allowed = heal_prompts(TOK, [ids], ["def "], TOK.vocab_size)
    assert rows == [ids[:-1]] and shown == ["def"]
    texts = token_texts(TOK, TOK.vocab_size)
    assert {j for j in range(TOK.vocab_size) if allowed[0, j]} == {j for j, t in enumerate(texts) if t.startswith(" ")}
    assert allowed[0].sum() > 1


def test_rows_with_nothing_to_heal_are_left_alone():
    byte = fk.ByteTokenizer()  # every character is its own token: nothing extends " "
    assert heal_prompts(byte, [byte.encode("def ", add_special_tokens=False)], ["def "], 259)[2] is None
    one = TOK.encode("def", add_special_tokens=False)  # a single-token prompt keeps its token
    ids, shown, allowed = heal_prompts(TOK, [one, TOK.encode("class ", add_special_tokens=False)], ["def", "class "],
                                       TOK.vocab_size)
    assert ids[0] == one and shown == ["def", "class"] and bool(allowed[0].all())


def test_healed_greedy_generation_equals_brute_force():
    ids = TOK.encode("class ", add_special_tokens=False)
    healed = generate_text(MODEL, TOK, "class ", max_new_tokens=6, temperature=0.0, heal=True)
    with torch.no_grad():
        logits = MODEL(torch.tensor([ids[:-1]])).logits[0, -1]  # (V,) after "class"
    texts = token_texts(TOK, TOK.vocab_size)
    allowed = torch.tensor([t.startswith(" ") for t in texts])
    first = int(logits.masked_fill(~allowed, float("-inf")).argmax())
    rest = fk.generate(MODEL, [ids[:-1] + [first]], max_new_tokens=5, eos_token_id=TOK.eos_id)[0].tolist()
    assert healed == "class" + TOK.decode(rest[len(ids) - 1:])
    assert healed.startswith("class ")

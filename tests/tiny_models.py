"""Tiny models built from configs and saved locally (D11: no hub downloads in tests).

- `build_tiny_bert(root)`: a 2-layer, 32-wide BERT with a word-piece vocabulary of the sentiment
  words below, for classification.
- `build_tiny_llama(root, chat_template=True)`: a 2-layer Llama with a word-level tokenizer and a
  simple chat template (or none), for chat SFT.
"""

from __future__ import annotations

import inspect
from pathlib import Path

WORDS = [
    "good", "great", "fine", "lovely", "bad", "awful", "poor", "terrible",
    "the", "movie", "film", "plot", "acting", "was", "really", "very", "a", "show",
]
POSITIVE = ["good", "great", "fine", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "terrible"]
LABEL_SPACE = ["neg", "pos"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def sentiment_rows() -> tuple[list[str], list[str]]:
    texts, labels = [], []
    fillers = ["the movie was", "the film was really", "a show", "the plot was very", "acting"]
    for i, filler in enumerate(fillers):
        for j, word in enumerate(POSITIVE):
            texts.append(f"{filler} {word}" if (i + j) % 2 else f"{word} {filler}")
            labels.append("pos")
        for j, word in enumerate(NEGATIVE):
            texts.append(f"{filler} {word}" if (i + j) % 2 else f"{word} {filler}")
            labels.append("neg")
    return texts, labels


def make_tokenizer(tokenizer_cls, vocab_path):
    # transformers 5 renamed the argument (vocab_file -> vocab) and silently ignores the old one
    params = inspect.signature(tokenizer_cls.__init__).parameters
    key = "vocab_file" if "vocab_file" in params else "vocab"
    tokenizer = tokenizer_cls(**{key: str(vocab_path)})
    assert tokenizer.convert_tokens_to_ids("good") != tokenizer.unk_token_id
    return tokenizer


def build_tiny_bert(root: Path) -> str:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = make_tokenizer(BertTokenizerFast, vocab)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(str(root))
    tokenizer.save_pretrained(str(root))
    return str(root)


CHAT_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
              "what", "is", "the", "colour", "of", "sky", "grass", "snow", "blue", "green", "white", "it", "say"]


def build_tiny_llama(root: Path, *, chat_template: bool = True) -> str:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(CHAT_WORDS)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(CHAT_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3,
                         # RMSNorm keeps |h| near sqrt(hidden); with the usual 0.02 init the frozen lm_head
                         # could not produce a logit gap above ~0.6, so nothing could be learned confidently
                         initializer_range=0.3)
    LlamaForCausalLM(config).save_pretrained(str(root))
    tok.save_pretrained(str(root))
    return str(root)


def colour_conversations() -> list[dict]:
    """Chat rows whose assistant answers are fully determined by the question."""
    facts = {"sky": "blue", "grass": "green", "snow": "white"}
    rows = []
    for i in range(24):
        thing = list(facts)[i % 3]
        rows.append({"row_number": i + 1, "messages": [
            {"role": "user", "content": f"what is the colour of the {thing}"},
            {"role": "assistant", "content": f"it is {facts[thing]}"},
        ]})
    return rows

#!/usr/bin/env python3
"""Write the tiny llama-architecture GGUF model the real-model-server tests serve.

Nothing is downloaded: the weights come from a seeded generator. The model has a real
SentencePiece-style vocabulary (control tokens, 256 byte-fallback tokens so any UTF-8 input
tokenizes, printable ASCII, and the words of one sentence), a ChatML chat template, and two
transformer blocks of small random weights. On top of those, the token embedding and the output
matrix encode a bigram chain, so whatever the sampler settings the model answers

    " hello from the tiny paygate test model."

and then emits ``<|im_end|>`` (its end-of-generation token). With ``--no-eos`` the sentence
repeats until the token limit instead (for slow or long streams). How: embedding dimension 0
is a flag set only on tokens outside the sentence; dimensions 1.. are a random code per token.
Row ``next(w)`` of the output matrix is aligned with ``w``'s code (logit ~ ``MARGIN``), and the
first word's row reads the flag, so any other token (e.g. the "\\n" ending the prompt) leads
into the sentence. The random blocks perturb logits by far less than the margin.

Usage: ``make_tiny_gguf.py OUT.gguf [--no-eos] [--seed N] [--embd D --layers L ...]``.
Needs the ``gguf`` package (the dev extra) and numpy.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import numpy as np

try:
    import gguf
except ImportError as exc:  # the setup script reports this with what to install
    sys.exit(f"cannot import gguf ({exc}): pip install gguf (paygate's dev extra has it)")

SENTENCE = "hello from the tiny paygate test model ."
WORD_BOUNDARY = "\u2581"  # SentencePiece's "▁"
MARGIN = 30.0  # the intended next token's logit; the others stay within a few units of 0
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Vocab:
    tokens: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)

    def add(self, text: str, kind: gguf.TokenType, score: float = 0.0) -> int:
        if text in self.tokens:
            return self.tokens.index(text)
        self.tokens.append(text)
        self.scores.append(score)
        self.types.append(int(kind))
        return len(self.tokens) - 1


def vocabulary(words: list[str]) -> tuple[Vocab, dict[str, int], list[int]]:
    vocab = Vocab()
    special = {
        name: vocab.add(name, kind)
        for name, kind in (
            ("<unk>", gguf.TokenType.UNKNOWN),
            ("<s>", gguf.TokenType.CONTROL),
            ("</s>", gguf.TokenType.CONTROL),
            ("<|im_start|>", gguf.TokenType.CONTROL),
            ("<|im_end|>", gguf.TokenType.CONTROL),
        )
    }
    for byte in range(256):
        vocab.add(f"<0x{byte:02X}>", gguf.TokenType.BYTE)
    vocab.add(WORD_BOUNDARY, gguf.TokenType.NORMAL, -1.0)
    for code in range(0x21, 0x7F):
        vocab.add(chr(code), gguf.TokenType.NORMAL, -1.0)
    # Words are preferred over spelling them out (higher score); punctuation stays unprefixed.
    chain = [
        vocab.add(word if not word[0].isalnum() else WORD_BOUNDARY + word,
                  gguf.TokenType.NORMAL, -2.0)
        for word in words
    ]  # fmt: skip
    if len(set(chain)) != len(chain):
        sys.exit("the sentence must not repeat a word: each word has exactly one successor")
    return vocab, special, chain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--sentence", default=SENTENCE)
    parser.add_argument("--no-eos", action="store_true", help="repeat the sentence forever")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--embd", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ff", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--std", type=float, default=0.02, help="of the random block weights")
    args = parser.parse_args()

    vocab, special, chain = vocabulary(args.sentence.split())
    n_vocab, dim = len(vocab.tokens), args.embd
    head_dim = dim // args.heads
    rng = np.random.default_rng(args.seed)

    embedding = rng.standard_normal((n_vocab, dim)).astype(np.float32)
    flag = float(np.sqrt(dim))
    outside = np.ones(n_vocab, dtype=bool)
    outside[chain] = False
    embedding[:, 0] = np.where(outside, flag, 0.0)

    output = np.zeros((n_vocab, dim), dtype=np.float32)
    successors = [*chain[1:], chain[0] if args.no_eos else special["<|im_end|>"]]
    for word, successor in zip(chain, successors, strict=True):
        output[successor, 1:] += MARGIN * embedding[word, 1:] / (dim - 1)
    # RMSNorm scales a flagged row; its flag comes out as flag / rms(row) on average.
    output[chain[0], 0] = MARGIN / (flag / np.sqrt((flag * flag + dim - 1) / dim))

    def noise(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * args.std).astype(np.float32)

    writer = gguf.GGUFWriter(args.out, "llama")
    writer.add_name("paygate-tiny-test-llama")
    writer.add_context_length(args.ctx)
    writer.add_embedding_length(dim)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(args.ff)
    writer.add_head_count(args.heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(special["<s>"])
    writer.add_eos_token_id(special["<|im_end|>"])
    writer.add_unk_token_id(special["<unk>"])
    writer.add_pad_token_id(special["</s>"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(CHATML)

    # numpy shapes are ggml's reversed: a ggml {in, out} matrix is (out, in) here.
    writer.add_tensor("token_embd.weight", embedding)
    q_out, kv_out = args.heads * head_dim, args.kv_heads * head_dim
    for block in range(args.layers):
        prefix = f"blk.{block}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(dim, dtype=np.float32))
        writer.add_tensor(prefix + "attn_q.weight", noise(q_out, dim))
        writer.add_tensor(prefix + "attn_k.weight", noise(kv_out, dim))
        writer.add_tensor(prefix + "attn_v.weight", noise(kv_out, dim))
        writer.add_tensor(prefix + "attn_output.weight", noise(dim, q_out))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(dim, dtype=np.float32))
        writer.add_tensor(prefix + "ffn_gate.weight", noise(args.ff, dim))
        writer.add_tensor(prefix + "ffn_up.weight", noise(args.ff, dim))
        writer.add_tensor(prefix + "ffn_down.weight", noise(dim, args.ff))
    writer.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {args.out}: {n_vocab} tokens, {args.layers} blocks, d={dim}")


if __name__ == "__main__":
    main()

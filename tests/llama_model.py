"""A tiny random-weight GGUF model for the real llama-server, written at test time.

llama architecture, a few small layers, around one of the tokenizer vocabularies that
llama.cpp ships (``models/ggml-vocab-llama-spm.gguf``, cached by scripts/llama_server.py).
Nothing comes from a model hub: the weights are seeded noise.

Generation must never stop early, and its text must be plain: the output rows of every
token that is not a run of ASCII lowercase letters (optionally after SentencePiece's word
marker) are zero, the others large noise. A zero row's logit is 0 whatever the hidden state,
while the top allowed logits sit around +40, so control tokens (end of stream), byte tokens
(half UTF-8 sequences) and punctuation (markdown the web UI would render differently) have a
probability near e^-40 under any sampler. The answer is a stream of words such as
``" foo barqux"``: valid UTF-8, no markup, and it runs until ``max_tokens`` or the context
ends.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

VOCAB_FILE = "ggml-vocab-llama-spm.gguf"
WORD_PIECE = re.compile(r"^\u2581?[a-z]{2,}$")  # "▁word" or "word": plain text when decoded

EMBEDDING = 64
LAYERS = 2
HEADS = 4
FEED_FORWARD = 128
CONTEXT = 16384  # llama-server caps a slot's context at this
OUTPUT_SCALE = 1.5  # logit spread ~ OUTPUT_SCALE * sqrt(EMBEDDING) = 12


def _tokenizer_fields(vocab: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(vocab))
    return {name: field.contents() for name, field in reader.fields.items()
            if name.startswith("tokenizer.")}


def write_model(vocab: Path, target: Path, seed: int = 1234) -> Path:
    """Write the tiny model to ``target`` and return it. ``vocab`` is a
    ``ggml-vocab-llama-spm.gguf``. Raises ``ImportError`` without the ``gguf`` package."""
    import gguf

    fields = _tokenizer_fields(vocab)
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    token_types: list[int] = fields["tokenizer.ggml.token_type"]
    vocab_size = len(tokens)
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_name("shmstream-tiny-random")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(EMBEDDING)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FEED_FORWARD)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(EMBEDDING // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(fields.get("tokenizer.ggml.pre", "default"))
    writer.add_token_list(tokens)
    writer.add_token_scores(fields["tokenizer.ggml.scores"])
    writer.add_token_types(token_types)
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(fields["tokenizer.ggml.unknown_token_id"])
    writer.add_add_bos_token(bool(fields.get("tokenizer.ggml.add_bos_token", True)))
    writer.add_add_eos_token(False)

    def noise(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    normal = gguf.TokenType.NORMAL
    allowed = np.array([token_types[i] == normal and bool(WORD_PIECE.match(tokens[i]))
                        for i in range(vocab_size)])
    output = noise(vocab_size, EMBEDDING, scale=OUTPUT_SCALE)
    output[~allowed] = 0.0

    writer.add_tensor("token_embd.weight", noise(vocab_size, EMBEDDING, scale=1.0))
    for layer in range(LAYERS):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(EMBEDDING, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(prefix + name + ".weight", noise(EMBEDDING, EMBEDDING))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(EMBEDDING, np.float32))
        writer.add_tensor(prefix + "ffn_gate.weight", noise(FEED_FORWARD, EMBEDDING))
        writer.add_tensor(prefix + "ffn_up.weight", noise(FEED_FORWARD, EMBEDDING))
        writer.add_tensor(prefix + "ffn_down.weight", noise(EMBEDDING, FEED_FORWARD))
    writer.add_tensor("output_norm.weight", np.ones(EMBEDDING, np.float32))
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target

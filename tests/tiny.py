"""Tiny randomly initialised models of every supported family: the real architecture code at toy size."""

from __future__ import annotations

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 300  # 256 bytes + specials, padded


def tiny_tokenizer() -> T.PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code (nothing from a hub), with a ChatML template."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[name] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = T.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML
    return fast


def _common(**kw):
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **kw)


CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_common()),
    "qwen2": lambda: T.Qwen2Config(**_common()),
    "gemma2": lambda: T.Gemma2Config(**_common(head_dim=8)),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=256,
                                  bos_token_id=None, eos_token_id=None),
    "mixtral": lambda: T.MixtralConfig(**_common(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_common(moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                                    num_experts=4, num_experts_per_tok=2)),
    "mistral": lambda: T.MistralConfig(**_common()),
}


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = CONFIGS[family]()
    cfg.eos_token_id = cfg.bos_token_id = None
    cfg.pad_token_id = None
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    return model


def tiny_runner(family: str = "llama", seed: int = 0):
    from monitor.runner import ModelRunner

    return ModelRunner(tiny_model(family, seed), tiny_tokenizer(), model_id=f"tiny-{family}")

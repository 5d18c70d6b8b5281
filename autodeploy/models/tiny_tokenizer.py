"""A small byte-level BPE tokenizer trained offline on a corpus generated from a seed.

The tiny test models need a real tokenizer (BOS/EOS/PAD, a chat template, round-trips on any text)
without touching the hub. The corpus is produced by this module from a fixed word list and a seeded
RNG, so the trained tokenizer is the same on every machine: no files that vary by machine go in.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

BOS_TOKEN = "<|begin|>"
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)

# Each message: role marker, content, EOS. Generation prompts end with the assistant marker, so a
# model stops at EOS after its answer. BOS is added by the template (not by the post-processor when
# the template's text is tokenized with add_special_tokens=False, which is what HF does).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the a an of to in and or but is are was were be been being have has had do does did will would "
    "can could should may might must shall model token tokens graph export transform shard weight "
    "weights cache page pages batch sequence prefill decode attention head heads layer layers expert "
    "experts router state scan kernel tensor tensors matrix vector rank ranks device memory fast slow "
    "small large tiny first last next previous input output logits sample greedy temperature top "
    "hello world question answer user assistant system please thank you yes no maybe why how what "
    "when where who which number one two three four five six seven eight nine ten hundred thousand "
    "red green blue river mountain city garden window morning evening light dark warm cold water "
    "stone paper music story friend teacher student book letter road bridge ship train clock"
).split()
_PUNCT = (".", ",", "!", "?", ";", ":")
_FIXED_TEXT = (
    "Hello, world! The quick brown fox jumps over the lazy dog. 0123456789\n"
    "def forward(self, input_ids, position_ids):\n    return self.lm_head(hidden_states)\n"
    "Question: what is two plus three? Answer: five.\n"
    "Ünïcödé tëxt, émojis 🙂 and symbols: #$%&*()[]{}<>/\\|~^`'\"@+-=_\n"
)


def training_corpus(seed: int, num_lines: int = 3000) -> list[str]:
    """Deterministic lines of text: a fixed block plus seeded random sentences and numbers."""
    rng = random.Random(seed)
    lines = _FIXED_TEXT.splitlines()
    for _ in range(num_lines):
        n = rng.randint(3, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice(_PUNCT)
        lines.append(sentence)
    return lines


def train_tokenizer(vocab_size: int, seed: int):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` with the special tokens at ids 0..6."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(seed), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # like Llama: plain encode() prepends BOS
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return tokenizer


def save_tokenizer(tokenizer, out_dir: Path, model_max_length: int) -> dict[str, int]:
    """Save as a HF fast tokenizer; returns the special token ids for the model config."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=model_max_length,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(str(out_dir))
    # transformers 5 may write its own backend class name; the generic fast class loads in v4 and v5
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    return {
        "bos_token_id": hf_tok.bos_token_id,
        "eos_token_id": hf_tok.eos_token_id,
        "pad_token_id": hf_tok.pad_token_id,
    }

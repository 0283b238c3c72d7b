"""Character-level tokenizer for the embedded diffusion LM.

Vocab layout (101 ids, fixed):

    0 <|pad|>   1 <|bos|>   2 <|eos|>   3 <|eot|>   4 <|mask|>
    5 "\\n"      6..100 printable ASCII 32 (" ") .. 126 ("~"), i.e. id = ord(c) - 26

The model is a ``tokenizers`` BPE with an empty merge list and no
pre-tokenizer, so every character is its own token, and a ``Fuse`` decoder, so
decoding concatenates tokens without inserting spaces. Characters outside the
vocab (tabs, non-ASCII) are dropped by the BPE model (there is no unk token).
Nothing is added implicitly: ``add_special_tokens=True`` adds neither BOS nor
EOS; callers add them explicitly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, EOT_TOKEN, MASK_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>", "<|eot|>", "<|mask|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, EOT_TOKEN, MASK_TOKEN)
PAD_ID, BOS_ID, EOS_ID, EOT_ID, MASK_ID = range(len(SPECIAL_TOKENS))
NEWLINE_ID = len(SPECIAL_TOKENS)
CHARS = "\n" + "".join(chr(i) for i in range(32, 127))
VOCAB = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARS))}
VOCAB_SIZE = len(VOCAB)  # 101

# One user turn renders exactly like a few-shot question ("Q: ...\nA: "), one
# assistant turn like a worked answer followed by the blank line that separates
# examples, so a chat [user, assistant, ..., user] is byte-identical to
# dare_pipeline.evaluation.suite.format_prompt(problem, shots). The user turn already ends
# with the generation prompt "A: ", so add_generation_prompt changes nothing.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] }}\n\n"
    "{% else %}Q: {{ m['content'] }}\nA: {% endif %}"
    "{% endfor %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE(vocab=dict(VOCAB), merges=[], unk_token=None))
    core.decoder = decoders.Fuse()
    # Registering the specials as added tokens keeps "<|mask|>" etc. atomic and
    # lets skip_special_tokens remove them. Their ids are already in VOCAB.
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        extra_special_tokens=[EOT_TOKEN],
        # The default cleanup rewrites " ." -> "." etc., which would break round-trips.
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    _check_layout(tok)
    return tok


def _check_layout(tok: PreTrainedTokenizerFast) -> None:
    # Fail loudly if a tokenizers/transformers version ever re-assigns ids.
    got = {t: tok.convert_tokens_to_ids(t) for t in VOCAB}
    if got != VOCAB or len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer vocab layout changed: len={len(tok)}")


def save_tokenizer(directory: str | os.PathLike) -> Path:
    """Write tokenizer.json, tokenizer_config.json (with ``chat_template``) and
    special_tokens_map.json into ``directory``; loadable offline with
    ``AutoTokenizer.from_pretrained(directory)``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    # save_jinja_files=False keeps the template inside tokenizer_config.json.
    tok.save_pretrained(directory, save_jinja_files=False)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # transformers 5 writes "TokenizersBackend", which transformers 4.x cannot
    # resolve; "PreTrainedTokenizerFast" loads under both.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # transformers 5 no longer writes this legacy file; older loaders and tools read it.
    special_map = {
        "pad_token": PAD_TOKEN,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "mask_token": MASK_TOKEN,
        "additional_special_tokens": [EOT_TOKEN],
    }
    (directory / "special_tokens_map.json").write_text(
        json.dumps(special_map, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return directory

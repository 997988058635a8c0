"""A character-level tokenizer built offline with the `tokenizers` library."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .tasks import ALPHABET

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

# Plain concatenation of message contents: enough for `apply_chat_template` to work.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


# With role markers (the chat preset): what a chat model's template looks like, e.g.
# "<s><|user|>swap ab cd<|assistant|>cd ab</s>"; the markers are one token each.
ROLES = ("system", "user", "assistant")
ROLE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer(alphabet: str = ALPHABET, roles: bool = False) -> PreTrainedTokenizerFast:
    """One token per character; BOS is prepended automatically, EOS is not.

    roles=True adds one special token per chat role and a chat template that uses them.
    """
    markers = [f"<|{r}|>" for r in ROLES] if roles else []
    specials = [PAD, BOS, EOS, UNK, *markers]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join characters back without separators
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=markers or None,
        chat_template=ROLE_CHAT_TEMPLATE if roles else CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )

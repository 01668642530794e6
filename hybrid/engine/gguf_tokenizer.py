"""The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`), rebuilt with the tokenizers library:
byte-level BPE from the token list and merges, the pre-tokenizer its `tokenizer.ggml.pre` names, the control tokens
as special tokens, and the chat template. transformers 5 does not read deepseek2 GGUF tokenizers itself."""
from __future__ import annotations

from ..model.gguf_checkpoint import field

# Pre-tokenizers by `tokenizer.ggml.pre`: regular expressions split off in turn (each piece kept), then single
# digits, then bytes mapped to characters. deepseek-llm: DeepSeek-V2 / V2-Lite (their tokenizer.json's).
PRE_SPLITS = {
    "deepseek-llm": (
        '[\r\n]',
        '\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+',
        '\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+',
        '\\s+$',
        '[一-龥ࠀ-一가-\ud7ff]+',
    ),
}
CONTROL, USER_DEFINED, UNUSED = 3, 4, 5   # llama.cpp's token types beside normal ones (1)


def has_tokenizer(reader) -> bool:
    return "tokenizer.ggml.tokens" in reader.fields


def build(reader):
    """-> (tokenizers.Tokenizer, {bos_token, eos_token, chat_template}); ValueError naming what is unsupported."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    kind, pre = field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in PRE_SPLITS:
        raise ValueError(f"the GGUF's tokenizer ({kind}, pre-tokenizer {pre}) is not supported: gpt2 with "
                         f"{', '.join(PRE_SPLITS)}; pass --tokenizer DIR with its tokenizer.json")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_SPLITS[pre]]
        + [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                    use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # control and unused (padding) tokens are special: never text; user-defined ones match whole and read as text
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t in (CONTROL, UNUSED)])
    tok.add_tokens([AddedToken(tokens[i], normalized=False) for i, t in enumerate(types) if t == USER_DEFINED])
    ids = {k: field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos")}
    return tok, {"bos_token": tokens[ids["bos"]] if ids["bos"] is not None else None,
                 "eos_token": tokens[ids["eos"]] if ids["eos"] is not None else None,
                 "chat_template": field(reader, "tokenizer.chat_template")}

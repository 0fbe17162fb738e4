"""Token text for display: decode an id as the model would print it; make whitespace visible.

`token_decoder` turns byte-level BPE pieces ('Ġthe') and SentencePiece pieces ('▁the') into
' the' and shows a piece holding part of a UTF-8 character as `\\xe2` escapes (GPT-2's
byte table lives here). `visible_token` / `short_token` make that text safe to put in a grid
cell or an HTML table: ␣ ↵ ⇥ for whitespace, escapes for control characters.
"""

from __future__ import annotations

import functools
import re
from typing import Any


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in character -> byte ('Ġ' -> 0x20)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_decoder(tokenizer: Any):  # noqa: ANN201 - returns a cached callable
    """id -> the token's text as the model would print it.

    Byte-level BPE pieces ('Ġthe') and SentencePiece pieces ('▁the') become ' the'. A token
    holding part of a UTF-8 character cannot be printed alone; its bytes are shown as
    `\\xe2\\x80` escapes instead of a replacement character."""
    if tokenizer is None:
        return lambda i: f"#{i}"

    @functools.cache
    def decode(token_id: int) -> str:
        try:
            text = tokenizer.decode([token_id], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
        except Exception:  # noqa: BLE001 - a broken id shows as its number, not a crash
            return f"#{token_id}"
        if "\ufffd" not in text:
            return text
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            byte_map = _byte_level_decoder()
            match = _SP_BYTE.match(piece)
            if match:
                raw = bytes([int(match.group(1), 16)])
            elif piece and all(c in byte_map for c in piece):
                raw = bytes(byte_map[c] for c in piece)
            else:
                return text
            return raw.decode("utf-8", errors="backslashreplace")
        return text

    return decode


VISIBLE_WHITESPACE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍", "\u00a0": "⍽"}


def visible_token(text: str) -> str:
    """Token text with whitespace made visible (␣ ↵ ⇥) and control characters escaped;
    other characters, non-ASCII included, are kept as they are. '' becomes '∅'."""
    if not text:
        return "∅"
    out = []
    for ch in text:
        if ch in VISIBLE_WHITESPACE:
            out.append(VISIBLE_WHITESPACE[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
    return "".join(out)


def short_token(text: str, max_chars: int = 8) -> str:
    """`visible_token`, cut to `max_chars` characters with a trailing '…'."""
    vis = visible_token(text)
    return vis if len(vis) <= max_chars else vis[: max_chars - 1] + "…"

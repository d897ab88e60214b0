"""Action codebook: segments, K-disk fit, codebook file, encode/decode and ``<action_i>`` text tokens.

See DESIGN.md section 4. Public entry points::

    from tokenizer import ActionTokenizer, load_codebook
    tok = ActionTokenizer(load_codebook("data/codebook"))
    ids = tok.encode(futures)        # (B,10,3) -> (B,10)
    futures = tok.decode(ids)        # (B,10) -> (B,10,3)
"""

from tokenizer.codebook import Codebook, CodebookError, CodebookMeta, load_codebook, save_codebook
from tokenizer.kdisk import KDiskResult, kdisk_fit, kdisk_fit_plain
from tokenizer.segments import future_segments
from tokenizer.tokenizer import (
    ActionTokenizer,
    ParseResult,
    action_token_strings,
    format_action_tokens,
    parse_action_tokens,
    register_action_tokens,
)

__all__ = [
    "ActionTokenizer",
    "Codebook",
    "CodebookError",
    "CodebookMeta",
    "KDiskResult",
    "ParseResult",
    "action_token_strings",
    "format_action_tokens",
    "future_segments",
    "kdisk_fit",
    "kdisk_fit_plain",
    "load_codebook",
    "parse_action_tokens",
    "register_action_tokens",
    "save_codebook",
]

"""Constrained decoding (JSON schema, regex, choice, EBNF) with xgrammar: grammars compiled off the step loop
and cached (grammar.py), one matcher per request with bitmasks and jump-forward (manager.py). The logits
side is tokenmill/sample/grammar_mask.py."""
from tokenmill.structured.grammar import GrammarCache, build_grammar
from tokenmill.structured.manager import JUMP_FORWARD_MODES, StructuredOutputManager, bitmask_words

__all__ = ["GrammarCache", "StructuredOutputManager", "build_grammar", "bitmask_words", "JUMP_FORWARD_MODES"]

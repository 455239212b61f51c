"""Merge rules (paper §3.1, App. A): mining, the RuleSet, and the rules.bin file format."""

from vllm_umim.rules.file_format import load_rules, save_rules
from vllm_umim.rules.mining import MiningReport, mine_rules
from vllm_umim.rules.ruleset import RuleSet, spell_raw, tokenizer_fingerprint

__all__ = ["RuleSet", "MiningReport", "load_rules", "mine_rules", "save_rules", "spell_raw", "tokenizer_fingerprint"]

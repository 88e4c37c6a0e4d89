"""Evaluate GGUF variants: fidelity against the reference (KLD, same-top-1, perplexity) and sandboxed HumanEval."""

from .fidelity import SETS, Fidelity, FidelityOptions, evaluate_fidelity, fidelity_table, parse_kld_output

__all__ = ["SETS", "Fidelity", "FidelityOptions", "evaluate_fidelity", "fidelity_table", "parse_kld_output"]

"""Reports on a run folder: the comparison table and plots, the model card, and which variant fits a machine."""

from .card import card_markdown, write_card
from .compare import Comparison, compare, comparison_rows, comparison_table, derive_notes, pareto
from .fit import FitResult, fit, fit_lines
from .release import write_release
from .runinfo import VariantEntry, read_variants, write_variants

__all__ = ["Comparison", "FitResult", "VariantEntry", "card_markdown", "compare", "comparison_rows",
           "comparison_table", "derive_notes", "fit", "fit_lines", "pareto", "read_variants", "write_card",
           "write_release", "write_variants"]

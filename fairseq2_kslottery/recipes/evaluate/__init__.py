"""Evaluation with generation as a fairseq2 recipe, for any model card or checkpoint, with or without a ticket patch:

python -m fairseq2_kslottery.recipes.evaluate OUTPUT_DIR --config-file eval.yaml --config patch=ticket_patch.safetensors
"""

from fairseq2_kslottery.recipes.evaluate.recipe import EvaluateConfig, EvaluateRecipe

__all__ = ["EvaluateConfig", "EvaluateRecipe"]

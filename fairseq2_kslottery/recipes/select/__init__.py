"""The selection stage as a fairseq2 recipe:

    python -m fairseq2_kslottery.recipes.select OUTPUT_DIR --config-file select.yaml --config rule.top_k=20

Writes ``OUTPUT_DIR/tickets.json`` (and ``ks_stats.safetensors``) exactly as ``fairseq2-kslottery select`` does.
"""

from fairseq2_kslottery.recipes.select.recipe import SelectRecipe, SelectRecipeConfig, SelectRuleSection

__all__ = ["SelectRecipe", "SelectRecipeConfig", "SelectRuleSection"]

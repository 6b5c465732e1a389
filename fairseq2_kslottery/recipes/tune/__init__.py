"""Reference tuning and ticket tuning as a fairseq2 training recipe:

python -m fairseq2_kslottery.recipes.tune OUTPUT_DIR --config-file tune.yaml --config tuning.mode=tickets
"""

from fairseq2_kslottery.recipes.tune.config import TuneConfig
from fairseq2_kslottery.recipes.tune.recipe import TuneRecipe

__all__ = ["TuneConfig", "TuneRecipe"]

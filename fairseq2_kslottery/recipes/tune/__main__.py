from fairseq2.recipe.cli import main

from fairseq2_kslottery.recipes.tune.recipe import TuneRecipe

if __name__ == "__main__":
    main(TuneRecipe())

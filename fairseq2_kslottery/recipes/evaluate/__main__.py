from fairseq2.recipe.cli import main

from fairseq2_kslottery.recipes.evaluate.recipe import EvaluateRecipe

if __name__ == "__main__":
    main(EvaluateRecipe())

from fairseq2.recipe.cli import main

from fairseq2_kslottery.recipes.select.recipe import SelectRecipe

if __name__ == "__main__":
    main(SelectRecipe())

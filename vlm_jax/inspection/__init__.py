"""Helpers behind the Colab inspection notebooks (notebooks/): the computations, kept out of
the notebooks so they are importable and reviewable; the notebooks only lay out and plot."""

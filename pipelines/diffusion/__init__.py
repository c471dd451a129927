"""Diffusion: the ``ComposerPipeline`` (diffusers), sampling and guidance over condition sets,
the Composer recipes, and loading a saved pipeline from a directory or ``models:/`` URI."""

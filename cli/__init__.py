"""The `glm-mlx` command line (Typer + rich): thin typed commands over library calls."""
